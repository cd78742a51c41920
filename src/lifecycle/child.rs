//! [`Child`]: a process we spawned (a successor), its exit awaited through a pidfd or, without
//! one (Linux before 5.3), a thread of its own, and reaped with `waitpid`, or left unreaped
//! once it holds the service (its status then belongs to whoever inherits it when we exit:
//! the service manager, which takes it for the service's exit status).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use nix::errno::Errno;
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::oneshot;

/// A spawned child process (a successor): its exit awaited through a pidfd (or, without one,
/// a thread of its own), reaped with `waitpid`. Dropped before it was reaped, it is reaped by a thread of its
/// own (it may be running still), unless it was [disowned](Child::disown).
#[derive(Debug)]
pub(crate) struct Child {
    pid: libc::pid_t,
    exit: Exit,
    status: Option<ExitStatus>,
    reaped: bool,
    disowned: bool,
}

/// How a child's exit is learnt.
#[derive(Debug)]
enum Exit {
    /// A pidfd, readable once the process has exited (a zombie, reaped only by `wait`).
    Pidfd(AsyncFd<OwnedFd>),
    /// A thread that waits for it to exit and sends its status, leaving it unreaped; `None`
    /// once it has answered with an error.
    Thread(Option<oneshot::Receiver<io::Result<ExitStatus>>>),
}

impl Child {
    /// The handle on the child `pid`, just spawned: through a pidfd if `pidfd` (and the
    /// kernel has them), else a thread that waits for it.
    pub fn new(pid: libc::pid_t, pidfd: bool) -> io::Result<Self> {
        let exit = match pidfd.then(|| pidfd_open(pid)) {
            Some(Ok(fd)) => Exit::Pidfd(fd),
            Some(Err(error)) if error.raw_os_error() != Some(libc::ENOSYS) => {
                // No handle on it: do not leave it running unwatched.
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                let _ = reap(pid);
                return Err(error);
            }
            Some(Err(_)) | None => Exit::Thread(Some(watcher(pid))),
        };
        Ok(Self {
            pid,
            exit,
            status: None,
            reaped: false,
            disowned: false,
        })
    }

    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Waits for it to exit, and reaps it.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the status is kept once learnt, and the reap that follows does not wait.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.exited().await?;
        if !self.reaped {
            reap(self.pid)?;
            self.reaped = true;
        }
        Ok(status)
    }

    /// Waits for it to exit and returns its status, leaving it unreaped (a zombie, whose pid
    /// no other process can take): a successor that holds the service is reaped by whoever
    /// inherits it when we exit, and its status is the service's.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the status is kept once learnt.
    pub async fn exited(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = match &mut self.exit {
            Exit::Pidfd(fd) => {
                let mut ready = fd.readable().await?;
                ready.retain_ready();
                status_unreaped(self.pid)?
            }
            Exit::Thread(watching) => {
                let Some(exited) = watching else {
                    return Err(io::Error::other("its exit could not be read"));
                };
                let answer = exited
                    .await
                    .map_err(|_| io::Error::other("the watching thread is gone"))
                    .and_then(|answer| answer);
                if answer.is_err() {
                    *watching = None; // answered: never polled again
                }
                answer?
            }
        };
        self.status = Some(status);
        Ok(status)
    }

    /// Leaves it to whoever inherits it when we exit: never reaped by us, even once dropped.
    /// For a successor that holds the service: its exit status is the service's, which a
    /// supervisor (systemd, `handoverctl run`) learns only by reaping it itself.
    pub fn disown(&mut self) {
        self.disowned = true;
    }

    /// Sends `SIGKILL`, unless it has exited (once reaped, its pid may be another process's).
    pub fn start_kill(&mut self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        let result = match &mut self.exit {
            // SAFETY: pidfd_send_signal signals the process the pidfd refers to, never a
            // reused pid.
            Exit::Pidfd(fd) => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.get_ref().as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            },
            // Its exit could not be read: the pid may be another process's now.
            Exit::Thread(None) => return Err(io::Error::other("its exit could not be read")),
            Exit::Thread(Some(exited)) => match exited.try_recv() {
                // Exited already: nothing to kill.
                Ok(Ok(status)) => {
                    self.status = Some(status);
                    return Ok(());
                }
                Ok(Err(error)) => {
                    self.exit = Exit::Thread(None); // answered: never polled again
                    return Err(error);
                }
                // Running, or exited and unreaped (the thread never reaps): the pid is its.
                // SAFETY: kill sends a signal to a pid.
                Err(_) => unsafe { libc::kill(self.pid, libc::SIGKILL) }.into(),
            },
        };
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Kills it and waits until it is reaped.
    pub async fn kill(&mut self) -> io::Result<()> {
        self.start_kill()?;
        self.wait().await.map(drop)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.reaped || self.disowned {
            return;
        }
        // It may be running still: reaping blocks, so off the runtime's threads.
        let pid = self.pid;
        let _ = std::thread::Builder::new()
            .name("handoff-reaper".into())
            .spawn(move || reap(pid));
    }
}

