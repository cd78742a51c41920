//! [`ListenerRegistry`]: the named sockets of a process, inherited or bound.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

mod passed;
mod unix_path;

use unix_path::{bind_unix, socket_inode, unlink_if_still_ours};

use crate::error::Error;
use crate::wire::{SocketEntry, SocketKind};

/// The listen backlog of sockets the registry binds, as tokio's `TcpListener::bind` uses.
const BACKLOG: i32 = 1024;

/// The named sockets of a process.
///
/// Asking for a socket by name returns the one the predecessor handed over under that name,
/// when its kind and address match, or else binds a new one. Either way the registry keeps a
/// duplicate of the descriptor, so that it can hand the same kernel socket (and its accept
/// queue) to the next successor. Sockets come out as tokio types, ready for hyper, axum or
/// tonic.
///
/// Every process has one, which its [`Handoff`](crate::Handoff) owns (the registry of a
/// successor holds what the predecessor handed over): reach it with
/// [`Handoff::registry`](crate::Handoff::registry).
///
/// # Examples
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let handoff = handover::Handoff::builder().start().await?;
/// let registry = handoff.registry();
/// let http = registry.tcp("http", "127.0.0.1:8081".parse()?)?;
/// let metrics = registry.tcp_with("metrics", "127.0.0.1:0".parse()?, |socket| {
///     socket.set_tcp_nodelay(true)
/// })?;
/// handoff.ready().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct ListenerRegistry {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Sockets handed over by the predecessor (or by systemd) that nobody has asked for yet.
    inherited: HashMap<String, (SocketEntry, OwnedFd)>,
    /// Activated sockets without a name (or with a name an earlier one took): nobody can
    /// claim them, and they are closed at ready like every unclaimed inherited socket.
    unnamed: Vec<(SocketEntry, OwnedFd)>,
    /// Sockets this process holds, in the order they were registered.
    held: Vec<(SocketEntry, OwnedFd)>,
    /// Names being bound right now: the syscalls run outside the lock, the name stays taken.
    binding: HashSet<String>,
    /// Whether the sockets on offer came from a service manager (socket activation), whose
    /// names say little: then a claim may adopt one by its address (see `passed`).
    by_address: bool,
    /// Whether ready() has released what nobody claimed (`close_unclaimed`).
    ready: bool,
    /// The sockets released then: claiming one of them later is an error, never a new bind.
    released: Vec<SocketEntry>,
}

impl ListenerRegistry {
    /// An empty registry, for a process that inherited nothing.
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A registry offering the sockets a predecessor handed over (already verified).
    pub(crate) fn with_inherited(sockets: Vec<(SocketEntry, OwnedFd)>) -> Self {
        let inherited = sockets.into_iter().map(|(e, fd)| (e.name.clone(), (e, fd))).collect();
        Self {
            state: Mutex::new(State {
                inherited,
                ..State::default()
            }),
        }
    }

    /// The TCP listener named `name`: the inherited one if it is bound to `address`, else a
    /// new one bound there. With port 0 in `address`, an inherited listener on the same IP
    /// matches whatever its port, so a server keeps the port its first generation got.
    ///
    /// New listeners get `SO_REUSEADDR` (as `std` and tokio set it) and a backlog of 1024.
    ///
    /// Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateName`] if `name` is taken; [`Error::Bind`] if binding fails.
    pub fn tcp(&self, name: &str, address: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
        self.tcp_with(name, address, |_| Ok(()))
    }

    /// Like [`tcp`](Self::tcp), calling `configure` on a newly created socket before it is
    /// bound (inherited sockets keep the options they were given). Set any option there:
    /// the registry forces none.
    pub fn tcp_with(
        &self,
        name: &str,
        address: SocketAddr,
        configure: impl FnOnce(&Socket) -> io::Result<()>,
    ) -> Result<tokio::net::TcpListener, Error> {
        let matches = |kind: &SocketKind| match kind {
            SocketKind::TcpListener { address: held } => same_address(*held, address),
            _ => false,
        };
        let requested = SocketKind::TcpListener { address };
        let socket = self.claim_or_bind(name, requested, matches, |entry| {
            let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            configure(&socket)?;
            socket.bind(&address.into())?;
            socket.listen(BACKLOG)?;
            entry.kind = SocketKind::TcpListener {
                address: bound_address(&socket)?,
            };
            Ok(socket)
        })?;
        tokio::net::TcpListener::from_std(socket.into())
            .map_err(|e| Error::io("registering a TCP listener with tokio", e))
    }

