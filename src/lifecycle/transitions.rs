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
    Trigger,
    /// The upgrade under way failed or was abandoned before its commit.
    UpgradeFailed {
        /// Why, for the service manager's status.
        why: String,
    },
    /// Predecessor side: our successor is ready and we commit to it.
    CommitTo {
        /// The successor's pid.
        successor_pid: u32,
    },
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
    /// Handed over: let go of every descriptor (the successor owns the paths).
    Handover,
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
    /// The previous generation still drains.
    PredecessorDraining,
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

        (Starting, Event::Trigger) => Err(Refusal::NotReady),
        (Ready, Event::Trigger) if status.predecessor_running => Err(Refusal::PredecessorDraining),
        (Ready, Event::Trigger) => Ok((with(Upgrading), Effect::None)),
        (Upgrading, Event::Trigger) => Err(Refusal::InProgress),
        (Draining | Stopping, Event::Trigger) => Err(Refusal::ShuttingDown),

        (Upgrading, Event::UpgradeFailed { .. }) => Ok((with(Ready), Effect::None)),
        // A stop won the race: it stays a stop. Before a trigger or after a commit: nothing
        // to revert.
        (Starting | Ready | Draining | Stopping, Event::UpgradeFailed { .. }) => unchanged(),

        (Upgrading, &Event::CommitTo { successor_pid }) => Ok((
            Status {
                state: Draining,
                owns_paths: false,
                successor_pid: Some(successor_pid),
                ..status.clone()
            },
            Effect::Handover,
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
        (Draining | Stopping, Event::Stop) if !status.stop_requested => Ok((
            Status {
                stop_requested: true,
                ..status.clone()
            },
            Effect::None,
        )),
        (Draining | Stopping, Event::Stop) => Ok((
            Status {
                hurry: true,
                ..status.clone()
            },
            Effect::None,
        )),

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
pub(crate) mod tests {
    use super::*;
    use State::*;

    fn at(state: State) -> Status {
        Status {
            state,
            ..Status::new(false)
        }
    }

    /// Every state, each once: `state_index` fails to compile when a state is added, and
    /// `the_lists_are_complete` fails until it is listed here.
    const ALL_STATES: [State; 5] = [Starting, Ready, Upgrading, Draining, Stopping];

    fn state_index(state: State) -> usize {
        match state {
            Starting => 0,
            Ready => 1,
            Upgrading => 2,
            Draining => 3,
            Stopping => 4,
        }
    }

    /// Every event, each once (as for the states: `event_index`).
    pub(crate) fn all_events() -> Vec<Event> {
        vec![
            Event::PredecessorCommitted,
            Event::ReadyCalled,
            Event::Ready,
            Event::ReadyDone { outcome: Ok(()) },
            Event::ReadyDone {
                outcome: Err(SharedError::new(crate::error::Error::Stopped)),
            },
            Event::Trigger,
            Event::UpgradeFailed { why: "x".into() },
            Event::CommitTo { successor_pid: 7 },
            Event::Stop,
            Event::PredecessorExited,
        ]
    }

    fn event_index(event: &Event) -> usize {
        match event {
            Event::PredecessorCommitted => 0,
            Event::ReadyCalled => 1,
            Event::Ready => 2,
            Event::ReadyDone { .. } => 3,
            Event::Trigger => 4,
            Event::UpgradeFailed { .. } => 5,
            Event::CommitTo { .. } => 6,
            Event::Stop => 7,
            Event::PredecessorExited => 8,
        }
    }

    /// Every step of `ready()`'s work (an error: one, as every error is the same to the table).
    fn all_readiness() -> Vec<Readiness> {
        let failed = SharedError::new(crate::error::Error::Stopped);
        vec![
            Readiness::NotStarted,
            Readiness::Running,
            Readiness::Done(Ok(())),
            Readiness::Done(Err(failed)),
        ]
    }

    fn readiness_index(readiness: &Readiness) -> usize {
        match readiness {
            Readiness::NotStarted => 0,
            Readiness::Running => 1,
            Readiness::Done(_) => 2,
        }
    }

    /// Every status: each state with every combination of the other fields (some of them
    /// unreachable: the table must still answer them).
    pub(crate) fn all_statuses() -> Vec<Status> {
        let mut all = Vec::new();
        for (state, readiness) in ALL_STATES
            .iter()
            .flat_map(|&s| all_readiness().into_iter().map(move |r| (s, r)))
        {
            for bits in 0..32u8 {
                let bit = |n: u8| bits & (1 << n) != 0;
                all.push(Status {
                    state,
                    readiness: readiness.clone(),
                    owns_paths: bit(0),
                    predecessor_running: bit(1),
                    successor_pid: bit(2).then_some(7),
                    stop_requested: bit(3),
                    hurry: bit(4),
                });
            }
        }
        all
    }

    #[test]
    fn the_lists_are_complete() {
        let states: Vec<usize> = ALL_STATES.iter().map(|&s| state_index(s)).collect();
        assert_eq!(states, (0..ALL_STATES.len()).collect::<Vec<_>>());
        let mut events: Vec<usize> = all_events().iter().map(event_index).collect();
        events.dedup();
        assert_eq!(events, (0..=event_index(&Event::PredecessorExited)).collect::<Vec<_>>());
        let mut readiness: Vec<usize> = all_readiness().iter().map(readiness_index).collect();
        readiness.dedup();
        assert_eq!(readiness, [0, 1, 2]);
    }

    /// The refusals each event may meet; an event not listed is never refused.
    fn may_refuse(event: &Event) -> &'static [Refusal] {
        match event {
            Event::Ready => &[Refusal::Stopped],
            Event::Trigger => &[
                Refusal::NotReady,
                Refusal::InProgress,
                Refusal::PredecessorDraining,
                Refusal::ShuttingDown,
            ],
            Event::CommitTo { .. } => &[Refusal::Stopped, Refusal::ShuttingDown],
            Event::PredecessorCommitted
            | Event::ReadyCalled
            | Event::ReadyDone { .. }
            | Event::UpgradeFailed { .. }
            | Event::Stop
            | Event::PredecessorExited => &[],
        }
    }

    /// Every state × every event (× every value of the other fields): a transition or a
    /// refusal that the event may meet, and the invariants of the diagram on [`State`].
    #[test]
    fn every_state_and_event() {
        let mut edges = Vec::new();
        for before in all_statuses() {
            for event in all_events() {
                let (after, effect) = match next(&before, &event) {
                    Ok(transition) => transition,
                    Err(refusal) => {
                        assert!(
                            may_refuse(&event).contains(&refusal),
                            "{event:?} in {before:?}: unexpected refusal {refusal:?}"
                        );
                        continue;
                    }
                };
                let case = format!("{event:?} in {before:?} gave {after:?}, {effect:?}");
                if before.state != after.state {
                    edges.push((before.state, event_index(&event), after.state));
                }
                // Nothing leaves the two last states.
                if matches!(before.state, Draining | Stopping) {
                    assert_eq!(after.state, before.state, "{case}");
                }
                // Each effect comes from one kind of event.
                match effect {
                    Effect::None => {}
                    Effect::FinalStop => {
                        assert_eq!(after.state, Stopping, "{case}");
                        assert!(after.owns_paths, "only the owner removes the paths: {case}");
                    }
                    Effect::Handover => {
                        assert!(matches!(event, Event::CommitTo { .. }), "{case}");
                        assert!(!after.owns_paths, "{case}");
                    }
                    Effect::BecomeReady => {
                        assert_eq!(event, Event::ReadyCalled, "{case}");
                        assert_eq!(before.readiness, Readiness::NotStarted, "once: {case}");
                    }
                }
                // The work of `ready()` moves on, never back, and its outcome stands.
                assert!(
                    readiness_index(&after.readiness) >= readiness_index(&before.readiness),
                    "{case}"
                );
                if let Readiness::Done(_) = before.readiness {
                    assert_eq!(after.readiness, before.readiness, "{case}");
                }
                if after.readiness != before.readiness {
                    assert!(matches!(event, Event::ReadyCalled | Event::ReadyDone { .. }), "{case}");
                }
                // The paths change hands only at a commit.
                if after.owns_paths != before.owns_paths {
                    let commit = matches!(event, Event::PredecessorCommitted | Event::CommitTo { .. });
                    assert!(commit, "{case}");
                }
                // What is learnt is never forgotten.
                assert!(!before.stop_requested || after.stop_requested, "{case}");
                assert!(!before.hurry || after.hurry, "{case}");
                assert!(before.predecessor_running || !after.predecessor_running, "{case}");
                if after.successor_pid != before.successor_pid {
                    assert!(matches!(event, Event::CommitTo { .. }), "{case}");
                }
                // Hurry is a second stop, once draining or stopping.
                if after.hurry && !before.hurry {
                    let second_stop = before.stop_requested && matches!(before.state, Draining | Stopping);
                    assert!(second_stop, "{case}");
                }
            }
        }
        edges.sort_by_key(|&(from, event, to)| (state_index(from), event, state_index(to)));
        edges.dedup();
        let event = |e: Event| event_index(&e);
        // The arrows of the diagram on `State`, and no other.
        let diagram = [
            (Starting, event(Event::Ready), Ready),
            (Starting, event(Event::Stop), Stopping),
            (Ready, event(Event::Trigger), Upgrading),
            (Ready, event(Event::Stop), Stopping),
            (Upgrading, event(Event::UpgradeFailed { why: String::new() }), Ready),
            (Upgrading, event(Event::CommitTo { successor_pid: 7 }), Draining),
            (Upgrading, event(Event::Stop), Stopping),
        ];
        assert_eq!(edges, diagram);
    }

    #[test]
    fn the_upgrade_path() {
        let (s, _) = next(&Status::new(false), &Event::Ready).unwrap();
        let (s, _) = next(&s, &Event::Trigger).unwrap();
        assert_eq!(s.state, Upgrading);
        let (s, effect) = next(&s, &Event::CommitTo { successor_pid: 7 }).unwrap();
        assert_eq!((s.state, effect, s.owns_paths), (Draining, Effect::Handover, false));
        assert_eq!(s.shutdown(), Some(Shutdown::Upgraded { successor_pid: 7 }));
    }

    #[test]
    fn a_stop_during_an_upgrade_wins_over_a_later_commit() {
        let (s, effect) = next(&at(Upgrading), &Event::Stop).unwrap();
        assert_eq!((s.state, effect), (Stopping, Effect::FinalStop));
        assert_eq!(next(&s, &Event::CommitTo { successor_pid: 7 }), Err(Refusal::Stopped));
        assert_eq!(
            next(
                &s,
                &Event::UpgradeFailed {
                    why: "cancelled".into()
                }
            )
            .unwrap()
            .0
            .state,
            Stopping
        );
    }

    #[test]
    fn a_commit_wins_over_a_later_stop_and_a_second_stop_means_hurry() {
        let (s, _) = next(&at(Upgrading), &Event::CommitTo { successor_pid: 7 }).unwrap();
        let (s, effect) = next(&s, &Event::Stop).unwrap();
        assert_eq!((s.state, s.hurry, effect), (Draining, false, Effect::None));
        let (s, _) = next(&s, &Event::Stop).unwrap();
        assert_eq!((s.state, s.hurry), (Draining, true));
    }

    #[test]
    fn a_second_stop_means_hurry() {
        let (s, _) = next(&at(Ready), &Event::Stop).unwrap();
        assert!(!s.hurry);
        let (s, _) = next(&s, &Event::Stop).unwrap();
        assert_eq!((s.state, s.hurry), (Stopping, true));
    }

    #[test]
    fn a_successor_owns_nothing_until_committed() {
        let s = Status::new(true);
        let (stopped, effect) = next(&s, &Event::Stop).unwrap();
        assert_eq!(effect, Effect::None, "the predecessor's paths are not ours to remove");
        let (_, effect) = next(&stopped, &Event::PredecessorCommitted).unwrap();
        assert_eq!(
            effect,
            Effect::FinalStop,
            "committed while stopping: ours now, and we stop"
        );
        assert_eq!(next(&stopped, &Event::Ready), Err(Refusal::Stopped));
    }

    #[test]
    fn triggers_are_refused_with_their_reason() {
        assert_eq!(next(&at(Starting), &Event::Trigger), Err(Refusal::NotReady));
        assert_eq!(next(&at(Upgrading), &Event::Trigger), Err(Refusal::InProgress));
        assert_eq!(next(&at(Draining), &Event::Trigger), Err(Refusal::ShuttingDown));
        assert_eq!(next(&at(Stopping), &Event::Trigger), Err(Refusal::ShuttingDown));
        let draining_predecessor = Status {
            predecessor_running: true,
            ..at(Ready)
        };
        assert_eq!(
            next(&draining_predecessor, &Event::Trigger),
            Err(Refusal::PredecessorDraining)
        );
    }
}
