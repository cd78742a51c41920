//! Draining, per protocol, with real clients across real upgrades.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::{example, Server};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

type Sender = hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>;

async fn keep_alive(address: std::net::SocketAddr) -> Sender {
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// Sends GET `path` on a kept-alive connection; returns (body, whether the server closes it).
async fn send(sender: &mut Sender, path: &str) -> Result<(String, bool), hyper::Error> {
    sender.ready().await?;
    let response = sender
        .send_request(hyper::Request::get(path).body(Empty::new()).unwrap())
        .await?;
    let close = response.headers().get("connection").is_some_and(|v| v == "close");
    let body = response.into_body().collect().await?.to_bytes();
    Ok((String::from_utf8(body.to_vec()).unwrap(), close))
}

/// A keep-alive client in the middle of a slow request gets its full answer with
/// `Connection: close`; its next request, on a new connection, reaches the successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_on_a_kept_alive_connection_completes_with_connection_close() {
    let server = Server::start(
        &example("http_uuid"),
        &["--listen", "127.0.0.1:0", "--delay-ms", "1000"],
    );
    let address = server.address("http");
    let mut client = keep_alive(address).await;
    let (old_uuid, close) = send(&mut client, "/uuid").await.unwrap();
    assert!(!close);
    let slow = tokio::spawn(async move { send(&mut client, "/delayed").await });
    server.wait_for_log(|l| l.contains("delayed request started"));
    assert_eq!(server.upgrade()["ok"], true);
    let (body, close) = slow.await.unwrap().unwrap();
    assert_eq!(body, old_uuid);
    assert!(close, "the response during the drain says Connection: close");
    let (new_uuid, _) = send(&mut keep_alive(address).await, "/uuid").await.unwrap();
    assert_ne!(new_uuid, old_uuid);
}

/// Keep-alive clients sending requests back to back across three upgrades see no error:
/// each connection is closed after a response that says so, and the client reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_keep_alive_clients_see_no_error_across_upgrades() {
    let server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0"]);
    let address = server.address("http");
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (stop, answered) = (stop.clone(), answered.clone());
        clients.spawn(async move {
            let mut uuids = std::collections::HashSet::new();
            let mut client = keep_alive(address).await;
            // Bounded: at most 100,000 requests per client.
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (uuid, close) = send(&mut client, "/uuid").await.expect("no client-visible error");
                answered.fetch_add(1, Ordering::Relaxed);
                uuids.insert(uuid);
                if close {
                    client = keep_alive(address).await;
                }
            }
            uuids.len()
        });
    }
    for _ in 0..3 {
        server.upgrade_and_settle();
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(generations_seen) = clients.join_next().await {
        assert!(generations_seen.unwrap() >= 2, "each client followed the upgrades");
    }
    assert!(answered.load(Ordering::Relaxed) > 0);
}

