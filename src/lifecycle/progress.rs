//! How far the upgrade under way has got: each phase is a `tracing` span (opened when the
//! phase begins, closed when the next one does, so a subscriber that logs span closes times
//! each phase), and the phase is published for the control socket's progress lines.

use tokio::sync::watch;

use super::upgrade_error::Phase;

/// The phase of one upgrade, as it moves on.
#[derive(Debug)]
pub(crate) struct Progress<'a> {
    phase: Phase,
    span: tracing::Span,
    generation: u64,
    publish: &'a watch::Sender<Option<Phase>>,
}

impl<'a> Progress<'a> {
    /// An upgrade of this process (generation `generation`), starting with `Phase::Spawn`.
    pub fn start(generation: u64, publish: &'a watch::Sender<Option<Phase>>) -> Self {
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
        self.publish.send_replace(Some(phase));
        tracing::debug!(parent: &self.span, %phase, "upgrade phase");
    }

    /// The phase under way.
    pub fn phase(&self) -> Phase {
        self.phase
    }
}

impl Drop for Progress<'_> {
    fn drop(&mut self) {
        self.publish.send_replace(None);
    }
}
