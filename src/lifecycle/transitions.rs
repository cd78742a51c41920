//! The transition table of a process's life ([`next`]) and its types: what a process's
//! status is ([`Status`]), what can happen to it ([`Event`]), what the caller must do after a
//! transition ([`Effect`]) and why an event is refused ([`Refusal`]). Pure: no I/O, no
//! locking; `machine` applies it. The diagram on [`State`] draws this table.

use super::shared_error::SharedError;
use super::state::{Shutdown, State};

/// Everything a process's lifecycle knows. Observers read it through `Lifecycle::watch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Status {
    pub state: State,
    /// How far the work of `ready()` has got.
    pub readiness: Readiness,
    /// Whether this process owns the shared paths: a first generation from its start, a
    /// successor from its predecessor's commit, and neither once it has handed over.
    pub owns_paths: bool,
    /// Whether the previous generation is still alive (draining).
    pub predecessor_running: bool,
    /// The successor that took over, once committed.
    pub successor_pid: Option<u32>,
    /// Committed, and on probation: this process keeps its copies of the sockets and takes
    /// the service back should its successor die (`Builder::probation`).
    pub probation: bool,
    /// A stop was requested while draining after an upgrade (the first one is noted: a
    /// supervisor stopping a whole service signals every process, old ones included).
    pub stop_requested: bool,
    /// A second stop was requested while this process drains or stops: the deadline is now.
    pub hurry: bool,
}

impl Status {
    /// The status of a process just started, by an upgrade or not.
    pub fn new(inherited: bool) -> Self {
        Self {
            state: State::Starting,
            readiness: Readiness::NotStarted,
            owns_paths: !inherited,
            predecessor_running: inherited,
            successor_pid: None,
            probation: false,
            stop_requested: false,
            hurry: false,
        }
    }

    /// Why this process stops serving, once it does.
    pub fn shutdown(&self) -> Option<Shutdown> {
        match (self.state, self.successor_pid) {
            (State::Draining, Some(successor_pid)) => Some(Shutdown::Upgraded { successor_pid }),
            (State::Stopping, _) => Some(Shutdown::Stopped),
            // Draining without a successor cannot be: only a commit leads there.
            (State::Starting | State::Ready | State::Upgrading | State::Draining, _) => None,
        }
    }
}

/// How far the work of `ready()` has got: it runs once, in a task of its own started by the
/// first call, and every call returns its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// `ready()` has not been called.
    NotStarted,
    /// The first call started the work; every call waits for its outcome.
    Running,
    /// The work is over: what every call returns, an error included (typed, the same for
    /// every call).
    Done(Result<(), SharedError>),
}

impl Readiness {
    /// The outcome, once the work is over.
    pub fn outcome(&self) -> Option<&Result<(), SharedError>> {
        match self {
            Self::Done(outcome) => Some(outcome),
            Self::NotStarted | Self::Running => None,
        }
    }
}

/// What can happen to a process, named after who acts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// Successor side: our predecessor committed to us (or vanished after handing everything
    /// over).
    PredecessorCommitted,
    /// The application called `ready()`: the first call starts its work.
    ReadyCalled,
    /// The work of `ready()` got through (a successor's includes the commit): this process
    /// serves.
    Ready,
    /// The work of `ready()` is over, with what every call returns.
    ReadyDone {
        /// Its outcome.
        outcome: Result<(), SharedError>,
    },
    /// An upgrade was triggered.
    Trigger {
        /// How many generations are alive: this process, and the older ones still draining.
        alive: usize,
        /// How many may be alive in all, the successor included (`Builder::max_generations`).
        max: usize,
    },
    /// The upgrade under way failed or was abandoned before its commit.
    UpgradeFailed {
        /// Why, for the service manager's status.
        why: String,
    },
    /// Predecessor side: our successor is ready and we commit to it.
    CommitTo {
        /// The successor's pid.
        successor_pid: u32,
        /// Whether a probation follows (we keep the sockets and may take the service back).
        probation: bool,
    },
    /// Predecessor side: the probation is over (its time is up, or the successor said that
    /// it leaves: a final stop, or a handover to a successor of its own).
    ProbationOver,
    /// Predecessor side: the successor exited without saying that it leaves (a crash, a kill).
    SuccessorDied,
    /// A final stop was requested (SIGTERM, SIGINT, `stop`).
    Stop,
    /// The previous generation exited.
    PredecessorExited,
}

/// What the caller must do after a transition, outside the critical section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(crate) enum Effect {
    /// Nothing.
    None,
    /// A final stop of a process that owns the paths: close the listeners, unlink the Unix
    /// paths, remove the PID file.
    FinalStop,
    /// Handed over: let go of every descriptor (the successor owns the paths). At the commit,
    /// or when the probation after it ends.
    Handover,
    /// The successor died on probation: serve again on the sockets we kept, and own the
    /// paths (the PID file, the control socket).
    TakeBack,
    /// Start the work of `ready()`, in a task of its own.
    BecomeReady,
}

/// Why an event was refused: the state stays as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// An upgrade needs a process that serves.
    NotReady,
    /// One upgrade at a time.
    InProgress,
    /// As many generations as allowed are alive (this one, and older ones still draining).
    TooManyGenerations,
    /// This process hands over or stops.
    ShuttingDown,
    /// A stop was requested first.
    Stopped,
}

