//! The handoff protocol: messages, the versioned JSON manifest, descriptor passing with
//! `SCM_RIGHTS`, and the checks a receiver makes before adopting a socket.
//!
//! Nothing here knows about processes or HTTP: every part is tested over an in-process
//! socket pair.

mod ancillary;
mod channel;
mod error;
mod fd_passing;
mod manifest;
mod message;
pub mod migration;
mod peer;
mod transfer;
mod verify;

pub use channel::{pair, Channel, CHANNEL_FD_VAR};
pub use error::WireError;
pub use fd_passing::Received;
pub use manifest::{Inode, SocketEntry, SocketKind};
pub(crate) use message::Bounded;
pub use message::{check_version, Message, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
pub use migration::{verify_connection, ConnectionEntry, Protocol, RefusedConnection};
pub use peer::{check_same_user, check_sender};
pub use transfer::{recv_sockets, send_sockets};
pub use verify::verify;
