//! [`TrackedConnection`]: one open connection's view of the drain.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::tracker::Shared;

/// No close slot assigned yet (a slot is nanoseconds after the drain started: `u64::MAX` is
/// 584 years).
const NO_SLOT: u64 = u64::MAX;

/// One open connection's view of the drain. Dropping it marks the connection closed.
#[derive(Debug)]
pub struct TrackedConnection {
    pub(super) shared: Arc<Shared>,
    /// This connection's close slot when closes are spread, assigned on first use.
    slot: AtomicU64,
}

impl TrackedConnection {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            slot: AtomicU64::new(NO_SLOT),
        }
    }

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

    /// Resolves at the drain deadline: close now. A connection still open
    /// [`Drain::GRACE_AFTER_DEADLINE`](super::Drain::GRACE_AFTER_DEADLINE) later is
    /// dropped by the library if the library spawned its task.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn deadline(&self) {
        self.shared.deadline.cancelled().await;
    }

    /// Runs `future` (a write to the client, say) unless the drain deadline comes first:
    /// `None` then, and `future` is dropped. Put every wait on the client under it, so that a
    /// client that stops reading cannot hold the connection past the deadline.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(mut stream: tokio::net::TcpStream, connection: handoff::drain::TrackedConnection) {
    /// use tokio::io::AsyncWriteExt;
    /// match connection.until_deadline(stream.write_all(b"hello\n")).await {
    ///     Some(Ok(())) => {}            // written
    ///     Some(Err(_error)) => return,  // the client went away
    ///     None => return,               // the deadline: close now
    /// }
    /// # }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// As cancel safe as `future`.
    pub async fn until_deadline<F: Future>(&self, future: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            () = self.deadline() => None,
            output = future => Some(output),
        }
    }

    /// Resolves when it is this connection's turn to close: once the drain has started, at
    /// once, or at its slot when closes are spread (never later than the deadline).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the connection's slot is assigned on the first call that needs one, and
    /// every later call (after a cancelled one, in a `select!` loop) waits for the same slot.
    pub async fn turn_to_close(&self) {
        self.draining().await;
        if let Some(per_second) = self.shared.config.spread {
            // Boxed: the timer is paid for by draining connections only; an idle one's task
            // holds no more than the wait above.
            Box::pin(self.wait_for_slot(per_second)).await;
        }
    }

    async fn wait_for_slot(&self, per_second: f64) {
        let at = self.shared.started_at() + Duration::from_nanos(self.slot(per_second));
        tokio::select! {
            () = tokio::time::sleep_until(at) => {}
            () = self.deadline() => {}
        }
    }

    /// This connection's close slot, in nanoseconds after the drain started: the next free
    /// one, taken once.
    fn slot(&self, per_second: f64) -> u64 {
        let slot = self.slot.load(Ordering::Relaxed);
        if slot != NO_SLOT {
            return slot;
        }
        let step = (1e9 / per_second) as u64;
        let taken = self.shared.next_slot.fetch_add(step, Ordering::Relaxed);
        // Two first calls at once on the same connection (from two tasks sharing it): the
        // first to store its slot wins, the other's slot stays unused.
        match self
            .slot
            .compare_exchange(NO_SLOT, taken, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => taken,
            Err(stored) => stored,
        }
    }

    #[cfg(feature = "http")]
    pub(crate) fn idle_grace(&self) -> Duration {
        self.shared.config.idle_grace
    }
}

impl Drop for TrackedConnection {
    fn drop(&mut self) {
        self.shared.close_one();
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::super::Drain;
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spread_closes_take_n_over_r_seconds() {
        let drain = Drain::builder()
            .spread_closes(10.0)
            .deadline(Duration::from_secs(60))
            .build();
        for _ in 0..50 {
            let connection = drain.track();
            tokio::spawn(async move {
                connection.turn_to_close().await;
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
                connection.turn_to_close().await;
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

    #[tokio::test(start_paused = true)]
    async fn a_turn_cancelled_a_hundred_times_leaves_the_others_their_slots() {
        let drain = Drain::builder()
            .spread_closes(10.0)
            .deadline(Duration::from_secs(60))
            .build();
        let first = drain.track();
        let chatty = drain.track();
        let others: Vec<_> = (0..8).map(|_| drain.track()).collect();
        let drained = tokio::spawn({
            let drain = drain.clone();
            async move { drain.drain().await }
        });
        while !drain.is_draining() {
            tokio::task::yield_now().await;
        }
        first.turn_to_close().await; // slot 0: at once
        drop(first);
        // A `select!` loop whose other branch wins every time: each turn is polled once and
        // dropped.
        for _ in 0..100 {
            assert!(chatty.turn_to_close().now_or_never().is_none());
        }
        for connection in others {
            tokio::spawn(async move {
                connection.turn_to_close().await;
                drop(connection);
            });
        }
        chatty.turn_to_close().await;
        drop(chatty);
        let report = drained.await.unwrap();
        assert_eq!(report.forced, 0);
        // The chatty connection holds the slot at 0.1 s; the eight others, 0.2 s to 0.9 s.
        assert_eq!(report.elapsed, Duration::from_millis(900));
    }
}
