//! [`Handoff`]: one process's part in the chain of generations.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::connections::{ConnectionCounts, Connections};
use super::counters::{Counters, UpgradeCounters};
use super::inheritance::{await_commit, inherit, Verdict};
use super::machine::Lifecycle;
use super::notify::Announcer;
use super::program::Program;
use super::progress::{Phases, Progress};
use super::shared_error::SharedError;
use super::successor::{self, ready_successor::ReadySuccessor, startup_deadline::StartupDeadline};
use super::transitions::{Effect, Event, Refusal};
use super::trigger::{self, Signals};
use super::upgrade_error::{Phase, UpgradeError, UpgradeReport};
use super::{pid_file, Builder, Shutdown, State};
use crate::systemd::activation;
use crate::systemd::notify::Notifier;
use crate::wire::{Channel, Message, SocketEntry, WireError};
use crate::{Error, ListenerRegistry};

/// A process's handle on zero-downtime upgrades: its sockets, its state, its successor.
///
/// Cheap to clone; every clone is the same handle.
///
/// # Examples
///
/// ```no_run
/// # async fn serve(_: tokio::net::TcpListener, _: impl std::future::Future) {}
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let handoff = handoff::Handoff::builder().start().await?;
/// // The inherited listener after an upgrade, a new one on first start.
/// let listener = handoff.registry().tcp("http", "127.0.0.1:8081".parse()?)?;
/// handoff.ready().await?; // the predecessor, if any, stops accepting now
/// serve(listener, handoff.shutdown_signal()).await; // until a successor takes over
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Handoff {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Builder,
    program: Program,
    registry: ListenerRegistry,
    generation: u64,
    started: Instant,
    /// The one place where the state changes (see `transitions`).
    lifecycle: Lifecycle,
    /// The channel to the predecessor, until this process reports ready.
    predecessor: tokio::sync::Mutex<Option<Channel>>,
    predecessor_pid: Option<u32>,
    /// The sockets the predecessor handed over, as it described them.
    inherited: Vec<SocketEntry>,
    /// What `status` reports: upgrades, and connections per protocol.
    counters: Counters,
    connections: Connections,
    /// The phase of the upgrade under way, if any.
    progress: Phases,
    /// Established connections: sent to a committed successor, received from a predecessor.
    migration: crate::migration::Endpoints,
}

