//! The successor's side of a handoff: find the channel the predecessor left us, receive and
//! check its hello and the sockets, then say hello and whether we accept them.
//!
//! # The commit rule, and a predecessor that is gone before it
//!
//! The predecessor's commit is the point of no return (see `machine`): until it, this
//! process does nothing that cannot be undone (it owns no shared path, writes no PID file,
//! answers no control command), so that a predecessor that gives up leaves nothing behind.
//!
//! A predecessor that is gone before its commit (killed, crashed: its end of the channel is
//! closed, without a verdict) can neither commit nor object, nor serve the sockets it put on
//! the channel. Then this process decides alone:
//! - if the handoff is complete (the predecessor's hello and every socket of its manifest are
//!   on the channel, read before we say anything), it adopts them and serves, as after a
//!   commit: the sockets in flight are the listeners themselves, with their accept queues, and
//!   binding anew while they are in flight would fail (`AddrInUse`) or strand their clients.
//!   This holds even when the predecessor died before this process took its channel: the
//!   channel is then no longer our parent's (we were reparented), but its creator is the pid
//!   that started us (`HANDOFF_PREDECESSOR_PID`) and is gone, so the channel was ours;
//! - if it is incomplete (the predecessor died mid-transfer), the start fails with
//!   [`Error::Inherit`] and the channel is closed, releasing whatever was still in flight: a
//!   restart binds afresh. Never the one without the other.
//!
//! Our own messages (hello, accepted, ready) to a predecessor that is gone fail with a broken
//! pipe, which is no error here: it can read nothing more, and decided nothing.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

use super::program::PREDECESSOR_PID_VAR;
use super::progress;
use crate::error::Error;
use crate::wire::{self, Channel, Message, SocketEntry, WireError, CHANNEL_FD_VAR, PROTOCOL_VERSION};

/// What a successor received from its predecessor.
#[derive(Debug)]
pub(crate) struct Inheritance {
    pub channel: Channel,
    pub predecessor_pid: u32,
    pub generation: u64,
    pub sockets: Vec<(SocketEntry, OwnedFd)>,
    /// The application's state stream, if the predecessor sends one.
    pub state: Option<OwnedFd>,
}

/// What the handshake brought: the predecessor's pid, our generation, the sockets and the
/// state stream.
type Handshake = (u32, u64, Vec<(SocketEntry, OwnedFd)>, Option<OwnedFd>);

/// Takes the channel named by `HANDOFF_FD`, if the variable is set and names what a
/// predecessor leaves: an open `AF_UNIX` `SOCK_SEQPACKET` socket created by our parent, or
/// by the process that started us (`HANDOFF_PREDECESSOR_PID`) if that one is gone (we were
/// orphaned before we took the channel: see the module's commit rule).
///
/// Anything else (a stale variable in an environment copied from an old generation, a pipe,
/// one of the runtime's own descriptors) is ignored with a warning, and never closed: every
/// check runs on the bare number, and the descriptor is owned only once they all pass.
///
/// The variable stays in the environment (changing it while other threads may read it is
/// undefined behaviour); we start our own successors with an environment built for them, and
/// a process that inherits the stale variable from us finds its number fails these checks.
fn take_channel() -> Option<OwnedFd> {
    let value = std::env::var_os(CHANNEL_FD_VAR)?;
    // One owner per process: a second `start()` must not own the descriptor again.
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        tracing::warn!("{CHANNEL_FD_VAR} was already taken by an earlier start in this process");
        return None;
    }
    let fd = value
        .to_str()
        .and_then(|v| v.parse::<RawFd>().ok())
        .filter(|fd| *fd > 2);
    let checked = match fd {
        Some(fd) => check_channel(fd).map(|()| fd),
        None => Err("not a descriptor number above 2".into()),
    };
    match checked {
        Ok(fd) => {
            // SAFETY: `fd` is open and is a Unix SEQPACKET socket whose creator is our parent
            // (checked above): the channel our predecessor left open for us alone and named
            // in the variable. Nothing else in this process knows of it, so this is its one
            // owner.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            if let Err(error) = fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
                tracing::warn!(%error, "could not mark the handoff channel close-on-exec");
            }
            Some(owned)
        }
        Err(why) => {
            tracing::warn!("ignoring {CHANNEL_FD_VAR}={value:?}: {why}; starting as a first generation");
            None
        }
    }
}

