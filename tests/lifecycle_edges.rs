//! The lifecycle at its edges, process by process: a stop racing an upgrade, a timeout racing
//! a successor's ready, signals that reach a successor before it handles them, a stray
//! `HANDOFF_FD`, descriptors and variables that must not reach a successor.

mod common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::{example, fake_predecessor, is_running, Server, WAIT};
use handover::wire::{self, Channel, Message};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).unwrap();
}

/// What must hold once a server has settled, whatever raced: either a process serves, owns
/// the control socket and is named by the PID file, or nothing serves and neither path is
/// left behind. Never a mix.
fn assert_settled_consistently(server: &Server) {
    match handover::control::Client::new(server.control_path()).request("status") {
        Ok(status) => {
            let pid = status["pid"].as_u64().unwrap() as u32;
            assert!(is_running(pid));
            assert_eq!(
                server.pid_in_file(),
                Some(pid),
                "the PID file names the serving process"
            );
        }
        Err(_) => {
            assert!(
                !server.control_path().exists(),
                "nothing serves, yet the control path is left"
            );
            assert_eq!(server.pid_in_file(), None, "nothing serves, yet the PID file is left");
        }
    }
}

/// SIGTERM at varying moments after an upgrade's trigger: either the upgrade is cancelled
/// (the successor killed and reaped, then a normal stop that removes the paths) or it had
/// committed (the old process drains and exits, the successor keeps every path).
#[test]
fn a_stop_racing_an_upgrade_either_cancels_it_or_follows_its_commit() {
    for delay_us in (0..10_000).step_by(250) {
        let mut server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0"]);
        let old = server.first_pid();
        let address = server.address("http");
        let control = server.control_path();
        let upgrade = std::thread::spawn(move || handover::control::Client::new(control).request("upgrade"));
        std::thread::sleep(Duration::from_micros(delay_us)); // the race's spread, not a wait
        signal(old, Signal::SIGTERM);
        let _reply = upgrade.join().unwrap(); // may be cut short by the old process's exit
        server.wait_for_first_exit();
        // The old process's log says which side won (its verdict comes before its last
        // line); its reply may not have made it out.
        server.wait_for_log(|l| l.contains("exiting") && l.contains(&format!("pid={old} ")));
        let log = server.log();
        let successors: Vec<u32> = log
            .lines()
            .filter_map(|l| l.split("successor started successor_pid=").nth(1))
            .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap())
            .collect();
        if log.contains("upgrade committed") {
            let successor = successors[0];
            server.wait_for_log(|l| l.contains(" ready ") && l.contains(&format!("pid={successor} ")));
            assert_eq!(server.pid(), successor, "after {delay_us} µs: the successor serves");
        } else {
            for successor in successors {
                server.wait_for_exit(successor, WAIT);
            }
            // The listener may outlive both processes for a moment: descriptors the old one
            // sent and the killed successor never read are released by the kernel after the
            // successor's exit (a deferred close). Then nothing listens.
            let refused = || std::net::TcpStream::connect(address).is_err().then_some(());
            common::poll_until(WAIT, refused, || format!("after {delay_us} µs: still listening"));
        }
        assert_settled_consistently(&server);
    }
}

/// An upgrade timeout that expires about when the successor gets ready (a few milliseconds
/// here, swept): each attempt either commits or fails, and the PID file always names the
/// process that serves.
#[test]
fn a_timeout_racing_a_successors_ready_never_leaves_the_pid_file_wrong() {
    let (mut committed, mut failed) = (0, 0);
    for timeout in ["0.002", "0.003", "0.004", "0.005", "0.006", "0.008"] {
        let server = Server::start(
            &example("http_uuid"),
            &["--listen", "127.0.0.1:0", "--upgrade-timeout", timeout],
        );
        for _ in 0..4 {
            let before = server.pid();
            let reply = server.upgrade();
            if reply["ok"] == true {
                committed += 1;
                let successor = reply["successor_pid"].as_u64().unwrap() as u32;
                server.wait_for_exit(before, WAIT);
                server.wait_for_log(|l| l.contains(" ready ") && l.contains(&format!("pid={successor} ")));
            } else {
                failed += 1;
                assert_eq!(server.pid(), before, "a failed upgrade leaves the old process serving");
            }
            assert_settled_consistently(&server);
            let leftovers: Vec<_> = std::fs::read_dir(server.dir.path())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
                .collect();
            assert!(leftovers.is_empty(), "temporary PID files left: {leftovers:?}");
        }
    }
    eprintln!("{committed} committed, {failed} failed");
}

