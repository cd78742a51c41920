//! `handoverctl run -- PROGRAM ARGS…`: a container's entrypoint that outlives every generation.
//!
//! A handoff server's old generation exits after its successor takes over; as a container's
//! PID 1 that would end the container. The supervisor is PID 1 instead (or, anywhere else, a
//! child subreaper, `PR_SET_CHILD_SUBREAPER`): it starts the program in a process group of
//! its own, and every generation the program spawns stays in that group and, once its parent
//! has exited, becomes the supervisor's child. It
//!
//! - reaps every child that exits, so no zombie accumulates;
//! - learns which process serves from the notify protocol: `NOTIFY_SOCKET` names its socket,
//!   and `MAINPID=` (from any process of the group or of our uid) names the serving process,
//!   `STOPPING=1` says that its exit will be final;
//! - forwards SIGTERM, SIGINT, SIGHUP and SIGUSR2 to the serving process, and a stop
//!   (SIGTERM, SIGINT) also to every process that serves after it: one that reached a
//!   process just after its commit to a successor (where it is only noted) would otherwise
//!   be lost, the successor serving on;
//! - exits, once no child is left, with the status of the serving process that exited
//!   without a successor (a signal's `128 + n`).
//!
//! Without notifications (a server built before its library sent them) it still works: the
//! serving process is the one it started, and when that exits, the newest live process of
//! the group; SIGTERM and SIGINT go to the whole group (draining generations only note a
//! first stop), SIGUSR2 and SIGHUP to the newest process.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, killpg, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::notify::{Notification, NotifySocket};

/// The signals handed on to the serving process.
const FORWARDED: [Signal; 4] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGUSR2];

/// Runs `program` under supervision; returns the serving process's final status.
pub fn run(program: &[OsString]) -> ExitCode {
    match Supervisor::start(program).and_then(|mut supervisor| supervisor.supervise()) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            say(format_args!("{error}"));
            ExitCode::from(error.code)
        }
    }
}

/// Why supervision could not start or go on, with the exit status that reports it.
#[derive(Debug)]
struct Failure {
    what: String,
    source: std::io::Error,
    code: u8,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

fn failure(what: impl Into<String>, source: impl Into<std::io::Error>) -> Failure {
    Failure {
        what: what.into(),
        source: source.into(),
        code: 1,
    }
}

struct Supervisor {
    signals: SignalFd,
    notify: NotifySocket,
    /// The program's process group: every generation.
    group: Pid,
    /// The process that serves, as far as we know.
    main: Pid,
    /// Whether the program speaks the notify protocol (then `main` is what it said).
    notified: bool,
    /// `STOPPING=1` came from `main`: its exit is final.
    stopping: bool,
    /// The final status, once the serving process exited without a successor.
    status: Option<u8>,
    /// The first stop (SIGTERM or SIGINT) asked of us, once asked: every process that serves
    /// from then on must hear it.
    stop: Option<Signal>,
    /// The processes that heard `stop` from us, by their pid.
    told: Vec<Pid>,
}

impl Supervisor {
    fn start(program: &[OsString]) -> Result<Self, Failure> {
        if Pid::this().as_raw() != 1 {
            // Orphaned generations become our children, not init's: we reap them, and see
            // the serving one exit.
            nix::sys::prctl::set_child_subreaper(true).map_err(|e| failure("PR_SET_CHILD_SUBREAPER", e))?;
        }
        let mut mask = SigSet::empty();
        FORWARDED.iter().for_each(|s| mask.add(*s));
        mask.add(Signal::SIGCHLD);
        // Blocked, then read from a descriptor: as PID 1 a signal without a handler would be
        // dropped, and no handler runs at an awkward moment. A child inherits the mask
        // through fork and exec (`Command` does not reset it): `spawn` clears it.
        mask.thread_block().map_err(|e| failure("blocking signals", e))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| failure("signalfd", e))?;
        let notify = NotifySocket::bind().map_err(|e| failure("binding the notify socket", e))?;
        let child = spawn(program, &notify.address())?;
        say(format_args!("started pid {child} ({})", program[0].to_string_lossy()));
        Ok(Self {
            signals,
            notify,
            group: child,
            main: child,
            notified: false,
            stopping: false,
            status: None,
            stop: None,
            told: Vec::new(),
        })
    }

