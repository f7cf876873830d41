//! Server side: accepts `CONNECT` streams on one HBONE connection and relays each to the upstream
//! the caller's handler dialled.

use std::{
    borrow::Cow,
    fmt,
    future::Future,
    io,
    net::SocketAddr,
    sync::Arc,
    task::Poll,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::future::poll_fn;
use h2::{server::SendResponse, RecvStream};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    task::JoinSet,
};
use tracing::{debug, warn};

use super::{
    stream::{relay_counted, HboneStream, LiveBytes},
    FlowControl, HboneError,
};

/// Settings of the server side of HBONE connections. The limits bound what one hostile peer can
/// make us hold: streams, header bytes, reset churn and unread data (the connection window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub flow: FlowControl,
    /// Open streams per connection; the peer is told so and further streams are refused.
    pub max_concurrent_streams: u32,
    /// Largest request header list; larger requests get 431.
    pub max_header_list_size: u32,
    /// Streams reset by the peer before we accepted them (rapid-reset attack bound).
    pub max_pending_accept_reset_streams: usize,
    /// Streams we had to reset for the peer's protocol errors before we close the connection.
    pub max_local_error_reset_streams: usize,
    /// Bound on the HTTP/2 handshake plus the first request, so an idle or stalled peer does not
    /// keep a connection open.
    pub handshake_timeout: Duration,
    /// Buffer per tunnel for the upstream -> tunnel direction.
    pub relay_buffer_size: usize,
    /// A connection with no open stream for this long is closed: an idle peer does not hold an
    /// fd and a TLS session for ever. Longer than the client pool's idle timeout (120 s), so our
    /// own clients retire their idle connections first and never race a close; a connection
    /// with an open stream is never idle, however long the stream is quiet.
    pub idle_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            flow: FlowControl::default(),
            max_concurrent_streams: 1000,
            max_header_list_size: 16 * 1024,
            max_pending_accept_reset_streams: 50,
            max_local_error_reset_streams: 1024,
            handshake_timeout: Duration::from_secs(10),
            relay_buffer_size: 32 * 1024,
            idle_timeout: Duration::from_secs(180),
        }
    }
}

/// A handler's "no": the HTTP status sent to the client, and a reason for our logs (HTTP/2 has
/// no reason phrase, and the peer learns nothing from it beyond the status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: Cow<'static, str>,
}

impl Refusal {
    pub fn new(status: StatusCode, reason: impl Into<Cow<'static, str>>) -> Self {
        Self { status, reason: reason.into() }
    }

    /// 403: policy says no (e.g. "not a pod of this node").
    pub fn forbidden(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::FORBIDDEN, reason)
    }

    /// 503: the destination could not be reached.
    pub fn unavailable(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, reason)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.status, self.reason)
    }
}

/// How a tunnel accepted by the handler ended.
#[derive(Debug)]
pub struct RelayStats {
    pub target: SocketAddr,
    /// Client -> upstream.
    pub bytes_to_upstream: u64,
    /// Upstream -> client.
    pub bytes_from_upstream: u64,
    pub duration: Duration,
    /// `None` when both directions were half-closed normally.
    pub error: Option<io::Error>,
}

type OnClose = Box<dyn FnOnce(RelayStats) + Send>;

/// A handler's "yes": the upstream the tunnel is relayed to, and optionally a callback that
/// receives the byte counts once the tunnel is over (it runs on the tunnel's task).
pub struct Accepted<U> {
    upstream: U,
    on_close: Option<OnClose>,
    live: Option<Arc<LiveBytes>>,
}

impl<U> Accepted<U> {
    pub fn new(upstream: U) -> Self {
        Self { upstream, on_close: None, live: None }
    }

    /// Counts the tunnel's bytes into `live` while it runs (`sent`: client -> upstream).
    pub fn counting(mut self, live: Arc<LiveBytes>) -> Self {
        self.live = Some(live);
        self
    }

    pub fn on_close(mut self, f: impl FnOnce(RelayStats) + Send + 'static) -> Self {
        self.on_close = Some(Box::new(f));
        self
    }
}

impl<U> From<U> for Accepted<U> {
    fn from(upstream: U) -> Self {
        Self::new(upstream)
    }
}

impl<U> fmt::Debug for Accepted<U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Accepted")
            .field("on_close", &self.on_close.is_some())
            .finish_non_exhaustive()
    }
}

pub(crate) fn server_builder(cfg: &ServerConfig) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(cfg.flow.stream_window())
        .initial_connection_window_size(cfg.flow.connection_window())
        .max_frame_size(cfg.flow.max_frame_size())
        .max_send_buffer_size(cfg.flow.max_send_buffer())
        .max_concurrent_streams(cfg.max_concurrent_streams)
        // h2 answers larger header lists with 431 on its own, unseen by us: let it accept up to
        // four times the limit (still bounded) so that `serve_stream` refuses, counts and logs.
        .max_header_list_size(cfg.max_header_list_size.saturating_mul(4))
        .max_pending_accept_reset_streams(cfg.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(Some(cfg.max_local_error_reset_streams));
    b
}

