//! The messages of the handoff protocol, one JSON object per `SOCK_SEQPACKET` datagram.
//!
//! ```text
//! successor ◀── Hello ─────────────────── predecessor   (carries the new generation)
//! successor ◀── Manifest ──────────────── predecessor
//! successor ◀── Batch × n (+ SCM_RIGHTS)─ predecessor
//! successor ◀── State (+ SCM_RIGHTS) ──── predecessor   (optional: the application's state)
//! successor ── Hello ───────────────────▶ predecessor   (with SCM_CREDENTIALS)
//! successor ── Accepted | Rejected ─────▶ predecessor
//! successor ── ExtendStartup × n ───────▶ predecessor   (optional: more time, bounded)
//! successor ── Ready ───────────────────▶ predecessor
//! successor ◀── Commit | Abort ────────── predecessor   (the point of no return)
//! successor ── Leaving ─────────────────▶ predecessor   (later: a final stop, or a handover)
//!          (EOF when the predecessor has drained: it half-closes; or exited)
//! ```
//!
//! The predecessor sends its part as soon as it has spawned the successor, without waiting
//! for the successor's hello: the datagrams wait in the socket's buffer, so the successor
//! never waits on a round trip through a busy predecessor. Each side checks the other's
//! `Hello` (version; and on the predecessor's side the sender's pid and user) before acting
//! on anything else it received; `Hello` keeps its shape in every protocol version.
//!
//! Either side may send `Abort` instead of its next message and close the channel.
//!
//! After the commit, the predecessor may migrate established connections on the same
//! channel (`Migrate`, answered by `Migrated`; see [`migration`](super::migration)). A
//! predecessor that gives up waiting for a `Migrated` says so with an `Abort` naming the
//! batches before it drains its copies, and the channel stays open: the successor then
//! closes its copies of those batches, while a channel that closes without that notice
//! means the predecessor is gone, and its copies with it.
//!
//! A predecessor on probation (`Builder::probation`) takes the service back if its successor
//! dies: the successor says `Leaving` when it stops on purpose (a final stop, or its own
//! commit to a successor), so that only a death without that word is taken back. The
//! predecessor half-closes the channel once its drains are over: the successor reads EOF
//! and may upgrade while its predecessor waits out its probation.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::json::Bounded;
use super::{ConnectionEntry, Elder, RefusedConnection, SocketEntry, WireError};

/// The version of this protocol. Both sides refuse a peer that speaks another one.
///
/// 3 added `ExtendStartup`; 4 added `Migrate` and `Migrated`; 5 added `Leaving` and the
/// half-close after the drain, and the application's state (`Hello`'s `state`, `State`).
pub const PROTOCOL_VERSION: u32 = 5;

/// The largest message either side sends or accepts. A batch of 200 entries with long names
/// and Unix paths stays well under it, and it fits the default `SO_SNDBUF` of a Unix socket.
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;

/// At most this many descriptors travel in one message. The kernel refuses more than 253
/// (`SCM_MAX_FD`) per `sendmsg`; staying below leaves room and keeps batches small.
pub const MAX_FDS_PER_MESSAGE: usize = 200;

fn is_false(value: &bool) -> bool {
    !*value
}

