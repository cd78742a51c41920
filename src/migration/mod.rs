//! Live migration: established connections move to the successor with their state and the
//! bytes read but not consumed, instead of being drained. Opt-in, per connection.
//!
//! After the commit, the old process's drain starts as usual; a connection whose task asks
//! with [`TrackedConnection::turn_to_close_or_migrate`](crate::drain::TrackedConnection::turn_to_close_or_migrate) is told [`Turn::Migrate`](crate::drain::Turn::Migrate), stops at a
//! safe point of its own loop (nothing half-written, nothing read that is not in its state or
//! its leftover bytes), and hands its stream over with
//! [`TrackedConnection::migrate`](crate::drain::TrackedConnection::migrate). The library sends it (descriptor, protocol, listener
//! name, state, leftover) in batches over the handoff channel; the old process keeps its copy
//! until the successor acknowledges the batch. A connection the successor refuses, or that
//! it never acknowledges (it died, or did not answer within 5 s), comes back as a
//! [`Returned`] to be drained the old way: every connection ends migrated or drained, never
//! both, never neither. Batches go without waiting for each other's acknowledgement.
//!
//! Descriptors that only one process holds are that process's: a successor whose
//! acknowledgement cannot be sent closes its copies if the old process says it gave up on
//! them (it drains its own), and keeps and serves them if the old process is gone (killed,
//! or exited at its drain deadline before reading the acknowledgement). A task waiting in
//! [`TrackedConnection::migrate`](crate::drain::TrackedConnection::migrate) returns by the
//! drain deadline: a connection not sent yet comes back, one on its way is the successor's.
//!
//! The successor registers, before [`Handoff::ready`](crate::Handoff::ready), what resumes
//! the connections of a listener: [`Drain::resume_migrated`](crate::drain::Drain::resume_migrated)
//! with a [`DrainStrategy`](crate::drain::DrainStrategy) for [`Resumed`] connections. A
//! resumed connection is tracked by that drain like an accepted one, so it migrates again at
//! the next upgrade.
//!
//! # Examples
//!
//! An echo that migrates its connections (see `examples/tcp_echo.rs` for the whole server):
//!
//! ```no_run
//! use handover::drain::{tcp, DrainStrategy, TrackedConnection, Turn};
//! use handover::migration::{Handover, Protocol, Resumed};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tokio::net::TcpStream;
//!
//! struct Echo;
//!
//! async fn echo(mut stream: TcpStream, mut echoed: u64, connection: TrackedConnection) {
//!     let mut buf = [0; 4096];
//!     let turn = loop {
//!         tokio::select! {
//!             read = stream.read(&mut buf) => match read {
//!                 Ok(0) | Err(_) => return,
//!                 // Echoed whole before the turn is looked at again: a safe point.
//!                 Ok(n) => match connection.until_deadline(stream.write_all(&buf[..n])).await {
//!                     Some(Ok(())) => echoed += n as u64,
//!                     Some(Err(_)) | None => return,
//!                 },
//!             },
//!             turn = connection.turn_to_close_or_migrate() => break turn,
//!         }
//!     };
//!     if turn == Turn::Migrate {
//!         let handover = Handover { listener: "echo", protocol: Protocol::RawTcp, state: &echoed, leftover: &[] };
//!         match connection.migrate(stream, handover).await {
//!             Ok(()) => return, // the successor serves it now
//!             Err(returned) => stream = returned.stream, // drain it as before
//!         }
//!     }
//!     let _ = tcp::finish(stream, &connection).await;
//! }
//!
//! impl DrainStrategy<TcpStream> for Echo {
//!     async fn serve(&self, stream: TcpStream, connection: TrackedConnection) {
//!         echo(stream, 0, connection).await
//!     }
//! }
//!
//! impl DrainStrategy<Resumed<u64>> for Echo {
//!     async fn serve(&self, resumed: Resumed<u64>, connection: TrackedConnection) {
//!         // `resumed.leftover` is empty: this echo hands over only at a safe point.
//!         echo(resumed.stream, resumed.state, connection).await
//!     }
//! }
//! ```
//!
//! # Per protocol
//!
//! - **Raw TCP**: as above (`examples/tcp_echo.rs --migrate`). No byte is lost: the task
//!   flushes its writes and stops reading; what it has not read stays in the kernel's buffer
//!   for the successor, what it read but did not consume travels as `leftover`.
//! - **WebSocket**: [`drain::websocket`](crate::drain::websocket) (`accept`, `migrate`,
//!   `resume`, `stop_reading`, `finish`): a member moves at a message boundary, with the
//!   bytes of an unfinished message; no message is lost or duplicated either way.
//! - **HTTP/1.1**: [`http::Server::migrate`](crate::drain::http::Server::migrate) and
//!   [`http::Server::resume_migrated`](crate::drain::http::Server::resume_migrated): a
//!   keep-alive connection moves between two requests ([`drain::http`](crate::drain::http)
//!   says how). HTTP/2 is drained (GOAWAY).
//!
//! # What it guarantees
//!
//! Every connection ends migrated or drained, never both, never neither. Connections go in
//! batches of up to 200 (descriptor, protocol, listener name, state, leftover), one batch at a
//! time. The successor checks each descriptor (an established TCP socket: a stream, not
//! listening, connected, of the declared family, between the declared addresses) and its
//! state, acknowledges the batch, and only then serves them. The old process keeps its copy
//! until the acknowledgement. A connection the successor refuses (no receiver registered for
//! its listener, a state it cannot read, a socket that is not what was declared) comes back
//! to its task as `Err(`[`Returned`]`)` with a typed [`MigrationError`], and is drained the
//! old way; so is every connection not yet acknowledged when the successor dies, and every
//! one after. If the acknowledgement does not come within 5 s, the old process stops
//! receiving on the channel before looking a last time, so that a late acknowledgement fails
//! to send and the successor closes its copies unused.
//!
//! The successor's `status` shows what it received (`migrated_in`: batches, connections taken
//! and refused), and each old process's `drained` log line (and [`DrainReport::migrated`](crate::drain::DrainReport::migrated))
//! how many of its connections moved.
//!
//! # Application state that spans connections
//!
//! Moving each connection is not always enough: a chat room must stay one room, with no
//! message read by the old process after some members have left it.
//! [`Handoff::migration_ended`](crate::Handoff::migration_ended) resolves, in the successor,
//! once the predecessor can migrate nothing more, with how many connections of a listener were
//! resumed: a room can wait for them before it opens. `examples/ws_chat.rs` does it (the old
//! room stops every member at a barrier before any moves; the new one opens once every
//! migrated member has joined), and `tests/ws_migration.rs` checks that every member receives
//! every message once, in per-sender order, through ten upgrades.
//!
//! # Limits
//!
//! Only connections whose task opts in move; one that never asks is drained as before, at the
//! same idle cost. Raw TCP connections (IPv4 and IPv6) move; TLS connections are drained
//! (their session keys do not move: `drain::tls` tells them [`Turn::Close`](crate::drain::Turn::Close),
//! `migrate` refuses them with [`MigrationError::Tls`], and the old process logs it once). The state is at most [`MAX_STATE_BYTES`] of JSON, the
//! leftover at most [`MAX_LEFTOVER_BYTES`]; a larger state, or one that does not serialize,
//! is refused before sending ([`MigrationError::StateTooLarge`],
//! [`MigrationError::StateMalformed`]) and drained. A connection handed to the successor
//! after it has started to stop is drained there.

