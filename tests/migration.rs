//! Live migration with real clients across real upgrades: `tcp_echo --migrate`.

mod common;

use std::time::Duration;

use std::os::fd::AsFd;

use common::{example, fake_predecessor, Server, WAIT};
use handover::wire::migration::State;
use handover::wire::{ConnectionEntry, Message, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// The drain's report, as the process `pid` logged it.
fn drained_line(server: &Server, pid: u32) -> String {
    server.wait_for_log(|l| l.contains(" drained ") && l.contains(&format!("pid={pid} ")))
}

/// Sends numbered chunks and checks each comes back exactly, until told to stop; publishes
/// how many chunks went round. Returns the bytes that went round; panics on any EOF, reset
/// or byte out of place.
async fn ping_pong(
    mut stream: TcpStream,
    client: usize,
    rounds: watch::Sender<u64>,
    mut stop: watch::Receiver<bool>,
) -> u64 {
    let mut round: u64 = 0;
    let mut total = 0;
    let mut echoed = vec![0; 4096];
    while !*stop.borrow_and_update() {
        // Chunk sizes vary, so that chunks straddle the server's reads.
        let len = 1 + (round as usize * 7919 + client * 31) % 4000;
        let chunk: Vec<u8> = (0..len).map(|i| (round as usize + i + client) as u8).collect();
        tokio::time::timeout(WAIT, stream.write_all(&chunk))
            .await
            .expect("a write in time")
            .expect("writes never fail: no reset");
        let got = &mut echoed[..len];
        tokio::time::timeout(WAIT, stream.read_exact(got))
            .await
            .expect("an echo in time")
            .unwrap_or_else(|e| panic!("client {client}, round {round}: {e} (an EOF or a reset)"));
        assert_eq!(got, &chunk[..], "client {client}, round {round}: the echo differs");
        total += len as u64;
        round += 1;
        rounds.send_replace(round);
    }
    total
}

/// Waits until the client behind `rounds` has gone round once more than it had now.
async fn progresses(rounds: &mut watch::Receiver<u64>) {
    let now = *rounds.borrow_and_update();
    tokio::time::timeout(WAIT, rounds.wait_for(|r| *r > now))
        .await
        .expect("the client goes on being echoed")
        .expect("the client runs");
}

/// Four TCP streams, echoing all the while, go through ten upgrades: each stays the same
/// connection (no EOF, no reconnect), every byte comes back exactly once and in order, and
/// each old process reports all four migrated, none drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_streams_stay_byte_exact_through_ten_upgrades() {
    const CLIENTS: usize = 4;
    let server = Server::start(&example("tcp_echo"), &["--listen", "127.0.0.1:0", "--migrate"]);
    let address = server.address("echo");
    let (stop_tx, stop) = watch::channel(false);
    let mut clients = Vec::new();
    let mut progress = Vec::new();
    for client in 0..CLIENTS {
        let stream = TcpStream::connect(address).await.unwrap();
        let local = stream.local_addr().unwrap();
        let (rounds_tx, rounds) = watch::channel(0);
        clients.push((local, tokio::spawn(ping_pong(stream, client, rounds_tx, stop.clone()))));
        progress.push(rounds);
    }
    for rounds in &mut progress {
        progresses(rounds).await;
    }
    for _ in 0..10 {
        let old = server.pid();
        let new = tokio::task::block_in_place(|| server.upgrade_and_settle());
        let drained = drained_line(&server, old);
        assert!(
            drained.contains(&format!("connections={CLIENTS} forced=0 aborted=0 migrated={CLIENTS} ")),
            "{drained}"
        );
        for rounds in &mut progress {
            progresses(rounds).await;
        }
        assert_eq!(server.pid(), new);
        let migrated_in = &server.control("status")["migrated_in"];
        assert_eq!(
            (&migrated_in["connections"], &migrated_in["refused"]),
            (&serde_json::json!(CLIENTS), &serde_json::json!(0)),
            "{migrated_in}"
        );
    }
    stop_tx.send_replace(true);
    for (local, client) in clients {
        let total = client.await.unwrap();
        assert!(total > 0, "client on {local} went round");
    }
}

