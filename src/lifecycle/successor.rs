//! The predecessor's side of a handoff: start the successor, hand it the sockets, wait for its
//! ready; on any failure kill and reap it.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use nix::sys::signal::SigSet;

use super::child::Child;
use super::inheritance::CHANNEL_FD_VAR;
use super::progress::{self, Progress};
use super::spawn::{self, Spawn};
use super::upgrade_error::{Phase, UpgradeError, UpgradeReport};
use super::Builder;
use crate::wire::{self, Channel, Message, SocketEntry, WireError, PROTOCOL_VERSION};

/// How to start a successor: what this process was started as, captured at start-up.
#[derive(Debug, Clone)]
pub(crate) struct Program {
    /// The path a successor runs: the path this process was started as (`argv[0]`, made
    /// absolute against the start directory, or found on `PATH`), its symlinks left for
    /// `exec` to resolve at each upgrade. So a deploy that replaces the file, or swaps a
    /// `current -> releases/vN` symlink, runs the new release (not `/proc/self/exe`, which
    /// would run the old inode again).
    pub executable: PathBuf,
    /// `argv`, including `argv[0]`.
    pub args: Vec<OsString>,
    /// The working directory a successor starts in: the one this process started in, as the
    /// shell named it (`$PWD`, symlinks kept, so `cd current && ./server` follows the swap).
    pub cwd: PathBuf,
    /// The signals the successor starts with blocked, until it handles them.
    pub held_signals: SigSet,
    /// Whether `executable` came from `argv[0]` (false: an override, or the fallback).
    from_argv0: bool,
}

impl Program {
    /// What this process was started as.
    pub(crate) fn current() -> std::io::Result<Self> {
        let args: Vec<OsString> = std::env::args_os().collect();
        let cwd = start_directory();
        let running = running_executable()?;
        let start_path = args
            .first()
            .and_then(|argv0| resolve_start_path(argv0, &cwd, std::env::var_os("PATH").as_deref()))
            .filter(|path| same_file(path, &running));
        if start_path.is_none() {
            tracing::debug!(executable = %running.display(), "argv[0] does not name our executable; upgrades run the running one's path");
        }
        Ok(Self {
            from_argv0: start_path.is_some(),
            executable: start_path.unwrap_or(running),
            args,
            cwd,
            held_signals: SigSet::empty(),
        })
    }

    /// What this process was started as, with the overrides of `config`
    /// ([`Builder::executable`], [`Builder::working_dir`]).
    pub(crate) fn configured(config: &Builder) -> std::io::Result<Self> {
        let mut program = Self::current()?;
        if let Some(executable) = &config.executable {
            program.executable = executable.clone();
            program.from_argv0 = false;
        }
        if let Some(dir) = &config.working_dir {
            program.cwd = dir.clone();
        }
        Ok(program)
    }

    /// The `argv[0]` a successor gets: ours when it finds the same path again in the
    /// successor (a name looked up on `PATH`, an absolute path), else the path it runs.
    fn argv0(&self) -> OsString {
        match self.args.first() {
            Some(argv0) if self.from_argv0 && (!has_slash(argv0) || Path::new(argv0).is_absolute()) => argv0.clone(),
            _ => self.executable.clone().into(),
        }
    }

    /// The directory a successor starts in: ours, or `/` if it has vanished (a deploy
    /// removed the old release): a server that serves is better than an upgrade refused.
    fn working_dir(&self) -> &Path {
        if self.cwd.is_dir() {
            return &self.cwd;
        }
        tracing::warn!(working_dir = %self.cwd.display(), "the working directory has vanished; the successor starts in /");
        Path::new("/")
    }

    /// The error of a spawn that failed with `source`: names the working directory when
    /// that is what could not be entered, else the executable.
    fn spawn_error(&self, working_dir: &Path, source: std::io::Error) -> UpgradeError {
        let enterable = nix::unistd::access(working_dir, nix::unistd::AccessFlags::X_OK).is_ok();
        UpgradeError::Spawn {
            executable: self.executable.clone(),
            working_dir: (!enterable).then(|| working_dir.to_path_buf()),
            source,
        }
    }
}

