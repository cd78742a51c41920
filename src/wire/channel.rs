//! The handoff channel: a `SOCK_SEQPACKET` Unix socket pair, driven by tokio.
//!
//! `SOCK_SEQPACKET` keeps message boundaries (one JSON message per datagram, no framing to get
//! wrong) and, unlike `SOCK_DGRAM`, reports the peer's exit as EOF.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{self, getsockopt, setsockopt, sockopt, AddressFamily, SockFlag, SockType, UnixCredentials};
use socket2::SockRef;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::fd_passing::{receive_buffer, recv_datagram, send_datagram, Received};
use super::{Message, WireError};

/// The environment variable that carries the channel's descriptor number to a successor.
pub const CHANNEL_FD_VAR: &str = "HANDOFF_FD";

/// One end of a handoff channel.
#[derive(Debug)]
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
}

/// Creates a connected pair of channel ends, both close-on-exec. The one meant for a child
/// process reaches it duplicated, without the flag, in the child only (see `lifecycle::spawn`).
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

impl Channel {
    /// Wraps one end of a pair. Must be called within a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        SockRef::from(&fd).set_nonblocking(true)?;
        // SAFETY: an `OwnedFd` is open until dropped, which happens only with the `AsyncFd`,
        // and always returns the same descriptor; we never swap it through `get_mut`.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self {
            fd,
            buf: receive_buffer(),
        })
    }

    /// Resolves once the peer has closed its end entirely (it exited), not when it has only
    /// shut down its writing half: a half-closed peer still reads what we send.
    ///
    /// It clears the write readiness tokio caches for this end: send on it meanwhile with
    /// [`try_send`](Self::try_send), not [`send`](Self::send), which could wait for a wake-up
    /// that does not come.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only waits.
    pub async fn peer_gone(&self) -> io::Result<()> {
        loop {
            // The peer's close raises EPOLLHUP, which tokio reports as "write closed"; its
            // half-close raises only EPOLLRDHUP ("read closed").
            let mut guard = self.fd.ready(Interest::WRITABLE).await?;
            if guard.ready().is_write_closed() {
                return Ok(());
            }
            // Writable without a hang-up: wait for the next change of the socket's state.
            guard.clear_ready();
        }
    }

    /// Sends one message with `fds` attached.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a message is sent whole or not at all.
    pub async fn send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
        let bytes = message.encode()?;
        self.fd
            .async_io(Interest::WRITABLE, |fd| send_datagram(fd.as_fd(), &bytes, fds))
            .await?;
        Ok(())
    }

    /// Sends one message now, or fails with `WouldBlock` when the socket's buffer is full:
    /// never waits, and asks the socket itself rather than the readiness tokio has cached.
    pub fn try_send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
        let bytes = message.encode()?;
        send_datagram(self.fd.get_ref().as_fd(), &bytes, fds)?;
        Ok(())
    }

    /// Receives one message, or `None` at the peer's EOF.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a datagram is consumed only by the call that returns it.
    pub async fn recv_or_eof(&mut self) -> Result<Option<Received>, WireError> {
        let buf = &mut self.buf;
        let datagram = self
            .fd
            .async_io(Interest::READABLE, |fd| recv_datagram(fd.as_fd(), buf))
            .await?;
        datagram.into_received(&self.buf)
    }

    /// Receives a message already queued, without waiting: `Ok(None)` when none is (or at
    /// the peer's EOF).
    pub fn try_recv(&mut self) -> Result<Option<Received>, WireError> {
        match recv_datagram(self.fd.get_ref().as_fd(), &mut self.buf) {
            Ok(datagram) => datagram.into_received(&self.buf),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Stops receiving: from now on the peer's sends fail (`EPIPE`); messages already queued
    /// can still be read with [`try_recv`](Self::try_recv). Closes a race: after this, what
    /// the peer believes it sent, we can read.
    pub fn stop_receiving(&self) -> io::Result<()> {
        SockRef::from(self.fd.get_ref()).shutdown(std::net::Shutdown::Read)
    }

    /// Receives one message; EOF is an error naming what was `expected`, and so is an
    /// `Abort` from the peer.
    pub async fn recv(&mut self, expected: &'static str) -> Result<Received, WireError> {
        match self.recv_or_eof().await? {
            None => Err(WireError::Closed { expected }),
            Some(Received {
                message: Message::Abort { reason },
                ..
            }) => Err(WireError::Refused(reason)),
            Some(received) => Ok(received),
        }
    }

    /// Asks the kernel to attach the sender's credentials to every message we receive.
    pub fn receive_credentials(&self) -> io::Result<()> {
        Ok(setsockopt(&self.fd, sockopt::PassCred, &true)?)
    }

    /// The credentials of the peer, as the kernel recorded them (`SO_PEERCRED`). For a
    /// `socketpair`, these are the creator's on both ends.
    pub fn peer_credentials(&self) -> io::Result<UnixCredentials> {
        Ok(getsockopt(&self.fd, sockopt::PeerCredentials)?)
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}
