//! Several generations at once (`Builder::max_generations`): which older generations still
//! drain, how many processes that makes, and what `status` and our own successor hear of
//! them.

use super::Handoff;
use crate::lifecycle::elders::{self, Draining};
use crate::wire::Elder;

impl Handoff {
    /// At the commit: the older generations that our predecessor said still drain (itself
    /// among them).
    pub(super) fn adopt_elders(&self, elders: Vec<Elder>) {
        *self.elders() = elders;
    }

    /// The older generations that drain now, oldest first: those before our predecessor that
    /// still run, and our predecessor until it has drained (it half-closes the channel, or
    /// exits). A predecessor that only waits out its probation is not counted: it exits as
    /// soon as we commit to a successor of our own.
    pub(super) fn draining_elders(&self) -> Vec<Elder> {
        let inner = &self.inner;
        let known = self.elders().clone();
        let predecessor = inner.predecessor_pid;
        let mut draining: Vec<Elder> = known
            .iter()
            .filter(|elder| Some(elder.pid) != predecessor && elders::is_alive(elder))
            .copied()
            .collect();
        if let (Some(pid), true) = (predecessor, self.predecessor_running()) {
            let named = known.iter().find(|elder| elder.pid == pid).copied();
            // A predecessor that named nobody (none before the commit, or an older version).
            draining.push(named.unwrap_or_else(|| elders::describe_pid(pid, inner.generation.saturating_sub(1))));
        }
        draining
    }

    /// What our successor hears at the commit: the generations that drain, and this one.
    pub(super) fn elders_for_successor(&self) -> Vec<Elder> {
        let mut elders = self.draining_elders();
        elders.push(elders::this_process(self.inner.generation));
        elders
    }

    /// `status`'s `draining_generations`: each older generation that still drains, with its
    /// age and connections.
    pub(crate) fn draining_generations(&self) -> Vec<Draining> {
        self.draining_elders().iter().map(elders::draining).collect()
    }

    fn elders(&self) -> std::sync::MutexGuard<'_, Vec<Elder>> {
        // A plain `Vec` replaced whole: consistent even if a holder panicked.
        self.inner.elders.lock().unwrap_or_else(|p| p.into_inner())
    }
}