/// The executable this process runs, at the path it was started from: what the kernel
/// names it, without the " (deleted)" the kernel adds once the file has been replaced (the
/// path a deploy wrote to is the one without the suffix).
fn running_executable() -> std::io::Result<PathBuf> {
    let executable = std::env::current_exe()?;
    Ok(match executable.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
        Some(path) => PathBuf::from(path),
        None => executable,
    })
}

/// The directory this process started in: `$PWD` when it names the same directory (it keeps
/// the symlinks a shell went through, as `pwd -L`), else the kernel's, else `/`.
fn start_directory() -> PathBuf {
    let Ok(physical) = std::env::current_dir() else {
        tracing::warn!("the working directory has vanished; successors start in /");
        return PathBuf::from("/");
    };
    match std::env::var_os("PWD").map(PathBuf::from) {
        Some(logical) if logical.is_absolute() && same_file(&logical, &physical) => logical,
        _ => physical,
    }
}

/// The absolute path `argv0` names, the way a shell found it: a path with a slash, against
/// `cwd`; a bare name, on `path_var`. Symlinks are not resolved. `None` if there is none.
fn resolve_start_path(argv0: &OsStr, cwd: &Path, path_var: Option<&OsStr>) -> Option<PathBuf> {
    if argv0.is_empty() {
        return None;
    }
    if has_slash(argv0) {
        return Some(cwd.join(argv0));
    }
    std::env::split_paths(path_var?)
        .map(|dir| cwd.join(dir).join(argv0)) // an empty or relative entry: against cwd
        .find(|candidate| is_executable_file(candidate))
}

