//! Socket activation (sd_listen_fds(3)): the sockets a service manager opened for us, placed
//! at descriptors 3, 4, … and described by `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`.
//!
//! The variables are read once and never changed (changing the environment while other
//! threads run is undefined behaviour); a successor never sees them, since its environment
//! is built without them.
//!
//! # `LISTEN_FDS` without `LISTEN_PID`
//!
//! `LISTEN_PID` says the variables are for this process, not for one of its children that
//! inherited the environment (and, at 3, 4, …, whatever its parent left open). Some launchers
//! leave it out: `systemfd --no-pid`, the usual `cargo watch` loop, since the pid of the
//! program `cargo run` starts is not known when the socket is passed. The descriptors are then
//! taken only when each of them shows it was passed to us: it is open, it is *not*
//! close-on-exec (so it crossed an `exec`: Rust, tokio and this library open every descriptor
//! close-on-exec, so no descriptor the process opened itself qualifies), and it is a listening
//! TCP or Unix stream socket or a bound UDP socket. If one of them fails, none is taken (nor
//! closed): a variable that leaked into a child which did not get the sockets changes
//! nothing. `LISTEN_PID` naming another process still means "not for us".

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

/// The first descriptor a service manager passes.
const FIRST_FD: RawFd = 3;

/// More than this many is not a socket unit but a corrupt variable.
const MAX_FDS: usize = 4096;

/// One descriptor passed by the service manager, owned by us now.
#[derive(Debug)]
pub(crate) struct Activated {
    /// Its name from `LISTEN_FDNAMES` (`FileDescriptorName=`), `None` when absent or empty.
    pub name: Option<String>,
    pub fd: OwnedFd,
}

/// Takes the descriptors the service manager passed to this process, if the variables name
/// this process (`LISTEN_PID`); empty otherwise, or on a second call in the same process.
pub(crate) fn take() -> Vec<Activated> {
    if !cfg!(feature = "systemd") {
        return Vec::new();
    }
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let var = |name: &str| std::env::var(name).ok();
    let (pid, fds, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
    if fds.is_none() || TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Vec::new();
    }
    let passed = match parse(pid.as_deref(), fds.as_deref(), names.as_deref(), std::process::id()) {
        Ok(passed) => passed,
        Err(why) => {
            tracing::warn!("ignoring socket activation (LISTEN_PID={pid:?}, LISTEN_FDS={fds:?}): {why}");
            return Vec::new();
        }
    };
    if pid.is_none() {
        if let Err(why) = passed.iter().try_for_each(|(fd, _)| passed_across_exec(*fd)) {
            tracing::warn!("ignoring socket activation (LISTEN_FDS={fds:?} without LISTEN_PID): {why}");
            return Vec::new();
        }
        tracing::info!(
            count = passed.len(),
            "socket activation without LISTEN_PID (systemfd --no-pid): every descriptor was passed across exec"
        );
    }
    passed
        .into_iter()
        .filter_map(|(fd, name)| match own(fd) {
            Ok(fd) => Some(Activated { name, fd }),
            Err(why) => {
                tracing::warn!(fd, ?name, "ignoring an activated descriptor: {why}");
                None
            }
        })
        .collect()
}

/// The descriptors and names the variables describe, if they are for process `our_pid` (or
/// for no process in particular: `LISTEN_PID` unset, see the module's docs).
fn parse(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    our_pid: u32,
) -> Result<Vec<(RawFd, Option<String>)>, String> {
    if let Some(pid) = pid {
        let pid: u32 = pid.parse().map_err(|_| "LISTEN_PID is not a pid")?;
        if pid != our_pid {
            return Err(format!("they are for pid {pid}, not for us ({our_pid})"));
        }
    }
    let count: usize = fds
        .ok_or("LISTEN_FDS is not set")?
        .parse()
        .map_err(|_| "LISTEN_FDS is not a count")?;
    if count > MAX_FDS {
        return Err(format!("{count} descriptors is more than {MAX_FDS}"));
    }
    let mut names = names.map(|n| n.split(':')).into_iter().flatten();
    Ok((0..count)
        .map(|i| {
            let name = names.next().filter(|n| !n.is_empty()).map(str::to_owned);
            (FIRST_FD + i as RawFd, name)
        })
        .collect())
}

