//! Live migration of HTTP/1.1 keep-alive connections across real upgrades: `http_uuid --migrate`.

mod common;

use std::net::SocketAddr;

use common::{example, Server, WAIT};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTP/1.1 client on one keep-alive connection, reading responses byte by byte off the
/// socket, so that every header and every close is seen as sent.
struct Client {
    stream: TcpStream,
    address: SocketAddr,
}

/// A response as it came.
#[derive(Debug)]
struct Answer {
    head: String,
    body: String,
}

impl Answer {
    fn says_close(&self) -> bool {
        self.head.to_ascii_lowercase().contains("\r\nconnection: close")
    }
}

impl Client {
    async fn connect(address: SocketAddr) -> Self {
        let stream = TcpStream::connect(address).await.unwrap();
        Self { stream, address }
    }

    /// Sends `bytes` as they are: a request, or a part of one.
    async fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .expect("the connection takes a request");
    }

    fn get(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").into_bytes()
    }

    /// The next response, whole.
    async fn answer(&mut self) -> Answer {
        tokio::time::timeout(WAIT, self.read_answer())
            .await
            .expect("an answer in time")
    }

    async fn read_answer(&mut self) -> Answer {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let byte = self
                .stream
                .read_u8()
                .await
                .unwrap_or_else(|e| panic!("the connection ended before a response ({e}); got {head:?}"));
            head.push(byte);
        }
        let head = String::from_utf8(head).unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_owned)
            })
            .expect("a content length")
            .trim()
            .parse()
            .unwrap();
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        Answer {
            head,
            body: String::from_utf8(body).unwrap(),
        }
    }

    /// `GET /uuid` on this connection: the UUID of the process serving it.
    async fn uuid(&mut self) -> String {
        self.send(&Self::get("/uuid")).await;
        let answer = self.answer().await;
        assert!(
            !answer.says_close(),
            "a migrating server keeps the connection: {answer:?}"
        );
        answer.body
    }

    fn local(&self) -> SocketAddr {
        self.stream.local_addr().unwrap()
    }

    /// The UUID of the process serving new connections.
    async fn current_uuid(&self) -> String {
        common::get(self.address, "/uuid").await.unwrap().body
    }
}

/// `http_uuid --migrate` with a keep-alive client that has had one answer (the returned
/// UUID) and has a `/delayed` request (3 s) under way.
async fn delayed_request_in_flight() -> (Server, Client, String) {
    let server = Server::start(
        &example("http_uuid"),
        &["--listen", "127.0.0.1:0", "--migrate", "--delay-ms", "3000"],
    );
    let mut client = Client::connect(server.address("http")).await;
    let old_uuid = client.uuid().await;
    client.send(&Client::get("/delayed")).await;
    server.wait_for_log(|l| l.contains("delayed request started"));
    (server, client, old_uuid)
}

/// The old process `pid` migrated exactly one connection and drained none by force.
fn assert_migrated_one(server: &Server, pid: u32) {
    let drained = server.drained_line(pid);
    assert!(drained.contains("forced=0 aborted=0 migrated=1 "), "{drained}");
}

/// One keep-alive connection through ten upgrades: the same socket (same local port, never
/// closed) answers each time with the UUID of the process now serving, and each old process
/// reports it migrated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_keeps_its_port_through_ten_upgrades_and_sees_each_new_uuid() {
    let server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0", "--migrate"]);
    let mut client = Client::connect(server.address("http")).await;
    let local = client.local();
    let mut seen = vec![client.uuid().await];
    for _ in 0..10 {
        let old = server.pid();
        tokio::task::block_in_place(|| server.upgrade_and_settle());
        assert_migrated_one(&server, old);
        let uuid = client.uuid().await;
        assert!(!seen.contains(&uuid), "{uuid} is a new process's");
        assert_eq!(uuid, client.current_uuid().await, "the successor answers");
        assert_eq!(client.local(), local);
        seen.push(uuid);
    }
}

/// A request in flight across the upgrade is answered by the old process, in full and without
/// `Connection: close`; the next request on that connection is answered by the successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_is_answered_without_close_and_the_next_by_the_successor() {
    let (server, mut client, old_uuid) = delayed_request_in_flight().await;
    let old = server.pid();
    assert_eq!(server.upgrade()["ok"], true);
    let mut peek = [0; 1];
    assert!(
        matches!(client.stream.try_read(&mut peek), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the request is still in flight when the successor has taken over"
    );
    let delayed = client.answer().await;
    assert_eq!(delayed.body, old_uuid, "answered by the process that accepted it");
    assert!(!delayed.says_close(), "{delayed:?}");
    let next = client.uuid().await;
    assert_ne!(next, old_uuid);
    assert_eq!(next, client.current_uuid().await, "the successor answers");
    assert_migrated_one(&server, old);
}

