//! gRPC through upgrades: `grpc_echo` with tonic's own client (one `Channel`, as a new user
//! would make it).

mod common;
#[path = "../examples/common/echo.rs"]
mod echo;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{example, Server};
use tonic::transport::Channel;

/// What the calls saw: the generations that answered, the failures by kind (after the
/// documented retry), and how many calls were retried.
#[derive(Default)]
struct Tally {
    generations: BTreeSet<u64>,
    failures: BTreeMap<String, usize>,
    retried: usize,
    streams: usize,
}

/// The documented retry: a call failing with `CANCELLED` or `UNAVAILABLE` is sent again, up
/// to this many times, after a backoff that doubles ([`backoff`]), as gRPC clients retry.
const RETRIES: usize = 3;

/// Before retry `attempt` (from 0): 10, 20, 40 ms, so that the channel has re-dialled.
async fn backoff(attempt: usize) {
    tokio::time::sleep(std::time::Duration::from_millis(10 << attempt)).await;
}

async fn say(channel: &Channel, tally: &Mutex<Tally>) {
    for attempt in 0..=RETRIES {
        match echo::say(channel.clone(), "hello").await {
            Ok(reply) => {
                assert_eq!(reply.message, "hello");
                tally.lock().unwrap().generations.insert(reply.generation);
                return;
            }
            Err(status) if echo::retryable(&status) && attempt < RETRIES => {
                tally.lock().unwrap().retried += 1;
                backoff(attempt).await;
            }
            Err(status) => {
                *tally
                    .lock()
                    .unwrap()
                    .failures
                    .entry(format!("say: {}", echo::kind(&status)))
                    .or_default() += 1;
                return;
            }
        }
    }
}

/// A server-streaming call: every message arrives, from one generation, in order.
async fn count(channel: &Channel, tally: &Mutex<Tally>) {
    for attempt in 0..=RETRIES {
        let mut stream = match echo::count(channel.clone(), 10, 20).await {
            Ok(stream) => stream,
            Err(status) if echo::retryable(&status) && attempt < RETRIES => {
                tally.lock().unwrap().retried += 1;
                backoff(attempt).await;
                continue;
            }
            Err(status) => {
                *tally
                    .lock()
                    .unwrap()
                    .failures
                    .entry(format!("count: {}", echo::kind(&status)))
                    .or_default() += 1;
                return;
            }
        };
        let mut replies = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(reply)) => replies.push(reply),
                Ok(None) => break,
                Err(status) => {
                    // A stream the server had started is never retried: it must finish.
                    *tally
                        .lock()
                        .unwrap()
                        .failures
                        .entry(format!("count, mid-stream: {}", echo::kind(&status)))
                        .or_default() += 1;
                    return;
                }
            }
        }
        let messages: Vec<_> = replies.iter().map(|r| r.message.as_str()).collect();
        let expected: Vec<_> = (0..10).map(|i| format!("count {i}")).collect();
        assert_eq!(messages, expected);
        assert!(replies.iter().all(|r| r.generation == replies[0].generation));
        tally.lock().unwrap().streams += 1;
        return;
    }
}

/// Eight workers making unary calls and two streaming, on one tonic `Channel`, through ten
/// upgrades of `grpc_echo`: with the documented retry of `CANCELLED`/`UNAVAILABLE`, not one
/// call fails; every stream the server started finishes whole, in order; every generation
/// answers, and every old process exits without dropping a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_echo_through_ten_upgrades_with_tonics_client() {
    let server = Server::start(
        &example("grpc_echo"),
        &["--listen", "127.0.0.1:0", "--drain-timeout", "1"],
    );
    let address = server.address("grpc");
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..10 {
        let (channel, stop, tally) = (channel.clone(), stop.clone(), tally.clone());
        workers.spawn(async move {
            // Bounded: at most 100,000 calls per worker.
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                if worker < 8 {
                    say(&channel, &tally).await;
                } else {
                    count(&channel, &tally).await;
                }
            }
        });
    }
    let answered_by = |generation: u64| {
        let tally = tally.clone();
        move || tally.lock().unwrap().generations.contains(&generation)
    };
    common::wait_until("answers", answered_by(1), |&answered| answered);
    for generation in 2..=11 {
        server.upgrade_and_settle();
        common::wait_until("answers from the successor", answered_by(generation), |&answered| {
            answered
        });
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(worker) = tokio::time::timeout(common::WAIT, workers.join_next())
        .await
        .expect("the workers finish")
    {
        worker.unwrap();
    }
    let tally = tally.lock().unwrap();
    assert!(
        tally.failures.is_empty(),
        "failures by kind: {:?} ({} retried)",
        tally.failures,
        tally.retried
    );
    assert!(tally.streams > 0);
    for generation in 1..=10 {
        let drained =
            server.wait_for_log(|l| l.contains(" drained ") && l.contains(&format!("generation={generation} ")));
        assert!(drained.contains("aborted=0"), "{drained}");
    }
}