    fn supervise(&mut self) -> Result<u8, Failure> {
        loop {
            let mut fds = [
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.notify.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(failure("poll", e)),
            }
            // Notifications first: a MAINPID sent just before its sender exits must count
            // before we reap the sender. Anything in the network namespace can write to the
            // socket: nothing read there ends supervision.
            loop {
                match self.notify.receive() {
                    Ok(Some(notification)) => self.heard(&notification),
                    Ok(None) => break,
                    Err(error) => {
                        say(format_args!("reading the notify socket: {error}"));
                        break;
                    }
                }
            }
            while let Some(info) = self.signals.read_signal().map_err(|e| failure("reading signals", e))? {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGCHLD) | Err(_) => {}
                    Ok(signal) => self.forward(signal),
                }
            }
            if let Some(code) = self.reap() {
                return Ok(code);
            }
        }
    }

    /// Acts on a datagram from a process we trust: one of the program's group, or of our uid.
    fn heard(&mut self, notification: &Notification) {
        let Some((sender, uid)) = notification.sender else {
            return;
        };
        let trusted = uid == nix::unistd::getuid().as_raw() || process_group(sender) == Some(self.group);
        if !trusted {
            say(format_args!("ignored a notification from pid {sender} (uid {uid})"));
            return;
        }
        if let Some(pid) = notification.get("MAINPID").and_then(|p| p.parse::<i32>().ok()) {
            if process_group(pid) == Some(self.group) && Pid::from_raw(pid) != self.main {
                self.main = Pid::from_raw(pid);
                self.stopping = false;
                say(format_args!("pid {pid} serves (MAINPID from pid {sender})"));
                self.pass_on_stop();
            }
            self.notified = true;
        }
        if notification.get("READY") == Some("1") && sender == self.main.as_raw() {
            self.notified = true;
        }
        // From any trusted sender, as systemd takes it: a library sends it only on a final
        // stop, never on a handoff.
        if notification.get("STOPPING") == Some("1") {
            self.stopping = true;
            say(format_args!(
                "pid {} is stopping (STOPPING from pid {sender})",
                self.main
            ));
        }
    }

    fn forward(&mut self, signal: Signal) {
        let is_stop = matches!(signal, Signal::SIGTERM | Signal::SIGINT);
        if is_stop && self.stop.is_none() {
            self.stop = Some(signal);
        }
        let (sent, to) = match signal {
            // Without notifications we cannot tell the serving generation: all of them hear
            // a stop (a draining one only notes it).
            Signal::SIGTERM | Signal::SIGINT if !self.notified => {
                let sent = killpg(self.group, signal);
                // Every process of the group heard it; one it starts later does not (the
                // kernel makes a fork that races the signal either include the child or
                // start after it).
                if sent.is_ok() {
                    self.told.extend(in_group(self.group));
                }
                (sent, format!("process group {}", self.group))
            }
            _ => {
                let target = self.target();
                let sent = kill(target, signal);
                if is_stop && sent.is_ok() {
                    self.told.push(target);
                }
                (sent, format!("pid {target}"))
            }
        };
        match sent {
            Ok(()) => say(format_args!("forwarded {signal} to {to}")),
            Err(error) => say(format_args!("could not forward {signal} to {to}: {error}")),
        }
    }

    /// After a stop, a new serving process hears it too. The stop may have reached the one
    /// before just after it committed to this one, where a stop is only noted: this one
    /// would serve on, and the run would never end.
    fn pass_on_stop(&mut self) {
        let Some(signal) = self.stop else {
            return;
        };
        if self.told.contains(&self.main) {
            return;
        }
        let main = self.main;
        self.told.push(main);
        match kill(main, signal) {
            Ok(()) => say(format_args!(
                "forwarded {signal} to pid {main}, which serves after the stop"
            )),
            Err(error) => say(format_args!("could not forward {signal} to pid {main}: {error}")),
        }
    }

    /// Where SIGUSR2 and SIGHUP go: the serving process if the program said which, else the
    /// newest process of the group.
    fn target(&self) -> Pid {
        if self.notified {
            self.main
        } else {
            newest_in_group(self.group).unwrap_or(self.main)
        }
    }

    /// Reaps every child that has exited; returns the final status once no child is left and
    /// the serving process has exited without a successor.
    fn reap(&mut self) -> Option<u8> {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.exited(pid, code as u8),
                Ok(WaitStatus::Signaled(pid, signal, _)) => self.exited(pid, 128 + signal as u8),
                Ok(WaitStatus::StillAlive) => return None,
                Ok(_) => {} // stopped or continued: not an exit
                Err(Errno::EINTR) => {}
                Err(Errno::ECHILD) => return self.status.or_else(|| self.orphaned()),
                Err(error) => {
                    say(format_args!("waitpid: {error}"));
                    return None;
                }
            }
        }
    }

    fn exited(&mut self, pid: Pid, code: u8) {
        say(format_args!("reaped pid {pid} (status {code})"));
        if pid != self.main || self.status.is_some() {
            return;
        }
        // A program that names its main process names its successor (`MAINPID=`) before
        // it exits; after a stop, a process it did not name is an upgrade it abandoned.
        let named_only = self.notified && self.stop.is_some();
        match newest_in_group(self.group).filter(|_| !self.stopping && !named_only) {
            Some(next) => {
                say(format_args!("pid {next} serves (the newest process of the group)"));
                self.main = next;
                self.pass_on_stop();
            }
            None => {
                say(format_args!(
                    "pid {pid} exited without a successor; exiting with {code} once every child has"
                ));
                self.status = Some(code);
            }
        }
    }

    /// No child left while the serving process had not exited: it is not our child (it was
    /// reaped by its parent) and is gone too. Ends with failure.
    fn orphaned(&self) -> Option<u8> {
        if process_group(self.main.as_raw()).is_some() {
            return None;
        }
        say(format_args!("no process left; pid {} was not ours to reap", self.main));
        Some(1)
    }
}

