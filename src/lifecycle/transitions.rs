//! The transition table of a process's life ([`next`]) and its types: what a process's
//! status is ([`Status`]), what can happen to it ([`Event`]), what the caller must do after a
//! transition ([`Effect`]) and why an event is refused ([`Refusal`]). Pure: no I/O, no
//! locking; `machine` applies it. The diagram on [`State`] draws this table.

use super::{Shutdown, State};

/// Everything a process's lifecycle knows. Observers read it through `Lifecycle::watch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Status {
    pub state: State,
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
            _ => None,
        }
    }
}

/// What can happen to a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// Successor side: the predecessor committed (or vanished after handing everything over).
    Committed,
    /// The application reports that it serves.
    Ready,
    /// An upgrade was triggered.
    Trigger,
    /// The upgrade under way failed or was abandoned before its commit.
    UpgradeFailed {
        /// Why, for the service manager's status.
        why: String,
    },
    /// Predecessor side: the successor is ready and we commit to it.
    Commit {
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

/// The transition table.
pub(crate) fn next(status: &Status, event: &Event) -> Result<(Status, Effect), Refusal> {
    use State::*;
    let status = *status;
    let with = |state: State| Status { state, ..status };
    let unchanged = Ok((status, Effect::None));
    match (status.state, event) {
        (Starting, Event::Committed) => Ok((
            Status {
                owns_paths: true,
                ..status
            },
            Effect::None,
        )),
        // A stop arrived while we waited for the commit: we own it all now, and stop.
        (Stopping, Event::Committed) => Ok((
            Status {
                owns_paths: true,
                ..status
            },
            Effect::FinalStop,
        )),
        (_, Event::Committed) => unchanged,

        (Starting, Event::Ready) => Ok((with(Ready), Effect::None)),
        (Stopping, Event::Ready) => Err(Refusal::Stopped),
        (_, Event::Ready) => unchanged,

        (Starting, Event::Trigger) => Err(Refusal::NotReady),
        (Ready, Event::Trigger) if status.predecessor_running => Err(Refusal::PredecessorDraining),
        (Ready, Event::Trigger) => Ok((with(Upgrading), Effect::None)),
        (Upgrading, Event::Trigger) => Err(Refusal::InProgress),
        (Draining | Stopping, Event::Trigger) => Err(Refusal::ShuttingDown),

        (Upgrading, Event::UpgradeFailed { .. }) => Ok((with(Ready), Effect::None)),
        (_, Event::UpgradeFailed { .. }) => unchanged, // a stop won the race: it stays a stop

        (Upgrading, &Event::Commit { successor_pid }) => Ok((
            Status {
                state: Draining,
                owns_paths: false,
                successor_pid: Some(successor_pid),
                ..status
            },
            Effect::Handover,
        )),
        (Stopping, Event::Commit { .. }) => Err(Refusal::Stopped),
        // Unreachable: only an upgrade under way commits.
        (Starting | Ready | Draining, Event::Commit { .. }) => Err(Refusal::ShuttingDown),

        (Starting | Ready | Upgrading, Event::Stop) => {
            let effect = if status.owns_paths {
                Effect::FinalStop
            } else {
                Effect::None
            };
            let stopping = Status {
                state: Stopping,
                stop_requested: true,
                ..status
            };
            Ok((stopping, effect))
        }
        (Draining | Stopping, Event::Stop) if !status.stop_requested => Ok((
            Status {
                stop_requested: true,
                ..status
            },
            Effect::None,
        )),
        (Draining | Stopping, Event::Stop) => Ok((Status { hurry: true, ..status }, Effect::None)),

        (_, Event::PredecessorExited) => Ok((
            Status {
                predecessor_running: false,
                ..status
            },
            Effect::None,
        )),
    }
}

/// One applied transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transition {
    pub before: Status,
    pub after: Status,
    pub effect: Effect,
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    fn at(state: State) -> Status {
        Status {
            state,
            ..Status::new(false)
        }
    }

    const EVENTS: [Event; 7] = [
        Event::Committed,
        Event::Ready,
        Event::Trigger,
        Event::UpgradeFailed { why: String::new() },
        Event::Commit { successor_pid: 7 },
        Event::Stop,
        Event::PredecessorExited,
    ];

    #[test]
    fn the_upgrade_path() {
        let (s, _) = next(&Status::new(false), &Event::Ready).unwrap();
        let (s, _) = next(&s, &Event::Trigger).unwrap();
        assert_eq!(s.state, Upgrading);
        let (s, effect) = next(&s, &Event::Commit { successor_pid: 7 }).unwrap();
        assert_eq!((s.state, effect, s.owns_paths), (Draining, Effect::Handover, false));
        assert_eq!(s.shutdown(), Some(Shutdown::Upgraded { successor_pid: 7 }));
    }

    #[test]
    fn a_stop_during_an_upgrade_wins_over_a_later_commit() {
        let (s, effect) = next(&at(Upgrading), &Event::Stop).unwrap();
        assert_eq!((s.state, effect), (Stopping, Effect::FinalStop));
        assert_eq!(next(&s, &Event::Commit { successor_pid: 7 }), Err(Refusal::Stopped));
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
        let (s, _) = next(&at(Upgrading), &Event::Commit { successor_pid: 7 }).unwrap();
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
        let (_, effect) = next(&stopped, &Event::Committed).unwrap();
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

    #[test]
    fn only_an_upgrade_leads_to_draining_and_nothing_leaves_stopping() {
        for state in [Starting, Ready, Upgrading, Draining, Stopping] {
            for event in &EVENTS {
                let Ok((after, _)) = next(&at(state), event) else {
                    continue;
                };
                if after.state == Draining && state != Draining {
                    assert_eq!((state, event), (Upgrading, &Event::Commit { successor_pid: 7 }));
                }
                if state == Stopping {
                    assert_eq!(after.state, Stopping, "{event:?} left Stopping");
                }
                if state == Draining {
                    assert_eq!(after.state, Draining, "{event:?} left Draining");
                }
            }
        }
    }
}
