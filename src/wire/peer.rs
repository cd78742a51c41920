//! Who is on the other end of the channel. Only a process of our own user may receive our
//! sockets, and on the predecessor's side only the very process it spawned.

use nix::sys::socket::UnixCredentials;
use nix::unistd::Uid;

use super::{Channel, Received, WireError};

/// Checks that the peer runs as our effective user (`SO_PEERCRED`).
///
/// # Errors
///
/// [`WireError::Peer`] naming the peer's pid and both uids; [`WireError::Io`] if the kernel
/// cannot tell.
pub fn check_same_user(channel: &Channel) -> Result<UnixCredentials, WireError> {
    same_user(channel.peer_credentials()?, Uid::effective().as_raw())
}

/// Checks the kernel-verified credentials attached to a message (`SCM_CREDENTIALS`): sent by
/// `pid`, as our user. Needs [`Channel::receive_credentials`] on the receiving end.
///
/// # Errors
///
/// [`WireError::Peer`] if the message carries no credentials, or another pid's or user's.
pub fn check_sender(received: &Received, pid: u32) -> Result<(), WireError> {
    sent_by(received.sender, pid, Uid::effective().as_raw())
}

fn same_user(peer: UnixCredentials, ours: u32) -> Result<UnixCredentials, WireError> {
    if peer.uid() != ours {
        return Err(WireError::Peer(format!(
            "peer pid {} runs as uid {}, we run as uid {ours}",
            peer.pid(),
            peer.uid()
        )));
    }
    Ok(peer)
}

fn sent_by(sender: Option<UnixCredentials>, pid: u32, ours: u32) -> Result<(), WireError> {
    let Some(sender) = sender else {
        return Err(WireError::Peer("message carries no credentials".into()));
    };
    // Compared as i64: a pid above i32::MAX from a caller never wraps into a match.
    if i64::from(sender.pid()) != i64::from(pid) || sender.uid() != ours {
        return Err(WireError::Peer(format!(
            "message from pid {} uid {}, expected our child pid {pid} uid {ours}",
            sender.pid(),
            sender.uid()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(pid: i32, uid: u32) -> UnixCredentials {
        UnixCredentials::from(libc::ucred { pid, uid, gid: uid })
    }

    #[test]
    fn a_peer_of_another_user_is_refused_with_both_uids() {
        let err = same_user(credentials(77, 1001), 1000).unwrap_err();
        assert!(matches!(err, WireError::Peer(_)));
        assert_eq!(
            err.to_string(),
            "refusing handoff peer: peer pid 77 runs as uid 1001, we run as uid 1000"
        );
        assert_eq!(same_user(credentials(77, 1000), 1000).unwrap().pid(), 77);
    }

    #[test]
    fn root_is_not_our_user_either() {
        assert!(matches!(same_user(credentials(1, 0), 1000), Err(WireError::Peer(_))));
    }

    #[test]
    fn a_sender_must_be_our_child_as_our_user() {
        sent_by(Some(credentials(42, 1000)), 42, 1000).unwrap();
        let foreign_uid = sent_by(Some(credentials(42, 0)), 42, 1000).unwrap_err();
        assert_eq!(
            foreign_uid.to_string(),
            "refusing handoff peer: message from pid 42 uid 0, expected our child pid 42 uid 1000"
        );
        assert!(matches!(
            sent_by(Some(credentials(43, 1000)), 42, 1000),
            Err(WireError::Peer(_))
        ));
        assert!(matches!(sent_by(None, 42, 1000), Err(WireError::Peer(_))));
        // A pid that does not fit an i32 matches no sender, rather than wrapping into one.
        let wrapped = u32::MAX; // as i32 this is -1
        assert!(matches!(
            sent_by(Some(credentials(-1, 1000)), wrapped, 1000),
            Err(WireError::Peer(_))
        ));
    }
}
