//! Checks that a received descriptor is the socket its manifest entry describes, before the
//! successor adopts it: a wrong descriptor must be refused, never served.

use std::os::fd::AsFd;

use nix::sys::stat::{fstat, SFlag};
use socket2::{Domain, Protocol, SockRef, Type};

use super::{SocketEntry, SocketKind, WireError};

/// Checks `fd` against `entry`: that it is a socket, of the declared type, domain and
/// protocol, listening when it should, and bound to the declared address.
///
/// # Errors
///
/// [`WireError::SocketMismatch`] naming the entry and what was found instead.
pub fn verify(entry: &SocketEntry, fd: impl AsFd) -> Result<(), WireError> {
    let fd = fd.as_fd();
    if matches(&entry.kind, fd) {
        return Ok(());
    }
    diagnose(&entry.kind, fd).map_err(|problem| WireError::SocketMismatch {
        socket: entry.to_string(),
        problem,
    })
}

/// Whether `fd` is the socket `kind` describes, in as few system calls as settle it (a
/// handoff of a thousand sockets makes a thousand of these checks on the successor's path
/// to ready): the protocol of an IP socket implies its type (TCP is only ever a stream,
/// UDP a datagram socket), and the address `getsockname` returns, its domain. Accepts
/// exactly what [`diagnose`] accepts; on a mismatch, [`diagnose`] says what is wrong.
fn matches(kind: &SocketKind, fd: std::os::fd::BorrowedFd<'_>) -> bool {
    let socket = SockRef::from(&fd);
    match kind {
        SocketKind::TcpListener { address } => {
            socket.protocol().is_ok_and(|p| p == Some(Protocol::TCP))
                && socket.local_addr().is_ok_and(|a| a.as_socket() == Some(*address))
                && socket.is_listener().unwrap_or(false)
        }
        SocketKind::Udp { address } => {
            socket.protocol().is_ok_and(|p| p == Some(Protocol::UDP))
                && socket.local_addr().is_ok_and(|a| a.as_socket() == Some(*address))
        }
        SocketKind::UnixListener { path, .. } => {
            socket.r#type().is_ok_and(|t| t == Type::STREAM)
                && socket
                    .local_addr()
                    .is_ok_and(|a| a.as_pathname() == Some(path.as_path()))
                && socket.is_listener().unwrap_or(false)
        }
    }
}

/// Every check, one after the other, for a descriptor [`matches`] refused: what was found
/// instead of what `kind` describes.
fn diagnose(kind: &SocketKind, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), String> {
    let socket = SockRef::from(&fd);
    let expected = kind.noun();
    let ty = socket
        .r#type()
        .map_err(|_| format!("expected a {expected}, got {}", describe_non_socket(fd)))?;
    let want_type = match kind {
        SocketKind::Udp { .. } => Type::DGRAM,
        _ => Type::STREAM,
    };
    if ty != want_type {
        return Err(format!("expected a {expected}, got a socket of type {ty:?}"));
    }
    let domain = socket.domain().map_err(|e| format!("cannot read its domain: {e}"))?;
    let protocol = socket
        .protocol()
        .map_err(|e| format!("cannot read its protocol: {e}"))?;
    let local = socket
        .local_addr()
        .map_err(|e| format!("cannot read its address: {e}"))?;
    match kind {
        SocketKind::TcpListener { address } | SocketKind::Udp { address } => {
            let want_domain = Domain::for_address(*address);
            if domain != want_domain {
                return Err(format!("expected domain {want_domain:?}, got {domain:?}"));
            }
            let want_protocol = if ty == Type::DGRAM {
                Protocol::UDP
            } else {
                Protocol::TCP
            };
            if protocol.is_some_and(|p| p != want_protocol) {
                return Err(format!("expected protocol {want_protocol:?}, got {protocol:?}"));
            }
            match local.as_socket() {
                Some(actual) if actual == *address => {}
                other => return Err(format!("bound to {}, not {address}", show(other))),
            }
        }
        SocketKind::UnixListener { path, .. } => {
            if domain != Domain::UNIX {
                return Err(format!("expected domain Unix, got {domain:?}"));
            }
            if local.as_pathname() != Some(path.as_path()) {
                return Err(format!("bound to {:?}, not {}", local.as_pathname(), path.display()));
            }
        }
    }
    if kind.is_listener() && !socket.is_listener().unwrap_or(false) {
        return Err("bound but not listening".to_owned());
    }
    Ok(())
}

fn show(address: Option<std::net::SocketAddr>) -> String {
    address.map_or_else(|| "no IP address".to_owned(), |a| a.to_string())
}

