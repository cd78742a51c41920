//! Established connections on the channel, after the commit: what travels with each one, the
//! bounds on it, and the check the successor makes before it adopts one.
//!
//! ```text
//! successor ◀── Migrate × n (+ SCM_RIGHTS) ── predecessor   (after Commit; any number)
//! successor ── Migrated (refused positions) ─▶ predecessor   (one per Migrate, in order)
//! ```
//!
//! The predecessor keeps its copy of every descriptor of a batch until the `Migrated` for
//! that batch arrives: a connection the successor refused, or a batch it never acknowledged
//! (it died, or did not answer in time), goes back to the old process, which drains it.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol as IpProtocol, SockRef, Type};

use super::verify::describe_non_socket;
use super::WireError;

/// The largest application state (its JSON text) one migrated connection may carry.
pub const MAX_STATE_BYTES: usize = 16 * 1024;

/// The most bytes read from a migrated connection but not yet consumed that may travel
/// with it. With the state and the base64 encoding (4/3), one connection always fits in a
/// message of `MAX_MESSAGE_BYTES` (128 KiB).
pub const MAX_LEFTOVER_BYTES: usize = 64 * 1024;

/// The protocol a migrated connection speaks: the successor resumes it only with a receiver
/// registered for the same protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Protocol {
    /// A byte stream the application frames itself.
    RawTcp,
    /// HTTP/1.1, between two requests.
    Http1,
    /// WebSocket, at a message boundary.
    WebSocket,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RawTcp => "raw TCP",
            Self::Http1 => "HTTP/1.1",
            Self::WebSocket => "WebSocket",
        })
    }
}

/// One established connection in a migration batch; its descriptor travels beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionEntry {
    /// The name of the listener it was accepted from (`"echo"`).
    pub listener: String,
    /// The protocol it speaks.
    pub protocol: Protocol,
    /// Its local address, as the sender saw it.
    pub local: SocketAddr,
    /// Its peer's address, as the sender saw it.
    pub peer: SocketAddr,
    /// The application's state for it.
    pub state: State,
    /// The bytes read from it but not consumed, base64 on the wire.
    #[serde(with = "base64")]
    pub leftover: Vec<u8>,
}

impl fmt::Display for ConnectionEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} connection of `{}` ({} from {})",
            self.protocol, self.listener, self.local, self.peer
        )
    }
}

/// An application's state for one connection, as JSON. (A JSON value rather than its raw
/// text: messages are internally tagged, which the general decoder buffers, and raw text
/// does not survive the buffering.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct State(pub serde_json::Value);

impl State {
    /// The length of the JSON text, measured without building it.
    pub fn json_len(&self) -> usize {
        // A `Value` always serializes.
        super::json::encoded_len(&self.0).unwrap_or(usize::MAX)
    }
}

/// A connection of a batch that the successor did not take; the predecessor drains it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedConnection {
    /// Its position in the batch, from 0.
    pub position: usize,
    /// Why, naming the connection.
    pub reason: String,
}

/// Checks `fd` against `entry`: an established TCP connection (a stream socket, not
/// listening, connected) of the declared family, between the declared addresses.
///
/// # Errors
///
/// [`WireError::SocketMismatch`] naming the entry and what was found instead.
pub fn verify_connection(entry: &ConnectionEntry, fd: BorrowedFd<'_>) -> Result<(), WireError> {
    if matches(entry, fd) {
        return Ok(());
    }
    check(entry, fd).map_err(|problem| WireError::SocketMismatch {
        socket: entry.to_string(),
        problem,
    })
}

/// Whether `fd` is the connection `entry` describes, in four system calls where [`check`]
/// makes six (ten thousand connections migrated make ten thousand of these checks): a
/// stream socket of protocol TCP is an IP one (a raw socket of protocol TCP is not a
/// stream, and SCTP or MPTCP stream sockets have other protocols); a peer address, a
/// connected one (a listener has none); an IPv4 or IPv6 address, the socket's family (an
/// IPv6 socket reports even an IPv4 peer as an IPv6 address). Accepts exactly what
/// [`check`] accepts; on a mismatch, [`check`] says what is wrong.
fn matches(entry: &ConnectionEntry, fd: BorrowedFd<'_>) -> bool {
    let socket = SockRef::from(&fd);
    socket.r#type().is_ok_and(|t| t == Type::STREAM)
        && socket.protocol().is_ok_and(|p| p == Some(IpProtocol::TCP))
        && socket.peer_addr().is_ok_and(|a| a.as_socket() == Some(entry.peer))
        && socket.local_addr().is_ok_and(|a| a.as_socket() == Some(entry.local))
}

