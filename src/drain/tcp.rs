//! The raw TCP drain: half-close, then read to the client's EOF.
//!
//! `shutdown(SHUT_WR)` sends a FIN after every byte already written, so the client reads all
//! of it, then EOF. We keep reading (and discard) until the client closes its side too:
//! closing a socket with unread bytes in its receive buffer would send an RST, which the
//! client sees as "connection reset" and may lose data it has not read yet.
//!
//! # Examples
//!
//! A greeter: each client gets a line, then a clean close.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//!
//! use handover::drain::{tcp, Drain, DrainStrategy, TrackedConnection};
//! use handover::Handoff;
//! use tokio::io::AsyncWriteExt;
//! use tokio::net::TcpStream;
//!
//! /// Greets each client, then closes cleanly: half-close, read to the client's EOF.
//! struct Greeter;
//!
//! impl DrainStrategy<TcpStream> for Greeter {
//!     async fn serve(&self, mut stream: TcpStream, connection: TrackedConnection) {
//!         // Every wait on the client is bounded by the drain's deadline.
//!         if let Some(Ok(())) = connection.until_deadline(stream.write_all(b"hello\n")).await {
//!             let _ = tcp::finish(stream, &connection).await;
//!         }
//!     }
//! }
//!
//! let handoff = Handoff::builder().start().await?; // inherits sockets after an upgrade
//! let listener = handoff.registry().tcp("greeter", "127.0.0.1:0".parse()?)?;
//! let address = listener.local_addr()?;
//! handoff.ready().await?; // after an upgrade: the predecessor has committed and drains
//!
//! // Accepts until a successor serves or a stop comes, then drains (30 s deadline).
//! let server = tokio::spawn({
//!     let handoff = handoff.clone();
//!     async move { Drain::builder().build().serve(&handoff, listener, Arc::new(Greeter)).await }
//! });
//!
//! let mut client = TcpStream::connect(address).await?;
//! let mut greeting = String::new();
//! tokio::io::AsyncReadExt::read_to_string(&mut client, &mut greeting).await?;
//! assert_eq!(greeting, "hello\n");
//! drop(client); // our EOF lets the server's half-closed side finish cleanly
//!
//! handoff.stop(); // what SIGTERM does; after an upgrade, the same drain follows
//! let report = server.await?;
//! assert_eq!(report.forced, 0, "no connection was left at the deadline");
//! # Ok(()) }
//! ```

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