/// The signals a successor starts with blocked (its predecessor holds them until it can
/// handle them) are ours, not the application's: no thread of the successor keeps one of
/// them blocked, the runtime's threads started before `Handoff::start` included, so a child
/// the application starts from any thread gets a clean mask.
#[test]
fn no_thread_of_a_successor_keeps_the_signals_held_at_its_start() {
    let server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0"]);
    let successor = server.upgrade_and_settle();
    let ours = [Signal::SIGUSR2, Signal::SIGTERM, Signal::SIGINT]
        .iter()
        .fold(0u64, |mask, s| mask | 1 << (*s as i32 - 1));
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{successor}/task"))
        .unwrap()
        .flatten()
        .map(|task| task.path())
        .collect();
    assert!(tasks.len() > 1, "a runtime with worker threads: {tasks:?}");
    for task in tasks {
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        let blocked = status
            .lines()
            .find_map(|line| line.strip_prefix("SigBlk:"))
            .map(|mask| u64::from_str_radix(mask.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(
            blocked & ours,
            0,
            "thread {} of the successor blocks {blocked:#x}",
            task.display()
        );
    }
}

/// A successor sends itself SIGUSR2, then SIGTERM, before it runs a line of Rust: the signals
/// wait until it handles them. The trigger is refused (not ready); the stop makes it give up
/// before its commit, and the old process goes on serving.
#[test]
fn signals_reaching_a_successor_before_it_handles_them_wait_for_it() {
    let bin = tempfile::tempdir().unwrap();
    let binary = common::copy_binary(&example("http_uuid"), bin.path());
    let original = bin.path().join("original");
    std::fs::hard_link(&binary, &original).unwrap();
    let second = bin.path().join("second");
    std::fs::hard_link(&binary, &second).unwrap();
    let server = Server::start(&binary, &["--listen", "127.0.0.1:0"]);

    // Perl, not sh: dash clears the signal mask it inherits; perl keeps it (and is in every
    // Debian and Ubuntu image: perl-base is essential).
    let Some(perl) = ["/usr/bin/perl", "/bin/perl"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        eprintln!("skipped: no perl to send a successor a signal before its exec");
        return;
    };
    // A successor runs the file its predecessor runs: each round replaces that one with a
    // script that signals itself, then runs the real server from another path.
    let replace = |path: &std::path::Path, signal: &str, then: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        let script = format!(
            "#!{perl}\nkill {signal} => $$;\nexec {{ '{0}' }} '{0}', @ARGV;\n",
            then.display()
        );
        let temporary = path.with_extension("new");
        std::fs::write(&temporary, script).unwrap();
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&temporary, path).unwrap();
    };
    replace(&binary, "USR2", &original);
    let old = server.pid();
    let reply = server.upgrade();
    assert_eq!(reply["ok"], true, "{reply}");
    let successor = reply["successor_pid"].as_u64().unwrap();
    server.wait_for_log(|l| l.contains("upgrade refused") && l.contains("not ready"));
    server.wait_for_exit(old, WAIT);
    assert_eq!(server.pid() as u64, successor);

    replace(&original, "TERM", &second);
    let old = server.pid();
    let reply = server.upgrade();
    assert_eq!(reply["ok"], false, "{reply}");
    let error = reply["error"].as_str().unwrap();
    assert!(
        error.contains("a stop was requested before this process was ready"),
        "{error}"
    );
    assert_eq!(server.pid(), old, "the old process serves on");
    assert_eq!(server.pid_in_file(), Some(old));
}

