//! The manifest: a versioned, self-describing JSON description of every socket handed over.

use std::fmt;
use std::fs::Metadata;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One socket in the manifest: its name, and what the receiver must find when it inspects the
/// descriptor that travels with it.
///
/// On the wire, one flat JSON object: `{"name": …, "kind": …}` and the kind's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "FlatEntry")]
pub struct SocketEntry {
    /// The name the application registered the socket under (`"http"`).
    pub name: String,
    /// What kind of socket it is, and its local address.
    #[serde(flatten)]
    pub kind: SocketKind,
}

/// A [`SocketEntry`] as its JSON object reads, every field of every kind optional: decoded
/// in one pass, where `#[serde(flatten)]` buffers each entry first and costs three times as
/// much (a thousand of them are on the successor's path to ready). Fields of other kinds are
/// ignored, as unknown fields are.
#[derive(Deserialize)]
struct FlatEntry {
    name: String,
    kind: KindTag,
    address: Option<SocketAddr>,
    path: Option<PathBuf>,
    inode: Option<Inode>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum KindTag {
    TcpListener,
    UnixListener,
    Udp,
}

impl TryFrom<FlatEntry> for SocketEntry {
    type Error = &'static str;

    fn try_from(flat: FlatEntry) -> Result<Self, Self::Error> {
        let kind = match (flat.kind, flat.address, flat.path) {
            (KindTag::TcpListener, Some(address), _) => SocketKind::TcpListener { address },
            (KindTag::Udp, Some(address), _) => SocketKind::Udp { address },
            (KindTag::UnixListener, _, Some(path)) => SocketKind::UnixListener {
                path,
                inode: flat.inode,
            },
            (KindTag::TcpListener | KindTag::Udp, None, _) => return Err("missing field `address`"),
            (KindTag::UnixListener, _, None) => return Err("missing field `path`"),
        };
        Ok(Self { name: flat.name, kind })
    }
}

/// The kind of a socket and its local address, as the sender saw them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
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
        /// The socket file at `path` when it was bound, if known: a process unlinks the path
        /// only while it is still this file, never one another process has put there since.
        /// Absent (from a peer that does not send it, or for a path we could not inspect),
        /// the path is never unlinked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        inode: Option<Inode>,
    },
    /// A bound UDP socket.
    Udp {
        /// The address it is bound to.
        address: SocketAddr,
    },
}

/// The identity of a file: its device and inode numbers, as `lstat` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Inode {
    /// The device the file lives on (`st_dev`).
    pub dev: u64,
    /// Its inode number on that device (`st_ino`).
    pub ino: u64,
}

impl Inode {
    /// The identity of what is at `path` now, without following a symbolic link.
    pub(crate) fn of(path: &Path) -> io::Result<Self> {
        Ok(Self::from(&std::fs::symlink_metadata(path)?))
    }
}

impl From<&Metadata> for Inode {
    fn from(metadata: &Metadata) -> Self {
        Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
        }
    }
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
            Self::UnixListener { path, .. } => write!(f, "{}", path.display()),
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
    fn an_entry_without_its_kinds_fields_is_refused_and_others_fields_are_ignored() {
        let parse = |json| serde_json::from_value::<SocketEntry>(json).map_err(|e| e.to_string());
        let err = parse(serde_json::json!({"name": "http", "kind": "tcp_listener", "path": "/x"})).unwrap_err();
        assert!(err.contains("missing field `address`"), "{err}");
        let err =
            parse(serde_json::json!({"name": "api", "kind": "unix_listener", "address": "127.0.0.1:1"})).unwrap_err();
        assert!(err.contains("missing field `path`"), "{err}");
        let err = parse(serde_json::json!({"name": "x", "kind": "sctp", "address": "127.0.0.1:1"})).unwrap_err();
        assert!(err.contains("unknown variant `sctp`"), "{err}");
        let err = parse(serde_json::json!({"kind": "udp", "address": "127.0.0.1:1"})).unwrap_err();
        assert!(err.contains("missing field `name`"), "{err}");
        let entry =
            parse(serde_json::json!({"name": "dns", "kind": "udp", "address": "127.0.0.1:53", "path": "/x", "ttl": 3}));
        assert_eq!(
            entry.unwrap().kind,
            SocketKind::Udp {
                address: "127.0.0.1:53".parse().unwrap()
            }
        );
    }

    #[test]
    fn display_names_the_socket() {
        let entry = SocketEntry {
            name: "api".into(),
            kind: SocketKind::UnixListener {
                path: "/run/api.sock".into(),
                inode: Some(Inode { dev: 1, ino: 2 }),
            },
        };
        assert_eq!(entry.to_string(), "Unix listener `api` (/run/api.sock)");
    }

    #[test]
    fn the_inode_is_optional_on_the_wire() {
        let without = serde_json::json!({"name": "api", "kind": "unix_listener", "path": "/run/api.sock"});
        let entry: SocketEntry = serde_json::from_value(without.clone()).unwrap();
        assert_eq!(
            entry.kind,
            SocketKind::UnixListener {
                path: "/run/api.sock".into(),
                inode: None
            }
        );
        assert_eq!(serde_json::to_value(&entry).unwrap(), without);
        let with = serde_json::json!({
            "name": "api", "kind": "unix_listener", "path": "/run/api.sock",
            "inode": {"dev": 2049, "ino": u64::MAX}
        });
        let entry: SocketEntry = serde_json::from_value(with.clone()).unwrap();
        assert!(matches!(
            entry.kind,
            SocketKind::UnixListener {
                inode: Some(Inode {
                    dev: 2049,
                    ino: u64::MAX
                }),
                ..
            }
        ));
        assert_eq!(serde_json::to_value(&entry).unwrap(), with);
    }
}
