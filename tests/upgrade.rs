//! Upgrades of real processes: the seed's demo, many upgrades in a row, successors that fail,
//! a binary replaced on disk, and a handoff of more sockets than one message carries.

mod common;

use std::time::{Duration, Instant};

use common::{children, copy_binary, example, fd_count, get, replace_with_script, Server};

/// The seed scenario: a slow request started before an upgrade completes with the old UUID,
/// while new requests already get the new one; the old process exits once it has answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_demo_delayed_request_finishes_on_the_old_process() {
    let server = Server::start(
        &example("http_uuid"),
        &["--listen", "127.0.0.1:0", "--delay-ms", "1500"],
    );
    let address = server.address("http");
    let old_pid = server.pid();
    let old_uuid = get(address, "/uuid").await.unwrap().body;

    let delayed = tokio::spawn(get(address, "/delayed"));
    server.wait_for_log(|l| l.contains("delayed request started"));
    let reply = server.upgrade();
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["generation"], 2);

    let new_uuid = get(address, "/uuid").await.unwrap().body;
    assert_ne!(new_uuid, old_uuid, "the successor serves new requests");
    let delayed = delayed.await.unwrap().unwrap();
    assert_eq!(delayed.status, 200);
    assert_eq!(
        delayed.body, old_uuid,
        "the slow request finishes on the process that accepted it"
    );
    assert!(
        delayed.connection_close,
        "a response during the drain closes its connection"
    );
    server.wait_for_log(|l| l.contains("exiting") && l.contains(&format!("pid={old_pid} ")));
    assert_eq!(
        std::fs::read_to_string(server.dir.path().join("server.pid"))
            .unwrap()
            .trim(),
        server.pid().to_string()
    );
}

/// Twenty upgrades in a row: each serves, and no descriptor leaks from one generation to the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_upgrades_serve_and_leak_no_descriptor() {
    let server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0"]);
    let address = server.address("http");
    // Counted before any request, so that no client connection is open at that moment.
    let first = fd_count(server.pid());
    let mut counts = vec![first];
    let mut uuids = vec![get(address, "/uuid").await.unwrap().body];
    for _ in 0..20 {
        let pid = server.upgrade_and_settle();
        // The successor learns of its predecessor's exit a moment after the exit: it has
        // five seconds to close what it held for it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut count = fd_count(pid);
        while count != first && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            count = fd_count(pid);
        }
        counts.push(count);
        let reply = get(address, "/uuid").await.unwrap();
        assert_eq!(reply.status, 200);
        assert!(!uuids.contains(&reply.body), "each generation is a new process");
        uuids.push(reply.body);
    }
    let last = server.pid();
    // Every generation holds what the first did: its listeners, its control socket, its
    // runtime's own. Not the channel to a predecessor that has gone.
    assert!(
        counts.iter().all(|c| *c == counts[0]),
        "open descriptors per generation: {counts:?}; now {:?}",
        common::fd_targets(last)
    );
    assert_eq!(server.control("status")["generation"], 21);
}

/// Successors that crash or hang are killed and reaped; the old process serves throughout
/// and a later upgrade, to a binary replaced on disk, succeeds and runs the new file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_successors_leave_the_old_process_serving() {
    let bin = tempfile::tempdir().unwrap();
    let binary = copy_binary(&example("http_uuid"), bin.path());
    let original = bin.path().join("original");
    std::fs::hard_link(&binary, &original).unwrap();
    let server = Server::start(&binary, &["--listen", "127.0.0.1:0", "--upgrade-timeout", "1"]);
    let address = server.address("http");
    let pid = server.pid();
    let uuid = get(address, "/uuid").await.unwrap().body;

    // Clients keep coming while the upgrades fail: not one may see an error.
    let load = tokio::spawn(async move {
        for _ in 0..200 {
            let reply = get(address, "/uuid").await.expect("a request during a failed upgrade");
            assert_eq!(reply.status, 200);
        }
    });

    replace_with_script(&binary, "exit 3");
    let reply = server.upgrade();
    assert_eq!(reply["ok"], false);
    let error = reply["error"].as_str().unwrap();
    assert!(error.contains("exited (exit status: 3)"), "{error}");
    assert!(children(pid).is_empty(), "the crashed successor was reaped");

    replace_with_script(&binary, "exec sleep 60");
    let reply = server.upgrade();
    assert_eq!(reply["ok"], false);
    assert_eq!(reply["phase"], "hello");
    let error = reply["error"].as_str().unwrap();
    assert!(error.contains("timed out after 1s"), "{error}");
    assert!(children(pid).is_empty(), "the hung successor was killed and reaped");

    load.await.unwrap();
    assert_eq!(server.pid(), pid);
    assert_eq!(
        get(address, "/uuid").await.unwrap().body,
        uuid,
        "the same process still serves"
    );

    // A deploy replaces the file on disk: the upgrade runs the new file, not our old inode.
    let marker = bin.path().join("new-binary-ran");
    replace_with_script(
        &binary,
        &format!("touch '{}'\nexec '{}' \"$@\"", marker.display(), original.display()),
    );
    let new_pid = server.upgrade_and_settle();
    assert!(marker.exists(), "the successor was started from the replaced file");
    assert_ne!(new_pid, pid);
    assert_ne!(get(address, "/uuid").await.unwrap().body, uuid);
}