/// Names what a descriptor is when it is not a socket, for the error message.
pub(super) fn describe_non_socket(fd: std::os::fd::BorrowedFd<'_>) -> &'static str {
    let Ok(stat) = fstat(fd) else {
        return "an invalid descriptor";
    };
    match SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFIFO => "a pipe",
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        _ => "something that is not a socket",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, UdpSocket};

    fn tcp_entry(address: std::net::SocketAddr) -> SocketEntry {
        SocketEntry {
            name: "http".into(),
            kind: SocketKind::TcpListener { address },
        }
    }

    #[test]
    fn a_matching_listener_passes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        verify(&tcp_entry(listener.local_addr().unwrap()), &listener).unwrap();
    }

    #[test]
    fn a_pipe_is_named_as_such() {
        let (read, _write) = nix::unistd::pipe().unwrap();
        let err = verify(&tcp_entry("127.0.0.1:80".parse().unwrap()), &read).unwrap_err();
        assert_eq!(
            err.to_string(),
            "TCP listener `http` (127.0.0.1:80): expected a TCP listener, got a pipe"
        );
    }

    #[test]
    fn a_udp_socket_is_not_a_tcp_listener() {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = verify(&tcp_entry(udp.local_addr().unwrap()), &udp).unwrap_err();
        assert!(err.to_string().contains("got a socket of type"), "{err}");
    }

    #[test]
    fn another_address_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut claimed = listener.local_addr().unwrap();
        claimed.set_port(claimed.port().wrapping_add(1));
        let err = verify(&tcp_entry(claimed), &listener).unwrap_err();
        assert!(err.to_string().contains("bound to 127.0.0.1:"), "{err}");
    }

    /// Every kind of descriptor a peer could send, against every entry it could claim: the
    /// quick check accepts exactly what the full one accepts.
    #[test]
    fn the_quick_check_and_the_full_one_agree() {
        use std::os::fd::OwnedFd;
        use std::os::unix::net::{UnixDatagram, UnixListener};
        let dir = tempfile::tempdir().unwrap();
        let bound = |domain: Domain, ty: Type, address: socket2::SockAddr, listen: bool| -> OwnedFd {
            let socket = socket2::Socket::new(domain, ty, None).unwrap();
            socket.bind(&address).unwrap();
            if listen {
                socket.listen(8).unwrap();
            }
            socket.into()
        };
        let ip = |a: &str| socket2::SockAddr::from(a.parse::<std::net::SocketAddr>().unwrap());
        let unix = |name: &str| socket2::SockAddr::unix(dir.path().join(name)).unwrap();
        let mut fds: Vec<OwnedFd> = vec![
            TcpListener::bind("127.0.0.1:0").unwrap().into(),
            TcpListener::bind("[::1]:0").unwrap().into(),
            bound(Domain::IPV4, Type::STREAM, ip("127.0.0.1:0"), false),
            UdpSocket::bind("127.0.0.1:0").unwrap().into(),
            UdpSocket::bind("[::1]:0").unwrap().into(),
            UnixListener::bind(dir.path().join("stream")).unwrap().into(),
            bound(Domain::UNIX, Type::STREAM, unix("unlistened"), false),
            bound(Domain::UNIX, Type::SEQPACKET, unix("seqpacket"), true),
            UnixDatagram::bind(dir.path().join("datagram")).unwrap().into(),
            std::fs::File::open(dir.path()).unwrap().into(),
        ];
        fds.push(nix::unistd::pipe().unwrap().0);
        let mut kinds = Vec::new();
        for fd in &fds {
            let Ok(local) = SockRef::from(fd).local_addr() else {
                continue;
            };
            if let Some(address) = local.as_socket() {
                kinds.push(SocketKind::TcpListener { address });
                kinds.push(SocketKind::Udp { address });
            }
            if let Some(path) = local.as_pathname() {
                kinds.push(SocketKind::UnixListener {
                    path: path.to_owned(),
                    inode: None,
                });
            }
        }
        let mut accepted = 0;
        for kind in &kinds {
            for fd in &fds {
                let full = diagnose(kind, fd.as_fd());
                assert_eq!(
                    matches(kind, fd.as_fd()),
                    full.is_ok(),
                    "{kind:?} against {fd:?}: {full:?}"
                );
                accepted += usize::from(full.is_ok());
            }
        }
        // Each listener and UDP socket passes as what it is, and only that.
        assert_eq!(accepted, 5);
    }

    #[test]
    fn a_bound_but_not_listening_socket_is_refused() {
        let socket = socket2::Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket
            .bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into())
            .unwrap();
        let address = socket.local_addr().unwrap().as_socket().unwrap();
        let err = verify(&tcp_entry(address), &socket).unwrap_err();
        assert!(err.to_string().ends_with("bound but not listening"), "{err}");
    }
}
