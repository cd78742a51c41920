//! How far the upgrade under way has got: each phase is a `tracing` span (opened when the
//! phase begins, closed when the next one does, so a subscriber that logs span closes times
//! each phase), and the phases are published: the current one for `status`, each one as it
//! begins for the control socket's progress lines.

use tokio::sync::{broadcast, watch};

use super::upgrade_error::Phase;

/// Where a process publishes the phases of its upgrades.
#[derive(Debug)]
pub(crate) struct Phases {
    current: watch::Sender<Option<Phase>>,
    each: broadcast::Sender<Phase>,
}

impl Default for Phases {
    fn default() -> Self {
        Self {
            current: watch::Sender::new(None),
            // An upgrade has six phases: a listener that lags loses none of one upgrade.
            each: broadcast::Sender::new(16),
        }
    }
}

impl Phases {
    /// The phase of the upgrade under way, if any.
    pub fn current(&self) -> Option<Phase> {
        *self.current.borrow()
    }

    /// Every phase from now on, as it begins.
    pub fn subscribe(&self) -> broadcast::Receiver<Phase> {
        self.each.subscribe()
    }
}

/// The phase of one upgrade, as it moves on.
#[derive(Debug)]
pub(crate) struct Progress<'a> {
    phase: Phase,
    span: tracing::Span,
    generation: u64,
    publish: &'a Phases,
}

impl<'a> Progress<'a> {
    /// An upgrade of this process (generation `generation`), starting with `Phase::Spawn`.
    pub fn start(generation: u64, publish: &'a Phases) -> Self {
        let mut progress = Self {
            phase: Phase::Spawn,
            span: tracing::Span::none(),
            generation,
            publish,
        };
        progress.enter(Phase::Spawn);
        progress
    }

    /// Ends the current phase and starts `phase`.
    pub fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        self.span = tracing::info_span!("phase", ?phase, pid = std::process::id(), generation = self.generation);
        self.publish.current.send_replace(Some(phase));
        // No listener is not an error.
        let _ = self.publish.each.send(phase);
        tracing::debug!(parent: &self.span, %phase, "upgrade phase");
    }

    /// The phase under way.
    pub fn phase(&self) -> Phase {
        self.phase
    }
}

impl Drop for Progress<'_> {
    fn drop(&mut self) {
        self.publish.current.send_replace(None);
    }
}
