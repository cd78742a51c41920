//! [`Drain`]: tracks open connections, tells them when to wind down, enforces the deadline;
//! owns the loops users get wrong (a connection's task, the accept loop, a listener's whole
//! life) and the drain's side of live migration.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::connection::TrackedConnection;
use super::listener::Listener;
use super::report::DrainReport;
use super::shared::{Config, Reached, Shared, Started, Tally};
use super::strategy::DrainStrategy;
use crate::accept_backoff::AcceptBackoff;
use crate::lifecycle::{Census, Handoff, Shutdown};
use crate::migration::{Protocol, Receiver, Resumed};

/// The connections of one process, and their drain.
///
/// Every accepted connection takes a [`TrackedConnection`] from [`track`](Self::track)
/// (two atomic operations: no lock on the accept path) and holds it while it is open. When the
/// process stops serving, [`drain`](Self::drain) tells every connection to wind down in the
/// way of its protocol, waits for them, and at the deadline tells the rest to close at once.
/// [`GRACE_AFTER_DEADLINE`](Self::GRACE_AFTER_DEADLINE) later, the drain ends whatever the
/// connections do, and the library drops every connection task it spawned
/// ([`spawn`](Self::spawn), [`serve`](Self::serve), [`accept`](Self::accept)) that is still
/// running, which closes its socket.
///
/// # Examples
///
/// [`serve`](Self::serve) is the whole life of a listener: accept until a successor serves
/// (or a stop), then drain.
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use handover::drain::{tcp, Drain, DrainStrategy, TrackedConnection};
/// use tokio::net::TcpStream;
///
/// struct Hello;
///
/// impl DrainStrategy<TcpStream> for Hello {
///     async fn serve(&self, mut stream: TcpStream, connection: TrackedConnection) {
///         use tokio::io::AsyncWriteExt;
///         // Every write is bounded by the drain's deadline.
///         if let Some(Ok(())) = connection.until_deadline(stream.write_all(b"hello\n")).await {
///             let _ = tcp::finish(stream, &connection).await;
///         }
///     }
/// }
///
/// # async fn example(listener: tokio::net::TcpListener, handoff: handover::Handoff) {
/// let drain = Drain::builder().deadline(Duration::from_secs(30)).build();
/// let report = drain.serve(&handoff, listener, Arc::new(Hello)).await;
/// println!("drained in {:?}, {} closed at the deadline", report.elapsed, report.forced);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Drain {
    pub(super) shared: Arc<Shared>,
    /// The connections tracked directly ([`track`](Self::track), [`spawn`](Self::spawn)),
    /// not through a listener's accept loop.
    tally: Arc<Tally>,
}

/// Configures a [`Drain`]. Each option states its default.
#[derive(Debug, Clone, Default)]
pub struct DrainBuilder(Config);

impl DrainBuilder {
    /// How long connections have to finish once the drain starts; what is left then is told
    /// to close, and counted. Default: 30 seconds.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.0.deadline = deadline;
        self
    }

    /// How long an idle HTTP/1 keep-alive connection is kept open once the drain starts, in
    /// case its client is sending a request at that very moment (that request is answered,
    /// with `Connection: close`); and how long an HTTP/2 connection must have had no stream
    /// open and read nothing before it gets GOAWAY, so that the GOAWAY never crosses a
    /// request its client is about to send. Default: 1 second.
    pub fn idle_grace(mut self, grace: Duration) -> Self {
        self.0.idle_grace = grace;
        self
    }

    /// Spreads the closing of long-lived connections (WebSocket, raw TCP) at most `per_second`
    /// a second over the drain, so that their clients do not all reconnect at once. Closes
    /// that would fall after the deadline happen at the deadline. Default: all at once.
    pub fn spread_closes(mut self, per_second: f64) -> Self {
        self.0.spread = (per_second > 0.0).then_some(per_second);
        self
    }

    /// The [`Drain`].
    pub fn build(self) -> Drain {
        let shared = Arc::new(Shared::new(self.0));
        let tally = Tally::new(&shared);
        Drain { shared, tally }
    }
}

impl Drain {
    /// How long connections have, after the deadline, to close on their own before the drain
    /// ends without them and the library drops the connection tasks it spawned.
    pub const GRACE_AFTER_DEADLINE: Duration = Duration::from_secs(1);

    /// A [`DrainBuilder`] with the defaults.
    pub fn builder() -> DrainBuilder {
        DrainBuilder::default()
    }