impl Handoff {
    /// A [`Builder`] with the defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    pub(crate) async fn start(config: Builder) -> Result<Self, Error> {
        let mut program = Program::configured(&config).map_err(|e| Error::io("finding our executable", e))?;
        program.held_signals = trigger::held_until_installed(&config);
        let signals = Signals::install(&config).map_err(|e| Error::io("installing signal handlers", e))?;
        let inheritance = inherit(config.upgrade_timeout).await?;
        let inherited_sockets: Vec<SocketEntry> = inheritance
            .iter()
            .flat_map(|i| i.sockets.iter().map(|(e, _)| e.clone()))
            .collect();
        let (registry, generation, predecessor, predecessor_pid) = match inheritance {
            Some(i) => (
                ListenerRegistry::with_inherited(i.sockets),
                i.generation,
                Some(i.channel),
                Some(i.predecessor_pid),
            ),
            // A first start: the sockets systemd passed, if any (socket activation).
            None => (ListenerRegistry::with_activated(activation::take()), 1, None, None),
        };
        let inherited = predecessor.is_some();
        let announcer = Announcer::new(Notifier::from_env(), generation, inherited, config.upgrade_timeout);
        let handoff = Self {
            inner: Arc::new(Inner {
                program,
                registry,
                generation,
                started: Instant::now(),
                lifecycle: Lifecycle::announcing(inherited, announcer),
                predecessor: tokio::sync::Mutex::new(predecessor),
                predecessor_pid,
                inherited: inherited_sockets,
                config,
                counters: Counters::default(),
                connections: Connections::default(),
                progress: Phases::default(),
                migration: Default::default(),
            }),
        };
        tracing::info!(pid = std::process::id(), generation, predecessor = ?predecessor_pid, "starting");
        signals.serve(&handoff);
        Ok(handoff)
    }

    /// The two ends of live migration (see [`crate::migration`]).
    pub(crate) fn migration(&self) -> &crate::migration::Endpoints {
        &self.inner.migration
    }

    /// The registry of this process's named sockets.
    pub fn registry(&self) -> &ListenerRegistry {
        &self.inner.registry
    }

    /// This process's generation: 1 on a fresh start, one more at each upgrade.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// The pid of the process that handed its sockets to this one, if any.
    pub fn predecessor_pid(&self) -> Option<u32> {
        self.inner.predecessor_pid
    }

    /// Whether the previous generation is still alive (draining). No upgrade starts until it
    /// has exited.
    pub fn predecessor_running(&self) -> bool {
        self.inner.lifecycle.status().predecessor_running
    }

    /// Where this process is in its life.
    pub fn state(&self) -> State {
        self.inner.lifecycle.status().state
    }

    /// The sockets this process holds and would hand over.
    pub fn sockets(&self) -> Vec<SocketEntry> {
        self.inner.registry.sockets()
    }

    /// This process's upgrade counters: attempts, outcomes, the last failure and the timings
    /// of the last handoff (the `upgrades` object of the control socket's `status`).
    pub fn upgrade_counters(&self) -> UpgradeCounters {
        self.inner.counters.snapshot()
    }

    /// The connections this process holds, per protocol: one entry per drain strategy type
    /// that [`Drain::serve`](crate::drain::Drain::serve) runs for this handle.
    pub fn connections(&self) -> Vec<ConnectionCounts> {
        self.inner.connections.counts()
    }

    /// Counts `drain`'s connections in [`connections`](Self::connections), under the name of
    /// the strategy type `S`.
    pub(crate) fn count_connections<S: ?Sized>(&self, drain: &crate::drain::Drain) {
        self.inner.connections.register::<S>(drain);
    }

    /// How long this process has run (since `start`).
    pub fn uptime(&self) -> std::time::Duration {
        self.inner.started.elapsed()
    }

    /// Whether `entry` is a socket the predecessor handed over (rather than one this process
    /// bound).
    pub(crate) fn was_inherited(&self, entry: &SocketEntry) -> bool {
        self.inner.inherited.contains(entry)
    }

    /// Follows the phase of the upgrade under way (`None` between upgrades).
    pub(crate) fn upgrade_progress(&self) -> &Phases {
        &self.inner.progress
    }

    /// Reports that this process serves, and from then on accepts upgrade triggers.
    ///
    /// A successor first tells its predecessor it is ready and waits for its commit (bounded
    /// by the upgrade timeout): only then does it answer on the control socket, close the
    /// inherited sockets nobody claimed, unlink their paths and put its PID file in place.
    /// Until the commit the predecessor serves and may still give up (its timeout, a stop),
    /// and then this process has done nothing that cannot be undone. A predecessor that
    /// vanishes after handing its sockets over counts as a commit: this process holds every
    /// socket and serves alone.
    ///
    /// # Errors
    ///
    /// - [`Error::Io`] if the PID file cannot be prepared (before anything is reported);
    /// - [`Error::Ready`] if the predecessor cannot be told or gives up on us: it goes on
    ///   serving, and this process should exit;
    /// - [`Error::Stopped`] if a stop was requested first: exit.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the work runs in a task of its own, started by the first call; a
    /// dropped call loses nothing, and every later call waits for the same outcome (an
    /// error is reported in full to the call that sees it first).
    pub async fn ready(&self) -> Result<(), Error> {
        let lifecycle = &self.inner.lifecycle;
        let mut status = lifecycle.watch();
        if let Ok(called) = lifecycle.apply(Event::ReadyCalled) {
            self.carry_out(called.effect); // the first call starts the work
        }
        let outcome = match status.wait_for(|s| s.readiness.outcome().is_some()).await {
            Ok(status) => status.readiness.outcome().cloned(),
            Err(_) => None, // never: `self` holds the lifecycle
        };
        let outcome = outcome.unwrap_or_else(|| {
            Err(SharedError::new(Error::io(
                "becoming ready",
                std::io::Error::other("the lifecycle is gone"),
            )))
        });
        outcome.map_err(|error| error.to_error())
    }

    /// Runs the work of `ready()` in a task of its own, and records its outcome in the
    /// lifecycle (what every call returns).
    fn start_becoming_ready(&self) {
        let handoff = self.clone();
        let span = tracing::info_span!("ready", pid = std::process::id(), generation = self.generation());
        let becoming = async move {
            let done = ReadyDoneOnDrop(Some(&handoff.inner.lifecycle));
            done.record(handoff.become_ready().await);
        };
        tokio::spawn(becoming.instrument(span));
    }

    async fn become_ready(&self) -> Result<(), Error> {
        let inner = &self.inner;
        let channel = inner.predecessor.lock().await.take();
        match inner.lifecycle.status().state {
            State::Starting => {}
            State::Stopping => return Err(refuse(channel, Error::Stopped).await),
            _ => return Ok(()),
        }
        let control = match &inner.config.control_socket {
            Some(path) => match crate::control::claim(self, path) {
                Ok(listener) => Some(listener),
                Err(error) => return Err(refuse(channel, error).await),
            },
            None => None,
        };
        let pid_file = match &inner.config.pid_file {
            Some(path) => match pid_file::prepare(path, std::process::id()) {
                Ok(prepared) => Some(prepared),
                Err(e) => {
                    let error = Error::io(format!("writing the PID file {}", path.display()), e);
                    return Err(refuse(channel, error).await);
                }
            },
            None => None,
        };
        if let Some(channel) = channel {
            self.commit_from(channel).await?;
        }
        // Past the commit: this process owns the paths.
        for entry in inner.registry.close_unclaimed() {
            tracing::info!(socket = %entry, "closed an inherited socket that nothing claimed");
        }
        if let Some(prepared) = pid_file {
            if let Err(error) = prepared.place() {
                // Too late to give up (the predecessor drains): serve, and say so loudly. The
                // file must not go on naming the predecessor, which will exit.
                tracing::error!(%error, "could not put the PID file in place; serving without it");
                self.remove_pid_file();
            }
        }
        if let Err(refusal) = inner.lifecycle.apply(Event::Ready) {
            // A stop arrived since the commit, and has cleaned up before our PID file landed.
            debug_assert_eq!(refusal, Refusal::Stopped);
            self.remove_pid_file();
            return Err(Error::Stopped);
        }
        if let Some(listener) = control {
            crate::control::serve(self, listener);
        }
        tracing::info!(
            pid = std::process::id(),
            generation = inner.generation,
            sockets = inner.registry.sockets().len(),
            "ready"
        );
        Ok(())
    }

    /// Tells the predecessor we are ready and takes its verdict: from the commit (or its
    /// vanishing) on, this process owns the paths.
    async fn commit_from(&self, mut channel: Channel) -> Result<(), Error> {
        let inner = &self.inner;
        let startup = inner.started.elapsed();
        let verdict = await_commit(&mut channel, startup.as_millis() as u64, inner.config.upgrade_timeout).await?;
        let commit_wait = inner.started.elapsed().saturating_sub(startup);
        if let Verdict::Committed(Some(carried)) = &verdict {
            match serde_json::from_value(carried.clone()) {
                Ok(counters) => inner.counters.inherit(counters),
                Err(error) => tracing::debug!(%error, "the predecessor's counters were unreadable; counting from zero"),
            }
        }
        inner.counters.arrived(inner.predecessor_pid, startup, commit_wait);
        let vanished = verdict == Verdict::Vanished;
        if vanished {
            tracing::warn!(
                predecessor_pid = ?inner.predecessor_pid,
                "the predecessor vanished after handing over its sockets; serving alone"
            );
        }
        let effect = inner
            .lifecycle
            .apply(Event::PredecessorCommitted)
            .map_or(Effect::None, |t| t.effect);
        if effect == Effect::FinalStop {
            self.carry_out(effect);
            return Err(Error::Stopped);
        }
        self.watch_predecessor(channel, vanished);
        Ok(())
    }

    /// Records the predecessor's exit, which its end of the channel reports as EOF.
    fn watch_predecessor(&self, mut channel: Channel, vanished: bool) {
        let handoff = self.clone();
        tokio::spawn(async move {
            if !vanished {
                handoff.inner.migration.inbound().receive(&mut channel).await;
            }
            drop(channel);
            // The next upgrade is allowed before anyone can read that it is.
            let _ = handoff.inner.lifecycle.apply(Event::PredecessorExited);
            tracing::info!(predecessor_pid = ?handoff.inner.predecessor_pid, "predecessor exited");
        });
    }

    /// Asks for more time to get ready: the deadline this start must meet becomes at least
    /// `more` from now, for a start that is slow but healthy (warming a cache, say). Call it
    /// as often as needed, before [`ready`](Self::ready).
    ///
    /// A successor asks its predecessor, which moves its upgrade deadline, never past its
    /// [`Builder::max_upgrade_time`] (a successor that keeps asking is still killed there),
    /// and tells the service manager (`EXTEND_TIMEOUT_USEC=`). A first generation under
    /// systemd asks the service manager. Otherwise, and once ready, there is no deadline to
    /// move and this does nothing.
    ///
    /// # Errors
    ///
    /// [`Error::Ready`] if the predecessor cannot be told (it has gone, or does not read
    /// within a second).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the request is sent whole or not at all.
    pub async fn extend_startup(&self, more: Duration) -> Result<(), Error> {
        let inner = &self.inner;
        if inner.lifecycle.status().state != State::Starting {
            return Ok(());
        }
        let predecessor = inner.predecessor.lock().await;
        let Some(channel) = &*predecessor else {
            if inner.predecessor_pid.is_none() {
                inner.lifecycle.announcer().extend_own_startup(more);
            }
            return Ok(()); // else ready() has taken the channel: too late to ask
        };
        let request = Message::ExtendStartup {
            more_ms: u64::try_from(more.as_millis()).unwrap_or(u64::MAX),
        };
        match tokio::time::timeout(ABORT_SEND_TIMEOUT, channel.send(&request, &[])).await {
            Ok(sent) => sent.map_err(Error::Ready),
            Err(_) => Err(Error::Ready(WireError::TimedOut {
                waiting_for: "room to ask for more time",
                after: ABORT_SEND_TIMEOUT,
            })),
        }
    }

    /// Starts the successor and hands it every socket; returns once it is ready and this
    /// process has committed to it, at which point
    /// [`shutdown_signal`](Self::shutdown_signal) resolves with [`Shutdown::Upgraded`]. This
    /// is what SIGUSR2 and the control socket's `upgrade` call.
    ///
    /// # Errors
    ///
    /// An [`UpgradeError`] saying why not, or how the successor failed. This process goes on
    /// serving in every case (unless a stop cancelled the upgrade), and a successor that was
    /// started has been killed and reaped.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it returns abandons the upgrade: the successor is killed and
    /// this process is ready for the next trigger.
    pub async fn upgrade(&self) -> Result<UpgradeReport, UpgradeError> {
        let inner = &self.inner;
        if let Err(refusal) = inner.lifecycle.apply(Event::Trigger) {
            inner.counters.refused();
            let error = self.refused(refusal);
            tracing::warn!(%error, "upgrade refused");
            return Err(error);
        }
        let revert = RevertUnlessCommitted(&inner.lifecycle);
        let trigger = Instant::now();
        inner.counters.attempted();
        let span = tracing::info_span!("upgrade", pid = std::process::id(), generation = inner.generation);
        span.in_scope(|| tracing::info!("upgrade triggered"));
        let result = self.launch_and_commit(trigger).instrument(span).await;
        revert.finish(&result);
        inner.counters.finished(&result, trigger);
        match &result {
            Ok(report) => tracing::info!(
                successor_pid = report.successor_pid,
                generation = report.generation,
                elapsed_ms = report.elapsed.as_secs_f64() * 1e3,
                "upgrade committed; draining"
            ),
            Err(error) => {
                tracing::warn!(%error, phase = ?error.phase(), "upgrade failed; still serving");
                if let (Some(path), Some(pid)) = (&inner.config.pid_file, error.successor_pid()) {
                    pid_file::remove_leftover(path, pid);
                }
            }
        }
        result
    }

    async fn launch_and_commit(&self, trigger: Instant) -> Result<UpgradeReport, UpgradeError> {
        let inner = &self.inner;
        let next_generation = inner
            .generation
            .checked_add(1)
            .ok_or(UpgradeError::GenerationExhausted)?;
        let sockets = inner.registry.handoff_set().map_err(UpgradeError::Io)?;
        let mut status = inner.lifecycle.watch();
        let given_up = async move {
            let _ = status.wait_for(|s| s.state != State::Upgrading).await;
        };
        let announcer = inner.lifecycle.announcer().clone();
        let deadline = StartupDeadline::new(
            inner.config.upgrade_timeout,
            inner.config.max_upgrade_time,
            move |remaining| announcer.startup_extended(remaining),
        );
        let mut progress = Progress::start(inner.generation, &inner.progress);
        let successor = successor::launch(
            &inner.program,
            next_generation,
            sockets,
            &deadline,
            given_up,
            &mut progress,
        )
        .await?;
        progress.enter(Phase::Commit);
        self.commit(successor, trigger).await
    }

    /// The point of no return: the commit message leaves in the same critical section as
    /// the change to `Draining`, and only if nothing (a stop) has changed the state first.
    async fn commit(&self, successor: ReadySuccessor, trigger: Instant) -> Result<UpgradeReport, UpgradeError> {
        let pid = successor.report().successor_pid;
        let event = Event::CommitTo { successor_pid: pid };
        let migration = self.inner.migration.prepare_outbound();
        let carried = serde_json::to_value(self.inner.counters.handed_over(successor.report(), trigger)).ok();
        match self.inner.lifecycle.apply_with(event, |_| successor.commit(carried)) {
            Ok(Ok(transition)) => {
                self.carry_out(transition.effect);
                let report = successor.report().clone();
                migration.start(successor.keep_until_exit());
                Ok(report)
            }
            Ok(Err(source)) => {
                successor.abandon("the commit could not be sent").await;
                Err(UpgradeError::Protocol {
                    pid,
                    phase: Phase::Commit,
                    source,
                })
            }
            Err(_stopped) => {
                successor.abandon("a stop was requested").await;
                Err(UpgradeError::Cancelled {
                    pid,
                    phase: Phase::Commit,
                })
            }
        }
    }

    fn refused(&self, refusal: Refusal) -> UpgradeError {
        match refusal {
            Refusal::NotReady => UpgradeError::NotReady,
            Refusal::InProgress => UpgradeError::InProgress,
            Refusal::PredecessorDraining => UpgradeError::PredecessorDraining(self.inner.predecessor_pid.unwrap_or(0)),
            Refusal::ShuttingDown | Refusal::Stopped => UpgradeError::ShuttingDown,
        }
    }

    /// Requests a final, graceful stop: [`shutdown_signal`](Self::shutdown_signal) resolves
    /// with [`Shutdown::Stopped`], an upgrade not yet committed is abandoned (its successor
    /// killed), the listeners are closed (new clients are refused at once and can fail over),
    /// and the paths of Unix listeners and the PID file are removed. What SIGTERM and SIGINT
    /// do.
    ///
    /// While this process already drains or stops, a stop means "the deadline is now":
    /// [`deadline_now`](Self::deadline_now) resolves.
    pub fn stop(&self) {
        let inner = &self.inner;
        // The effect (closing the listeners) happens before the accept loops hear of the stop:
        // a client that connects once they have stopped accepting is refused, never queued.
        let stopped = inner.lifecycle.apply_with(Event::Stop, |effect| {
            self.carry_out(effect);
            Ok::<(), std::convert::Infallible>(())
        });
        let Ok(Ok(transition)) = stopped else {
            return;
        };
        let (before, after) = (transition.before, transition.after);
        let pid = std::process::id();
        if after.hurry && !before.hurry {
            tracing::warn!(pid, "stop requested again: closing every connection now");
        } else if before.state == State::Draining && !before.stop_requested {
            tracing::info!(
                pid,
                "stop requested while draining: the drain goes on; another stop ends it"
            );
        } else if before.state != after.state {
            tracing::info!(pid, generation = inner.generation, "stopping");
        }
    }

    fn carry_out(&self, effect: Effect) {
        let registry = &self.inner.registry;
        match effect {
            Effect::None => {}
            Effect::FinalStop => {
                // New clients are refused from here (once the application's accept loop has
                // dropped its listener too) and can fail over, instead of waiting in an
                // accept queue nobody reads.
                registry.close_all();
                self.remove_pid_file();
            }
            Effect::Handover => registry.release_all(),
            Effect::BecomeReady => self.start_becoming_ready(),
        }
    }

    fn remove_pid_file(&self) {
        if let Some(path) = &self.inner.config.pid_file {
            // Ours, or our predecessor's if the stop came right after its commit.
            let pids: Vec<u32> = std::iter::once(std::process::id())
                .chain(self.inner.predecessor_pid)
                .collect();
            pid_file::remove_if_naming(path, &pids);
        }
    }

    /// Resolves when this process must stop accepting: a successor is ready
    /// ([`Shutdown::Upgraded`]) or a stop was requested ([`Shutdown::Stopped`]). Hand it to
    /// hyper's or axum's graceful shutdown.
    ///
    /// Under systemd (`NOTIFY_SOCKET`), [`Shutdown::Upgraded`] comes once the service manager
    /// has confirmed that it read the successor's `MAINPID=` (a barrier: usually well under a
    /// millisecond, 5 s at most), so that this process cannot exit first and be taken for the
    /// service's end; it accepts meanwhile, as the successor does, from the same queue.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe; every call returns a new, independent future.
    pub fn shutdown_signal(&self) -> impl Future<Output = Shutdown> + Send + 'static {
        let mut status = self.inner.lifecycle.watch();
        let announcer = self.inner.lifecycle.announcer().clone();
        async move {
            let shutdown = match status.wait_for(|s| s.shutdown().is_some()).await {
                Ok(status) => status.shutdown().unwrap_or(Shutdown::Stopped),
                Err(_) => Shutdown::Stopped,
            };
            if let Shutdown::Upgraded { .. } = shutdown {
                // The service manager must have read that the successor is the main process
                // before this one can exit (bounded; at once without a manager).
                announcer.settled().await;
            }
            shutdown
        }
    }

    /// Resolves when a stop is requested while this process already drains or stops (a
    /// second SIGTERM, say): the drain's deadline is now. `Drain::serve` follows it.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe; every call returns a new, independent future.
    pub fn deadline_now(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut status = self.inner.lifecycle.watch();
        async move {
            let _ = status.wait_for(|s| s.hurry).await;
        }
    }

    /// Resolves once no predecessor is alive: at once for a first generation, else when the
    /// predecessor has exited (its end of the channel closed).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn predecessor_exited(&self) {
        let mut status = self.inner.lifecycle.watch();
        let _ = status.wait_for(|s| !s.predecessor_running).await;
    }
}

