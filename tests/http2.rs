//! HTTP/2 through upgrades: every stream a client sends completes, none is reset or refused,
//! and no connection ends in an error.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{example, Server};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2::SendRequest;

type Sender = SendRequest<Empty<bytes::Bytes>>;

/// What became of the requests: the answers' UUIDs (one per generation that answered), and
/// every failure by kind.
#[derive(Default)]
struct Tally {
    answered: usize,
    uuids: HashSet<String>,
    failures: BTreeMap<String, usize>,
}

impl Tally {
    fn fail(&mut self, kind: String) {
        *self.failures.entry(kind).or_default() += 1;
    }
}

/// hyper's error with its causes (the h2 reason of a reset, the I/O error of a broken
/// connection): the kind of a failure.
fn kind(error: &hyper::Error) -> String {
    let mut kind = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        kind = format!("{kind}: {cause}");
        source = cause.source();
    }
    kind
}

/// Sends GET /uuid on `sender`, as a client with many streams over one connection does.
async fn get(mut sender: Sender, address: SocketAddr, tally: &Mutex<Tally>) {
    let request = hyper::Request::get(format!("http://{address}/uuid"))
        .body(Empty::new())
        .unwrap();
    let answer = async {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    let answer = answer.await;
    let mut tally = tally.lock().unwrap();
    match answer {
        Ok((hyper::StatusCode::OK, uuid)) => {
            tally.answered += 1;
            tally.uuids.insert(uuid);
        }
        Ok((status, _)) => tally.fail(format!("status {status}")),
        Err(error) => tally.fail(kind(&error)),
    }
}

/// One connection at a time from this client, each carrying `streams` concurrent streams
/// that send `per_stream` requests one after another; then the client closes it and opens
/// the next, until `stop`. A request the client has not sent because it saw the GOAWAY
/// first (its sender is closed) is not a failure: it goes on the next connection.
async fn client(
    address: SocketAddr,
    streams: usize,
    per_stream: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) {
    // Bounded: at most 10,000 connections.
    for _ in 0..10_000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let (sender, connection) = hyper::client::conn::http2::handshake::<_, _, Empty<bytes::Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        let connection = tokio::spawn(connection);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..streams {
            let (mut sender, tally) = (sender.clone(), tally.clone());
            tasks.spawn(async move {
                for _ in 0..per_stream {
                    if sender.ready().await.is_err() {
                        return; // closed before this request was sent
                    }
                    get(sender.clone(), address, &tally).await;
                }
            });
        }
        drop(sender);
        while let Some(task) = tasks.join_next().await {
            task.unwrap();
        }
        // All senders dropped: the client closes its connection, which must end cleanly.
        match tokio::time::timeout(common::WAIT, connection).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tally.lock().unwrap().fail(format!("connection: {}", kind(&error))),
            Ok(Err(panicked)) => panic!("{panicked}"),
            Err(_) => tally.lock().unwrap().fail("connection never closed".into()),
        }
    }
}

/// Four clients, each with four streams per connection and a hundred requests a connection,
/// through ten upgrades of `http_uuid`: not one stream is reset or refused, not one
/// connection ends in an error, and every old process drains with nothing forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_http2_streams_through_ten_upgrades_none_reset_or_refused() {
    let server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0"]);
    let address = server.address("http");
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let clients: Vec<_> = (0..4)
        .map(|_| tokio::spawn(client(address, 4, 25, stop.clone(), tally.clone())))
        .collect();
    let generations = |tally: &Mutex<Tally>| tally.lock().unwrap().uuids.len();
    common::wait_until("the first answers", || generations(&tally), |&seen| seen == 1);
    for upgrade in 1..=10 {
        server.upgrade_and_settle();
        // The clients reach the successor before the next upgrade: each one is under load.
        common::wait_until(
            "an answer from the successor",
            || generations(&tally),
            |&seen| seen == upgrade + 1,
        );
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        tokio::time::timeout(common::WAIT, client)
            .await
            .expect("the clients finish")
            .unwrap();
    }
    let tally = tally.lock().unwrap();
    assert!(
        tally.failures.is_empty(),
        "failures by kind: {:#?} ({} answered)",
        tally.failures,
        tally.answered
    );
    for generation in 1..=10 {
        let drained =
            server.wait_for_log(|l| l.contains(" drained ") && l.contains(&format!("generation={generation} ")));
        assert!(drained.contains("forced=0"), "{drained}");
    }
}