/// WebSocket members get Close 1001 and rejoin on the successor; a member that never answers
/// the Close is closed at the deadline, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_members_get_going_away_and_rejoin_the_successor() {
    let server = Server::start(
        &example("ws_chat"),
        &["--listen", "127.0.0.1:0", "--drain-timeout", "2"],
    );
    let url = format!("ws://{}/", server.address("ws"));
    let (mut member, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let welcome = member.next().await.unwrap().unwrap().into_text().unwrap();
    assert!(welcome.ends_with("generation=1"), "{welcome}");
    member.send(Message::text("hello room")).await.unwrap();
    assert_eq!(
        member.next().await.unwrap().unwrap().into_text().unwrap().as_str(),
        "hello room"
    );
    // Joins, then never reads again: it cannot answer a Close.
    let (silent, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    server.wait_for_nth_log(1, |l| l.contains("serving ws_chat"));

    let old = server.pid();
    assert_eq!(server.upgrade()["ok"], true);
    match member.next().await.unwrap().unwrap() {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected Close 1001, got {other:?}"),
    }
    // Answering completes the handshake; the server then closes the connection.
    assert!(member
        .next()
        .await
        .is_none_or(|m| m.is_err() || matches!(m, Ok(Message::Close(_)))));

    let (mut rejoined, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let welcome = rejoined.next().await.unwrap().unwrap().into_text().unwrap();
    assert!(welcome.ends_with("generation=2"), "{welcome}");

    let drained = server.drained_line(old);
    assert!(drained.contains("connections=2 forced=1"), "{drained}");
    drop(silent);
}

/// A TCP client that keeps writing during the drain reads an exact prefix of its bytes back,
/// then EOF; neither its reads nor its writes see a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_client_writing_through_the_drain_reads_a_prefix_then_eof() {
    let server = Server::start(&example("tcp_echo"), &["--listen", "127.0.0.1:0"]);
    let stream = tokio::net::TcpStream::connect(server.address("echo")).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let pattern: Vec<u8> = (0..64 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let pattern = Arc::new(pattern);
    let eof = Arc::new(AtomicBool::new(false));
    let writer = {
        let (pattern, eof) = (pattern.clone(), eof.clone());
        tokio::spawn(async move {
            let mut sent = 0;
            // Bounded by the pattern's 64 MiB.
            for chunk in pattern.chunks(8 * 1024) {
                if eof.load(Ordering::Relaxed) {
                    break;
                }
                write.write_all(chunk).await.expect("writes never see a reset");
                sent += chunk.len();
            }
            write.shutdown().await.unwrap();
            sent
        })
    };
    let mut echoed = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    let mut upgraded = false;
    loop {
        let n = read.read(&mut buf).await.expect("reads never see a reset");
        if n == 0 {
            break;
        }
        echoed.extend_from_slice(&buf[..n]);
        if !upgraded && echoed.len() > 256 * 1024 {
            upgraded = true;
            let reply = tokio::task::block_in_place(|| server.upgrade());
            assert_eq!(reply["ok"], true);
        }
    }
    eof.store(true, Ordering::Relaxed);
    let sent = writer.await.unwrap();
    assert!(upgraded, "the drain, not the end of the pattern, ended the echo");
    assert!(echoed.len() <= sent);
    assert!(
        echoed[..] == pattern[..echoed.len()],
        "an exact prefix of the bytes sent"
    );
    let drained = server.wait_for_log(|l| l.contains(" drained ") && l.contains("generation=1"));
    assert!(drained.contains("forced=0"), "{drained}");
}

/// An HTTP/2 client gets GOAWAY: its open stream finishes on the old process, and its next
/// request, on a new connection, reaches the successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_finish_and_the_connection_gets_goaway() {
    let server = Server::start(
        &example("http_uuid"),
        &["--listen", "127.0.0.1:0", "--delay-ms", "1000"],
    );
    let address = server.address("http");
    let h2 = |address| async move {
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let (sender, connection) = hyper::client::conn::http2::handshake::<_, _, Empty<bytes::Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        (sender, tokio::spawn(connection))
    };
    let get = |mut sender: hyper::client::conn::http2::SendRequest<Empty<bytes::Bytes>>, path: &'static str| async move {
        let request = hyper::Request::get(format!("http://{address}{path}"))
            .body(Empty::new())
            .unwrap();
        let response = sender.send_request(request).await?;
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>(String::from_utf8(body.to_vec()).unwrap())
    };
    let (sender, connection) = h2(address).await;
    let old_uuid = get(sender.clone(), "/uuid").await.unwrap();
    let slow = tokio::spawn(get(sender.clone(), "/delayed"));
    server.wait_for_log(|l| l.contains("delayed request started"));
    assert_eq!(server.upgrade()["ok"], true);
    assert_eq!(slow.await.unwrap().unwrap(), old_uuid, "the open stream finishes");
    // GOAWAY, then the close once the last stream is done: the client's connection task ends
    // without an error.
    tokio::time::timeout(common::WAIT, connection)
        .await
        .expect("the connection closes")
        .unwrap()
        .unwrap();
    let (sender, _) = h2(address).await;
    assert_ne!(get(sender, "/uuid").await.unwrap(), old_uuid);
}

/// How long an old process may take to exit once its drain starts, with `--drain-timeout 2`:
/// the deadline, the grace after it, and generous slack for a loaded machine.
const EXIT_BOUND: std::time::Duration = std::time::Duration::from_secs(15);