/// One message of the handoff protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// The first message in each direction.
    Hello {
        /// The protocol version the sender speaks.
        protocol: u32,
        /// The sender's process id.
        pid: u32,
        /// From the predecessor: the generation number the successor will have.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        generation: Option<u64>,
        /// From the predecessor: the application's state stream follows the sockets (a
        /// [`State`](Message::State) message). A successor that does not know the field
        /// ignores it and the message, and starts cold.
        #[serde(default, skip_serializing_if = "is_false")]
        state: bool,
    },
    /// Announces the sockets that follow, in `batches` messages.
    Manifest {
        /// The generation of the sender.
        generation: u64,
        /// How many sockets follow, over all batches.
        sockets: usize,
        /// How many `Batch` messages follow.
        batches: usize,
    },
    /// Up to [`MAX_FDS_PER_MESSAGE`] sockets, their descriptors attached in the same order.
    Batch {
        /// The position of this batch, from 0.
        index: usize,
        /// One entry per attached descriptor.
        sockets: Vec<SocketEntry>,
    },
    /// From the predecessor, after the batches when its `Hello` said `state`: the
    /// application's state stream, a connected Unix stream socket, attached. The predecessor
    /// writes on its end until it has written everything or the upgrade ends.
    State,
    /// The successor checked every descriptor and took them.
    Accepted,
    /// The successor refused the handoff and closed everything it received.
    Rejected {
        /// Why, naming the socket at fault.
        reason: String,
    },
    /// The successor is healthy but slow to start: it asks for its deadline to be at least
    /// this far from now. The predecessor never moves it past its configured maximum, nor
    /// closer; sent between `Accepted` and `Ready`, as often as needed.
    ExtendStartup {
        /// Milliseconds from now.
        more_ms: u64,
    },
    /// The successor's application is serving: the predecessor may stop accepting.
    Ready {
        /// Milliseconds the successor spent from its start to ready.
        #[serde(default)]
        startup_ms: u64,
    },
    /// The predecessor has stopped accepting and hands the successor every path and the PID
    /// file: from here on the upgrade cannot be undone. Sent only in answer to `Ready`, and
    /// only if the predecessor has not given up (timeout, cancel, stop) first.
    Commit {
        /// The predecessor's upgrade counters, this upgrade and its timings included, for the
        /// successor's `status` to go on from (opaque to the protocol; absent from a peer that
        /// keeps none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        counters: Option<serde_json::Value>,
        /// The generations older than the successor that still drain: the predecessor's own
        /// elders, and the predecessor itself, oldest first. A peer that does not know the
        /// field ignores it (the successor then counts its predecessor alone).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        elders: Vec<Elder>,
    },
    /// The sender gives up; the channel closes after this.
    Abort {
        /// Why.
        reason: String,
    },
    /// After the commit, from the predecessor: established connections, their descriptors
    /// attached in the same order (see [`wire::migration`](super::migration)).
    Migrate {
        /// The position of this batch, from 0.
        index: u64,
        /// One entry per attached descriptor.
        connections: Vec<ConnectionEntry>,
    },
    /// The successor's answer to `Migrate`: it took every connection of batch `index` but the
    /// refused ones, which the predecessor drains.
    Migrated {
        /// The batch answered.
        index: u64,
        /// The connections not taken.
        refused: Vec<RefusedConnection>,
    },
    /// After the commit, from the successor: it stops serving on purpose (a final stop, or
    /// a commit to a successor of its own). Its predecessor, on probation, will not take the
    /// service back when it exits.
    Leaving {
        /// Why, for the predecessor's log.
        reason: String,
    },
}

impl Message {
    /// The message's type as it appears on the wire, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Manifest { .. } => "manifest",
            Self::Batch { .. } => "batch",
            Self::State => "state",
            Self::Accepted => "accepted",
            Self::Rejected { .. } => "rejected",
            Self::ExtendStartup { .. } => "extend_startup",
            Self::Ready { .. } => "ready",
            Self::Commit { .. } => "commit",
            Self::Abort { .. } => "abort",
            Self::Migrate { .. } => "migrate",
            Self::Migrated { .. } => "migrated",
            Self::Leaving { .. } => "leaving",
        }
    }

    /// Serializes the message, refusing one too large to send as a single datagram.
    ///
    /// # Errors
    ///
    /// [`WireError::MessageTooLarge`] as soon as the encoding passes [`MAX_MESSAGE_BYTES`]:
    /// the rest is not encoded, so a huge message costs no huge buffer (`bytes` then says
    /// how far the encoding got, not the full size).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Bounded::new(MAX_MESSAGE_BYTES);
        match serde_json::to_writer(&mut out, self) {
            Ok(()) => Ok(out.bytes),
            Err(e) if e.is_io() => Err(WireError::MessageTooLarge {
                bytes: out.bytes.len() + 1,
            }),
            Err(e) => Err(WireError::Malformed(e)),
        }
    }

    /// Parses a message received from the peer.
    ///
    /// # Errors
    ///
    /// [`WireError::MessageTooLarge`] for more than [`MAX_MESSAGE_BYTES`] (refused before
    /// parsing anything), [`WireError::Malformed`] for anything that is not a message of this
    /// protocol.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(WireError::MessageTooLarge { bytes: bytes.len() });
        }
        if let Some(message) = decode_in_one_pass(bytes) {
            return Ok(message);
        }
        serde_json::from_slice(bytes).map_err(WireError::Malformed)
    }
}

