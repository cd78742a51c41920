//! The drain's side of live migration: a connection's turn may be to migrate rather than
//! close, and a successor's drain resumes what its predecessor migrated.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;

use super::{Drain, DrainStrategy, TrackedConnection};
use crate::migration::{Handover, MigrationError, Protocol, Receiver, Resumed, Returned};
use crate::Handoff;

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
    /// ([`Drain::migrate_with`]; [`Drain::serve`] arranges it after an upgrade), else
    /// [`Turn::Close`] when [`turn_to_close`](Self::turn_to_close) would resolve. A connection
    /// that never calls this (or `migrate`) is drained as without migration.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`turn_to_close`](Self::turn_to_close).
    pub async fn turn_to_close_or_migrate(&self) -> Turn {
        self.draining().await;
        if self.shared.migration.get().is_some() {
            return Turn::Migrate;
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
    /// # Errors
    ///
    /// The stream back, in a [`Returned`], with a [`MigrationError`]: the state or leftover
    /// too large, a state that cannot be serialized, no successor taking migrations, the
    /// successor refused it or did not acknowledge it. This process is then its only owner:
    /// drain it the old way.
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
        let Some(outbound) = self.shared.migration.get() else {
            return Err(Returned {
                stream,
                error: MigrationError::NotMigrating,
            });
        };
        let entry = match handover.entry(&stream) {
            Ok(entry) => entry,
            Err(error) => {
                tracing::warn!(%error, listener = handover.listener, "cannot migrate a connection; draining it");
                return Err(Returned { stream, error });
            }
        };
        outbound.migrate(entry, stream).await?;
        self.shared.migrated.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Drain {
    /// From now on, connections that ask ([`TrackedConnection::turn_to_close_or_migrate`])
    /// migrate to `handoff`'s successor, if it has committed to one; returns whether it has.
    /// Call before [`drain`](Self::drain); [`serve`](Self::serve) calls it after an upgrade.
    pub fn migrate_with(&self, handoff: &Handoff) -> bool {
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
        let drain = self.clone();
        let receiver: Arc<Receiver> = Arc::new(move |stream, entry| {
            let state = S::deserialize(&entry.state.0).map_err(|e| format!("a state this process cannot read: {e}"))?;
            let resumed = Resumed {
                stream,
                state,
                leftover: entry.leftover.clone(),
            };
            let (drain, strategy) = (drain.clone(), strategy.clone());
            Ok(Box::new(move || drain.spawn(strategy, resumed)))
        });
        handoff.migration().inbound().register(listener, protocol, receiver);
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;
    use serde::Deserialize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    use super::*;
    use crate::migration::{Inbound, Outbound};
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
    fn successor(mut channel: Channel) -> mpsc::UnboundedReceiver<Taken> {
        let (tx, rx) = mpsc::unbounded_channel();
        let inbound = Arc::new(Inbound::default());
        let receiver: Arc<Receiver> = Arc::new(move |stream, entry| {
            let state =
                Count::deserialize(&entry.state.0).map_err(|e| format!("a state this process cannot read: {e}"))?;
            let (tx, leftover) = (tx.clone(), entry.leftover.clone());
            Ok(Box::new(move || drop(tx.send((stream, state, leftover)))))
        });
        inbound.register("echo", Protocol::RawTcp, receiver);
        tokio::spawn(async move { inbound.receive(&mut channel).await });
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
