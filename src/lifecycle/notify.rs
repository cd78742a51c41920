//! What the service manager hears at each transition (sd_notify(3)), decided in one place:
//! [`Announcer::announce`] is called by the lifecycle for every transition it applies.
//!
//! | transition | says | sent by |
//! |---|---|---|
//! | a first generation gets ready | `READY=1`, `MAINPID=` itself | the main process |
//! | a trigger starts an upgrade | `RELOADING=1`, `MONOTONIC_USEC=`, `EXTEND_TIMEOUT_USEC=` the upgrade timeout | the main process |
//! | the successor asks for more time | `EXTEND_TIMEOUT_USEC=` what was granted | the main process |
//! | the upgrade fails or is abandoned | `READY=1`, `STATUS=` why | the main process |
//! | the commit | `MAINPID=` the successor, `READY=1`, then a barrier | the main process, handing over |
//! | a final stop | `STOPPING=1` | the main process |
//! | a take-back: the successor died on probation | `MAINPID=` itself, `READY=1`, `STATUS=` why | the predecessor, the main process again |
//!
//! Every message comes from the process that is the main one when it is sent, so that it
//! counts with the strictest `NotifyAccess=main`: the predecessor names its successor
//! (a successor's own message could be read before that and be refused), and a successor
//! says nothing until it has been named. The barrier after the commit makes sure the
//! manager has read the new `MAINPID=` before the old process can exit (see
//! `Handoff::shutdown_signal`); otherwise it could see
//! its main process exit and stop the whole service. A handoff never sends `STOPPING=1`.

use std::fmt::Write;
use std::time::Duration;

use super::state::State;
use super::transitions::{Effect, Event, Transition};
use crate::systemd::notify::{monotonic_usec, Notifier};

/// One notification: its lines, and whether a barrier must follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Announcement {
    pub message: String,
    pub barrier: bool,
}

/// What an announcement says about this process.
#[derive(Debug, Clone)]
pub(crate) struct Announcer {
    notifier: Notifier,
    pid: u32,
    generation: u64,
    /// Started by an upgrade: the predecessor announces this process.
    inherited: bool,
    upgrade_timeout: Duration,
}

impl Announcer {
    pub fn new(notifier: Notifier, generation: u64, inherited: bool, upgrade_timeout: Duration) -> Self {
        Self {
            notifier,
            pid: std::process::id(),
            generation,
            inherited,
            upgrade_timeout,
        }
    }

    /// One that tells nobody.
    #[cfg(test)]
    pub fn silent() -> Self {
        Self::new(Notifier::default(), 1, false, Duration::ZERO)
    }

    /// Announces `transition`, caused by `event`. Queues without blocking: the lifecycle
    /// calls it inside its critical section, so that the manager hears the transitions in the
    /// order they happened.
    pub fn announce(&self, event: &Event, transition: &Transition) {
        if !self.notifier.is_active() {
            return;
        }
        if let Some(Announcement { message, barrier }) = self.announcement(event, transition, monotonic_usec()) {
            self.notifier.notify(message, barrier);
        }
    }

    /// The successor has been granted `remaining` before its deadline: the manager's timeout
    /// for the reload must not fire first.
    pub fn startup_extended(&self, remaining: Duration) {
        if self.notifier.is_active() {
            let message = format!(
                "EXTEND_TIMEOUT_USEC={}\nSTATUS=upgrading: generation {} asked for more time ({:.1} s left)",
                remaining.as_micros(),
                self.generation.saturating_add(1),
                remaining.as_secs_f64()
            );
            self.notifier.notify(message, false);
        }
    }

    /// A first generation, still starting, asks the manager itself for more time.
    pub fn extend_own_startup(&self, more: Duration) {
        if self.notifier.is_active() {
            let message = format!(
                "EXTEND_TIMEOUT_USEC={}\nSTATUS=starting: asked for {:.1} s more",
                more.as_micros(),
                more.as_secs_f64()
            );
            self.notifier.notify(message, false);
        }
    }

