//! Faults an operator or the system inflicts on a running chain of generations: the control
//! socket's file unlinked, a trigger sent right after an upgrade, the old process killed
//! while its successor starts. Each must leave a process that serves and upgrades.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::{Duration, Instant};

use common::{example, is_running, Server, WAIT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).unwrap();
}

/// Waits until the PID file names a pid other than `not`, looking every 100 µs (a rename
/// wakes no one; the deadline bounds the wait), and returns it.
fn wait_for_pid_file_other_than(server: &Server, not: u32) -> u32 {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(pid) = std::fs::read_to_string(server.pid_file())
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|pid| *pid != not)
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "the PID file still names {not} after {WAIT:?}; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The control socket's file unlinked (tmpfiles cleaning /run, a deploy script): the next
/// upgrade, triggered with SIGUSR2 on the PID file's pid, succeeds; the successor binds the
/// control socket at the path anew (mode 0600), answers `status` there, and hands it on.
/// A path taken by something else is left alone, and still blocks no upgrade.
#[test]
fn an_unlinked_control_socket_file_blocks_no_upgrade() {
    let server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0"]);
    let old = server.first_pid();
    std::fs::remove_file(server.control_path()).unwrap();
    signal(server.pid_in_file().unwrap(), Signal::SIGUSR2);
    let outcome = server.wait_for_log(|l| l.contains("upgrade committed") || l.contains("upgrade failed"));
    assert!(outcome.contains("upgrade committed"), "{outcome}");
    let successor = wait_for_pid_file_other_than(&server, old);
    let status = server.control("status");
    assert_eq!(status["pid"], successor, "{status}");
    assert_eq!(status["state"], "ready", "{status}");
    let metadata = std::fs::symlink_metadata(server.control_path()).unwrap();
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
    // The new socket is the one handed on: the next generation adopts it and answers there.
    server.wait_for_exit(old, WAIT);
    let third = server.upgrade_and_settle();
    assert_eq!(server.pid(), third);

    // A regular file now where the control socket was: not ours to replace. The upgrade
    // goes through; the successor serves without a control socket, and says why.
    std::fs::remove_file(server.control_path()).unwrap();
    std::fs::write(server.control_path(), "not a socket").unwrap();
    signal(third, Signal::SIGUSR2);
    let outcome = server.wait_for_nth_log(2, |l| l.contains("upgrade committed") || l.contains("upgrade failed"));
    assert!(outcome.contains("upgrade committed"), "{outcome}");
    let fourth = wait_for_pid_file_other_than(&server, third);
    server.wait_for_log(|l| l.contains("control socket") && l.contains("not a socket"));
    assert_eq!(std::fs::read_to_string(server.control_path()).unwrap(), "not a socket");
    assert!(is_running(fourth));
}