    /// Registers a connection; it counts as open until the returned value is dropped.
    ///
    /// A connection tracked this way is told when to wind down and when to close, but it is
    /// closed by force only if its task was spawned by the library ([`spawn`](Self::spawn)).
    pub fn track(&self) -> TrackedConnection {
        TrackedConnection::new(self.tally.clone())
    }

    /// How many tracked connections are open.
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// How many connections the drain closed by force (open at its deadline); 0 before
    /// the deadline.
    pub fn forced(&self) -> usize {
        self.shared.reached.get().map_or(0, |reached| reached.left)
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.is_cancelled()
    }

    /// The deadline is now: what is still open is told to close at once (a second stop
    /// request while draining, say). Before the drain starts, the drain will begin at its
    /// deadline.
    pub fn expire(&self) {
        self.shared.expired.cancel();
    }

    /// Makes this drain follow `handoff`'s stops: a stop requested while it drains (a second
    /// SIGTERM, a second `handoverctl stop`) makes its deadline now, whoever awaits
    /// [`drain`](Self::drain). [`serve`](Self::serve), [`accept`](Self::accept),
    /// [`resume_migrated`](Self::resume_migrated) and [`migrate_with`](Self::migrate_with)
    /// do it; call it for a drain fed by accept loops of your own ([`spawn`](Self::spawn)).
    /// A drain follows the first handoff it is attached to.
    pub fn attach(&self, handoff: &Handoff) {
        let _ = self.shared.hurry.set(handoff.hurry_signal());
    }

    /// Starts the drain and waits until every connection has closed, or the deadline; then
    /// tells the rest to close at once and waits for them, at most
    /// [`GRACE_AFTER_DEADLINE`](Self::GRACE_AFTER_DEADLINE). Then the drain ends, whatever the
    /// connections do: the library drops the tasks it spawned that are still running.
    ///
    /// A drain [attached](Self::attach) to a [`Handoff`] (by [`accept`](Self::accept), say)
    /// reaches its deadline at once when a stop is requested while it drains (a second
    /// SIGTERM).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the drain goes on, and calling again waits for the same drain.
    pub async fn drain(&self) -> DrainReport {
        let shared = &*self.shared;
        let started = *shared.started.get_or_init(|| Started {
            at: Instant::now(),
            connections: self.open(),
        });
        shared.draining.cancel();
        if shared.reached.get().is_none() {
            tokio::select! {
                biased;
                () = self.all_closed() => return self.report(started),
                () = tokio::time::sleep_until(started.at + shared.config.deadline) => {}
                () = shared.expired.cancelled() => {}
                () = shared.hurried() => {
                    tracing::info!("stop requested while draining: the deadline is now");
                    self.expire();
                }
            }
        }
        let reached = shared.reached.get_or_init(|| {
            shared.record_forced();
            let left = self.open();
            tracing::warn!(
                connections = left,
                "drain deadline reached; closing the connections left"
            );
            Reached {
                at: Instant::now(),
                left,
            }
        });
        shared.deadline.cancel();
        let hard_stop = reached.at + Self::GRACE_AFTER_DEADLINE;
        if tokio::time::timeout_at(hard_stop, self.all_closed()).await.is_err() {
            shared.aborted.get_or_init(|| {
                let left = self.open();
                tracing::warn!(
                    connections = left,
                    "connections ignored the drain deadline; dropping them"
                );
                shared.hard_stop.cancel();
                left
            });
        }
        self.report(started)
    }

    fn report(&self, started: Started) -> DrainReport {
        let shared = &self.shared;
        DrainReport {
            connections: started.connections,
            forced: self.forced(),
            aborted: shared.aborted.get().copied().unwrap_or(0),
            elapsed: started.at.elapsed(),
            migrated: shared.migrated.load(Ordering::Relaxed),
        }
    }