/// The two messages that come by the thousand (a batch of sockets, a batch of migrated
/// connections) decoded in one pass, as this crate writes them (an object, its tag first);
/// `None` for any other message, form or fault, which the general decoder then decodes or
/// refuses. An internally tagged enum buffers a whole message before it knows its type: for
/// a batch of 200 entries that doubled the cost of decoding it.
fn decode_in_one_pass(bytes: &[u8]) -> Option<Message> {
    // The tag is a declared field, so that a second `type` is refused as the general decoder
    // refuses it; its value is the one the prefix shows.
    #[derive(Deserialize)]
    struct Batch {
        #[serde(rename = "type")]
        _type: IgnoredAny,
        index: usize,
        sockets: Vec<SocketEntry>,
    }
    #[derive(Deserialize)]
    struct Migrate {
        #[serde(rename = "type")]
        _type: IgnoredAny,
        index: u64,
        connections: Vec<ConnectionEntry>,
    }
    if bytes.starts_with(br#"{"type":"batch","#) {
        let Batch { index, sockets, .. } = serde_json::from_slice(bytes).ok()?;
        return Some(Message::Batch { index, sockets });
    }
    if bytes.starts_with(br#"{"type":"migrate","#) {
        let Migrate { index, connections, .. } = serde_json::from_slice(bytes).ok()?;
        return Some(Message::Migrate { index, connections });
    }
    None
}

