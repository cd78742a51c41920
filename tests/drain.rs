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

    let exit = server.wait_for_log(|l| l.contains("exiting") && l.contains(&format!("pid={old} ")));
    assert!(exit.contains("connections=2") && exit.contains("forced=1"), "{exit}");
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
    let exit = server.wait_for_log(|l| l.contains("exiting") && l.contains("generation=1"));
    assert!(exit.contains("forced=0"), "{exit}");
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