/// Serves one HBONE connection (already through TLS) until the peer closes it.
///
/// For each `CONNECT` the handler gets the target from `:authority` and answers with an upstream
/// ([`Accepted`]) or a [`Refusal`]; on accept the client gets 200 and the tunnel is relayed with
/// half-closes in both directions. Requests that are not `CONNECT` (405) or whose `:authority`
/// is not `ip:port` (400) are refused without calling the handler. Returns once the connection
/// and all its tunnels are over.
pub async fn serve_connection<S, H, F, U>(
    io: S,
    cfg: &ServerConfig,
    handler: H,
) -> Result<(), HboneError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Accepted<U>, Refusal>> + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_connection_with_shutdown(io, cfg, handler, std::future::pending(), ignore_refusal()).await
}

/// Told of every refusal the HBONE layer makes without the handler: a short reason label for
/// metrics (`hbone:...`) and the detail for the log.
pub type OnRefusal = Arc<dyn Fn(&'static str, String) + Send + Sync>;

/// An [`OnRefusal`] that does nothing.
pub fn ignore_refusal() -> OnRefusal {
    Arc::new(|_, _| {})
}

/// [`serve_connection`] that, once `shutdown` completes, sends GOAWAY: no new tunnels, the open
/// ones run to their end.
pub async fn serve_connection_with_shutdown<S, H, F, U, D>(
    io: S,
    cfg: &ServerConfig,
    handler: H,
    shutdown: D,
    on_refusal: OnRefusal,
) -> Result<(), HboneError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Accepted<U>, Refusal>> + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    D: Future<Output = ()>,
{
    // One deadline covers the preface, SETTINGS and the first request.
    let now = tokio::time::Instant::now();
    // A timeout too large to represent means "a very long time", not a panic.
    let deadline = now
        .checked_add(cfg.handshake_timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
    let mut conn = match tokio::time::timeout_at(deadline, server_builder(cfg).handshake(io)).await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            if !e.is_io() {
                on_refusal("hbone:handshake", format!("HTTP/2 handshake failed: {e}"));
            }
            return Err(HboneError::Handshake(e));
        }
        Err(_) => {
            on_refusal(
                "hbone:timeout",
                format!("no HTTP/2 request within {:?}", cfg.handshake_timeout),
            );
            return Err(HboneError::HandshakeTimeout(cfg.handshake_timeout));
        }
    };
    let handler = Arc::new(handler);
    let relay_buf = cfg.relay_buffer_size;
    let mut tunnels = JoinSet::new();
    let mut first_request_seen = false;
    let mut shutting_down = false;
    let mut idle_since = tokio::time::Instant::now();
    tokio::pin!(shutdown);

    let result = loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    first_request_seen = true;
                    tunnels.spawn(serve_stream(
                        req,
                        respond,
                        handler.clone(),
                        relay_buf,
                        cfg.max_header_list_size,
                        on_refusal.clone(),
                    ));
                }
                Some(Err(e)) => {
                    // A peer that disconnects is not refused; one we cut off (GOAWAY for a
                    // protocol error or a flood) is.
                    let ours = e.is_go_away() && !e.is_remote() && e.reason() != Some(h2::Reason::NO_ERROR);
                    if ours || (!e.is_io() && !e.is_go_away() && !e.is_remote()) {
                        on_refusal("hbone:protocol", format!("connection closed by the agent: {e}"));
                    }
                    break Err(HboneError::H2(e));
                }
                None => break Ok(()),
            },
            // Reap finished tunnels so the set stays as small as the open streams.
            Some(joined) = tunnels.join_next() => {
                if let Err(e) = joined {
                    warn!("HBONE tunnel task failed: {e}");
                }
                if tunnels.is_empty() {
                    idle_since = tokio::time::Instant::now();
                }
            }
            _ = tokio::time::sleep_until(idle_since.checked_add(cfg.idle_timeout).unwrap_or(deadline + Duration::from_secs(365 * 24 * 3600))), if first_request_seen && tunnels.is_empty() => {
                // No stream is open, so closing loses nothing.
                debug!("HBONE connection idle for {:?}: closed", cfg.idle_timeout);
                break Ok(());
            }
            _ = tokio::time::sleep_until(deadline), if !first_request_seen => {
                on_refusal("hbone:timeout", format!("no HTTP/2 request within {:?}", cfg.handshake_timeout));
                break Err(HboneError::HandshakeTimeout(cfg.handshake_timeout));
            }
            _ = &mut shutdown, if !shutting_down => {
                shutting_down = true;
                debug!("HBONE connection shutting down: GOAWAY sent");
                conn.graceful_shutdown();
            }
        }
    };
    // Without the connection the remaining tunnels see an error on their next poll and end.
    drop(conn);
    while let Some(joined) = tunnels.join_next().await {
        if let Err(e) = joined {
            warn!("HBONE tunnel task failed: {e}");
        }
    }
    result
}

