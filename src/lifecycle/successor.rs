//! The predecessor's side of a handoff: start the successor, hand it the sockets, wait for its
//! ready; on any failure kill and reap it.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{pthread_sigmask, SigmaskHow};
use tokio::process::{Child, Command};

use super::inheritance::CHANNEL_FD_VAR;
use super::trigger;
use super::upgrade_error::{Phase, UpgradeError, UpgradeReport};
use crate::wire::{self, Channel, Message, SocketEntry, WireError, PROTOCOL_VERSION};

/// How to start a successor: what this process was started as, captured at start-up.
#[derive(Debug, Clone)]
pub(crate) struct Program {
    /// The executable's path on disk (not `/proc/self/exe`, which would run the old inode
    /// again): replacing the file and then upgrading runs the new code.
    pub executable: PathBuf,
    /// `argv`, including `argv[0]`.
    pub args: Vec<OsString>,
    /// The working directory.
    pub cwd: PathBuf,
}

impl Program {
    pub(crate) fn current() -> std::io::Result<Self> {
        let mut executable = std::env::current_exe()?;
        // If the binary was replaced between our exec and now, the kernel's link reads
        // "/path (deleted)": the path a deploy wrote to is the one without the suffix.
        if let Some(path) = executable.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
            executable = PathBuf::from(path);
        }
        Ok(Self {
            executable,
            args: std::env::args_os().collect(),
            cwd: std::env::current_dir()?,
        })
    }
}

/// A successor that has reported ready: its process and our end of its channel. Keep both
/// until this process exits: the successor reads our exit as EOF on the channel.
#[derive(Debug)]
pub(crate) struct ReadySuccessor {
    pub child: Child,
    pub channel: Channel,
    pub report: UpgradeReport,
}

impl ReadySuccessor {
    /// After the commit: keeps our end of the channel open until this process exits (the
    /// successor reads our exit as EOF) and reaps the successor should it die first.
    pub fn keep_until_exit(self) {
        let Self {
            mut child,
            channel,
            report,
        } = self;
        tokio::spawn(async move {
            let _channel = channel;
            if let Ok(status) = child.wait().await {
                tracing::error!(successor_pid = report.successor_pid, %status, "successor exited while this process drains");
            }
        });
    }

    /// Instead of the commit: tells the successor why (it exits without having acted), then
    /// kills and reaps it.
    pub async fn abandon(self, reason: &str) {
        let Self { child, channel, .. } = self;
        let abort = Message::Abort { reason: reason.into() };
        let _ = tokio::time::timeout(EXIT_GRACE, channel.send(&abort, &[])).await;
        KillOnFailure(Some(child)).kill_and_reap().await;
    }
}

