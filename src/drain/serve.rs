//! The loops the library owns: a connection's task ([`Drain::spawn`]), the accept loop
//! ([`Drain::accept`]), and the whole life of a listener ([`Drain::serve`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio_util::sync::WaitForCancellationFutureOwned;

use super::{Drain, DrainReport, DrainStrategy, Listener};
use crate::accept_backoff::AcceptBackoff;
use crate::Handoff;

impl Drain {
    /// Tracks `io` and serves it with `strategy` in a task of its own. If the connection is
    /// still open [`GRACE_AFTER_DEADLINE`](Self::GRACE_AFTER_DEADLINE) after the drain
    /// deadline, the task is dropped (and `io` with it: its socket closes).
    pub fn spawn<C, S>(&self, strategy: Arc<S>, io: C)
    where
        C: Send + 'static,
        S: DrainStrategy<C>,
    {
        let connection = self.track();
        tokio::spawn(Supervised {
            hard_stop: self.shared.hard_stop.clone().cancelled_owned(),
            connection: async move { strategy.serve(io, connection).await },
        });
    }

    /// Accepts connections from `listener` and serves each with `strategy` (in a task of its
    /// own, as [`spawn`](Self::spawn) does) until `shutdown` resolves; then drops the
    /// listener and returns what `shutdown` gave. Does not drain: that is
    /// [`serve`](Self::serve), or [`drain`](Self::drain) once every accept loop has returned.
    ///
    /// `shutdown` is looked at first: once it has resolved, not one more connection is
    /// accepted. Accept errors never end the loop: after one connection's error
    /// (`ECONNABORTED`…) it accepts the next at once; after the process's (`EMFILE`,
    /// `ENFILE`, `ENOBUFS`, `ENOMEM`…) it backs off, 10 ms doubling up to 1 s until an accept
    /// succeeds, and logs the burst once when it starts and once when it ends, with a count.
    ///
    /// # Examples
    ///
    /// Several listeners, one drain:
    ///
    /// ```no_run
    /// # use handoff::drain::{Drain, DrainStrategy};
    /// # async fn example<S: DrainStrategy<tokio::net::TcpStream>>(
    /// #     handoff: handoff::Handoff,
    /// #     listeners: Vec<tokio::net::TcpListener>,
    /// #     strategy: std::sync::Arc<S>,
    /// # ) {
    /// let drain = Drain::builder().build();
    /// let loops = listeners
    ///     .into_iter()
    ///     .map(|listener| drain.accept(listener, strategy.clone(), handoff.shutdown_signal()));
    /// futures_util::future::join_all(loops).await;
    /// let report = drain.drain().await;
    /// # }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: no connection is lost (an unaccepted one stays in the listener's queue),
    /// though the listener is dropped with the future.
    pub async fn accept<L, S, F>(&self, mut listener: L, strategy: Arc<S>, shutdown: F) -> F::Output
    where
        L: Listener,
        S: DrainStrategy<L::Io>,
        F: Future,
    {
        let mut backoff = AcceptBackoff::new();
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                biased;
                reason = &mut shutdown => return reason,
                accepted = listener.accept_connection() => accepted,
            };
            match accepted {
                Ok(io) => {
                    backoff.succeeded();
                    self.spawn(strategy.clone(), io);
                }
                Err(error) => tokio::select! {
                    biased;
                    reason = &mut shutdown => return reason,
                    () = backoff.failed(&error) => {}
                },
            }
        }
    }

    /// The whole life of a listener: accepts and serves connections with `strategy` until
    /// `handoff` says stop (a successor is ready, or a stop was requested), drops the
    /// listener (a successor accepts from the same socket from then on), drains, logs the
    /// report and returns it. A stop requested while draining (a second SIGTERM) makes the
    /// deadline now ([`expire`](Self::expire)).
    ///
    /// Accepts as [`accept`](Self::accept) does: shutdown first, and accept errors back off
    /// without ending the loop. The drain ends
    /// [`GRACE_AFTER_DEADLINE`](Self::GRACE_AFTER_DEADLINE) after the deadline at the latest,
    /// whatever the connections do.
    ///
    /// # Examples
    ///
    /// See [`Drain`].
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: cancelled while accepting, the listener is dropped; while draining,
    /// the drain goes on, and [`drain`](Self::drain) waits for it.
    pub async fn serve<L, S>(&self, handoff: &Handoff, listener: L, strategy: Arc<S>) -> DrainReport
    where
        L: Listener,
        S: DrainStrategy<L::Io>,
    {
        handoff.count_connections::<S>(self);
        let reason = self.accept(listener, strategy, handoff.shutdown_signal()).await;
        let migrating = matches!(reason, crate::Shutdown::Upgraded { .. }) && self.migrate_with(handoff);
        tracing::info!(?reason, connections = self.open(), migrating, "draining");
        let report = tokio::select! {
            biased;
            report = self.drain() => report,
            () = handoff.deadline_now() => {
                tracing::info!("stop requested while draining: the deadline is now");
                self.expire();
                self.drain().await
            }
        };
        tracing::info!(
            pid = std::process::id(),
            generation = handoff.generation(),
            connections = report.connections,
            forced = report.forced,
            aborted = report.aborted,
            migrated = report.migrated,
            drain_ms = report.elapsed.as_millis() as u64,
            "drained"
        );
        report
    }
}

