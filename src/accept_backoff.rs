//! [`AcceptBackoff`]: what an accept loop does when `accept` fails. Shared by the drain's
//! accept loop and the control server's.
//!
//! Two kinds of failure, per `accept(2)`:
//! - **One connection's**: it was aborted or reset before we took it, or (Linux passes
//!   pending network errors on as accept errors) its network went away. The next pending
//!   connection is fine: retry at once.
//! - **The process's**: out of descriptors (`EMFILE`, `ENFILE`) or memory (`ENOBUFS`,
//!   `ENOMEM`), or anything unknown. Retrying at once would spin a core and flood the log
//!   while nothing changes, so back off: 10 ms, doubling up to 1 s, until an accept succeeds.
//!   The pending connections wait in the accept queue meanwhile. A burst of failures is
//!   logged twice: when it starts, and when it ends, with its count.

use std::io;
use std::time::Duration;

use tokio::time::Instant;

/// The first back-off after a failure of the process's kind.
const FIRST_DELAY: Duration = Duration::from_millis(10);
/// The longest back-off: how late, at worst, an accept loop notices that it can go on.
const MAX_DELAY: Duration = Duration::from_secs(1);

/// The back-off state of one accept loop. Call [`failed`](Self::failed) on every accept
/// error and [`succeeded`](Self::succeeded) on every accepted connection.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    burst: Option<Burst>,
}

/// A run of failures of the process's kind, with no accept succeeding in between.
#[derive(Debug)]
struct Burst {
    started: Instant,
    failures: u64,
    next_delay: Duration,
}

impl AcceptBackoff {
    /// No failure yet.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Waits as `error` requires before the next accept: not at all if it was one
    /// connection's, else the burst's next back-off. Logs the start of a burst.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a cancelled wait counts as waited.
    pub(crate) async fn failed(&mut self, error: &io::Error) {
        if is_one_connections(error) {
            tracing::debug!(%error, "accept failed for one connection; accepting the next");
            return;
        }
        let burst = self.burst.get_or_insert_with(|| {
            tracing::warn!(
                %error,
                "accept failed; backing off until it succeeds again (logged once per burst)"
            );
            Burst {
                started: Instant::now(),
                failures: 0,
                next_delay: FIRST_DELAY,
            }
        });
        burst.failures += 1;
        let delay = burst.next_delay;
        burst.next_delay = (delay * 2).min(MAX_DELAY);
        tokio::time::sleep(delay).await;
    }

    /// An accept succeeded: ends the burst, if any, and logs its count.
    pub(crate) fn succeeded(&mut self) {
        if let Some(burst) = self.burst.take() {
            tracing::info!(
                failures = burst.failures,
                burst_ms = burst.started.elapsed().as_millis() as u64,
                "accepting again after a burst of accept failures"
            );
        }
    }
}

/// Whether `error` concerns one pending connection only, so that the next accept may succeed.
fn is_one_connections(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EINTR
                | libc::EAGAIN
                | libc::EPROTO
                | libc::EPERM // a firewall rule refused it
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
                | libc::ETIMEDOUT
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    /// How long `backoff.failed(error)` waits, in paused time.
    async fn waits(backoff: &mut AcceptBackoff, error: i32) -> Duration {
        let before = Instant::now();
        backoff.failed(&os(error)).await;
        before.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn one_connections_errors_are_retried_at_once() {
        let mut backoff = AcceptBackoff::new();
        for error in [libc::ECONNABORTED, libc::EINTR, libc::EPROTO, libc::EHOSTUNREACH] {
            assert_eq!(waits(&mut backoff, error).await, Duration::ZERO);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn resource_errors_back_off_doubling_up_to_a_second() {
        let mut backoff = AcceptBackoff::new();
        let mut delays = Vec::new();
        for error in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM].repeat(3) {
            delays.push(waits(&mut backoff, error).await.as_millis());
        }
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000, 1000, 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_ends_the_burst() {
        let mut backoff = AcceptBackoff::new();
        for _ in 0..5 {
            waits(&mut backoff, libc::EMFILE).await;
        }
        // A connection's own error does not end the burst, nor add to it.
        assert_eq!(waits(&mut backoff, libc::ECONNABORTED).await, Duration::ZERO);
        assert_eq!(waits(&mut backoff, libc::EMFILE).await.as_millis(), 320);
        backoff.succeeded();
        assert_eq!(waits(&mut backoff, libc::EMFILE).await.as_millis(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_errors_back_off_too() {
        let mut backoff = AcceptBackoff::new();
        assert_eq!(waits(&mut backoff, libc::EBADF).await.as_millis(), 10);
        let other = io::Error::other("not an OS error");
        let before = Instant::now();
        backoff.failed(&other).await;
        assert_eq!(before.elapsed().as_millis(), 20);
    }
}
