//! The application's state, handed to the successor as a stream of bytes: a snapshot of its
//! caches, session tables or counters, of any size.
//!
//! The predecessor registers a writer ([`Handoff::send_state_with`]); at each upgrade it
//! opens a Unix stream socket pair of its own (not the datagram channel: a stream has
//! backpressure and no size limit), sends one end after the sockets, and runs the writer on
//! the other in a task of its own while the successor starts. The successor reads the stream
//! ([`Handoff::take_state`]) before it says ready, or refuses it and starts cold. The writer
//! is bounded by the upgrade: when the upgrade ends (the successor is ready, fails, or the
//! deadline passes) a writer still running is dropped, so a successor that never reads cannot
//! hold its predecessor.
//!
//! The bytes are the application's: put a version first, so that a successor can refuse a
//! format it does not know. Whatever changes after the snapshot, until the commit, is not in
//! it.
//!
//! [`Handoff::send_state_with`]: crate::Handoff::send_state_with
//! [`Handoff::take_state`]: crate::Handoff::take_state

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

/// Where the predecessor writes its state for the successor: shut down (the successor reads
/// EOF) once the writer returns.
#[derive(Debug)]
pub struct StateWriter {
    stream: UnixStream,
    written: Arc<AtomicU64>,
}

/// Where the successor reads its predecessor's state, to its EOF; see
/// [`Handoff::take_state`](crate::Handoff::take_state).
#[derive(Debug)]
pub struct StateReader {
    stream: UnixStream,
}

/// The writer an application registers: called once per upgrade.
pub(crate) type Writer = dyn Fn(StateWriter) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send>> + Send + Sync;

impl StateWriter {
    /// How many bytes have been written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

impl AsyncWrite for StateWriter {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl StateReader {
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Self> {
        let stream = std::os::unix::net::UnixStream::from(fd);
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream: UnixStream::from_std(stream)?,
        })
    }

    /// Refuses the state (a version this process does not read, say): logs why, and closes
    /// the stream, so the predecessor's writer stops. The process starts cold.
    pub fn refuse(self, reason: impl std::fmt::Display) {
        tracing::warn!(%reason, "the predecessor's application state refused; starting without it");
    }
}

impl AsyncRead for StateReader {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

/// The predecessor's writer, running for one upgrade: dropped with the upgrade.
#[derive(Debug)]
pub(crate) struct Sending(tokio::task::JoinHandle<()>);

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Opens the stream for one upgrade and starts `writer` on our end; returns the successor's
/// end, to send, and the running writer. The stream closes (the successor reads EOF) when
/// the writer returns, dropping its [`StateWriter`].
pub(crate) fn start(writer: &Arc<Writer>) -> io::Result<(OwnedFd, Sending)> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    let written = Arc::new(AtomicU64::new(0));
    let state = StateWriter {
        stream: UnixStream::from_std(ours)?,
        written: written.clone(),
    };
    let run = writer(state);
    let task = tokio::spawn(async move {
        let outcome = run.await;
        let bytes = written.load(Ordering::Relaxed);
        match outcome {
            Ok(()) => tracing::info!(bytes, "application state sent to the successor"),
            Err(error) if error.kind() == io::ErrorKind::BrokenPipe => tracing::warn!(
                bytes,
                "the successor did not read the application state (it refused it, or never took it)"
            ),
            Err(error) => tracing::warn!(%error, bytes, "sending the application state failed"),
        }
    });
    Ok((theirs.into(), Sending(task)))
}
