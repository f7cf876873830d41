//! Tests over real h2 connections (tokio duplex pipes or loopback TCP).

use std::{
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use tokio::{
    io::{duplex, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::timeout,
};

use super::*;

const LIMIT: Duration = Duration::from_secs(20);

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// What runs behind the server, on the far end of the upstream the handler returns.
type App = Arc<dyn Fn(SocketAddr, DuplexStream) -> BoxFuture<'static, ()> + Send + Sync>;
type Handler = Box<
    dyn Fn(SocketAddr) -> BoxFuture<'static, Result<Accepted<DuplexStream>, Refusal>> + Send + Sync,
>;

fn echo_app() -> App {
    Arc::new(|_, s| {
        Box::pin(async move {
            let (mut r, mut w) = tokio::io::split(s);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
    })
}

/// A handler that accepts everything, runs `app` behind it, counts calls and reports stats.
fn accepting(
    app: App,
    calls: Arc<AtomicUsize>,
    stats: mpsc::UnboundedSender<RelayStats>,
) -> Handler {
    Box::new(move |target| {
        calls.fetch_add(1, Ordering::SeqCst);
        let (ours, theirs) = duplex(64 * 1024);
        tokio::spawn(app(target, theirs));
        let stats = stats.clone();
        Box::pin(async move {
            Ok(Accepted::new(ours).on_close(move |s| {
                let _ = stats.send(s);
            }))
        })
    })
}

struct Harness {
    send: SendRequest<Bytes>,
    calls: Arc<AtomicUsize>,
    stats: mpsc::UnboundedReceiver<RelayStats>,
    _server: JoinHandle<Result<(), HboneError>>,
}

async fn harness_over<C, S>(client_io: C, server_io: S, cfg: ServerConfig, app: App) -> Harness
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let (tx, stats) = mpsc::unbounded_channel();
    let handler = accepting(app, calls.clone(), tx);
    let server = tokio::spawn(async move { serve_connection(server_io, &cfg, handler).await });
    let (send, _driver) =
        client_handshake(client_io, &ClientConfig::default()).await.expect("client handshake");
    Harness { send, calls, stats, _server: server }
}

async fn harness(cfg: ServerConfig, app: App) -> Harness {
    let (c, s) = duplex(1024 * 1024);
    harness_over(c, s, cfg, app).await
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (c, s) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (c.expect("connect"), s.expect("accept").0)
}

async fn next_stats(h: &mut Harness) -> RelayStats {
    timeout(LIMIT, h.stats.recv())
        .await
        .expect("tunnel did not end in time")
        .expect("stats channel open")
}

#[tokio::test]
async fn connect_round_trip_reports_bytes() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let app: App = Arc::new(move |target, s| {
        seen2.lock().unwrap().push(target);
        echo_app()(target, s)
    });
    let mut h = harness(ServerConfig::default(), app).await;
    for target in ["10.0.2.5:8080", "[fd00::5]:9090"] {
        let mut s = connect_stream(&mut h.send, addr(target)).await.expect("CONNECT");
        assert_eq!(s.target(), addr(target));
        s.write_all(b"hello hbone").await.unwrap();
        let mut buf = [0u8; 11];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello hbone");
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        timeout(LIMIT, s.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert!(rest.is_empty());
        let st = next_stats(&mut h).await;
        assert_eq!(st.target, addr(target));
        assert_eq!((st.bytes_to_upstream, st.bytes_from_upstream), (11, 11));
        assert!(st.error.is_none(), "{:?}", st.error);
    }
    assert_eq!(*seen.lock().unwrap(), vec![addr("10.0.2.5:8080"), addr("[fd00::5]:9090")]);
}

#[tokio::test]
async fn client_half_close_still_receives_server_bytes() {
    let (got_tx, got_rx) = oneshot::channel::<Vec<u8>>();
    let got_tx = Arc::new(Mutex::new(Some(got_tx)));
    let app: App = Arc::new(move |_, mut s| {
        let got_tx = got_tx.clone();
        Box::pin(async move {
            // Reads until the client's half-close, then answers.
            let mut req = Vec::new();
            s.read_to_end(&mut req).await.unwrap();
            if let Some(tx) = got_tx.lock().unwrap().take() {
                let _ = tx.send(req);
            }
            s.write_all(&vec![7u8; 300_000]).await.unwrap();
            s.shutdown().await.unwrap();
        })
    });
    let mut h = harness(ServerConfig::default(), app).await;
    let mut s = connect_stream(&mut h.send, addr("10.0.0.9:80")).await.unwrap();
    s.write_all(b"request").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(timeout(LIMIT, got_rx).await.unwrap().unwrap(), b"request");
    let mut resp = Vec::new();
    timeout(LIMIT, s.read_to_end(&mut resp)).await.unwrap().unwrap();
    assert_eq!(resp, vec![7u8; 300_000]);
    let st = next_stats(&mut h).await;
    assert_eq!((st.bytes_to_upstream, st.bytes_from_upstream), (7, 300_000));
    assert!(st.error.is_none());
}

#[tokio::test]
async fn server_half_close_still_receives_client_bytes() {
    let (got_tx, got_rx) = oneshot::channel::<Vec<u8>>();
    let got_tx = Arc::new(Mutex::new(Some(got_tx)));
    let app: App = Arc::new(move |_, s| {
        let got_tx = got_tx.clone();
        Box::pin(async move {
            let (mut r, mut w) = tokio::io::split(s);
            w.write_all(b"banner").await.unwrap();
            // Half-close first; keep reading what the client still sends.
            w.shutdown().await.unwrap();
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await.unwrap();
            if let Some(tx) = got_tx.lock().unwrap().take() {
                let _ = tx.send(rest);
            }
        })
    });
    let mut h = harness(ServerConfig::default(), app).await;
    let mut s = connect_stream(&mut h.send, addr("10.0.0.9:25")).await.unwrap();
    let mut banner = Vec::new();
    timeout(LIMIT, s.read_to_end(&mut banner)).await.unwrap().unwrap();
    assert_eq!(banner, b"banner");
    s.write_all(b"late data after server EOF").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(timeout(LIMIT, got_rx).await.unwrap().unwrap(), b"late data after server EOF");
    let st = next_stats(&mut h).await;
    assert_eq!((st.bytes_to_upstream, st.bytes_from_upstream), (26, 6));
    assert!(st.error.is_none());
}

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(|i| (i % 251) as u8).collect()
}

/// Writes `total` pattern bytes and half-closes, while reading the echo and checking it.
async fn pump_and_verify(s: HboneStream, total: u64) {
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        let chunk = 256 * 1024;
        let mut off = 0u64;
        while off < total {
            let n = chunk.min((total - off) as usize);
            w.write_all(&pattern(off, n)).await.unwrap();
            off += n as u64;
        }
        w.shutdown().await.unwrap();
    });
    let mut buf = vec![0u8; 128 * 1024];
    let mut off = 0u64;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        assert_eq!(buf[..n], pattern(off, n)[..], "mismatch at offset {off}");
        off += n as u64;
    }
    assert_eq!(off, total);
    writer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_transfer_over_tcp_is_exact_both_ways() {
    const TOTAL: u64 = 64 * 1024 * 1024;
    let (c, s) = tcp_pair().await;
    let mut h = harness_over(c, s, ServerConfig::default(), echo_app()).await;
    let stream = connect_stream(&mut h.send, addr("10.1.1.1:5001")).await.unwrap();
    let started = std::time::Instant::now();
    timeout(Duration::from_secs(60), pump_and_verify(stream, TOTAL))
        .await
        .expect("64 MiB echo stalled");
    let st = next_stats(&mut h).await;
    assert_eq!((st.bytes_to_upstream, st.bytes_from_upstream), (TOTAL, TOTAL));
    assert!(st.error.is_none());
    eprintln!("64 MiB each way in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_streams_on_one_connection_all_complete() {
    // Small windows make the streams compete for flow-control credit.
    let mut cfg = ServerConfig::default();
    cfg.flow.stream_window = 64 * 1024;
    cfg.flow.connection_window = 256 * 1024;
    let mut h = harness(cfg, echo_app()).await;
    let mut tasks = Vec::new();
    for i in 0..20u16 {
        let mut send = h.send.clone();
        tasks.push(tokio::spawn(async move {
            let s = connect_stream(&mut send, addr(&format!("10.0.0.{}:{}", i + 1, 1000 + i)))
                .await
                .unwrap();
            pump_and_verify(s, 1024 * 1024 + u64::from(i) * 777).await;
        }));
    }
    for t in tasks {
        timeout(LIMIT, t).await.expect("stream stalled").unwrap();
    }
    for _ in 0..20 {
        assert!(next_stats(&mut h).await.error.is_none());
    }
    assert_eq!(h.calls.load(Ordering::SeqCst), 20);
}

#[tokio::test]
async fn refusals_reach_the_client_as_typed_errors() {
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    let handler = move |target: SocketAddr| {
        calls2.fetch_add(1, Ordering::SeqCst);
        async move {
            match target.port() {
                1 => Err(Refusal::forbidden("not a pod of this node")),
                2 => Err(Refusal::unavailable("connection refused")),
                _ => {
                    let (ours, theirs) = duplex(1024);
                    tokio::spawn(echo_app()(target, theirs));
                    Ok(Accepted::from(ours))
                }
            }
        }
    };
    let (c, s) = duplex(64 * 1024);
    tokio::spawn(async move { serve_connection(s, &ServerConfig::default(), handler).await });
    let (mut send, _d) = client_handshake(c, &ClientConfig::default()).await.unwrap();

    let e = connect_stream(&mut send, addr("10.0.0.1:1")).await.unwrap_err();
    assert!(
        matches!(e, HboneError::Refused { status, target } if status == StatusCode::FORBIDDEN && target == addr("10.0.0.1:1")),
        "{e:?}"
    );
    let e = connect_stream(&mut send, addr("10.0.0.1:2")).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    // The connection survives refusals.
    let mut s = connect_stream(&mut send, addr("10.0.0.1:3")).await.unwrap();
    s.write_all(b"x").await.unwrap();
    s.shutdown().await.unwrap();
    let mut v = Vec::new();
    s.read_to_end(&mut v).await.unwrap();
    assert_eq!(v, b"x");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

async fn raw_status(send: &mut SendRequest<Bytes>, method: Method, uri: &str) -> StatusCode {
    let req = Request::builder().method(method).uri(uri).body(()).unwrap();
    futures_util::future::poll_fn(|cx| send.poll_ready(cx)).await.unwrap();
    let (resp, _body) = send.send_request(req, false).unwrap();
    timeout(LIMIT, resp).await.unwrap().unwrap().status()
}

#[tokio::test]
async fn bad_requests_are_rejected_without_calling_the_handler() {
    let mut h = harness(ServerConfig::default(), echo_app()).await;
    let send = &mut h.send;
    assert_eq!(
        raw_status(send, Method::GET, "http://10.0.0.1:80/").await,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        raw_status(send, Method::POST, "http://10.0.0.1:80/x").await,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(raw_status(send, Method::CONNECT, "example.com:443").await, StatusCode::BAD_REQUEST);
    assert_eq!(raw_status(send, Method::CONNECT, "10.0.0.1").await, StatusCode::BAD_REQUEST);
    assert_eq!(raw_status(send, Method::CONNECT, "10.0.0.1:0").await, StatusCode::BAD_REQUEST);
    assert_eq!(raw_status(send, Method::CONNECT, "10.0.0.1:99999").await, StatusCode::BAD_REQUEST);
    // CONNECT without :authority never reaches the handler (h2 resets it as malformed, or 400).
    let req = Request::builder().method(Method::CONNECT).uri("/").body(()).unwrap();
    futures_util::future::poll_fn(|cx| h.send.poll_ready(cx)).await.unwrap();
    let (resp, _body) = h.send.send_request(req, false).unwrap();
    match timeout(LIMIT, resp).await.unwrap() {
        Ok(r) => assert_eq!(r.status(), StatusCode::BAD_REQUEST),
        Err(e) => assert_eq!(e.reason(), Some(h2::Reason::PROTOCOL_ERROR), "{e:?}"),
    }
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
    // And a proper one on the same connection still works.
    let s = connect_stream(&mut h.send, addr("10.0.0.1:80")).await.unwrap();
    drop(s);
    assert_eq!(h.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn client_reset_ends_an_idle_tunnel() {
    let (eof_tx, eof_rx) = oneshot::channel::<usize>();
    let eof_tx = Arc::new(Mutex::new(Some(eof_tx)));
    // The app never writes: only the reset can end the tunnel.
    let app: App = Arc::new(move |_, mut s| {
        let eof_tx = eof_tx.clone();
        Box::pin(async move {
            let mut buf = [0u8; 16];
            let n = s.read(&mut buf).await.unwrap_or(0);
            if let Some(tx) = eof_tx.lock().unwrap().take() {
                let _ = tx.send(n);
            }
        })
    });
    let mut h = harness(ServerConfig::default(), app).await;
    let s = connect_stream(&mut h.send, addr("10.0.0.7:7")).await.unwrap();
    // Make sure the server relays before the reset.
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(s);
    let st = next_stats(&mut h).await;
    assert!(st.error.is_some(), "a reset must be reported as an abort");
    // The upstream was closed, not left hanging.
    assert_eq!(timeout(LIMIT, eof_rx).await.unwrap().unwrap(), 0);
}

struct DropFlag(Option<oneshot::Sender<()>>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

#[tokio::test]
async fn abandoned_connect_cancels_the_handler() {
    let (dropped_tx, dropped_rx) = oneshot::channel();
    let dropped_tx = Arc::new(Mutex::new(Some(dropped_tx)));
    let handler = move |_t: SocketAddr| {
        let flag = DropFlag(dropped_tx.lock().unwrap().take());
        async move {
            let _flag = flag;
            // A dial that never completes.
            std::future::pending::<Result<Accepted<DuplexStream>, Refusal>>().await
        }
    };
    let (c, s) = duplex(64 * 1024);
    tokio::spawn(async move { serve_connection(s, &ServerConfig::default(), handler).await });
    let (mut send, _d) = client_handshake(c, &ClientConfig::default()).await.unwrap();
    let r =
        timeout(Duration::from_millis(100), connect_stream(&mut send, addr("10.0.0.1:80"))).await;
    assert!(r.is_err(), "the handler never answers");
    timeout(LIMIT, dropped_rx)
        .await
        .expect("handler future not dropped after the client gave up")
        .unwrap();
}

#[tokio::test]
async fn silent_peer_hits_the_handshake_timeout() {
    let cfg =
        ServerConfig { handshake_timeout: Duration::from_millis(100), ..ServerConfig::default() };
    let handler =
        |_t: SocketAddr| async { Err::<Accepted<DuplexStream>, _>(Refusal::forbidden("x")) };
    // No preface at all.
    let (_c, s) = duplex(1024);
    let r = timeout(LIMIT, serve_connection(s, &cfg, handler)).await.unwrap();
    assert!(matches!(r, Err(HboneError::HandshakeTimeout(_))), "{r:?}");
    // A valid HTTP/2 handshake but no request.
    let (c, s) = duplex(64 * 1024);
    let server = tokio::spawn(async move { serve_connection(s, &cfg, handler).await });
    let (_send, _d) = client_handshake(c, &ClientConfig::default()).await.unwrap();
    let r = timeout(LIMIT, server).await.unwrap().unwrap();
    assert!(matches!(r, Err(HboneError::HandshakeTimeout(_))), "{r:?}");
}

#[tokio::test]
async fn a_connection_without_streams_is_closed_when_idle_but_not_one_with_a_quiet_stream() {
    let idle = Duration::from_millis(300);
    let cfg = ServerConfig { idle_timeout: idle, ..ServerConfig::default() };
    let calls = Arc::new(AtomicUsize::new(0));
    let (tx, _stats) = mpsc::unbounded_channel();
    let handler = accepting(echo_app(), calls, tx);
    let (c, s) = duplex(64 * 1024);
    let server = tokio::spawn(async move { serve_connection(s, &cfg, handler).await });
    let (mut send, _d) = client_handshake(c, &ClientConfig::default()).await.unwrap();
    // One stream open and silent for several idle timeouts: the connection stays.
    let mut s = connect_stream(&mut send, addr("10.0.0.1:80")).await.unwrap();
    tokio::time::sleep(idle * 4).await;
    assert!(!server.is_finished(), "a connection with an open stream was closed as idle");
    s.write_all(b"late").await.unwrap();
    s.shutdown().await.unwrap();
    let mut v = Vec::new();
    timeout(LIMIT, s.read_to_end(&mut v)).await.unwrap().unwrap();
    assert_eq!(v, b"late");
    drop(s);
    // Without streams, it is closed once the idle timeout has passed.
    let r = timeout(LIMIT, server).await.expect("idle connection not closed").unwrap();
    assert!(r.is_ok(), "{r:?}");
}

#[tokio::test]
async fn graceful_shutdown_lets_open_tunnels_finish() {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let calls = Arc::new(AtomicUsize::new(0));
    let (tx, mut stats) = mpsc::unbounded_channel();
    let handler = accepting(echo_app(), calls.clone(), tx);
    let (c, s) = duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let stop = async {
            let _ = stop_rx.await;
        };
        serve_connection_with_shutdown(s, &ServerConfig::default(), handler, stop, ignore_refusal())
            .await
    });
    let (mut send, _d) = client_handshake(c, &ClientConfig::default()).await.unwrap();
    let mut s = connect_stream(&mut send, addr("10.0.0.1:80")).await.unwrap();
    stop_tx.send(()).unwrap();
    // Once the GOAWAY is in, new tunnels are refused; the open one still works.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while connect_stream(&mut send, addr("10.0.0.1:81")).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "GOAWAY never took effect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.write_all(b"still here").await.unwrap();
    s.shutdown().await.unwrap();
    let mut v = Vec::new();
    timeout(LIMIT, s.read_to_end(&mut v)).await.unwrap().unwrap();
    assert_eq!(v, b"still here");
    drop(s);
    // Skip the tunnels the GOAWAY probe opened and dropped.
    loop {
        let st = timeout(LIMIT, stats.recv()).await.unwrap().unwrap();
        if st.target == addr("10.0.0.1:80") {
            assert!(st.error.is_none(), "{:?}", st.error);
            break;
        }
    }
    timeout(LIMIT, server).await.unwrap().unwrap().unwrap();
    assert!(calls.load(Ordering::SeqCst) >= 1);
}

// ---- limits -------------------------------------------------------------------------------

#[tokio::test]
async fn streams_beyond_max_concurrent_wait_for_a_free_slot() {
    let cfg = ServerConfig { max_concurrent_streams: 4, ..ServerConfig::default() };
    let mut h = harness(cfg, echo_app()).await;
    let mut open = Vec::new();
    for i in 0..4 {
        open.push(
            connect_stream(&mut h.send, addr(&format!("10.0.0.1:{}", 100 + i))).await.unwrap(),
        );
    }
    let mut send = h.send.clone();
    let mut fifth =
        tokio::spawn(async move { connect_stream(&mut send, addr("10.0.0.1:200")).await });
    assert!(timeout(Duration::from_millis(300), &mut fifth).await.is_err(), "5th stream must wait");
    assert_eq!(h.calls.load(Ordering::SeqCst), 4);
    let mut first = open.remove(0);
    first.shutdown().await.unwrap();
    let mut v = Vec::new();
    first.read_to_end(&mut v).await.unwrap();
    drop(first);
    let s = timeout(LIMIT, fifth).await.expect("5th stream never got a slot").unwrap();
    assert!(s.is_ok());
    assert_eq!(h.calls.load(Ordering::SeqCst), 5);
}

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HEADERS for `CONNECT authority`, HPACK literals without indexing.
fn connect_headers(stream: u32, authority: &str) -> Vec<u8> {
    let mut block = vec![0x02, 7];
    block.extend_from_slice(b"CONNECT");
    block.extend_from_slice(&[0x01, authority.len() as u8]);
    block.extend_from_slice(authority.as_bytes());
    frame(0x1, 0x4, stream, &block)
}

/// Reads frames from the server until `want` RST_STREAMs arrived; returns their error codes.
async fn read_resets<R: AsyncRead + Unpin>(r: &mut R, want: usize) -> Vec<u32> {
    let mut codes = Vec::new();
    while codes.len() < want {
        let mut head = [0u8; 9];
        r.read_exact(&mut head).await.unwrap();
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await.unwrap();
        if head[3] == 0x3 {
            codes.push(u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]));
        }
    }
    codes
}

#[tokio::test]
async fn hostile_client_ignoring_max_concurrent_streams_is_refused() {
    let cfg = ServerConfig { max_concurrent_streams: 4, ..ServerConfig::default() };
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    // Handlers that never answer keep every accepted stream open.
    let handler = move |_t: SocketAddr| {
        calls2.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<Result<Accepted<DuplexStream>, Refusal>>()
    };
    let (mut c, s) = duplex(1024 * 1024);
    tokio::spawn(async move { serve_connection(s, &cfg, handler).await });
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    for i in 0..20u32 {
        out.extend(connect_headers(2 * i + 1, "10.0.0.1:80"));
    }
    c.write_all(&out).await.unwrap();
    let codes = timeout(LIMIT, read_resets(&mut c, 16)).await.expect("no RST_STREAM");
    // REFUSED_STREAM = 0x7.
    assert!(codes.iter().all(|&c| c == 0x7), "{codes:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn oversized_headers_are_rejected() {
    let cfg = ServerConfig { max_header_list_size: 4096, ..ServerConfig::default() };
    let mut h = harness(cfg, echo_app()).await;
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("10.0.0.1:80")
        .header("x-padding", "a".repeat(8000))
        .body(())
        .unwrap();
    futures_util::future::poll_fn(|cx| h.send.poll_ready(cx)).await.unwrap();
    let (resp, _body) = h.send.send_request(req, false).unwrap();
    match timeout(LIMIT, resp).await.unwrap() {
        Ok(r) => {
            assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        }
        Err(e) => assert_eq!(e.reason(), Some(h2::Reason::REFUSED_STREAM), "{e:?}"),
    }
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
    // The connection is still usable.
    connect_stream(&mut h.send, addr("10.0.0.1:80")).await.unwrap();
}

// ---- pool ---------------------------------------------------------------------------------

type ServerTask = JoinHandle<Result<(), HboneError>>;

/// A peer that serves HBONE (echo) on every transport the pool asks for.
#[derive(Clone)]
struct Peer {
    cfg: ServerConfig,
    transports: Arc<AtomicUsize>,
    servers: Arc<Mutex<Vec<ServerTask>>>,
    delay: Duration,
}

impl Peer {
    fn new() -> Self {
        Self {
            cfg: ServerConfig::default(),
            transports: Arc::new(AtomicUsize::new(0)),
            servers: Arc::new(Mutex::new(Vec::new())),
            delay: Duration::ZERO,
        }
    }

    fn connect(
        &self,
    ) -> impl Fn() -> BoxFuture<'static, io::Result<DuplexStream>> + Send + 'static {
        let peer = self.clone();
        move || {
            let peer = peer.clone();
            Box::pin(async move {
                peer.transports.fetch_add(1, Ordering::SeqCst);
                // Widens the window in which concurrent callers could stampede.
                tokio::time::sleep(peer.delay).await;
                let (c, s) = duplex(256 * 1024);
                let (tx, _rx) = mpsc::unbounded_channel();
                let handler = accepting(echo_app(), Arc::new(AtomicUsize::new(0)), tx);
                let cfg = peer.cfg.clone();
                let task = tokio::spawn(async move { serve_connection(s, &cfg, handler).await });
                peer.servers.lock().unwrap().push(task);
                Ok(c)
            })
        }
    }
}

async fn ping_pong(mut s: HboneStream) {
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    let mut v = Vec::new();
    timeout(LIMIT, s.read_to_end(&mut v)).await.unwrap().unwrap();
    assert_eq!(v, b"ping");
}

fn quick_pool() -> PoolConfig {
    PoolConfig { keepalive_interval: None, ..PoolConfig::default() }
}

#[tokio::test]
async fn pool_sequential_streams_share_one_handshake() {
    let pool = Pool::new(quick_pool());
    let peer = Peer::new();
    let target = addr("10.0.3.3:8080");
    for _ in 0..100 {
        let s = pool.stream(("a", "b", target.ip()), target, peer.connect()).await.unwrap();
        ping_pong(s).await;
    }
    let st = pool.stats();
    assert_eq!(st.connections_created, 1);
    assert_eq!(st.streams_opened, 100);
    assert_eq!(st.live_connections, 1);
    assert_eq!(st.active_streams, 0);
    assert_eq!(peer.transports.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_concurrent_streams_share_one_handshake() {
    let pool = Pool::new(quick_pool());
    let mut peer = Peer::new();
    peer.delay = Duration::from_millis(50);
    let target = addr("10.0.3.3:8080");
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let pool = pool.clone();
        let connect = peer.connect();
        tasks.push(tokio::spawn(async move {
            let s = pool.stream("k", target, connect).await.unwrap();
            ping_pong(s).await;
        }));
    }
    for t in tasks {
        timeout(LIMIT, t).await.unwrap().unwrap();
    }
    let st = pool.stats();
    assert_eq!(st.connections_created, 1);
    assert_eq!(st.streams_opened, 50);
    assert_eq!(peer.transports.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn pool_opens_another_connection_at_the_stream_limit() {
    let pool = Pool::new(PoolConfig { max_streams_per_connection: 4, ..quick_pool() });
    let peer = Peer::new();
    let target = addr("10.0.3.3:8080");
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(pool.stream("k", target, peer.connect()).await.unwrap());
    }
    assert_eq!(pool.stats().connections_created, 3);
    assert_eq!(pool.stats().active_streams, 10);
    for s in held {
        ping_pong(s).await;
    }
    assert_eq!(pool.stats().active_streams, 0);
    // Freed slots are reused.
    ping_pong(pool.stream("k", target, peer.connect()).await.unwrap()).await;
    assert_eq!(pool.stats().connections_created, 3);
}

#[tokio::test]
async fn pool_respects_the_servers_stream_limit() {
    let pool = Pool::new(quick_pool());
    let mut peer = Peer::new();
    peer.cfg.max_concurrent_streams = 2;
    let target = addr("10.0.3.3:8080");
    let first = pool.stream("k", target, peer.connect()).await.unwrap();
    // By now the server's SETTINGS (2 streams) have arrived.
    let second = pool.stream("k", target, peer.connect()).await.unwrap();
    let third = timeout(LIMIT, pool.stream("k", target, peer.connect())).await.unwrap().unwrap();
    assert_eq!(pool.stats().connections_created, 2);
    for s in [first, second, third] {
        ping_pong(s).await;
    }
}

#[tokio::test]
async fn pool_replaces_a_broken_connection() {
    let pool = Pool::new(quick_pool());
    let peer = Peer::new();
    let target = addr("10.0.3.3:8080");
    ping_pong(pool.stream("k", target, peer.connect()).await.unwrap()).await;
    // The peer dies: its side of the transport goes away.
    for t in peer.servers.lock().unwrap().iter() {
        t.abort();
    }
    // Right away (maybe before the driver noticed) and again later.
    ping_pong(pool.stream("k", target, peer.connect()).await.unwrap()).await;
    ping_pong(pool.stream("k", target, peer.connect()).await.unwrap()).await;
    let st = pool.stats();
    assert_eq!(st.connections_created, 2);
    assert_eq!(st.live_connections, 1);
}

#[tokio::test]
async fn pool_keys_get_their_own_connections() {
    let pool = Pool::new(quick_pool());
    let peer = Peer::new();
    let target = addr("10.0.3.3:8080");
    ping_pong(pool.stream("a", target, peer.connect()).await.unwrap()).await;
    ping_pong(pool.stream("b", target, peer.connect()).await.unwrap()).await;
    ping_pong(pool.stream("a", target, peer.connect()).await.unwrap()).await;
    let st = pool.stats();
    assert_eq!(st.connections_created, 2);
    assert_eq!(st.live_connections, 2);
}

#[tokio::test]
async fn pool_closes_idle_connections_gracefully() {
    let pool = Pool::new(PoolConfig { idle_timeout: Duration::from_millis(200), ..quick_pool() });
    let peer = Peer::new();
    let target = addr("10.0.3.3:8080");
    let s = pool.stream("k", target, peer.connect()).await.unwrap();
    // A tunnel held open longer than the idle timeout keeps the connection.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(pool.stats().live_connections, 1);
    ping_pong(s).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while pool.stats().live_connections != 0 {
        assert!(tokio::time::Instant::now() < deadline, "idle connection never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The server saw a clean close (GOAWAY), not an error.
    let server = peer.servers.lock().unwrap().pop().unwrap();
    timeout(LIMIT, server).await.unwrap().unwrap().unwrap();
    ping_pong(pool.stream("k", target, peer.connect()).await.unwrap()).await;
    assert_eq!(pool.stats().connections_created, 2);
}

/// `peer.connect()` whose server presents a certificate valid until `server_not_after`.
fn presenting(
    peer: &Peer,
    server_not_after: Option<SystemTime>,
) -> impl Fn() -> BoxFuture<'static, io::Result<(DuplexStream, TransportInfo)>> {
    let connect = peer.connect();
    move || {
        let transport = connect();
        let info = TransportInfo { server_not_after, label: None };
        Box::pin(async move { transport.await.map(|io| (io, info)) })
    }
}

fn credential(serial: &str, valid_for: Duration) -> Option<Credential> {
    Some(Credential { serial: serial.into(), not_after: SystemTime::now() + valid_for })
}

#[tokio::test]
async fn pool_retires_a_connection_once_the_client_certificate_is_renewed() {
    let pool = Pool::new(quick_pool());
    let peer = Peer::new();
    let target = addr("10.0.3.3:8080");
    let connect = presenting(&peer, None);
    let old = credential("01", Duration::from_secs(3600));
    let held = pool.stream_as("k", old.clone(), target, &connect).await.unwrap();
    ping_pong(pool.stream_as("k", old.clone(), target, &connect).await.unwrap()).await;
    assert_eq!(pool.stats().connections_created, 1, "same certificate, same connection");

    // Renewed: a newer certificate gets a fresh handshake, and the old connection no more
    // streams from anyone.
    let new = credential("02", Duration::from_secs(7200));
    ping_pong(pool.stream_as("k", new.clone(), target, &connect).await.unwrap()).await;
    ping_pong(pool.stream_as("k", new.clone(), target, &connect).await.unwrap()).await;
    let st = pool.stats();
    assert_eq!((st.connections_created, st.connections_retired), (2, 1));
    assert_eq!(st.live_connections, 1);

    // The tunnel opened before the renewal still works, and once it ends the retired
    // connection closes cleanly (GOAWAY, no error).
    ping_pong(held).await;
    let first_server = peer.servers.lock().unwrap().remove(0);
    timeout(LIMIT, first_server).await.unwrap().unwrap().unwrap();

    // A caller still holding the old certificate (it read it just before the renewal) never
    // rides the connection of the new one, nor retires it.
    ping_pong(pool.stream_as("k", old, target, &connect).await.unwrap()).await;
    assert_eq!(pool.stats().connections_created, 3);
    ping_pong(pool.stream_as("k", new, target, &connect).await.unwrap()).await;
    let st = pool.stats();
    assert_eq!((st.connections_created, st.connections_retired), (3, 2));
}

#[tokio::test]
async fn pool_stops_using_a_connection_once_either_certificate_expires() {
    let target = addr("10.0.3.3:8080");
    let soon = Duration::from_millis(300);
    let later = Duration::from_secs(3600);
    // (client certificate lifetime, server certificate lifetime): one of them ends soon.
    for (client, server) in [(soon, later), (later, soon)] {
        let pool = Pool::new(quick_pool());
        let peer = Peer::new();
        let connect = presenting(&peer, Some(SystemTime::now() + server));
        let cred = credential("01", client);
        let held = pool.stream_as("k", cred.clone(), target, &connect).await.unwrap();
        ping_pong(pool.stream_as("k", cred.clone(), target, &connect).await.unwrap()).await;
        assert_eq!(pool.stats().connections_created, 1);
        tokio::time::sleep(soon + Duration::from_millis(100)).await;
        // The caller's certificate is the same, but a certificate of the handshake expired.
        let next = presenting(&peer, Some(SystemTime::now() + later));
        ping_pong(pool.stream_as("k", cred, target, &next).await.unwrap()).await;
        let st = pool.stats();
        assert_eq!(
            (st.connections_created, st.connections_retired),
            (2, 1),
            "{client:?} {server:?}"
        );
        // Expiry stops new streams; the one already open drains undisturbed.
        ping_pong(held).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_shares_a_failed_connect_without_caching_it() {
    let pool: Pool<&str> = Pool::new(quick_pool());
    let attempts = Arc::new(AtomicUsize::new(0));
    let failing = |attempts: Arc<AtomicUsize>| {
        move || {
            let attempts = attempts.clone();
            async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err::<DuplexStream, _>(io::Error::new(io::ErrorKind::ConnectionRefused, "refused"))
            }
        }
    };
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let pool = pool.clone();
        let connect = failing(attempts.clone());
        tasks.push(tokio::spawn(
            async move { pool.stream("k", addr("10.0.0.1:80"), connect).await },
        ));
    }
    for t in tasks {
        let r = timeout(LIMIT, t).await.unwrap().unwrap();
        assert!(matches!(r, Err(HboneError::Connect(ConnectError::Transport(_)))), "{r:?}");
    }
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert_eq!(pool.stats().connect_failures, 1);
    // The next caller tries again.
    assert!(pool.stream("k", addr("10.0.0.1:80"), failing(attempts.clone())).await.is_err());
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(pool.stats().live_connections, 0);
}

#[tokio::test]
async fn pool_survives_a_cancelled_leader() {
    let pool: Pool<&str> = Pool::new(quick_pool());
    let peer = Peer::new();
    let target = addr("10.0.3.3:8080");
    // The first caller gives up while its connect is still pending.
    let stuck = || std::future::pending::<io::Result<DuplexStream>>();
    let r = timeout(Duration::from_millis(50), pool.stream("k", target, stuck)).await;
    assert!(r.is_err());
    ping_pong(timeout(LIMIT, pool.stream("k", target, peer.connect())).await.unwrap().unwrap())
        .await;
    assert_eq!(pool.stats().connections_created, 1);
}

#[tokio::test]
async fn pool_refusal_is_typed_and_keeps_the_connection() {
    let pool = Pool::new(quick_pool());
    let calls = Arc::new(AtomicUsize::new(0));
    let connect = || async {
        let (c, s) = duplex(64 * 1024);
        tokio::spawn(async move {
            let handler = |_t: SocketAddr| async {
                Err::<Accepted<DuplexStream>, _>(Refusal::forbidden("not a pod of this node"))
            };
            serve_connection(s, &ServerConfig::default(), handler).await
        });
        Ok::<_, io::Error>(c)
    };
    for _ in 0..3 {
        calls.fetch_add(1, Ordering::SeqCst);
        let e = pool.stream("k", addr("10.0.0.1:80"), connect).await.unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::FORBIDDEN));
    }
    let st = pool.stats();
    assert_eq!((st.connections_created, st.streams_opened, st.live_connections), (1, 0, 1));
}

#[tokio::test]
async fn pool_keepalive_drops_a_silent_peer() {
    let pool = Pool::new(PoolConfig {
        keepalive_interval: Some(Duration::from_millis(100)),
        keepalive_timeout: Duration::from_millis(100),
        ..PoolConfig::default()
    });
    // A peer that accepted the transport and then went silent (e.g. its node rebooted).
    let hole = Arc::new(Mutex::new(None));
    let hole2 = hole.clone();
    let connect = move || {
        let hole2 = hole2.clone();
        async move {
            let (c, s) = duplex(1024 * 1024);
            *hole2.lock().unwrap() = Some(s);
            Ok::<_, io::Error>(c)
        }
    };
    let started = std::time::Instant::now();
    let r = timeout(LIMIT, pool.stream("k", addr("10.0.0.1:80"), connect)).await.unwrap();
    assert!(r.is_err());
    assert!(started.elapsed() < Duration::from_secs(5), "waited for the open timeout instead");
    let deadline = tokio::time::Instant::now() + LIMIT;
    while pool.stats().live_connections != 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn pool_moves_off_a_connection_the_server_is_draining() {
    let pool = Pool::new(quick_pool());
    let stops: Arc<Mutex<Vec<oneshot::Sender<()>>>> = Arc::default();
    let created = Arc::new(AtomicUsize::new(0));
    let connect = {
        let stops = stops.clone();
        let created = created.clone();
        move || {
            let (stops, created) = (stops.clone(), created.clone());
            async move {
                created.fetch_add(1, Ordering::SeqCst);
                let (c, s) = duplex(64 * 1024);
                let (stop_tx, stop_rx) = oneshot::channel::<()>();
                stops.lock().unwrap().push(stop_tx);
                let (tx, _rx) = mpsc::unbounded_channel();
                let handler = accepting(echo_app(), Arc::new(AtomicUsize::new(0)), tx);
                tokio::spawn(async move {
                    let stop = async {
                        let _ = stop_rx.await;
                    };
                    serve_connection_with_shutdown(
                        s,
                        &ServerConfig::default(),
                        handler,
                        stop,
                        ignore_refusal(),
                    )
                    .await
                });
                Ok::<_, io::Error>(c)
            }
        }
    };
    let target = addr("10.0.3.3:8080");
    let held = pool.stream("k", target, connect.clone()).await.unwrap();
    // The peer starts draining (e.g. its agent restarts): GOAWAY.
    for stop in stops.lock().unwrap().drain(..) {
        let _ = stop.send(());
    }
    // Until the GOAWAY arrives the old connection may still be used; then a new one must be.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while pool.stats().connections_created < 2 {
        assert!(tokio::time::Instant::now() < deadline, "pool kept the draining connection");
        ping_pong(pool.stream("k", target, connect.clone()).await.unwrap()).await;
    }
    // The tunnel opened before the GOAWAY is unaffected.
    ping_pong(held).await;
    assert_eq!(created.load(Ordering::SeqCst), 2);
    assert_eq!(pool.stats().connections_created, 2);
}

/// A handover on the peer: the pool's brand-new connection lands on the old instance, which
/// answers with GOAWAY before serving anything. The tunnel must go to a new connection (the
/// new instance), not fail: nothing was sent on it.
#[tokio::test]
async fn a_fresh_connection_that_is_already_going_away_is_retried_once() {
    let pool = Pool::new(quick_pool());
    let created = Arc::new(AtomicUsize::new(0));
    let peer = Peer::new();
    let connect = {
        let (created, peer) = (created.clone(), peer.clone());
        move || {
            let (created, real) = (created.clone(), peer.connect());
            Box::pin(async move {
                if created.fetch_add(1, Ordering::SeqCst) > 0 {
                    return real().await;
                }
                // The old instance: SETTINGS, then GOAWAY(last stream 0): no stream served.
                let (c, mut s) = duplex(64 * 1024);
                tokio::spawn(async move {
                    let mut preface = [0u8; 24];
                    s.read_exact(&mut preface).await?;
                    s.write_all(&frame(0x4, 0, 0, &[])).await?;
                    s.write_all(&frame(0x7, 0, 0, &[0u8; 8])).await?;
                    let mut sink = Vec::new();
                    s.read_to_end(&mut sink).await
                });
                Ok(c)
            }) as BoxFuture<'static, io::Result<DuplexStream>>
        }
    };
    let s = timeout(LIMIT, pool.stream("k", addr("10.0.3.3:8080"), connect)).await.unwrap();
    ping_pong(s.expect("the tunnel should be retried on a second connection")).await;
    assert_eq!(created.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn dropping_the_pool_closes_its_connections_after_their_tunnels() {
    let pool = Pool::new(quick_pool());
    let peer = Peer::new();
    let target = addr("10.0.3.3:8080");
    let held = pool.stream("k", target, peer.connect()).await.unwrap();
    drop(pool);
    // The open tunnel keeps working, then the connection closes cleanly.
    ping_pong(held).await;
    let server = peer.servers.lock().unwrap().pop().unwrap();
    timeout(LIMIT, server).await.unwrap().unwrap().unwrap();
}

/// The agent's outbound side: an application socket relayed into a tunnel.
#[tokio::test]
async fn relay_and_copy_bidirectional_carry_half_closes_from_the_app_side() {
    let mut h = harness(ServerConfig::default(), echo_app()).await;
    for use_relay in [true, false] {
        let (mut app, mut agent_side) = tcp_pair().await;
        let mut tunnel = connect_stream(&mut h.send, addr("10.0.0.1:80")).await.unwrap();
        let relayer = tokio::spawn(async move {
            if use_relay {
                let r = relay(&mut tunnel, &mut agent_side, 16 * 1024).await;
                assert!(r.error.is_none(), "{:?}", r.error);
                (r.to_tunnel, r.from_tunnel)
            } else {
                tokio::io::copy_bidirectional(&mut agent_side, &mut tunnel).await.unwrap()
            }
        });
        app.write_all(&pattern(0, 100_000)).await.unwrap();
        app.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        timeout(LIMIT, app.read_to_end(&mut echoed)).await.unwrap().unwrap();
        assert_eq!(echoed, pattern(0, 100_000));
        let counts = timeout(LIMIT, relayer).await.unwrap().unwrap();
        assert_eq!(counts, (100_000, 100_000));
        assert!(next_stats(&mut h).await.error.is_none());
    }
}

#[tokio::test]
async fn a_slow_upstream_pushes_back_instead_of_buffering() {
    let mut cfg = ServerConfig::default();
    cfg.flow.stream_window = 64 * 1024;
    let (hold_tx, hold_rx) = mpsc::unbounded_channel::<DuplexStream>();
    // The upstream never reads; its end is kept alive so nothing errors.
    let app: App = Arc::new(move |_, s| {
        let _ = hold_tx.send(s);
        Box::pin(async {})
    });
    let mut h = harness(cfg, app).await;
    let mut s = connect_stream(&mut h.send, addr("10.0.0.1:80")).await.unwrap();
    let chunk = vec![1u8; 16 * 1024];
    let mut written = 0usize;
    while let Ok(n) = timeout(Duration::from_millis(300), s.write(&chunk)).await {
        written += n.unwrap();
        assert!(written < 10 * 1024 * 1024, "writes never blocked");
    }
    // Stream window + the upstream pipe's 64 KiB + one relay buffer, nothing more.
    assert!(written <= 64 * 1024 + 64 * 1024 + 32 * 1024, "{written} bytes accepted");
    drop(hold_rx);
}
