//! Who is on the other end of the channel. Only a process of our own user may receive our
//! sockets, and on the predecessor's side only the very process it spawned.

use nix::sys::socket::UnixCredentials;
use nix::unistd::Uid;

use super::{Channel, Received, WireError};

/// Checks that the peer runs as our effective user (`SO_PEERCRED`).
pub fn check_same_user(channel: &Channel) -> Result<UnixCredentials, WireError> {
    let peer = channel.peer_credentials()?;
    let ours = Uid::effective().as_raw();
    if peer.uid() != ours {
        return Err(WireError::Peer(format!(
            "peer pid {} runs as uid {}, we run as uid {ours}",
            peer.pid(),
            peer.uid()
        )));
    }
    Ok(peer)
}

/// Checks the kernel-verified credentials attached to a message (`SCM_CREDENTIALS`): sent by
/// `pid`, as our user. Needs [`Channel::receive_credentials`] on the receiving end.
pub fn check_sender(received: &Received, pid: u32) -> Result<(), WireError> {
    let Some(sender) = received.sender else {
        return Err(WireError::Peer("message carries no credentials".into()));
    };
    let ours = Uid::effective().as_raw();
    if sender.pid() != pid as i32 || sender.uid() != ours {
        return Err(WireError::Peer(format!(
            "message from pid {} uid {}, expected our child pid {pid} uid {ours}",
            sender.pid(),
            sender.uid()
        )));
    }
    Ok(())
}
