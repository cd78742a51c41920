//! A WebSocket's hand-over: [`accept`] one that can move, [`stop_reading`] and [`migrate`]
//! it at the turn, [`resume`] it in the successor.

use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures_util::{SinkExt, Stream};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::frames::Stuck;
use super::migrating_io::{MigratingIo, MigratingWebSocket};
use crate::drain::connection::TrackedConnection;
use crate::migration::{Handover, MigrationError, Protocol, Resumed, Returned};

/// Accepts a WebSocket client on `stream` (the opening handshake), as
/// `tokio_tungstenite::accept_async_with_config` does, as a [`MigratingWebSocket`].
///
/// # Errors
///
/// The handshake's, as tungstenite reports it.
///
/// # Cancel safety
///
/// Not cancel safe: cancelled, the handshake is lost with the stream.
pub async fn accept(stream: TcpStream, config: Option<WebSocketConfig>) -> Result<MigratingWebSocket, WsError> {
    let mut ws = tokio_tungstenite::accept_async_with_config(MigratingIo::new(stream, false), config).await?;
    // tungstenite refuses bytes after the request (a client waits for our answer before it
    // sends frames): nothing is buffered, the frames start here.
    ws.get_mut().tracking = true;
    Ok(ws)
}

/// Rebuilds a migrated WebSocket as a server endpoint, without a handshake, from its stream
/// and the bytes its predecessor had read but not delivered; returns it with its state.
///
/// # Cancel safety
///
/// Not cancel safe (it never waits, though).
pub async fn resume<S>(resumed: Resumed<S>, config: Option<WebSocketConfig>) -> (MigratingWebSocket, S) {
    let Resumed {
        stream,
        state,
        leftover,
    } = resumed;
    let mut io = MigratingIo::new(stream, true);
    // These bytes are read already, as far as tungstenite is concerned: follow them too.
    io.frames.observe(&leftover);
    let ws = WebSocketStream::from_partially_read(io, leftover, Role::Server, config).await;
    (ws, state)
}

/// Stops reading from the socket and returns what the WebSocket yields from the bytes it has
/// already read: every complete message it buffered, in order (a Close or an error ends
/// them). It answers the Pings among them, to be flushed with the next write or flush.
///
/// Call it when a migration starts, to handle those messages while this process still can
/// (broadcast them to its room, say), and before the state that depends on them is handed
/// over; [`migrate`] does it too, and hands what is left to its `deliver`.
/// [`MigratingIo::resume_reading`] undoes it.
pub fn stop_reading(ws: &mut MigratingWebSocket) -> Vec<Result<Message, WsError>> {
    ws.get_mut().reading = false;
    buffered(ws)
}

/// Everything `ws` yields without waiting. Never registers a wakeup: the caller does not wait.
fn buffered(ws: &mut MigratingWebSocket) -> Vec<Result<Message, WsError>> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut messages = Vec::new();
    while let Poll::Ready(Some(message)) = Pin::new(&mut *ws).poll_next(&mut cx) {
        let end = !matches!(message, Ok(ref m) if !m.is_close());
        messages.push(message);
        if end {
            break;
        }
    }
    messages
}

/// Hands the WebSocket to the successor as a connection of `listener` with `state`: stops
/// reading ([`stop_reading`]) and hands each message already read to `deliver`, flushes
/// every write (under the drain deadline), and migrates the stream with the bytes read but
/// not delivered ([`TrackedConnection::migrate`]). Returns once the successor has it; the
/// successor resumes it with [`resume`].
///
/// # Errors
///
/// The WebSocket back, reading again, in a [`Returned`]: the client closed or the
/// WebSocket failed (among the messages read, or on the flush), the deadline came, the
/// unfinished message is too large or compressed, or the migration failed
/// ([`MigrationError`]). Drain it with
/// [`finish`](super::finish).
///
/// # Cancel safety
///
/// Not cancel safe: cancelled once the stream is on its way, the WebSocket is closed.
///
/// The migration's state is allocated when this is called, not carried in the task of every
/// idle connection that may one day migrate.
pub fn migrate<'a, T, F>(
    ws: MigratingWebSocket,
    listener: &'a str,
    state: &'a T,
    connection: &'a TrackedConnection,
    deliver: F,
) -> impl Future<Output = Result<(), Box<Returned<MigratingWebSocket>>>> + 'a
where
    T: Serialize + ?Sized,
    F: FnMut(Message) + 'a,
{
    Box::pin(hand_over(ws, listener, state, connection, deliver))
}