/// Whether `fd`, named by `LISTEN_FDS` without `LISTEN_PID`, was passed to us: open, not
/// close-on-exec, and a socket the registry can serve (see the module's docs).
fn passed_across_exec(fd: RawFd) -> Result<(), String> {
    // SAFETY: F_GETFD reads a flag of a descriptor number; on one that is not open it fails
    // with EBADF and changes nothing.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(format!("descriptor {fd} is not open"));
    }
    if flags & libc::FD_CLOEXEC != 0 {
        return Err(format!(
            "descriptor {fd} is close-on-exec: this process opened it, nobody passed it"
        ));
    }
    // SAFETY: `fd` is open (just checked); the borrow lives for this call only, which reads
    // socket options and closes nothing.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let socket = socket2::SockRef::from(&borrowed);
    let ty = socket
        .r#type()
        .map_err(|_| format!("descriptor {fd} is not a socket"))?;
    let serves = match ty {
        socket2::Type::STREAM => socket.is_listener().unwrap_or(false),
        socket2::Type::DGRAM => true,
        _ => false,
    };
    if !serves {
        return Err(format!(
            "descriptor {fd} is not a listening stream socket nor a datagram socket"
        ));
    }
    Ok(())
}

/// Owns `fd` once it is known to be open, and marks it close-on-exec (sd_listen_fds does
/// too): the manager passed it to this process, as `LISTEN_PID` says, for us alone.
fn own(fd: RawFd) -> Result<OwnedFd, String> {
    // SAFETY: F_GETFD reads a flag of a descriptor number; on one that is not open it fails
    // with EBADF and changes nothing.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("not open ({})", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is open, and the service manager placed it here for this process
    // (LISTEN_PID is our pid): nothing else in the process owns it; `take` runs once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Err(error) = fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
        tracing::warn!(fd, %error, "could not mark an activated socket close-on-exec");
    }
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_onto_descriptors_from_3_and_missing_ones_are_unnamed() {
        let parsed = parse(Some("7"), Some("3"), Some("http::metrics.socket"), 7).unwrap();
        assert_eq!(
            parsed,
            [
                (3, Some("http".to_owned())),
                (4, None),
                (5, Some("metrics.socket".to_owned()))
            ]
        );
        assert_eq!(parse(Some("7"), Some("2"), None, 7).unwrap(), [(3, None), (4, None)]);
    }

    #[test]
    fn without_listen_pid_only_descriptors_passed_across_exec_are_taken() {
        use std::os::fd::AsRawFd;
        assert_eq!(parse(None, Some("1"), None, 7).unwrap(), [(3, None)]);
        // Opened by this process: close-on-exec, as Rust opens everything.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = listener.as_raw_fd();
        let refused = passed_across_exec(fd).unwrap_err();
        assert!(refused.contains("close-on-exec"), "{refused}");
        // As a launcher leaves it: close-on-exec cleared.
        fcntl(&listener, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        passed_across_exec(fd).unwrap();
        // Not a listener: a connected stream, a pipe.
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        fcntl(&client, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        assert!(passed_across_exec(client.as_raw_fd()).is_err());
        let (pipe, _write) = nix::unistd::pipe().unwrap();
        fcntl(&pipe, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        assert!(passed_across_exec(pipe.as_raw_fd())
            .unwrap_err()
            .contains("not a socket"));
    }

    #[test]
    fn variables_for_another_process_or_garbage_are_refused() {
        let error = parse(Some("8"), Some("1"), Some("http"), 7).unwrap_err();
        assert_eq!(error, "they are for pid 8, not for us (7)");
        assert!(parse(Some("7"), None, None, 7).is_err());
        assert!(parse(Some("7"), Some("-1"), None, 7).is_err());
        assert!(parse(Some("7"), Some("1000000"), None, 7).is_err());
        assert!(parse(Some("x"), Some("1"), None, 7).is_err());
    }
}
