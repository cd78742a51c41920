//! [`Handoff`]: one process's part in the chain of generations.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use super::inheritance::inherit;
use super::successor::{self, Program, ReadySuccessor};
use super::upgrade_error::{UpgradeError, UpgradeReport};
use super::{pid_file, trigger, Builder, Shutdown, State};
use crate::wire::{Channel, Message, SocketEntry};
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
    state: watch::Sender<State>,
    shutdown: watch::Sender<Option<Shutdown>>,
    /// Held for the whole of an upgrade: one at a time.
    upgrade_lock: tokio::sync::Mutex<()>,
    /// The channel to the predecessor, until this process reports ready.
    predecessor: Mutex<Option<Channel>>,
    predecessor_pid: Option<u32>,
    /// True once no predecessor is alive (none, or its channel reached EOF).
    predecessor_gone: watch::Sender<bool>,
    /// Cancelled by a stop requested while this process already drains or stops.
    deadline_now: tokio_util::sync::CancellationToken,
}

impl Handoff {
    /// A [`Builder`] with the defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    pub(crate) async fn start(config: Builder) -> Result<Self, Error> {
        let program = Program::current().map_err(|e| Error::io("finding our executable", e))?;
        let inheritance = inherit(config.upgrade_timeout).await?;
        let (registry, generation, predecessor, predecessor_pid) = match inheritance {
            Some(i) => (
                ListenerRegistry::with_inherited(i.sockets),
                i.generation,
                Some(i.channel),
                Some(i.predecessor_pid),
            ),
            None => (ListenerRegistry::new(), 1, None, None),
        };
        let handoff = Self {
            inner: Arc::new(Inner {
                program,
                registry,
                generation,
                started: Instant::now(),
                state: watch::Sender::new(State::Starting),
                shutdown: watch::Sender::new(None),
                upgrade_lock: tokio::sync::Mutex::new(()),
                predecessor_gone: watch::Sender::new(predecessor.is_none()),
                predecessor: Mutex::new(predecessor),
                predecessor_pid,
                deadline_now: tokio_util::sync::CancellationToken::new(),
                config,
            }),
        };
        tracing::info!(pid = std::process::id(), generation, predecessor = ?predecessor_pid, "starting");
        trigger::install(&handoff, &handoff.inner.config).map_err(|e| Error::io("installing signal handlers", e))?;
        Ok(handoff)
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
        !*self.inner.predecessor_gone.borrow()
    }

    /// Where this process is in its life.
    pub fn state(&self) -> State {
        *self.inner.state.borrow()
    }

    /// The sockets this process holds and would hand over.
    pub fn sockets(&self) -> Vec<SocketEntry> {
        self.inner.registry.sockets()
    }

    /// Reports that this process serves: closes inherited sockets nobody claimed, writes the
    /// PID file, tells the predecessor (which then stops accepting and drains), and from then
    /// on accepts upgrade triggers. Calling it again does nothing.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the PID file cannot be written, and [`Error::Ready`] if the
    /// predecessor cannot be told (it has given up on us; the PID file names it again). In
    /// both cases the predecessor goes on serving and this process should exit.
    pub async fn ready(&self) -> Result<(), Error> {
        let inner = &self.inner;
        if *inner.state.borrow() != State::Starting {
            return Ok(());
        }
        if let Some(path) = &inner.config.control_socket {
            crate::control::serve(self, path)?;
        }
        for entry in inner.registry.close_unclaimed() {
            tracing::info!(socket = %entry, "closed an inherited socket that nothing claimed");
        }
        // The PID file first: once the predecessor reads our ready it may exit at any moment,
        // and operators must find a live, serving process in the file at every instant.
        if let Some(path) = &inner.config.pid_file {
            pid_file::write(path, std::process::id())
                .map_err(|e| Error::io(format!("writing the PID file {}", path.display()), e))?;
        }
        let channel = inner.predecessor.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut channel) = channel {
            let startup_ms = inner.started.elapsed().as_millis() as u64;
            if let Err(error) = channel.send(&Message::Ready { startup_ms }, &[]).await {
                // The predecessor goes on serving: the PID file must name it again.
                if let (Some(path), Some(pid)) = (&inner.config.pid_file, inner.predecessor_pid) {
                    let _ = pid_file::write(path, pid);
                }
                return Err(Error::Ready(error));
            }
            let gone = inner.predecessor_gone.clone();
            let predecessor = inner.predecessor_pid;
            tokio::spawn(async move {
                channel.closed().await;
                drop(channel);
                // The next upgrade is allowed before anyone can read that it is.
                gone.send_replace(true);
                tracing::info!(predecessor_pid = ?predecessor, "predecessor exited");
            });
        }
        inner
            .state
            .send_if_modified(|state| std::mem::replace(state, State::Ready) == State::Starting);
        tracing::info!(
            pid = std::process::id(),
            generation = inner.generation,
            sockets = inner.registry.sockets().len(),
            "ready"
        );
        Ok(())
    }

    /// Starts the successor and hands it every socket; returns once it is ready, at which
    /// point [`shutdown_signal`](Self::shutdown_signal) resolves with
    /// [`Shutdown::Upgraded`]. This is what SIGUSR2 and the control socket's `upgrade` call.
    ///
    /// # Errors
    ///
    /// An [`UpgradeError`] saying why not, or how the successor failed. This process goes on
    /// serving in every case.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future kills the successor if it is not ready yet.
    pub async fn upgrade(&self) -> Result<UpgradeReport, UpgradeError> {
        let inner = &self.inner;
        let _one_at_a_time = inner.upgrade_lock.try_lock().map_err(|_| UpgradeError::InProgress)?;
        match *inner.state.borrow() {
            State::Starting => return Err(UpgradeError::NotReady),
            State::Upgrading => return Err(UpgradeError::InProgress),
            State::Draining | State::Stopping => return Err(UpgradeError::ShuttingDown),
            State::Ready => {}
        }
        if !*inner.predecessor_gone.borrow() {
            return Err(UpgradeError::PredecessorDraining(inner.predecessor_pid.unwrap_or(0)));
        }
        inner.state.send_replace(State::Upgrading);
        tracing::info!(
            pid = std::process::id(),
            generation = inner.generation,
            "upgrade triggered"
        );
        let result = self.launch().await;
        match result {
            Ok(ReadySuccessor {
                mut child,
                channel,
                report,
            }) => {
                inner.state.send_replace(State::Draining);
                inner.shutdown.send_replace(Some(Shutdown::Upgraded {
                    successor_pid: report.successor_pid,
                }));
                tracing::info!(
                    successor_pid = report.successor_pid,
                    generation = report.generation,
                    elapsed_ms = report.elapsed.as_secs_f64() * 1e3,
                    "upgrade complete; draining"
                );
                let pid = report.successor_pid;
                tokio::spawn(async move {
                    // Our end of the channel stays open until we exit: the successor reads
                    // our exit as its EOF. Meanwhile, reap the successor should it die first.
                    let _channel = channel;
                    if let Ok(status) = child.wait().await {
                        tracing::error!(successor_pid = pid, %status, "successor exited while this process drains");
                    }
                });
                Ok(report)
            }
            Err(error) => {
                inner.state.send_if_modified(|state| {
                    let upgrading = *state == State::Upgrading;
                    if upgrading {
                        *state = State::Ready;
                    }
                    upgrading
                });
                tracing::warn!(%error, phase = ?error.phase(), "upgrade failed; still serving");
                Err(error)
            }
        }
    }

    async fn launch(&self) -> Result<ReadySuccessor, UpgradeError> {
        let inner = &self.inner;
        let sockets = inner.registry.handoff_set().map_err(UpgradeError::Io)?;
        let mut stopping = inner.shutdown.subscribe();
        let cancelled = async move {
            let _ = stopping.wait_for(Option::is_some).await;
        };
        successor::launch(
            &inner.program,
            inner.generation,
            sockets,
            inner.config.upgrade_timeout,
            cancelled,
        )
        .await
    }

    /// Requests a final, graceful stop: [`shutdown_signal`](Self::shutdown_signal) resolves
    /// with [`Shutdown::Stopped`], an upgrade under way is abandoned, the paths of Unix
    /// listeners and the PID file are removed. What SIGTERM and SIGINT do. Does nothing if
    /// this process has already handed over or is stopping.
    pub fn stop(&self) {
        let inner = &self.inner;
        let stopped = inner.state.send_if_modified(|state| match state {
            State::Draining | State::Stopping => false,
            _ => {
                *state = State::Stopping;
                true
            }
        });
        if !stopped {
            // A second stop: finish the drain now.
            inner.deadline_now.cancel();
            return;
        }
        tracing::info!(pid = std::process::id(), generation = inner.generation, "stopping");
        inner.registry.unlink_unix_paths();
        if let Some(path) = &inner.config.pid_file {
            pid_file::remove_if_ours(path, std::process::id());
        }
        inner.shutdown.send_replace(Some(Shutdown::Stopped));
    }

    /// Resolves when this process must stop accepting: a successor is ready
    /// ([`Shutdown::Upgraded`]) or a stop was requested ([`Shutdown::Stopped`]). Hand it to
    /// hyper's or axum's graceful shutdown.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe; every call returns a new, independent future.
    pub fn shutdown_signal(&self) -> impl Future<Output = Shutdown> + Send + 'static {
        let mut shutdown = self.inner.shutdown.subscribe();
        async move {
            match shutdown.wait_for(Option::is_some).await {
                Ok(reason) => reason.unwrap_or(Shutdown::Stopped),
                Err(_) => Shutdown::Stopped,
            }
        }
    }

    /// Resolves when a stop is requested while this process already drains or stops (a
    /// second SIGTERM, say): the drain's deadline is now. `Drain::serve`
    /// follows it.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe; every call returns a new, independent future.
    pub fn deadline_now(&self) -> impl Future<Output = ()> + Send + 'static {
        let token = self.inner.deadline_now.clone();
        async move { token.cancelled().await }
    }

    /// Resolves once no predecessor is alive: at once for a first generation, else when the
    /// predecessor has exited (its end of the channel closed).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn predecessor_exited(&self) {
        let mut gone = self.inner.predecessor_gone.subscribe();
        let _ = gone.wait_for(|gone| *gone).await;
    }
}
