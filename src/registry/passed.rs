//! The sockets a service manager passed (socket activation), and how a claim finds them: by
//! name (`FileDescriptorName=`), else by address.
//!
//! A passed socket's name is often not the application's: a unit without
//! `FileDescriptorName=` names each socket after the unit (`myapp.socket`),
//! `systemd-socket-activate` without `--fdname` and `systemfd` name none. So a claim that
//! finds no socket under its name adopts one at the very address it asks for (the same IP and
//! port, the same Unix path), whatever its name, as `listenfd` users expect: binding there
//! anew could only fail (`AddrInUse`, the manager holds it) or lose the clients queued on it.
//! A claim for port 0 adopts nothing by address (it asks for no address in particular).
//!
//! A passed socket found under the name claimed but at another address (the unit says
//! `ListenStream=8080`, the application asks for 8081; `systemfd` keeps the port it was given)
//! is adopted as it is, with a warning: the socket unit owns the address, and binding anew
//! would close the passed socket at ready, resetting the clients queued on it.
//!
//! Sockets a predecessor handed over are matched by name only: their names are the
//! application's own, and a renamed one is a deliberate change (and one at a new address is
//! bound there: the application's configuration changed).

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use socket2::SockRef;

use super::{describe, ListenerRegistry, State};
use crate::systemd::activation::Activated;
use crate::wire::{SocketEntry, SocketKind};

impl ListenerRegistry {
    /// A registry offering the sockets systemd passed (socket activation), by their
    /// `FileDescriptorName=`, or by their address. Each is checked as a handed-over one is
    /// (type, family, protocol, address, listening); one that is not a TCP or Unix stream
    /// listener or a UDP socket is closed at once, with a warning. The paths of activated Unix
    /// listeners belong to the socket unit: they are never unlinked.
    pub(crate) fn with_activated(activated: Vec<Activated>) -> Self {
        let mut state = State {
            by_address: true,
            ..State::default()
        };
        for Activated { name, fd } in activated {
            let label = name.clone().unwrap_or_else(|| "(unnamed)".into());
            let kind = match describe(fd.as_fd()) {
                Ok(kind) => kind,
                Err(problem) => {
                    tracing::warn!(socket = %label, "closing an activated socket: {problem}");
                    continue;
                }
            };
            let entry = SocketEntry { name: label, kind };
            if let Err(error) = crate::wire::verify(&entry, &fd) {
                tracing::warn!(%error, "closing an activated socket");
                continue;
            }
            tracing::info!(socket = %entry, "socket activation: a socket from the service manager");
            match name {
                Some(name) if !state.inherited.contains_key(&name) => {
                    state.inherited.insert(name, (entry, fd));
                }
                Some(_) => {
                    tracing::warn!(socket = %entry, "another activated socket has this name; this one is claimed by its address only");
                    state.unnamed.push((entry, fd));
                }
                None => state.unnamed.push((entry, fd)),
            }
        }
        Self {
            state: std::sync::Mutex::new(state),
        }
    }
}

impl State {
    /// Takes, for a claim named `name`, a passed socket under another name (or none) that is
    /// where `requested` asks, renamed `name` (under which it is handed on); logs that it did.
    /// Only for sockets from a service manager.
    pub(super) fn adopt_by_address(&mut self, name: &str, requested: &SocketKind) -> Option<(SocketEntry, OwnedFd)> {
        if !self.by_address {
            return None;
        }
        let found = |(entry, fd): &(SocketEntry, OwnedFd)| covers(&entry.kind, Some(fd.as_fd()), requested);
        let (mut entry, fd) = match self.unnamed.iter().position(found) {
            Some(at) => self.unnamed.remove(at),
            None => {
                let other = self.inherited.iter().find(|(_, socket)| found(socket))?.0.clone();
                self.inherited.remove(&other)?
            }
        };
        tracing::info!(socket = %entry, claimed_as = name, "adopted an activated socket by its address");
        entry.name = name.into();
        Some((entry, fd))
    }

    /// The socket released at ready that a claim of `name`, or at `requested`, asks for.
    pub(super) fn released_match(&self, name: &str, requested: &SocketKind) -> Option<&SocketEntry> {
        self.released
            .iter()
            .find(|entry| entry.name == name || covers(&entry.kind, None, requested))
    }
}

/// Whether a socket of kind `held` is where `requested` asks: the same kind, and the same
/// address or path. A dual-stack IPv6 wildcard socket (`[::]:80`, as systemd binds
/// `ListenStream=80`) also covers the IPv4 wildcard on its port (`0.0.0.0:80`), which it
/// serves too; `fd` tells whether it is dual-stack.
fn covers(held: &SocketKind, fd: Option<BorrowedFd<'_>>, requested: &SocketKind) -> bool {
    let same_ip = |held: &SocketAddr, asked: &SocketAddr| {
        held == asked || (asked.port() != 0 && asked.port() == held.port() && dual_stack_wildcard(held, asked, fd))
    };
    match (held, requested) {
        (SocketKind::TcpListener { address: held }, SocketKind::TcpListener { address: asked })
        | (SocketKind::Udp { address: held }, SocketKind::Udp { address: asked }) => same_ip(held, asked),
        (SocketKind::UnixListener { path: held, .. }, SocketKind::UnixListener { path: asked, .. }) => held == asked,
        _ => false,
    }
}

/// Whether `held` is the IPv6 wildcard serving IPv4 too, and `asked` the IPv4 wildcard.
fn dual_stack_wildcard(held: &SocketAddr, asked: &SocketAddr, fd: Option<BorrowedFd<'_>>) -> bool {
    let wildcards = held.is_ipv6() && held.ip().is_unspecified() && asked.is_ipv4() && asked.ip().is_unspecified();
    wildcards && fd.is_some_and(|fd| SockRef::from(&fd).only_v6().is_ok_and(|only| !only))
}
