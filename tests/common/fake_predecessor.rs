//! The test as a predecessor: it starts a real example as its successor, over a channel of
//! its own, and speaks the wire protocol to it (through `handover::wire`, public to the tests).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;

use handover::wire::{self, Channel, Message, PROTOCOL_VERSION};

use super::Server;

/// Starts `binary` with `HANDOFF_FD` set to `value` and `fd` (if any) placed at descriptor
/// `at` without close-on-exec, as an inheritance (or a stray one) leaves it.
pub fn spawn_with_channel(binary: &Path, args: &[&str], value: &str, fd: Option<(OwnedFd, i32)>) -> Server {
    let value = value.to_owned();
    Server::spawn_with(binary, args, move |command| {
        command.env(handover::wire::CHANNEL_FD_VAR, value);
        if let Some((fd, at)) = fd {
            let raw = fd.as_raw_fd();
            // SAFETY: dup2 is async-signal-safe; `fd` stays open in the parent until the
            // command is dropped, so it is open in the child.
            unsafe {
                command.pre_exec(move || {
                    let _keep = &fd;
                    if libc::dup2(raw, at) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    })
}

/// Starts `binary` as the successor numbered `generation` of this test, hands it no socket,
/// and reads its replies up to `accepted`: the next message it sends is its `ready`.
pub async fn handover(binary: &Path, args: &[&str], generation: u64) -> (Server, Channel) {
    let (ours, theirs) = wire::pair().unwrap();
    let server = spawn_with_channel(binary, args, "42", Some((theirs, 42)));
    let mut channel = Channel::new(ours).unwrap();
    let hello = Message::Hello {
        protocol: PROTOCOL_VERSION,
        pid: std::process::id(),
        generation: Some(generation),
        state: false,
    };
    channel.send(&hello, &[]).await.unwrap();
    wire::send_sockets(&channel, generation - 1, &[]).await.unwrap();
    for expected in ["hello", "accepted"] {
        assert_eq!(channel.recv(expected).await.unwrap().message.kind(), expected);
    }
    (server, channel)
}