    /// The Unix stream listener named `name`: the inherited one bound to `path`, or a new one.
    /// A stale socket file left by a crashed process (a socket nothing accepts on) is replaced;
    /// anything else at `path` (a live socket, a regular file, a directory) is left alone.
    ///
    /// The registry remembers which file it bound, and unlinks `path` on a final stop only
    /// while it is still that file.
    ///
    /// # Errors
    ///
    /// As [`tcp`](Self::tcp); [`Error::Bind`] with [`io::ErrorKind::AddrInUse`] when `path` is
    /// taken by a live socket or by something that is not a socket.
    pub fn unix(&self, name: &str, path: impl AsRef<Path>) -> Result<tokio::net::UnixListener, Error> {
        self.unix_with(name, path, |_| Ok(()))
    }

    /// Like [`unix`](Self::unix), calling `configure` on a newly created socket before it is bound.
    pub fn unix_with(
        &self,
        name: &str,
        path: impl AsRef<Path>,
        configure: impl FnOnce(&Socket) -> io::Result<()>,
    ) -> Result<tokio::net::UnixListener, Error> {
        let path = path.as_ref().to_path_buf();
        let requested = SocketKind::UnixListener {
            path: path.clone(),
            inode: None,
        };
        let matches = |kind: &SocketKind| matches!(kind, SocketKind::UnixListener { path: held, .. } if *held == path);
        let socket = self.claim_or_bind(name, requested, matches, |entry| {
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            configure(&socket)?;
            bind_unix(&socket, &path)?;
            socket.listen(BACKLOG)?;
            entry.kind = SocketKind::UnixListener {
                inode: socket_inode(&path),
                path: path.clone(),
            };
            Ok(socket)
        })?;
        tokio::net::UnixListener::from_std(socket.into())
            .map_err(|e| Error::io("registering a Unix listener with tokio", e))
    }

    /// The UDP socket named `name`: the inherited one bound to `address`, or a new one.
    ///
    /// # Errors
    ///
    /// As [`tcp`](Self::tcp).
    pub fn udp(&self, name: &str, address: SocketAddr) -> Result<tokio::net::UdpSocket, Error> {
        self.udp_with(name, address, |_| Ok(()))
    }

    /// Like [`udp`](Self::udp), calling `configure` on a newly created socket before it is bound.
    pub fn udp_with(
        &self,
        name: &str,
        address: SocketAddr,
        configure: impl FnOnce(&Socket) -> io::Result<()>,
    ) -> Result<tokio::net::UdpSocket, Error> {
        let matches =
            |kind: &SocketKind| matches!(kind, SocketKind::Udp { address: held } if same_address(*held, address));
        let socket = self.claim_or_bind(name, SocketKind::Udp { address }, matches, |entry| {
            let socket = Socket::new(Domain::for_address(address), Type::DGRAM, Some(Protocol::UDP))?;
            configure(&socket)?;
            socket.bind(&address.into())?;
            entry.kind = SocketKind::Udp {
                address: bound_address(&socket)?,
            };
            Ok(socket)
        })?;
        tokio::net::UdpSocket::from_std(socket.into()).map_err(|e| Error::io("registering a UDP socket with tokio", e))
    }

