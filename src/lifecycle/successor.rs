//! The predecessor's side of a handoff: start the successor, hand it the sockets, wait for its
//! ready; on any failure kill and reap it.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
use tokio::process::{Child, Command};

use super::close_on_exec::Plan;
use super::inheritance::CHANNEL_FD_VAR;
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
    /// The signals the successor starts with blocked, until it handles them.
    pub held_signals: SigSet,
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
            held_signals: SigSet::empty(),
        })
    }
}

/// A successor that has reported ready, waiting for our verdict: [`commit`](Self::commit)
/// then [`keep_until_exit`](Self::keep_until_exit), or [`abandon`](Self::abandon). Dropped
/// without either (a cancelled upgrade), it kills the successor before its channel closes,
/// so that the successor never reads the close as a vanished predecessor's commit.
#[derive(Debug)]
pub(crate) struct ReadySuccessor {
    // Declared first, dropped first: the kill comes before the channel's close.
    child: KillOnFailure,
    channel: Channel,
    report: UpgradeReport,
}

impl ReadySuccessor {
    pub fn report(&self) -> &UpgradeReport {
        &self.report
    }

    /// Sends the commit without waiting: a few bytes into an empty socket buffer, done at
    /// once, so that it can happen inside the lifecycle's critical section. Anything else (the
    /// successor gone: a broken pipe; or a full buffer) is an error and nothing was sent.
    pub fn commit(&self) -> Result<(), WireError> {
        // Unconstrained: tokio's cooperative budget must not turn "ready now" into "pending".
        let send = tokio::task::unconstrained(self.channel.send(&Message::Commit, &[]));
        send.now_or_never()
            .unwrap_or_else(|| Err(WireError::Io(std::io::ErrorKind::WouldBlock.into())))
    }

    /// After the commit: reaps the successor should it die first, and returns our end of the
    /// channel, which the caller keeps open until this process exits (the successor reads
    /// our exit as EOF).
    pub fn keep_until_exit(self) -> Channel {
        let Self {
            mut child,
            channel,
            report,
        } = self;
        let mut child = child.disarm();
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                tracing::error!(successor_pid = report.successor_pid, %status, "successor exited while this process drains");
            }
        });
        channel
    }

    /// Instead of the commit: tells the successor why, gives it a moment to exit on its own
    /// (and to log the reason), then kills and reaps it.
    pub async fn abandon(self, reason: &str) {
        let Self { mut child, channel, .. } = self;
        let abort = Message::Abort { reason: reason.into() };
        if tokio::time::timeout(ABORT_GRACE, channel.send(&abort, &[]))
            .await
            .is_ok()
        {
            if let Ok(Ok(_status)) = tokio::time::timeout(ABORT_GRACE, child.child().wait()).await {
                child.disarm(); // exited and reaped
                return;
            }
        }
        child.kill_and_reap().await;
    }
}

/// How long an abandoned successor has to read our abort and exit by itself.
const ABORT_GRACE: Duration = Duration::from_millis(200);

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
                child: guard,
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
        Outcome::Failed(source) if source.is_peer_gone() => {
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
    let held = program.held_signals;
    let close_on_exec = Plan::for_this_process();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: pthread_sigmask, close_range and fcntl are system
    // calls that allocate nothing and take no lock.
    unsafe {
        command.pre_exec(move || {
            // Held until the successor handles them (the standard library has just reset
            // the mask; exec keeps ours, and keeps pending signals pending).
            pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&held), None)?;
            close_on_exec.apply_in_child()?;
            // SAFETY: `fd` is open in the child: fork copied our descriptor table.
            let channel = std::os::fd::BorrowedFd::borrow_raw(fd);
            fcntl(channel, FcntlArg::F_SETFD(FdFlag::empty()))?;
            Ok(())
        });
    }
    command.spawn()
}

/// Kills and reaps the successor unless disarmed: whatever path leaves `launch` early
/// (an error, a timeout, a cancelled future), no half-started successor survives.
#[derive(Debug)]
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