async fn serve_stream<H, F, U>(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    handler: Arc<H>,
    relay_buf: usize,
    max_header_list_size: u32,
    on_refusal: OnRefusal,
) where
    H: Fn(SocketAddr) -> F,
    F: Future<Output = Result<Accepted<U>, Refusal>>,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let size = header_list_size(&req);
    let checked = if size > max_header_list_size as usize {
        Err(Refusal::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request headers of {size} bytes exceed {max_header_list_size}"),
        ))
    } else {
        connect_target(&req)
    };
    let target = match checked {
        Ok(target) => target,
        Err(refusal) => {
            let label = match refusal.status {
                StatusCode::METHOD_NOT_ALLOWED => "hbone:not_connect",
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "hbone:headers_too_large",
                _ => "hbone:bad_request",
            };
            on_refusal(label, format!("{} {}: {refusal}", req.method(), req.uri()));
            refuse(&mut respond, &refusal);
            return;
        }
    };
    let recv = req.into_body();

    let answer = handler(target);
    tokio::pin!(answer);
    // A client that gives up (RST_STREAM) or a connection that dies cancels the handler, so
    // nothing keeps dialling for a tunnel that is already gone.
    let decision = poll_fn(|cx| {
        if respond.poll_reset(cx).is_ready() {
            return Poll::Ready(None);
        }
        answer.as_mut().poll(cx).map(Some)
    })
    .await;
    let Accepted { mut upstream, on_close, live } = match decision {
        None => {
            debug!(%target, "CONNECT abandoned by the client before it was answered");
            return;
        }
        Some(Err(refusal)) => {
            debug!(%target, "CONNECT refused: {refusal}");
            refuse(&mut respond, &refusal);
            return;
        }
        Some(Ok(accepted)) => accepted,
    };

    let started = Instant::now();
    let mut ok = Response::new(());
    *ok.status_mut() = StatusCode::OK;
    let send = match respond.send_response(ok, false) {
        Ok(send) => send,
        Err(e) => {
            debug!(%target, "CONNECT: sending 200 failed: {e}");
            if let Some(cb) = on_close {
                cb(RelayStats {
                    target,
                    bytes_to_upstream: 0,
                    bytes_from_upstream: 0,
                    duration: started.elapsed(),
                    error: Some(super::stream::h2_to_io(e)),
                });
            }
            return;
        }
    };
    let mut tunnel = HboneStream::new(send, recv, target, None);
    let uncounted = LiveBytes::default();
    let c = live.as_deref().unwrap_or(&uncounted);
    let relayed = relay_counted(&mut tunnel, &mut upstream, relay_buf, &c.sent, &c.received).await;
    let stats = RelayStats {
        target,
        bytes_to_upstream: relayed.from_tunnel,
        bytes_from_upstream: relayed.to_tunnel,
        duration: started.elapsed(),
        error: relayed.error,
    };
    match &stats.error {
        None => debug!(
            %target,
            to_upstream = stats.bytes_to_upstream,
            from_upstream = stats.bytes_from_upstream,
            duration_ms = stats.duration.as_millis() as u64,
            "HBONE tunnel closed"
        ),
        Some(e) => debug!(
            %target,
            to_upstream = stats.bytes_to_upstream,
            from_upstream = stats.bytes_from_upstream,
            duration_ms = stats.duration.as_millis() as u64,
            "HBONE tunnel aborted: {e}"
        ),
    }
    if let Some(cb) = on_close {
        cb(stats);
    }
}

/// The tunnel target of a request: `CONNECT` with `:authority` = `ip:port`.
/// The header list size as HTTP/2 counts it (RFC 9113 6.5.2: name + value + 32 per field),
/// pseudo-headers included.
fn header_list_size(req: &Request<RecvStream>) -> usize {
    let pseudo = req.method().as_str().len() + req.uri().to_string().len() + 3 * 32;
    req.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum::<usize>() + pseudo
}

fn connect_target(req: &Request<RecvStream>) -> Result<SocketAddr, Refusal> {
    if req.method() != Method::CONNECT {
        return Err(Refusal::new(StatusCode::METHOD_NOT_ALLOWED, "only CONNECT is served"));
    }
    let Some(authority) = req.uri().authority() else {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "missing :authority"));
    };
    // Names are not resolved: the peer must say exactly which workload address it wants.
    let target: SocketAddr = authority
        .as_str()
        .parse()
        .map_err(|_| Refusal::new(StatusCode::BAD_REQUEST, ":authority is not ip:port"))?;
    if target.port() == 0 {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, ":authority has port 0"));
    }
    Ok(target)
}

fn refuse(respond: &mut SendResponse<Bytes>, refusal: &Refusal) {
    let mut res = Response::new(());
    *res.status_mut() = refusal.status;
    if refusal.status == StatusCode::METHOD_NOT_ALLOWED {
        res.headers_mut().insert(header::ALLOW, HeaderValue::from_static("CONNECT"));
    }
    // Fails only if the client already reset the stream: then nobody is listening.
    if let Err(e) = respond.send_response(res, true) {
        debug!("sending refusal {}: {e}", refusal.status);
    }
}