    /// Registers a socket the application created itself (from systemd, say), so that it is
    /// handed to successors under `name`. The registry keeps a duplicate; `socket` stays yours.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] if it is not a bound TCP or Unix stream listener or a bound UDP
    /// socket; [`Error::DuplicateName`] if `name` is taken.
    pub fn register(&self, name: &str, socket: impl AsFd) -> Result<(), Error> {
        let mut kind = describe(socket.as_fd()).map_err(|problem| Error::Unsupported {
            name: name.into(),
            problem,
        })?;
        if let SocketKind::UnixListener { path, inode } = &mut kind {
            // Registered, it is handled as one this process bound: its path goes at a final stop.
            *inode = socket_inode(path);
        }
        let entry = SocketEntry {
            name: name.into(),
            kind,
        };
        let dup = socket
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io(format!("duplicating socket `{name}`"), e))?;
        let mut state = self.lock();
        if state.is_taken(name) {
            return Err(Error::DuplicateName(name.into()));
        }
        state.held.push((entry, dup));
        Ok(())
    }

    /// Whether the path of the Unix listener held under `name` has been lost: no file is
    /// there any more, or another file than the socket file recorded when it was bound (an
    /// operator, `systemd-tmpfiles` or a deploy script removed or replaced it). `false` when
    /// no such listener is held, or its file was never identified and something is there.
    pub(crate) fn unix_path_lost(&self, name: &str) -> bool {
        let state = self.lock();
        let Some((entry, _)) = state.held.iter().find(|(e, _)| e.name == name) else {
            return false;
        };
        let SocketKind::UnixListener { path, inode } = &entry.kind else {
            return false;
        };
        match (crate::wire::Inode::of(path), inode) {
            (Err(_), _) => true,
            (Ok(now), Some(recorded)) => now != *recorded,
            (Ok(_), None) => false,
        }
    }

    /// Binds a new Unix listener at `path` in place of the one held under `name`, whose path
    /// was lost ([`unix_path_lost`](Self::unix_path_lost)): the held one is closed, and its
    /// path (now nothing, or another file) left alone. The new one is handed to successors
    /// from then on. As [`unix`](Self::unix), a stale socket file at `path` is replaced and
    /// anything else is not.
    ///
    /// # Errors
    ///
    /// [`Error::Bind`] naming the socket and the cause; the held listener stays then.
    pub(crate) fn rebind_unix(&self, name: &str, path: &Path) -> Result<tokio::net::UnixListener, Error> {
        let mut entry = SocketEntry {
            name: name.into(),
            kind: SocketKind::UnixListener {
                path: path.to_owned(),
                inode: None,
            },
        };
        let bound = (|| {
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            bind_unix(&socket, path)?;
            socket.listen(BACKLOG)?;
            socket.set_nonblocking(true)?;
            let dup = socket.try_clone()?;
            Ok((socket, dup))
        })();
        let (socket, dup) = bound.map_err(|source| bind_error(&entry, source))?;
        entry.kind = SocketKind::UnixListener {
            path: path.to_owned(),
            inode: socket_inode(path),
        };
        let replaced = {
            let mut state = self.lock();
            let replaced = state
                .held
                .iter()
                .position(|(e, _)| e.name == name)
                .map(|at| state.held.remove(at));
            state.held.push((entry, dup.into()));
            replaced
        };
        drop(replaced); // closed, its path not unlinked: it is not the old socket's file
        tokio::net::UnixListener::from_std(socket.into())
            .map_err(|e| Error::io("registering a Unix listener with tokio", e))
    }

    /// Takes the inherited descriptor named `name` out of the registry, whatever its kind,
    /// for an application that wants to build its socket itself. It is no longer handed on
    /// unless registered again with [`register`](Self::register).
    pub fn take_inherited(&self, name: &str) -> Option<OwnedFd> {
        self.lock().inherited.remove(name).map(|(_, fd)| fd)
    }

    /// The name of the socket `fd` is (a duplicate of), if this registry holds it.
    pub(crate) fn name_of(&self, fd: std::os::fd::BorrowedFd<'_>) -> Option<String> {
        let identity = |fd: std::os::fd::BorrowedFd<'_>| nix::sys::stat::fstat(fd).ok().map(|s| (s.st_dev, s.st_ino));
        let wanted = identity(fd)?;
        let state = self.lock();
        let held = state
            .held
            .iter()
            .find(|(_, held)| identity(held.as_fd()) == Some(wanted));
        held.map(|(entry, _)| entry.name.clone())
    }

    /// The sockets this process holds and will hand over, listeners first.
    pub fn sockets(&self) -> Vec<SocketEntry> {
        let mut entries: Vec<_> = self.lock().held.iter().map(|(e, _)| e.clone()).collect();
        entries.sort_by_key(|e| !e.kind.is_listener());
        entries
    }

    /// Duplicates of every held socket, listeners first, to send to a successor. The
    /// duplicates are closed when dropped; the registry keeps its own.
    pub(crate) fn handoff_set(&self) -> io::Result<Vec<(SocketEntry, OwnedFd)>> {
        let state = self.lock();
        let mut set = state
            .held
            .iter()
            .map(|(entry, fd)| Ok((entry.clone(), fd.try_clone()?)))
            .collect::<io::Result<Vec<_>>>()?;
        set.sort_by_key(|(e, _)| !e.kind.is_listener());
        Ok(set)
    }

    /// Closes every inherited socket nobody claimed, unlinking the paths of Unix listeners
    /// among them (each only if it is still the socket file the predecessor bound): no process
    /// will serve them any more. Returns what was closed.
    ///
    /// From then on, claiming one of them is an error ([`Error::ClaimedAfterReady`]): a new
    /// bind would have lost the clients queued on it, and may collide with the predecessor.
    pub(crate) fn close_unclaimed(&self) -> Vec<SocketEntry> {
        let mut state = self.lock();
        let mut unclaimed: Vec<_> = state.inherited.drain().map(|(_, socket)| socket).collect();
        unclaimed.append(&mut state.unnamed);
        state.ready = true;
        state.released.extend(unclaimed.iter().map(|(entry, _)| entry.clone()));
        drop(state);
        close(unclaimed, Unlink::IfStillOurs)
    }

    /// A final stop: closes every descriptor the registry holds (its duplicates of the
    /// listeners, so once the application drops its own the kernel refuses new clients, and
    /// any unclaimed inherited socket), and unlinks the Unix paths this process bound or
    /// inherited, each only if it is still the socket file that was bound there.
    pub(crate) fn close_all(&self) {
        close(self.take_all(), Unlink::IfStillOurs);
    }

    /// After a committed handover: closes every descriptor the registry holds and unlinks
    /// nothing, since the successor now owns the sockets and their paths.
    pub(crate) fn release_all(&self) {
        close(self.take_all(), Unlink::No);
    }

    /// Empties the registry: every held and inherited socket, with its entry.
    fn take_all(&self) -> Vec<(SocketEntry, OwnedFd)> {
        let mut state = self.lock();
        let mut all = std::mem::take(&mut state.held);
        all.extend(state.inherited.drain().map(|(_, socket)| socket));
        all.append(&mut state.unnamed);
        all
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is one push or remove.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Claims the inherited socket `name` if `matches` accepts its kind, else calls `bind`,
    /// which may refine the entry (the port the kernel chose). Keeps a duplicate either way.
    ///
    /// The lock is held only to look names up and record the result: `bind` (the user's
    /// `configure`, `bind`, a probing `connect`) runs outside it, the name reserved meanwhile.
    fn claim_or_bind(
        &self,
        name: &str,
        requested: SocketKind,
        matches: impl Fn(&SocketKind) -> bool,
        bind: impl FnOnce(&mut SocketEntry) -> io::Result<Socket>,
    ) -> Result<Socket, Error> {
        let (entry, socket, reservation) = match self.claim(name, &requested, matches)? {
            Claim::Inherited(entry, fd) => {
                tracing::debug!(socket = %entry, "adopted inherited socket");
                (entry, Socket::from(fd), None)
            }
            Claim::Reserved(reservation) => {
                let mut entry = SocketEntry {
                    name: name.into(),
                    kind: requested,
                };
                let socket = bind(&mut entry).map_err(|source| bind_error(&entry, source))?;
                (entry, socket, Some(reservation))
            }
        };
        let dup = socket
            .set_nonblocking(true)
            .and_then(|()| socket.try_clone())
            .map_err(|source| bind_error(&entry, source))?;
        let late = reservation
            .as_ref()
            .is_some_and(|r| r.after_ready)
            .then(|| entry.to_string());
        self.lock().held.push((entry, dup.into()));
        // Only now: the name is held before it stops being reserved, so no claim slips between.
        drop(reservation);
        if let Some(socket) = late {
            // Harmless here, fatal at the next upgrade: the successor releases it at its own
            // ready(), before this same line of its code would claim it.
            tracing::warn!(%socket, "bound after ready(): a successor will release it at its ready() unless it claims it before; claim every socket before ready()");
        }
        Ok(socket)
    }

    /// Takes the inherited socket `name` if it matches, or an activated one at the address
    /// asked ([`State::adopt_by_address`]); else reserves the name for a bind, unless the
    /// socket asked for was released at ready (an error: see [`Error::ClaimedAfterReady`]).
    fn claim(
        &self,
        name: &str,
        requested: &SocketKind,
        matches: impl Fn(&SocketKind) -> bool,
    ) -> Result<Claim<'_>, Error> {
        let mut state = self.lock();
        if state.is_taken(name) {
            return Err(Error::DuplicateName(name.into()));
        }
        match state.inherited.remove(name) {
            Some((inherited, fd)) if matches(&inherited.kind) => return Ok(Claim::Inherited(inherited, fd)),
            Some((activated, fd)) if state.by_address && same_family(&activated.kind, requested) => {
                // The socket unit's address wins over the application's: binding anew would
                // close the activated socket at ready, resetting the clients queued on it.
                tracing::warn!(socket = %activated, asked = %requested, "the service manager passed this socket under the name claimed, at another address: adopted as it is");
                return Ok(Claim::Inherited(activated, fd));
            }
            Some((inherited, fd)) => {
                tracing::warn!(socket = %inherited, "inherited socket does not match the request; binding a new one and closing the inherited one at ready");
                state.inherited.insert(name.into(), (inherited, fd));
            }
            None => {}
        }
        if let Some((entry, fd)) = state.adopt_by_address(name, requested) {
            return Ok(Claim::Inherited(entry, fd));
        }
        if let Some(released) = state.released_match(name, requested) {
            return Err(Error::ClaimedAfterReady {
                name: name.into(),
                socket: released.to_string(),
            });
        }
        state.binding.insert(name.into());
        Ok(Claim::Reserved(Reservation {
            registry: self,
            name: name.into(),
            after_ready: state.ready,
        }))
    }
}

