//! [`Lifecycle`]: the one place where a process's status changes. It runs the transition
//! table (`transitions::next`) atomically, behind a watch channel that everything else reads,
//! and announces each transition to the service manager, if there is one, from inside the
//! same critical section (see `notify`).
//!
//! Two entry points: [`apply`](Lifecycle::apply) an event, or
//! [`apply_with`](Lifecycle::apply_with) an act that must happen in the same critical section
//! as the state change (the commit message, the closing of the listeners on a final stop).
//!
//! A successor starts in `Starting` without the shared paths (Unix listener paths, the control
//! socket's, the PID file): its predecessor owns them until it commits. The commit is the
//! point of no return for both sides: the predecessor decides it, in the same critical
//! section as its state change, so a stop, a timeout or a cancel either happens before it (the
//! upgrade is abandoned, the successor never acts) or after it (the successor owns it all).

use std::convert::Infallible;

use tokio::sync::watch;

use super::notify::Announcer;
use super::transitions::{next, Effect, Event, Refusal, Status, Transition};

/// A process's status behind a watch channel: [`apply`](Self::apply) and
/// [`apply_with`](Self::apply_with) are the only ways to change it.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    status: watch::Sender<Status>,
    announcer: Announcer,
}

impl Lifecycle {
    #[cfg(test)]
    pub fn new(inherited: bool) -> Self {
        Self::announcing(inherited, Announcer::silent())
    }

    /// A lifecycle whose transitions `announcer` tells the service manager about.
    pub fn announcing(inherited: bool, announcer: Announcer) -> Self {
        Self {
            status: watch::Sender::new(Status::new(inherited)),
            announcer,
        }
    }

    pub fn announcer(&self) -> &Announcer {
        &self.announcer
    }

    /// A lifecycle at `status`, for the tests that sweep the table.
    #[cfg(test)]
    fn at(status: Status) -> Self {
        Self {
            status: watch::Sender::new(status),
            announcer: Announcer::silent(),
        }
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Applies `event`; returns the whole transition (the status before and after, and the
    /// effect the caller must carry out), or why it was refused.
    pub fn apply(&self, event: Event) -> Result<Transition, Refusal> {
        self.apply_with(event, |_| Ok::<(), Infallible>(()))
            .map(|acted| acted.unwrap_or_else(|never| match never {}))
    }

    /// Applies `event` only if the transition is allowed and `act` then succeeds, both in the
    /// same critical section, before any observer sees the new state: for an act that must
    /// happen exactly when the state changes (the commit message) or before anyone acts on
    /// the change (a final stop closes the listeners before the accept loops hear of it).
    /// `act` gets the transition's effect; it must not block. When `act` fails, nothing
    /// changes and its error is returned.
    pub fn apply_with<E>(
        &self,
        event: Event,
        act: impl FnOnce(Effect) -> Result<(), E>,
    ) -> Result<Result<Transition, E>, Refusal> {
        let mut outcome = None;
        self.status.send_if_modified(|status| {
            let (after, effect) = match next(status, &event) {
                Ok(transition) => transition,
                Err(refusal) => {
                    outcome = Some(Err(refusal));
                    return false;
                }
            };
            if let Err(error) = act(effect) {
                outcome = Some(Ok(Err(error)));
                return false;
            }
            let before = std::mem::replace(status, after.clone());
            let transition = Transition { before, after, effect };
            self.announcer.announce(&event, &transition);
            let changed = transition.before != transition.after;
            outcome = Some(Ok(Ok(transition)));
            changed
        });
        outcome.expect("send_if_modified runs its closure once")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::state::State::*;

    #[test]
    fn apply_with_changes_nothing_when_the_act_fails() {
        let lifecycle = Lifecycle::new(false);
        assert_eq!(lifecycle.apply(Event::Ready).map(|t| t.effect), Ok(Effect::None));
        assert_eq!(
            lifecycle.apply(Event::Trigger { alive: 1, max: 4 }).map(|t| t.effect),
            Ok(Effect::None)
        );
        let failed = lifecycle.apply_with(
            Event::CommitTo {
                successor_pid: 7,
                probation: false,
            },
            |_| Err("peer gone"),
        );
        assert_eq!(failed, Ok(Err("peer gone")));
        assert_eq!(lifecycle.status().state, Upgrading);
        let acted = lifecycle.apply_with(
            Event::CommitTo {
                successor_pid: 7,
                probation: false,
            },
            |_| Ok::<(), ()>(()),
        );
        assert_eq!(acted.map(|acted| acted.map(|t| t.effect)), Ok(Ok(Effect::Handover)));
        assert_eq!(lifecycle.status().state, Draining);
    }

    /// Every status × every event, through the lock: a refusal changes nothing and wakes no
    /// observer; a transition is the table's, and observers hear of it when it changes
    /// something.
    #[test]
    fn a_refusal_changes_nothing_and_a_transition_is_the_tables() {
        use crate::lifecycle::transitions::next;
        use crate::lifecycle::transitions::tests::{all_events, all_statuses};
        for before in all_statuses() {
            for event in all_events() {
                let lifecycle = Lifecycle::at(before.clone());
                let observer = lifecycle.watch();
                let expected = next(&before, &event);
                let case = format!("{event:?} in {before:?}");
                match lifecycle.apply(event) {
                    Err(refusal) => {
                        assert_eq!(expected, Err(refusal), "{case}");
                        assert_eq!(lifecycle.status(), before, "{case}");
                        assert!(!observer.has_changed().unwrap(), "{case}");
                    }
                    Ok(transition) => {
                        let (after, effect) = expected.unwrap();
                        let before = before.clone();
                        assert_eq!(transition, Transition { before, after, effect }, "{case}");
                        assert_eq!(lifecycle.status(), transition.after, "{case}");
                        let changed = transition.before != transition.after;
                        assert_eq!(observer.has_changed().unwrap(), changed, "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_failed_upgrade_goes_back_to_ready_and_a_refusal_changes_nothing() {
        let lifecycle = Lifecycle::new(false);
        let _ = lifecycle.apply(Event::Ready);
        let _ = lifecycle.apply(Event::Trigger { alive: 1, max: 4 });
        let why = "successor pid 7 exited".to_owned();
        let reverted = lifecycle.apply(Event::UpgradeFailed { why }).unwrap();
        assert_eq!((reverted.before.state, reverted.after.state), (Upgrading, Ready));
        let before = lifecycle.status();
        let _ = lifecycle.apply(Event::Stop);
        let stopped = lifecycle.status();
        assert_eq!(
            lifecycle.apply(Event::Trigger { alive: 1, max: 4 }),
            Err(Refusal::ShuttingDown)
        );
        assert_eq!(lifecycle.status(), stopped);
        assert_ne!(before, stopped);
    }
}