/// Tells the predecessor (if any) that we give up, and returns `error`: it goes on serving.
async fn refuse(channel: Option<Channel>, error: Error) -> Error {
    if let Some(channel) = channel {
        let abort = Message::Abort {
            reason: error.to_string(),
        };
        let _ = tokio::time::timeout(ABORT_SEND_TIMEOUT, channel.send(&abort, &[])).await;
    }
    error
}

/// How long we try to tell a peer that we give up; it finds out from our exit otherwise.
const ABORT_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Records the outcome of `ready()`'s work in the lifecycle; dropped before it could (the
/// task panicked, or its runtime shut down), records a failure, so that no call waits forever.
struct ReadyDoneOnDrop<'a>(Option<&'a Lifecycle>);

impl ReadyDoneOnDrop<'_> {
    fn record(mut self, outcome: Result<(), Error>) {
        if let Some(lifecycle) = self.0.take() {
            let outcome = outcome.map_err(SharedError::new);
            let _ = lifecycle.apply(Event::ReadyDone { outcome });
        }
    }
}

impl Drop for ReadyDoneOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(lifecycle) = self.0.take() {
            let cut_short =
                std::io::Error::other("the work ended before its outcome (a panic, or its runtime shut down)");
            let outcome = Err(SharedError::new(Error::io("becoming ready", cut_short)));
            let _ = lifecycle.apply(Event::ReadyDone { outcome });
        }
    }
}