/// Starts the successor (generation `next_generation`) and hands it `sockets`; returns once
/// it is ready, and before anything is committed.
pub(crate) async fn launch(
    program: &Program,
    next_generation: u64,
    sockets: Vec<(SocketEntry, OwnedFd)>,
    timeout: Duration,
    cancelled: impl std::future::Future<Output = ()>,
) -> Result<ReadySuccessor, UpgradeError> {
    let started = Instant::now();
    let (ours, theirs) = wire::pair().map_err(UpgradeError::Io)?;
    let mut channel = Channel::new(ours).map_err(UpgradeError::Io)?;
    channel.receive_credentials().map_err(UpgradeError::Io)?;
    let child = spawn(program, theirs.as_fd()).map_err(|source| UpgradeError::Spawn {
        executable: program.executable.clone(),
        source,
    })?;
    // Only the child holds its end now: its exit shows up as EOF on ours.
    drop(theirs);
    let mut guard = KillOnFailure(Some(child));
    let pid = guard.pid();
    tracing::info!(successor_pid = pid, generation = next_generation, "successor started");

    let mut phase = Phase::Hello;
    let outcome = {
        let handshake = handshake(&mut channel, pid, next_generation, &sockets, &mut phase);
        tokio::select! {
            result = tokio::time::timeout(timeout, handshake) => match result {
                Ok(Ok(count)) => Outcome::Ready(count),
                Ok(Err(error)) => Outcome::Failed(error),
                Err(_elapsed) => Outcome::TimedOut,
            },
            status = guard.child().wait() => Outcome::Exited(status),
            () = cancelled => Outcome::Cancelled,
        }
    };
    drop(sockets);
    let error = match outcome {
        Outcome::Ready(count) => {
            let report = UpgradeReport {
                successor_pid: pid,
                generation: next_generation,
                sockets: count,
                elapsed: started.elapsed(),
            };
            return Ok(ReadySuccessor {
                child: guard.disarm(),
                channel,
                report,
            });
        }
        Outcome::Exited(status) => {
            guard.disarm(); // wait() has reaped it
            return Err(match status {
                Ok(status) => UpgradeError::Exited { pid, status, phase },
                Err(e) => UpgradeError::Io(e),
            });
        }
        Outcome::Failed(WireError::Refused(reason)) if matches!(phase, Phase::Hello | Phase::Adoption) => {
            UpgradeError::Rejected { pid, reason }
        }
        Outcome::Failed(source) if peer_gone(&source) => {
            // EOF or a broken pipe on the channel usually means the successor died (we send
            // before it says hello: a successor that exits at once breaks our pipe): report
            // how, if it did.
            match tokio::time::timeout(EXIT_GRACE, guard.child().wait()).await {
                Ok(Ok(status)) => {
                    guard.disarm();
                    return Err(UpgradeError::Exited { pid, status, phase });
                }
                _ => UpgradeError::Protocol { pid, phase, source },
            }
        }
        Outcome::Failed(source) => UpgradeError::Protocol { pid, phase, source },
        Outcome::TimedOut => UpgradeError::Timeout {
            pid,
            after: timeout,
            phase,
        },
        Outcome::Cancelled => UpgradeError::Cancelled { pid, phase },
    };
    guard.kill_and_reap().await;
    Err(error)
}

/// Whether `error` says the other end of the channel is closed.
fn peer_gone(error: &WireError) -> bool {
    match error {
        WireError::Closed { .. } => true,
        WireError::Io(e) => matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        _ => false,
    }
}

/// How long to wait for a successor's exit status once its channel has closed.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// How the wait for a successor ended.
enum Outcome {
    Ready(usize),
    Failed(WireError),
    TimedOut,
    Exited(std::io::Result<std::process::ExitStatus>),
    Cancelled,
}