async fn hand_over<T: Serialize + ?Sized>(
    mut ws: MigratingWebSocket,
    listener: &str,
    state: &T,
    connection: &TrackedConnection,
    mut deliver: impl FnMut(Message),
) -> Result<(), Box<Returned<MigratingWebSocket>>> {
    for message in stop_reading(&mut ws) {
        match message {
            Ok(message) if !message.is_close() => deliver(message),
            _ => return Err(returned(ws, MigrationError::Closed)),
        }
    }
    match connection.until_deadline(ws.flush()).await {
        Some(Ok(())) => {}
        Some(Err(error)) => return Err(returned(ws, MigrationError::Flush(error.into()))),
        None => return Err(returned(ws, MigrationError::Deadline)),
    }
    let (copy, leftover) = match handover(&ws) {
        Ok(parts) => parts,
        Err(error) => return Err(returned(ws, error)),
    };
    let handover = Handover {
        listener,
        protocol: Protocol::WebSocket,
        state,
        leftover: &leftover,
    };
    // On success `ws` is dropped: one of our two descriptors closes, which neither ends nor
    // resets the connection the successor now serves.
    connection
        .migrate_duplicate(copy, handover)
        .await
        .map_err(|error| returned(ws, error))
}

/// A second descriptor of the stream (the WebSocket stays whole should the migration fail)
/// and the bytes read but not delivered.
fn handover(ws: &MigratingWebSocket) -> Result<(OwnedFd, Vec<u8>), MigrationError> {
    let io = ws.get_ref();
    let leftover = io.frames.leftover().map_err(Stuck::into_error)?.to_vec();
    let copy = io.stream.as_fd().try_clone_to_owned().map_err(MigrationError::Io)?;
    Ok((copy, leftover))
}

