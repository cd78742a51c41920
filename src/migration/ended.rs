//! The successor's cue that migration is over: nothing more will come from the predecessor.

use crate::Handoff;

impl Handoff {
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
}