    /// Resolves once every announcement so far has been sent and confirmed (bounded).
    pub fn settled(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.notifier.settled()
    }

    /// The announcement for a transition, if any: the table at the top of this module.
    pub fn announcement(&self, event: &Event, transition: &Transition, now_usec: u64) -> Option<Announcement> {
        let (pid, generation) = (self.pid, self.generation);
        let (before, after) = (transition.before.state, transition.after.state);
        let mut message = String::new();
        let mut barrier = false;
        match (before, after, event) {
            _ if transition.effect == Effect::FinalStop => {
                message = format!("STOPPING=1\nSTATUS=stopping: generation {generation} (pid {pid}) drains and exits");
            }
            (State::Starting, State::Ready, _) if !self.inherited => {
                message = format!("READY=1\nMAINPID={pid}\nSTATUS=serving: generation {generation} (pid {pid})");
            }
            (State::Ready, State::Upgrading, _) => {
                let _ = write!(
                    message,
                    "RELOADING=1\nMONOTONIC_USEC={now_usec}\nEXTEND_TIMEOUT_USEC={}\n\
                     STATUS=upgrading: starting generation {}; generation {generation} (pid {pid}) serves",
                    self.upgrade_timeout.as_micros(),
                    generation.saturating_add(1),
                );
            }
            (State::Upgrading, State::Ready, Event::UpgradeFailed { why }) => {
                message = format!(
                    "READY=1\nSTATUS=upgrade failed: {}; generation {generation} (pid {pid}) serves",
                    one_line(why)
                );
            }
            (State::Upgrading, State::Draining, &Event::CommitTo { successor_pid, .. }) => {
                message = format!(
                    "MAINPID={successor_pid}\nREADY=1\nSTATUS=serving: generation {} (pid {successor_pid}); \
                     generation {generation} (pid {pid}) drains",
                    generation.saturating_add(1)
                );
                barrier = true;
            }
            (State::Draining, State::Ready, Event::SuccessorDied) => {
                // The main process died: this one names itself again (which a manager accepts
                // only from a process it lets notify, see the systemd notes on `Builder::probation`).
                message = format!(
                    "MAINPID={pid}\nREADY=1\nSTATUS=serving again: generation {generation} (pid {pid}) \
                     took the service back from its successor, which died"
                );
            }
            _ => return None,
        }
        Some(Announcement { message, barrier })
    }
}

