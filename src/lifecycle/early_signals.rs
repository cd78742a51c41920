//! The signals a successor starts with blocked, released before `main` and recorded until the
//! handlers exist.
//!
//! A predecessor starts its successor with the trigger and the stops blocked
//! ([`held_until_installed`](super::trigger::held_until_installed)): one sent between the
//! `exec` and the installation of the handlers waits instead of killing the process (their
//! default action). But a signal mask belongs to a thread, and a new thread inherits its
//! creator's: the runtime's worker threads, started by `#[tokio::main]` before
//! `Handoff::start`, would keep them blocked for life, and so would every child process
//! started from them. So a successor releases them at once, in a constructor the loader runs
//! before `main` and before any thread of the application exists, and a handler of ours
//! records each one that arrives until [`Signals::install`](super::trigger::Signals::install)
//! takes them over.
//!
//! Only a successor does this (its predecessor set its variables and its whole mask): any
//! other process that links the library starts as its parent made it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use super::program::PREDECESSOR_PID_VAR;
use crate::wire::CHANNEL_FD_VAR;

/// The signals that arrived while recorded, one bit each (bit `n - 1` for signal `n`).
static ARRIVED: AtomicU64 = AtomicU64::new(0);
/// The signals whose handler is [`record`], one bit each.
static RECORDING: AtomicU64 = AtomicU64::new(0);
/// Set once the handlers are installed: from then on [`record`] does nothing (a handler
/// installed later may still call it, chaining to the one it replaced).
static TAKEN: AtomicBool = AtomicBool::new(false);

// Run by the C runtime before `main`, as every entry of `.init_array` is. `#[used]` keeps it
// in the binary although nothing refers to it.
#[used]
#[link_section = ".init_array"]
static RELEASE_AT_START: extern "C" fn() = release_at_start;

extern "C" fn release_at_start() {
    let successor = std::env::var_os(CHANNEL_FD_VAR).is_some() && std::env::var_os(PREDECESSOR_PID_VAR).is_some();
    if !successor {
        return;
    }
    let Ok(held) = SigSet::thread_get_mask() else {
        return;
    };
    for signal in held.iter() {
        let recorder = SigAction::new(SigHandler::Handler(record), SaFlags::SA_RESTART, SigSet::empty());
        // SAFETY: `record` only touches atomics, which is async-signal-safe; no other thread
        // exists yet to race on the disposition.
        match unsafe { sigaction(signal, &recorder) } {
            Ok(previous) if matches!(previous.handler(), SigHandler::SigDfl) => {
                RECORDING.fetch_or(bit(signal), Ordering::SeqCst);
            }
            // Ignored by whoever started us: ignored it stays.
            // SAFETY: puts back the disposition that was there.
            Ok(previous) => drop(unsafe { sigaction(signal, &previous) }),
            Err(_) => {}
        }
    }
    // Whatever is pending is delivered here, to `record`.
    let _ = held.thread_unblock();
}

extern "C" fn record(signal: libc::c_int) {
    if !TAKEN.load(Ordering::SeqCst) && (1..=64).contains(&signal) {
        ARRIVED.fetch_or(1 << (signal - 1), Ordering::SeqCst);
    }
}

/// Called once the handlers are installed: stops recording, gives the default action back to
/// each recorded signal whose handler nobody replaced, and returns the signals that arrived
/// meanwhile, in the order of their numbers (their order of arrival is lost, as it is for
/// signals pending together).
pub(crate) fn take() -> Vec<Signal> {
    TAKEN.store(true, Ordering::SeqCst);
    let recording = RECORDING.swap(0, Ordering::SeqCst);
    for signal in Signal::iterator().filter(|s| recording & bit(*s) != 0) {
        if is_ours(signal) {
            let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
            // SAFETY: the default disposition, in place of our recorder (which nobody else
            // chains to: it was still installed).
            let _ = unsafe { sigaction(signal, &default) };
        }
    }
    let arrived = ARRIVED.swap(0, Ordering::SeqCst);
    Signal::iterator().filter(|s| arrived & bit(*s) != 0).collect()
}

fn bit(signal: Signal) -> u64 {
    1 << (signal as i32 - 1)
}

/// Whether `signal`'s handler is still [`record`] (rather than one installed since).
fn is_ours(signal: Signal) -> bool {
    let mut current = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: with a null new action, sigaction only writes the current one into `current`.
    let queried = unsafe { libc::sigaction(signal as libc::c_int, std::ptr::null(), current.as_mut_ptr()) };
    // SAFETY: zeroed, then filled in by the kernel when `queried` is 0.
    queried == 0 && unsafe { current.assume_init() }.sa_sigaction == record as extern "C" fn(libc::c_int) as usize
}