/// A successor that never reads the application state holds nobody: one that hangs is
/// killed at the upgrade timeout, the old process's writer stopped with the upgrade (no
/// descriptor left behind), and it serves on; one that says ready without taking the state
/// closes it there, and the upgrade completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_never_reads_the_state_holds_nobody() {
    let bin = tempfile::tempdir().unwrap();
    let binary = copy_binary(&example("tcp_echo"), bin.path());
    let original = bin.path().join("original");
    std::fs::hard_link(&binary, &original).unwrap();
    let args = ["--listen", "127.0.0.1:0", "--upgrade-timeout", "1"];
    let server = Server::start(&binary, &[&args[..], &["--state-mib", "64", "--ignore-state"]].concat());
    let pid = server.pid();
    let descriptors = fd_count(pid);

    replace_with_script(&binary, "exec sleep 60");
    let reply = server.upgrade();
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("timed out"), "{reply}");
    assert_eq!(server.pid(), pid, "the old process serves on");
    common::poll_until(
        common::WAIT,
        || (fd_count(pid) == descriptors).then_some(()),
        || format!("descriptors: {} before, {} after", descriptors, fd_count(pid)),
    );

    replace_with_script(&binary, &format!("exec '{}' \"$@\"", original.display()));
    let successor = server.upgrade_and_settle();
    assert_ne!(successor, pid);
    server.wait_for_log(|l| l.contains("did not read the application state"));
}

/// 300 TCP listeners, a Unix listener and a UDP socket cross in more than one batch, and the
/// successor adopts each by name: same addresses, same kernel sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_listeners_are_adopted_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    let server = Server::start(&example("many_sockets"), &["--tcp", "300", "--dir", dir_arg]);
    let before = server.control("status")["sockets"].clone();
    assert_eq!(before.as_array().unwrap().len(), 303); // 300 TCP, Unix, UDP, control

    // A connection queued on the old process's socket before the upgrade...
    let queued = std::net::TcpStream::connect(server.address("tcp-299")).unwrap();
    server.upgrade_and_settle();
    let after = server.control("status");
    assert_eq!(after["generation"], 2);
    let mut before: Vec<_> = before.as_array().unwrap().clone();
    let mut after: Vec<_> = after["sockets"].as_array().unwrap().clone();
    let key = |s: &serde_json::Value| s["name"].as_str().unwrap().to_owned();
    before.sort_by_key(key);
    after.sort_by_key(key);
    // Bound by the first generation, inherited by the second: the rest is the same.
    for (socket, origin) in before
        .iter_mut()
        .map(|s| (s, "bound"))
        .chain(after.iter_mut().map(|s| (s, "inherited")))
    {
        let socket = socket.as_object_mut().unwrap();
        assert_eq!(socket.remove("origin"), Some(origin.into()), "{socket:?}");
    }
    assert_eq!(before, after, "every socket kept its name and address");
    // ...is answered, by one generation or the other: the accept queue was shared, not rebound.
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut &queued, &mut answer).unwrap();
    assert!(answer == "1\n" || answer == "2\n", "{answer:?}");
    let fresh = std::net::TcpStream::connect(server.address("tcp-0")).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut &fresh, &mut answer).unwrap();
    assert_eq!(answer, "2\n");
    let mut unix = std::os::unix::net::UnixStream::connect(dir.path().join("many.sock")).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut unix, &mut answer).unwrap();
    assert_eq!(answer, "2\n");
}