fn has_slash(path: &OsStr) -> bool {
    path.as_bytes().contains(&b'/')
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether `a` and `b` are the same file (device and inode, through symlinks).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
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
    /// `counters` travel with it, for the successor's `status`.
    pub fn commit(&self, counters: Option<serde_json::Value>) -> Result<(), WireError> {
        let commit = Message::Commit { counters };
        // Unconstrained: tokio's cooperative budget must not turn "ready now" into "pending".
        let send = tokio::task::unconstrained(self.channel.send(&commit, &[]));
        let sent = send
            .now_or_never()
            .unwrap_or_else(|| Err(WireError::Io(std::io::ErrorKind::WouldBlock.into())));
        if sent.is_ok() {
            progress::mark("commit_sent");
        }
        sent
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

/// How long a successor has to get ready: the upgrade timeout from its start, moved later
/// when it asks for more time (`ExtendStartup`), never past the maximum.
pub(crate) struct StartupDeadline {
    started: Instant,
    maximum: Instant,
    at: std::sync::Mutex<Instant>,
    /// Told the time left after each extension.
    extended: Box<dyn Fn(Duration) + Send + Sync>,
}

impl StartupDeadline {
    /// `timeout` from now, extensible up to `maximum` from now (at least `timeout`).
    pub fn new(timeout: Duration, maximum: Duration, extended: impl Fn(Duration) + Send + Sync + 'static) -> Self {
        let started = Instant::now();
        Self {
            started,
            maximum: started + maximum.max(timeout),
            at: std::sync::Mutex::new(started + timeout),
            extended: Box::new(extended),
        }
    }

    fn at(&self) -> Instant {
        *self.at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the deadline to `more` from now, if that is later, but never past the maximum;
    /// returns the time left.
    fn extend(&self, more: Duration) -> Duration {
        let now = Instant::now();
        let asked = now.checked_add(more).unwrap_or(self.maximum).min(self.maximum);
        let mut at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        *at = (*at).max(asked);
        let remaining = at.saturating_duration_since(now);
        drop(at);
        (self.extended)(remaining);
        remaining
    }

    /// How long the successor was given in the end, from its start.
    fn allowed(&self) -> Duration {
        self.at().saturating_duration_since(self.started)
    }

    /// Resolves at the deadline, following it as it moves.
    async fn expired(&self) {
        loop {
            let at = self.at();
            tokio::time::sleep_until(at.into()).await;
            if self.at() <= at {
                return;
            }
        }
    }
}

impl std::fmt::Debug for StartupDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartupDeadline")
            .field("allowed", &self.allowed())
            .field("maximum", &self.maximum.saturating_duration_since(self.started))
            .finish_non_exhaustive()
    }
}

/// Starts the successor (generation `next_generation`) and hands it `sockets`; returns once
/// it is ready, and before anything is committed.
pub(crate) async fn launch(
    program: &Program,
    next_generation: u64,
    sockets: Vec<(SocketEntry, OwnedFd)>,
    deadline: &StartupDeadline,
    cancelled: impl std::future::Future<Output = ()>,
    progress: &mut Progress<'_>,
) -> Result<ReadySuccessor, UpgradeError> {
    let started = Instant::now();
    let (ours, theirs) = wire::pair().map_err(UpgradeError::Io)?;
    let mut channel = Channel::new(ours).map_err(UpgradeError::Io)?;
    channel.receive_credentials().map_err(UpgradeError::Io)?;
    let child = spawn(program, theirs.as_fd())?;
    // Only the child holds its end now: its exit shows up as EOF on ours.
    drop(theirs);
    let mut guard = KillOnFailure(Some(child));
    let pid = guard.pid();
    tracing::info!(successor_pid = pid, generation = next_generation, "successor started");

    progress.enter(Phase::Transfer);
    let outcome = {
        let handshake = handshake(&mut channel, pid, next_generation, &sockets, progress, deadline);
        tokio::select! {
            result = handshake => match result {
                Ok(count) => Outcome::Ready(count),
                Err(error) => Outcome::Failed(error),
            },
            () = deadline.expired() => Outcome::TimedOut,
            status = guard.child().wait() => Outcome::Exited(status),
            () = cancelled => Outcome::Cancelled,
        }
    };
    drop(sockets);
    let phase = progress.phase();
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
            after: deadline.allowed(),
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
/// Moves `progress` on as it goes, so that a timeout can say what was awaited.
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
    progress: &mut Progress<'_>,
    deadline: &StartupDeadline,
) -> Result<usize, WireError> {
    let hello = Message::Hello {
        protocol: PROTOCOL_VERSION,
        pid: std::process::id(),
        generation: Some(next_generation),
    };
    channel.send(&hello, &[]).await?;
    let borrowed: Vec<(SocketEntry, BorrowedFd<'_>)> = sockets.iter().map(|(e, fd)| (e.clone(), fd.as_fd())).collect();
    wire::send_sockets(channel, next_generation - 1, &borrowed).await?;

    progress.enter(Phase::Hello);
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

    progress.enter(Phase::Adoption);
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

    progress.enter(Phase::Startup);
    loop {
        let ready = channel.recv("ready").await?;
        wire::check_sender(&ready, pid)?;
        match ready.message {
            Message::Ready { .. } => return Ok(sockets.len()),
            Message::ExtendStartup { more_ms } => {
                let remaining = deadline.extend(Duration::from_millis(more_ms));
                tracing::info!(
                    successor_pid = pid,
                    asked_ms = more_ms,
                    granted_ms = remaining.as_millis() as u64,
                    "the successor asked for more time"
                );
            }
            other => {
                return Err(WireError::Unexpected {
                    expected: "ready",
                    got: other.kind(),
                })
            }
        }
    }
}

/// Variables that describe descriptors of this process, which a successor must not
/// mistake for its own: systemd's socket activation (read once, by the first generation).
const FOREIGN_DESCRIPTOR_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// Starts the executable (what its path names now) with our arguments, working directory
/// and environment, plus the channel's descriptor number. The channel is the only descriptor
/// it inherits, and the held signals are blocked from before its `exec` (see [`spawn`]).
fn spawn(program: &Program, channel: BorrowedFd<'_>) -> Result<Child, UpgradeError> {
    let working_dir = program.working_dir();
    let mut args = vec![program.argv0()];
    args.extend(program.args.iter().skip(1).cloned());
    let start = Spawn {
        executable: &program.executable,
        args,
        working_dir,
        remove: &FOREIGN_DESCRIPTOR_VARS,
        set: vec![
            // What a shell would say after `cd`: the successor finds its start directory in it.
            ("PWD", working_dir.as_os_str().to_owned()),
            (CHANNEL_FD_VAR, spawn::inherited_number(channel).to_string().into()),
        ],
        held_signals: program.held_signals,
    };
    spawn::spawn(&start, channel).map_err(|source| program.spawn_error(working_dir, source))
}

/// Kills and reaps the successor unless disarmed: whatever path leaves `launch` early
/// (an error, a timeout, a cancelled future), no half-started successor survives.
#[derive(Debug)]
struct KillOnFailure(Option<Child>);

impl KillOnFailure {
    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
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
            // Dropped without a verdict (the upgrade future was cancelled): SIGKILL now; a
            // dropped child is reaped in the background.
            let _ = child.start_kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_path_with_a_slash_is_made_absolute_against_the_start_directory_unresolved() {
        let cwd = Path::new("/srv/app");
        let resolve = |argv0: &str| resolve_start_path(OsStr::new(argv0), cwd, None);
        assert_eq!(
            resolve("current/server"),
            Some(PathBuf::from("/srv/app/current/server"))
        );
        assert_eq!(resolve("./server"), Some(PathBuf::from("/srv/app/./server")));
        assert_eq!(resolve("/opt/bin/server"), Some(PathBuf::from("/opt/bin/server")));
        assert_eq!(resolve(""), None);
    }

    #[test]
    fn a_bare_name_is_looked_up_on_path_in_order() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("first"), dir.path().join("second"));
        for bin in [&first, &second] {
            std::fs::create_dir(bin).unwrap();
            std::fs::write(bin.join("server"), "").unwrap();
        }
        // Not executable: skipped, as a shell skips it.
        std::fs::set_permissions(second.join("server"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([&first, &second]).unwrap();
        let found = resolve_start_path(OsStr::new("server"), Path::new("/"), Some(&path));
        assert_eq!(found, Some(second.join("server")));
        assert_eq!(
            resolve_start_path(OsStr::new("absent"), Path::new("/"), Some(&path)),
            None
        );
        assert_eq!(resolve_start_path(OsStr::new("server"), Path::new("/"), None), None);
    }

    #[test]
    fn the_builder_overrides_the_executable_and_the_working_directory() {
        let config = Builder::default()
            .executable("/opt/server")
            .working_dir("/var/lib/server");
        let program = Program::configured(&config).unwrap();
        assert_eq!(program.executable, Path::new("/opt/server"));
        assert_eq!(program.cwd, Path::new("/var/lib/server"));
        assert_eq!(program.argv0(), OsStr::new("/opt/server"), "argv[0] names what runs");
    }

    #[test]
    fn a_spawn_error_names_the_working_directory_when_it_is_what_failed() {
        let error = |working_dir: Option<&str>| UpgradeError::Spawn {
            executable: PathBuf::from("/srv/app/current/server"),
            working_dir: working_dir.map(PathBuf::from),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        assert_eq!(
            error(Some("/srv/app/data")).to_string(),
            "starting /srv/app/current/server: working directory /srv/app/data: Permission denied (os error 13)"
        );
        assert_eq!(
            error(None).to_string(),
            "starting /srv/app/current/server: Permission denied (os error 13)"
        );
    }
}
