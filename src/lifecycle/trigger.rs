//! Signals: the upgrade trigger (SIGUSR2 by default) and the final stop (SIGTERM, SIGINT).

use std::io;

use tokio::signal::unix::{signal, Signal, SignalKind};

use super::{Builder, Handoff};

/// Installs the configured handlers at once (before `ready`, so that an early SIGUSR2 is
/// refused rather than killing the process, its default action) and serves them in a task.
pub(crate) fn install(handoff: &Handoff, config: &Builder) -> io::Result<()> {
    let mut upgrade = config.upgrade_signal.map(signal).transpose()?;
    let mut terminate = config
        .stop_on_signals
        .then(|| signal(SignalKind::terminate()))
        .transpose()?;
    let mut interrupt = config
        .stop_on_signals
        .then(|| signal(SignalKind::interrupt()))
        .transpose()?;
    if upgrade.is_none() && terminate.is_none() {
        return Ok(());
    }
    let handoff = handoff.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = next(&mut upgrade) => {
                    let handoff = handoff.clone();
                    // In a task of its own, so that signals keep being answered meanwhile: a
                    // second trigger during an upgrade is refused, a stop cancels it.
                    tokio::spawn(async move {
                        let _ = handoff.upgrade().await; // logged by upgrade()
                    });
                }
                Some(()) = next(&mut terminate) => handoff.stop(),
                Some(()) = next(&mut interrupt) => handoff.stop(),
                else => break,
            }
        }
    });
    Ok(())
}

async fn next(signal: &mut Option<Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}
