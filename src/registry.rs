//! [`ListenerRegistry`]: the named sockets of a process, inherited or bound.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use crate::wire::{SocketEntry, SocketKind};
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
    /// Sockets handed over by the predecessor that nobody has asked for yet.
    inherited: HashMap<String, (SocketEntry, OwnedFd)>,
    /// Sockets this process holds, in the order they were registered.
    held: Vec<(SocketEntry, OwnedFd)>,
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
                held: Vec::new(),
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
    /// A stale socket file left by a crashed process (nothing accepts on it) is replaced.
    ///
    /// # Errors
    ///
    /// As [`tcp`](Self::tcp).
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
        let requested = SocketKind::UnixListener { path: path.clone() };
        let matches = |kind: &SocketKind| matches!(kind, SocketKind::UnixListener { path: held } if *held == path);
        let socket = self.claim_or_bind(name, requested, matches, |_| {
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            configure(&socket)?;
            bind_unix(&socket, &path)?;
            socket.listen(BACKLOG)?;
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
        let kind = describe(socket.as_fd()).map_err(|problem| Error::Unsupported {
            name: name.into(),
            problem,
        })?;
        let entry = SocketEntry {
            name: name.into(),
            kind,
        };
        let dup = socket
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io(format!("duplicating socket `{name}`"), e))?;
        let mut state = self.lock();
        if state.is_held(name) {
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
    /// among them: no process will serve them any more. Returns what was closed.
    pub(crate) fn close_unclaimed(&self) -> Vec<SocketEntry> {
        let unclaimed: Vec<_> = self.lock().inherited.drain().map(|(_, (entry, _fd))| entry).collect();
        for entry in &unclaimed {
            if let SocketKind::UnixListener { path } = &entry.kind {
                let _ = std::fs::remove_file(path);
            }
        }
        unclaimed
    }

    /// Unlinks the paths of the Unix listeners this process holds. Only for a final stop:
    /// a process that hands its sockets over must never do this.
    pub(crate) fn unlink_unix_paths(&self) {
        for (entry, _) in &self.lock().held {
            if let SocketKind::UnixListener { path } = &entry.kind {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is one push or remove.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Claims the inherited socket `name` if `matches` accepts its kind, else calls `bind`,
    /// which may refine the entry (the port the kernel chose). Keeps a duplicate either way.
    fn claim_or_bind(
        &self,
        name: &str,
        requested: SocketKind,
        matches: impl Fn(&SocketKind) -> bool,
        bind: impl FnOnce(&mut SocketEntry) -> io::Result<Socket>,
    ) -> Result<Socket, Error> {
        let mut state = self.lock();
        if state.is_held(name) {
            return Err(Error::DuplicateName(name.into()));
        }
        let mut entry = SocketEntry {
            name: name.into(),
            kind: requested,
        };
        let socket = match state.inherited.remove(name) {
            Some((inherited, fd)) if matches(&inherited.kind) => {
                tracing::debug!(socket = %inherited, "adopted inherited socket");
                entry = inherited;
                Socket::from(fd)
            }
            other => {
                if let Some((inherited, fd)) = other {
                    tracing::warn!(socket = %inherited, requested = %entry.kind, "inherited socket does not match the request; binding a new one and closing the inherited one at ready");
                    state.inherited.insert(name.into(), (inherited, fd));
                }
                bind(&mut entry).map_err(|source| Error::Bind {
                    socket: entry.to_string(),
                    source,
                })?
            }
        };
        socket.set_nonblocking(true).map_err(|source| Error::Bind {
            socket: entry.to_string(),
            source,
        })?;
        let dup = socket.try_clone().map_err(|source| Error::Bind {
            socket: entry.to_string(),
            source,
        })?;
        state.held.push((entry, dup.into()));
        Ok(socket)
    }
}

impl State {
    fn is_held(&self, name: &str) -> bool {
        self.held.iter().any(|(e, _)| e.name == name)
    }
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

/// Binds a Unix socket, replacing a stale socket file that nothing accepts on.
fn bind_unix(socket: &Socket, path: &PathBuf) -> io::Result<()> {
    let address = SockAddr::unix(path)?;
    match socket.bind(&address) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && is_stale(path) => {
            std::fs::remove_file(path)?;
            socket.bind(&address)
        }
        result => result,
    }
}

/// A socket file is stale when connecting to it is refused: no process listens there.
fn is_stale(path: &Path) -> bool {
    matches!(std::os::unix::net::UnixStream::connect(path), Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
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
        (Type::STREAM, _, Some(path)) if listening => Ok(SocketKind::UnixListener { path: path.into() }),
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
}