pin_project_lite::pin_project! {
    /// A connection's task: its strategy's future, dropped at the hard stop. Raced in the
    /// task itself, so that there is no handle to keep per connection; written out rather
    /// than a `select!`, whose state would cost every idle connection another 24 bytes.
    struct Supervised<F> {
        #[pin]
        hard_stop: WaitForCancellationFutureOwned,
        #[pin]
        connection: F,
    }
}

impl<F: Future<Output = ()>> Future for Supervised<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        // The hard stop first: once it has come, the connection is not polled again.
        if this.hard_stop.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        this.connection.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::time::Instant;

    use super::super::TrackedConnection;
    use super::*;

    /// Hands out the scripted results, then waits forever.
    struct Scripted(VecDeque<io::Result<u32>>);

    impl Listener for Scripted {
        type Io = u32;

        async fn accept_connection(&mut self) -> io::Result<u32> {
            match self.0.pop_front() {
                Some(result) => result,
                None => std::future::pending().await,
            }
        }
    }

    /// Counts the connections it serves, and holds each until its turn to close.
    #[derive(Default)]
    struct Counting(AtomicUsize);

    impl DrainStrategy<u32> for Counting {
        async fn serve(&self, _io: u32, connection: TrackedConnection) {
            self.0.fetch_add(1, Ordering::Relaxed);
            connection.turn_to_close().await;
        }
    }

    fn os(code: i32) -> io::Result<u32> {
        Err(io::Error::from_raw_os_error(code))
    }

    #[tokio::test(start_paused = true)]
    async fn once_shutdown_has_resolved_not_one_more_connection_is_accepted() {
        let drain = Drain::builder().build();
        let strategy = Arc::new(Counting::default());
        let listener = Scripted((0..10).map(Ok).collect());
        let reason = drain.accept(listener, strategy.clone(), async { "stop" }).await;
        assert_eq!(reason, "stop");
        tokio::task::yield_now().await;
        assert_eq!(strategy.0.load(Ordering::Relaxed), 0);
        assert_eq!(drain.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn accept_errors_neither_end_the_loop_nor_lose_a_connection() {
        let drain = Drain::builder().build();
        let strategy = Arc::new(Counting::default());
        let script = [
            Ok(1),
            os(libc::ECONNABORTED),
            os(libc::EMFILE),
            os(libc::EMFILE),
            os(libc::EMFILE),
            Ok(2),
            os(libc::EBADF),
            Ok(3),
        ];
        let listener = Scripted(script.into_iter().collect());
        let started = Instant::now();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let accepting = tokio::spawn({
            let (drain, strategy) = (drain.clone(), strategy.clone());
            async move { drain.accept(listener, strategy, rx).await }
        });
        while drain.open() < 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // 10 + 20 + 40 ms for the EMFILE burst; 10 ms for the next burst, after a success.
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(80) && elapsed < Duration::from_millis(90),
            "{elapsed:?}"
        );
        tx.send(()).unwrap();
        accepting.await.unwrap().unwrap();
        assert_eq!(strategy.0.load(Ordering::Relaxed), 3);
        assert_eq!(drain.drain().await.connections, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_a_back_off() {
        let drain = Drain::builder().build();
        let listener = Scripted(std::iter::repeat_with(|| os(libc::EMFILE)).take(100).collect());
        let started = Instant::now();
        let shutdown = tokio::time::sleep(Duration::from_millis(15));
        drain.accept(listener, Arc::new(Counting::default()), shutdown).await;
        assert_eq!(started.elapsed(), Duration::from_millis(15));
    }
}