/// The next request, partly sent while one is in flight, moves with the connection (hyper had
/// read it: it travels as the leftover) and is answered by the successor once complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_sent_next_request_is_answered_by_the_successor() {
    let (server, mut client, old_uuid) = delayed_request_in_flight().await;
    let old = server.pid();
    let next = Client::get("/uuid");
    let (first, rest) = next.split_at(next.len() - 2);
    client.send(first).await;
    assert_eq!(server.upgrade()["ok"], true);
    let delayed = client.answer().await;
    assert_eq!(delayed.body, old_uuid);
    assert!(!delayed.says_close(), "{delayed:?}");
    // The old process is gone: the half request is the successor's now.
    server.wait_for_log(|l| l.contains("exiting") && l.contains(&format!("pid={old} ")));
    assert_migrated_one(&server, old);
    client.send(rest).await;
    let answer = client.answer().await;
    assert!(!answer.says_close(), "{answer:?}");
    assert_ne!(answer.body, old_uuid);
    assert_eq!(answer.body, client.current_uuid().await, "the successor answers");
}

/// `POST /echo` with a body of `whole`, of which only `sent` goes now.
fn half_posted(whole: &str, sent: usize) -> Vec<u8> {
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
        whole.len()
    );
    [head.as_bytes(), &whole.as_bytes()[..sent]].concat()
}

/// A request whose body is still arriving at the turn is not between two requests: the old
/// process reads the rest and answers it (the echo of the whole body, without
/// `Connection: close`), then the connection moves and the successor answers the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_is_half_sent_at_the_turn_is_answered_and_the_next_by_the_successor() {
    let server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0", "--migrate"]);
    let mut client = Client::connect(server.address("http")).await;
    let old_uuid = client.uuid().await;
    let old = server.pid();
    client.send(&half_posted("helloworld", 5)).await;
    server.wait_for_log(|l| l.contains("echo request started"));
    assert_eq!(server.upgrade()["ok"], true);
    client.send(b"world").await;
    let echoed = client.answer().await;
    assert_eq!(echoed.body, "helloworld");
    assert!(!echoed.says_close(), "{echoed:?}");
    let next = client.uuid().await;
    assert_ne!(next, old_uuid, "the successor answers the next request");
    assert_migrated_one(&server, old);
}

/// Drained rather than migrated, the same request is answered whole with `Connection: close`,
/// and only then does the connection end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_is_half_sent_at_a_drain_is_answered_with_close() {
    let server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0"]);
    let mut client = Client::connect(server.address("http")).await;
    client.uuid().await;
    client.send(&half_posted("helloworld", 5)).await;
    server.wait_for_log(|l| l.contains("echo request started"));
    assert_eq!(server.upgrade()["ok"], true);
    server.wait_for_log(|l| l.contains("draining"));
    client.send(b"world").await;
    let echoed = client.answer().await;
    assert_eq!(echoed.body, "helloworld");
    assert!(echoed.says_close(), "{echoed:?}");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, client.stream.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "EOF after the answer: {read:?}");
}

/// A service that answers without reading the request's body (`/uuid`): with the body whole
/// in hand, hyper discards it and the connection stays open; with only part of it, hyper
/// closes after the answer, and the answer says so (`Connection: close`), so the client
/// never sends its next request into a closing connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_body_is_read_says_close_exactly_when_the_connection_closes() {
    let server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0", "--migrate"]);
    let unread = |sent| {
        let post = half_posted("helloworld", sent);
        String::from_utf8(post).unwrap().replace("/echo", "/uuid").into_bytes()
    };
    let mut client = Client::connect(server.address("http")).await;
    client.send(&unread(10)).await;
    let whole = client.answer().await;
    assert!(!whole.says_close(), "{whole:?}");
    client.uuid().await;

    client.send(&unread(5)).await;
    let half = client.answer().await;
    assert!(half.says_close(), "{half:?}");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, client.stream.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "EOF after the answer: {read:?}");
}

/// Under `--migrate`, an HTTP/2 connection is still drained: GOAWAY, then the close; the old
/// process migrates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_is_still_drained_with_goaway_under_migrate() {
    let server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0", "--migrate"]);
    let address = server.address("http");
    let stream = TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake::<_, _, Empty<bytes::Bytes>>(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get(format!("http://{address}/uuid"))
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    response.into_body().collect().await.unwrap();
    let old = server.pid();
    assert_eq!(server.upgrade()["ok"], true);
    // GOAWAY, then the close: the client's connection task ends without an error.
    tokio::time::timeout(WAIT, connection)
        .await
        .expect("the connection closes")
        .unwrap()
        .unwrap();
    let drained = server.drained_line(old);
    assert!(
        drained.contains("connections=1 forced=0 aborted=0 migrated=0 "),
        "{drained}"
    );
}

/// A first request partly sent when the upgrade comes moves with its connection, as far as
/// it came: the old process exits at once (not at its drain deadline, 30 s here) having
/// migrated it, and the successor answers the request once complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_sent_first_request_moves_and_is_answered_by_the_successor() {
    let server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0", "--migrate"]);
    let mut client = Client::connect(server.address("http")).await;
    let old_uuid = client.current_uuid().await;
    let old = server.pid();
    let request = Client::get("/uuid");
    let (first, rest) = request.split_at(request.len() - 2);
    client.send(first).await;
    tokio::task::block_in_place(|| server.upgrade_and_settle());
    assert_migrated_one(&server, old);
    client.send(rest).await;
    let answer = client.answer().await;
    assert!(!answer.says_close(), "{answer:?}");
    assert_ne!(answer.body, old_uuid);
    assert_eq!(answer.body, client.current_uuid().await, "the successor answers");
}
