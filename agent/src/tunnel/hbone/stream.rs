//! One tunnel: an HTTP/2 stream seen as a byte stream, and the relay that pumps it against a
//! TCP socket.

use std::{
    fmt, io,
    net::SocketAddr,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes};
use futures_util::future::poll_fn;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

use super::pool::StreamSlot;

/// An established HBONE tunnel (either side).
///
/// Reading yields the peer's bytes, EOF when the peer half-closed (`END_STREAM`); writing
/// respects HTTP/2 flow control (it waits for window rather than buffering without bound);
/// `shutdown` sends `END_STREAM` and leaves the read side open. Dropping the stream before both
/// sides ended resets it (`RST_STREAM(CANCEL)`), which the peer sees as an aborted connection.
pub struct HboneStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet consumed; its flow-control window is returned only once consumed, so
    /// a slow reader throttles the peer instead of growing this.
    buf: Bytes,
    read_eof: bool,
    write_closed: bool,
    target: SocketAddr,
    /// Holds a pooled connection's stream slot until the tunnel is gone.
    slot: Option<StreamSlot>,
}

impl fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneStream")
            .field("target", &self.target)
            .field("read_eof", &self.read_eof)
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

impl HboneStream {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        target: SocketAddr,
        slot: Option<StreamSlot>,
    ) -> Self {
        Self { send, recv, buf: Bytes::new(), read_eof: false, write_closed: false, target, slot }
    }

    /// The `:authority` of the tunnel: where the server relays to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The label its pooled connection was given ([`super::Pool::stream_as`]).
    pub fn connection_label(&self) -> Option<&str> {
        self.slot.as_ref().and_then(StreamSlot::label)
    }

    /// The error for a failed send: the reset reason if the stream was reset, otherwise a
    /// broken pipe. Never waits: a stream that closed normally has no reset to wait for.
    fn send_failure(&mut self, cx: &mut Context<'_>) -> io::Error {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => reset_error(reason),
            Poll::Ready(Err(e)) => h2_to_io(e),
            Poll::Pending => io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed"),
        }
    }
}

fn reset_error(reason: Reason) -> io::Error {
    let kind = if reason == Reason::NO_ERROR || reason == Reason::CANCEL {
        io::ErrorKind::BrokenPipe
    } else {
        io::ErrorKind::ConnectionReset
    };
    io::Error::new(kind, format!("HBONE stream reset: {reason}"))
}

pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        if let Some(io) = e.into_io() {
            return io;
        }
        return io::Error::other("HBONE connection I/O error");
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

impl AsyncBufRead for HboneStream {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        // Empty DATA frames carry nothing: keep polling (h2 limits how many a peer may send).
        while this.buf.is_empty() && !this.read_eof {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(chunk)) => this.buf = chunk,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => this.read_eof = true,
            }
        }
        Poll::Ready(Ok(&this.buf))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        let amt = amt.min(this.buf.len());
        if amt == 0 {
            return;
        }
        this.buf.advance(amt);
        // Fails only once the stream is gone, when the window no longer matters.
        let _ = this.recv.flow_control().release_capacity(amt);
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let chunk = ready!(self.as_mut().poll_fill_buf(cx))?;
        let n = chunk.len().min(out.remaining());
        out.put_slice(&chunk[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "HBONE stream already shut down for writing",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            // Send only what the peer's window allows: h2 would otherwise buffer any amount.
            this.send.reserve_capacity(buf.len());
            let granted = match this.send.capacity() {
                0 => match ready!(this.send.poll_capacity(cx)) {
                    Some(Ok(n)) => n,
                    Some(Err(_)) | None => return Poll::Ready(Err(this.send_failure(cx))),
                },
                n => n,
            };
            let n = granted.min(buf.len());
            if n == 0 {
                // Capacity raced away (e.g. a SETTINGS change); poll_capacity registers us.
                continue;
            }
            return match this.send.send_data(Bytes::copy_from_slice(&buf[..n]), false) {
                Ok(()) => Poll::Ready(Ok(n)),
                Err(_) => Poll::Ready(Err(this.send_failure(cx))),
            };
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes queued frames out on its own.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        this.write_closed = true;
        // Drop any reservation left over from a write so the window goes back to the connection.
        this.send.reserve_capacity(0);
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(_) => Poll::Ready(Err(this.send_failure(cx))),
        }
    }
}

/// What a [`relay`] moved, and why it stopped early if it did.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes read from the tunnel and written to the other side.
    pub from_tunnel: u64,
    /// Bytes read from the other side and written into the tunnel.
    pub to_tunnel: u64,
    /// `None` when both directions ended with a half-close.
    pub error: Option<io::Error>,
}

