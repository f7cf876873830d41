//! Client side: the HTTP/2 handshake and opening one tunnel with `CONNECT`.

use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::future::poll_fn;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode, Uri, Version};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    task::JoinHandle,
};
use tracing::debug;

use super::{pool::StreamSlot, stream::HboneStream, ClientConfig, HboneError};

/// An h2 client builder with the HBONE settings of `cfg`.
pub fn client_builder(cfg: &ClientConfig) -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(cfg.flow.stream_window())
        .initial_connection_window_size(cfg.flow.connection_window())
        .max_frame_size(cfg.flow.max_frame_size())
        .max_send_buffer_size(cfg.flow.max_send_buffer())
        .max_header_list_size(cfg.max_header_list_size)
        .initial_max_send_streams(cfg.initial_max_send_streams)
        // Servers have no business pushing into a tunnel connection.
        .enable_push(false);
    b
}

/// Runs the client HTTP/2 handshake over `io` (already through TLS) and spawns the task that
/// drives the connection. The task ends, with the connection's outcome, once every
/// `SendRequest` clone and every stream is gone (it then sends GOAWAY) or the connection fails.
pub async fn client_handshake<S>(
    io: S,
    cfg: &ClientConfig,
) -> Result<(SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>), HboneError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = match tokio::time::timeout(
        cfg.handshake_timeout,
        client_builder(cfg).handshake::<S, Bytes>(io),
    )
    .await
    {
        Ok(Ok(parts)) => parts,
        Ok(Err(e)) => return Err(HboneError::Handshake(e)),
        Err(_) => return Err(HboneError::HandshakeTimeout(cfg.handshake_timeout)),
    };
    let driver = tokio::spawn(async move {
        let result = conn.await;
        if let Err(e) = &result {
            debug!("HBONE client connection ended: {e}");
        }
        result
    });
    Ok((send, driver))
}

/// Opens a tunnel to `target` on an established connection: sends `CONNECT` with
/// `:authority` = `target` (no `:scheme`/`:path`, as ztunnel expects) and waits for the answer.
/// Any status but 200 is [`HboneError::Refused`].
pub async fn connect_stream(
    send: &mut SendRequest<Bytes>,
    target: SocketAddr,
) -> Result<HboneStream, HboneError> {
    open(send, target, None).await
}

pub(crate) async fn open(
    send: &mut SendRequest<Bytes>,
    target: SocketAddr,
    slot: Option<StreamSlot>,
) -> Result<HboneStream, HboneError> {
    let uri = Uri::try_from(target.to_string()).map_err(|_| HboneError::InvalidTarget(target))?;
    let mut req = Request::new(());
    *req.method_mut() = Method::CONNECT;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;

    // A SendRequest may have one request waiting for a stream slot at a time.
    poll_fn(|cx| send.poll_ready(cx)).await?;
    let (response, send_stream) = send.send_request(req, false)?;
    let response = response.await?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Refused { target, status: response.status() });
    }
    Ok(HboneStream::new(send_stream, response.into_body(), target, slot))
}
