//! [`Drain`]: tracks open connections, tells them when to wind down, enforces the deadline.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The connections of one process, and their drain.
///
/// Every accepted connection takes a [`TrackedConnection`] from [`track`](Self::track)
/// (two atomic operations: no lock on the accept path) and holds it while it is open. When the
/// process stops serving, [`drain`](Self::drain) tells every connection to wind down in the
/// way of its protocol, waits for them, and at the deadline tells the rest to close at once.
///
/// # Examples
///
/// ```no_run
/// # async fn example(listener: tokio::net::TcpListener, handoff: handoff::Handoff) {
/// use std::time::Duration;
/// let drain = handoff::drain::Drain::builder().deadline(Duration::from_secs(30)).build();
/// let shutdown = handoff.shutdown_signal();
/// tokio::pin!(shutdown);
/// loop {
///     tokio::select! {
///         Ok((stream, _)) = listener.accept() => {
///             let connection = drain.track();
///             tokio::spawn(async move {
///                 // serve `stream`, watching connection.draining() and connection.deadline()
///                 # drop((stream, connection));
///             });
///         }
///         _ = &mut shutdown => break,
///     }
/// }
/// drop(listener);
/// let report = drain.drain().await;
/// println!("drained in {:?}, {} closed at the deadline", report.elapsed, report.forced);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Drain {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: Builder,
    draining: CancellationToken,
    deadline: CancellationToken,
    open: AtomicUsize,
    closed: Notify,
    started: OnceLock<Instant>,
    /// Close spreading: the next free close slot, in nanoseconds after the drain started.
    next_slot: AtomicU64,
}

/// Configures a [`Drain`]. Each option states its default.
#[derive(Debug, Clone)]
pub struct Builder {
    deadline: Duration,
    idle_grace: Duration,
    spread: Option<f64>,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(30),
            idle_grace: Duration::from_secs(1),
            spread: None,
        }
    }
}

impl Builder {
    /// How long connections have to finish once the drain starts; what is left then is closed
    /// and counted. Default: 30 seconds.
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
                open: AtomicUsize::new(0),
                closed: Notify::new(),
                started: OnceLock::new(),
                next_slot: AtomicU64::new(0),
            }),
        }
    }
}

/// What a drain did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DrainReport {
    /// Connections open when the drain started.
    pub connections: usize,
    /// Connections still open at the deadline, closed by force.
    pub forced: usize,
    /// From the start of the drain to the last connection closed.
    #[serde(rename = "elapsed_ms", serialize_with = "millis")]
    pub elapsed: Duration,
}

impl Drain {
    /// A [`Builder`] with the defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Registers a connection; it counts as open until the returned value is dropped.
    pub fn track(&self) -> TrackedConnection {
        self.shared.open.fetch_add(1, Ordering::Relaxed);
        TrackedConnection {
            shared: self.shared.clone(),
        }
    }

    /// How many tracked connections are open.
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.is_cancelled()
    }

    /// Starts the drain and waits until every connection has closed, or the deadline; then
    /// tells the rest to close at once and waits for them.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the drain goes on, and calling again waits for the same drain.
    pub async fn drain(&self) -> DrainReport {
        let shared = &self.shared;
        let started = *shared.started.get_or_init(Instant::now);
        let connections = self.open();
        shared.draining.cancel();
        let deadline = started + shared.config.deadline;
        let forced = if tokio::time::timeout_at(deadline, self.all_closed()).await.is_ok() {
            0
        } else {
            let left = self.open();
            tracing::warn!(
                connections = left,
                "drain deadline reached; closing the connections left"
            );
            shared.deadline.cancel();
            self.all_closed().await;
            left
        };
        DrainReport {
            connections,
            forced,
            elapsed: started.elapsed(),
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

/// One open connection's view of the drain. Dropping it marks the connection closed.
#[derive(Debug)]
pub struct TrackedConnection {
    shared: Arc<Shared>,
}

impl TrackedConnection {
    /// Resolves when the drain starts: wind down in the way of the protocol.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn draining(&self) {
        self.shared.draining.cancelled().await;
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.is_cancelled()
    }

    /// Resolves at the drain deadline: close now.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn deadline(&self) {
        self.shared.deadline.cancelled().await;
    }

    /// Resolves when this connection may start closing: once the drain has started, at once,
    /// or at its slot when closes are spread (never later than the deadline).
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: a cancelled call has used up a slot.
    pub async fn close_turn(&self) {
        self.draining().await;
        if let Some(per_second) = self.shared.config.spread {
            // Boxed: the timer is paid for by draining connections only; an idle one's task
            // holds no more than the wait above.
            Box::pin(self.wait_for_slot(per_second)).await;
        }
    }

    async fn wait_for_slot(&self, per_second: f64) {
        let shared = &self.shared;
        let started = *shared.started.get_or_init(Instant::now);
        let step = (1e9 / per_second) as u64;
        let slot = shared.next_slot.fetch_add(step, Ordering::Relaxed);
        let at = started + Duration::from_nanos(slot);
        tokio::select! {
            () = tokio::time::sleep_until(at) => {}
            () = self.deadline() => {}
        }
    }

    pub(crate) fn idle_grace(&self) -> Duration {
        self.shared.config.idle_grace
    }
}

impl Drop for TrackedConnection {
    fn drop(&mut self) {
        if self.shared.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.closed.notify_waiters();
        }
    }
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_drain_with_no_connection_ends_at_once() {
        let report = Drain::builder().build().drain().await;
        assert_eq!((report.connections, report.forced), (0, 0));
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
        assert_eq!((report.connections, report.forced), (2, 1));
        assert_eq!(report.elapsed, Duration::from_secs(5));
        assert_eq!(drain.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn spread_closes_take_n_over_r_seconds() {
        let drain = Drain::builder()
            .spread_closes(10.0)
            .deadline(Duration::from_secs(60))
            .build();
        let mut turns = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let connection = drain.track();
            turns.spawn(async move {
                connection.close_turn().await;
                drop(connection);
            });
        }
        let report = drain.drain().await;
        assert_eq!(report.forced, 0);
        // 50 closes at 10 per second: the last slot starts 4.9 s after the first.
        assert_eq!(report.elapsed, Duration::from_millis(4900));
    }

    #[tokio::test(start_paused = true)]
    async fn spread_closes_never_outlast_the_deadline() {
        let drain = Drain::builder()
            .spread_closes(1.0)
            .deadline(Duration::from_secs(3))
            .build();
        for _ in 0..10 {
            let connection = drain.track();
            tokio::spawn(async move {
                connection.close_turn().await;
                drop(connection);
            });
        }
        let report = drain.drain().await;
        assert_eq!(report.elapsed, Duration::from_secs(3));
        assert_eq!(
            report.forced, 7,
            "slots 0, 1 and 2 s close in time, the 7 others at the deadline"
        );
    }
}
