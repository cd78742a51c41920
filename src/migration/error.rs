//! [`MigrationError`] and [`Returned`]: why a connection did not move, and the stream back.

use tokio::net::TcpStream;

/// Why a connection was not migrated. The connection itself comes back in a [`Returned`],
/// to be drained the old way.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// No successor takes connections: this process stops rather than hands over, or the
    /// drain was not told of a successor ([`Drain::migrate_with`](crate::drain::Drain::migrate_with)).
    #[error("no successor takes migrated connections")]
    NotMigrating,
    /// The application's state is larger than
    /// [`MAX_STATE_BYTES`](crate::migration::MAX_STATE_BYTES) once serialized.
    #[error("the connection's state is larger than {limit} bytes of JSON")]
    StateTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The application's state could not be serialized as JSON.
    #[error("the connection's state cannot be serialized: {0}")]
    StateMalformed(#[source] serde_json::Error),
    /// More unconsumed bytes than
    /// [`MAX_LEFTOVER_BYTES`](crate::migration::MAX_LEFTOVER_BYTES).
    #[error("{bytes} unconsumed bytes, more than the limit of {limit}")]
    LeftoverTooLarge {
        /// How many were handed over.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// The successor refused this connection (no receiver for its listener or protocol, a
    /// state it cannot read, a socket that is not what was declared), and said why.
    #[error("the successor refused the connection: {reason}")]
    Refused {
        /// The successor's reason.
        reason: String,
    },
    /// The successor did not acknowledge the batch: it exited, the channel failed, or it did
    /// not answer in time. It holds no copy of the connection.
    #[error("the successor did not take the connection: {reason}")]
    SuccessorGone {
        /// What failed: the channel's error.
        reason: String,
    },
    /// The connection's entry (state, unconsumed bytes, listener name) does not fit in one
    /// message of the protocol.
    #[error("the connection's entry of {bytes} bytes does not fit in a handoff message")]
    EntryTooLarge {
        /// How far its encoding got.
        bytes: usize,
    },
    /// The connection's addresses could not be read (it was reset, say).
    #[error("the connection cannot be migrated: {0}")]
    Io(#[from] std::io::Error),
}

/// A connection that did not move, handed back to its task with the reason: drain it as
/// without migration (this process is its only owner).
#[derive(Debug)]
pub struct Returned {
    /// The stream, as it was handed over.
    pub stream: TcpStream,
    /// Why it did not move.
    pub error: MigrationError,
}
