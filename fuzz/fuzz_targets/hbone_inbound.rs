//! The inbound HBONE server (`tunnel::hbone::serve_connection`, what runs behind TLS on
//! `podIP:15008`) fed the fuzzer's bytes as the client side of a raw HTTP/2 connection.
//!
//! The entry point is the one the agent uses, `serve_connection_with_shutdown` with a refusal
//! callback; inputs of odd length also get a graceful shutdown (GOAWAY) part-way. The transport
//! is an in-memory duplex; the handler refuses or accepts by the target port's last digit,
//! accepting with an in-memory echo upstream, so that refusals, accepted tunnels, relays and
//! handlers cancelled mid-way are all reachable. Time is paused (tokio test-util): the server's
//! timeouts elapse as soon as nothing else can run, so each input takes bounded time.
//!
//! Findings: a panic anywhere (the server, a tunnel task), a refusal reported without an
//! `hbone:` metrics label, or a connection that is still being served a minute (virtual) after
//! the client closed its side.

#![no_main]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use mtls_agent::tunnel::hbone::{
    serve_connection_with_shutdown, Accepted, OnRefusal, Refusal, ServerConfig,
};
use tokio::io::{AsyncWriteExt, DuplexStream};

/// What the client side of the duplex may have in flight before a write waits.
const TRANSPORT_BUFFER: usize = 64 * 1024;
/// Long enough for every frame of the input to be processed and answered.
const SETTLE: Duration = Duration::from_millis(100);
/// A connection whose client is gone must be over well within this (virtual time).
const DONE_WITHIN: Duration = Duration::from_secs(60);

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("tokio runtime");
    rt.block_on(serve_one(data));
    // Dropping the runtime cancels what is left (echo tasks of tunnels that never ended).
});

/// The handler: the last digit of the target port says what it does.
async fn handle(target: SocketAddr) -> Result<Accepted<DuplexStream>, Refusal> {
    match target.port() % 10 {
        1 => Err(Refusal::forbidden(format!("{target} is not this pod"))),
        3 => Err(Refusal::unavailable(format!("connecting to {target}: refused"))),
        5 => {
            // Slow dial: the client may reset the stream or close the connection meanwhile.
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok(echo_upstream())
        }
        7 => {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Err(Refusal::new(StatusCode::GATEWAY_TIMEOUT, "slow refusal"))
        }
        _ => Ok(echo_upstream()),
    }
}

/// An upstream that echoes what it receives and half-closes after the tunnel does.
fn echo_upstream() -> Accepted<DuplexStream> {
    let (ours, theirs) = tokio::io::duplex(16 * 1024);
    tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(theirs);
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    });
    Accepted::new(ours).on_close(|stats| {
        // The callback runs on the tunnel's task; it must see consistent numbers.
        let _ = (stats.bytes_to_upstream, stats.bytes_from_upstream, stats.error);
    })
}

async fn serve_one(data: &[u8]) {
    let (client, server) = tokio::io::duplex(TRANSPORT_BUFFER);
    // The agent's own limits.
    let cfg = ServerConfig::default();
    // Refusals feed metrics labels: each must be a short `hbone:` reason.
    let on_refusal: OnRefusal = Arc::new(|reason: &'static str, _detail: String| {
        assert!(
            reason.len() > "hbone:".len() && reason.starts_with("hbone:"),
            "refusal reported with reason {reason:?}"
        );
    });
    // The agent shuts connections down gracefully when it hands over to a new instance.
    let shut_down = data.len() % 2 == 1;
    let shutdown = async move {
        if shut_down {
            tokio::time::sleep(SETTLE / 2).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let served = tokio::spawn(async move {
        serve_connection_with_shutdown(server, &cfg, handle, shutdown, on_refusal).await
    });

    let (mut from_server, mut to_server) = tokio::io::split(client);
    // Read everything the server sends, so it never waits on a full transport.
    let drain = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_server, &mut tokio::io::sink()).await;
    });
    // A server that stopped reading fails the write; that is its right.
    let _ = tokio::time::timeout(DONE_WITHIN, to_server.write_all(data)).await;
    let _ = to_server.flush().await;
    tokio::time::sleep(SETTLE).await;
    // The client goes away: the connection and every tunnel on it must end.
    let _ = to_server.shutdown().await;
    match tokio::time::timeout(DONE_WITHIN, served).await {
        Ok(Ok(_served)) => {}
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Ok(Err(e)) => panic!("serve_connection task failed: {e}"),
        Err(_) => panic!("serve_connection still running {DONE_WITHIN:?} after the client closed"),
    }
    drain.abort();
}
