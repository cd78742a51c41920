//! [`ListenerRegistry`]: the named sockets of a process, inherited or bound.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Mutex;

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use crate::wire::{Inode, SocketEntry, SocketKind};
use crate::Error;

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
/// # Examples
///
/// ```no_run
/// # async fn example() -> Result<(), handoff::Error> {
/// let registry = handoff::ListenerRegistry::new();
/// let http = registry.tcp("http", "127.0.0.1:8081".parse().unwrap())?;
/// let metrics = registry.tcp_with("metrics", "127.0.0.1:0".parse().unwrap(), |socket| {
///     socket.set_tcp_nodelay(true)
/// })?;
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
}

impl ListenerRegistry {
    /// An empty registry, for a process that inherited nothing.
    pub fn new() -> Self {
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

    /// A registry offering the sockets systemd passed (socket activation), by their
    /// `FileDescriptorName=`. Each is checked as a handed-over one is (type, family,
    /// protocol, address, listening); one that is not a TCP or Unix stream listener or a UDP
    /// socket is closed at once, with a warning. The paths of activated Unix listeners belong
    /// to the socket unit: they are never unlinked.
    pub(crate) fn with_activated(activated: Vec<crate::systemd::activation::Activated>) -> Self {
        let mut state = State::default();
        for crate::systemd::activation::Activated { name, fd } in activated {
            let label = name.clone().unwrap_or_else(|| "(unnamed)".into());
            let kind = match describe(std::os::fd::AsFd::as_fd(&fd)) {
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
            tracing::info!(socket = %entry, "socket activation: adopted a socket from the service manager");
            match name {
                Some(name) if !state.inherited.contains_key(&name) => {
                    state.inherited.insert(name, (entry, fd));
                }
                Some(_) => {
                    tracing::warn!(socket = %entry, "another activated socket has this name; this one is closed at ready");
                    state.unnamed.push((entry, fd));
                }
                None => state.unnamed.push((entry, fd)),
            }
        }
        Self {
            state: Mutex::new(state),
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

    /// Takes the inherited descriptor named `name` out of the registry, whatever its kind,
    /// for an application that wants to build its socket itself. It is no longer handed on
    /// unless registered again with [`register`](Self::register).
    pub fn take_inherited(&self, name: &str) -> Option<OwnedFd> {
        self.lock().inherited.remove(name).map(|(_, fd)| fd)
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
    pub(crate) fn close_unclaimed(&self) -> Vec<SocketEntry> {
        let mut state = self.lock();
        let mut unclaimed: Vec<_> = state.inherited.drain().map(|(_, socket)| socket).collect();
        unclaimed.append(&mut state.unnamed);
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
        let (entry, socket, reservation) = match self.claim(name, matches)? {
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
        self.lock().held.push((entry, dup.into()));
        // Only now: the name is held before it stops being reserved, so no claim slips between.
        drop(reservation);
        Ok(socket)
    }

    /// Takes the inherited socket `name` if it matches, else reserves the name for a bind.
    fn claim(&self, name: &str, matches: impl Fn(&SocketKind) -> bool) -> Result<Claim<'_>, Error> {
        let mut state = self.lock();
        if state.is_taken(name) {
            return Err(Error::DuplicateName(name.into()));
        }
        match state.inherited.remove(name) {
            Some((inherited, fd)) if matches(&inherited.kind) => return Ok(Claim::Inherited(inherited, fd)),
            Some((inherited, fd)) => {
                tracing::warn!(socket = %inherited, "inherited socket does not match the request; binding a new one and closing the inherited one at ready");
                state.inherited.insert(name.into(), (inherited, fd));
            }
            None => {}
        }
        state.binding.insert(name.into());
        Ok(Claim::Reserved(Reservation {
            registry: self,
            name: name.into(),
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
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.registry.lock().binding.remove(&self.name);
    }
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

/// Unlinks the path of a Unix listener if it is still the file recorded at bind time. A path
/// that another process has bound since, or one whose file we never identified, stays.
fn unlink_if_still_ours(entry: &SocketEntry) {
    let SocketKind::UnixListener { path, inode } = &entry.kind else {
        return;
    };
    let Some(inode) = inode else {
        tracing::debug!(socket = %entry, "socket file never identified; leaving its path");
        return;
    };
    match remove_if_same(path, *inode) {
        Ok(true) => tracing::debug!(socket = %entry, "unlinked"),
        Ok(false) => tracing::info!(socket = %entry, "path is now another file; leaving it"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(socket = %entry, error = %e, "cannot unlink"),
    }
}

/// Removes `path` if it is the file `expected`; `Ok(false)` if it is another one.
fn remove_if_same(path: &Path, expected: Inode) -> io::Result<bool> {
    if Inode::of(path)? != expected {
        return Ok(false);
    }
    std::fs::remove_file(path)?;
    Ok(true)
}

/// The identity of the socket file at `path`, or `None` if there is none (it is not a socket,
/// or cannot be inspected): then the path is never unlinked.
fn socket_inode(path: &Path) -> Option<Inode> {
    let metadata = std::fs::symlink_metadata(path).ok()?;
    metadata.file_type().is_socket().then(|| Inode::from(&metadata))
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

/// Binds a Unix socket at `path`, replacing a stale socket file there. Anything else at the
/// path is left alone, and the bind fails.
fn bind_unix(socket: &Socket, path: &Path) -> io::Result<()> {
    let address = SockAddr::unix(path)?;
    let in_use = match socket.bind(&address) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => e,
        result => return result,
    };
    let occupant = match occupant(path) {
        // Gone since the bind: whoever held it has left.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return socket.bind(&address),
        other => other?,
    };
    match occupant {
        Occupant::Stale(inode) => {
            // Only if no one has replaced it since we looked.
            remove_if_same(path, inode)?;
            socket.bind(&address)
        }
        Occupant::Live => Err(in_use),
        Occupant::NotASocket(what) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is {what}, not a socket: not replacing it", path.display()),
        )),
    }
}

/// What occupies a path a bind found in use.
enum Occupant {
    /// A socket file nothing accepts on, left by a process that died.
    Stale(Inode),
    /// A socket someone accepts on (or whose queue is full).
    Live,
    /// Not a socket: a regular file, a directory, a symbolic link...
    NotASocket(&'static str),
}

/// Looks at `path` without following a link; a socket is probed with a non-blocking
/// `connect`, which is refused only when no one listens (a full queue says "try again").
fn occupant(path: &Path) -> io::Result<Occupant> {
    let metadata = std::fs::symlink_metadata(path)?;
    let kind = metadata.file_type();
    if !kind.is_socket() {
        let what = if kind.is_file() {
            "a regular file"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_symlink() {
            "a symbolic link"
        } else {
            "something"
        };
        return Ok(Occupant::NotASocket(what));
    }
    let inode = Inode::from(&metadata);
    let probe = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    probe.set_nonblocking(true)?;
    match probe.connect(&SockAddr::unix(path)?) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(Occupant::Stale(inode)),
        _ => Ok(Occupant::Live),
    }
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
mod tests {
    use super::*;
    use crate::wire::verify;

    fn localhost() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[tokio::test]
    async fn port_zero_is_resolved_in_the_manifest() {
        let registry = ListenerRegistry::new();
        let listener = registry.tcp("http", localhost()).unwrap();
        let sockets = registry.sockets();
        assert_eq!(
            sockets[0].kind,
            SocketKind::TcpListener {
                address: listener.local_addr().unwrap()
            }
        );
    }

    #[tokio::test]
    async fn a_name_is_registered_once() {
        let registry = ListenerRegistry::new();
        let _first = registry.tcp("http", localhost()).unwrap();
        let err = registry.tcp("http", localhost()).unwrap_err();
        assert_eq!(err.to_string(), "a socket named `http` is already registered");
    }

    #[tokio::test]
    async fn a_bind_error_names_the_socket_and_address() {
        let registry = ListenerRegistry::new();
        let taken = registry.tcp("one", localhost()).unwrap().local_addr().unwrap();
        // No SO_REUSEPORT, so a second listener on the same port is refused.
        let err = registry.tcp("two", taken).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!("TCP listener `two` ({taken}): ")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_inherited_listener_is_the_same_kernel_socket() {
        let first = ListenerRegistry::new();
        let listener = first.tcp("http", localhost()).unwrap();
        let address = listener.local_addr().unwrap();
        let successor = ListenerRegistry::with_inherited(first.handoff_set().unwrap());
        // Port 0 again: the inherited port is kept.
        let adopted = successor.tcp("http", localhost()).unwrap();
        assert_eq!(adopted.local_addr().unwrap(), address);
        // A connection queued on the first is accepted through the second: one accept queue.
        let _client = std::net::TcpStream::connect(address).unwrap();
        adopted.accept().await.unwrap();
    }

    #[tokio::test]
    async fn ipv6_listeners_and_udp_sockets_are_handed_over_too() {
        let first = ListenerRegistry::new();
        let tcp6 = first
            .tcp("v6", "[::1]:0".parse().unwrap())
            .unwrap()
            .local_addr()
            .unwrap();
        let udp6 = first
            .udp("dns6", "[::1]:0".parse().unwrap())
            .unwrap()
            .local_addr()
            .unwrap();
        let set = first.handoff_set().unwrap();
        for (entry, fd) in &set {
            verify(entry, fd).unwrap();
        }
        let successor = ListenerRegistry::with_inherited(set);
        assert_eq!(
            successor
                .tcp("v6", "[::1]:0".parse().unwrap())
                .unwrap()
                .local_addr()
                .unwrap(),
            tcp6
        );
        assert_eq!(
            successor
                .udp("dns6", "[::1]:0".parse().unwrap())
                .unwrap()
                .local_addr()
                .unwrap(),
            udp6
        );
        assert!(successor.close_unclaimed().is_empty());
    }

    #[tokio::test]
    async fn an_inherited_socket_at_another_address_is_replaced_and_closed_at_ready() {
        let first = ListenerRegistry::new();
        let _old = first.udp("dns", localhost()).unwrap();
        let successor = ListenerRegistry::with_inherited(first.handoff_set().unwrap());
        let other: SocketAddr = "127.0.0.2:0".parse().unwrap();
        let fresh = successor.udp("dns", other).unwrap();
        assert_eq!(fresh.local_addr().unwrap().ip(), other.ip());
        let closed = successor.close_unclaimed();
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].name, "dns");
    }

    #[tokio::test]
    async fn unix_listeners_replace_stale_files_and_keep_live_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale); // the file stays, nobody listens: stale
        let registry = ListenerRegistry::new();
        let _live = registry.unix("api", &path).unwrap();
        let err = ListenerRegistry::new().unix("api", &path).unwrap_err();
        assert!(err.to_string().contains("Address already in use"), "{err}");
        let set = registry.handoff_set().unwrap();
        verify(&set[0].0, &set[0].1).unwrap();
    }

    #[tokio::test]
    async fn registered_sockets_are_described_and_listeners_go_first() {
        let registry = ListenerRegistry::new();
        let udp = std::net::UdpSocket::bind(localhost()).unwrap();
        let tcp = std::net::TcpListener::bind(localhost()).unwrap();
        registry.register("dns", &udp).unwrap();
        registry.register("http", &tcp).unwrap();
        let names: Vec<_> = registry.sockets().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["http", "dns"]);
        let (read, _write) = nix::unistd::pipe().unwrap();
        let err = registry.register("pipe", read).unwrap_err();
        assert!(err.to_string().starts_with("socket `pipe`: not a socket"), "{err}");
    }

    fn refused(address: SocketAddr) -> bool {
        matches!(std::net::TcpStream::connect(address), Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
    }

    #[tokio::test]
    async fn close_all_refuses_new_clients_and_unlinks_its_own_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let registry = ListenerRegistry::new();
        let tcp = registry.tcp("http", localhost()).unwrap();
        let address = tcp.local_addr().unwrap();
        drop(registry.unix("api", &path).unwrap());
        drop(tcp); // the application's copy; the registry's duplicate still accepts
        assert!(!refused(address));
        registry.close_all();
        assert!(refused(address));
        assert!(!path.exists());
        assert!(registry.sockets().is_empty());
    }

    #[tokio::test]
    async fn close_all_leaves_a_path_another_process_now_owns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let registry = ListenerRegistry::new();
        let _ours = registry.unix("api", &path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let _theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
        registry.close_all();
        std::os::unix::net::UnixStream::connect(&path).expect("the other listener's path is still there");
    }

    #[tokio::test]
    async fn release_all_closes_everything_and_unlinks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let registry = ListenerRegistry::new();
        let tcp = registry.tcp("http", localhost()).unwrap();
        let address = tcp.local_addr().unwrap();
        drop(registry.unix("api", &path).unwrap());
        drop(tcp);
        registry.release_all();
        assert!(refused(address));
        assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_socket());
    }

    #[tokio::test]
    async fn close_unclaimed_leaves_a_path_another_process_now_owns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let first = ListenerRegistry::new();
        drop(first.unix("api", &path).unwrap());
        let successor = ListenerRegistry::with_inherited(first.handoff_set().unwrap());
        first.release_all();
        std::fs::remove_file(&path).unwrap();
        let _theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let closed = successor.close_unclaimed();
        assert_eq!(closed.len(), 1);
        std::os::unix::net::UnixStream::connect(&path).expect("the other listener's path is still there");
    }

    #[tokio::test]
    async fn close_unclaimed_unlinks_the_predecessors_path_while_it_is_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let first = ListenerRegistry::new();
        drop(first.unix("api", &path).unwrap());
        let successor = ListenerRegistry::with_inherited(first.handoff_set().unwrap());
        first.release_all();
        assert_eq!(successor.close_unclaimed().len(), 1);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_path_without_a_recorded_inode_is_never_unlinked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // As from a peer that does not send the inode.
        let entry = SocketEntry {
            name: "api".into(),
            kind: SocketKind::UnixListener {
                path: path.clone(),
                inode: None,
            },
        };
        let successor = ListenerRegistry::with_inherited(vec![(entry, listener.into())]);
        successor.close_all();
        assert!(path.exists());
    }

    #[tokio::test]
    async fn activated_sockets_are_claimed_by_name_checked_and_the_rest_closed_at_ready() {
        use crate::systemd::activation::Activated;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let http = std::net::TcpListener::bind(localhost()).unwrap();
        let address = http.local_addr().unwrap();
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let spare = std::net::TcpListener::bind(localhost()).unwrap();
        let twin = std::net::TcpListener::bind(localhost()).unwrap();
        let (pipe, _write) = nix::unistd::pipe().unwrap();
        let activated = |name: Option<&str>, fd: OwnedFd| Activated {
            name: name.map(str::to_owned),
            fd,
        };
        let registry = ListenerRegistry::with_activated(vec![
            activated(Some("http"), http.into()),
            activated(Some("api"), unix.into()),
            activated(None, spare.into()),
            activated(Some("http"), twin.into()), // a name taken: never claimed
            activated(Some("pipe"), pipe),        // not a socket: closed at once
        ]);
        assert_eq!(
            registry.tcp("http", localhost()).unwrap().local_addr().unwrap(),
            address
        );
        drop(registry.unix("api", &path).unwrap());
        let pipe = registry.tcp("pipe", localhost()).unwrap();
        assert_ne!(
            pipe.local_addr().unwrap(),
            address,
            "nothing usable by that name: bound anew"
        );
        let closed = registry.close_unclaimed();
        assert_eq!(closed.len(), 2, "{closed:?}");
        // The socket unit owns the path of an activated Unix listener: a stop leaves it.
        registry.close_all();
        assert!(path.exists());
    }

    #[tokio::test]
    async fn a_registered_unix_listener_is_identified_and_unlinked_at_a_final_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let registry = ListenerRegistry::new();
        registry.register("api", &listener).unwrap();
        let recorded = match &registry.sockets()[0].kind {
            SocketKind::UnixListener { inode, .. } => *inode,
            other => panic!("{other:?}"),
        };
        assert_eq!(recorded, Some(Inode::of(&path).unwrap()));
        registry.close_all();
        assert!(!path.exists());
    }
}