/// Waits (at most `common::WAIT`) until `written` stops growing: the writer is blocked.
async fn wait_until_stalled(written: &AtomicUsize) {
    let started = std::time::Instant::now();
    let (mut last, mut unchanged) = (0, 0);
    while unchanged < 5 {
        assert!(started.elapsed() < common::WAIT, "the writer never blocked");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = written.load(Ordering::Relaxed);
        unchanged = if now == last && now > 0 { unchanged + 1 } else { 0 };
        last = now;
    }
}

/// One line echoed by `tcp_echo` at `address`: the server serves.
async fn echoes(address: std::net::SocketAddr) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(b"ping\n").await.unwrap();
    let mut answer = [0; 5];
    tokio::time::timeout(common::WAIT, stream.read_exact(&mut answer))
        .await
        .expect("an echo in time")
        .unwrap();
    assert_eq!(&answer, b"ping\n");
}

/// A raw TCP client that sends and never reads blocks the echo's write; it still cannot hold
/// the old process past the deadline: the write is bounded by it, and the library drops
/// what is left. The successor serves meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_client_that_never_reads_cannot_hold_the_old_process_past_the_deadline() {
    let server = Server::start(
        &example("tcp_echo"),
        &["--listen", "127.0.0.1:0", "--drain-timeout", "2"],
    );
    let address = server.address("echo");
    let (_never_read, mut write) = tokio::net::TcpStream::connect(address).await.unwrap().into_split();
    let written = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn({
        let written = written.clone();
        async move {
            let chunk = vec![7u8; 64 * 1024];
            // Bounded: at most 4 GiB; the server stops reading long before.
            for _ in 0..65_536 {
                if write.write_all(&chunk).await.is_err() {
                    break;
                }
                written.fetch_add(chunk.len(), Ordering::Relaxed);
            }
        }
    });
    // Our receive window is full of echoes, the server blocks writing more, stops reading,
    // and our sends fill its receive window.
    wait_until_stalled(&written).await;

    let old = server.pid();
    assert_eq!(server.upgrade()["ok"], true);
    tokio::task::block_in_place(|| server.wait_for_exit(old, EXIT_BOUND));
    echoes(address).await;
    let drained = server.drained_line(old);
    assert!(drained.contains("connections=1 forced=1"), "{drained}");
    writer.abort();
}

/// A WebSocket member that never reads, while another chats (so the server writes to it
/// until its socket is full), cannot hold the old process past the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_member_that_never_reads_cannot_hold_the_old_process_past_the_deadline() {
    let server = Server::start(
        &example("ws_chat"),
        &["--listen", "127.0.0.1:0", "--drain-timeout", "2"],
    );
    let address = server.address("ws");
    let url = format!("ws://{address}/");
    // A small receive buffer: the server's writes to this member block sooner.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = socket.connect(address).await.unwrap();
    let (mut silent, _) = tokio_tungstenite::client_async(&url, stream).await.unwrap();
    let welcome = silent.next().await.unwrap().unwrap().into_text().unwrap();
    assert!(welcome.ends_with("generation=1"), "{welcome}"); // in the room; never reads again

    let (mut chatty, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    chatty.next().await.unwrap().unwrap();
    // More than the server's send buffer can ever hold for the silent member (its limit is
    // the kernel's tcp_wmem maximum), each read back by the chatty member.
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    let line = "x".repeat(64 * 1024);
    for _ in 0..wmem_max / line.len() + 64 {
        chatty.send(Message::text(line.clone())).await.unwrap();
        let echoed = chatty.next().await.unwrap().unwrap().into_text().unwrap();
        assert_eq!(echoed.len(), line.len());
    }

    let old = server.pid();
    assert_eq!(server.upgrade()["ok"], true);
    // The chatty member reads on: it gets Close 1001 and answers it (reading on sends the
    // answer), so only the silent one is left at the deadline.
    let answered = tokio::time::timeout(common::WAIT, async {
        while let Some(Ok(message)) = chatty.next().await {
            if let Message::Close(frame) = message {
                assert_eq!(frame.unwrap().code, CloseCode::Away);
            }
        }
    });
    answered.await.expect("the chatty member's connection ends");
    tokio::task::block_in_place(|| server.wait_for_exit(old, EXIT_BOUND));
    let (mut rejoined, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let welcome = rejoined.next().await.unwrap().unwrap().into_text().unwrap();
    assert!(welcome.ends_with("generation=2"), "{welcome}");
    let drained = server.drained_line(old);
    assert!(
        drained.contains("connections=2") && drained.contains("forced=1"),
        "{drained}"
    );
    drop((silent, chatty));
}

/// A second SIGTERM while draining makes the deadline now: with `--drain-timeout 60` and a
/// client that keeps its side open, the process exits within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_while_draining_ends_the_drain_at_once() {
    use nix::sys::signal::{kill, Signal};
    let server = Server::start(
        &example("tcp_echo"),
        &["--listen", "127.0.0.1:0", "--drain-timeout", "60"],
    );
    let mut client = tokio::net::TcpStream::connect(server.address("echo")).await.unwrap();
    client.write_all(b"hi").await.unwrap();
    let mut answer = [0; 2];
    client.read_exact(&mut answer).await.unwrap();
    let pid = server.pid();
    let process = nix::unistd::Pid::from_raw(pid as i32);

    kill(process, Signal::SIGTERM).unwrap();
    server.wait_for_log(|l| l.contains("draining reason=Stopped"));
    // The server half-closed; we keep our side open, so it waits for us until the deadline.
    let eof = tokio::time::timeout(common::WAIT, client.read(&mut answer)).await;
    assert_eq!(eof.expect("EOF in time").unwrap(), 0);

    kill(process, Signal::SIGTERM).unwrap();
    tokio::task::block_in_place(|| server.wait_for_exit(pid, EXIT_BOUND));
    let drained = server.drained_line(pid);
    assert!(drained.contains("connections=1 forced=1"), "{drained}");
    drop(client);
}

