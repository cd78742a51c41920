//! Moving a set of sockets across the channel: the manifest, then batches of descriptors.

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::{verify, Channel, Message, SocketEntry, WireError, MAX_FDS_PER_MESSAGE};

/// Sends `sockets` (listeners should come first) as a manifest and its batches.
pub async fn send_sockets(
    channel: &Channel,
    generation: u64,
    sockets: &[(SocketEntry, BorrowedFd<'_>)],
) -> Result<(), WireError> {
    let batches = sockets.chunks(MAX_FDS_PER_MESSAGE);
    let manifest = Message::Manifest {
        generation,
        sockets: sockets.len(),
        batches: batches.len(),
    };
    channel.send(&manifest, &[]).await?;
    for (index, batch) in batches.enumerate() {
        let entries = batch.iter().map(|(entry, _)| entry.clone()).collect();
        let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|(_, fd)| *fd).collect();
        channel
            .send(
                &Message::Batch {
                    index,
                    sockets: entries,
                },
                &fds,
            )
            .await?;
    }
    Ok(())
}

/// Receives a manifest and its batches, and checks every descriptor against its entry.
///
/// On any error, every descriptor received so far is closed (dropped) before returning: a
/// refused handoff leaves nothing open in this process.
pub async fn recv_sockets(channel: &mut Channel) -> Result<(u64, Vec<(SocketEntry, OwnedFd)>), WireError> {
    let (generation, announced, batches) = match channel.recv("manifest").await?.message {
        Message::Manifest {
            generation,
            sockets,
            batches,
        } => (generation, sockets, batches),
        other => {
            return Err(WireError::Unexpected {
                expected: "manifest",
                got: other.kind(),
            })
        }
    };
    check_counts(announced, batches)?;
    let mut received: Vec<(SocketEntry, OwnedFd)> = Vec::with_capacity(announced.min(65_536));
    for index in 0..batches {
        let batch = channel.recv("batch").await?;
        let entries = match batch.message {
            Message::Batch { index: got, sockets } if got == index => sockets,
            other => {
                return Err(WireError::Unexpected {
                    expected: "batch",
                    got: other.kind(),
                })
            }
        };
        if entries.len() != batch.fds.len() {
            return Err(WireError::FdCountMismatch {
                batch: index,
                entries: entries.len(),
                fds: batch.fds.len(),
            });
        }
        for (entry, fd) in entries.into_iter().zip(batch.fds) {
            verify(&entry, fd.as_fd())?;
            received.push((entry, fd));
        }
    }
    if received.len() != announced {
        return Err(WireError::IncompleteManifest {
            announced,
            batches,
            received: received.len(),
        });
    }
    check_unique(&received)?;
    Ok((generation, received))
}

/// Every name at most once, since the successor claims its sockets by name. Checked once all
/// have arrived, on borrowed names: copying each name into a set as it arrived cost about 9 %
/// of a thousand sockets' reception.
fn check_unique(received: &[(SocketEntry, OwnedFd)]) -> Result<(), WireError> {
    let mut names = HashSet::with_capacity(received.len());
    match received.iter().find(|(entry, _)| !names.insert(entry.name.as_str())) {
        Some((entry, _)) => Err(WireError::DuplicateName(entry.name.clone())),
        None => Ok(()),
    }
}

/// A manifest's counts must be possible: no empty batch, and no batch with more descriptors
/// than one message carries. So a hostile peer cannot announce batches without end.
fn check_counts(sockets: usize, batches: usize) -> Result<(), WireError> {
    let room = batches.saturating_mul(MAX_FDS_PER_MESSAGE);
    if batches > sockets || sockets > room {
        return Err(WireError::InconsistentManifest { sockets, batches });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{pair, SocketKind};
    use std::net::TcpListener;

    fn channels() -> (Channel, Channel) {
        let (a, b) = pair().unwrap();
        (Channel::new(a).unwrap(), Channel::new(b).unwrap())
    }

    fn listeners(n: usize) -> Vec<(SocketEntry, TcpListener)> {
        (0..n)
            .map(|i| {
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let address = listener.local_addr().unwrap();
                (
                    SocketEntry {
                        name: format!("l{i}"),
                        kind: SocketKind::TcpListener { address },
                    },
                    listener,
                )
            })
            .collect()
    }

    fn borrowed(sockets: &[(SocketEntry, TcpListener)]) -> Vec<(SocketEntry, BorrowedFd<'_>)> {
        sockets.iter().map(|(e, l)| (e.clone(), l.as_fd())).collect()
    }

    #[tokio::test]
    async fn three_hundred_listeners_cross_in_two_batches() {
        let (sender, mut receiver) = channels();
        let sockets = listeners(300);
        let batch = borrowed(&sockets);
        let (sent, got) = tokio::join!(send_sockets(&sender, 4, &batch), recv_sockets(&mut receiver));
        sent.unwrap();
        let (generation, got) = got.unwrap();
        assert_eq!(generation, 4);
        assert_eq!(got.len(), 300);
        for ((want, _), (entry, fd)) in sockets.iter().zip(&got) {
            assert_eq!(want, entry);
            verify(entry, fd).unwrap();
        }
    }

    #[tokio::test]
    async fn a_pipe_declared_as_a_listener_is_rejected_and_closed() {
        let (sender, mut receiver) = channels();
        let (read, write) = nix::unistd::pipe().unwrap();
        let entry = SocketEntry {
            name: "http".into(),
            kind: SocketKind::TcpListener {
                address: "127.0.0.1:1".parse().unwrap(),
            },
        };
        let batch = [(entry, read.as_fd())];
        let (sent, got) = tokio::join!(send_sockets(&sender, 2, &batch), recv_sockets(&mut receiver));
        sent.unwrap();
        let err = got.unwrap_err();
        assert!(
            err.to_string().contains("`http`") && err.to_string().ends_with("got a pipe"),
            "{err}"
        );
        // The receiver closed its copy: once ours is closed too, no reader is left.
        drop(batch);
        drop(read);
        assert_eq!(nix::unistd::write(&write, b"x"), Err(nix::errno::Errno::EPIPE));
    }

    #[tokio::test]
    async fn a_batch_with_a_missing_descriptor_is_an_error() {
        let (sender, mut receiver) = channels();
        let sockets = listeners(2);
        let entries: Vec<_> = sockets.iter().map(|(e, _)| e.clone()).collect();
        sender
            .send(
                &Message::Manifest {
                    generation: 2,
                    sockets: 2,
                    batches: 1,
                },
                &[],
            )
            .await
            .unwrap();
        sender
            .send(
                &Message::Batch {
                    index: 0,
                    sockets: entries,
                },
                &[sockets[0].1.as_fd()],
            )
            .await
            .unwrap();
        let err = recv_sockets(&mut receiver).await.unwrap_err();
        assert!(
            matches!(
                err,
                WireError::FdCountMismatch {
                    batch: 0,
                    entries: 2,
                    fds: 1
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_manifest_cut_short_by_the_peer_is_an_error() {
        let (sender, mut receiver) = channels();
        sender
            .send(
                &Message::Manifest {
                    generation: 2,
                    sockets: 400,
                    batches: 2,
                },
                &[],
            )
            .await
            .unwrap();
        drop(sender);
        let err = recv_sockets(&mut receiver).await.unwrap_err();
        assert!(matches!(err, WireError::Closed { expected: "batch" }), "{err}");
    }

    #[tokio::test]
    async fn two_sockets_under_one_name_are_refused_and_closed() {
        let (sender, mut receiver) = channels();
        let mut sockets = listeners(3);
        sockets[2].0.name = sockets[0].0.name.clone();
        let batch = borrowed(&sockets);
        let (sent, got) = tokio::join!(send_sockets(&sender, 2, &batch), recv_sockets(&mut receiver));
        sent.unwrap();
        let err = got.unwrap_err();
        assert!(matches!(&err, WireError::DuplicateName(name) if name == "l0"), "{err}");
        // Nothing received stays open here: each listener is held by its sender alone.
        for (_, listener) in &sockets {
            let inode = nix::sys::stat::fstat(listener).unwrap().st_ino;
            let held = std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|fd| nix::sys::stat::stat(&fd.unwrap().path()).ok())
                .filter(|stat| stat.st_ino == inode)
                .count();
            assert_eq!(held, 1, "a received copy of a listener is still open");
        }
    }

    #[test]
    fn impossible_counts_are_refused_before_any_batch() {
        check_counts(0, 0).unwrap();
        check_counts(1, 1).unwrap();
        check_counts(1000, 5).unwrap();
        check_counts(1000, 1000).unwrap();
        for (sockets, batches) in [(0, 1), (1, 0), (201, 1), (5, 6), (usize::MAX, 1), (1, usize::MAX)] {
            assert!(
                matches!(
                    check_counts(sockets, batches),
                    Err(WireError::InconsistentManifest { .. })
                ),
                "{sockets} in {batches}"
            );
        }
    }

    #[tokio::test]
    async fn a_manifest_that_miscounts_is_an_error() {
        let (sender, mut receiver) = channels();
        let sockets = listeners(1);
        sender
            .send(
                &Message::Manifest {
                    generation: 2,
                    sockets: 2,
                    batches: 1,
                },
                &[],
            )
            .await
            .unwrap();
        let entries = vec![sockets[0].0.clone()];
        sender
            .send(
                &Message::Batch {
                    index: 0,
                    sockets: entries,
                },
                &[sockets[0].1.as_fd()],
            )
            .await
            .unwrap();
        let err = recv_sockets(&mut receiver).await.unwrap_err();
        assert!(
            matches!(
                err,
                WireError::IncompleteManifest {
                    announced: 2,
                    received: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn received_descriptors_are_close_on_exec() {
        let (sender, mut receiver) = channels();
        let sockets = listeners(1);
        let batch = borrowed(&sockets);
        let (sent, got) = tokio::join!(send_sockets(&sender, 2, &batch), recv_sockets(&mut receiver));
        sent.unwrap();
        let (_, got) = got.unwrap();
        let flags = nix::fcntl::fcntl(&got[0].1, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & nix::fcntl::FdFlag::FD_CLOEXEC.bits(), 0);
    }
}
