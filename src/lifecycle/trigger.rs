//! Signals: the upgrade trigger (SIGUSR2 by default) and the final stop (SIGTERM, SIGINT),
//! installed at start and answered by what the handle that serves them gives
//! ([`Signals::serve`]).

use std::future::Future;
use std::io;

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal as Number};
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::builder::Builder;
use super::early_signals;
use super::upgrade_error::UpgradeError;

/// The process's signal handlers, installed but not yet answered.
#[derive(Debug)]
pub(crate) struct Signals {
    upgrade: Option<Signal>,
    terminate: Option<Signal>,
    interrupt: Option<Signal>,
    /// Signals that were waiting, blocked, when the handlers were installed.
    early: Vec<Number>,
}

impl Signals {
    /// Installs the configured handlers at once: before inheritance, so that a SIGUSR2 or a
    /// SIGTERM arriving while a successor starts is held for [`serve`](Self::serve) rather
    /// than killing the process (their default action).
    ///
    /// A successor starts with these signals blocked (see [`held_until_installed`]), so that
    /// one sent between its `exec` and this call waits instead of killing it: they are
    /// unblocked here, once handled.
    pub(crate) fn install(config: &Builder) -> io::Result<Self> {
        let stop = |kind: SignalKind| config.stop_on_signals.then(|| signal(kind)).transpose();
        let mut signals = Self {
            upgrade: config.upgrade_signal.map(signal).transpose()?,
            terminate: stop(SignalKind::terminate())?,
            interrupt: stop(SignalKind::interrupt())?,
            early: Vec::new(),
        };
        // Taken synchronously, so that they act before anything else does (a stop that came
        // first must win over the ready that follows), then unblocked for the handlers.
        let held = held_until_installed(config);
        signals.early = early_signals::take();
        // Where the constructor did not release them (a process started with them blocked
        // by another parent than a predecessor), they wait here.
        signals.early.extend(take_pending(&held)?);
        pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&held), None)?;
        Ok(signals)
    }

    /// Answers the signals, those that arrived since [`install`](Self::install) first, in a
    /// task of its own: a stop with `stop`, a trigger with the future `upgrade` returns, run
    /// in a task of its own.
    pub(crate) fn serve<F>(mut self, stop: impl Fn() + Send + 'static, upgrade: impl Fn() -> F + Send + 'static)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        for signal in std::mem::take(&mut self.early) {
            let handled = |kind: &Option<Signal>| kind.is_some();
            match signal {
                Number::SIGTERM if handled(&self.terminate) => stop(),
                Number::SIGINT if handled(&self.interrupt) => stop(),
                _ if handled(&self.upgrade) && !matches!(signal, Number::SIGTERM | Number::SIGINT) => tracing::warn!(
                    error = %UpgradeError::NotReady,
                    ?signal,
                    "upgrade refused: the trigger came before this process started"
                ),
                // Not handled by configuration: its default action, as if never blocked.
                _ => nix::sys::signal::raise(signal).unwrap_or(()),
            }
        }
        if self.upgrade.is_none() && self.terminate.is_none() && self.interrupt.is_none() {
            return;
        }
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(()) = next(&mut self.upgrade) => {
                        // In a task of its own, so that signals keep being answered meanwhile:
                        // a second trigger during an upgrade is refused, a stop cancels it.
                        tokio::spawn(upgrade());
                    }
                    Some(()) = next(&mut self.terminate) => stop(),
                    Some(()) = next(&mut self.interrupt) => stop(),
                    else => break,
                }
            }
        });
    }
}

/// The signals a successor starts with blocked, its parent's `posix_spawn` having set them
/// as the child's mask before `exec`: the default trigger, the configured one, and the stops. Unblocked by
/// [`Signals::install`] whatever the configuration, so that a process that handles none of
/// them gets their default actions back.
///
/// A successor releases them before `main` and records what arrives (`early_signals`), so
/// that no thread of the application, nor any process it starts, inherits them.
pub(crate) fn held_until_installed(config: &Builder) -> SigSet {
    let mut set = SigSet::empty();
    for signal in [Number::SIGUSR2, Number::SIGTERM, Number::SIGINT] {
        set.add(signal);
    }
    let configured = config
        .upgrade_signal
        .and_then(|kind| Number::try_from(kind.as_raw_value()).ok());
    if let Some(signal) = configured {
        set.add(signal);
    }
    set
}

/// Removes from the pending set, and returns, every signal of `set` waiting to be delivered.
fn take_pending(set: &SigSet) -> io::Result<Vec<Number>> {
    let mut taken = Vec::new();
    let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    loop {
        // SAFETY: sigtimedwait reads the set and the timeout we own; with a zero timeout it
        // returns at once, a pending signal of the set (removed from the pending set) or EAGAIN.
        let number = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &zero) };
        if number < 0 {
            let error = io::Error::last_os_error();
            return match error.raw_os_error() {
                Some(libc::EAGAIN) => Ok(taken),
                Some(libc::EINTR) => continue,
                _ => Err(error),
            };
        }
        taken.extend(Number::try_from(number).ok());
    }
}

async fn next(signal: &mut Option<Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}