/// Bytes a tunnel has carried so far, added as they flow so that others can watch a live
/// tunnel: `sent` travels from the side that opened the tunnel towards its target, `received`
/// back. Plain relaxed atomics: one uncontended add per write, no lock on the data path.
#[derive(Debug, Default)]
pub struct LiveBytes {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

impl LiveBytes {
    /// (sent, received) so far.
    pub fn get(&self) -> (u64, u64) {
        (self.sent.load(Ordering::Relaxed), self.received.load(Ordering::Relaxed))
    }
}

/// At most this much per direction per poll, so one busy tunnel cannot starve the runtime.
const YIELD_AFTER: u64 = 1024 * 1024;

/// Pumps bytes both ways between a tunnel and another stream (normally the TCP socket of the
/// application) until both directions have ended, propagating each half-close separately:
/// `END_STREAM` from the peer becomes `shutdown(Write)` on `other`, EOF on `other` becomes
/// `END_STREAM`. Ends early with an error when either side fails or the peer resets the stream.
/// Unlike `tokio::io::copy_bidirectional` it reports byte counts on error too, reads the tunnel
/// without an intermediate copy, and notices a reset while both directions are idle.
pub async fn relay<U>(tunnel: &mut HboneStream, other: &mut U, buf_size: usize) -> Relayed
where
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (from_tunnel, to_tunnel) = (AtomicU64::new(0), AtomicU64::new(0));
    relay_counted(tunnel, other, buf_size, &from_tunnel, &to_tunnel).await
}

/// [`relay`] that also adds every byte it moves to `from_tunnel` or `to_tunnel` as it goes.
pub async fn relay_counted<U>(
    tunnel: &mut HboneStream,
    other: &mut U,
    buf_size: usize,
    from_tunnel: &AtomicU64,
    to_tunnel: &AtomicU64,
) -> Relayed
where
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut down = Down::default();
    let mut up = Up::new(buf_size.max(1024));
    let result = poll_fn(|cx| {
        // Checked on every wake-up so that a tunnel whose directions are both idle still ends
        // when the peer resets it or the connection dies.
        match tunnel.send.poll_reset(cx) {
            // After its END_STREAM, RST_STREAM(NO_ERROR) is the peer's "stop sending, I am done"
            // (RFC 9113 section 8.1): a normal end, not an abort.
            Poll::Ready(Ok(Reason::NO_ERROR)) if down.done => return Poll::Ready(Ok(())),
            Poll::Ready(Ok(reason)) => return Poll::Ready(Err(reset_error(reason))),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            Poll::Pending => {}
        }
        if !down.done {
            if let Poll::Ready(r) = down.poll(cx, tunnel, Pin::new(&mut *other), from_tunnel) {
                r?;
                down.done = true;
            }
        }
        if !up.done {
            if let Poll::Ready(r) = up.poll(cx, Pin::new(&mut *other), tunnel, to_tunnel) {
                r?;
                up.done = true;
            }
        }
        if down.done && up.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    Relayed { from_tunnel: down.amt, to_tunnel: up.amt, error: result.err() }
}

/// Tunnel -> other, straight out of the received DATA frames.
#[derive(Default)]
struct Down {
    amt: u64,
    eof: bool,
    need_flush: bool,
    done: bool,
}

impl Down {
    fn poll<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        tunnel: &mut HboneStream,
        mut w: Pin<&mut W>,
        live: &AtomicU64,
    ) -> Poll<io::Result<()>> {
        let mut moved = 0u64;
        while !self.eof {
            let chunk = match Pin::new(&mut *tunnel).poll_fill_buf(cx) {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    if self.need_flush {
                        ready!(w.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            };
            if chunk.is_empty() {
                self.eof = true;
                break;
            }
            let n = ready!(w.as_mut().poll_write(cx, chunk))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            Pin::new(&mut *tunnel).consume(n);
            self.amt += n as u64;
            live.fetch_add(n as u64, Ordering::Relaxed);
            self.need_flush = true;
            moved += n as u64;
            if moved >= YIELD_AFTER {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        if self.need_flush {
            ready!(w.as_mut().poll_flush(cx))?;
            self.need_flush = false;
        }
        w.poll_shutdown(cx)
    }
}

/// Other -> tunnel, through a buffer.
struct Up {
    buf: Box<[u8]>,
    pos: usize,
    cap: usize,
    eof: bool,
    amt: u64,
    done: bool,
}

impl Up {
    fn new(size: usize) -> Self {
        Self {
            buf: vec![0; size].into_boxed_slice(),
            pos: 0,
            cap: 0,
            eof: false,
            amt: 0,
            done: false,
        }
    }

    fn poll<R: AsyncRead + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        tunnel: &mut HboneStream,
        live: &AtomicU64,
    ) -> Poll<io::Result<()>> {
        let mut moved = 0u64;
        loop {
            if self.pos == self.cap && !self.eof {
                let mut rb = ReadBuf::new(&mut self.buf);
                ready!(r.as_mut().poll_read(cx, &mut rb))?;
                let n = rb.filled().len();
                if n == 0 {
                    self.eof = true;
                } else {
                    self.pos = 0;
                    self.cap = n;
                }
            }
            while self.pos < self.cap {
                let n =
                    ready!(Pin::new(&mut *tunnel).poll_write(cx, &self.buf[self.pos..self.cap]))?;
                self.pos += n;
                self.amt += n as u64;
                live.fetch_add(n as u64, Ordering::Relaxed);
                moved += n as u64;
            }
            if self.eof {
                return Pin::new(&mut *tunnel).poll_shutdown(cx);
            }
            if moved >= YIELD_AFTER {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }
}
