//! [`Lingering`]: a connection whose close is a lingering close.
//!
//! Closing a TCP socket that still holds unread bytes makes the kernel send RST, not FIN
//! (RFC 1122, 4.2.2.13), and an RST can destroy a response the client has not read yet. A
//! request the client sends just as the server closes an idle keep-alive connection is such
//! a byte. So the close is: half-close (FIN: the client sees a clean end of stream, and may
//! retry its request elsewhere), then read and discard what the client still sends, until
//! its own FIN or [`LINGER`], and only then close.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long a closing connection keeps discarding what its client sends after our FIN.
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// How many bytes one read of the discard takes.
const DISCARD_CHUNK: usize = 512;

/// Where a close stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// Not asked for.
    Open,
    /// Our FIN is sent; discarding until the client's FIN or the timer.
    Lingering,
    /// Done: the socket may be closed without an RST (or broke anyway).
    Done,
}

/// An I/O whose shutdown (`poll_shutdown`, as hyper calls it to close) is a lingering close,
/// and which, dropped before one completed, finishes it in a task of its own.
#[derive(Debug)]
pub(crate) struct Lingering<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    /// `None` only while `Drop` hands it to the lingering task.
    inner: Option<I>,
    close: Close,
    /// Allocated when the linger starts: an open connection pays nothing for it.
    timer: Option<Pin<Box<Sleep>>>,
    /// Already in the task that finishes its close: dropped (the runtime shuts down), it
    /// just closes.
    finishing: bool,
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> Lingering<I> {
    pub(crate) fn new(inner: I) -> Self {
        Self {
            inner: Some(inner),
            close: Close::Open,
            timer: None,
            finishing: false,
        }
    }

    /// The I/O back, with no close: it is handed over, still open.
    pub(crate) fn into_inner(mut self) -> I {
        self.close = Close::Done;
        self.inner.take().expect("the I/O is there until dropped")
    }

    fn inner(&mut self) -> &mut I {
        self.inner.as_mut().expect("the I/O is there until dropped")
    }

    /// Drives the close to its end: FIN, then discard until the client's FIN or the timer.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.close == Close::Open {
            let shut = ready!(Pin::new(self.inner()).poll_shutdown(cx));
            if shut.is_err() {
                self.close = Close::Done;
                return Poll::Ready(shut);
            }
            self.close = Close::Lingering;
            self.timer = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        while self.close == Close::Lingering {
            if let Some(timer) = &mut self.timer {
                if timer.as_mut().poll(cx).is_ready() {
                    break;
                }
            }
            let mut chunk = [0u8; DISCARD_CHUNK];
            let mut buf = ReadBuf::new(&mut chunk);
            match ready!(Pin::new(self.inner()).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => continue, // discarded
                Ok(()) | Err(_) => break,                       // the client's FIN, or broken
            }
        }
        self.close = Close::Done;
        self.timer = None;
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for Lingering<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.inner()).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Lingering<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self.inner()).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.inner()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_close(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.inner()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(I::is_write_vectored)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> Drop for Lingering<I> {
    /// Dropped before its close completed (an upgraded connection's end, a protocol error, a
    /// connection that never sent a byte): the close goes on in a task of its own, bounded by
    /// [`LINGER`]. Outside a runtime (it is shutting down), the socket just closes.
    fn drop(&mut self) {
        if self.close == Close::Done || self.finishing {
            return;
        }
        let (Some(inner), Ok(runtime)) = (self.inner.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let mut rest = Lingering {
            inner: Some(inner),
            close: self.close,
            timer: self.timer.take(),
            finishing: true,
        };
        runtime.spawn(std::future::poll_fn(move |cx| rest.poll_close(cx).map(|_| ())));
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A client and the server's end of its connection, with `unread` sent by the client and
    /// sitting unread in the server's socket.
    async fn connection_with_unread(unread: &[u8]) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(unread).await.unwrap();
        // Wait until the bytes are in the server's socket (not on the clock).
        let mut peek = vec![0; unread.len()];
        while server.peek(&mut peek).await.unwrap() < unread.len() {}
        (client, server)
    }

    async fn read_to_end(client: &mut TcpStream) -> io::Result<Vec<u8>> {
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.map(|_| received)
    }

    /// The bug this module fixes: what plain closing does to a request racing the close.
    #[tokio::test]
    async fn closing_over_unread_bytes_resets_the_connection() {
        let (mut client, server) = connection_with_unread(b"GET / HTTP/1.1\r\n\r\n").await;
        drop(server);
        let error = read_to_end(&mut client).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn a_lingering_close_over_unread_bytes_ends_with_a_fin() {
        let (mut client, server) = connection_with_unread(b"GET / HTTP/1.1\r\n\r\n").await;
        let mut server = Lingering::new(server);
        let closing = tokio::spawn(async move { server.shutdown().await });
        assert_eq!(read_to_end(&mut client).await.unwrap(), b"", "a clean end of stream");
        // A request sent after our FIN is discarded too, never answered with an RST.
        client.write_all(b"GET /late HTTP/1.1\r\n\r\n").await.unwrap();
        client.shutdown().await.unwrap();
        closing.await.unwrap().unwrap();
        assert_eq!(read_to_end(&mut client).await.unwrap(), b"");
    }

    #[tokio::test]
    async fn dropped_before_its_close_it_still_lingers() {
        let (mut client, server) = connection_with_unread(b"half a request").await;
        drop(Lingering::new(server));
        assert_eq!(read_to_end(&mut client).await.unwrap(), b"");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_closes_is_let_go_after_the_linger() {
        let (_client, server) = connection_with_unread(b"x").await;
        let mut server = Lingering::new(server);
        let started = tokio::time::Instant::now();
        server.shutdown().await.unwrap();
        assert_eq!(started.elapsed(), LINGER);
    }
}