    async fn all_closed(&self) {
        loop {
            let notified = self.shared.closed.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Tracks `io` and serves it with `strategy` in a task of its own. If the connection is
    /// still open [`GRACE_AFTER_DEADLINE`](Self::GRACE_AFTER_DEADLINE) after the drain
    /// deadline, the task is dropped (and `io` with it: its socket closes).
    pub fn spawn<C, S>(&self, strategy: Arc<S>, io: C)
    where
        C: Send + 'static,
        S: DrainStrategy<C>,
    {
        self.spawn_in(self.tally.clone(), strategy, io);
    }

    /// [`spawn`](Self::spawn), counting the connection in `tally`'s source.
    fn spawn_in<C, S>(&self, tally: Arc<Tally>, strategy: Arc<S>, io: C)
    where
        C: Send + 'static,
        S: DrainStrategy<C>,
    {
        self.spawn_tracked(TrackedConnection::new(tally), strategy, io);
    }

    /// [`spawn`](Self::spawn), for a connection counted already.
    fn spawn_tracked<C, S>(&self, connection: TrackedConnection, strategy: Arc<S>, io: C)
    where
        C: Send + 'static,
        S: DrainStrategy<C>,
    {
        tokio::spawn(Supervised {
            hard_stop: self.shared.hard_stop.clone().cancelled_owned(),
            connection: async move { strategy.serve(io, connection).await },
        });
    }

    /// Accepts connections from `listener` and serves each with `strategy` (in a task of its
    /// own, as [`spawn`](Self::spawn) does) until `handoff` says stop (a successor is ready,
    /// or a stop was requested); then drops the listener and returns why. Does not drain:
    /// that is [`serve`](Self::serve), or [`drain`](Self::drain) once every accept loop has
    /// returned.
    ///
    /// The drain is [attached](Self::attach) to `handoff`: a stop requested while it drains
    /// (a second SIGTERM) makes its deadline now. `status` counts the connections under the
    /// listener's name in the registry ([`Listener::as_socket`]) and the strategy's
    /// [`protocol`](DrainStrategy::protocol): two HTTP listeners are two rows.
    ///
    /// The shutdown is looked at first: once it has come, not one more connection is
    /// accepted. Accept errors never end the loop: after one connection's error
    /// (`ECONNABORTED`…) it accepts the next at once; after the process's (`EMFILE`,
    /// `ENFILE`, `ENOBUFS`, `ENOMEM`…) it backs off, 10 ms doubling up to 1 s until an accept
    /// succeeds, and logs the burst once when it starts and once when it ends, with a count.
    ///
    /// # Examples
    ///
    /// Many listeners, one drain, written out (`examples/many_sockets.rs` runs these lines,
    /// and `tests/drain.rs` stops it twice):
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use futures_util::future::join_all;
    /// # use handover::drain::{Drain, DrainStrategy};
    /// # async fn example<S: DrainStrategy<tokio::net::TcpStream> + DrainStrategy<tokio::net::UnixStream>>(
    /// #     handoff: handover::Handoff,
    /// #     listeners: Vec<tokio::net::TcpListener>,
    /// #     unix: tokio::net::UnixListener,
    /// #     strategy: Arc<S>,
    /// # ) {
    /// let drain = Drain::builder().build();
    /// let tcp = listeners
    ///     .into_iter()
    ///     .map(|listener| drain.accept(&handoff, listener, strategy.clone()));
    /// let (reasons, _) = tokio::join!(join_all(tcp), drain.accept(&handoff, unix, strategy.clone()));
    /// // Every loop has stopped accepting: drain. A second SIGTERM makes the deadline now.
    /// let report = drain.drain().await;
    /// # }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: no connection is lost (an unaccepted one stays in the listener's queue),
    /// though the listener is dropped with the future.
    pub async fn accept<L, S>(&self, handoff: &Handoff, mut listener: L, strategy: Arc<S>) -> Shutdown
    where
        L: Listener,
        S: DrainStrategy<L::Io>,
    {
        self.attach(handoff);
        let name = listener.as_socket().and_then(|fd| handoff.registry().name_of(fd));
        let tally = self.count(handoff, name, strategy.protocol());
        self.accept_loop(tally, &mut listener, strategy, handoff.shutdown_signal())
            .await
    }

    /// [`accept`](Self::accept), until `shutdown` resolves rather than a [`Handoff`]'s stop;
    /// returns what it gave. For a drain that serves no handoff: nothing then follows a
    /// second stop (see [`attach`](Self::attach)), and `status` does not count these
    /// connections.
    ///
    /// # Cancel safety
    ///
    /// As [`accept`](Self::accept).
    pub async fn accept_until<L, S, F>(&self, mut listener: L, strategy: Arc<S>, shutdown: F) -> F::Output
    where
        L: Listener,
        S: DrainStrategy<L::Io>,
        F: Future,
    {
        self.accept_loop(self.tally.clone(), &mut listener, strategy, shutdown)
            .await
    }

    /// A new source of connections, counted by `handoff`'s `status` under `listener` and
    /// `protocol`.
    fn count(&self, handoff: &Handoff, listener: Option<String>, protocol: &str) -> Arc<Tally> {
        let tally = Tally::new(&self.shared);
        let counted = tally.clone();
        let census = Box::new(move || Census {
            open: counted.open.load(Ordering::Relaxed),
            draining: counted.shared.draining.is_cancelled(),
            forced: counted.forced.load(Ordering::Relaxed),
        });
        handoff.count_connections(Arc::as_ptr(&tally) as usize, listener, protocol, census);
        tally
    }

    /// Accepts on `listener` until `shutdown`, each connection counted in `tally`; keeps the
    /// listener (a process on probation after an upgrade may serve on it again).
    async fn accept_loop<L, S, F>(
        &self,
        tally: Arc<Tally>,
        listener: &mut L,
        strategy: Arc<S>,
        shutdown: F,
    ) -> F::Output
    where
        L: Listener,
        S: DrainStrategy<L::Io>,
        F: Future,
    {
        let mut backoff = AcceptBackoff::new();
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                biased;
                reason = &mut shutdown => return reason,
                accepted = listener.accept_connection() => accepted,
            };
            match accepted {
                Ok(io) => {
                    backoff.succeeded();
                    self.spawn_in(tally.clone(), strategy.clone(), io);
                }
                Err(error) => tokio::select! {
                    biased;
                    reason = &mut shutdown => return reason,
                    () = backoff.failed(&error) => {}
                },
            }
        }
    }

