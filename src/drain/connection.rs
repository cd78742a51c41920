//! [`TrackedConnection`]: one open connection's view of the drain.

use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::net::TcpStream;

use super::shared::{Shared, Tally};
use crate::migration::{Handed, Handover, MigrationError, Returned};

/// No close slot assigned yet (a slot is nanoseconds after the drain started: 2^63 - 1 is
/// 292 years).
const NO_SLOT: u64 = u64::MAX >> 1;

/// The slot word's top bit: the connection cannot migrate (TLS: its session keys stay in
/// this process). Kept beside the slot so that tracking costs an idle connection no more
/// bytes; a slot never reaches it (292 years).
const UNMOVABLE: u64 = 1 << 63;

/// One open connection's view of the drain. Dropping it marks the connection closed.
#[derive(Debug)]
pub struct TrackedConnection {
    /// Its source, which holds the drain's shared state.
    pub(super) tally: Arc<Tally>,
    /// This connection's close slot when closes are spread, assigned on first use; and, in
    /// its top bit ([`UNMOVABLE`]), whether it can migrate.
    slot: AtomicU64,
}

impl TrackedConnection {
    /// A connection of `tally`'s source, counted open until dropped.
    pub(super) fn new(tally: Arc<Tally>) -> Self {
        tally.open_one();
        Self {
            tally,
            slot: AtomicU64::new(NO_SLOT),
        }
    }

    fn shared(&self) -> &Shared {
        &self.tally.shared
    }

    /// Resolves when the drain starts: wind down in the way of the protocol.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn draining(&self) {
        self.shared().draining.cancelled().await;
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.shared().draining.is_cancelled()
    }

    /// Resolves at the drain deadline: close now. A connection still open
    /// [`Drain::GRACE_AFTER_DEADLINE`](super::Drain::GRACE_AFTER_DEADLINE) later is
    /// dropped by the library if the library spawned its task.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn deadline(&self) {
        self.shared().deadline.cancelled().await;
    }

    /// Runs `future` (a write to the client, say) unless the drain deadline comes first:
    /// `None` then, and `future` is dropped. Put every wait on the client under it, so that a
    /// client that stops reading cannot hold the connection past the deadline.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(mut stream: tokio::net::TcpStream, connection: handover::drain::TrackedConnection) {
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
        if let Some(per_second) = self.shared().config.spread {
            // Boxed: the timer is paid for by draining connections only; an idle one's task
            // holds no more than the wait above.
            Box::pin(self.wait_for_slot(per_second)).await;
        }
    }

    async fn wait_for_slot(&self, per_second: f64) {
        let at = self.shared().started_at() + Duration::from_nanos(self.slot(per_second));
        tokio::select! {
            () = tokio::time::sleep_until(at) => {}
            () = self.deadline() => {}
        }
    }

    /// This connection's close slot, in nanoseconds after the drain started: the next free
    /// one, taken once.
    fn slot(&self, per_second: f64) -> u64 {
        let mut word = self.slot.load(Ordering::Relaxed);
        if word & NO_SLOT != NO_SLOT {
            return word & NO_SLOT;
        }
        let step = (1e9 / per_second) as u64;
        let taken = self
            .shared()
            .next_slot
            .fetch_add(step, Ordering::Relaxed)
            .min(NO_SLOT - 1);
        // Two first calls at once on the same connection (from two tasks sharing it): the
        // first to store its slot wins, the other's slot stays unused.
        loop {
            let with_slot = (word & UNMOVABLE) | taken;
            match self
                .slot
                .compare_exchange(word, with_slot, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return taken,
                Err(stored) if stored & NO_SLOT != NO_SLOT => return stored & NO_SLOT,
                Err(stored) => word = stored, // only the flag changed
            }
        }
    }

    /// Marks the connection as one that cannot migrate: [`turn_to_close_or_migrate`](Self::turn_to_close_or_migrate)
    /// says [`Turn::Close`], and [`migrate`](Self::migrate) refuses it.
    #[cfg(feature = "tls")]
    pub(super) fn mark_unmovable(&self) {
        self.slot.fetch_or(UNMOVABLE, Ordering::Relaxed);
    }

    fn is_unmovable(&self) -> bool {
        self.slot.load(Ordering::Relaxed) & UNMOVABLE != 0
    }

    /// [`deadline`](Self::deadline) as a future that owns what it waits on: for a
    /// connection's state machine that polls it beside its I/O (the axum WebSocket).
    #[cfg(feature = "axum")]
    pub(crate) fn deadline_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.shared().deadline.clone().cancelled_owned()
    }

    /// Resolves [`Drain::GRACE_AFTER_DEADLINE`](super::Drain::GRACE_AFTER_DEADLINE) after the
    /// deadline, when the library drops the connection tasks it spawned: for a task the
    /// library spawns outside [`Drain::spawn`](super::Drain::spawn) (an upgraded WebSocket's).
    #[cfg(feature = "axum")]
    pub(crate) fn hard_stop_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.shared().hard_stop.clone().cancelled_owned()
    }

    #[cfg(feature = "http")]
    pub(crate) fn idle_grace(&self) -> Duration {
        self.shared().config.idle_grace
    }
}

