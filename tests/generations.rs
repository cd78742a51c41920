//! Several generations at once (`Builder::max_generations`): upgrades accepted while older
//! generations still drain, up to the limit, and refused beyond it with the reason.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{example, get, is_running, session_members, Server};

/// Counts the live processes of a test server's session every few milliseconds, until
/// stopped: the most seen at once, and every pid seen.
struct Census {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<u32>)>,
}

impl Census {
    fn start(sid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut most, mut seen) = (0, Vec::new());
            while !stopping.load(Ordering::Relaxed) {
                let live: Vec<u32> = session_members(sid)
                    .into_iter()
                    .filter(|m| m.state != 'Z')
                    .map(|m| m.pid)
                    .collect();
                most = most.max(live.len());
                seen.extend(live.into_iter().filter(|pid| !seen.contains(pid)).collect::<Vec<_>>());
                std::thread::sleep(Duration::from_millis(2));
            }
            (most, seen)
        });
        Self { stop, thread }
    }

    fn finish(self) -> (usize, Vec<u32>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Ten triggers 50 ms apart while the first generation drains a slow request: every upgrade
/// succeeds, every request is answered (the slow one by the process that took it), no more
/// than four processes are ever alive, `status` lists the draining generation, and once it is
/// over only the newest runs, with no zombie left by any generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_triggers_50_ms_apart_while_a_generation_drains_all_succeed() {
    let server = Server::start(
        &example("http_uuid"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--delay-ms",
            "8000",
            "--max-generations",
            "4",
        ],
    );
    let address = server.address("http");
    let first = server.first_pid();
    let first_uuid = get(address, "/uuid").await.unwrap().body;
    let delayed = tokio::spawn(get(address, "/delayed"));
    server.wait_for_log(|l| l.contains("delayed request started"));
    let census = Census::start(first);

    for upgrade in 0..10 {
        let reply = server.upgrade();
        assert_eq!(reply["ok"], true, "upgrade {upgrade}: {reply}\nlog:\n{}", server.log());
        let answer = get(address, "/uuid").await.unwrap();
        assert_eq!(answer.status, 200, "after upgrade {upgrade}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = server.control("status");
    assert!(
        is_running(first),
        "the first generation drains its slow request throughout"
    );
    let draining = status["draining_generations"].as_array().unwrap();
    assert_eq!(
        draining.first().map(|g| g["pid"].clone()),
        Some(first.into()),
        "{status}"
    );
    assert_eq!(draining[0]["generation"], 1, "{status}");
    assert_eq!(draining[0]["connections"], 1, "the slow request's: {status}");
    assert!(draining[0]["age_s"].as_f64().unwrap() > 0.0, "{status}");

    let delayed = delayed.await.unwrap().unwrap();
    assert_eq!((delayed.status, delayed.body.as_str()), (200, first_uuid.as_str()));
    assert_eq!(server.control("status")["generation"], 11);
    // Once the first generation has drained, only the serving process is left.
    let serving = server.pid();
    common::wait_until(
        "every older generation to exit",
        || {
            session_members(first)
                .into_iter()
                .filter(|m| m.state != 'Z')
                .map(|m| m.pid)
                .collect::<Vec<_>>()
        },
        |live| live == &[serving],
    );
    let (most, seen) = census.finish();
    assert!(most <= 4, "{most} processes alive at once (max_generations 4)");
    assert!(seen.len() >= 11, "the census saw {} processes", seen.len());
    let zombies: Vec<_> = session_members(first)
        .into_iter()
        .filter(|m| m.state == 'Z' && seen.contains(&m.parent) && is_running(m.parent))
        .collect();
    assert!(zombies.is_empty(), "zombies a generation did not reap: {zombies:?}");
}

/// With room for two generations, a trigger while the previous one drains is refused, says
/// why and names the draining process; once it has drained, the same trigger succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_beyond_max_generations_is_refused_with_the_draining_pids() {
    let server = Server::start(
        &example("http_uuid"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--delay-ms",
            "1500",
            "--max-generations",
            "2",
        ],
    );
    let address = server.address("http");
    let first = server.first_pid();
    let delayed = tokio::spawn(get(address, "/delayed"));
    server.wait_for_log(|l| l.contains("delayed request started"));
    assert_eq!(server.upgrade()["ok"], true);

    let refused = server.upgrade();
    assert_eq!(refused["ok"], false, "{refused}");
    let error = refused["error"].as_str().unwrap();
    assert!(
        error.contains("max_generations (2)") && error.contains(&first.to_string()),
        "the reason names the limit and the draining pid: {error}"
    );
    assert_eq!(get(address, "/uuid").await.unwrap().status, 200, "serving on");

    assert_eq!(delayed.await.unwrap().unwrap().status, 200);
    server.wait_for_exit(first, Duration::from_secs(10));
    let reply = server.upgrade();
    assert_eq!(reply["ok"], true, "once the first generation has gone: {reply}");
    assert_eq!(reply["generation"], 3);
}