    /// The whole life of a listener: accepts and serves connections with `strategy` until
    /// `handoff` says stop (a successor is ready, or a stop was requested), stops accepting
    /// (a successor accepts from the same socket from then on), drains, logs the report and
    /// returns it. A stop requested while draining (a second SIGTERM) makes the deadline now
    /// (the drain is [attached](Self::attach) to `handoff`).
    ///
    /// After an upgrade it keeps the listener through the probation
    /// ([`Builder::probation`](crate::Builder::probation)), and returns only when both the
    /// drain and the probation are over. If the successor dies on probation and this process
    /// takes the service back ([`Handoff::taken_back`]), it accepts on the same listener
    /// again, its connections tracked afresh (the ones still draining drain on), and the
    /// report it returns in the end is of its last spell of serving. [`open`](Self::open)
    /// and [`is_draining`](Self::is_draining) of this handle tell of the first spell only.
    ///
    /// Accepts as [`accept`](Self::accept) does: shutdown first, and accept errors back off
    /// without ending the loop. The drain ends
    /// [`GRACE_AFTER_DEADLINE`](Self::GRACE_AFTER_DEADLINE) after the deadline at the latest,
    /// whatever the connections do.
    ///
    /// # Examples
    ///
    /// See [`Drain`].
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: cancelled while accepting, the listener is dropped; while draining,
    /// the drain goes on, and [`drain`](Self::drain) waits for it.
    pub async fn serve<L, S>(&self, handoff: &Handoff, listener: L, strategy: Arc<S>) -> DrainReport
    where
        L: Listener,
        S: DrainStrategy<L::Io>,
    {
        let mut spell = self.clone();
        // The drains of earlier spells of serving, before take-backs: they go on.
        let mut earlier = Vec::new();
        let name = listener.as_socket().and_then(|fd| handoff.registry().name_of(fd));
        let mut listener = Some(listener);
        while let Some(accepting) = listener.as_mut() {
            spell.attach(handoff);
            let tally = spell.count(handoff, name.clone(), strategy.protocol());
            let serving = handoff.serving();
            let reason = spell
                .accept_loop(tally, accepting, strategy.clone(), handoff.shutdown_signal())
                .await;
            // (Ready again, or already upgrading again: taken back already.)
            let serving_again = matches!(
                handoff.state(),
                crate::lifecycle::State::Ready | crate::lifecycle::State::Upgrading
            );
            if !handoff.on_probation() && !serving_again {
                // A final stop, or no probation: new clients are refused at once (and can
                // fail over) once the successor, if any, has closed its copy too.
                listener = None;
            }
            let draining = {
                let (spell, handoff) = (spell.clone(), handoff.clone());
                async move {
                    let report = spell.drain_after(&handoff, reason).await;
                    drop(serving); // once every drain is over, the successor hears it
                    report
                }
            };
            let mut draining = Box::pin(draining);
            let taken_back = tokio::select! {
                report = &mut draining => {
                    if !matches!(reason, Shutdown::Upgraded { .. }) || !handoff.taken_back().await {
                        for drain in earlier {
                            let _ = drain.await;
                        }
                        return report;
                    }
                    None
                }
                // Mid-drain: the drain goes on in a task of its own.
                true = handoff.taken_back(), if matches!(reason, Shutdown::Upgraded { .. }) => Some(draining),
            };
            earlier.extend(taken_back.map(tokio::spawn));
            tracing::info!(
                pid = std::process::id(),
                "serving again on the listener kept through the probation"
            );
            spell = DrainBuilder(self.shared.config.clone()).build();
        }
        // Only a process on probation keeps its listener past the shutdown, and only a
        // take-back (which needs the probation) loops back: never here, but should it be,
        // nothing is left to serve on.
        for drain in earlier {
            let _ = drain.await;
        }
        spell.drain().await
    }