/// Starts `program` in a process group of its own, with no signal blocked: the signals we
/// block for our signalfd would otherwise stay blocked in it (a forwarded SIGHUP pending for
/// ever), since a mask survives fork and exec and `Command` does not reset it.
fn spawn(program: &[OsString], notify_socket: &str) -> Result<Pid, Failure> {
    let unblocked = SigSet::empty();
    let mut command = std::process::Command::new(&program[0]);
    command
        .args(&program[1..])
        .env("NOTIFY_SOCKET", notify_socket)
        .process_group(0);
    // SAFETY: runs in the child between fork and exec, where only async-signal-safe calls
    // are allowed: this is one `sigprocmask` (async-signal-safe per POSIX) with a set built
    // before the fork; nothing allocates, locks or touches another thread's state.
    unsafe {
        command.pre_exec(move || {
            nix::sys::signal::sigprocmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&unblocked), None)
                .map_err(std::io::Error::from)
        });
    }
    let child = command.spawn().map_err(|source| {
        let code = if source.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        };
        Failure {
            what: format!("starting {}", program[0].to_string_lossy()),
            source,
            code,
        }
    })?;
    // Reaped with waitpid(-1) like every other child: the handle is not waited on.
    Ok(Pid::from_raw(child.id() as i32))
}

/// A live (not zombie) process's group and start time, from `/proc/PID/stat`.
fn stat(pid: i32) -> Option<(Pid, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold anything.
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    // state(3) ppid(4) pgrp(5) … starttime(22), counted from 1 with pid and comm first.
    let group = fields.get(2)?.parse().ok()?;
    let started = fields.get(19)?.parse().ok()?;
    Some((Pid::from_raw(group), started))
}

fn process_group(pid: i32) -> Option<Pid> {
    stat(pid).map(|(group, _)| group)
}

/// The live processes of `group`, each with its start time.
fn group_members(group: Pid) -> Vec<(u64, Pid)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            stat(pid)
                .filter(|(g, _)| *g == group)
                .map(|(_, started)| (started, Pid::from_raw(pid)))
        })
        .collect()
}

/// The live processes of `group`.
fn in_group(group: Pid) -> impl Iterator<Item = Pid> {
    group_members(group).into_iter().map(|(_, pid)| pid)
}

/// The most recently started live process of `group`.
fn newest_in_group(group: Pid) -> Option<Pid> {
    group_members(group).into_iter().max().map(|(_, pid)| pid)
}

/// Logs a line to stderr, which the program's generations share: in one `write`, so that no
/// line of theirs lands inside ours (`eprintln!` writes piece by piece).
fn say(message: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let line = format!("handoverctl[{}]: {message}\n", std::process::id());
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_process_of_a_group_is_found() {
        let mut first = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let group = Pid::from_raw(first.id() as i32);
        assert_eq!(process_group(first.id() as i32), Some(group));
        assert_eq!(newest_in_group(group), Some(group));
        let mut second = std::process::Command::new("sleep")
            .arg("30")
            .process_group(group.as_raw())
            .spawn()
            .unwrap();
        let newest = newest_in_group(group);
        let _ = killpg(group, Signal::SIGKILL);
        let _ = (first.wait(), second.wait());
        // Same clock tick: either is the newest; a later tick: the second.
        assert!(
            newest == Some(Pid::from_raw(second.id() as i32)) || newest == Some(group),
            "{newest:?}"
        );
        assert_eq!(newest_in_group(group), None, "both reaped");
    }
}
