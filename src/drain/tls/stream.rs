//! [`TlsStream`]: the TLS session [`Tls`](super::Tls) hands to its inner strategy, which
//! ends with `close_notify` however the strategy lets it go.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::rustls::ServerConnection;

/// An established TLS session over `I` (a `TcpStream`, say), as the inner strategy of a
/// [`Tls`](super::Tls) gets it: read and write it like the plain stream.
///
/// Its shutdown (`AsyncWriteExt::shutdown`, as [`tcp::finish`](crate::drain::tcp::finish) and
/// hyper call it to close) sends `close_notify`, then half-closes the transport: the client
/// reads every byte written, then a clean end of the session, never a truncation. Dropped
/// before a shutdown completed (a strategy that just returns, a WebSocket after its close
/// handshake, the drain's hard stop), it writes `close_notify` and the FIN if the socket
/// takes them at once; it never waits on the client.
///
/// It does not give the plain stream back: the session's keys stay in this process, so a TLS
/// connection cannot migrate (see [`Tls`](super::Tls)).
#[derive(Debug)]
pub struct TlsStream<I: AsyncRead + AsyncWrite + Unpin> {
    inner: tokio_rustls::server::TlsStream<I>,
    /// The shutdown has completed: `close_notify` and the FIN are written.
    shut_down: bool,
}

impl<I: AsyncRead + AsyncWrite + Unpin> TlsStream<I> {
    pub(super) fn new(inner: tokio_rustls::server::TlsStream<I>) -> Self {
        Self {
            inner,
            shut_down: false,
        }
    }

    /// The transport and the rustls session (ALPN, SNI, the client's certificates…).
    pub fn get_ref(&self) -> (&I, &ServerConnection) {
        self.inner.get_ref()
    }

    /// The protocol the client and the server agreed on by ALPN (`h2`, `http/1.1`), if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.inner.get_ref().1.alpn_protocol()
    }

    /// The server name the client asked for (SNI), if it sent one.
    pub fn server_name(&self) -> Option<&str> {
        self.inner.get_ref().1.server_name()
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// `close_notify` first (tokio-rustls queues and flushes it), then the transport's
    /// half-close.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shut = Pin::new(&mut self.inner).poll_shutdown(cx);
        if shut.is_ready() {
            self.shut_down = true;
        }
        shut
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> Drop for TlsStream<I> {
    /// One poll of the shutdown, with a waker that does nothing: `close_notify` and the FIN
    /// are written if the socket takes them now; nothing waits on the client.
    fn drop(&mut self) {
        if !self.shut_down {
            let _ = Pin::new(&mut self.inner).poll_shutdown(&mut Context::from_waker(Waker::noop()));
        }
    }
}