/// Checks, without taking ownership, that `fd` is a channel our parent created for us.
fn check_channel(fd: RawFd) -> Result<(), String> {
    // SAFETY (every call below): fstat and getsockopt read a descriptor's metadata into
    // buffers we own; on a number that is not open they fail with EBADF and change nothing.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return Err(format!("not an open descriptor ({})", std::io::Error::last_os_error()));
    }
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err("not a socket".into());
    }
    let domain = socket_option::<libc::c_int>(fd, libc::SO_DOMAIN)?;
    let kind = socket_option::<libc::c_int>(fd, libc::SO_TYPE)?;
    if (domain, kind) != (libc::AF_UNIX, libc::SOCK_SEQPACKET) {
        return Err(format!("not a Unix SEQPACKET socket (domain {domain}, type {kind})"));
    }
    let creator = socket_option::<libc::ucred>(fd, libc::SO_PEERCRED)?;
    let parent = nix::unistd::getppid().as_raw();
    if creator.pid == parent {
        return Ok(());
    }
    let started_by = std::env::var(PREDECESSOR_PID_VAR)
        .ok()
        .and_then(|pid| pid.parse::<libc::pid_t>().ok());
    if started_by == Some(creator.pid) && process_gone(creator.pid) {
        tracing::warn!(
            predecessor_pid = creator.pid,
            "the predecessor that started us is gone before its commit: adopting what it left on the channel"
        );
        return Ok(());
    }
    Err(format!(
        "created by pid {}, not by our parent (pid {parent})",
        creator.pid
    ))
}

/// Whether process `pid` is gone: no such process, a zombie, or a process started after
/// this one (the pid reused: a channel's creator existed before the process it started).
/// When `/proc` cannot tell, it is not gone.
fn process_gone(pid: libc::pid_t) -> bool {
    let theirs = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        Err(error) => return error.kind() == std::io::ErrorKind::NotFound,
    };
    let ours = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    match (state_and_start(&theirs), state_and_start(&ours)) {
        (Some(("Z" | "X", _)), _) => true,
        (Some((_, theirs)), Some((_, ours))) => theirs > ours,
        _ => false,
    }
}

/// A process's state and start time (in clock ticks since boot) from its `/proc/PID/stat`.
fn state_and_start(stat: &str) -> Option<(&str, u64)> {
    // The fields after the command name, which is in parentheses and may hold anything.
    let (_, rest) = stat.rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 is the state, field 22 the start time: the 1st and 20th after the name.
    Some((fields.first()?, fields.get(19)?.parse().ok()?))
}

/// Reads a `SOL_SOCKET` option of type `T` from the bare descriptor number `fd`.
fn socket_option<T: Copy>(fd: RawFd, option: libc::c_int) -> Result<T, String> {
    let mut value = std::mem::MaybeUninit::<T>::zeroed();
    let mut length = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `length` bytes into `value`, which has room for them;
    // a descriptor that is not a socket gives ENOTSOCK and writes nothing.
    let result = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, option, value.as_mut_ptr().cast(), &mut length) };
    if result != 0 {
        return Err(format!("getsockopt: {}", std::io::Error::last_os_error()));
    }
    if length as usize != std::mem::size_of::<T>() {
        return Err(format!("getsockopt returned {length} bytes"));
    }
    // SAFETY: zero-initialised, then filled by the kernel: every `T` used here (c_int,
    // ucred) is plain integers, valid for any bytes.
    Ok(unsafe { value.assume_init() })
}

/// Runs the successor's side of the handshake, all of it (the replies too) bounded by
/// `timeout`. `Ok(None)` when this process was not started by an upgrade.
pub(crate) async fn inherit(timeout: Duration) -> Result<Option<Inheritance>, Error> {
    let Some(fd) = take_channel() else {
        return Ok(None);
    };
    progress::mark_successor_start();
    let mut channel = Channel::new(fd).map_err(|e| Error::Inherit(e.into()))?;
    let exchange = async {
        match handshake(&mut channel).await {
            Ok(inherited) => {
                progress::mark("inherited");
                say(&channel, &Message::Accepted).await?;
                Ok(inherited)
            }
            Err(error) => {
                // Every descriptor received is closed by now; tell the predecessor why.
                let reason = error.to_string();
                let _ = channel.send(&Message::Rejected { reason }, &[]).await;
                Err(error)
            }
        }
    };
    let (predecessor_pid, generation, sockets, state) = match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result.map_err(Error::Inherit)?,
        Err(_) => {
            return Err(Error::Inherit(WireError::TimedOut {
                waiting_for: "complete handoff",
                after: timeout,
            }))
        }
    };
    Ok(Some(Inheritance {
        channel,
        predecessor_pid,
        generation,
        sockets,
        state,
    }))
}