/// Our hello and the sockets at once, then the successor's hello, its verdict and its ready.
/// Updates `phase` as it goes so that a timeout can say what was awaited.
///
/// We send before hearing from the successor: only the child we spawned holds the other end
/// of the channel, and not waiting for it takes a round trip through this (busy, serving)
/// process off the successor's path to ready. Its hello is still checked (its pid, its user,
/// its version) before its ready counts.
async fn handshake(
    channel: &mut Channel,
    pid: u32,
    next_generation: u64,
    sockets: &[(SocketEntry, OwnedFd)],
    phase: &mut Phase,
) -> Result<usize, WireError> {
    *phase = Phase::Transfer;
    let hello = Message::Hello {
        protocol: PROTOCOL_VERSION,
        pid: std::process::id(),
        generation: Some(next_generation),
    };
    channel.send(&hello, &[]).await?;
    let borrowed: Vec<(SocketEntry, BorrowedFd<'_>)> = sockets.iter().map(|(e, fd)| (e.clone(), fd.as_fd())).collect();
    wire::send_sockets(channel, next_generation - 1, &borrowed).await?;

    *phase = Phase::Hello;
    let hello = channel.recv("hello").await?;
    wire::check_sender(&hello, pid)?;
    wire::check_same_user(channel)?;
    match hello.message {
        Message::Hello { protocol, .. } => {
            if let Err(e) = wire::check_version(protocol) {
                let _ = channel.send(&Message::Abort { reason: e.to_string() }, &[]).await;
                return Err(e);
            }
        }
        Message::Rejected { reason } => return Err(WireError::Refused(reason)),
        other => {
            return Err(WireError::Unexpected {
                expected: "hello",
                got: other.kind(),
            })
        }
    }

    *phase = Phase::Adoption;
    let verdict = channel.recv("accepted").await?;
    wire::check_sender(&verdict, pid)?;
    match verdict.message {
        Message::Accepted => {}
        Message::Rejected { reason } => return Err(WireError::Refused(reason)),
        other => {
            return Err(WireError::Unexpected {
                expected: "accepted",
                got: other.kind(),
            })
        }
    }

    *phase = Phase::Startup;
    let ready = channel.recv("ready").await?;
    wire::check_sender(&ready, pid)?;
    match ready.message {
        Message::Ready { .. } => Ok(sockets.len()),
        other => Err(WireError::Unexpected {
            expected: "ready",
            got: other.kind(),
        }),
    }
}

/// Variables that describe descriptors of this process, which a successor must not
/// mistake for its own: systemd's socket activation (read once, by the first generation).
const FOREIGN_DESCRIPTOR_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// Starts the executable with our arguments, working directory and environment, plus the
/// channel's descriptor number. The channel is the only descriptor it inherits: in the child,
/// between `fork` and `exec`, every descriptor above stderr is marked close-on-exec (one
/// inherited without the flag, a wrapper's lock file say, would otherwise reach every
/// generation), then the channel's flag is cleared.
fn spawn(program: &Program, channel: BorrowedFd<'_>) -> std::io::Result<Child> {
    let fd = channel.as_raw_fd();
    let mut command = Command::new(&program.executable);
    command
        .arg0(
            program
                .args
                .first()
                .cloned()
                .unwrap_or_else(|| program.executable.clone().into()),
        )
        .args(program.args.iter().skip(1))
        .current_dir(&program.cwd)
        .env(CHANNEL_FD_VAR, fd.to_string())
        .kill_on_drop(false);
    for var in FOREIGN_DESCRIPTOR_VARS {
        command.env_remove(var);
    }
    let held = trigger::held_until_installed();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: sigprocmask, close_range and fcntl are system
    // calls that allocate nothing and take no lock.
    unsafe {
        command.pre_exec(move || {
            // Held until the successor handles them (the standard library has just reset
            // the mask; exec keeps ours, and keeps pending signals pending).
            pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&held), None)?;
            mark_close_on_exec_from(3)?;
            // SAFETY: `fd` is open in the child: fork copied our descriptor table.
            let channel = std::os::fd::BorrowedFd::borrow_raw(fd);
            fcntl(channel, FcntlArg::F_SETFD(FdFlag::empty()))?;
            Ok(())
        });
    }
    command.spawn()
}

/// Marks every descriptor from `first` on close-on-exec. Marking rather than closing keeps
/// the descriptor the standard library uses to report a failed `exec` to the parent.
///
/// Runs between `fork` and `exec`: no allocation.
fn mark_close_on_exec_from(first: u32) -> std::io::Result<()> {
    // SAFETY: close_range only changes flags of this process's descriptors; with
    // CLOSE_RANGE_CLOEXEC it closes nothing.
    let marked = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) };
    if marked == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if !matches!(error.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) {
        return Err(error);
    }
    // Linux before 5.11: one fcntl per possible descriptor, up to the soft limit.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let end = limit.rlim_cur.min(1 << 20) as i32;
    for fd in first as i32..end {
        // SAFETY: F_SETFD on a descriptor number that may not be open: EBADF, ignored.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

/// Kills and reaps the successor unless disarmed: whatever path leaves `launch` early
/// (an error, a timeout, a cancelled future), no half-started successor survives.
struct KillOnFailure(Option<Child>);

impl KillOnFailure {
    fn pid(&self) -> u32 {
        self.0.as_ref().and_then(Child::id).unwrap_or(0)
    }
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present until disarmed")
    }
    fn disarm(&mut self) -> Child {
        self.0.take().expect("disarmed once")
    }
    async fn kill_and_reap(&mut self) {
        if let Some(mut child) = self.0.take() {
            let pid = child.id();
            // kill() sends SIGKILL and waits: the child is reaped when this returns.
            if let Err(e) = child.kill().await {
                tracing::error!(successor_pid = pid, error = %e, "could not kill the failed successor");
            }
        }
    }
}

impl Drop for KillOnFailure {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // Dropped without a verdict (the upgrade future was cancelled): SIGKILL now;
            // tokio reaps a dropped child in the background.
            let _ = child.start_kill();
        }
    }
}
