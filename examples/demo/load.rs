//! The clients: each loops until `stop` is set, counting what it sees. Every loop is bounded
//! by the demo's overall time limit (the caller sets `stop`), and backs off briefly after an
//! error so that a broken server cannot turn it into a busy loop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use crate::stats::Counters;

const BACKOFF: Duration = Duration::from_millis(20);
/// The longest a client waits for any one answer before counting it as lost.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn http_connect(address: SocketAddr) -> Result<Sender, Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(address).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One GET /uuid; `Ok(true)` when the server said `Connection: close`.
async fn http_get(sender: &mut Sender, stats: &Counters) -> Result<bool, ()> {
    let asked = Instant::now();
    let result = async {
        sender.ready().await?;
        let response = sender
            .send_request(hyper::Request::get("/uuid").body(Empty::new()).expect("valid request"))
            .await?;
        let status = response.status();
        let close = response.headers().get("connection").is_some_and(|v| v == "close");
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, close, body))
    };
    let failure = match tokio::time::timeout(ANSWER_TIMEOUT, result).await {
        Ok(Ok((status, close, body))) if status.is_success() && body.len() == 36 => {
            stats.answered(asked);
            return Ok(close);
        }
        Ok(Ok((status, ..))) if status.is_server_error() => &stats.server_error,
        Ok(Ok(_)) => &stats.corrupted,
        Ok(Err(error)) => {
            stats.http_error(&error);
            return Err(());
        }
        Err(_) => &stats.other,
    };
    Counters::add(failure);
    Err(())
}

/// HTTP/1.1 with a new connection for every request.
pub async fn http_new_connections(address: SocketAddr, stats: Arc<Counters>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match http_connect(address).await {
            Ok(mut sender) => {
                if http_get(&mut sender, &stats).await.is_err() {
                    tokio::time::sleep(BACKOFF).await;
                }
            }
            Err(error) => {
                stats.http_error(error.as_ref());
                tokio::time::sleep(BACKOFF).await;
            }
        }
    }
}

/// HTTP/1.1 keep-alive, requests back to back; reconnects after `Connection: close`.
pub async fn http_keep_alive(address: SocketAddr, stats: Arc<Counters>, stop: Arc<AtomicBool>) {
    let mut sender = None;
    while !stop.load(Ordering::Relaxed) {
        let mut current = match sender.take() {
            Some(current) => current,
            None => match http_connect(address).await {
                Ok(fresh) => fresh,
                Err(error) => {
                    stats.http_error(error.as_ref());
                    tokio::time::sleep(BACKOFF).await;
                    continue;
                }
            },
        };
        match http_get(&mut current, &stats).await {
            Ok(false) => sender = Some(current),
            Ok(true) => Counters::add(&stats.reconnects),
            Err(()) => tokio::time::sleep(BACKOFF).await,
        }
    }
}

/// A chat member: sends a message, waits for its own echo through the room, again; rejoins
/// after Close 1001. Checks what the room says: each other member's messages arrive once and
/// in order (a gap is counted as missed, a repeat or a step back as corrupted), and the
/// welcome comes once per connection (a migrated member is not welcomed again).
pub async fn websocket_member(id: usize, address: SocketAddr, stats: Arc<Counters>, stop: Arc<AtomicBool>) {
    let url = format!("ws://{address}/");
    let mut sequence = 0u64;
    let mut heard = Heard::default();
    while !stop.load(Ordering::Relaxed) {
        let mut ws = match tokio_tungstenite::connect_async(&url).await {
            Ok((ws, _)) => ws,
            Err(error) => {
                match error {
                    tokio_tungstenite::tungstenite::Error::Io(io) => stats.io_error(&io),
                    _ => Counters::add(&stats.other),
                }
                tokio::time::sleep(BACKOFF).await;
                continue;
            }
        };
        let mut welcomes = 0;
        'session: while !stop.load(Ordering::Relaxed) {
            sequence += 1;
            let text = format!("member {id} message {sequence}");
            let asked = Instant::now();
            if ws.send(Message::text(text.clone())).await.is_err() {
                Counters::add(&stats.abnormal_close);
                break;
            }
            loop {
                let next = match tokio::time::timeout(ANSWER_TIMEOUT, ws.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        Counters::add(&stats.corrupted); // our message never came back
                        break 'session;
                    }
                };
                match next {
                    Some(Ok(Message::Text(got))) if got.as_str() == text => {
                        stats.answered(asked);
                        break;
                    }
                    Some(Ok(Message::Text(got))) if got.starts_with("welcome") => {
                        welcomes += 1;
                        if welcomes > 1 {
                            Counters::add(&stats.corrupted);
                        }
                    }
                    Some(Ok(Message::Text(got))) => heard.other(&got, &stats),
                    Some(Ok(Message::Close(Some(frame)))) if frame.code == CloseCode::Away => {
                        // Going away: finish the close handshake, then rejoin.
                        while let Ok(Some(Ok(_))) = tokio::time::timeout(ANSWER_TIMEOUT, ws.next()).await {}
                        Counters::add(&stats.reconnects);
                        break 'session;
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        Counters::add(&stats.abnormal_close);
                        break 'session;
                    }
                    Some(Ok(_)) => {}
                }
            }
        }
        if stop.load(Ordering::Relaxed) {
            let _ = ws.close(None).await;
            while let Ok(Some(Ok(_))) = tokio::time::timeout(ANSWER_TIMEOUT, ws.next()).await {}
        }
    }
}

