//! [`MigratingIo`]: the stream under a WebSocket that can migrate, which follows the frames
//! read and can stop reading.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;

use super::frames::Frames;

/// A server-side WebSocket that can migrate: see [`accept`](super::accept), [`resume`](super::resume) and [`migrate`](super::migrate).
pub type MigratingWebSocket = WebSocketStream<MigratingIo>;

/// The stream under a [`MigratingWebSocket`]: a TCP stream that keeps the bytes read since
/// the last complete message (none while idle), and that can stop reading.
#[derive(Debug)]
pub struct MigratingIo {
    pub(super) stream: TcpStream,
    pub(super) frames: Frames,
    /// Off during the opening handshake, whose bytes are not frames.
    pub(super) tracking: bool,
    pub(super) reading: bool,
}

impl MigratingIo {
    pub(super) fn new(stream: TcpStream, tracking: bool) -> Self {
        Self {
            stream,
            frames: Frames::default(),
            tracking,
            reading: true,
        }
    }

    /// The TCP stream.
    pub fn get_ref(&self) -> &TcpStream {
        &self.stream
    }

    /// Reads from the socket again, after [`stop_reading`](super::stop_reading).
    pub fn resume_reading(&mut self) {
        self.reading = true;
    }
}

impl AsyncRead for MigratingIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.reading {
            // No waker is kept: whoever stopped the reading polls again once it resumes.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        if this.tracking {
            this.frames.observe(&buf.filled()[before..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MigratingIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
