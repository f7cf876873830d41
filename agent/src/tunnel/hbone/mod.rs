//! HBONE: TCP tunnelled through HTTP/2 `CONNECT`, the protocol Istio ambient's ztunnel speaks.
//!
//! One mutual-TLS (ALPN `h2`) connection to a peer's port 15008 carries many tunnels: each is an
//! HTTP/2 stream opened by a `CONNECT` request whose `:authority` is the destination
//! `podIP:port` (no `:scheme`, no `:path`). The server answers `200` once it has dialled the
//! destination, and from then on the stream's DATA frames carry the TCP bytes both ways;
//! `END_STREAM` is a half-close (`shutdown(Write)`), `RST_STREAM` an abort. Any other status is a
//! refusal (403 policy, 503 destination unreachable, ...).
//!
//! TLS is not done here: everything runs over any `AsyncRead + AsyncWrite` transport.
//! - [`serve_connection`]: the server side of one connection.
//! - [`client_handshake`] + [`connect_stream`]: the client side of one connection.
//! - [`Pool`]: client connections shared per caller-defined key, so a new application connection
//!   normally costs one `CONNECT` round trip and no handshake.
//! - [`HboneStream`]: one tunnel, `AsyncRead + AsyncWrite` (`shutdown` sends `END_STREAM`), and
//!   [`relay`] to pump it against a TCP socket with byte counts.

mod client;
mod pool;
mod server;
mod stream;
#[cfg(test)]
mod tests;

use std::{net::SocketAddr, sync::Arc, time::Duration};

pub use client::{client_builder, client_handshake, connect_stream};
pub use pool::{Credential, Pool, PoolConfig, PoolStats, TransportInfo};
pub use server::{
    ignore_refusal, serve_connection, serve_connection_with_shutdown, Accepted, OnRefusal, Refusal,
    RelayStats, ServerConfig,
};
pub use stream::{relay, relay_counted, HboneStream, LiveBytes, Relayed};

/// The HBONE tunnel port (ztunnel's inbound port).
pub const HBONE_PORT: u16 = 15008;

const MIB: u32 = 1024 * 1024;
/// HTTP/2 bounds: a frame size outside them makes h2 panic, a window above 2^31-1 is a
/// protocol error.
const MIN_FRAME_SIZE: u32 = 16 * 1024;
const MAX_FRAME_SIZE: u32 = (1 << 24) - 1;
const MAX_WINDOW: u32 = (1 << 31) - 1;

/// HTTP/2 flow-control and framing sizes, shared by client and server.
///
/// The defaults (ztunnel's) let one stream fill a fast link: HTTP/2's 64 KiB default window
/// would cap a stream at 64 KiB per round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowControl {
    /// Receive window per stream: how much a peer may send on one stream before we read it.
    pub stream_window: u32,
    /// Receive window for the whole connection; bounds unread data over all streams.
    pub connection_window: u32,
    /// Largest DATA frame we accept.
    pub max_frame_size: u32,
    /// Most data one stream may queue inside h2 before it is written to the transport.
    pub max_send_buffer: usize,
}

impl Default for FlowControl {
    fn default() -> Self {
        Self {
            stream_window: 4 * MIB,
            connection_window: 16 * MIB,
            max_frame_size: MIB,
            max_send_buffer: MIB as usize,
        }
    }
}

impl FlowControl {
    fn stream_window(&self) -> u32 {
        self.stream_window.clamp(1, MAX_WINDOW)
    }
    fn connection_window(&self) -> u32 {
        self.connection_window.clamp(1, MAX_WINDOW)
    }
    fn max_frame_size(&self) -> u32 {
        self.max_frame_size.clamp(MIN_FRAME_SIZE, MAX_FRAME_SIZE)
    }
    fn max_send_buffer(&self) -> usize {
        self.max_send_buffer.max(MIN_FRAME_SIZE as usize)
    }
}

/// Settings of the client side of HBONE connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    pub flow: FlowControl,
    /// Largest response header list we accept.
    pub max_header_list_size: u32,
    /// Streams we may open before the server's SETTINGS arrive (h2 would allow unlimited).
    pub initial_max_send_streams: usize,
    /// Bound on the HTTP/2 handshake.
    pub handshake_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            flow: FlowControl::default(),
            max_header_list_size: 16 * 1024,
            initial_max_send_streams: 100,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Failure to establish an HBONE connection (transport or HTTP/2 handshake). `Clone` so that
/// callers who waited for another caller's connection attempt get the same error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting the transport: {0}")]
    Transport(Arc<dyn std::error::Error + Send + Sync>),
    #[error("HTTP/2 handshake: {0}")]
    Handshake(Arc<h2::Error>),
    #[error("HTTP/2 handshake timed out after {0:?}")]
    Timeout(Duration),
}

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// The pool could not establish a connection.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// No preface, SETTINGS or first request within the handshake timeout.
    #[error("HTTP/2 handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    #[error("HTTP/2 handshake: {0}")]
    Handshake(#[source] h2::Error),
    /// The connection or the stream failed at the HTTP/2 level.
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    /// The peer answered the `CONNECT` with a status other than 200.
    #[error("CONNECT {target} refused with status {status}")]
    Refused { target: SocketAddr, status: http::StatusCode },
    /// The peer did not answer the `CONNECT` in time.
    #[error("CONNECT {target}: no response within {timeout:?}")]
    OpenTimeout { target: SocketAddr, timeout: Duration },
    /// The address cannot be written as an `:authority` (e.g. an IPv6 scope id).
    #[error("{0} cannot be a CONNECT authority")]
    InvalidTarget(SocketAddr),
}

impl HboneError {
    /// The HTTP status of a refused `CONNECT`.
    pub fn status(&self) -> Option<http::StatusCode> {
        match self {
            HboneError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}
