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
            let state = S::deserialize(&entry.state.0)
                .map_err(|e| format!("a state this process cannot read: {e}"))?;
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