/// A pidfd for `pid`, close-on-exec, registered with the runtime.
fn pidfd_open(pid: libc::pid_t) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_open just returned this new descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let _ = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    // SAFETY: an `OwnedFd` is open until dropped, which happens only with the `AsyncFd`,
    // and always returns the same descriptor; we never swap it through `get_mut`.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)
}

/// A thread that waits for `pid` to exit, without reaping it: what watches a child without a
/// pidfd.
fn watcher(pid: libc::pid_t) -> oneshot::Receiver<io::Result<ExitStatus>> {
    let (exited, receiver) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("handoff-watcher".into())
        .spawn(move || drop(exited.send(wait_unreaped(pid, WaitPidFlag::empty()))));
    if let Err(error) = spawned {
        let (failed, receiver) = oneshot::channel();
        let _ = failed.send(Err(error));
        return receiver;
    }
    receiver
}

/// The status of our child `pid`, which has exited, leaving it unreaped.
fn status_unreaped(pid: libc::pid_t) -> io::Result<ExitStatus> {
    wait_unreaped(pid, WaitPidFlag::WNOHANG)
}

/// `waitid(WEXITED | WNOWAIT)` on our child `pid`, retried on `EINTR`.
fn wait_unreaped(pid: libc::pid_t, flags: WaitPidFlag) -> io::Result<ExitStatus> {
    let flags = flags | WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
    loop {
        match waitid(Id::Pid(Pid::from_raw(pid)), flags) {
            // `ExitStatus` holds a raw wait status: the code in the second byte, a signal in
            // the low bits with 0x80 for a core dump.
            Ok(WaitStatus::Exited(_, code)) => return Ok(ExitStatus::from_raw((code & 0xff) << 8)),
            Ok(WaitStatus::Signaled(_, signal, core)) => {
                return Ok(ExitStatus::from_raw(signal as i32 | if core { 0x80 } else { 0 }))
            }
            Ok(other) => return Err(io::Error::other(format!("pid {pid} has not exited: {other:?}"))),
            Err(Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
}

/// `waitpid` on our child `pid`, retried on `EINTR`.
fn reap(pid: libc::pid_t) -> io::Result<ExitStatus> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into the integer we own.
        if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
            return Ok(ExitStatus::from_raw(status));
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child of ours that exits with `code` at once: its pid, the `std` handle forgotten
    /// (it never reaps): the tests reap it through `Child`, or by hand.
    #[allow(clippy::zombie_processes)]
    fn exiting(code: i32) -> libc::pid_t {
        let child = std::process::Command::new("sh")
            .args(["-c", &format!("exit {code}")])
            .spawn()
            .unwrap();
        child.id() as libc::pid_t
    }

    fn is_zombie(pid: libc::pid_t) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
    }

    #[tokio::test]
    async fn exited_leaves_it_unreaped_and_wait_reaps_it() {
        for pidfd in [true, false] {
            let pid = exiting(3);
            let mut child = Child::new(pid, pidfd).unwrap();
            assert_eq!(child.exited().await.unwrap().code(), Some(3));
            assert!(is_zombie(pid), "pidfd {pidfd}: its status is left for whoever reaps it");
            assert_eq!(child.exited().await.unwrap().code(), Some(3), "asked again");
            assert_eq!(child.wait().await.unwrap().code(), Some(3));
            assert!(
                !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "pidfd {pidfd}: reaped"
            );
        }
    }

    #[tokio::test]
    async fn a_disowned_child_is_not_reaped_when_dropped() {
        for pidfd in [true, false] {
            let pid = exiting(5);
            let mut child = Child::new(pid, pidfd).unwrap();
            child.exited().await.unwrap();
            child.disown();
            drop(child);
            // Still ours to reap: nobody took its status.
            let mut status = 0;
            // SAFETY: waitpid writes the status into the integer we own.
            let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            assert_eq!(reaped, pid, "pidfd {pidfd}: its status was still there");
            assert_eq!(ExitStatus::from_raw(status).code(), Some(5));
        }
    }
}