    /// The drain once `handoff` stopped serving for `reason`, logged.
    async fn drain_after(&self, handoff: &Handoff, reason: Shutdown) -> DrainReport {
        let migrating = matches!(reason, Shutdown::Upgraded { .. }) && self.migrate_with(handoff);
        tracing::info!(?reason, connections = self.open(), migrating, "draining");
        let report = self.drain().await;
        tracing::info!(
            pid = std::process::id(),
            generation = handoff.generation(),
            connections = report.connections,
            forced = report.forced,
            aborted = report.aborted,
            migrated = report.migrated,
            drain_ms = report.elapsed.as_millis() as u64,
            "drained"
        );
        report
    }

    /// From now on, connections that ask ([`TrackedConnection::turn_to_close_or_migrate`])
    /// migrate to `handoff`'s successor, if it has committed to one; returns whether it has.
    /// Call before [`drain`](Self::drain); [`serve`](Self::serve) calls it after an upgrade.
    pub fn migrate_with(&self, handoff: &Handoff) -> bool {
        self.attach(handoff);
        match handoff.migration().outbound() {
            Some(outbound) => {
                let _ = self.shared.migration.set(outbound);
                true
            }
            None => false,
        }
    }

    /// Resumes the connections that the predecessor migrates from its listener `listener`
    /// speaking `protocol`: each is checked (an established TCP connection, as declared), its
    /// state parsed as `S` (a state that does not parse is refused, and the predecessor drains
    /// that connection), and served by `strategy` as a [`Resumed`] connection tracked by this
    /// drain, which can migrate it again at the next upgrade.
    ///
    /// Call it before [`Handoff::ready`]: the predecessor migrates as soon as it has
    /// committed. Connections of a listener with no receiver are refused, and drained.
    pub fn resume_migrated<S, St>(&self, handoff: &Handoff, listener: &str, protocol: Protocol, strategy: Arc<St>)
    where
        S: DeserializeOwned + Send + 'static,
        St: DrainStrategy<Resumed<S>>,
    {
        self.attach(handoff);
        let tally = self.count(handoff, Some(listener.to_owned()), strategy.protocol());
        let drain = self.clone();
        let receiver: Arc<Receiver> = Arc::new(move |stream, entry| {
            let state = S::deserialize(&entry.state.0).map_err(|e| format!("a state this process cannot read: {e}"))?;
            let resumed = Resumed {
                stream,
                state,
                leftover: entry.leftover.clone(),
            };
            // Counted from here, before the successor acknowledges it: a drain that starts
            // meanwhile (this process commits to a successor of its own) waits for it.
            let connection = TrackedConnection::new(tally.clone());
            let (drain, strategy) = (drain.clone(), strategy.clone());
            Ok(Box::new(move || drain.spawn_tracked(connection, strategy, resumed)))
        });
        handoff.migration().inbound().register(listener, protocol, receiver);
    }
}

pin_project_lite::pin_project! {
    /// A connection's task: its strategy's future, dropped at the hard stop. Raced in the
    /// task itself, so that there is no handle to keep per connection; written out rather
    /// than a `select!`, whose state would cost every idle connection another 24 bytes.
    struct Supervised<F> {
        #[pin]
        hard_stop: WaitForCancellationFutureOwned,
        #[pin]
        connection: F,
    }
}

impl<F: Future<Output = ()>> Future for Supervised<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        // The hard stop first: once it has come, the connection is not polled again.
        if this.hard_stop.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        this.connection.poll(cx)
    }
}

#[cfg(test)]
mod tests;