fn check(entry: &ConnectionEntry, fd: BorrowedFd<'_>) -> Result<(), String> {
    const EXPECTED: &str = "an established TCP connection";
    let socket = SockRef::from(&fd);
    let ty = socket
        .r#type()
        .map_err(|_| format!("expected {EXPECTED}, got {}", describe_non_socket(fd)))?;
    if ty != Type::STREAM {
        return Err(format!("expected {EXPECTED}, got a socket of type {ty:?}"));
    }
    let domain = socket.domain().map_err(|e| format!("cannot read its domain: {e}"))?;
    let want_domain = Domain::for_address(entry.peer);
    if domain != want_domain {
        return Err(format!("expected domain {want_domain:?}, got {domain:?}"));
    }
    let protocol = socket
        .protocol()
        .map_err(|e| format!("cannot read its protocol: {e}"))?;
    if protocol.is_some_and(|p| p != IpProtocol::TCP) {
        return Err(format!("expected protocol TCP, got {protocol:?}"));
    }
    if socket.is_listener().unwrap_or(false) {
        return Err(format!("expected {EXPECTED}, got a listening socket"));
    }
    let peer = socket
        .peer_addr()
        .map_err(|e| format!("expected {EXPECTED}, got one that is not connected ({e})"))?;
    if peer.as_socket() != Some(entry.peer) {
        return Err(format!("connected to {:?}, not {}", peer.as_socket(), entry.peer));
    }
    let local = socket
        .local_addr()
        .map_err(|e| format!("cannot read its address: {e}"))?;
    if local.as_socket() != Some(entry.local) {
        return Err(format!("bound to {:?}, not {}", local.as_socket(), entry.local));
    }
    Ok(())
}

/// Bytes as base64 text: a third larger, where a JSON array of numbers would be three times.
mod base64 {
    use data_encoding::BASE64;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&BASE64.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        BASE64.decode(text.as_bytes()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    use super::*;
    use crate::wire::{Message, MAX_MESSAGE_BYTES};

    fn entry(local: SocketAddr, peer: SocketAddr) -> ConnectionEntry {
        ConnectionEntry {
            listener: "echo".into(),
            protocol: Protocol::RawTcp,
            local,
            peer,
            state: State(serde_json::json!({"echoed": 3})),
            leftover: b"\x00abc\xff".to_vec(),
        }
    }

    /// An accepted connection (server side) and its client.
    fn connection() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (listener.accept().unwrap().0, client)
    }

    #[test]
    fn an_established_connection_as_declared_passes() {
        let (server, _client) = connection();
        let declared = entry(server.local_addr().unwrap(), server.peer_addr().unwrap());
        verify_connection(&declared, server.as_fd()).unwrap();
    }

    #[test]
    fn another_peer_is_refused() {
        let (server, _client) = connection();
        let mut peer = server.peer_addr().unwrap();
        peer.set_port(peer.port().wrapping_add(1));
        let err = verify_connection(&entry(server.local_addr().unwrap(), peer), server.as_fd()).unwrap_err();
        assert!(err.to_string().contains("connected to Some("), "{err}");
    }