/// Starts http_uuid with `HANDOFF_FD` set to `value` and `fd` (if any) placed at descriptor
/// `at` without close-on-exec, as a stray inheritance would leave it.
fn start_with_stray_channel(value: &str, fd: Option<(OwnedFd, i32)>, upgrade_timeout: &str) -> Server {
    let args = ["--listen", "127.0.0.1:0", "--upgrade-timeout", upgrade_timeout];
    fake_predecessor::spawn_with_channel(&example("http_uuid"), &args, value, fd)
}

/// `HANDOFF_FD` naming what no predecessor leaves (a standard stream, a pipe, a TCP socket,
/// one of the runtime's own descriptors) is ignored with a warning: the process starts as a
/// first generation, and closes nothing it does not own.
#[test]
fn a_stray_handoff_fd_is_ignored_and_never_closed() {
    let (pipe_read, _pipe_write) = nix::unistd::pipe().unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cases: Vec<(&str, Option<(OwnedFd, i32)>)> = vec![
        ("1", None),
        ("banana", None),
        ("40", Some((pipe_read, 40))),
        ("41", Some((OwnedFd::from(tcp), 41))),
        ("3", None), // by now one of the runtime's own descriptors
        ("999", None),
    ];
    for (value, fd) in cases {
        let placed = fd.as_ref().map(|(_, at)| *at);
        let server = start_with_stray_channel(value, fd, "30");
        server.wait_for_log(|l| l.contains(" ready ") && l.contains("generation=1"));
        server.wait_for_log(|l| l.contains("ignoring HANDOFF_FD"));
        if let Some(at) = placed.or((value == "3").then_some(3)) {
            let pid = server.pid();
            assert!(
                std::fs::read_link(format!("/proc/{pid}/fd/{at}")).is_ok(),
                "HANDOFF_FD={value}: descriptor {at} was closed"
            );
        }
    }
}

