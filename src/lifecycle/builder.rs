//! [`Builder`]: how a process takes part in upgrades (its options; `Handoff` starts from it).

use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::SignalKind;

/// Configures and starts a `Handoff` ([`start`](Self::start), beside `Handoff`). Each option
/// states its default.
///
/// # Examples
///
/// ```no_run
/// # async fn example() -> Result<(), handover::Error> {
/// use std::time::Duration;
///
/// let handoff = handover::Handoff::builder()
///     .upgrade_timeout(Duration::from_secs(10))
///     .pid_file("/run/myserver.pid")
///     .start()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    pub(crate) upgrade_timeout: Duration,
    pub(crate) max_upgrade_time: Duration,
    pub(crate) pid_file: Option<PathBuf>,
    pub(crate) upgrade_signal: Option<SignalKind>,
    pub(crate) stop_on_signals: bool,
    pub(crate) control_socket: Option<PathBuf>,
    pub(crate) executable: Option<PathBuf>,
    pub(crate) working_dir: Option<PathBuf>,
    pub(crate) probation: Duration,
    pub(crate) max_generations: usize,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            upgrade_timeout: Duration::from_secs(30),
            max_upgrade_time: Duration::from_secs(300),
            pid_file: None,
            upgrade_signal: Some(SignalKind::user_defined2()),
            stop_on_signals: true,
            control_socket: None,
            executable: None,
            working_dir: None,
            probation: Duration::from_secs(10),
            max_generations: 4,
        }
    }
}

impl Builder {
    /// How long a successor has, from its start, to adopt the sockets and report ready
    /// before it is killed and this process carries on, unless it asks for more time
    /// (`Handoff::extend_startup`, up to [`max_upgrade_time`](Self::max_upgrade_time)).
    /// Default: 30 seconds.
    pub fn upgrade_timeout(mut self, timeout: Duration) -> Self {
        self.upgrade_timeout = timeout;
        self
    }

    /// The most a successor can get, from its start, by asking for more time
    /// (`Handoff::extend_startup`): past it, it is killed however often it asked. Never
    /// less than the [`upgrade_timeout`](Self::upgrade_timeout). Default: 5 minutes.
    pub fn max_upgrade_time(mut self, maximum: Duration) -> Self {
        self.max_upgrade_time = maximum;
        self
    }

    /// A file that names the serving process: written (atomically) by each generation when it
    /// is ready, removed by a final stop. Default: none.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// The signal that triggers an upgrade, or `None` for none (upgrade through
    /// `Handoff::upgrade` or the control socket only). Default: `SIGUSR2`.
    pub fn upgrade_signal(mut self, signal: Option<SignalKind>) -> Self {
        self.upgrade_signal = signal;
        self
    }

    /// Whether SIGTERM and SIGINT request a final, graceful stop
    /// ([`Shutdown::Stopped`](super::state::Shutdown::Stopped)). Default: true.
    pub fn stop_on_signals(mut self, enabled: bool) -> Self {
        self.stop_on_signals = enabled;
        self
    }

    /// A Unix socket (mode 0600, peers of our own user only) taking `upgrade` and `status`
    /// commands, as `handoverctl` sends them. Default: none.
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.control_socket = Some(path.into());
        self
    }

    /// The executable a successor runs, with this process's arguments; its symlinks are
    /// resolved at each upgrade. Default: the path this process was started as (`argv[0]`,
    /// made absolute against the start directory or found on `PATH`), so that replacing the
    /// file, or swapping a `current -> releases/vN` symlink on its path, then upgrading, runs
    /// the new release. When `argv[0]` does not name this process's executable (a launcher
    /// rewrote it), the path the kernel ran instead.
    pub fn executable(mut self, path: impl Into<PathBuf>) -> Self {
        self.executable = Some(path.into());
        self
    }

    /// The working directory a successor starts in. Default: the one this process started
    /// in, as the shell named it (`$PWD` when it names that directory: a start from inside
    /// `current/` follows a symlink swap). A working directory that has vanished when an
    /// upgrade starts (a deploy removed the old release) is replaced by `/`, with a warning.
    pub fn working_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.working_dir = Some(path.into());
        self
    }

    /// How long, after committing to a successor, this process stands ready to take the
    /// service back should the successor die. Meanwhile it keeps its copies of the listening
    /// sockets (not accepting: the successor does), even once its own connections are
    /// drained; [`Drain::serve`](crate::drain::Drain::serve) returns only when it ends.
    /// `Duration::ZERO` turns it off. Default: 10 seconds.
    ///
    /// If the successor (our child: its pidfd tells us at once) exits in that time without
    /// having said that it stops (a crash, a kill; not a final stop by signal or control
    /// socket, not its own handover to a successor), and no stop has reached this process,
    /// this process takes the service back: it accepts again on the same sockets (what waits
    /// in their accept queues is served, so clients see no refusal), rewrites the PID file,
    /// answers the control socket, sends `MAINPID=` and `READY=1` to a service manager, and
    /// logs and counts a rollback with the successor's exit status (`status`, and the reply
    /// to the next `upgrade`). What is lost: the connections the successor had taken
    /// (accepted, or migrated to it) die with it. With three generations alive, only the
    /// newest live one takes back: a successor that handed over ends its predecessor's
    /// probation.
    ///
    /// An accept loop of your own must follow [`Handoff::taken_back`](crate::Handoff::taken_back)
    /// after its `shutdown_signal`, or the process taken back accepts nothing (set zero then).
    ///
    /// Under systemd, the successor is the main process: when it dies, systemd decides. With
    /// the default `ExitType=main` it considers the service ended, stops it (killing the rest
    /// of its control group as `KillMode=` says: the old process mid take-back included), and
    /// `Restart=on-failure` starts it afresh (clients see refusals meanwhile). For the
    /// take-back to stand, use `ExitType=cgroup` (systemd 250 and later: the service lives as
    /// long as one of its processes does) and `NotifyAccess=all` (the old process's
    /// `MAINPID=` does not come from the main process, which is dead); keep
    /// `Restart=on-failure` for when every generation is gone. Under `handoverctl run` it just
    /// works: the supervisor follows the `MAINPID=`.
    pub fn probation(mut self, probation: Duration) -> Self {
        self.probation = probation;
        self
    }

    /// How many generations may be alive at once, the successor an upgrade would start
    /// included: an upgrade is accepted while older generations still drain (a rollback does
    /// not wait for the bad release to drain), and refused, with the reason, when this many
    /// are alive. Each generation talks only to its direct successor; `status` lists the
    /// ones draining. A predecessor that has drained and only waits out its
    /// [`probation`](Self::probation) does not count: it exits when its successor commits
    /// to one of its own. Values below 2 count as 2 (a process and its successor: no upgrade
    /// while the previous generation drains). Default: 4.
    pub fn max_generations(mut self, max: usize) -> Self {
        self.max_generations = max.max(2);
        self
    }
}