    #[test]
    fn a_listener_or_a_pipe_is_not_a_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let err = verify_connection(&entry(address, address), listener.as_fd()).unwrap_err();
        assert!(err.to_string().ends_with("got a listening socket"), "{err}");
        let (read, _write) = nix::unistd::pipe().unwrap();
        let err = verify_connection(&entry(address, address), read.as_fd()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("raw TCP connection of `echo` ({address} from {address}): expected an established TCP connection, got a pipe")
        );
    }

    #[test]
    fn an_unconnected_socket_is_refused() {
        let socket = socket2::Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let address: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let err = verify_connection(&entry(address, address), socket.as_fd()).unwrap_err();
        assert!(err.to_string().contains("not connected"), "{err}");
    }

    #[test]
    fn the_family_must_be_the_declared_one() {
        let (server, _client) = connection();
        let peer: SocketAddr = "[::1]:4000".parse().unwrap();
        let err = verify_connection(&entry(server.local_addr().unwrap(), peer), server.as_fd()).unwrap_err();
        assert!(err.to_string().contains("expected domain"), "{err}");
    }

    /// Every kind of descriptor a peer could send, against every entry it could claim for
    /// it: the quick check accepts exactly what the full one accepts.
    #[test]
    fn the_quick_check_and_the_full_one_agree() {
        use std::os::fd::OwnedFd;
        let (server, client) = connection();
        let listener6 = TcpListener::bind("[::1]:0").unwrap();
        let client6 = TcpStream::connect(listener6.local_addr().unwrap()).unwrap();
        let server6 = listener6.accept().unwrap().0;
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.connect(server.local_addr().unwrap()).unwrap();
        let (unix, _unix_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let unconnected = socket2::Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        // A client half-closed, and one whose peer closed (CLOSE_WAIT): still connections.
        let (half_closed, _its_peer) = connection();
        half_closed.shutdown(std::net::Shutdown::Write).unwrap();
        let (close_wait, its_peer) = connection();
        drop(its_peer);
        // IPv4 clients of an IPv6 listener: their peers are IPv4-mapped addresses.
        let dual = socket2::Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
        dual.set_only_v6(false).unwrap();
        dual.bind(&"[::]:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        dual.listen(8).unwrap();
        let port = dual.local_addr().unwrap().as_socket().unwrap().port();
        let _mapped_client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mapped = TcpListener::from(dual).accept().unwrap().0;
        let mut fds: Vec<OwnedFd> = vec![
            server.into(),
            client.into(),
            server6.into(),
            client6.into(),
            TcpListener::bind("127.0.0.1:0").unwrap().into(),
            listener6.into(),
            udp.into(),
            unix.into(),
            unconnected.into(),
            half_closed.into(),
            close_wait.into(),
            mapped.into(),
            nix::unistd::pipe().unwrap().0,
        ];
        // A raw socket of protocol TCP, connected: it reports a peer and the protocol TCP,
        // and is no connection (it needs CAP_NET_RAW: left out without it).
        match socket2::Socket::new(Domain::IPV4, Type::RAW, Some(IpProtocol::TCP)) {
            Ok(raw) => {
                raw.connect(&"127.0.0.1:4242".parse::<SocketAddr>().unwrap().into())
                    .unwrap();
                fds.push(raw.into());
            }
            Err(error) => eprintln!("no raw socket ({error}): that case is not checked here"),
        }
        // MPTCP where the kernel has it: a stream socket of another protocol.
        if let Ok(mptcp) = socket2::Socket::new(Domain::IPV4, Type::STREAM, Some(IpProtocol::from(262))) {
            fds.push(mptcp.into());
        }
        let mut addresses: Vec<SocketAddr> = vec!["127.0.0.1:1".parse().unwrap(), "[::1]:1".parse().unwrap()];
        for fd in &fds {
            let socket = SockRef::from(fd);
            addresses.extend(socket.local_addr().ok().and_then(|a| a.as_socket()));
            addresses.extend(socket.peer_addr().ok().and_then(|a| a.as_socket()));
        }
        addresses.sort();
        addresses.dedup();
        let mut accepted = 0;
        for local in &addresses {
            for peer in &addresses {
                let declared = entry(*local, *peer);
                for fd in &fds {
                    let full = check(&declared, fd.as_fd());
                    assert_eq!(
                        matches(&declared, fd.as_fd()),
                        full.is_ok(),
                        "{declared} against {fd:?}: {full:?}"
                    );
                    accepted += usize::from(full.is_ok());
                }
            }
        }
        // Each of the seven connected TCP sockets passes as itself, and only as itself.
        assert_eq!(accepted, 7);
    }

    #[test]
    fn a_batch_round_trips_with_its_state_and_bytes() {
        let address: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let message = Message::Migrate {
            index: 7,
            connections: vec![entry(address, address)],
        };
        let bytes = message.encode().unwrap();
        assert!(
            std::str::from_utf8(&bytes)
                .unwrap()
                .contains(r#""state":{"echoed":3},"leftover":"AGFiY/8=""#),
            "the state travels as JSON and the bytes as base64"
        );
        assert_eq!(Message::decode(&bytes).unwrap(), message);
        let ack = Message::Migrated {
            index: 7,
            refused: vec![RefusedConnection {
                position: 0,
                reason: "no".into(),
            }],
        };
        assert_eq!(Message::decode(&ack.encode().unwrap()).unwrap(), ack);
    }

    #[test]
    fn one_connection_at_both_limits_fits_in_a_message() {
        let address: SocketAddr = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".parse().unwrap();
        let state = format!("\"{}\"", "x".repeat(MAX_STATE_BYTES - 2));
        let mut entry = entry(address, address);
        entry.listener = "a-listener-with-a-long-name".repeat(10);
        entry.state = State(serde_json::from_str(&state).unwrap());
        entry.leftover = vec![0xff; MAX_LEFTOVER_BYTES];
        let message = Message::Migrate {
            index: u64::MAX,
            connections: vec![entry],
        };
        assert!(message.encode().unwrap().len() < MAX_MESSAGE_BYTES);
    }

    #[test]
    fn bad_base64_is_malformed() {
        let text = r#"{"type":"migrate","index":0,"connections":[{"listener":"echo","protocol":"raw_tcp","local":"127.0.0.1:1","peer":"127.0.0.1:2","state":null,"leftover":"!!"}]}"#;
        assert!(matches!(Message::decode(text.as_bytes()), Err(WireError::Malformed(_))));
    }
}