/// A real SEQPACKET channel, but created by a process other than our parent (a variable and
/// a descriptor that leaked through a wrapper): ignored, not trusted.
#[test]
fn a_channel_not_created_by_our_parent_is_ignored() {
    let (_ours, theirs) = wire::pair().unwrap(); // created by this test
    let raw = theirs.as_raw_fd();
    let server_path = example("http_uuid");
    // sh starts the server as its child: the server's parent is sh, not the channel's creator.
    let server = Server::spawn_with(
        std::path::Path::new("/bin/sh"),
        &[
            "-c",
            "\"$@\" & wait",
            "sh",
            server_path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        move |command| {
            command.env(handover::wire::CHANNEL_FD_VAR, "43");
            // SAFETY: dup2 is async-signal-safe; `theirs` is open in the parent until the
            // command is dropped.
            unsafe {
                command.pre_exec(move || {
                    let _keep = &theirs;
                    if libc::dup2(raw, 43) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    server.wait_for_log(|l| l.contains("ignoring HANDOFF_FD") && l.contains("not by our parent"));
    server.wait_for_log(|l| l.contains(" ready ") && l.contains("generation=1"));
}

/// A channel that passes every check but whose peer never speaks: the start fails with an
/// error once the upgrade timeout has passed, instead of hanging.
#[test]
fn a_silent_channel_fails_the_start_within_the_timeout() {
    let (ours, theirs) = handover::wire::pair().unwrap();
    let mut server = start_with_stray_channel("42", Some((theirs, 42)), "1");
    let status = server.wait_for_first_exit();
    assert!(!status.success());
    server.wait_for_log(|l| l.contains("no complete handoff from the peer within 1s"));
    drop(ours);
}

/// A first generation started with a descriptor it did not mark close-on-exec and with
/// systemd's variables: its successor inherits neither, only its channel.
#[test]
fn a_successor_inherits_only_its_channel() {
    let file = tempfile::tempfile().unwrap();
    let server = Server::start_with(&example("http_uuid"), &["--listen", "127.0.0.1:0"], |command| {
        let raw = file.as_raw_fd();
        command
            .env("LISTEN_PID", "1")
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "stray");
        // SAFETY: dup2 is async-signal-safe; `file` is open in the parent, hence in the child.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(raw, 50) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let first = server.pid();
    assert!(std::fs::read_link(format!("/proc/{first}/fd/50")).is_ok());
    let successor = server.upgrade_and_settle();
    assert!(
        std::fs::read_link(format!("/proc/{successor}/fd/50")).is_err(),
        "descriptors now: {:?}",
        common::fd_targets(successor)
    );
    let environment = std::fs::read(format!("/proc/{successor}/environ")).unwrap();
    for variable in environment.split(|b| *b == 0) {
        assert!(
            !variable.starts_with(b"LISTEN_"),
            "{}",
            String::from_utf8_lossy(variable)
        );
    }
    drop(file);
}

/// Plays the predecessor (this test) for a real http_uuid successor numbered `generation`.
async fn fake_handover(generation: u64) -> (Server, Channel) {
    let args = ["--listen", "127.0.0.1:0", "--upgrade-timeout", "5"];
    fake_predecessor::handover(&example("http_uuid"), &args, generation).await
}

/// Waits for the successor's ready; nothing is written before the commit.
async fn expect_ready(server: &Server, channel: &mut Channel) {
    assert_eq!(channel.recv("ready").await.unwrap().message.kind(), "ready");
    assert_eq!(server.pid_in_file(), None, "nothing is written before the commit");
}

/// The successor's side of the commit: it acts only once committed; an abort leaves nothing
/// behind; a predecessor that vanishes after the handover counts as a commit (this process
/// holds every socket) and the successor serves alone, named by the PID file.
#[tokio::test]
async fn a_successor_acts_only_after_the_commit_or_its_predecessors_vanishing() {
    let (server, mut channel) = fake_handover(2).await;
    expect_ready(&server, &mut channel).await;
    channel.send(&commit(), &[]).await.unwrap();
    server.wait_for_log(|l| l.contains(" ready ") && l.contains("generation=2"));
    assert_eq!(server.pid_in_file(), Some(server.first_pid()));

    let (mut server, mut channel) = fake_handover(2).await;
    expect_ready(&server, &mut channel).await;
    let abort = Message::Abort {
        reason: "the test gives up".into(),
    };
    channel.send(&abort, &[]).await.unwrap();
    assert!(!server.wait_for_first_exit().success());
    server.wait_for_log(|l| l.contains("the test gives up"));
    assert_eq!(server.pid_in_file(), None);

    let (server, mut channel) = fake_handover(2).await;
    expect_ready(&server, &mut channel).await;
    drop(channel);
    server.wait_for_log(|l| l.contains("vanished"));
    server.wait_for_log(|l| l.contains(" ready ") && l.contains("generation=2"));
    assert_eq!(server.pid_in_file(), Some(server.first_pid()));
    assert_eq!(server.pid(), server.first_pid(), "it serves its control socket");
    let address = server.address("http");
    assert_eq!(common::get(address, "/uuid").await.unwrap().status, 200);
}

/// A predecessor killed before it read the successor's ready (its queue unread: the
/// successor's next read is a reset, not an EOF) has still vanished: the successor serves.
#[tokio::test]
async fn a_predecessor_that_dies_with_the_ready_unread_has_vanished() {
    let (server, channel) = fake_handover(2).await;
    let mut queued = libc::pollfd {
        fd: channel.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd we own; the descriptor is open.
    let ready = unsafe { libc::poll(&mut queued, 1, WAIT.as_millis() as i32) };
    assert_eq!(ready, 1, "the ready is queued");
    drop(channel);
    server.wait_for_log(|l| l.contains("vanished"));
    server.wait_for_log(|l| l.contains(" ready ") && l.contains("generation=2"));
    assert_eq!(server.pid_in_file(), Some(server.first_pid()));
}

/// A stop reaching the successor after its ready and before the commit waits for the
/// verdict: committed, the successor owns everything and stops, removing the PID file even
/// though it still names the predecessor.
#[tokio::test]
async fn a_stop_between_ready_and_commit_cleans_up_after_the_commit() {
    let (mut server, mut channel) = fake_handover(2).await;
    expect_ready(&server, &mut channel).await;
    std::fs::write(server.pid_file(), format!("{}\n", std::process::id())).unwrap();
    signal(server.first_pid(), Signal::SIGTERM);
    server.wait_for_log(|l| l.contains("stopping"));
    channel.send(&commit(), &[]).await.unwrap();
    server.wait_for_first_exit();
    assert_eq!(
        server.pid_in_file(),
        None,
        "the PID file named the predecessor, which drains and exits"
    );
    assert!(!server.control_path().exists());
}

/// Until the commit, the predecessor answers the control socket: the successor starts
/// answering only once it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_successor_answers_the_control_socket_only_after_the_commit() {
    let (server, mut channel) = fake_handover(2).await;
    expect_ready(&server, &mut channel).await;
    let path = server.control_path();
    let status = std::thread::spawn(move || handover::control::Client::new(path).request("status"));
    channel.send(&commit(), &[]).await.unwrap();
    let status = status.join().unwrap().unwrap();
    assert_eq!(status["state"], "ready", "{status}");
    assert_eq!(status["pid"], server.first_pid());
}

/// A predecessor that numbers its successor `u64::MAX`: the successor serves, and refuses to
/// number a successor of its own with a typed error instead of wrapping to 0.
#[tokio::test]
async fn the_last_generation_serves_and_refuses_to_upgrade() {
    let (server, mut channel) = fake_handover(u64::MAX).await;
    expect_ready(&server, &mut channel).await;
    channel.send(&commit(), &[]).await.unwrap();
    drop(channel); // the fake predecessor exits
    server.wait_for_log(|l| l.contains(" ready ") && l.contains(&format!("generation={}", u64::MAX)));
    // Once the successor has seen it go: the refusal below is for the generation number alone.
    server.wait_for_log(|l| l.contains("predecessor exited"));
    let reply = server.upgrade();
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("is the last one"), "{reply}");
    assert_eq!(server.pid(), server.first_pid(), "it serves on");
}

/// A final stop closes the door at once: while a slow request drains, a new client is
/// refused (and can fail over) instead of waiting in an accept queue nobody reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_stop_refuses_new_clients_while_it_drains() {
    let server = Server::start(
        &example("http_uuid"),
        &["--listen", "127.0.0.1:0", "--delay-ms", "5000"],
    );
    let address = server.address("http");
    let delayed = tokio::spawn(common::get(address, "/delayed"));
    server.wait_for_log(|l| l.contains("delayed request started"));
    signal(server.first_pid(), Signal::SIGTERM);
    server.wait_for_log(|l| l.contains("draining"));
    let error = tokio::net::TcpStream::connect(address).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(!server.control_path().exists(), "the control socket's path is gone");
    let reply = delayed.await.unwrap().unwrap();
    assert_eq!(reply.status, 200, "the request in flight finishes");
}

/// The control socket under a careless or hostile client: a megabyte with no newline gets a
/// typed refusal (only the first KiB is read) and the server answers the next client; `stop`
/// stops it, and a path nobody serves is left behind by no one.
#[test]
fn the_control_socket_refuses_garbage_and_stops_on_request() {
    use std::io::{Read, Write};
    let mut server = Server::start(&example("http_uuid"), &["--listen", "127.0.0.1:0"]);
    let mut client = std::os::unix::net::UnixStream::connect(server.control_path()).unwrap();
    client.set_write_timeout(Some(WAIT)).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    // The server stops reading after 1 KiB and replies: the rest may not be accepted.
    let _ = client.write_all(&vec![b'x'; 1 << 20]);
    let mut reply = String::new();
    let _ = client.read_to_string(&mut reply);
    assert!(reply.contains("unknown command"), "{reply}");
    assert_eq!(server.control("status")["state"], "ready");

    let reply = server.control("stop");
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(server.wait_for_first_exit().success());
    assert!(!server.control_path().exists());
    assert_eq!(server.pid_in_file(), None);
}

/// A commit as a predecessor of an older version sends it: no counters, no elders.
fn commit() -> Message {
    Message::Commit {
        counters: None,
        elders: Vec::new(),
    }
}