/// Checks the protocol version a peer announced.
pub fn check_version(theirs: u32) -> Result<(), WireError> {
    if theirs == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(WireError::UnsupportedVersion {
            ours: PROTOCOL_VERSION,
            theirs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::SocketKind;

    /// What the one-pass decoder takes, the general one takes alike; what it leaves, the
    /// general one decides (and names the problem).
    #[test]
    fn the_one_pass_decoder_agrees_with_the_general_one_and_leaves_it_the_rest() {
        let address: std::net::SocketAddr = "127.0.0.1:80".parse().unwrap();
        let batch = Message::Batch {
            index: 7,
            sockets: vec![SocketEntry {
                name: "http".into(),
                kind: SocketKind::TcpListener { address },
            }],
        };
        let migrate = Message::Migrate {
            index: 3,
            connections: vec![crate::wire::ConnectionEntry {
                listener: "echo".into(),
                protocol: crate::wire::Protocol::RawTcp,
                local: address,
                peer: address,
                state: crate::wire::migration::State(serde_json::json!({"n": 1})),
                leftover: b"ab".to_vec(),
            }],
        };
        for message in [&batch, &migrate] {
            let bytes = message.encode().unwrap();
            assert_eq!(decode_in_one_pass(&bytes).as_ref(), Some(message));
            assert_eq!(&serde_json::from_slice::<Message>(&bytes).unwrap(), message);
        }
        let unusual: [&[u8]; 9] = [
            br#"{"type":"batch","index":0,"sockets":[{"name":"x","kind":"udp"}]}"#,
            br#"{"type":"batch","index":0,"sockets":[],"type":"batch"}"#,
            br#"{"type":"migrate","index":0,"connections":[],"type":"hello"}"#,
            br#"{"type":{"migrate":null},"index":0,"connections":[]}"#,
            br#"["migrate",0,[]]"#,
            br#"{"index":0,"type":"migrate","connections":[]}"#,
            br#"{"type":"migrate","index":0,"connections":[]} trailing"#,
            br#"{"type":"migrate","index":-1,"connections":[]}"#,
            br#"{"type":"batch","index":0,"sockets":[],"extra":true}"#,
        ];
        for bytes in unusual {
            let general = serde_json::from_slice::<Message>(bytes).ok();
            if let Some(message) = decode_in_one_pass(bytes) {
                assert_eq!(Some(message), general, "{}", String::from_utf8_lossy(bytes));
            }
        }
        let bad = unusual[0];
        assert_eq!(decode_in_one_pass(bad), None);
        let err = Message::decode(bad).unwrap_err().to_string();
        assert!(err.contains("missing field `address`"), "{err}");
        let hello = Message::Hello {
            protocol: 1,
            pid: 2,
            generation: None,
            state: false,
        };
        assert_eq!(decode_in_one_pass(&hello.encode().unwrap()), None);
    }

    #[test]
    fn every_message_round_trips() {
        let messages = [
            Message::Hello {
                protocol: 1,
                pid: 42,
                generation: Some(3),
                state: false,
            },
            Message::Hello {
                protocol: 1,
                pid: 43,
                generation: None,
                state: false,
            },
            Message::Manifest {
                generation: 2,
                sockets: 1,
                batches: 1,
            },
            Message::Batch {
                index: 0,
                sockets: vec![SocketEntry {
                    name: "dns".into(),
                    kind: SocketKind::Udp {
                        address: "[::1]:5353".parse().unwrap(),
                    },
                }],
            },
            Message::Accepted,
            Message::Rejected { reason: "no".into() },
            Message::ExtendStartup { more_ms: 1500 },
            Message::Ready { startup_ms: 7 },
            Message::Commit {
                counters: None,
                elders: Vec::new(),
            },
            Message::Abort { reason: "bye".into() },
        ];
        for message in messages {
            let bytes = message.encode().unwrap();
            assert_eq!(Message::decode(&bytes).unwrap(), message);
        }
    }

    #[test]
    fn the_wire_format_is_readable_json() {
        let bytes = Message::Manifest {
            generation: 2,
            sockets: 5,
            batches: 1,
        }
        .encode()
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"type":"manifest","generation":2,"sockets":5,"batches":1}"#
        );
    }

    #[test]
    fn another_version_is_refused_with_both_numbers() {
        // Protocol 4 had no `Leaving`: a predecessor speaking it would take it for garbage.
        let err = check_version(4).unwrap_err();
        assert!(matches!(err, WireError::UnsupportedVersion { ours: 5, theirs: 4 }));
        assert_eq!(err.to_string(), "peer speaks handoff protocol 4, this process speaks 5");
        check_version(PROTOCOL_VERSION).unwrap();
    }

    #[test]
    fn garbage_and_unknown_types_are_malformed() {
        assert!(matches!(
            Message::decode(b"{\"type\":\"launch\"}"),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(Message::decode(b"\x00\x01"), Err(WireError::Malformed(_))));
    }

    #[test]
    fn an_oversized_message_is_refused_before_sending() {
        let message = Message::Abort {
            reason: "x".repeat(MAX_MESSAGE_BYTES),
        };
        assert!(matches!(message.encode(), Err(WireError::MessageTooLarge { .. })));
    }

    #[test]
    fn an_oversized_message_is_refused_before_parsing() {
        let mut bytes = br#"{"type":"abort","reason":""#.to_vec();
        bytes.resize(MAX_MESSAGE_BYTES, b'x');
        bytes.extend_from_slice(br#""}"#);
        let err = Message::decode(&bytes).unwrap_err();
        assert!(
            matches!(err, WireError::MessageTooLarge { bytes } if bytes == MAX_MESSAGE_BYTES + 2),
            "{err}"
        );
        // At the limit exactly, it is a message.
        bytes.truncate(MAX_MESSAGE_BYTES - 2);
        bytes.extend_from_slice(br#""}"#);
        assert!(matches!(Message::decode(&bytes), Ok(Message::Abort { .. })));
    }

    #[test]
    fn a_message_of_the_largest_size_encodes() {
        let overhead = Message::Abort { reason: String::new() }.encode().unwrap().len();
        let message = Message::Abort {
            reason: "x".repeat(MAX_MESSAGE_BYTES - overhead),
        };
        assert_eq!(message.encode().unwrap().len(), MAX_MESSAGE_BYTES);
    }
}