/// What [`ListenerRegistry::claim`] found for a name.
enum Claim<'a> {
    /// The matching inherited socket, now out of the registry's inherited set.
    Inherited(SocketEntry, OwnedFd),
    /// Nothing to adopt: the name is reserved for a new socket.
    Reserved(Reservation<'a>),
}

/// A name being bound outside the registry's lock; released when dropped, on every path
/// (a failed bind, a panicking `configure`).
struct Reservation<'a> {
    registry: &'a ListenerRegistry,
    name: String,
    /// Reserved after ready(): the bind is worth a warning.
    after_ready: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.registry.lock().binding.remove(&self.name);
    }
}

/// Whether two sockets are of the same family (TCP listeners, UDP sockets, Unix listeners),
/// wherever they are.
fn same_family(a: &SocketKind, b: &SocketKind) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

fn bind_error(entry: &SocketEntry, source: io::Error) -> Error {
    Error::Bind {
        socket: entry.to_string(),
        source,
    }
}

impl State {
    /// Held, or being bound.
    fn is_taken(&self, name: &str) -> bool {
        self.binding.contains(name) || self.held.iter().any(|(e, _)| e.name == name)
    }
}

/// Whether [`close`] unlinks the paths of Unix listeners.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unlink {
    /// Unlink each path that is still the socket file recorded when it was bound.
    IfStillOurs,
    /// Leave every path: another process serves them.
    No,
}

