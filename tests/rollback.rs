//! The probation after a commit: a successor that dies without saying that it leaves is taken
//! back by its predecessor, which serves again on the same sockets; one that stops on purpose,
//! or hands over to a successor of its own, is not.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{example, is_running, poll_until, Server, WAIT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).unwrap();
}

/// How one request of the load ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// The connection was refused: nobody held the listening socket.
    Refused,
    /// Anything else: a reset or an EOF (a connection the dead successor had taken).
    Lost,
}

#[derive(Debug, Clone, Copy)]
struct Request {
    started: Instant,
    took: Duration,
    outcome: Outcome,
}

/// One `GET /uuid` on a new connection, with a bounded wait.
fn get(address: SocketAddr) -> Outcome {
    let mut stream = match TcpStream::connect_timeout(&address, Duration::from_secs(5)) {
        Ok(stream) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Outcome::Refused,
        Err(_) => return Outcome::Lost,
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = b"GET /uuid HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n";
    let mut reply = Vec::new();
    match stream.write_all(request).and_then(|()| stream.read_to_end(&mut reply)) {
        Ok(_) if reply.starts_with(b"HTTP/1.1 200") => Outcome::Ok,
        _ => Outcome::Lost,
    }
}

/// A bounded client loop: `clients` threads, each one request after another on a new
/// connection, until stopped (or 20,000 requests, or 60 s).
struct Load {
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<Request>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(address: SocketAddr, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, requests) = (stop.clone(), requests.clone());
                std::thread::spawn(move || {
                    let end = Instant::now() + Duration::from_secs(60);
                    for _ in 0..20_000 / clients {
                        if stop.load(Ordering::Relaxed) || Instant::now() > end {
                            return;
                        }
                        let started = Instant::now();
                        let outcome = get(address);
                        let took = started.elapsed();
                        requests.lock().unwrap().push(Request { started, took, outcome });
                    }
                })
            })
            .collect();
        Self {
            stop,
            requests,
            threads,
        }
    }

    fn count(&self, outcome: Outcome) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.outcome == outcome)
            .count()
    }

    fn finish(self) -> Vec<Request> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().unwrap();
        }
        Arc::try_unwrap(self.requests).unwrap().into_inner().unwrap()
    }
}

/// A successor killed 200 ms after its commit, under load: its predecessor takes the service
/// back at once, on the same listening socket (no client is refused: the queue is shared),
/// names itself in the PID file and the control socket, counts the rollback, and serves every
/// request from then on; it upgrades again.
#[test]
fn a_successor_that_crashes_after_its_commit_is_taken_back_under_load() {
    let server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0", "--probation", "10"]);
    let address = server.address("http");
    let old = server.pid();
    let load = Load::start(address, 4);
    poll_until(
        WAIT,
        || (load.count(Outcome::Ok) > 200).then_some(()),
        || "no load".into(),
    );

    let reply = server.upgrade();
    assert_eq!(reply["ok"], true, "{reply}");
    let successor = reply["successor_pid"].as_u64().unwrap() as u32;
    std::thread::sleep(Duration::from_millis(200)); // the crash comes 200 ms after the commit
    let crashed = Instant::now();
    signal(successor, Signal::SIGKILL);
    server.wait_for_log(|l| l.contains("rollback:") && l.contains(&format!("successor_pid={successor}")));
    let taken_back = Instant::now();
    // The take-back names us in the PID file before anyone hears of it.
    assert_eq!(server.pid_in_file(), Some(old));
    let serving_before = load.count(Outcome::Ok);
    poll_until(
        WAIT,
        || (load.count(Outcome::Ok) > serving_before + 500).then_some(()),
        || "no load after the take-back".into(),
    );
    let requests = load.finish();

    let status = server.control("status");
    assert_eq!(
        (status["pid"].as_u64(), status["state"].as_str()),
        (Some(old as u64), Some("ready")),
        "{status}"
    );
    let upgrades = &status["upgrades"];
    assert_eq!(upgrades["rollbacks"], 1, "{status}");
    assert_eq!(upgrades["last_rollback"]["successor_pid"], successor, "{status}");
    let how = upgrades["last_rollback"]["status"].as_str().unwrap();
    assert!(how.contains("9") && how.contains("SIGKILL"), "{how}");

    let refused = requests.iter().filter(|r| r.outcome == Outcome::Refused).count();
    let lost: Vec<&Request> = requests.iter().filter(|r| r.outcome == Outcome::Lost).collect();
    let after: Vec<&Request> = requests.iter().filter(|r| r.started >= taken_back).collect();
    // The longest wait of a request started after the crash: how long the service stalled.
    let stall = requests
        .iter()
        .filter(|r| r.started >= crashed && r.outcome == Outcome::Ok)
        .map(|r| r.took)
        .max()
        .unwrap_or_default();
    eprintln!(
        "requests: {}, refused: {refused}, lost with the successor: {}, after the take-back: {} (all served); \
         crash → take-back seen: {:?}; longest request after the crash: {stall:?}",
        requests.len(),
        lost.len(),
        after.len(),
        taken_back - crashed,
    );
    assert_eq!(refused, 0, "the listening socket was held throughout");
    assert!(
        after.iter().all(|r| r.outcome == Outcome::Ok),
        "a request after the take-back failed"
    );
    // Only the connections the successor had taken are lost: started before it died.
    assert!(lost.iter().all(|r| r.started < crashed), "{lost:?}");
    assert!(lost.len() <= 4, "at most one request in flight per client: {lost:?}");

    // Serving again for good: the next upgrade works, and this time the successor keeps it.
    let next = server.upgrade_until_drained();
    assert_eq!(server.pid_in_file(), Some(next));
}

