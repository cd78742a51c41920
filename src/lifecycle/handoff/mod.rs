//! [`Handoff`]: one process's part in the chain of generations: the type, its start and its
//! accessors. What it does is split by side: `ready` (the successor's way to serving),
//! `upgrade` (the predecessor's handoff to a successor), `stop` (the final stop, and what a
//! transition's effect sets off), `probation` (after the commit: the take-back of a successor
//! that dies); and `control_server`, which answers the control socket for the handle.

mod control_server;
mod generations;
mod probation;
mod ready;
mod state;
mod stop;
mod upgrade;

pub(crate) use stop::HurrySignal;

use std::sync::Arc;
use std::time::Instant;

use super::builder::Builder;
use super::connections::{CensusTaker, ConnectionCounts, Connections};
use super::counters::{Counters, UpgradeCounters};
use super::inheritance::inherit;
use super::machine::Lifecycle;
use super::notify::Announcer;
use super::program::Program;
use super::progress::Phases;
use super::state::State;
use super::trigger::{self, Signals};
use crate::error::Error;
use crate::registry::ListenerRegistry;
use crate::systemd::activation;
use crate::systemd::notify::Notifier;
use crate::wire::{Channel, SocketEntry};

/// A process's handle on zero-downtime upgrades: its sockets, its state, its successor.
///
/// Cheap to clone; every clone is the same handle.
///
/// # Examples
///
/// ```no_run
/// # async fn serve(_: tokio::net::TcpListener, _: impl std::future::Future) {}
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let handoff = handover::Handoff::builder().start().await?;
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
    /// The one place where the state changes (see `machine`, and the table in `transitions`).
    lifecycle: Lifecycle,
    /// The channel to the predecessor, until this process reports ready.
    predecessor: tokio::sync::Mutex<Option<Channel>>,
    predecessor_pid: Option<u32>,
    /// A duplicate of that channel, from the commit until the predecessor's exit is recorded:
    /// a trigger looks at it for the exit itself (`notice_predecessor_exit`).
    predecessor_link: std::sync::Mutex<Option<std::os::fd::OwnedFd>>,
    /// The sockets the predecessor handed over, as it described them.
    inherited: Vec<SocketEntry>,
    /// What `status` reports: upgrades, and connections per protocol.
    counters: Counters,
    connections: Connections,
    /// The phase of the upgrade under way, if any.
    progress: Phases,
    /// Established connections: sent to a committed successor, received from a predecessor.
    migration: crate::migration::Endpoints,
    /// The application's state: how to write it for a successor, and what a predecessor sent.
    state: state::StateSlots,
    /// The predecessor's side of the probation (see `probation`).
    probation: probation::Watch,
    /// The generations older than this one that drained at our commit (see `generations`).
    elders: std::sync::Mutex<Vec<crate::wire::Elder>>,
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
        let (registry, generation, predecessor, predecessor_pid, state) = match inheritance {
            Some(i) => (
                ListenerRegistry::with_inherited(i.sockets),
                i.generation,
                Some(i.channel),
                Some(i.predecessor_pid),
                i.state,
            ),
            // A first start: the sockets systemd passed, if any (socket activation).
            None => (
                ListenerRegistry::with_activated(activation::take()),
                1,
                None,
                None,
                None,
            ),
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
                predecessor_link: std::sync::Mutex::new(None),
                inherited: inherited_sockets,
                config,
                counters: Counters::default(),
                connections: Connections::default(),
                progress: Phases::default(),
                migration: Default::default(),
                state: state::StateSlots::received(state),
                probation: Default::default(),
                elders: Default::default(),
            }),
        };
        tracing::info!(pid = std::process::id(), generation, predecessor = ?predecessor_pid, "starting");
        let (stopping, upgrading) = (handoff.clone(), handoff.clone());
        signals.serve(
            move || stopping.stop(),
            move || {
                let handoff = upgrading.clone();
                async move {
                    let _ = handoff.upgrade().await; // logged by upgrade()
                }
            },
        );
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

    /// Whether the previous generation still drains (it may stay alive, on probation, after
    /// that: see [`Builder::probation`](crate::Builder::probation)). An upgrade may start
    /// meanwhile, up to [`Builder::max_generations`](crate::Builder::max_generations).
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

    /// The connections this process holds, per listener and protocol: one entry per
    /// listener name (as the registry knows it) and protocol
    /// ([`DrainStrategy::protocol`](crate::drain::DrainStrategy::protocol)) that the drains
    /// run for this handle ([`Drain::serve`](crate::drain::Drain::serve),
    /// [`Drain::accept`](crate::drain::Drain::accept),
    /// [`Drain::resume_migrated`](crate::drain::Drain::resume_migrated)) serve.
    pub fn connections(&self) -> Vec<ConnectionCounts> {
        self.inner.connections.counts()
    }

    /// Counts the connections `census` reports in [`connections`](Self::connections), under
    /// `listener` and `protocol`; a source registered again (`identity`) is counted once.
    pub(crate) fn count_connections(
        &self,
        identity: usize,
        listener: Option<String>,
        protocol: &str,
        census: CensusTaker,
    ) {
        self.inner.connections.register(identity, listener, protocol, census);
    }

    /// Resolves once the predecessor can migrate nothing more (it has exited: its end of the
    /// channel closed; at once for a first generation), with how many connections of
    /// `listener` this process resumed from it. Every one of them has been handed to its
    /// strategy by then ([`Drain::resume_migrated`](crate::drain::Drain::resume_migrated)),
    /// though its task may not have run yet.
    ///
    /// For state shared between connections that must not split between two processes (a
    /// chat room): wait for this, and for that many resumed connections to have joined,
    /// before serving new ones. A predecessor exits once its drain has ended, so bound the
    /// wait: its connections that are drained rather than migrated may hold it up to its
    /// drain deadline.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn migration_ended(&self, listener: &str) -> usize {
        self.predecessor_exited().await;
        self.migration().inbound().resumed(listener)
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
}

impl Builder {
    /// Starts: inherits the predecessor's sockets if this process was started by an upgrade,
    /// and installs the signal handlers. Call it early: signals that arrive before are not
    /// handled.
    ///
    /// Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Inherit`] if a predecessor's handoff fails or is refused (the predecessor is
    /// told why and goes on serving; this process should exit), or [`Error::Io`].
    pub async fn start(self) -> Result<Handoff, Error> {
        Handoff::start(self).await
    }
}

/// What the tests of every side start from.
#[cfg(test)]
mod testing {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::Handoff;

    /// A successor that records its pid and never says hello.
    pub(super) fn silent_successor(dir: &Path) -> (PathBuf, PathBuf) {
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

    pub(super) async fn started(executable: &Path) -> Handoff {
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
    pub(super) async fn successor_pid(pid_file: &Path) -> i32 {
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
    pub(super) async fn assert_gone(pid: i32) {
        for _ in 0..1000 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("successor pid {pid} is still there");
    }
}
