//! axum's WebSocket messages to and from the library's tungstenite ones (axum builds on
//! another tungstenite release, and keeps its own conversions private).

use ::axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use tokio_tungstenite::tungstenite as ts;
use ts::protocol::frame::coding::CloseCode;

/// axum's message, or `None` for a raw frame (which tungstenite hands out only when asked,
/// and axum skips).
pub(super) fn from_tungstenite(message: ts::Message) -> Option<Message> {
    Some(match message {
        ts::Message::Text(text) => Message::Text(Utf8Bytes::from(text.as_str())),
        ts::Message::Binary(data) => Message::Binary(data),
        ts::Message::Ping(data) => Message::Ping(data),
        ts::Message::Pong(data) => Message::Pong(data),
        ts::Message::Close(frame) => Message::Close(frame.map(|frame| CloseFrame {
            code: frame.code.into(),
            reason: Utf8Bytes::from(frame.reason.as_str()),
        })),
        ts::Message::Frame(_) => return None,
    })
}

pub(super) fn to_tungstenite(message: Message) -> ts::Message {
    match message {
        Message::Text(text) => ts::Message::Text(text.as_str().into()),
        Message::Binary(data) => ts::Message::Binary(data),
        Message::Ping(data) => ts::Message::Ping(data),
        Message::Pong(data) => ts::Message::Pong(data),
        Message::Close(frame) => ts::Message::Close(frame.map(|frame| ts::protocol::CloseFrame {
            code: CloseCode::from(frame.code),
            reason: frame.reason.as_str().into(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_comes_back_as_it_went() {
        let messages = [
            Message::text("héllo"),
            Message::binary(vec![0, 1, 255]),
            Message::Ping("p".into()),
            Message::Pong("q".into()),
            Message::Close(None),
            Message::Close(Some(CloseFrame {
                code: 1001,
                reason: "away".into(),
            })),
        ];
        for message in messages {
            assert_eq!(from_tungstenite(to_tungstenite(message.clone())), Some(message));
        }
    }
}