mod error;
mod inbound;
mod outbound;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use serde::Serialize;
use tokio::net::TcpStream;

pub use crate::wire::Protocol;
pub use error::{MigrationError, Returned};
pub(crate) use inbound::{Inbound, Receiver};
pub(crate) use outbound::{Heard, Outbound, PendingOutbound};

use crate::wire::migration::State;
pub use crate::wire::migration::{MAX_LEFTOVER_BYTES, MAX_STATE_BYTES};
use crate::wire::{Bounded, ConnectionEntry};

/// What a connection hands over with its stream: see [`TrackedConnection::migrate`](crate::drain::TrackedConnection::migrate).
#[derive(Debug, Clone, Copy)]
pub struct Handover<'a, T: ?Sized> {
    /// The name of the listener it was accepted from: the successor resumes it with what it
    /// registered for that name.
    pub listener: &'a str,
    /// The protocol it speaks.
    pub protocol: Protocol,
    /// The application's state for it, serialized as JSON (at most
    /// [`MAX_STATE_BYTES`]).
    pub state: &'a T,
    /// The bytes read from the stream but not consumed, which the successor consumes first.
    pub leftover: &'a [u8],
}

impl<T: Serialize + ?Sized> Handover<'_, T> {
    /// The entry that travels for `stream`, after every check this side can make.
    pub(crate) fn entry(&self, stream: BorrowedFd<'_>) -> Result<ConnectionEntry, MigrationError> {
        if self.leftover.len() > MAX_LEFTOVER_BYTES {
            return Err(MigrationError::LeftoverTooLarge {
                bytes: self.leftover.len(),
                limit: MAX_LEFTOVER_BYTES,
            });
        }
        let mut json = Bounded::new(MAX_STATE_BYTES);
        if let Err(e) = serde_json::to_writer(&mut json, self.state) {
            return Err(if e.is_io() {
                MigrationError::StateTooLarge { limit: MAX_STATE_BYTES }
            } else {
                MigrationError::StateMalformed(e)
            });
        }
        let state = serde_json::from_slice(&json.bytes).map_err(MigrationError::StateMalformed)?;
        let socket = socket2::SockRef::from(&stream);
        let ip = |address: socket2::SockAddr| {
            address
                .as_socket()
                .ok_or_else(|| std::io::Error::other("not an IP socket"))
        };
        Ok(ConnectionEntry {
            listener: self.listener.to_owned(),
            protocol: self.protocol,
            local: ip(socket.local_addr()?)?,
            peer: ip(socket.peer_addr()?)?,
            state: State(state),
            leftover: self.leftover.to_vec(),
        })
    }
}

