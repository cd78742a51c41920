//! The transition table's tests: every status × every event, the diagram, the paths.

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

/// A trigger with room for one more generation.
const TRIGGER: Event = Event::Trigger { alive: 1, max: 4 };

/// Every event, each once (as for the states: `event_index`); a trigger twice, with room for
/// one more generation and without.
pub(crate) fn all_events() -> Vec<Event> {
    vec![
        Event::PredecessorCommitted,
        Event::ReadyCalled,
        Event::Ready,
        Event::ReadyDone { outcome: Ok(()) },
        Event::ReadyDone {
            outcome: Err(SharedError::new(crate::error::Error::Stopped)),
        },
        TRIGGER,
        Event::Trigger { alive: 4, max: 4 },
        Event::UpgradeFailed { why: "x".into() },
        Event::CommitTo {
            successor_pid: 7,
            probation: false,
        },
        Event::CommitTo {
            successor_pid: 7,
            probation: true,
        },
        Event::Stop,
        Event::PredecessorExited,
        Event::ProbationOver,
        Event::SuccessorDied,
    ]
}

fn event_index(event: &Event) -> usize {
    match event {
        Event::PredecessorCommitted => 0,
        Event::ReadyCalled => 1,
        Event::Ready => 2,
        Event::ReadyDone { .. } => 3,
        Event::Trigger { .. } => 4,
        Event::UpgradeFailed { .. } => 5,
        Event::CommitTo { .. } => 6,
        Event::Stop => 7,
        Event::PredecessorExited => 8,
        Event::ProbationOver => 9,
        Event::SuccessorDied => 10,
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
        for bits in 0..64u8 {
            let bit = |n: u8| bits & (1 << n) != 0;
            all.push(Status {
                state,
                readiness: readiness.clone(),
                owns_paths: bit(0),
                predecessor_running: bit(1),
                successor_pid: bit(2).then_some(7),
                stop_requested: bit(3),
                hurry: bit(4),
                probation: bit(5),
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
    assert_eq!(events, (0..=event_index(&Event::SuccessorDied)).collect::<Vec<_>>());
    let mut readiness: Vec<usize> = all_readiness().iter().map(readiness_index).collect();
    readiness.dedup();
    assert_eq!(readiness, [0, 1, 2]);
}

/// The refusals each event may meet; an event not listed is never refused.
fn may_refuse(event: &Event) -> &'static [Refusal] {
    match event {
        Event::Ready => &[Refusal::Stopped],
        Event::Trigger { alive, max } if alive < max => {
            &[Refusal::NotReady, Refusal::InProgress, Refusal::ShuttingDown]
        }
        Event::Trigger { .. } => &[
            Refusal::NotReady,
            Refusal::InProgress,
            Refusal::TooManyGenerations,
            Refusal::ShuttingDown,
        ],
        Event::CommitTo { .. } => &[Refusal::Stopped, Refusal::ShuttingDown],
        Event::PredecessorCommitted
        | Event::ReadyCalled
        | Event::ReadyDone { .. }
        | Event::UpgradeFailed { .. }
        | Event::Stop
        | Event::PredecessorExited
        | Event::ProbationOver
        | Event::SuccessorDied => &[],
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
            // Nothing leaves the two last states, but a take-back.
            if matches!(before.state, Draining | Stopping) && effect != Effect::TakeBack {
                assert_eq!(after.state, before.state, "{case}");
            }
            // A probation begins only at a commit, and is over once anything else happens.
            if after.probation && !before.probation {
                assert!(matches!(event, Event::CommitTo { probation: true, .. }), "{case}");
            }
            // Each effect comes from one kind of event.
            match effect {
                Effect::None => {}
                Effect::FinalStop => {
                    assert_eq!(after.state, Stopping, "{case}");
                    assert!(after.owns_paths, "only the owner removes the paths: {case}");
                }
                Effect::Handover => {
                    // At the commit without probation, or when the probation ends.
                    let commit = matches!(event, Event::CommitTo { probation: false, .. });
                    assert!(commit || (before.probation && !after.probation), "{case}");
                    assert!(!commit || !after.owns_paths, "{case}");
                }
                Effect::TakeBack => {
                    assert_eq!(event, Event::SuccessorDied, "{case}");
                    assert!(before.probation && !before.stop_requested, "never after a stop: {case}");
                    assert_eq!(
                        (after.state, after.owns_paths, after.successor_pid),
                        (Ready, true, None),
                        "{case}"
                    );
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
            // The paths change hands only at a commit, or come back at a take-back.
            if after.owns_paths != before.owns_paths {
                let commit = matches!(event, Event::PredecessorCommitted | Event::CommitTo { .. });
                assert!(commit || effect == Effect::TakeBack, "{case}");
            }
            // What is learnt is never forgotten.
            assert!(!before.stop_requested || after.stop_requested, "{case}");
            assert!(!before.hurry || after.hurry, "{case}");
            assert!(before.predecessor_running || !after.predecessor_running, "{case}");
            if after.successor_pid != before.successor_pid {
                assert!(
                    matches!(event, Event::CommitTo { .. }) || effect == Effect::TakeBack,
                    "{case}"
                );
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
        (Ready, event(TRIGGER), Upgrading),
        (Ready, event(Event::Stop), Stopping),
        (Upgrading, event(Event::UpgradeFailed { why: String::new() }), Ready),
        (
            Upgrading,
            event(Event::CommitTo {
                successor_pid: 7,
                probation: false,
            }),
            Draining,
        ),
        (Upgrading, event(Event::Stop), Stopping),
        (Draining, event(Event::SuccessorDied), Ready),
    ];
    assert_eq!(edges, diagram);
}

#[test]
fn the_upgrade_path() {
    let (s, _) = next(&Status::new(false), &Event::Ready).unwrap();
    let (s, _) = next(&s, &TRIGGER).unwrap();
    assert_eq!(s.state, Upgrading);
    let (s, effect) = next(
        &s,
        &Event::CommitTo {
            successor_pid: 7,
            probation: false,
        },
    )
    .unwrap();
    assert_eq!((s.state, effect, s.owns_paths), (Draining, Effect::Handover, false));
    assert_eq!(s.shutdown(), Some(Shutdown::Upgraded { successor_pid: 7 }));
}

#[test]
fn a_stop_during_an_upgrade_wins_over_a_later_commit() {
    let (s, effect) = next(&at(Upgrading), &Event::Stop).unwrap();
    assert_eq!((s.state, effect), (Stopping, Effect::FinalStop));
    assert_eq!(
        next(
            &s,
            &Event::CommitTo {
                successor_pid: 7,
                probation: false
            }
        ),
        Err(Refusal::Stopped)
    );
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
    let (s, _) = next(
        &at(Upgrading),
        &Event::CommitTo {
            successor_pid: 7,
            probation: false,
        },
    )
    .unwrap();
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
    assert_eq!(next(&at(Starting), &TRIGGER), Err(Refusal::NotReady));
    assert_eq!(next(&at(Upgrading), &TRIGGER), Err(Refusal::InProgress));
    assert_eq!(next(&at(Draining), &TRIGGER), Err(Refusal::ShuttingDown));
    assert_eq!(next(&at(Stopping), &TRIGGER), Err(Refusal::ShuttingDown));
    let full = Event::Trigger { alive: 4, max: 4 };
    assert_eq!(next(&at(Ready), &full), Err(Refusal::TooManyGenerations));
    // Elsewhere the state's own reason comes first.
    assert_eq!(next(&at(Starting), &full), Err(Refusal::NotReady));
    assert_eq!(next(&at(Draining), &full), Err(Refusal::ShuttingDown));
    // A predecessor still draining is no reason, while there is room for one more.
    let draining_predecessor = Status {
        predecessor_running: true,
        ..at(Ready)
    };
    let room = Event::Trigger { alive: 3, max: 4 };
    assert_eq!(next(&draining_predecessor, &room).unwrap().0.state, Upgrading);
}

fn committed(probation: bool) -> Status {
    let (s, _) = next(
        &at(Upgrading),
        &Event::CommitTo {
            successor_pid: 7,
            probation,
        },
    )
    .unwrap();
    s
}

#[test]
fn on_probation_the_commit_keeps_the_sockets_until_it_ends() {
    let s = committed(true);
    assert_eq!((s.state, s.probation, s.owns_paths), (Draining, true, false));
    assert_eq!(
        next(
            &at(Upgrading),
            &Event::CommitTo {
                successor_pid: 7,
                probation: true
            }
        )
        .unwrap()
        .1,
        Effect::None
    );
    let (over, effect) = next(&s, &Event::ProbationOver).unwrap();
    assert_eq!(
        (over.state, over.probation, effect),
        (Draining, false, Effect::Handover)
    );
    // After the probation, a successor's death changes nothing.
    assert_eq!(
        next(&over, &Event::SuccessorDied).unwrap(),
        (over.clone(), Effect::None)
    );
}

#[test]
fn a_successor_that_dies_on_probation_is_taken_back() {
    let (s, effect) = next(&committed(true), &Event::SuccessorDied).unwrap();
    assert_eq!(effect, Effect::TakeBack);
    assert_eq!(
        (s.state, s.owns_paths, s.successor_pid, s.probation),
        (Ready, true, None, false)
    );
    assert_eq!(s.shutdown(), None, "serving again");
    // And it can upgrade again.
    assert_eq!(next(&s, &TRIGGER).unwrap().0.state, Upgrading);
}

#[test]
fn a_stop_ends_the_probation_and_nothing_is_taken_back_after_it() {
    let (s, effect) = next(&committed(true), &Event::Stop).unwrap();
    assert_eq!((s.probation, s.stop_requested, effect), (false, true, Effect::Handover));
    assert_eq!(next(&s, &Event::SuccessorDied).unwrap(), (s.clone(), Effect::None));
    // Without probation, the first stop is only noted, as before.
    let (s, effect) = next(&committed(false), &Event::Stop).unwrap();
    assert_eq!((s.stop_requested, effect), (true, Effect::None));
    assert_eq!(next(&s, &Event::SuccessorDied).unwrap().1, Effect::None);
}