async fn handshake(channel: &mut Channel) -> Result<Handshake, WireError> {
    // A socketpair reports its creator on both ends: the predecessor, our parent (checked
    // with the descriptor, in `check_channel`); here, its user.
    let predecessor = wire::check_same_user(channel)?;
    // Everything the predecessor sends unasked (its hello, the sockets) is read before we
    // say anything: should it be gone, all it left is ours (and no message of ours that it
    // never read turns our next read into a reset).
    let (generation, with_state) = match channel.recv("hello").await?.message {
        Message::Hello {
            protocol,
            generation: Some(generation),
            state,
            ..
        } => {
            wire::check_version(protocol)?;
            (generation, state)
        }
        Message::Hello {
            protocol,
            generation: None,
            ..
        } => {
            wire::check_version(protocol)?;
            return Err(WireError::Peer("predecessor's hello carries no generation".into()));
        }
        other => {
            return Err(WireError::Unexpected {
                expected: "hello",
                got: other.kind(),
            })
        }
    };
    let (_, sockets) = wire::recv_sockets(channel).await?;
    let state = match with_state {
        true => Some(wire::recv_state(channel).await?),
        false => None,
    };
    let hello = Message::Hello {
        protocol: PROTOCOL_VERSION,
        pid: std::process::id(),
        generation: None,
        state: false,
    };
    say(channel, &hello).await?;
    Ok((predecessor.pid() as u32, generation, sockets, state))
}

/// Sends `message` to the predecessor. One that is gone cannot read it, which is no error:
/// it decided nothing, and we decide alone (see the module's commit rule; the wait for its
/// verdict finds it gone).
async fn say(channel: &Channel, message: &Message) -> Result<(), WireError> {
    match channel.send(message, &[]).await {
        Err(error) if error.is_peer_gone() => {
            tracing::debug!(%error, kind = message.kind(), "the predecessor is gone; not told");
            Ok(())
        }
        sent => sent,
    }
}

/// How the predecessor answered our ready.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// It committed: it has stopped accepting and drains. With its upgrade counters, if it
    /// sent them, for ours to go on from, and the generations still draining.
    Committed {
        counters: Option<serde_json::Value>,
        elders: Vec<crate::wire::Elder>,
    },
    /// It closed the channel without a word (it died): we hold every socket and serve alone.
    Vanished,
}

/// Sends `Ready` and waits, at most `timeout`, for the predecessor's verdict.
///
/// At the timeout we stop receiving before giving up, then read what is already queued: a
/// commit the predecessor managed to send still counts, and one it sends later fails on its
/// side (a broken pipe), so that exactly one of us decides.
pub(crate) async fn await_commit(channel: &mut Channel, startup_ms: u64, timeout: Duration) -> Result<Verdict, Error> {
    progress::mark("ready");
    let exchange = async {
        channel.send(&Message::Ready { startup_ms }, &[]).await?;
        let answer = channel.recv_or_eof().await;
        progress::mark("verdict");
        answer
    };
    let answer = match tokio::time::timeout(timeout, exchange).await {
        Ok(answer) => answer,
        Err(_elapsed) => {
            channel.stop_receiving().map_err(|e| Error::Ready(e.into()))?;
            match channel.try_recv() {
                Ok(Some(received)) => Ok(Some(received)),
                Ok(None) => {
                    return Err(Error::Ready(WireError::TimedOut {
                        waiting_for: "commit",
                        after: timeout,
                    }))
                }
                Err(error) => Err(error),
            }
        }
    };
    match answer {
        Ok(Some(received)) => match received.message {
            Message::Commit { counters, elders } => Ok(Verdict::Committed { counters, elders }),
            Message::Abort { reason } => Err(Error::Ready(WireError::Refused(reason))),
            other => Err(Error::Ready(WireError::Unexpected {
                expected: "commit",
                got: other.kind(),
            })),
        },
        Ok(None) => Ok(Verdict::Vanished),
        Err(error) if error.is_peer_gone() => Ok(Verdict::Vanished),
        Err(error) => Err(Error::Ready(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::process_gone;

    #[test]
    fn a_process_is_gone_once_exited_and_reaped_never_while_it_runs() {
        assert!(!process_gone(std::process::id() as libc::pid_t));
        assert!(
            !process_gone(nix::unistd::getppid().as_raw()),
            "our parent is older than us"
        );
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as libc::pid_t;
        child.wait().unwrap();
        // Reaped: no such process (or, should the pid be reused at once, a younger one).
        assert!(process_gone(pid));
    }
}
