//! How far the upgrade under way has got: each phase is a `tracing` span (opened when the
//! phase begins, closed when the next one does, so a subscriber that logs span closes times
//! each phase), and the phases are published: the current one for `status`, each one as it
//! begins for the control socket's progress lines.

use std::sync::atomic::{AtomicU64, Ordering};

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
        mark(phase_mark(phase));
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

/// The name of `phase` on the timeline.
fn phase_mark(phase: Phase) -> &'static str {
    match phase {
        Phase::Spawn => "spawn",
        Phase::Hello => "hello",
        Phase::Transfer => "transfer",
        Phase::Adoption => "adoption",
        Phase::Startup => "startup",
        Phase::Commit => "commit",
    }
}

/// The timeline of an upgrade across both processes, for the benchmarks' per-phase
/// breakdown: each step as a `debug` event of target `handover::timeline` with its time on
/// `CLOCK_MONOTONIC` (one clock for every process of the machine, so the predecessor's steps,
/// the successor's and an outside observer's line up). Off unless a subscriber enables that
/// target (`RUST_LOG=handover::timeline=debug`).
pub(crate) fn mark(step: &'static str) {
    mark_at(step, monotonic_us());
}

fn mark_at(step: &'static str, at_us: u64) {
    tracing::debug!(target: "handover::timeline", timeline_step = step, timeline_pid = std::process::id(), timeline_us = at_us);
}

/// A successor's first steps: when its code first ran (before `main`: the end of `exec`
/// and of dynamic loading), and now, when it looks for its channel (after the runtime, the
/// logging and the argument parsing of `main`).
pub(crate) fn mark_successor_start() {
    mark_at("exec", FIRST_INSTRUCTION_US.load(Ordering::Relaxed));
    mark("start");
}

/// Microseconds on `CLOCK_MONOTONIC`.
fn monotonic_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

/// When this process's code first ran, set before `main` (see [`mark_successor_start`]).
static FIRST_INSTRUCTION_US: AtomicU64 = AtomicU64::new(0);

extern "C" fn note_first_instruction() {
    FIRST_INSTRUCTION_US.store(monotonic_us(), Ordering::Relaxed);
}

/// Run by the dynamic loader before `main`, as every `.init_array` entry is: one clock read.
#[used]
#[link_section = ".init_array"]
static NOTE_FIRST_INSTRUCTION: extern "C" fn() = note_first_instruction;