/// Accept loops written out (`Drain::accept` on two listeners, then `drain()`, as its docs
/// show): a second SIGTERM while draining makes the deadline now there too. With
/// `--drain-timeout 60` and a client on each listener that keeps its side open, the drain
/// ends long before its deadline, both clients counted as forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_a_hand_written_two_listener_drain() {
    use nix::sys::signal::{kill, Signal};
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--tcp",
        "2",
        "--hold",
        "--drain-timeout",
        "60",
        "--dir",
        dir.path().to_str().unwrap(),
    ];
    let server = Server::start(&example("many_sockets"), &args);
    let mut clients = Vec::new();
    for name in ["tcp-0", "tcp-1"] {
        let mut client = tokio::net::TcpStream::connect(server.address(name)).await.unwrap();
        let mut greeting = [0; 2];
        client.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"1\n");
        clients.push(client);
    }
    let pid = server.pid();
    let process = nix::unistd::Pid::from_raw(pid as i32);

    kill(process, Signal::SIGTERM).unwrap();
    server.wait_for_log(|l| l.contains("draining reason=Some(Stopped)"));
    kill(process, Signal::SIGTERM).unwrap();
    tokio::task::block_in_place(|| server.wait_for_exit(pid, EXIT_BOUND));
    let drained = server.drained_line(pid);
    assert!(drained.contains("connections=2 forced=2"), "{drained}");
    let drain_ms: u64 = drained.rsplit_once("drain_ms=").unwrap().1.trim().parse().unwrap();
    assert!(drain_ms < 60_000, "the drain ran to its deadline: {drained}");
    drop(clients);
}

/// The accept loops `Drain::accept`'s docs show are the ones the test above runs: every line
/// of the docs' example is in `examples/many_sockets.rs`, but how the drain is configured.
#[test]
fn the_documented_accept_loops_are_the_tested_ones() {
    let docs = include_str!("../src/drain/tracker.rs");
    let fixture: Vec<&str> = include_str!("../examples/many_sockets.rs")
        .lines()
        .map(str::trim)
        .collect();
    let example = docs
        .split("/// Many listeners, one drain, written out")
        .nth(1)
        .and_then(|rest| rest.split("/// ```no_run").nth(1))
        .and_then(|rest| rest.split("/// ```").next())
        .expect("the example in Drain::accept's docs");
    let shown: Vec<&str> = example
        .lines()
        .map(|l| l.trim().trim_start_matches("///").trim())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(shown.first(), Some(&"let drain = Drain::builder().build();"));
    assert!(fixture.contains(&"let drain = args.server.drain();"));
    for line in &shown[1..] {
        assert!(fixture.contains(line), "{line:?}, in the docs, is not in many_sockets");
    }
}
