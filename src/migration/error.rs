//! [`MigrationError`] and [`Returned`]: why a connection did not move, and the stream back,
//! for every protocol.

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
    /// The connection uses a compression extension (a WebSocket's permessage-deflate),
    /// whose state does not move.
    #[error("the connection uses a compression extension, whose state does not move")]
    Compressed,
    /// More than [`MAX_LEFTOVER_BYTES`](crate::migration::MAX_LEFTOVER_BYTES) of a message
    /// not complete yet have been read.
    #[error("more than {limit} bytes of an unfinished message are read")]
    UnfinishedMessageTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The connection is TLS (`drain::tls`, feature `tls`): its session keys stay in this
    /// process, so it is drained, never migrated.
    #[error("the connection is TLS, whose session keys do not move")]
    Tls,
    /// The client closed the connection, or it failed, before it could move.
    #[error("the connection closed or failed before it could move")]
    Closed,
    /// Flushing what was written failed.
    #[error("flushing the connection failed: {0}")]
    Flush(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The drain deadline came while flushing what was written.
    #[error("the drain deadline came while flushing the connection")]
    Deadline,
    /// The drain deadline came before the connection was sent to the successor: close it.
    #[error("the drain deadline came before the connection was sent to the successor")]
    NotSentByDeadline,
    /// The connection's addresses could not be read (it was reset, say).
    #[error("the connection cannot be migrated: {0}")]
    Io(#[from] std::io::Error),
}

/// A connection that did not move, handed back to its task with the reason: drain it as
/// without migration (this process is its only owner). `S` is what was handed over: a
/// `TcpStream`, or a WebSocket (reading again, every write flushed if the flush succeeded).
#[derive(Debug)]
#[non_exhaustive]
pub struct Returned<S = TcpStream> {
    /// The stream, as it was handed over.
    pub stream: S,
    /// Why it did not move.
    pub error: MigrationError,
}
