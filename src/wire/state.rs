//! The application's state stream: its descriptor crosses the channel after the sockets
//! (a [`Message::State`]), and is checked on arrival like every other descriptor.

use std::os::fd::{BorrowedFd, OwnedFd};

use socket2::{Domain, SockRef, Type};

use super::{Channel, Message, WireError};

/// Sends our end's peer, `stream`: a connected Unix stream socket.
pub async fn send_state(channel: &Channel, stream: BorrowedFd<'_>) -> Result<(), WireError> {
    channel.send(&Message::State, &[stream]).await
}

/// Receives the state stream announced by the predecessor's `Hello`, and checks that it is a
/// Unix stream socket.
pub async fn recv_state(channel: &mut Channel) -> Result<OwnedFd, WireError> {
    let received = channel.recv("state").await?;
    if received.message != Message::State {
        return Err(WireError::Unexpected {
            expected: "state",
            got: received.message.kind(),
        });
    }
    let fds = received.fds.len();
    let Ok([fd]) = <[OwnedFd; 1]>::try_from(received.fds) else {
        return Err(WireError::FdCountMismatch {
            batch: 0,
            entries: 1,
            fds,
        });
    };
    let socket = SockRef::from(&fd);
    let kind = (socket.domain()?, socket.r#type()?);
    if kind != (Domain::UNIX, Type::STREAM) {
        return Err(WireError::SocketMismatch {
            socket: "the state stream".into(),
            problem: format!("expected a Unix stream socket, got {kind:?}"),
        });
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::wire::pair;

    fn channels() -> (Channel, Channel) {
        let (a, b) = pair().unwrap();
        (Channel::new(a).unwrap(), Channel::new(b).unwrap())
    }

    #[tokio::test]
    async fn a_unix_stream_crosses_and_anything_else_is_refused() {
        let (sender, mut receiver) = channels();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        send_state(&sender, theirs.as_fd()).await.unwrap();
        let received = std::os::unix::net::UnixStream::from(recv_state(&mut receiver).await.unwrap());
        std::io::Write::write_all(&mut &ours, b"state").unwrap();
        let mut got = [0; 5];
        std::io::Read::read_exact(&mut &received, &mut got).unwrap();
        assert_eq!(&got, b"state");

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        send_state(&sender, udp.as_fd()).await.unwrap();
        let error = recv_state(&mut receiver).await.unwrap_err();
        assert!(error.to_string().contains("expected a Unix stream socket"), "{error}");

        sender.send(&Message::State, &[]).await.unwrap();
        let error = recv_state(&mut receiver).await.unwrap_err();
        assert!(matches!(error, WireError::FdCountMismatch { fds: 0, .. }), "{error}");
    }
}