/// A successor that stops on purpose (its control socket's `stop`, or SIGTERM) is not taken
/// back: its predecessor ends its probation when told, and both exit; the service is stopped.
#[test]
fn a_successor_stopped_on_purpose_is_not_taken_back() {
    for stop in ["control", "signal"] {
        let server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0", "--probation", "30"]);
        let address = server.address("http");
        let old = server.pid();
        let reply = server.upgrade();
        assert_eq!(reply["ok"], true, "{reply}");
        let successor = reply["successor_pid"].as_u64().unwrap() as u32;
        server.wait_for_log(|l| l.contains(" ready ") && l.contains(&format!("pid={successor} ")));
        match stop {
            "control" => assert_eq!(server.control("stop")["ok"], true),
            _ => signal(successor, Signal::SIGTERM),
        }
        // "stops" when told before its exit, "stopped" when its exit came first: either way.
        server.wait_for_log(|l| l.contains("probation over") && l.contains("on purpose"));
        // Well before the 30 s probation: told, the old process exits once drained.
        server.wait_for_exit(successor, Duration::from_secs(10));
        server.wait_for_exit(old, Duration::from_secs(10));
        assert!(!server.has_log(|l| l.contains("rollback")), "{stop}: {}", server.log());
        assert_eq!(server.pid_in_file(), None, "{stop}: the stop removed the PID file");
        let refused = TcpStream::connect(address).map(drop).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{stop}");
    }
}

/// With three generations, only the newest takes back: a successor that handed over to one of
/// its own ends its predecessor's probation, so its death later is nobody's to undo. The old
/// process, drained, lets its successor upgrade while it waits out its probation.
#[test]
fn a_successor_that_handed_over_is_not_taken_back_by_its_predecessor() {
    let server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0", "--probation", "30"]);
    let first = server.pid();
    let second = server.upgrade_until_drained();
    assert!(is_running(first), "on probation");
    let reply = server.upgrade();
    assert_eq!(reply["ok"], true, "{reply}");
    let third = reply["successor_pid"].as_u64().unwrap() as u32;
    // Told that its successor handed over, the first generation exits, long before 30 s.
    server.wait_for_log(|l| l.contains("probation over") && l.contains(&format!("successor_pid={second}")));
    server.wait_for_exit(first, Duration::from_secs(10));
    // The second generation dies on its own probation: the third takes nothing back, and
    // the second is the third's predecessor, not its successor: the third serves on.
    signal(second, Signal::SIGKILL);
    server.wait_for_exit(second, Duration::from_secs(10));
    assert!(!server.has_log(|l| l.contains("rollback")), "{}", server.log());
    assert_eq!(server.pid(), third);
    assert_eq!(server.pid_in_file(), Some(third));
}