/// Reverts `Upgrading` to `Ready` when dropped: on every path out of an upgrade, including a
/// dropped `upgrade()` future. After a commit (or a stop) the revert is refused: a no-op.
struct RevertUnlessCommitted<'a>(&'a Lifecycle);

impl RevertUnlessCommitted<'_> {
    /// Reverts now, saying why (the service manager's status shows it) if the upgrade failed.
    fn finish(self, result: &Result<UpgradeReport, UpgradeError>) {
        if let Err(error) = result {
            let why = error.to_string();
            let _ = self.0.apply(Event::UpgradeFailed { why });
        }
    }
}

impl Drop for RevertUnlessCommitted<'_> {
    fn drop(&mut self) {
        let why = "the upgrade was abandoned".to_owned();
        let _ = self.0.apply(Event::UpgradeFailed { why });
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::*;

    /// A successor that records its pid and never says hello.
    fn silent_successor(dir: &Path) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("successor");
        let pid_file = dir.join("successor.pid");
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho $$ > {}\nexec sleep 30\n", pid_file.display()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        (script, pid_file)
    }

    async fn started(executable: &Path) -> Handoff {
        let handoff = Handoff::builder()
            .executable(executable)
            .upgrade_signal(None)
            .stop_on_signals(false)
            .start()
            .await
            .unwrap();
        handoff.ready().await.unwrap();
        handoff
    }

    /// Waits (bounded) until the successor has written its pid.
    async fn successor_pid(pid_file: &Path) -> i32 {
        for _ in 0..1000 {
            if let Some(pid) = std::fs::read_to_string(pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the successor never started");
    }

    /// Waits (bounded) until `pid` is gone: killed and reaped.
    async fn assert_gone(pid: i32) {
        for _ in 0..1000 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("successor pid {pid} is still there");
    }

    #[tokio::test]
    async fn a_dropped_upgrade_kills_its_successor_and_allows_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (script, pid_file) = silent_successor(dir.path());
        let handoff = started(&script).await;
        for attempt in 0..2 {
            let _ = std::fs::remove_file(&pid_file);
            let mut upgrade = Box::pin(handoff.upgrade());
            tokio::select! {
                result = &mut upgrade => panic!("a silent successor cannot be ready: {result:?}"),
                _ = successor_pid(&pid_file) => {}
            }
            assert_eq!(handoff.state(), State::Upgrading, "attempt {attempt}");
            drop(upgrade);
            assert_eq!(
                handoff.state(),
                State::Ready,
                "a dropped upgrade leaves the process ready"
            );
            assert_gone(successor_pid(&pid_file).await).await;
        }
    }

    #[tokio::test]
    async fn a_stop_during_an_upgrade_cancels_it_and_reaps_the_successor() {
        let dir = tempfile::tempdir().unwrap();
        let (script, pid_file) = silent_successor(dir.path());
        let handoff = started(&script).await;
        let upgrading = handoff.clone();
        let upgrade = tokio::spawn(async move { upgrading.upgrade().await });
        let pid = successor_pid(&pid_file).await;
        handoff.stop();
        let error = upgrade.await.unwrap().unwrap_err();
        assert!(matches!(error, UpgradeError::Cancelled { .. }), "{error}");
        assert_eq!(handoff.state(), State::Stopping);
        assert_eq!(handoff.shutdown_signal().await, Shutdown::Stopped);
        assert_gone(pid).await;
    }

    #[tokio::test]
    async fn a_stop_while_stopping_means_the_deadline_is_now() {
        let dir = tempfile::tempdir().unwrap();
        let (script, _) = silent_successor(dir.path());
        let handoff = started(&script).await;
        handoff.stop();
        let hurry = handoff.deadline_now();
        tokio::pin!(hurry);
        assert!(futures_util::poll!(&mut hurry).is_pending());
        handoff.stop();
        tokio::time::timeout(Duration::from_secs(5), hurry).await.unwrap();
        assert!(matches!(handoff.upgrade().await, Err(UpgradeError::ShuttingDown)));
    }

    #[tokio::test]
    async fn every_ready_call_after_a_failure_returns_the_same_typed_error() {
        let handoff = Handoff::builder()
            .upgrade_signal(None)
            .stop_on_signals(false)
            .start()
            .await
            .unwrap();
        handoff.stop();
        let (first, second) = tokio::join!(handoff.ready(), handoff.ready());
        assert!(matches!(first, Err(Error::Stopped)), "{first:?}");
        assert!(matches!(second, Err(Error::Stopped)), "{second:?}");
        let later = handoff.ready().await;
        assert!(matches!(later, Err(Error::Stopped)), "{later:?}");
    }
}