/// The last number heard from each other member.
#[derive(Default)]
struct Heard {
    last: std::collections::HashMap<usize, u64>,
}

impl Heard {
    /// Checks `text` (`member N message S`) against what member N said before. The first
    /// message heard from a member sets where it starts: it may have spoken before we joined.
    fn other(&mut self, text: &str, stats: &Counters) {
        let mut words = text.split(' ');
        let (Some("member"), Some(sender), Some("message"), Some(sequence), None) =
            (words.next(), words.next(), words.next(), words.next(), words.next())
        else {
            return Counters::add(&stats.corrupted);
        };
        let (Ok(sender), Ok(sequence)) = (sender.parse::<usize>(), sequence.parse::<u64>()) else {
            return Counters::add(&stats.corrupted);
        };
        match self.last.insert(sender, sequence) {
            Some(last) if sequence <= last => Counters::add(&stats.corrupted),
            Some(last) => {
                stats.missed.fetch_add(sequence - last - 1, Ordering::Relaxed);
            }
            None => {}
        }
    }
}

/// A TCP echo stream: writes a chunk, reads it back, again. At the server's half-close it
/// checks that what came back is an exact prefix, closes its side, and reconnects.
pub async fn tcp_stream(id: usize, address: SocketAddr, stats: Arc<Counters>, stop: Arc<AtomicBool>) {
    let mut round = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let mut stream = match TcpStream::connect(address).await {
            Ok(stream) => stream,
            Err(error) => {
                stats.io_error(&error);
                tokio::time::sleep(BACKOFF).await;
                continue;
            }
        };
        let mut echoed = vec![0u8; 16 * 1024];
        loop {
            if stop.load(Ordering::Relaxed) {
                finish(stream, &stats, false).await;
                break;
            }
            round += 1;
            let chunk: Vec<u8> = (0..4096 + (round * 977) % 12_288)
                .map(|i| (i * 31 + round + id) as u8)
                .collect();
            let asked = Instant::now();
            if let Err(error) = stream.write_all(&chunk).await {
                stats.io_error(&error);
                break;
            }
            let mut got = 0;
            while got < chunk.len() {
                match tokio::time::timeout(ANSWER_TIMEOUT, stream.read(&mut echoed[got..chunk.len()])).await {
                    Ok(Ok(0)) => break,
                    Ok(Ok(n)) => got += n,
                    Ok(Err(error)) => {
                        stats.io_error(&error);
                        break;
                    }
                    Err(_) => {
                        Counters::add(&stats.other);
                        break;
                    }
                }
            }
            if echoed[..got] != chunk[..got] {
                Counters::add(&stats.corrupted);
                break;
            }
            if got < chunk.len() {
                // The server half-closed: drained. Close our side and reconnect.
                finish(stream, &stats, true).await;
                break;
            }
            stats.answered(asked);
        }
    }
}

/// Closes our side and reads to the server's EOF.
async fn finish(mut stream: TcpStream, stats: &Counters, drained: bool) {
    let _ = stream.shutdown().await;
    let mut rest = [0u8; 4096];
    loop {
        match tokio::time::timeout(ANSWER_TIMEOUT, stream.read(&mut rest)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(_)) if drained => {
                Counters::add(&stats.corrupted); // nothing may follow the half-close
                break;
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                stats.io_error(&error);
                return;
            }
            Err(_) => return Counters::add(&stats.other),
        }
    }
    if drained {
        Counters::add(&stats.reconnects);
    }
}