/// `status` counts across generations: the commit carries the predecessor's counters, so the
/// serving process reports every upgrade of the chain and the timings of the one that brought
/// it in, trigger → ready → commit.
#[test]
fn status_counts_upgrades_across_generations() {
    let server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0"]);
    let first = server.pid();
    let second = server.upgrade_and_settle();
    let third = server.upgrade_and_settle();
    let status = server.control("status");
    let upgrades = &status["upgrades"];
    assert_eq!(upgrades["succeeded"], 2, "{status}");
    assert_eq!(upgrades["attempted"], 2, "{status}");
    assert_eq!(upgrades["last_handoff"]["successor_pid"], third, "{status}");
    assert_eq!(upgrades["last_handoff"]["generation"], 3, "{status}");
    assert!(
        upgrades["last_handoff"]["trigger_to_ready_ms"].as_f64().unwrap() > 0.0,
        "{status}"
    );
    assert_eq!(upgrades["arrival"]["predecessor_pid"], second, "{status}");
    assert_ne!(first, third);
}

/// Connects to `name`'s listener of `server` and reads its greeting (the generation); the
/// connection stays open (`--hold`) while the stream lives.
fn greeted(server: &Server, name: &str) -> std::net::TcpStream {
    let mut stream = std::net::TcpStream::connect(server.address(name)).unwrap();
    let mut greeting = [0; 2];
    std::io::Read::read_exact(&mut stream, &mut greeting).unwrap();
    stream
}

/// A socket claimed after `ready()` (the misplaced line): the first generation binds it and
/// warns; the successor, which released the inherited one at its ready, gets a typed error
/// naming the socket and the rule, never a new bind, while the socket claimed in time (the
/// same kernel socket) keeps serving.
#[test]
fn a_claim_after_ready_is_an_error_and_the_socket_claimed_in_time_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--tcp", "1", "--claim-late", "--dir", dir.path().to_str().unwrap()];
    let server = Server::start(&example("many_sockets"), &args);
    // Claimed after ready: in the registry once the warning is out, not before.
    server.wait_for_log(|l| l.contains("WARN") && l.contains("bound after ready()") && l.contains("`late`"));
    let (served, late) = (server.address("tcp-0"), server.address("late"));
    drop(greeted(&server, "late"));

    let second = server.upgrade_and_settle();
    let released = server.wait_for_log(|l| l.contains("closed an inherited socket that nothing claimed"));
    assert!(
        released.contains("WARN") && released.contains(&format!("TCP listener `late` ({late})")),
        "{released}"
    );
    let error = server.wait_for_log(|l| l.contains("claiming `late`"));
    assert!(
        error.contains(&format!("socket `late` claimed after ready(): TCP listener `late` ({late}) was inherited and closed at ready(), since nothing had claimed it; claim every socket before ready()")),
        "{error}"
    );
    // Not rebound: nothing listens there; the socket claimed in time serves the successor.
    let refused = std::net::TcpStream::connect(late);
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "{refused:?}"
    );
    assert_eq!(server.address("tcp-0"), served);
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut std::net::TcpStream::connect(served).unwrap(), &mut answer).unwrap();
    assert_eq!(answer, "2\n");
    assert_eq!(server.pid(), second);
}

/// `status` counts connections per listener name and protocol: two listeners of one
/// protocol are two rows, named as the registry names them, with the application's protocol
/// name (never a Rust type).
#[test]
fn status_counts_connections_per_listener_and_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--tcp", "2", "--hold", "--dir", dir.path().to_str().unwrap()];
    let server = Server::start(&example("many_sockets"), &args);
    let _held = [
        greeted(&server, "tcp-0"),
        greeted(&server, "tcp-0"),
        greeted(&server, "tcp-1"),
    ];
    let mut unix = std::os::unix::net::UnixStream::connect(dir.path().join("many.sock")).unwrap();
    std::io::Read::read_exact(&mut unix, &mut [0; 2]).unwrap();
    let status = server.control("status");
    let mut rows: Vec<(String, String, u64)> = status["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let text = |key: &str| row[key].as_str().unwrap_or("?").to_owned();
            (text("listener"), text("protocol"), row["active"].as_u64().unwrap())
        })
        .collect();
    rows.sort();
    let row = |listener: &str, active| (listener.to_owned(), "greeting".to_owned(), active);
    assert_eq!(rows, [row("tcp-0", 2), row("tcp-1", 1), row("unix", 1)], "{status}");
}