impl Drop for TrackedConnection {
    fn drop(&mut self) {
        self.tally.close_one();
    }
}

/// What a connection is to do once the drain has started: see
/// [`TrackedConnection::turn_to_close_or_migrate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Wind down in the way of the protocol, as without migration.
    Close,
    /// Stop at a safe point and hand the stream over with [`TrackedConnection::migrate`].
    Migrate,
}

impl TrackedConnection {
    /// Resolves when the drain reaches this connection, with what to do: [`Turn::Migrate`] at
    /// once when a committed successor takes migrations
    /// ([`Drain::migrate_with`](super::Drain::migrate_with); [`Drain::serve`](super::Drain::serve) arranges it after an upgrade), else
    /// [`Turn::Close`] when [`turn_to_close`](Self::turn_to_close) would resolve. A connection
    /// that never calls this (or `migrate`) is drained as without migration; so is a TLS
    /// connection (feature `tls`), told [`Turn::Close`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`turn_to_close`](Self::turn_to_close).
    pub async fn turn_to_close_or_migrate(&self) -> Turn {
        self.draining().await;
        if self.shared().migration.get().is_some() {
            if !self.is_unmovable() {
                return Turn::Migrate;
            }
            self.shared().note_tls_not_migrated();
        }
        self.turn_to_close().await;
        Turn::Close
    }

    /// Hands `stream` to the successor with `handover`'s state and unconsumed bytes; returns
    /// once the successor has acknowledged it (this process's copy is closed then, which
    /// neither ends nor resets the connection), and counts it as migrated.
    ///
    /// Call it at a safe point: every write flushed, and every byte read either consumed
    /// into the state or in `handover.leftover`. Bytes not yet read stay in the socket for
    /// the successor.
    ///
    /// It returns by the drain deadline at the latest: a stream not sent yet comes back then
    /// ([`MigrationError::NotSentByDeadline`]), to be closed; one already on its way is left
    /// to the successor (`Ok`, not counted as migrated), which keeps it should this process
    /// exit before reading the acknowledgement (this process's copy closes with it).
    ///
    /// # Errors
    ///
    /// The stream back, in a [`Returned`], with a [`MigrationError`]: the state or leftover
    /// too large, a state that cannot be serialized, no successor taking migrations, a TLS
    /// connection ([`MigrationError::Tls`]), the successor refused it or did not acknowledge
    /// it. This process is then its only owner: drain it the old way.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: once handed over, the stream belongs to the migration, and is
    /// migrated or closed.
    pub async fn migrate<T: Serialize + ?Sized>(
        &self,
        stream: TcpStream,
        handover: Handover<'_, T>,
    ) -> Result<(), Returned> {
        self.hand_over(Handed::Stream(stream), handover)
            .await
            .map_err(|Returned { stream, error }| match stream {
                Handed::Stream(stream) => Returned { stream, error },
                Handed::Duplicate(_) => unreachable!("a stream comes back as it was handed over"),
            })
    }

    /// As [`migrate`](Self::migrate), for `duplicate`, a duplicate of the descriptor of a
    /// stream its caller keeps whole (and drains should this fail). Ours closes once the
    /// successor has it, or at once if it does not move; one left to the successor at the
    /// deadline closes when its acknowledgement comes.
    #[cfg_attr(not(feature = "websocket"), allow(dead_code))] // the WebSocket hand-over's
    pub(crate) async fn migrate_duplicate<T: Serialize + ?Sized>(
        &self,
        duplicate: OwnedFd,
        handover: Handover<'_, T>,
    ) -> Result<(), MigrationError> {
        self.hand_over(Handed::Duplicate(duplicate), handover)
            .await
            .map_err(|returned| returned.error)
    }

