//! Faults an operator or the system inflicts on a running chain of generations: the control
//! socket's file unlinked, a trigger sent right after an upgrade, the old process killed
//! while its successor starts. Each must leave a process that serves and upgrades.

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{example, is_running, poll_until, Server, WAIT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).unwrap();
}

/// Waits (at most [`WAIT`]) until process `pid` has exited, through a pidfd: readable the
/// moment it exits (a zombie counts), child of ours or not. Returns at once if it is gone.
fn wait_for_exit_event(pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ESRCH));
        return; // gone already
    }
    // SAFETY: pidfd_open just returned this new descriptor; nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut exited = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd we own; the descriptor is open.
    let ready = unsafe { libc::poll(&mut exited, 1, WAIT.as_millis() as i32) };
    assert_eq!(ready, 1, "process {pid} still runs after {WAIT:?}");
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

/// Whether a log line tells what became of a trigger: refused, or an upgrade under way.
fn is_trigger_outcome(line: &str) -> bool {
    line.contains("upgrade refused") || line.contains("upgrade triggered")
}

/// An operator's `kill -USR2 $(cat pidfile)` right after an upgrade, with room for two
/// generations only: sent the moment the PID file names the new process, it is never refused
/// as "not ready" (the file goes in place with the state's change to ready), and refused as
/// "still draining" only while the old process still runs; sent the moment the old process
/// has exited, it is never refused as "still draining" (the trigger looks at the channel's
/// EOF itself). Over many upgrades, so that the narrow windows are met.
#[test]
fn a_trigger_right_after_an_upgrade_is_refused_only_for_a_live_predecessor() {
    const UPGRADES: usize = 30;
    let server = Server::start(
        &example("http_uuid"),
        &["--listen", "127.0.0.1:0", "--max-generations", "2"],
    );
    let mut serving = server.first_pid();
    let mut predecessor: Option<u32> = None;
    let mut outcomes = 0;
    let (mut at_once, mut after_exit) = (0, 0);
    while at_once + after_exit < UPGRADES {
        // The moment the PID file names the serving process (the first one's is in place).
        let predecessor_ran = predecessor.is_some_and(is_running);
        signal(serving, Signal::SIGUSR2);
        outcomes += 1;
        let outcome = server.wait_for_nth_log(outcomes, is_trigger_outcome);
        if outcome.contains("upgrade refused") {
            assert!(
                outcome.contains("still draining") && predecessor_ran,
                "a trigger sent as the PID file named {serving} (predecessor {predecessor:?} running: \
                 {predecessor_ran}): {outcome}\nlog:\n{}",
                server.log()
            );
            // The moment the old process has exited.
            wait_for_exit_event(predecessor.unwrap());
            signal(serving, Signal::SIGUSR2);
            outcomes += 1;
            let outcome = server.wait_for_nth_log(outcomes, is_trigger_outcome);
            assert!(
                outcome.contains("upgrade triggered"),
                "a trigger sent once predecessor {predecessor:?} had exited: {outcome}\nlog:\n{}",
                server.log()
            );
            after_exit += 1;
        } else {
            at_once += 1;
        }
        predecessor = Some(serving);
        serving = wait_for_pid_file_other_than(&server, serving);
    }
    eprintln!("{at_once} triggers went through at once, {after_exit} once the predecessor had exited");
}

/// The old process SIGKILLed after it sent its sockets, before its commit, while its
/// successor is still to start: the orphaned successor adopts what is on the channel (its
/// creator is the pid that started it, and is gone) and serves on the same address, the
/// same control socket; nothing fails to bind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_successor_adopts_the_sockets_in_flight_and_serves() {
    let bin = tempfile::tempdir().unwrap();
    let binary = common::copy_binary(&example("http_uuid"), bin.path());
    let original = bin.path().join("original");
    std::fs::hard_link(&binary, &original).unwrap();
    let mut server = Server::start(&binary, &["--listen", "127.0.0.1:0"]);
    let old = server.first_pid();
    let address = server.address("http");
    // The successor waits at a gate (a FIFO) before it runs the real server, its channel
    // open: the test opens the gate once its predecessor is dead.
    let gate = bin.path().join("gate");
    nix::unistd::mkfifo(&gate, nix::sys::stat::Mode::S_IRWXU).unwrap();
    common::replace_with_script(
        &binary,
        &format!("read go < '{}'\nexec '{}' \"$@\"", gate.display(), original.display()),
    );
    signal(old, Signal::SIGUSR2);
    // The predecessor waits for the successor's hello: every socket is on the channel.
    poll_until(
        WAIT,
        || (server.control("status")["upgrade_phase"] == "hello").then_some(()),
        || format!("the upgrade never reached the hello; log:\n{}", server.log()),
    );
    signal(old, Signal::SIGKILL);
    server.wait_for_first_exit();
    let mut gate = poll_until(
        WAIT,
        || {
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&gate)
                .ok() // ENXIO until the successor's shell opens it to read
        },
        || format!("the successor never reached its gate; log:\n{}", server.log()),
    );
    gate.write_all(b"go\n").unwrap();
    drop(gate);

    server.wait_for_log(|l| l.contains(" ready ") && l.contains("generation=2"));
    let reply = tokio::time::timeout(WAIT, common::get(address, "/uuid"))
        .await
        .expect("an answer on the old address")
        .unwrap();
    assert_eq!(reply.status, 200);
    let successor = server.pid();
    assert_ne!(successor, old);
    assert_eq!(server.pid_in_file(), Some(successor));
    let log = server.log();
    assert!(
        !log.contains("ddress already in use") && !log.contains("AddrInUse"),
        "{log}"
    );
    assert!(Path::new(&server.control_path()).exists());
}