/// Writes to `stream` without reading until the kernel takes no more: the server, which
/// echoes, is then blocked writing to us, away from any safe point. Returns what was sent.
///
/// A write that would block only means the buffers are full for now; the server is blocked
/// once they stay full (the server has stopped reading because its echo cannot be sent). The
/// buffers between us hold up to the kernel's autotuning maxima (several MiB each way).
async fn fill(stream: &TcpStream) -> Vec<u8> {
    const STAYS_FULL: Duration = Duration::from_secs(1);
    let mut sent = Vec::new();
    let chunk: Vec<u8> = (0..8192).map(|i| (i % 253) as u8).collect();
    // Bounded: 64 MiB, far more than the buffers on both sides hold.
    while sent.len() < 64 << 20 {
        match stream.try_write(&chunk) {
            Ok(n) => sent.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if tokio::time::timeout(STAYS_FULL, stream.writable()).await.is_err() {
                    return sent;
                }
            }
            Err(e) => panic!("filling: {e}"),
        }
    }
    panic!("the server never stopped reading");
}

/// The successor is killed after it took some connections, while another is still on its
/// way (its task is held before its safe point): the one not acknowledged comes back to the
/// old process and is drained (an exact prefix of its bytes echoed, then EOF), the migrated ones end with the
/// successor (EOF), none is reset, none is left open, and the old process counts each one
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_killed_mid_migration_leaves_every_connection_migrated_or_drained() {
    const IDLE: usize = 5;
    let server = Server::start(
        &example("tcp_echo"),
        &["--listen", "127.0.0.1:0", "--migrate", "--drain-timeout", "60"],
    );
    let address = server.address("echo");
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut answer = [0; 4];
        tokio::time::timeout(WAIT, stream.read_exact(&mut answer))
            .await
            .unwrap()
            .unwrap();
        idle.push(stream);
    }
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    let mut held = socket.connect(address).await.unwrap();
    let sent = fill(&held).await;

    let old = server.pid();
    let reply = server.upgrade();
    assert_eq!(reply["ok"], true, "{reply}");
    let successor = reply["successor_pid"].as_u64().unwrap() as u32;
    // The idle ones may arrive in one batch or several (whichever reached its safe point
    // first): wait until the successor has all of them.
    let received = || {
        let total = logged_connections(&server.log(), "migrated connections received");
        (total >= IDLE).then_some(total)
    };
    let total = common::poll_until(WAIT, received, || {
        format!("not every idle connection reached the successor:\n{}", server.log())
    });
    assert_eq!(
        total, IDLE,
        "only the idle ones move; the held one is away from its safe point"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(successor as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    server.wait_for_log(|l| l.contains("successor exited while this process drains"));

    // The migrated connections died with the successor: a clean EOF.
    for mut stream in idle {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
        assert_eq!(read.expect("closed, not left open").expect("no reset"), 0);
    }
    // The held one comes back to the old process, which echoes the rest and drains it.
    let mut echoed = Vec::new();
    let read = tokio::time::timeout(WAIT, held.read_to_end(&mut echoed)).await;
    read.expect("closed, not left open").expect("no reset");
    // Drained as without migration: an exact prefix of its bytes back, then EOF.
    assert!(
        !echoed.is_empty() && sent.starts_with(&echoed),
        "the held connection got {} bytes back, not a prefix of the {} it sent",
        echoed.len(),
        sent.len()
    );
    drop(held);

    let drained = drained_line(&server, old);
    assert!(
        drained.contains(&format!("connections={} forced=0 aborted=0 migrated={IDLE} ", IDLE + 1)),
        "{drained}"
    );
    let returned = server.wait_for_log(|l| l.contains("connection not migrated; draining it"));
    assert!(
        returned.contains("the successor did not take the connection"),
        "{returned}"
    );
    server.wait_for_exit(old, Duration::from_secs(20));
}

/// An accepted connection (this test's, as a predecessor's) and its client.
async fn accepted(listener: &tokio::net::TcpListener) -> (TcpStream, TcpStream) {
    let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    (listener.accept().await.unwrap().0, client)
}

/// What the predecessor would send for `stream`, with `state`.
fn entry(stream: &TcpStream, state: serde_json::Value) -> ConnectionEntry {
    ConnectionEntry {
        listener: "echo".into(),
        protocol: Protocol::RawTcp,
        local: stream.local_addr().unwrap(),
        peer: stream.peer_addr().unwrap(),
        state: State(state),
        leftover: Vec::new(),
    }
}

/// The test plays the predecessor of a real `tcp_echo --migrate` and migrates three
/// connections to it: one whose state is not what tcp_echo keeps, one whose state is over
/// the limit, one sound. The successor refuses the first two, each with a reason naming the
/// connection and what was wrong, takes the third (which it then echoes), and serves on; the
/// refused connections are still whole in the predecessor's hands, to drain.
#[tokio::test]
async fn a_successor_refuses_a_malformed_or_oversized_state_and_keeps_serving() {
    let args = ["--listen", "127.0.0.1:0", "--migrate", "--upgrade-timeout", "5"];
    let (server, mut channel) = fake_predecessor::handover(&example("tcp_echo"), &args, 2).await;
    assert_eq!(channel.recv("ready").await.unwrap().message.kind(), "ready");
    let commit = Message::Commit {
        counters: None,
        elders: Vec::new(),
    };
    channel.send(&commit, &[]).await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (malformed, mut malformed_client) = accepted(&listener).await;
    let (oversized, mut oversized_client) = accepted(&listener).await;
    let (sound, mut sound_client) = accepted(&listener).await;
    let too_large = "x".repeat(handover::migration::MAX_STATE_BYTES + 1);
    let batch = Message::Migrate {
        index: 0,
        connections: vec![
            entry(&malformed, serde_json::json!("not what tcp_echo keeps")),
            entry(&oversized, serde_json::json!({ "echoed": 0, "padding": too_large })),
            entry(&sound, serde_json::json!({ "echoed": 7 })),
        ],
    };
    let fds = [malformed.as_fd(), oversized.as_fd(), sound.as_fd()];
    channel.send(&batch, &fds).await.unwrap();
    let answer = tokio::time::timeout(WAIT, channel.recv("migrated"))
        .await
        .unwrap()
        .unwrap();
    let Message::Migrated { index: 0, refused } = answer.message else {
        panic!("{:?}", answer.message)
    };
    let reasons: Vec<(usize, &str)> = refused.iter().map(|r| (r.position, r.reason.as_str())).collect();
    let [(0, malformed_reason), (1, oversized_reason)] = reasons[..] else {
        panic!("refused: {reasons:?}")
    };
    let named = format!(
        "raw TCP connection of `echo` ({} from {})",
        malformed.local_addr().unwrap(),
        malformed.peer_addr().unwrap()
    );
    assert!(malformed_reason.contains(&named), "{malformed_reason}");
    assert!(
        malformed_reason.contains("a state this process cannot read"),
        "{malformed_reason}"
    );
    assert!(
        oversized_reason.contains(&format!("more than {}", handover::migration::MAX_STATE_BYTES)),
        "{oversized_reason}"
    );

    // The sound one is the successor's now: it echoes.
    drop(sound);
    sound_client.write_all(b"moved").await.unwrap();
    let mut echoed = [0; 5];
    tokio::time::timeout(WAIT, sound_client.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"moved");
    // The refused ones are still ours, whole: drained here, each sees a clean EOF.
    for (stream, client) in [(malformed, &mut malformed_client), (oversized, &mut oversized_client)] {
        client.write_all(b"still ours").await.unwrap();
        let mut stream = stream;
        let mut got = [0; 10];
        tokio::time::timeout(WAIT, stream.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"still ours");
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, client.read_to_end(&mut rest)).await.unwrap();
        assert_eq!(read.expect("no reset"), 0);
    }
    let migrated_in = &server.control("status")["migrated_in"];
    assert_eq!(
        *migrated_in,
        serde_json::json!({"batches": 1, "connections": 1, "refused": 2})
    );
    // And the successor serves new clients too.
    let mut fresh = TcpStream::connect(server.address("echo")).await.unwrap();
    fresh.write_all(b"new").await.unwrap();
    let mut got = [0; 3];
    tokio::time::timeout(WAIT, fresh.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"new");
}

