//! [`Drain`]: tracks open connections, tells them when to wind down, enforces the deadline.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::TrackedConnection;

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
/// use handoff::drain::{tcp, Drain, DrainStrategy, TrackedConnection};
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
/// # async fn example(listener: tokio::net::TcpListener, handoff: handoff::Handoff) {
/// let drain = Drain::builder().deadline(Duration::from_secs(30)).build();
/// let report = drain.serve(&handoff, listener, Arc::new(Hello)).await;
/// println!("drained in {:?}, {} closed at the deadline", report.elapsed, report.forced);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Drain {
    pub(super) shared: Arc<Shared>,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) config: DrainBuilder,
    /// Cancelled when the drain starts: connections wind down.
    pub(super) draining: CancellationToken,
    /// Cancelled at the deadline: connections close at once.
    pub(super) deadline: CancellationToken,
    /// Cancelled by [`Drain::expire`]: the deadline is now.
    expired: CancellationToken,
    /// Cancelled [`Drain::GRACE_AFTER_DEADLINE`] after the deadline: the library drops the
    /// connection tasks it spawned.
    pub(super) hard_stop: CancellationToken,
    open: AtomicUsize,
    closed: Notify,
    started: OnceLock<Started>,
    reached: OnceLock<Reached>,
    aborted: OnceLock<usize>,
    /// Close spreading: the next free close slot, in nanoseconds after the drain started.
    pub(super) next_slot: AtomicU64,
    /// The way to a committed successor, once connections are to migrate.
    pub(super) migration: OnceLock<crate::migration::Outbound>,
    /// Connections the successor has taken.
    pub(super) migrated: AtomicUsize,
}

/// The start of the drain, recorded once (a second `drain()` call reports the same drain).
#[derive(Debug, Clone, Copy)]
pub(super) struct Started {
    pub(super) at: Instant,
    connections: usize,
}

/// The deadline, as it was reached.
#[derive(Debug, Clone, Copy)]
struct Reached {
    at: Instant,
    left: usize,
}

/// Configures a [`Drain`]. Each option states its default.
#[derive(Debug, Clone)]
pub struct DrainBuilder {
    deadline: Duration,
    pub(super) idle_grace: Duration,
    pub(super) spread: Option<f64>,
}

impl Default for DrainBuilder {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(30),
            idle_grace: Duration::from_secs(1),
            spread: None,
        }
    }
}

impl DrainBuilder {
    /// How long connections have to finish once the drain starts; what is left then is told
    /// to close, and counted. Default: 30 seconds.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// How long an idle HTTP/1 keep-alive connection is kept open once the drain starts, in
    /// case its client is sending a request at that very moment (that request is answered,
    /// with `Connection: close`). Default: 1 second.
    pub fn idle_grace(mut self, grace: Duration) -> Self {
        self.idle_grace = grace;
        self
    }

    /// Spreads the closing of long-lived connections (WebSocket, raw TCP) at most `per_second`
    /// a second over the drain, so that their clients do not all reconnect at once. Closes
    /// that would fall after the deadline happen at the deadline. Default: all at once.
    pub fn spread_closes(mut self, per_second: f64) -> Self {
        self.spread = (per_second > 0.0).then_some(per_second);
        self
    }

    /// The [`Drain`].
    pub fn build(self) -> Drain {
        Drain {
            shared: Arc::new(Shared {
                config: self,
                draining: CancellationToken::new(),
                deadline: CancellationToken::new(),
                expired: CancellationToken::new(),
                hard_stop: CancellationToken::new(),
                open: AtomicUsize::new(0),
                closed: Notify::new(),
                started: OnceLock::new(),
                reached: OnceLock::new(),
                aborted: OnceLock::new(),
                next_slot: AtomicU64::new(0),
                migration: OnceLock::new(),
                migrated: AtomicUsize::new(0),
            }),
        }
    }
}

