//! [`Child`]: a process we spawned (a successor), its exit awaited through a pidfd or, without
//! one (Linux before 5.3), a thread of its own, and reaped with `waitpid`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::oneshot;

/// A spawned child process (a successor): its exit awaited through a pidfd (or, without one,
/// a thread of its own), reaped with `waitpid`. Dropped before it was reaped, it is reaped by a thread of its
/// own (it may be running still: a committed successor outlives us).
#[derive(Debug)]
pub(crate) struct Child {
    pid: libc::pid_t,
    exit: Exit,
    status: Option<ExitStatus>,
}

/// How a child's exit is learnt.
#[derive(Debug)]
enum Exit {
    /// A pidfd, readable once the process has exited (we reap it then).
    Pidfd(AsyncFd<OwnedFd>),
    /// A thread that waits for it, reaps it and sends its status.
    Thread(oneshot::Receiver<io::Result<ExitStatus>>),
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
            Some(Err(_)) | None => Exit::Thread(reaper(pid)),
        };
        Ok(Self {
            pid,
            exit,
            status: None,
        })
    }

    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Waits for it to exit, and reaps it.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the status is taken only by the call that returns it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = match &mut self.exit {
            Exit::Pidfd(fd) => {
                let mut ready = fd.readable().await?;
                ready.retain_ready();
                reap(self.pid)?
            }
            Exit::Thread(exited) => exited
                .await
                .map_err(|_| io::Error::other("the reaper thread is gone"))??,
        };
        self.status = Some(status);
        Ok(status)
    }

    /// Sends `SIGKILL`, unless it has been reaped (its pid may then be another process's).
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
            Exit::Thread(exited) => match exited.try_recv() {
                // Reaped already: nothing to kill.
                Ok(status) => {
                    self.status = Some(status?);
                    return Ok(());
                }
                // Not reaped when we looked (the thread may reap it an instant later: a pid
                // is reused only after many others, so the window is only theoretical).
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
        if self.status.is_none() && matches!(self.exit, Exit::Pidfd(_)) {
            let pid = self.pid;
            let _ = std::thread::Builder::new()
                .name("handoff-reaper".into())
                .spawn(move || reap(pid));
        }
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

/// A thread that waits for `pid` to exit and reaps it: what watches a child without a pidfd.
fn reaper(pid: libc::pid_t) -> oneshot::Receiver<io::Result<ExitStatus>> {
    let (exited, receiver) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("handoff-reaper".into())
        .spawn(move || drop(exited.send(reap(pid))));
    if let Err(error) = spawned {
        let (failed, receiver) = oneshot::channel();
        let _ = failed.send(Err(error));
        return receiver;
    }
    receiver
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