/// The transition table. Every arm names the states it covers: a new state must be placed in
/// each, never inherit "unchanged" by default.
pub(crate) fn next(status: &Status, event: &Event) -> Result<(Status, Effect), Refusal> {
    use State::*;
    let with = |state: State| Status {
        state,
        ..status.clone()
    };
    let unchanged = || Ok((status.clone(), Effect::None));
    match (status.state, event) {
        (Starting, Event::PredecessorCommitted) => Ok((
            Status {
                owns_paths: true,
                ..status.clone()
            },
            Effect::None,
        )),
        // A stop arrived while we waited for the commit: we own it all now, and stop.
        (Stopping, Event::PredecessorCommitted) => Ok((
            Status {
                owns_paths: true,
                ..status.clone()
            },
            Effect::FinalStop,
        )),
        // Unreachable: a successor is committed to while it starts (or stops).
        (Ready | Upgrading | Draining, Event::PredecessorCommitted) => unchanged(),

        // Whatever the state: the work itself finds out what there is to do (a stop first:
        // it tells the predecessor, if any, that we give up).
        (Starting | Ready | Upgrading | Draining | Stopping, Event::ReadyCalled) => match status.readiness {
            Readiness::NotStarted => Ok((
                Status {
                    readiness: Readiness::Running,
                    ..status.clone()
                },
                Effect::BecomeReady,
            )),
            // Later calls wait for the first one's outcome.
            Readiness::Running | Readiness::Done(_) => unchanged(),
        },

        (Starting, Event::Ready) => Ok((with(Ready), Effect::None)),
        (Stopping, Event::Ready) => Err(Refusal::Stopped),
        (Ready | Upgrading | Draining, Event::Ready) => unchanged(),

        (Starting | Ready | Upgrading | Draining | Stopping, Event::ReadyDone { outcome }) => match status.readiness {
            Readiness::Running => Ok((
                Status {
                    readiness: Readiness::Done(outcome.clone()),
                    ..status.clone()
                },
                Effect::None,
            )),
            // Unreachable: an outcome without the work, or a second one (the first stands).
            Readiness::NotStarted | Readiness::Done(_) => unchanged(),
        },

        (Starting, Event::Trigger { .. }) => Err(Refusal::NotReady),
        // The successor would be one generation too many.
        (Ready, &Event::Trigger { alive, max }) if alive >= max => Err(Refusal::TooManyGenerations),
        (Ready, Event::Trigger { .. }) => Ok((with(Upgrading), Effect::None)),
        (Upgrading, Event::Trigger { .. }) => Err(Refusal::InProgress),
        (Draining | Stopping, Event::Trigger { .. }) => Err(Refusal::ShuttingDown),

        (Upgrading, Event::UpgradeFailed { .. }) => Ok((with(Ready), Effect::None)),
        // A stop won the race: it stays a stop. Before a trigger or after a commit: nothing
        // to revert.
        (Starting | Ready | Draining | Stopping, Event::UpgradeFailed { .. }) => unchanged(),

        (
            Upgrading,
            &Event::CommitTo {
                successor_pid,
                probation,
            },
        ) => Ok((
            Status {
                state: Draining,
                owns_paths: false,
                successor_pid: Some(successor_pid),
                probation,
                ..status.clone()
            },
            // On probation, the descriptors are kept until it ends.
            if probation { Effect::None } else { Effect::Handover },
        )),
        (Stopping, Event::CommitTo { .. }) => Err(Refusal::Stopped),
        // Unreachable: only an upgrade under way commits.
        (Starting | Ready | Draining, Event::CommitTo { .. }) => Err(Refusal::ShuttingDown),

        (Starting | Ready | Upgrading, Event::Stop) => {
            let effect = if status.owns_paths {
                Effect::FinalStop
            } else {
                Effect::None
            };
            let stopping = Status {
                state: Stopping,
                stop_requested: true,
                ..status.clone()
            };
            Ok((stopping, effect))
        }
        // A stop that reaches us ends the probation: the service is being stopped, and nothing
        // is to be taken back.
        (Draining | Stopping, Event::Stop) if !status.stop_requested => Ok((
            Status {
                stop_requested: true,
                probation: false,
                ..status.clone()
            },
            if status.probation {
                Effect::Handover
            } else {
                Effect::None
            },
        )),
        (Draining | Stopping, Event::Stop) => Ok((
            Status {
                hurry: true,
                ..status.clone()
            },
            Effect::None,
        )),

        (Draining, Event::ProbationOver) if status.probation => Ok((
            Status {
                probation: false,
                ..status.clone()
            },
            Effect::Handover,
        )),
        (Starting | Ready | Upgrading | Draining | Stopping, Event::ProbationOver) => unchanged(),

        // The take-back: serving again, on the sockets kept, owning the paths again.
        (Draining, Event::SuccessorDied) if status.probation && !status.stop_requested => Ok((
            Status {
                state: Ready,
                owns_paths: true,
                successor_pid: None,
                probation: false,
                ..status.clone()
            },
            Effect::TakeBack,
        )),
        // Unreachable (a stop ends the probation), but a stop must never be undone.
        (Draining, Event::SuccessorDied) if status.probation => Ok((
            Status {
                probation: false,
                ..status.clone()
            },
            Effect::Handover,
        )),
        // After the probation, or without a successor: nothing to take back.
        (Starting | Ready | Upgrading | Draining | Stopping, Event::SuccessorDied) => unchanged(),

        (Starting | Ready | Upgrading | Draining | Stopping, Event::PredecessorExited) => Ok((
            Status {
                predecessor_running: false,
                ..status.clone()
            },
            Effect::None,
        )),
    }
}

/// One applied transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transition {
    pub before: Status,
    pub after: Status,
    pub effect: Effect,
}

#[cfg(test)]
pub(crate) mod tests;
