//! The drain's tests: its deadline and report, the accept loop, and a listener's life.

use super::*;

mod deadline {
    use super::*;

    /// How long a test waits for a drain before it calls it stuck (virtual time: paused).
    const STUCK: Duration = Duration::from_secs(600);

    async fn drain_within_bound(drain: &Drain) -> DrainReport {
        tokio::time::timeout(STUCK, drain.drain())
            .await
            .expect("the drain ends at the deadline plus the grace, whatever the connections do")
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_with_no_connection_ends_at_once() {
        let report = Drain::builder().build().drain().await;
        assert_eq!((report.connections, report.forced, report.aborted), (0, 0, 0));
        assert_eq!(report.elapsed, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_left_at_the_deadline_are_told_and_counted() {
        let drain = Drain::builder().deadline(Duration::from_secs(5)).build();
        let polite = drain.track();
        let stubborn = drain.track();
        tokio::spawn(async move {
            polite.draining().await;
            drop(polite);
        });
        let closer = tokio::spawn(async move {
            stubborn.deadline().await;
            drop(stubborn);
        });
        let report = drain.drain().await;
        closer.await.unwrap();
        assert_eq!((report.connections, report.forced, report.aborted), (2, 1, 0));
        assert_eq!(report.elapsed, Duration::from_secs(5));
        assert_eq!(drain.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_ends_at_the_deadline_plus_the_grace_even_if_a_connection_never_closes() {
        let drain = Drain::builder().deadline(Duration::from_secs(5)).build();
        let _held_forever = drain.track();
        let report = drain_within_bound(&drain).await;
        assert_eq!((report.connections, report.forced, report.aborted), (1, 1, 1));
        assert_eq!(report.elapsed, Duration::from_secs(5) + Drain::GRACE_AFTER_DEADLINE);
    }

    /// Dropped when its task is dropped: says so on a channel.
    struct Dropped(Option<tokio::sync::oneshot::Sender<()>>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            let _ = self.0.take().map(|tx| tx.send(()));
        }
    }

    struct IgnoresTheDrain;

    impl super::super::DrainStrategy<Dropped> for IgnoresTheDrain {
        async fn serve(&self, io: Dropped, connection: TrackedConnection) {
            std::future::pending::<()>().await;
            drop((io, connection));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_spawned_connection_that_ignores_the_deadline_is_dropped_and_counted() {
        let drain = Drain::builder().deadline(Duration::from_secs(5)).build();
        let (tx, dropped) = tokio::sync::oneshot::channel();
        drain.spawn(Arc::new(IgnoresTheDrain), Dropped(Some(tx)));
        let report = drain_within_bound(&drain).await;
        assert_eq!((report.connections, report.forced, report.aborted), (1, 1, 1));
        assert_eq!(report.elapsed, Duration::from_secs(5) + Drain::GRACE_AFTER_DEADLINE);
        tokio::time::timeout(STUCK, dropped)
            .await
            .expect("the connection's task is dropped, and its socket with it")
            .unwrap();
        tokio::task::yield_now().await;
        assert_eq!(drain.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn expire_makes_the_deadline_now() {
        let drain = Drain::builder().deadline(Duration::from_secs(60)).build();
        let connection = drain.track();
        tokio::spawn(async move {
            connection.deadline().await;
            drop(connection);
        });
        let expirer = tokio::spawn({
            let drain = drain.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                drain.expire();
            }
        });
        let report = drain_within_bound(&drain).await;
        expirer.await.unwrap();
        assert_eq!((report.connections, report.forced, report.aborted), (1, 1, 0));
        assert_eq!(report.elapsed, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn expire_before_the_drain_starts_it_at_its_deadline() {
        let drain = Drain::builder().deadline(Duration::from_secs(60)).build();
        let connection = drain.track();
        drain.expire();
        let report = drain_within_bound(&drain).await;
        assert_eq!((report.forced, report.aborted), (1, 1));
        assert_eq!(report.elapsed, Drain::GRACE_AFTER_DEADLINE);
        drop(connection);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_called_again_reports_the_same_drain() {
        let drain = Drain::builder().deadline(Duration::from_secs(5)).build();
        let connection = drain.track();
        let first = tokio::time::timeout(Duration::from_secs(1), drain.drain()).await;
        assert!(first.is_err(), "cancelled while the connection is open");
        let closer = tokio::spawn(async move {
            connection.deadline().await;
            drop(connection);
        });
        let report = drain_within_bound(&drain).await;
        closer.await.unwrap();
        assert_eq!((report.connections, report.forced, report.aborted), (1, 1, 0));
        assert_eq!(report.elapsed, Duration::from_secs(5));
    }
}

mod accept_loop {
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
        let reason = drain.accept_until(listener, strategy.clone(), async { "stop" }).await;
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
            async move { drain.accept_until(listener, strategy, rx).await }
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
        drain
            .accept_until(listener, Arc::new(Counting::default()), shutdown)
            .await;
        assert_eq!(started.elapsed(), Duration::from_millis(15));
    }
}

mod attached {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Counts its connections, and holds each until its turn to close.
    #[derive(Default)]
    struct Holding(AtomicUsize);

    impl DrainStrategy<tokio::net::TcpStream> for Holding {
        async fn serve(&self, _io: tokio::net::TcpStream, connection: TrackedConnection) {
            self.0.fetch_add(1, Ordering::Relaxed);
            connection.turn_to_close().await;
        }
    }

    /// A handoff that answers no signal (the test's process is shared), ready.
    async fn handoff() -> Handoff {
        let handoff = Handoff::builder()
            .upgrade_signal(None)
            .stop_on_signals(false)
            .start()
            .await
            .unwrap();
        handoff.ready().await.unwrap();
        handoff
    }

    #[tokio::test]
    async fn a_second_stop_ends_the_drain_of_loops_of_ones_own() {
        let handoff = handoff().await;
        let drain = Drain::builder().deadline(Duration::from_secs(600)).build();
        drain.attach(&handoff);
        let stubborn = drain.track(); // a connection of an accept loop of the application's
        handoff.stop();
        let draining = tokio::spawn({
            let drain = drain.clone();
            async move { drain.drain().await }
        });
        while !drain.is_draining() {
            tokio::task::yield_now().await;
        }
        assert!(!draining.is_finished());
        handoff.stop();
        let report = tokio::time::timeout(Duration::from_secs(30), draining)
            .await
            .expect("the drain ends at the second stop, not at its deadline")
            .unwrap();
        assert_eq!((report.connections, report.forced), (1, 1));
        drop(stubborn);
    }

    #[tokio::test]
    async fn accept_counts_connections_under_the_listeners_name() {
        let handoff = handoff().await;
        let web = handoff.registry().tcp("web", "127.0.0.1:0".parse().unwrap()).unwrap();
        let address = web.local_addr().unwrap();
        let drain = Drain::builder().build();
        let strategy = Arc::new(Holding::default());
        let accepting = tokio::spawn({
            let (drain, handoff, strategy) = (drain.clone(), handoff.clone(), strategy.clone());
            async move { drain.accept(&handoff, web, strategy).await }
        });
        let _client = tokio::net::TcpStream::connect(address).await.unwrap();
        while strategy.0.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        let counts = handoff.connections();
        assert_eq!(counts.len(), 1, "{counts:?}");
        assert_eq!(
            (counts[0].listener.as_deref(), counts[0].protocol.as_str()),
            (Some("web"), "tcp")
        );
        handoff.stop();
        assert_eq!(accepting.await.unwrap(), Shutdown::Stopped);
    }
}