    async fn hand_over<T: Serialize + ?Sized>(
        &self,
        stream: Handed,
        handover: Handover<'_, T>,
    ) -> Result<(), Returned<Handed>> {
        if self.is_unmovable() {
            // Its plain socket carries records encrypted with keys only this process holds.
            self.shared().note_tls_not_migrated();
            return Err(Returned {
                stream,
                error: MigrationError::Tls,
            });
        }
        let Some(outbound) = self.shared().migration.get() else {
            return Err(Returned {
                stream,
                error: MigrationError::NotMigrating,
            });
        };
        let entry = match handover.entry(stream.as_fd()) {
            Ok(entry) => entry,
            Err(error) => {
                tracing::warn!(%error, listener = handover.listener, "cannot migrate a connection; draining it");
                return Err(Returned { stream, error });
            }
        };
        // Counted once acknowledged; one left to the successor at the deadline is not.
        if outbound.migrate(entry, stream, self.deadline()).await? {
            self.shared().migrated.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
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

    mod migration {
        use futures_util::FutureExt;
        use serde::Deserialize;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::sync::mpsc;

        use super::*;
        use crate::drain::tracker::Drain;
        use crate::migration::{Inbound, Outbound, Protocol, Receiver};
        use crate::wire::{pair, Channel, Message};

        #[derive(Debug, PartialEq, Deserialize)]
        struct Count {
            n: u64,
        }

        type Taken = (TcpStream, Count, Vec<u8>);

        /// An accepted connection and its client.
        async fn connection() -> (TcpStream, TcpStream) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            (listener.accept().await.unwrap().0, client)
        }

        /// A drain migrating over a channel; the channel's other end.
        fn migrating_drain() -> (Drain, Channel) {
            let (ours, theirs) = pair().unwrap();
            let (outbound, pending) = Outbound::new();
            pending.start(Channel::new(ours).unwrap());
            let drain = Drain::builder().build();
            drain.shared.migration.set(outbound).unwrap();
            (drain, Channel::new(theirs).unwrap())
        }

        /// A successor resuming `echo` connections whose state is a `Count`.
        fn successor(channel: Channel) -> mpsc::UnboundedReceiver<Taken> {
            successor_serving(channel, true)
        }

        /// The same, serving, or else committed to a successor of its own (draining).
        fn successor_serving(mut channel: Channel, serving: bool) -> mpsc::UnboundedReceiver<Taken> {
            let (tx, rx) = mpsc::unbounded_channel();
            let inbound = Arc::new(Inbound::default());
            let receiver: Arc<Receiver> = Arc::new(move |stream, entry| {
                let state =
                    Count::deserialize(&entry.state.0).map_err(|e| format!("a state this process cannot read: {e}"))?;
                let (tx, leftover) = (tx.clone(), entry.leftover.clone());
                Ok(Box::new(move || drop(tx.send((stream, state, leftover)))))
            });
            inbound.register("echo", Protocol::RawTcp, receiver);
            tokio::spawn(async move { inbound.receive(&mut channel, || serving).await });
            rx
        }

        fn handover<'a, T: ?Sized>(state: &'a T, leftover: &'a [u8]) -> Handover<'a, T> {
            Handover {
                listener: "echo",
                protocol: Protocol::RawTcp,
                state,
                leftover,
            }
        }

        /// The client's next bytes reach `stream`: it is still the same live connection.
        async fn still_connected(stream: &mut TcpStream, client: &mut TcpStream) {
            client.write_all(b"ok").await.unwrap();
            let mut got = [0; 2];
            stream.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ok");
        }

        #[tokio::test]
        async fn a_connection_moves_with_its_state_and_leftover_bytes() {
            let (drain, channel) = migrating_drain();
            let mut taken = successor(channel);
            let (stream, mut client) = connection().await;
            let tracked = drain.track();
            assert_eq!(
                tracked.turn_to_close_or_migrate().now_or_never(),
                None,
                "not before the drain"
            );
            drain.shared.draining.cancel();
            assert_eq!(tracked.turn_to_close_or_migrate().await, Turn::Migrate);
            tracked
                .migrate(stream, handover(&serde_json::json!({"n": 3}), b"abc"))
                .await
                .unwrap();
            let (mut stream, state, leftover) = taken.recv().await.unwrap();
            assert_eq!((state, leftover), (Count { n: 3 }, b"abc".to_vec()));
            still_connected(&mut stream, &mut client).await;
            drop(tracked);
            assert_eq!(drain.drain().await.migrated, 1);
        }

        #[tokio::test]
        async fn a_state_the_successor_cannot_read_is_refused_and_the_stream_comes_back() {
            let (drain, channel) = migrating_drain();
            let mut taken = successor(channel);
            let (stream, mut client) = connection().await;
            let tracked = drain.track();
            let returned = tracked.migrate(stream, handover("not a count", &[])).await.unwrap_err();
            let MigrationError::Refused { reason } = &returned.error else {
                panic!("{:?}", returned.error)
            };
            assert!(
                reason.contains("`echo`") && reason.contains("a state this process cannot read"),
                "{reason}"
            );
            let mut stream = returned.stream;
            still_connected(&mut stream, &mut client).await;
            assert!(taken.try_recv().is_err(), "the successor resumed nothing");
            drop(tracked);
            assert_eq!(drain.drain().await.migrated, 0);
        }

        #[tokio::test]
        async fn a_successor_that_drains_itself_refuses_the_connection_and_it_comes_back() {
            let (drain, channel) = migrating_drain();
            let mut taken = successor_serving(channel, false);
            let (stream, mut client) = connection().await;
            let tracked = drain.track();
            let returned = tracked
                .migrate(stream, handover(&serde_json::json!({"n": 1}), &[]))
                .await
                .unwrap_err();
            let MigrationError::Refused { reason } = &returned.error else {
                panic!("{:?}", returned.error)
            };
            assert!(reason.contains("takes no more connections"), "{reason}");
            let mut stream = returned.stream;
            still_connected(&mut stream, &mut client).await;
            assert!(taken.try_recv().is_err(), "the successor resumed nothing");
        }

        #[tokio::test]
        async fn a_state_too_large_or_unserializable_is_refused_before_sending() {
            let (drain, channel) = migrating_drain();
            let mut taken = successor(channel);
            let (stream, _client) = connection().await;
            let tracked = drain.track();
            let huge = "x".repeat(crate::wire::migration::MAX_STATE_BYTES);
            let returned = tracked.migrate(stream, handover(&huge, &[])).await.unwrap_err();
            assert!(
                matches!(returned.error, MigrationError::StateTooLarge { .. }),
                "{:?}",
                returned.error
            );
            let map: std::collections::HashMap<(u8, u8), u8> = [((1, 2), 3)].into();
            let returned = tracked.migrate(returned.stream, handover(&map, &[])).await.unwrap_err();
            assert!(
                matches!(returned.error, MigrationError::StateMalformed(_)),
                "{:?}",
                returned.error
            );
            let leftover = vec![0; crate::wire::migration::MAX_LEFTOVER_BYTES + 1];
            let returned = tracked
                .migrate(returned.stream, handover(&0, &leftover))
                .await
                .unwrap_err();
            assert!(
                matches!(returned.error, MigrationError::LeftoverTooLarge { .. }),
                "{:?}",
                returned.error
            );
            assert!(taken.try_recv().is_err());
        }

        /// A successor that takes the descriptors but does not answer in time: the connection
        /// comes back, and its late answer cannot be sent, so it knows not to serve its copy.
        #[tokio::test(start_paused = true)]
        async fn without_an_acknowledgement_in_time_the_connection_comes_back_and_the_late_one_fails() {
            let (drain, mut successor) = migrating_drain();
            let (stream, mut client) = connection().await;
            let tracked = drain.track();
            let migrating = tracked.migrate(stream, handover(&0, &[]));
            let (returned, batch) = tokio::join!(migrating, successor.recv("migrate"));
            let returned = returned.unwrap_err();
            assert!(
                matches!(returned.error, MigrationError::SuccessorGone { .. }),
                "{:?}",
                returned.error
            );
            let Message::Migrate { index, .. } = batch.unwrap().message else {
                panic!("a batch")
            };
            let mut stream = returned.stream;
            still_connected(&mut stream, &mut client).await;
            let late = successor.send(&Message::Migrated { index, refused: vec![] }, &[]).await;
            assert!(late.unwrap_err().is_peer_gone());
        }
    }
}