/// Sends `signal` to process `pid`.
fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

/// `count` echo clients of `address`, each echoed once (so each is established and served).
async fn echo_clients(address: std::net::SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut answer = [0; 4];
        tokio::time::timeout(WAIT, stream.read_exact(&mut answer))
            .await
            .expect("an echo in time")
            .unwrap();
        clients.push(stream);
    }
    clients
}

/// Whether each client is still echoed (a round trip on the same connection), in parallel;
/// fails naming how many saw a reset, an EOF, or nothing.
async fn every_client_still_echoes(clients: Vec<TcpStream>) {
    let rounds = clients.into_iter().map(|mut stream| async move {
        let round = async {
            stream.write_all(b"still here").await?;
            let mut answer = [0; 10];
            stream.read_exact(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        match tokio::time::timeout(WAIT, round).await {
            Ok(Ok(answer)) if &answer == b"still here" => "echoed",
            Ok(Ok(_)) => "bytes out of place",
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => "EOF",
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
            Ok(Err(_)) => "another error",
            Err(_) => "no answer",
        }
    });
    let outcomes = futures_util::future::join_all(rounds).await;
    let mut counts = std::collections::BTreeMap::new();
    for outcome in &outcomes {
        *counts.entry(*outcome).or_insert(0) += 1;
    }
    assert_eq!(
        counts.get("echoed"),
        Some(&outcomes.len()),
        "every client is still echoed on its connection: {counts:?}"
    );
}

/// The `connections=N` of every log line containing `marker`, added up: how many connections
/// the old process has sent (its `migration batch sent` lines, logged at debug), or the
/// successor has received (`migrated connections received`).
fn logged_connections(log: &str, marker: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| {
            l.split("connections=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum()
}

/// `tcp_echo --migrate` with `args`, debug logs from the migration engine, and `CLIENTS`
/// echo clients; the upgrade is triggered and the successor stopped (SIGSTOP) at once, so
/// that from then on nothing it is sent is acknowledged. Returns the server, the clients,
/// the old pid and the successor's.
async fn clients_migrating_to_a_stopped_successor(args: &[&str]) -> (Server, Vec<TcpStream>, u32, u32) {
    // As many as the channel's buffer holds while the successor reads nothing, even one
    // connection per batch (about 270 of those fill it here): the test is about what was
    // sent, not about a full buffer.
    const CLIENTS: usize = 100;
    let mut all = vec!["--listen", "127.0.0.1:0", "--migrate"];
    all.extend_from_slice(args);
    let server = Server::start_with(&example("tcp_echo"), &all, |command| {
        command.env("RUST_LOG", "info,handover::migration=debug");
    });
    // The old process is not the first generation, the one this test started: its exit
    // changes nothing of the group's ties (the server runs in a session of its own, so no
    // exit sends the stopped successor SIGHUP), and a later generation is the usual case.
    tokio::task::block_in_place(|| server.upgrade_and_settle());
    let clients = echo_clients(server.address("echo"), CLIENTS).await;
    let old = server.pid();
    let reply = server.upgrade();
    assert_eq!(reply["ok"], true, "{reply}");
    let successor = reply["successor_pid"].as_u64().unwrap() as u32;
    signal(successor, nix::sys::signal::Signal::SIGSTOP);
    (server, clients, old, successor)
}

/// The old process is SIGKILLed while a hundred echo connections are on their way to a
/// successor that has not acknowledged them (it is stopped until then): every connection
/// handed over is in the successor's hands, and the old process's copies closed with it, so
/// the successor's acknowledgements fail and it keeps the connections, as their only owner.
/// No client sees a reset or an EOF: each is still echoed on its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_predecessor_killed_mid_migration_leaves_every_connection_with_the_successor() {
    let (server, clients, old, successor) = clients_migrating_to_a_stopped_successor(&["--drain-timeout", "60"]).await;
    let count = clients.len();
    // Every connection is on its way: the old process does not wait for one batch's
    // acknowledgement to send the next.
    common::poll_until(
        WAIT,
        || (logged_connections(&server.log(), "migration batch sent") >= count).then_some(()),
        || format!("not every connection was sent to the successor:\n{}", server.log()),
    );
    signal(old, nix::sys::signal::Signal::SIGKILL);
    server.wait_for_exit(old, WAIT);
    signal(successor, nix::sys::signal::Signal::SIGCONT);
    server.wait_for_log(|l| l.contains("predecessor exited") && l.contains(&format!("predecessor_pid=Some({old})")));
    every_client_still_echoes(clients).await;
    let migrated_in = &server.control("status")["migrated_in"];
    assert_eq!(migrated_in["connections"], serde_json::json!(count), "{migrated_in}");
}

/// The old process's drain deadline (1 s) comes long before the successor acknowledges
/// anything (it is stopped until the old process has exited): the tasks waiting in
/// `migrate()` return at the deadline, the old process exits without reading an
/// acknowledgement, and the successor keeps what it alone holds. No client sees a reset or
/// an EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_predecessor_past_its_drain_deadline_mid_migration_leaves_every_connection_with_the_successor() {
    let (server, clients, old, successor) = clients_migrating_to_a_stopped_successor(&["--drain-timeout", "1"]).await;
    server.wait_for_exit(old, WAIT);
    signal(successor, nix::sys::signal::Signal::SIGCONT);
    server.wait_for_log(|l| l.contains("predecessor exited") && l.contains(&format!("predecessor_pid=Some({old})")));
    every_client_still_echoes(clients).await;
    let drained = drained_line(&server, old);
    assert!(
        drained.contains("aborted=0 "),
        "the tasks returned by the deadline: {drained}"
    );
}
