//! What a hostile or broken peer can send, and what we do with it: every case ends in a typed
//! error, with no panic and no leaked descriptor.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use handoff::wire::{self, Channel, Message, SocketEntry, SocketKind, WireError};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};

/// Our receiving end as a `Channel`, and the raw other end, to send what no `Channel` would.
fn hostile_pair() -> (OwnedFd, Channel) {
    let (ours, theirs) = wire::pair().unwrap();
    (theirs, Channel::new(ours).unwrap())
}

/// Sends `bytes` with `fds` attached, as a peer ignoring every limit of ours would.
fn send_raw(peer: &OwnedFd, bytes: &[u8], fds: &[RawFd]) -> nix::Result<usize> {
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<UnixAddr>(peer.as_raw_fd(), &[IoSlice::new(bytes)], cmsgs, MsgFlags::empty(), None)
}

/// How many descriptors of this process refer to the file at `path`. Other tests of this
/// binary run alongside and open descriptors of their own; only this file's count is ours.
fn open_descriptors_of(path: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target == path)
        .count()
}

fn batch_of(names: &[&str]) -> Vec<u8> {
    let sockets = names
        .iter()
        .map(|name| SocketEntry {
            name: (*name).into(),
            kind: SocketKind::TcpListener {
                address: "127.0.0.1:1".parse().unwrap(),
            },
        })
        .collect();
    Message::Batch { index: 0, sockets }.encode().unwrap()
}

#[tokio::test]
async fn more_descriptors_than_the_buffer_holds_are_all_closed_and_reported_truncated() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let (peer, mut channel) = hostile_pair();
    // 250 copies of one descriptor: the kernel takes up to 253, our buffer holds about 200.
    let fds = [file.as_file().as_raw_fd(); 250];
    send_raw(&peer, &batch_of(&["http"]), &fds).unwrap();
    let err = channel.recv_or_eof().await.unwrap_err();
    assert!(matches!(err, WireError::Truncated { what: "descriptors" }), "{err}");
    assert_eq!(
        open_descriptors_of(file.path()),
        1,
        "only our own descriptor is left open"
    );
}

#[tokio::test]
async fn extra_descriptors_in_a_batch_are_refused_and_closed() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let (peer, mut channel) = hostile_pair();
    let manifest = Message::Manifest {
        generation: 2,
        sockets: 1,
        batches: 1,
    };
    send_raw(&peer, &manifest.encode().unwrap(), &[]).unwrap();
    send_raw(&peer, &batch_of(&["http"]), &[file.as_file().as_raw_fd(); 3]).unwrap();
    let err = wire::recv_sockets(&mut channel).await.unwrap_err();
    assert!(
        matches!(
            err,
            WireError::FdCountMismatch {
                batch: 0,
                entries: 1,
                fds: 3
            }
        ),
        "{err}"
    );
    assert_eq!(open_descriptors_of(file.path()), 1);
}

#[tokio::test]
async fn fewer_descriptors_than_entries_are_refused_and_closed() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let (peer, mut channel) = hostile_pair();
    let manifest = Message::Manifest {
        generation: 2,
        sockets: 3,
        batches: 1,
    };
    send_raw(&peer, &manifest.encode().unwrap(), &[]).unwrap();
    send_raw(&peer, &batch_of(&["a", "b", "c"]), &[file.as_file().as_raw_fd(); 2]).unwrap();
    let err = wire::recv_sockets(&mut channel).await.unwrap_err();
    assert!(
        matches!(err, WireError::FdCountMismatch { entries: 3, fds: 2, .. }),
        "{err}"
    );
    assert_eq!(open_descriptors_of(file.path()), 1);
}