fn returned(mut ws: MigratingWebSocket, error: MigrationError) -> Box<Returned<MigratingWebSocket>> {
    ws.get_mut().resume_reading();
    Box::new(Returned { stream: ws, error })
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

    use super::super::frames::tests::frame;
    use super::*;

    /// A small read buffer, so that frames straddle tungstenite's reads.
    fn config() -> Option<WebSocketConfig> {
        Some(WebSocketConfig::default().read_buffer_size(1024))
    }

    /// A server endpoint and the client's raw TCP stream, after the opening handshake.
    async fn pair() -> (MigratingWebSocket, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let client = async {
            let tcp = TcpStream::connect(address).await.unwrap();
            let (ws, _) = tokio_tungstenite::client_async(format!("ws://{address}/"), tcp)
                .await
                .unwrap();
            ws.into_inner()
        };
        let server = async { accept(listener.accept().await.unwrap().0, config()).await.unwrap() };
        let (server, client) = tokio::join!(server, client);
        (server, client)
    }

    /// Waits until the server's socket holds at least `bytes` unread bytes.
    async fn arrived(ws: &MigratingWebSocket, bytes: usize) {
        let mut peek = vec![0; bytes];
        let wait = async {
            while ws.get_ref().stream.peek(&mut peek).await.unwrap() < bytes {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), wait)
            .await
            .expect("the bytes arrive");
    }

    /// The texts of `messages`.
    fn texts(messages: Vec<Result<Message, WsError>>) -> Vec<String> {
        messages
            .into_iter()
            .map(|m| m.unwrap().into_text().unwrap().to_string())
            .collect()
    }

    /// What a migration does to `ws`, in one process: stop reading, flush, take the stream
    /// and the leftover, rebuild. Returns the messages stop_reading yielded and the rebuilt
    /// endpoint.
    async fn migrate_locally(mut ws: MigratingWebSocket) -> (Vec<Result<Message, WsError>>, MigratingWebSocket) {
        let delivered = stop_reading(&mut ws);
        ws.flush().await.unwrap();
        let leftover = ws.get_ref().frames.leftover().unwrap().to_vec();
        let stream = ws.into_inner().stream;
        let resumed = Resumed {
            stream,
            state: (),
            leftover,
        };
        (delivered, resume(resumed, config()).await.0)
    }

    async fn next_text(ws: &mut MigratingWebSocket) -> String {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await;
        next.expect("a message in time")
            .unwrap()
            .unwrap()
            .into_text()
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn buffered_messages_are_delivered_before_and_a_partial_frame_after() {
        let (mut ws, mut client) = pair().await;
        let fourth = frame(true, 1, b"four");
        let bytes = [
            frame(true, 1, b"one"),
            frame(true, 1, b"two"),
            frame(true, 1, b"three"),
            fourth[..5].to_vec(),
        ]
        .concat();
        client.write_all(&bytes).await.unwrap();
        arrived(&ws, bytes.len()).await;
        assert_eq!(next_text(&mut ws).await, "one");
        let (delivered, mut ws) = migrate_locally(ws).await;
        assert_eq!(texts(delivered), ["two", "three"]);
        client
            .write_all(&[&fourth[5..], &frame(true, 1, b"five")[..]].concat())
            .await
            .unwrap();
        assert_eq!(next_text(&mut ws).await, "four");
        assert_eq!(next_text(&mut ws).await, "five");
    }

    #[tokio::test]
    async fn a_fragmented_message_with_a_ping_between_fragments_moves_and_is_answered_once() {
        let (mut ws, mut client) = pair().await;
        let bytes = [
            frame(false, 1, b"hel"),
            frame(true, 9, b"ping!"),
            frame(false, 0, b"lo "),
        ]
        .concat();
        client.write_all(&bytes).await.unwrap();
        arrived(&ws, bytes.len()).await;
        // tungstenite hands the Ping out, and queues its Pong.
        let ping = ws.next().await.unwrap().unwrap();
        assert_eq!(ping, Message::Ping("ping!".into()));
        let (delivered, mut ws) = migrate_locally(ws).await;
        assert!(delivered.is_empty(), "{delivered:?}");
        client.write_all(&frame(true, 0, b"room")).await.unwrap();
        assert_eq!(next_text(&mut ws).await, "hello room");
        // One Pong (unmasked, from a server), and only one: then our echo of a text.
        ws.send(Message::text("end")).await.unwrap();
        let expected = [&[0x8a, 5][..], b"ping!", &[0x81, 3], b"end"].concat();
        let mut got = vec![0; expected.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn a_big_frame_split_across_reads_moves_with_what_was_read() {
        let (mut ws, mut client) = pair().await;
        let payload: Vec<u8> = (0..60_000).map(|i| (i % 251) as u8).collect();
        let big = frame(true, 2, &payload);
        let bytes = [&frame(true, 1, b"before")[..], &big[..50_000]].concat();
        client.write_all(&bytes).await.unwrap();
        arrived(&ws, bytes.len()).await;
        assert_eq!(next_text(&mut ws).await, "before");
        // Everything in the socket is read now (in reads of 1 KiB): the frame is partial.
        let pending = buffered(&mut ws);
        assert!(pending.is_empty(), "{pending:?}");
        assert!(ws.get_ref().frames.leftover().unwrap().len() >= 49_000);
        let (delivered, mut ws) = migrate_locally(ws).await;
        assert!(delivered.is_empty());
        client.write_all(&big[50_000..]).await.unwrap();
        let next = ws.next().await.unwrap().unwrap();
        assert_eq!(next, Message::binary(payload));
    }

    #[tokio::test]
    async fn a_client_sending_through_the_turn_loses_nothing_and_repeats_nothing() {
        let (mut ws, client) = pair().await;
        let lines: Vec<String> = (0..2000)
            .map(|n| format!("line {n:04} {}", "x".repeat(n % 300)))
            .collect();
        // The client sends all the while, in writes that split frames anywhere.
        let bytes: Vec<u8> = lines.iter().flat_map(|l| frame(true, 1, l.as_bytes())).collect();
        let sender = tokio::spawn(async move {
            let mut client = client;
            for piece in bytes.chunks(777) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let mut got = Vec::new();
        while got.len() < 300 {
            got.push(next_text(&mut ws).await);
        }
        let (delivered, mut ws) = migrate_locally(ws).await;
        got.extend(texts(delivered));
        while got.len() < lines.len() {
            got.push(next_text(&mut ws).await);
        }
        assert_eq!(got, lines);
        drop(sender.await.unwrap());
    }

    #[tokio::test]
    async fn a_ping_read_at_the_turn_is_answered_once_before_the_move() {
        let (mut ws, mut client) = pair().await;
        let bytes = [
            frame(true, 1, b"one"),
            frame(true, 9, b"still?"),
            frame(true, 1, b"two"),
        ]
        .concat();
        client.write_all(&bytes).await.unwrap();
        arrived(&ws, bytes.len()).await;
        assert_eq!(next_text(&mut ws).await, "one");
        let (delivered, mut ws) = migrate_locally(ws).await;
        let delivered: Vec<Message> = delivered.into_iter().map(Result::unwrap).collect();
        assert_eq!(delivered, [Message::Ping("still?".into()), Message::text("two")]);
        ws.send(Message::text("end")).await.unwrap();
        let expected = [&[0x8a, 6][..], b"still?", &[0x81, 3], b"end"].concat();
        let mut got = vec![0; expected.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn a_websocket_that_does_not_move_comes_back_whole_and_its_copy_is_closed() {
        let (mut ws, mut client) = pair().await;
        client.write_all(&frame(true, 1, b"before")).await.unwrap();
        assert_eq!(next_text(&mut ws).await, "before");
        // A drain that takes no migrations: the second descriptor is made, then refused.
        let drain = crate::drain::tracker::Drain::builder().build();
        let connection = drain.track();
        let returned = migrate(ws, "ws", &(), &connection, |_| {}).await.unwrap_err();
        assert!(matches!(returned.error, MigrationError::NotMigrating));
        // It reads again.
        let mut ws = returned.stream;
        client.write_all(&frame(true, 1, b"after")).await.unwrap();
        assert_eq!(next_text(&mut ws).await, "after");
        // Dropped, it was the last descriptor: the client sees the end (no copy held it open).
        drop(ws);
        let mut end = [0; 1];
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), client.read(&mut end)).await;
        assert_eq!(read.expect("the end in time").unwrap(), 0);
    }

    #[tokio::test]
    async fn a_close_among_the_buffered_messages_ends_them() {
        let (mut ws, mut client) = pair().await;
        let bytes = [frame(true, 1, b"last words"), frame(true, 8, &[0x03, 0xe8])].concat();
        client.write_all(&bytes).await.unwrap();
        arrived(&ws, bytes.len()).await;
        assert_eq!(next_text(&mut ws).await, "last words");
        // Read with the text: the Close is buffered, and handed out.
        let delivered = stop_reading(&mut ws);
        assert_eq!(delivered.len(), 1, "{delivered:?}");
        assert!(delivered[0].as_ref().unwrap().is_close());
        // Handled, the Close still keeps the WebSocket from moving.
        assert_eq!(
            handover(&ws).unwrap_err().to_string(),
            MigrationError::Closed.to_string()
        );
    }
}
