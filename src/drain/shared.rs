//! [`Shared`]: the state a [`Drain`](super::Drain) shares with its connections.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A drain's options, as its [`DrainBuilder`](super::DrainBuilder) sets them.
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub(super) deadline: Duration,
    pub(super) idle_grace: Duration,
    pub(super) spread: Option<f64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(30),
            idle_grace: Duration::from_secs(1),
            spread: None,
        }
    }
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) config: Config,
    /// Cancelled when the drain starts: connections wind down.
    pub(super) draining: CancellationToken,
    /// Cancelled at the deadline: connections close at once.
    pub(super) deadline: CancellationToken,
    /// Cancelled by [`Drain::expire`](super::Drain::expire): the deadline is now.
    pub(super) expired: CancellationToken,
    /// Cancelled [`Drain::GRACE_AFTER_DEADLINE`](super::Drain::GRACE_AFTER_DEADLINE) after the deadline: the library drops the
    /// connection tasks it spawned.
    pub(super) hard_stop: CancellationToken,
    pub(super) open: AtomicUsize,
    pub(super) closed: Notify,
    pub(super) started: OnceLock<Started>,
    pub(super) reached: OnceLock<Reached>,
    pub(super) aborted: OnceLock<usize>,
    /// Close spreading: the next free close slot, in nanoseconds after the drain started.
    pub(super) next_slot: AtomicU64,
    /// The way to a committed successor, once connections are to migrate.
    pub(super) migration: OnceLock<crate::migration::Outbound>,
    /// Connections the successor has taken.
    pub(super) migrated: AtomicUsize,
    /// Every source's count, to record what each had left at the deadline.
    pub(super) tallies: Mutex<Vec<Weak<Tally>>>,
    /// A second stop of the handoff this drain serves: the deadline is now.
    pub(super) hurry: OnceLock<crate::lifecycle::HurrySignal>,
}

/// The connections of one source (a listener's accept loop, the connections migrated from
/// it, or what the drain tracks directly), counted for `status`. Each connection holds its
/// source, which holds the drain: one pointer per connection, as before sources.
#[derive(Debug)]
pub(super) struct Tally {
    pub(super) shared: Arc<Shared>,
    pub(super) open: AtomicUsize,
    /// How many were open when the deadline was reached.
    pub(super) forced: AtomicUsize,
}

impl Tally {
    /// A new source of `shared`'s connections, none open.
    pub(super) fn new(shared: &Arc<Shared>) -> Arc<Self> {
        let tally = Arc::new(Self {
            shared: shared.clone(),
            open: AtomicUsize::new(0),
            forced: AtomicUsize::new(0),
        });
        let mut tallies = shared.tallies.lock().unwrap_or_else(|p| p.into_inner());
        tallies.retain(|known| known.strong_count() > 0);
        tallies.push(Arc::downgrade(&tally));
        tally
    }

    /// One more connection open.
    pub(super) fn open_one(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.shared.open.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection closed.
    pub(super) fn close_one(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.shared.close_one();
    }
}

/// The start of the drain, recorded once (a second `drain()` call reports the same drain).
#[derive(Debug, Clone, Copy)]
pub(super) struct Started {
    pub(super) at: Instant,
    pub(super) connections: usize,
}

/// The deadline, as it was reached.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reached {
    pub(super) at: Instant,
    pub(super) left: usize,
}

impl Shared {
    /// A drain not started, with no connection.
    pub(super) fn new(config: Config) -> Self {
        Self {
            config,
            draining: CancellationToken::new(),
            deadline: CancellationToken::new(),
            expired: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            open: AtomicUsize::new(0),
            closed: Notify::new(),
            started: OnceLock::new(),
            reached: OnceLock::new(),
            aborted: OnceLock::new(),
            next_slot: AtomicU64::new(0),
            migration: OnceLock::new(),
            migrated: AtomicUsize::new(0),
            tallies: Mutex::new(Vec::new()),
            hurry: OnceLock::new(),
        }
    }

    /// Records, per source, what was open at the deadline (counted as forced).
    pub(super) fn record_forced(&self) {
        let tallies = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        for tally in tallies.iter().filter_map(Weak::upgrade) {
            tally
                .forced
                .store(tally.open.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Resolves at a second stop of the handoff this drain serves; never without one.
    pub(super) async fn hurried(&self) {
        match self.hurry.get() {
            Some(signal) => signal.requested().await,
            None => std::future::pending().await,
        }
    }

    /// When the drain started (now, if it has not: a close turn is asked for only once the
    /// drain has started, so this is a fallback that does not happen).
    pub(super) fn started_at(&self) -> Instant {
        self.started.get().map_or_else(Instant::now, |started| started.at)
    }

    /// A connection closed.
    pub(super) fn close_one(&self) {
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.closed.notify_waiters();
        }
    }
}