/// A status is one line: a reason with newlines would end it and start a bogus field.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::super::transitions::{next, Status};
    use super::*;

    fn announcer(inherited: bool) -> Announcer {
        Announcer {
            notifier: Notifier::default(),
            pid: 100,
            generation: 4,
            inherited,
            upgrade_timeout: Duration::from_secs(30),
        }
    }

    /// Applies `events` from `status` and returns each transition's announcement.
    fn announcements(announcer: &Announcer, mut status: Status, events: &[Event]) -> Vec<Option<Announcement>> {
        events
            .iter()
            .map(|event| {
                let (after, effect) = next(&status, event).unwrap();
                let transition = Transition {
                    before: status.clone(),
                    after: after.clone(),
                    effect,
                };
                status = after;
                announcer.announcement(event, &transition, 55)
            })
            .collect()
    }

    fn messages(announced: &[Option<Announcement>]) -> Vec<String> {
        announced
            .iter()
            .map(|a| a.as_ref().map(|a| a.message.clone()).unwrap_or_default())
            .collect()
    }

    #[test]
    fn a_good_upgrade_reloads_then_names_the_successor_behind_a_barrier() {
        let events = [
            Event::Ready,
            Event::Trigger { alive: 1, max: 4 },
            Event::CommitTo {
                successor_pid: 7,
                probation: false,
            },
            Event::Stop,
        ];
        let announced = announcements(&announcer(false), Status::new(false), &events);
        let said = messages(&announced);
        assert!(
            said[0].starts_with("READY=1\nMAINPID=100\nSTATUS=serving: generation 4"),
            "{}",
            said[0]
        );
        assert!(
            said[1].starts_with("RELOADING=1\nMONOTONIC_USEC=55\nEXTEND_TIMEOUT_USEC=30000000\nSTATUS=upgrading"),
            "{}",
            said[1]
        );
        assert!(
            said[2].starts_with("MAINPID=7\nREADY=1\nSTATUS=serving: generation 5 (pid 7)"),
            "{}",
            said[2]
        );
        assert!(announced[2].as_ref().unwrap().barrier);
        assert_eq!(
            said[3], "",
            "a stop while draining after a handoff is not the service's stop"
        );
        assert!(said.iter().all(|m| !m.contains("STOPPING")));
    }

    #[test]
    fn a_take_back_names_this_process_again_and_the_probations_end_says_nothing() {
        let commit = Event::CommitTo {
            successor_pid: 7,
            probation: true,
        };
        let events = [
            Event::Ready,
            Event::Trigger { alive: 1, max: 4 },
            commit.clone(),
            Event::SuccessorDied,
        ];
        let said = messages(&announcements(&announcer(false), Status::new(false), &events));
        assert!(said[2].starts_with("MAINPID=7\nREADY=1\n"), "{}", said[2]);
        assert!(
            said[3].starts_with("MAINPID=100\nREADY=1\nSTATUS=serving again: generation 4"),
            "{}",
            said[3]
        );
        let events = [
            Event::Ready,
            Event::Trigger { alive: 1, max: 4 },
            commit,
            Event::ProbationOver,
            Event::SuccessorDied,
        ];
        let said = messages(&announcements(&announcer(false), Status::new(false), &events));
        assert_eq!(said[3..], ["", ""], "no take-back after the probation");
    }

    #[test]
    fn a_failed_upgrade_is_ready_again_with_the_reason_on_one_line() {
        let why = "successor pid 7 exited\n(1)".to_owned();
        let events = [
            Event::Ready,
            Event::Trigger { alive: 1, max: 4 },
            Event::UpgradeFailed { why },
        ];
        let said = messages(&announcements(&announcer(false), Status::new(false), &events));
        assert_eq!(
            said[2],
            "READY=1\nSTATUS=upgrade failed: successor pid 7 exited (1); generation 4 (pid 100) serves"
        );
    }

    #[test]
    fn a_final_stop_says_stopping_even_during_an_upgrade() {
        let said = messages(&announcements(
            &announcer(false),
            Status::new(false),
            &[Event::Ready, Event::Stop],
        ));
        assert!(said[1].starts_with("STOPPING=1\n"), "{}", said[1]);
        let why = "a stop was requested".to_owned();
        let events = [
            Event::Ready,
            Event::Trigger { alive: 1, max: 4 },
            Event::Stop,
            Event::UpgradeFailed { why },
        ];
        let said = messages(&announcements(&announcer(false), Status::new(false), &events));
        assert!(said[2].starts_with("STOPPING=1\n"), "{}", said[2]);
        assert_eq!(
            said[3], "",
            "the cancelled upgrade does not make a stopping service ready"
        );
    }

    #[test]
    fn a_successor_is_silent_until_named_and_stops_only_once_it_is_the_main_process() {
        let successor = announcer(true);
        let said = messages(&announcements(
            &successor,
            Status::new(true),
            &[Event::PredecessorCommitted, Event::Ready],
        ));
        assert_eq!(said, ["", ""], "its predecessor announced it");
        // A stop before the commit: not the main process, nothing to say; the commit that
        // follows makes it the main one, and it stops.
        let said = messages(&announcements(
            &successor,
            Status::new(true),
            &[Event::Stop, Event::PredecessorCommitted],
        ));
        assert_eq!(said[0], "");
        assert!(said[1].starts_with("STOPPING=1\n"), "{}", said[1]);
    }
}