/// What a drain did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DrainReport {
    /// Connections open when the drain started.
    pub connections: usize,
    /// Connections still open at the deadline, closed by force.
    pub forced: usize,
    /// Of those, the ones still open [`Drain::GRACE_AFTER_DEADLINE`] after the deadline:
    /// they ignored it. The drain ended without them; the library dropped the tasks of those
    /// it spawned (a connection tracked by hand with [`Drain::track`] is its owner's to close).
    pub aborted: usize,
    /// From the start of the drain to its end.
    #[serde(rename = "elapsed_ms", serialize_with = "millis")]
    pub elapsed: Duration,
    /// Of the connections open when the drain started, the ones migrated to the successor
    /// ([`TrackedConnection::migrate`]) rather than drained.
    pub migrated: usize,
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
        self.shared.open.fetch_add(1, Ordering::Relaxed);
        TrackedConnection::new(self.shared.clone())
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

    /// Whether `other` is a clone of this drain.
    pub(crate) fn same_as(&self, other: &Drain) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
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

    /// Starts the drain and waits until every connection has closed, or the deadline; then
    /// tells the rest to close at once and waits for them, at most
    /// [`GRACE_AFTER_DEADLINE`](Self::GRACE_AFTER_DEADLINE). Then the drain ends, whatever the
    /// connections do: the library drops the tasks it spawned that are still running.
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
            }
        }
        let reached = shared.reached.get_or_init(|| {
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
}

impl Shared {
    /// When the drain started (now, if it has not: a close turn is asked for only once the
    /// drain has started, so this is a fallback that does not happen).
    pub(super) fn started_at(&self) -> Instant {
        self.started.get().map_or_else(Instant::now, |started| started.at)
    }

    /// A connection closed.
    pub(super) fn close_one(&self) {
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.closed.notify_waiters();
        }
    }
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How long a test waits for a drain before it calls it stuck (virtual time: paused).
    const STUCK: Duration = Duration::from_secs(600);

    async fn drain_within_bound(drain: &Drain) -> DrainReport {
        tokio::time::timeout(STUCK, drain.drain())
            .await
            .expect("the drain ends at the deadline plus the grace, whatever the connections do")
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_with_no_connection_ends_at_once() {
        let report = Drain::builder().build().drain().await;
        assert_eq!((report.connections, report.forced, report.aborted), (0, 0, 0));
        assert_eq!(report.elapsed, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_left_at_the_deadline_are_told_and_counted() {
        let drain = Drain::builder().deadline(Duration::from_secs(5)).build();
        let polite = drain.track();
        let stubborn = drain.track();
        tokio::spawn(async move {
            polite.draining().await;
            drop(polite);
        });
        let closer = tokio::spawn(async move {
            stubborn.deadline().await;
            drop(stubborn);
        });
        let report = drain.drain().await;
        closer.await.unwrap();
        assert_eq!((report.connections, report.forced, report.aborted), (2, 1, 0));
        assert_eq!(report.elapsed, Duration::from_secs(5));
        assert_eq!(drain.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_ends_at_the_deadline_plus_the_grace_even_if_a_connection_never_closes() {
        let drain = Drain::builder().deadline(Duration::from_secs(5)).build();
        let _held_forever = drain.track();
        let report = drain_within_bound(&drain).await;
        assert_eq!((report.connections, report.forced, report.aborted), (1, 1, 1));
        assert_eq!(report.elapsed, Duration::from_secs(5) + Drain::GRACE_AFTER_DEADLINE);
    }

    /// Dropped when its task is dropped: says so on a channel.
    struct Dropped(Option<tokio::sync::oneshot::Sender<()>>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            let _ = self.0.take().map(|tx| tx.send(()));
        }
    }

    struct IgnoresTheDrain;

    impl super::super::DrainStrategy<Dropped> for IgnoresTheDrain {
        async fn serve(&self, io: Dropped, connection: TrackedConnection) {
            std::future::pending::<()>().await;
            drop((io, connection));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_spawned_connection_that_ignores_the_deadline_is_dropped_and_counted() {
        let drain = Drain::builder().deadline(Duration::from_secs(5)).build();
        let (tx, dropped) = tokio::sync::oneshot::channel();
        drain.spawn(Arc::new(IgnoresTheDrain), Dropped(Some(tx)));
        let report = drain_within_bound(&drain).await;
        assert_eq!((report.connections, report.forced, report.aborted), (1, 1, 1));
        assert_eq!(report.elapsed, Duration::from_secs(5) + Drain::GRACE_AFTER_DEADLINE);
        tokio::time::timeout(STUCK, dropped)
            .await
            .expect("the connection's task is dropped, and its socket with it")
            .unwrap();
        tokio::task::yield_now().await;
        assert_eq!(drain.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn expire_makes_the_deadline_now() {
        let drain = Drain::builder().deadline(Duration::from_secs(60)).build();
        let connection = drain.track();
        tokio::spawn(async move {
            connection.deadline().await;
            drop(connection);
        });
        let expirer = tokio::spawn({
            let drain = drain.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                drain.expire();
            }
        });
        let report = drain_within_bound(&drain).await;
        expirer.await.unwrap();
        assert_eq!((report.connections, report.forced, report.aborted), (1, 1, 0));
        assert_eq!(report.elapsed, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn expire_before_the_drain_starts_it_at_its_deadline() {
        let drain = Drain::builder().deadline(Duration::from_secs(60)).build();
        let connection = drain.track();
        drain.expire();
        let report = drain_within_bound(&drain).await;
        assert_eq!((report.forced, report.aborted), (1, 1));
        assert_eq!(report.elapsed, Drain::GRACE_AFTER_DEADLINE);
        drop(connection);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_called_again_reports_the_same_drain() {
        let drain = Drain::builder().deadline(Duration::from_secs(5)).build();
        let connection = drain.track();
        let first = tokio::time::timeout(Duration::from_secs(1), drain.drain()).await;
        assert!(first.is_err(), "cancelled while the connection is open");
        let closer = tokio::spawn(async move {
            connection.deadline().await;
            drop(connection);
        });
        let report = drain_within_bound(&drain).await;
        closer.await.unwrap();
        assert_eq!((report.connections, report.forced, report.aborted), (1, 1, 0));
        assert_eq!(report.elapsed, Duration::from_secs(5));
    }
}
