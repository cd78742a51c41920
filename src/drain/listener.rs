//! [`Listener`]: what [`Drain::serve`](super::Drain::serve) accepts connections from.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

/// A source of connections: tokio's `TcpListener` and `UnixListener` are ones; implement it
/// for another (a TLS acceptor around one of them, say).
///
/// # Examples
///
/// ```
/// use handover::drain::Listener;
///
/// /// Accepts from a TCP listener, with `TCP_NODELAY` on every connection.
/// struct NoDelay(tokio::net::TcpListener);
///
/// impl Listener for NoDelay {
///     type Io = tokio::net::TcpStream;
///
///     async fn accept_connection(&mut self) -> std::io::Result<Self::Io> {
///         let (stream, _) = self.0.accept().await?;
///         stream.set_nodelay(true)?;
///         Ok(stream)
///     }
///
///     // So that `status` counts its connections under the registry's name for it.
///     fn as_socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
///         self.0.as_socket()
///     }
/// }
/// ```
pub trait Listener: Send {
    /// A connection.
    type Io: Send + 'static;

    /// The next connection.
    ///
    /// # Errors
    ///
    /// As `accept(2)`: the accept loop retries at once after one connection's error
    /// (`ECONNABORTED`, say), and backs off after the process's (`EMFILE`, `ENOBUFS`…).
    ///
    /// # Cancel safety
    ///
    /// Must be cancel safe: the accept loop drops it when the shutdown comes first. Tokio's
    /// listeners' `accept` is.
    fn accept_connection(&mut self) -> impl Future<Output = io::Result<Self::Io>> + Send;

    /// The socket it accepts from, by which `status` names its connections (the name the
    /// registry holds it under). Default: `None`, and its connections are counted without a
    /// name; a wrapper around a registry listener returns the inner one's.
    fn as_socket(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;

    async fn accept_connection(&mut self) -> io::Result<Self::Io> {
        Ok(self.accept().await?.0)
    }

    fn as_socket(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;

    async fn accept_connection(&mut self) -> io::Result<Self::Io> {
        Ok(self.accept().await?.0)
    }

    fn as_socket(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}
