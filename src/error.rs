//! The crate's error type.

use std::io;

use crate::wire::WireError;

/// An error from the registry or the lifecycle. Every variant that concerns a socket names it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket could not be created, configured or bound.
    #[error("{socket}: {source}")]
    Bind {
        /// The socket, as "TCP listener `http` (127.0.0.1:8081)".
        socket: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A name was registered twice.
    #[error("a socket named `{0}` is already registered")]
    DuplicateName(String),
    /// A socket handed to [`ListenerRegistry::register`](crate::ListenerRegistry::register)
    /// is of a kind the registry cannot hand over.
    #[error("socket `{name}`: {problem}")]
    Unsupported {
        /// Its name.
        name: String,
        /// Why.
        problem: String,
    },
    /// A socket was claimed after [`Handoff::ready`](crate::Handoff::ready), but the socket
    /// inherited (or activated) under that name or at that address was closed then, since
    /// nothing had claimed it. Binding anew would lose the clients queued on it, and collide
    /// with the predecessor while it drains: the rule is to claim every socket before
    /// `ready()`.
    #[error("socket `{name}` claimed after ready(): {socket} was inherited and closed at ready(), since nothing had claimed it; claim every socket before ready()")]
    ClaimedAfterReady {
        /// The name claimed.
        name: String,
        /// The released socket, as "TCP listener `http` (127.0.0.1:8081)".
        socket: String,
    },
    /// Receiving the sockets from the predecessor failed; we refused them all.
    #[error("inheriting sockets from the predecessor: {0}")]
    Inherit(#[source] WireError),
    /// Telling the predecessor we are ready failed.
    #[error("reporting ready to the predecessor: {0}")]
    Ready(#[source] WireError),
    /// A stop was requested before this process was ready, and before any predecessor
    /// committed to it: it holds nothing, and should exit. (A stop after the commit is no
    /// error: see [`Handoff::ready`](crate::Handoff::ready).)
    #[error("a stop was requested before this process was ready")]
    Stopped,
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