/// A connection migrated from the predecessor, as the successor resumes it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Resumed<S> {
    /// The stream: the same kernel socket, with every byte the predecessor did not read still
    /// in its receive buffer.
    pub stream: TcpStream,
    /// The state the predecessor handed over.
    pub state: S,
    /// The bytes the predecessor had read but not consumed: consume them first.
    pub leftover: Vec<u8>,
}

/// What travels for one connection: its stream, which comes back if it does not move; or a
/// duplicate of its descriptor, whose owner keeps the stream whole either way (a WebSocket)
/// and which is only closed then (no registration with the runtime to make and undo).
#[derive(Debug)]
pub(crate) enum Handed {
    /// The stream itself.
    Stream(TcpStream),
    /// A duplicate of a stream's descriptor.
    #[cfg_attr(not(feature = "websocket"), allow(dead_code))] // the WebSocket hand-over's
    Duplicate(OwnedFd),
}

impl AsFd for Handed {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Stream(stream) => stream.as_fd(),
            Self::Duplicate(fd) => fd.as_fd(),
        }
    }
}

/// A checked connection's resumption, started once its batch is acknowledged.
pub(crate) type Resume = Box<dyn FnOnce() + Send>;

/// This process's ends of the migration: the outbound one once it commits to a successor,
/// the receivers of what a predecessor sends.
#[derive(Debug, Default)]
pub(crate) struct Endpoints {
    outbound: Mutex<Option<Outbound>>,
    inbound: Inbound,
}

impl Endpoints {
    /// Just before a commit: the way to that successor, in place before anyone can learn of
    /// the commit. Start the engine once committed; dropped, the way is closed.
    pub(crate) fn prepare_outbound(&self) -> PendingOutbound {
        let (outbound, pending) = Outbound::new();
        *self.outbound.lock().unwrap_or_else(|p| p.into_inner()) = Some(outbound);
        pending
    }

    /// The way to the committed successor, if any.
    pub(crate) fn outbound(&self) -> Option<Outbound> {
        self.outbound.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The receivers of migrated connections.
    pub(crate) fn inbound(&self) -> &Inbound {
        &self.inbound
    }
}