/// Closes `sockets`, unlinking their paths first if asked. First, because while our
/// descriptor is open the socket file's inode cannot be freed, so its number cannot have been
/// reused by a new file that we would mistake for ours.
fn close(sockets: Vec<(SocketEntry, OwnedFd)>, unlink: Unlink) -> Vec<SocketEntry> {
    sockets
        .into_iter()
        .map(|(entry, fd)| {
            if unlink == Unlink::IfStillOurs {
                unlink_if_still_ours(&entry);
            }
            drop(fd);
            entry
        })
        .collect()
}

/// An inherited address matches a requested one if equal, or if the request leaves the port to
/// the kernel (0) and the IPs agree.
fn same_address(held: SocketAddr, requested: SocketAddr) -> bool {
    held == requested || (requested.port() == 0 && held.ip() == requested.ip())
}

fn bound_address(socket: &Socket) -> io::Result<SocketAddr> {
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("bound socket has no IP address"))
}

/// Describes a socket the application created itself, for the manifest.
fn describe(fd: std::os::fd::BorrowedFd<'_>) -> Result<SocketKind, String> {
    let socket = SockRef::from(&fd);
    let ty = socket.r#type().map_err(|e| format!("not a socket ({e})"))?;
    let local = socket
        .local_addr()
        .map_err(|e| format!("cannot read its address: {e}"))?;
    let listening = socket.is_listener().unwrap_or(false);
    match (ty, local.as_socket(), local.as_pathname()) {
        (Type::STREAM, Some(address), _) if listening => Ok(SocketKind::TcpListener { address }),
        (Type::STREAM, _, Some(path)) if listening => Ok(SocketKind::UnixListener {
            path: path.into(),
            inode: None,
        }),
        (Type::DGRAM, Some(address), _) => Ok(SocketKind::Udp { address }),
        _ => Err(format!("a {ty:?} socket bound to {local:?} (listening: {listening}) is not a TCP or Unix listener, nor a UDP socket")),
    }
}

#[cfg(test)]
mod tests;
