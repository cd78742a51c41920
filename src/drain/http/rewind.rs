//! [`Rewind`]: an I/O that replays bytes already read before reading from the socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `first`, then `then`.
pub(super) fn joined(first: Bytes, then: Bytes) -> Bytes {
    if then.is_empty() {
        return first;
    }
    let mut both = BytesMut::with_capacity(first.len() + then.len());
    both.extend_from_slice(&first);
    both.extend_from_slice(&then);
    both.freeze()
}

/// An I/O that replays bytes already read (a migrated connection's leftover, the bytes that
/// told its protocol) before reading from the socket.
#[derive(Debug)]
pub(crate) struct Rewind<T> {
    pre: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// Reads `pre`, then `inner`.
    pub(crate) fn new(pre: Bytes, inner: T) -> Self {
        Self { pre, inner }
    }

    /// Puts `bytes` back, to be read before what is left.
    pub(super) fn unread(&mut self, bytes: &[u8]) {
        self.pre = joined(Bytes::copy_from_slice(bytes), std::mem::take(&mut self.pre));
    }

    /// The bytes not replayed yet, and the I/O.
    pub(crate) fn into_parts(self) -> (Bytes, T) {
        (self.pre, self.inner)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pre.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.pre.len().min(buf.remaining());
        buf.put_slice(&self.pre[..n]);
        self.pre.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
}
