//! What the clients saw, counted per protocol.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use hdrhistogram::Histogram;

/// Counters of one protocol's clients. Everything but `ok` and `reconnects` is a
/// client-visible error.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests answered, messages echoed, chunks echoed intact.
    pub ok: AtomicU64,
    /// Connections the server closed in the protocol's orderly way (Connection: close, Close
    /// 1001, half-close), after which the client reconnected: not errors.
    pub reconnects: AtomicU64,
    /// Chat messages a member never received from another member (counted by the gaps in
    /// each sender's numbers): a drained member misses what the room said while it
    /// reconnected, and a room split between the old and the new process loses more. Not an
    /// error when drained; with `--migrate`, every member receives every message, so any is.
    pub missed: AtomicU64,
    pub refused: AtomicU64,
    pub reset: AtomicU64,
    pub server_error: AtomicU64,
    pub abnormal_close: AtomicU64,
    pub corrupted: AtomicU64,
    pub other: AtomicU64,
    /// How long each answer took, in microseconds (request → response, message → its echo).
    pub latency: Latency,
}

/// A latency histogram (µs, 3 significant digits) that the clients share.
#[derive(Debug)]
pub struct Latency(Mutex<Histogram<u64>>);

impl Default for Latency {
    fn default() -> Self {
        Self(Mutex::new(Histogram::new(3).expect("3 significant digits")))
    }
}

impl Latency {
    /// What was recorded since the last call, and a fresh start.
    #[allow(dead_code)] // read by `benches/clients.rs`, which shares these clients
    pub fn take(&self) -> Histogram<u64> {
        let mut histogram = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let taken = histogram.clone();
        histogram.reset();
        taken
    }
}

impl Counters {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// One more answer, asked for at `asked`.
    pub fn answered(&self, asked: Instant) {
        Self::add(&self.ok);
        let micros = asked.elapsed().as_micros().max(1) as u64;
        let mut histogram = self.latency.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = histogram.record(micros); // grows as it needs to: never fails
    }

    /// Counts an I/O error by what the client would call it.
    pub fn io_error(&self, error: &std::io::Error) {
        use std::io::ErrorKind::*;
        Self::add(match error.kind() {
            ConnectionRefused => &self.refused,
            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => &self.reset,
            _ => &self.other,
        });
    }

    /// Counts a hyper client error: an I/O cause by its kind, a connection closed before the
    /// response as a reset.
    pub fn http_error(&self, error: &(dyn std::error::Error + 'static)) {
        let mut source = Some(error);
        while let Some(error) = source {
            if let Some(io) = error.downcast_ref::<std::io::Error>() {
                return self.io_error(io);
            }
            if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
                if hyper.is_incomplete_message() || hyper.is_canceled() || hyper.is_closed() {
                    return Self::add(&self.reset);
                }
            }
            source = error.source();
        }
        Self::add(&self.other)
    }

    pub fn errors(&self) -> u64 {
        [
            &self.refused,
            &self.reset,
            &self.server_error,
            &self.abnormal_close,
            &self.corrupted,
            &self.other,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The p-th percentile (0..=100) of `samples`, by nearest rank.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}
