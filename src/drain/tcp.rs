//! The raw TCP drain: half-close, then read to the client's EOF.
//!
//! `shutdown(SHUT_WR)` sends a FIN after every byte already written, so the client reads all
//! of it, then EOF. We keep reading (and discard) until the client closes its side too:
//! closing a socket with unread bytes in its receive buffer would send an RST, which the
//! client sees as "connection reset" and may lose data it has not read yet.

use std::future::Future;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::TrackedConnection;

/// How a half-closed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TcpFinish {
    /// The client closed its side: a clean close, no RST.
    ClientClosed,
    /// The drain deadline came first; the connection was closed anyway.
    Deadline,
}

/// Half-closes `stream` and reads (discarding) until the client's EOF or the deadline. The
/// stream is closed when the returned future completes.
///
/// The wind-down's state (and its read buffer) is allocated when this is called, not carried
/// in the task of every idle connection that may one day drain.
///
/// # Errors
///
/// An I/O error of the stream (a client that reset the connection, say).
pub fn finish<'a, S>(
    stream: S,
    connection: &'a TrackedConnection,
) -> impl Future<Output = std::io::Result<TcpFinish>> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + 'a,
{
    Box::pin(half_close(stream, connection))
}

async fn half_close<S>(mut stream: S, connection: &TrackedConnection) -> std::io::Result<TcpFinish>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Under the deadline too: a stream that writes on shutdown (TLS's close_notify) could wait
    // on a client that does not read.
    if connection
        .until_deadline(stream.shutdown())
        .await
        .transpose()?
        .is_none()
    {
        return Ok(TcpFinish::Deadline);
    }
    let mut discard = [0u8; 4096];
    loop {
        tokio::select! {
            read = stream.read(&mut discard) => if read? == 0 { return Ok(TcpFinish::ClientClosed) },
            () = connection.deadline() => return Ok(TcpFinish::Deadline),
        }
    }
}
