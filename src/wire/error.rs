//! What can go wrong on the handoff channel.

use std::io;

/// An error of the handoff protocol: transport, framing, version, credentials or a socket
/// that is not what the manifest says.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The channel itself failed.
    #[error("handoff channel: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the channel where a message was expected.
    #[error("handoff channel closed by the peer while waiting for {expected}")]
    Closed {
        /// The message that was expected.
        expected: &'static str,
    },
    /// A message was not valid JSON for this protocol.
    #[error("malformed handoff message: {0}")]
    Malformed(#[source] serde_json::Error),
    /// A message is larger than the protocol allows (128 KiB).
    #[error(
        "handoff message of {bytes} bytes exceeds the limit of {} bytes",
        super::MAX_MESSAGE_BYTES
    )]
    MessageTooLarge {
        /// Its size.
        bytes: usize,
    },
    /// The kernel cut a message or its descriptors short (`MSG_TRUNC` or `MSG_CTRUNC`).
    #[error("handoff message truncated by the kernel ({what})")]
    Truncated {
        /// What was cut: "data" or "descriptors".
        what: &'static str,
    },
    /// The control data (descriptors, credentials) the kernel returned could not be read;
    /// every descriptor read before the fault was closed.
    #[error("malformed control data on the handoff channel: {0}")]
    MalformedControl(&'static str),
    /// The peer speaks another protocol version.
    #[error("peer speaks handoff protocol {theirs}, this process speaks {ours}")]
    UnsupportedVersion {
        /// Ours.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
    /// A message arrived out of order.
    #[error("expected a {expected} message, got {got}")]
    Unexpected {
        /// What the protocol called for.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// A message carried another number of descriptors than its entries announce.
    #[error("batch {batch}: {entries} sockets described but {fds} descriptors attached")]
    FdCountMismatch {
        /// The batch index.
        batch: usize,
        /// Entries in the batch.
        entries: usize,
        /// Descriptors received.
        fds: usize,
    },
    /// The batches do not add up to what the manifest announced.
    #[error("manifest announced {announced} sockets in {batches} batches, received {received}")]
    IncompleteManifest {
        /// Sockets announced.
        announced: usize,
        /// Batches announced.
        batches: usize,
        /// Sockets received.
        received: usize,
    },
    /// The manifest announced counts no sender can produce: an empty batch, or more sockets
    /// than its batches can carry.
    #[error("manifest announces {sockets} sockets in {batches} batches, which cannot be")]
    InconsistentManifest {
        /// Sockets announced.
        sockets: usize,
        /// Batches announced.
        batches: usize,
    },
    /// Two entries of the manifest share a name.
    #[error("manifest names two sockets `{0}`")]
    DuplicateName(String),
    /// The peer is not who it must be (another user, or not the process we spawned).
    #[error("refusing handoff peer: {0}")]
    Peer(String),
    /// A received descriptor is not the socket its manifest entry describes.
    #[error("{socket}: {problem}")]
    SocketMismatch {
        /// The entry, as "TCP listener `http` (127.0.0.1:8081)".
        socket: String,
        /// What was found instead.
        problem: String,
    },
    /// The peer refused the handoff or gave up, and said why.
    #[error("peer refused the handoff: {0}")]
    Refused(String),
    /// The peer did not send what was awaited in time.
    #[error("no {waiting_for} from the peer within {after:?}")]
    TimedOut {
        /// What was awaited.
        waiting_for: &'static str,
        /// How long we waited.
        after: std::time::Duration,
    },
}

impl WireError {
    /// Whether the error says the peer's end of the channel is closed: an EOF where a
    /// message was expected, a broken pipe on sending, or a reset on receiving (a Unix socket
    /// closed with unread messages in its queue resets its peer once, then reads EOF).
    pub fn is_peer_gone(&self) -> bool {
        match self {
            Self::Closed { .. } => true,
            Self::Io(e) => matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset),
            _ => false,
        }
    }
}
