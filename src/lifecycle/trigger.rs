//! Signals: the upgrade trigger (SIGUSR2 by default) and the final stop (SIGTERM, SIGINT).

use std::io;

use tokio::signal::unix::{signal, Signal, SignalKind};

use super::{Builder, Handoff};

/// The process's signal handlers, installed but not yet answered.
#[derive(Debug)]
pub(crate) struct Signals {
    upgrade: Option<Signal>,
    terminate: Option<Signal>,
    interrupt: Option<Signal>,
}

impl Signals {
    /// Installs the configured handlers at once: before inheritance, so that a SIGUSR2 or a
    /// SIGTERM arriving while a successor starts is held for [`serve`](Self::serve) rather
    /// than killing the process (their default action).
    pub(crate) fn install(config: &Builder) -> io::Result<Self> {
        let stop = |kind: SignalKind| config.stop_on_signals.then(|| signal(kind)).transpose();
        Ok(Self {
            upgrade: config.upgrade_signal.map(signal).transpose()?,
            terminate: stop(SignalKind::terminate())?,
            interrupt: stop(SignalKind::interrupt())?,
        })
    }

    /// Answers the signals, those that arrived since [`install`](Self::install) first, in a
    /// task of its own.
    pub(crate) fn serve(mut self, handoff: &Handoff) {
        if self.upgrade.is_none() && self.terminate.is_none() {
            return;
        }
        let handoff = handoff.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(()) = next(&mut self.upgrade) => {
                        let handoff = handoff.clone();
                        // In a task of its own, so that signals keep being answered meanwhile:
                        // a second trigger during an upgrade is refused, a stop cancels it.
                        tokio::spawn(async move {
                            let _ = handoff.upgrade().await; // logged by upgrade()
                        });
                    }
                    Some(()) = next(&mut self.terminate) => handoff.stop(),
                    Some(()) = next(&mut self.interrupt) => handoff.stop(),
                    else => break,
                }
            }
        });
    }
}

async fn next(signal: &mut Option<Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}
