//! Unix socket paths the registry owns: a path is bound over a stale socket file only, and
//! unlinked only while it is still the file this process bound (its inode recorded), so that
//! a path another process has bound since is never taken from it.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::wire::{Inode, SocketEntry, SocketKind};

/// Unlinks the path of a Unix listener if it is still the file recorded at bind time. A path
/// that another process has bound since, or one whose file we never identified, stays.
pub(super) fn unlink_if_still_ours(entry: &SocketEntry) {
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
pub(super) fn socket_inode(path: &Path) -> Option<Inode> {
    let metadata = std::fs::symlink_metadata(path).ok()?;
    metadata.file_type().is_socket().then(|| Inode::from(&metadata))
}

/// Binds a Unix socket at `path`, replacing a stale socket file there. Anything else at the
/// path is left alone, and the bind fails.
pub(super) fn bind_unix(socket: &Socket, path: &Path) -> io::Result<()> {
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
