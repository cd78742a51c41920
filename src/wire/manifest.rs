//! The manifest: a versioned, self-describing JSON description of every socket handed over.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One socket in the manifest: its name, and what the receiver must find when it inspects the
/// descriptor that travels with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketEntry {
    /// The name the application registered the socket under (`"http"`).
    pub name: String,
    /// What kind of socket it is, and its local address.
    #[serde(flatten)]
    pub kind: SocketKind,
}

/// The kind of a socket and its local address, as the sender saw them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SocketKind {
    /// A listening TCP socket.
    TcpListener {
        /// The address it is bound to.
        address: SocketAddr,
    },
    /// A listening Unix stream socket.
    UnixListener {
        /// The filesystem path it is bound to.
        path: PathBuf,
    },
    /// A bound UDP socket.
    Udp {
        /// The address it is bound to.
        address: SocketAddr,
    },
}

impl SocketKind {
    /// Listening sockets travel first, so the successor can serve as soon as possible.
    pub(crate) fn is_listener(&self) -> bool {
        matches!(self, Self::TcpListener { .. } | Self::UnixListener { .. })
    }

    /// A short noun for messages: "TCP listener", "Unix listener", "UDP socket".
    pub fn noun(&self) -> &'static str {
        match self {
            Self::TcpListener { .. } => "TCP listener",
            Self::UnixListener { .. } => "Unix listener",
            Self::Udp { .. } => "UDP socket",
        }
    }
}

impl fmt::Display for SocketKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TcpListener { address } | Self::Udp { address } => write!(f, "{address}"),
            Self::UnixListener { path } => write!(f, "{}", path.display()),
        }
    }
}

impl fmt::Display for SocketEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}` ({})", self.kind.noun(), self.name, self.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_is_flat_self_describing_json() {
        let entry = SocketEntry {
            name: "http".into(),
            kind: SocketKind::TcpListener {
                address: "127.0.0.1:8081".parse().unwrap(),
            },
        };
        let json = serde_json::to_value(&entry).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"name": "http", "kind": "tcp_listener", "address": "127.0.0.1:8081"})
        );
        assert_eq!(serde_json::from_value::<SocketEntry>(json).unwrap(), entry);
    }

    #[test]
    fn display_names_the_socket() {
        let entry = SocketEntry {
            name: "api".into(),
            kind: SocketKind::UnixListener {
                path: "/run/api.sock".into(),
            },
        };
        assert_eq!(entry.to_string(), "Unix listener `api` (/run/api.sock)");
    }
}
