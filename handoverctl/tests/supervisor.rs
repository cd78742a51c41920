//! `handoverctl run`: a supervisor that outlives every generation, as a container's PID 1
//! (in a fresh PID namespace, where the machine allows it) and as a child subreaper.

// The library's process-test helpers (spawn an example, wait for it, clean up its group).
#[path = "../../tests/common/mod.rs"]
mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;

use common::{children, example, is_running, wait_until, zombie_children, Server};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Why a PID namespace cannot be made here, if it cannot.
fn no_pid_namespace() -> Option<String> {
    match Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .output()
    {
        Ok(output) if output.status.success() => None,
        Ok(output) => Some(format!(
            "`unshare --pid --fork --mount-proc` failed (needs root or CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(error) => Some(format!("no `unshare` binary: {error}")),
    }
}

fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).unwrap();
}

/// The pid each generation logged in its ready line, by generation.
fn ready_pid(server: &Server, generation: u64) -> String {
    let line = server.wait_for_log(|l| l.contains(" ready ") && l.contains(&format!(" generation={generation} ")));
    let pid = line.split_whitespace().find_map(|w| w.strip_prefix("pid=")).unwrap();
    pid.to_owned()
}

/// Waits until `supervisor` has one live child left, and no zombie; returns the child.
fn settled(supervisor: u32) -> u32 {
    let live = wait_until(
        "one server left, no zombie",
        || (children(supervisor), zombie_children(supervisor)),
        |(live, zombies)| live.len() == 1 && zombies.is_empty(),
    );
    live.0[0]
}

#[test]
fn as_pid_1_it_outlives_sixteen_upgrades_by_sigusr2_and_ends_with_the_servers_status() {
    if let Some(why) = no_pid_namespace() {
        eprintln!("skipped: {why}");
        return;
    }
    let (ctl, echo) = (handoverctl(), example("tcp_echo"));
    let args = ["--pid", "--fork", "--mount-proc", "--kill-child"]
        .into_iter()
        .map(String::from)
        .chain([
            ctl.display().to_string(),
            "run".into(),
            "--".into(),
            echo.display().to_string(),
        ])
        .chain(["--listen".into(), "127.0.0.1:0".into()])
        .collect::<Vec<_>>();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Server::start(Path::new("unshare"), &args);
    let unshare = server.first_pid();
    // The supervisor: unshare's only child, PID 1 inside.
    let supervisor = wait_until("unshare forks", || children(unshare), |c| c.len() == 1)[0];
    assert!(
        server.log().contains("handoverctl[1]: started pid"),
        "PID 1 in its namespace:\n{}",
        server.log()
    );

    let mut pids = vec![ready_pid(&server, 1)];
    for generation in 2..=17 {
        signal(supervisor, Signal::SIGUSR2);
        pids.push(ready_pid(&server, generation));
        // The old generation has exited and its successor has seen it go: the next
        // trigger is allowed.
        server.wait_for_nth_log(generation as usize - 1, |l| l.contains("predecessor exited"));
        settled(supervisor);
    }
    let mut distinct = pids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 17, "each upgrade answered by a new process: {pids:?}");
    // Each trigger went through the supervisor (its line may follow the server's own).
    let forwarded = server.wait_for_nth_log(16, |l| l.contains("forwarded SIGUSR2 to pid"));
    assert!(forwarded.starts_with("handoverctl[1]:"), "{forwarded}");

    // The one left serves: an echo through it.
    use std::io::{Read, Write};
    let mut client = std::net::TcpStream::connect(server.address("echo")).unwrap();
    client.write_all(b"ping").unwrap();
    let mut answer = [0u8; 4];
    client.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"ping");
    drop(client);

    signal(supervisor, Signal::SIGTERM);
    let status = server.wait_for_first_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM drains and ends with 0:\n{}",
        server.log()
    );
    // The last drain forced nothing (our echo client may still be counted open at its start:
    // it closed just before).
    assert!(
        server
            .log()
            .lines()
            .any(|l| l.contains(" drained ") && l.contains("generation=17 ") && l.contains(" forced=0 ")),
        "{}",
        server.log()
    );
}

#[test]
fn as_a_subreaper_it_reaps_every_generation_and_follows_the_serving_one() {
    let (mut server, supervisor, _cleanup) = tcp_echo_under_run();
    for _ in 0..3 {
        let old = server.pid();
        let new = server.upgrade_and_settle();
        server.wait_for_log(|l| l.contains(&format!("reaped pid {old} (status 0)")));
        assert_eq!(
            settled(supervisor),
            new,
            "the successor, orphaned, is the supervisor's child"
        );
    }
    // SIGUSR2 to the supervisor reaches the serving generation.
    let serving = server.pid();
    signal(supervisor, Signal::SIGUSR2);
    server.wait_for_log(|l| l.contains(" ready ") && l.contains(" generation=5 "));
    server.wait_for_log(|l| l.contains(&format!("reaped pid {serving} (status 0)")));

    signal(supervisor, Signal::SIGINT);
    assert_eq!(server.wait_for_first_exit().code(), Some(0), "{}", server.log());
}

/// `handoverctl run -- tcp_echo` as a subreaper: the server, the supervisor's pid, and what
/// kills the program's process group, which the Server's own cleanup misses.
fn tcp_echo_under_run() -> (Server, u32, KillChildrenOnDrop) {
    let echo = example("tcp_echo");
    let args = ["run", "--", echo.to_str().unwrap(), "--listen", "127.0.0.1:0"];
    let server = Server::start(&handoverctl(), &args);
    let supervisor = server.first_pid();
    (server, supervisor, KillChildrenOnDrop(supervisor))
}

/// A stand-in for a server that speaks the notify protocol: the first process (A) writes the
/// socket's address, starts its "successor" (B), and exits once told to (its drain over). Each
/// records the signals it receives. The test sends the notifications in their place (the same
/// uid: trusted).
const FAKE_SERVER: &str = r#"
echo "$NOTIFY_SOCKET" > "$DIR/notify"
sh -c 'trap "echo USR2 >> \"$DIR/b.log\"" USR2; trap "exit 7" TERM; echo $$ > "$DIR/b.pid"; while :; do sleep 0.05; done' &
trap 'echo USR2 >> "$DIR/a.log"' USR2
trap 'echo TERM >> "$DIR/a.log"' TERM
while [ ! -e "$DIR/a.exit" ]; do sleep 0.05; done
"#;

#[test]
fn notifications_name_the_process_that_gets_the_signals_and_whose_status_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut supervisor = Command::new(handoverctl())
        .args(["run", "--", "sh", "-c", FAKE_SERVER])
        .env("DIR", dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _cleanup = KillChildrenOnDrop(supervisor.id());
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
    let b = wait_until("B starts", || read("b.pid"), |s| s.ends_with('\n'));
    let b: u32 = b.trim().parse().unwrap();
    let address = read("notify");
    let name = address.trim().strip_prefix('@').expect("an abstract address");
    let to = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let notify = |message: String| {
        UnixDatagram::unbound()
            .unwrap()
            .send_to_addr(message.as_bytes(), &to)
            .unwrap()
    };
    notify(format!("MAINPID={b}\nREADY=1\n"));

    // Sent until B reports it: the notification may not have been read yet.
    wait_until(
        "SIGUSR2 reaches the process MAINPID named",
        || {
            signal(supervisor.id(), Signal::SIGUSR2);
            read("b.log")
        },
        |log| log.contains("USR2"),
    );
    assert_eq!(read("a.log"), "", "the first process heard nothing");

    // A ends (its drain done): not the end, B serves, and is now the supervisor's child.
    std::fs::write(dir.path().join("a.exit"), "").unwrap();
    wait_until(
        "B is adopted",
        || children(supervisor.id()).contains(&b),
        |adopted| *adopted,
    );
    assert!(is_running(supervisor.id()), "A's exit is not the end");

    notify("STOPPING=1\n".into());
    signal(supervisor.id(), Signal::SIGTERM); // B exits 7
    let status = wait_until(
        "the supervisor exits",
        || supervisor.try_wait().unwrap(),
        Option::is_some,
    )
    .unwrap();
    assert_eq!(status.code(), Some(7), "the serving process's status");
    assert!(
        !read("a.log").contains("TERM"),
        "SIGTERM went to the serving process only"
    );
}

/// Kills the process groups of a supervisor's children, and the supervisor, when dropped.
struct KillChildrenOnDrop(u32);

impl Drop for KillChildrenOnDrop {
    fn drop(&mut self) {
        kill_groups_of_children(self.0);
        let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGKILL);
    }
}

/// Kills the process group of each child of `pid`: a successor the supervisor adopted is not
/// its group's leader (the program's first process is).
fn kill_groups_of_children(pid: u32) {
    for child in children(pid) {
        let group = std::fs::read_to_string(format!("/proc/{child}/stat"))
            .ok()
            .and_then(|stat| {
                // pgrp is the third field after the command name, which is in parentheses.
                stat.rsplit_once(") ")?.1.split_whitespace().nth(2)?.parse::<i32>().ok()
            });
        if let Some(group) = group {
            let _ = nix::sys::signal::killpg(Pid::from_raw(group), Signal::SIGKILL);
        }
        let _ = kill(Pid::from_raw(child as i32), Signal::SIGKILL);
    }
}

/// The CLI this package builds.
fn handoverctl() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_handoverctl"))
}

/// `handoverctl run -- PROGRAM…` started by a test with the program's arguments as given (no
/// `--control` or `--pid-file` added): its log (stderr) collected, and on drop the program's
/// process group and the supervisor killed, whether the test passed or not.
struct Supervised {
    child: std::process::Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Supervised {
    fn start(program: &[&str], dir: &Path) -> Self {
        use std::io::{BufRead, BufReader};
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(handoverctl())
            .arg("run")
            .arg("--")
            .args(program)
            .env("DIR", dir)
            // Read by `supervised_child_reporting_its_signal_mask` only.
            .env("SUPERVISED_CHILD_DIR", dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (stderr, sink) = (child.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap_or_else(|p| p.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        Self { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits at most `within` for the supervisor to exit; its status, or `None` if it still runs.
    fn exit_within(&mut self, within: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // The program's group: the first process the supervisor started leads it. Found in the
        // log, so that it is killed even if the supervisor died and its children were adopted
        // by someone else.
        let log = self.log();
        for group in log.lines().filter_map(|l| l.split("]: started pid ").nth(1)) {
            if let Some(pid) = group.split_whitespace().next().and_then(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        kill_groups_of_children(self.child.id());
        let _ = nix::sys::signal::killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- supervisor log ---\n{log}");
        }
    }
}

/// The abstract address a program found in `NOTIFY_SOCKET` (written to `DIR/notify`).
fn notify_address(dir: &Path) -> std::os::unix::net::SocketAddr {
    let address = wait_until(
        "the program writes NOTIFY_SOCKET",
        || std::fs::read_to_string(dir.join("notify")).unwrap_or_default(),
        |s| s.ends_with('\n'),
    );
    let name = address.trim().strip_prefix('@').expect("an abstract address");
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap()
}

fn send_notification(to: &std::os::unix::net::SocketAddr, message: &[u8]) {
    UnixDatagram::unbound().unwrap().send_to_addr(message, to).unwrap();
}

/// Set by the child's SIGHUP handler.
static HUP_HANDLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sighup(_: std::os::raw::c_int) {
    // Async-signal-safe: one atomic store.
    HUP_HANDLED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Not a test on its own: the program `handoverctl run` starts in
/// `every_process_it_starts_has_no_signal_blocked_and_a_forwarded_sighup_reaches_its_handler`
/// (this test binary, run again with `SUPERVISED_CHILD_DIR` set). It writes the signal mask it
/// started with (`SigBlk` of its thread's `/proc` status: libtest changes no mask, and its
/// threads inherit it), installs a SIGHUP handler, names itself with `MAINPID=`, and exits
/// once the handler has run (or fails after 10 s).
#[test]
fn supervised_child_reporting_its_signal_mask() {
    let Some(dir) = std::env::var_os("SUPERVISED_CHILD_DIR").map(std::path::PathBuf::from) else {
        return;
    };
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    // This thread's: libtest's main thread, which started it with the mask the process
    // started with, may be blocking every signal for a moment (as pthread_create does).
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let blocked = status.lines().find(|l| l.starts_with("SigBlk:")).unwrap().to_owned();
    let action = SigAction::new(SigHandler::Handler(on_sighup), SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { sigaction(Signal::SIGHUP, &action) }.unwrap();
    let notify = std::env::var("NOTIFY_SOCKET").unwrap();
    let name = notify.strip_prefix('@').unwrap();
    let to = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    send_notification(&to, format!("MAINPID={}\nREADY=1\n", std::process::id()).as_bytes());
    // Written whole (renamed into place): the test reads it once it exists.
    std::fs::write(dir.join("mask.new"), format!("{blocked}\n")).unwrap();
    std::fs::rename(dir.join("mask.new"), dir.join("mask")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !HUP_HANDLED.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(std::time::Instant::now() < deadline, "no SIGHUP handled within 10 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::fs::write(dir.join("hup"), "handled\n").unwrap();
}

#[test]
fn every_process_it_starts_has_no_signal_blocked_and_a_forwarded_sighup_reaches_its_handler() {
    let dir = tempfile::tempdir().unwrap();
    let this = std::env::current_exe().unwrap();
    // The child is this binary running the one test above.
    let mut supervisor = Supervised::start(
        &[
            this.to_str().unwrap(),
            "--exact",
            "supervised_child_reporting_its_signal_mask",
            "--nocapture",
            "--test-threads=1",
        ],
        dir.path(),
    );
    let mask = wait_until(
        "the child reports its signal mask",
        || std::fs::read_to_string(dir.path().join("mask")).unwrap_or_default(),
        |s| !s.is_empty(),
    );
    // Its handler is installed: a SIGHUP forwarded now must run it.
    signal(supervisor.pid(), Signal::SIGHUP);
    let status = supervisor.exit_within(common::WAIT);
    let handled = std::fs::read_to_string(dir.path().join("hup")).unwrap_or_default();
    let blocked = mask.trim().trim_start_matches("SigBlk:").trim();
    assert!(
        blocked.chars().all(|c| c == '0') && handled == "handled\n" && status.is_some_and(|s| s.success()),
        "the child started with blocked signals {blocked} (want none); SIGHUP handled: {}; the run ended with {status:?}\n{}",
        !handled.is_empty(),
        supervisor.log()
    );
}

/// A program that writes its notify socket's address and its pid, and records each SIGUSR2
/// it hears (the test names it with `MAINPID=`, so that forwarded signals go to it).
const LISTENING_PROGRAM: &str = r#"
echo "$NOTIFY_SOCKET" > "$DIR/notify"
trap 'echo USR2 >> "$DIR/usr2"' USR2
echo $$ > "$DIR/pid"
while :; do sleep 0.05; done
"#;

/// Sends SIGUSR2 to the supervisor until the program has recorded more than `before`;
/// returns how many it has recorded.
fn usr2_reaches_the_program(supervisor: u32, dir: &Path, before: usize) -> usize {
    wait_until(
        "a forwarded SIGUSR2 reaches the program",
        || {
            signal(supervisor, Signal::SIGUSR2);
            std::fs::read_to_string(dir.join("usr2"))
                .unwrap_or_default()
                .lines()
                .count()
        },
        |heard| *heard > before,
    )
}

/// Sends `message` to the notify socket `to` with `count` copies of descriptor `fd`, in one
/// `SCM_RIGHTS` control message per chunk of `per_message`.
fn send_with_descriptors(
    to: &std::os::unix::net::SocketAddr,
    message: &[u8],
    fd: std::os::fd::RawFd,
    count: usize,
    per_message: usize,
) -> nix::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    use std::os::fd::AsRawFd;
    let socket = UnixDatagram::unbound().unwrap();
    let address = UnixAddr::new_abstract(to.as_abstract_name().unwrap()).unwrap();
    let fds = vec![fd; count];
    let chunks: Vec<ControlMessage<'_>> = fds.chunks(per_message).map(ControlMessage::ScmRights).collect();
    sendmsg(
        socket.as_raw_fd(),
        &[std::io::IoSlice::new(message)],
        &chunks,
        MsgFlags::empty(),
        Some(&address),
    )
}

/// Waits at most [`common::WAIT`] until every copy of the pipe's write end is closed: its
/// read end `read` reaches end of file.
fn every_writer_closed(read: &std::os::fd::OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut fds = [PollFd::new(read.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)) {
            Ok(0) => return false,
            Ok(_) => {
                let mut byte = [0u8; 1];
                if nix::unistd::read(read, &mut byte).unwrap() == 0 {
                    return true;
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => panic!("poll: {e}"),
        }
    }
}

#[test]
fn no_datagram_on_the_notify_socket_ends_it_or_leaks_a_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let mut supervisor = Supervised::start(&["sh", "-c", LISTENING_PROGRAM], dir.path());
    let to = notify_address(dir.path());
    let program = wait_until(
        "the program writes its pid",
        || std::fs::read_to_string(dir.path().join("pid")).unwrap_or_default(),
        |s| s.ends_with('\n'),
    );
    send_notification(&to, format!("MAINPID={}\nREADY=1\n", program.trim()).as_bytes());
    let heard = usr2_reaches_the_program(supervisor.pid(), dir.path(), 0);
    let (descriptors, targets) = (common::fd_count(supervisor.pid()), common::fd_targets(supervisor.pid()));

    // Every datagram below carries copies of the pipe's write end: once the supervisor has
    // read (and closed) them all, the read end sees end of file.
    let (read, write) = nix::unistd::pipe().unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&write);
    // More descriptors than a notification ever carries (the library's barrier has one);
    // 253 is the most one datagram can carry (SCM_MAX_FD); two control messages in one.
    // Each send's outcome, checked once we know whether the supervisor survived (a send to
    // a socket whose owner died fails).
    let mut sent = vec![
        ("40 descriptors", send_with_descriptors(&to, b"BARRIER=1\n", fd, 40, 40)),
        (
            "253 descriptors",
            send_with_descriptors(&to, b"FDSTORE=1\nFDNAME=x\n", fd, 253, 253),
        ),
        (
            "2 x 20 descriptors",
            send_with_descriptors(&to, b"FDSTORE=1\n", fd, 40, 20),
        ),
    ];
    // Garbage: not UTF-8, NULs, values that are no pid, no `=`, nothing at all, too long.
    let socket = UnixDatagram::unbound().unwrap();
    for garbage in [
        &b"\xff\xfe\x00\x01MAINPID=\x00\n\xc3\x28=1\nMAINPID=-1\nMAINPID=0\nMAINPID=99999999999999\nREADY\n==\n"[..],
        b"",
        b"\n\n\n",
        &[b'A'; 60_000],
    ] {
        let result = socket
            .send_to_addr(garbage, &to)
            .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)));
        sent.push(("garbage", result));
    }
    sent.push((
        "garbage and 3 descriptors",
        send_with_descriptors(&to, &[0xffu8; 10_000], fd, 3, 3),
    ));
    drop(write);
    assert!(
        every_writer_closed(&read),
        "the supervisor closed every descriptor it received\n{}",
        supervisor.log()
    );

    // It goes on, and still forwards (or it ended: no waiting for nothing).
    let pid = supervisor.pid();
    let (_, status) = wait_until(
        "a forwarded SIGUSR2 reaches the program, or the supervisor ends",
        || {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGUSR2);
            let recorded = std::fs::read_to_string(dir.path().join("usr2")).unwrap_or_default();
            (
                recorded.lines().count(),
                supervisor.exit_within(std::time::Duration::ZERO),
            )
        },
        |(recorded, status)| *recorded > heard || status.is_some(),
    );
    assert!(
        status.is_none(),
        "the supervisor goes on after hostile datagrams; it ended with {status:?}\n{}",
        supervisor.log()
    );
    let failed: Vec<_> = sent.iter().filter(|(_, result)| result.is_err()).collect();
    assert!(failed.is_empty(), "every datagram was sent: {failed:?}");
    assert_eq!(
        common::fd_count(pid),
        descriptors,
        "no descriptor leaked: before {targets:?}, after {:?}",
        common::fd_targets(pid)
    );
}

/// A stand-in for a handoff in progress: A (the first process) serves and, like a
/// generation that has just committed, only notes a stop; B (its successor) ends on one.
/// The test sends the notifications in their place.
const COMMITTED_PROGRAM: &str = r#"
echo "$NOTIFY_SOCKET" > "$DIR/notify"
sh -c 'trap "echo TERM >> \"$DIR/b.log\"; exit 7" TERM; echo $$ > "$DIR/b.pid"; while :; do sleep 0.05; done' &
trap 'echo USR2 >> "$DIR/usr2"' USR2
trap 'echo TERM >> "$DIR/a.log"' TERM
echo $$ > "$DIR/pid"
while [ ! -e "$DIR/a.exit" ]; do sleep 0.05; done
"#;

/// The race of a stop just after a commit, made deterministic: the supervisor forwards
/// SIGTERM to the serving process A, which has (as far as A knows) just committed to B and
/// so only notes it; then the supervisor hears `MAINPID=` B (the commit's announcement, which
/// it had not read yet when it forwarded). B must hear the stop too, or it serves on alone.
#[test]
fn a_stop_that_reached_the_old_process_after_its_commit_reaches_its_successor() {
    let dir = tempfile::tempdir().unwrap();
    let mut supervisor = Supervised::start(&["sh", "-c", COMMITTED_PROGRAM], dir.path());
    let to = notify_address(dir.path());
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
    let a = wait_until("A writes its pid", || read("pid"), |s| s.ends_with('\n'));
    let b = wait_until("B writes its pid", || read("b.pid"), |s| s.ends_with('\n'));
    send_notification(&to, format!("MAINPID={}\nREADY=1\n", a.trim()).as_bytes());
    usr2_reaches_the_program(supervisor.pid(), dir.path(), 0);

    signal(supervisor.pid(), Signal::SIGTERM);
    wait_until("the stop reaches A", || read("a.log"), |log| log.contains("TERM"));
    // A's commit, heard after the stop.
    send_notification(&to, format!("MAINPID={}\nREADY=1\n", b.trim()).as_bytes());
    wait_until("the stop reaches B too", || read("b.log"), |log| log.contains("TERM"));

    // A's drain ends: nothing serves, the run ends.
    std::fs::write(dir.path().join("a.exit"), "").unwrap();
    let status = supervisor.exit_within(common::WAIT);
    assert!(
        status.is_some(),
        "the run ends once A has drained\n{}",
        supervisor.log()
    );
}

/// SIGUSR2 then SIGTERM to `handoverctl run` over a real server, 0 to 6 ms apart: whatever
/// the stop meets (an upgrade starting, a successor starting, a commit, a successor between
/// its commit and its ready), the run ends, and as a stop does, with 0.
#[test]
fn sigusr2_then_sigterm_within_6_ms_ends_every_run_with_0() {
    const ROUNDS: u64 = 42;
    let (ctl, echo) = (handoverctl(), example("tcp_echo"));
    let args = ["run", "--", echo.to_str().unwrap(), "--listen", "127.0.0.1:0"];
    let mut lost = Vec::new();
    for round in 0..ROUNDS {
        let gap = std::time::Duration::from_millis(round % 7);
        let mut server = Server::start(&ctl, &args);
        let supervisor = server.first_pid();
        let _program = KillChildrenOnDrop(supervisor);
        signal(supervisor, Signal::SIGUSR2);
        // The gap is the point of the test, not a wait for something.
        std::thread::sleep(gap);
        signal(supervisor, Signal::SIGTERM);
        if !ends_within(supervisor, std::time::Duration::from_secs(10)) {
            lost.push(format!(
                "round {round} (gap {gap:?}) still ran 10 s after its stop:\n{}",
                server.log()
            ));
            continue;
        }
        let status = server.wait_for_first_exit();
        if status.code() != Some(0) {
            lost.push(format!(
                "round {round} (gap {gap:?}) ended with {status}:\n{}",
                server.log()
            ));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {ROUNDS} runs went wrong:\n{}",
        lost.len(),
        lost.join("\n\n")
    );
}

/// Whether process `pid` ends (exits, or is a zombie) within `within`.
fn ends_within(pid: u32, within: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while is_running(pid) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    true
}

/// A successor killed 200 ms after its commit, under `handoverctl run` as PID 1 (as a child
/// subreaper where no PID namespace can be made): its predecessor takes the service back and
/// names itself (`MAINPID=`); the supervisor follows it, forwards the next SIGUSR2 to it (an
/// upgrade that sticks), and ends with the status of the last generation.
#[test]
fn a_successor_that_dies_on_probation_is_taken_back_and_the_supervisor_follows() {
    let (ctl, http) = (handoverctl(), example("http_uuid"));
    let program = [http.display().to_string(), "--listen".into(), "127.0.0.1:0".into()];
    let program = program.into_iter().chain(["--probation".into(), "10".into()]);
    let (mut server, supervisor, _cleanup) = match no_pid_namespace() {
        None => {
            let args: Vec<String> = ["--pid", "--fork", "--mount-proc", "--kill-child"]
                .into_iter()
                .map(String::from)
                .chain([ctl.display().to_string(), "run".into(), "--".into()])
                .chain(program)
                .collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let server = Server::start(Path::new("unshare"), &args);
            let supervisor = wait_until("unshare forks", || children(server.first_pid()), |c| c.len() == 1)[0];
            (server, supervisor, None)
        }
        Some(why) => {
            eprintln!("as a subreaper: {why}");
            let args: Vec<String> = ["run".to_owned(), "--".into()].into_iter().chain(program).collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let server = Server::start(&ctl, &args);
            let supervisor = server.first_pid();
            (server, supervisor, Some(KillChildrenOnDrop(supervisor)))
        }
    };
    // Host pids: the supervisor's child serves; its successor is that child's child.
    let first = settled(supervisor);
    let first_inside = ready_pid(&server, 1);
    let reply = server.upgrade();
    assert_eq!(reply["ok"], true, "{reply}");
    let successor = wait_until("the successor", || children(first), |c| c.len() == 1)[0];
    server.wait_for_log(|l| l.contains(" ready ") && l.contains(" generation=2 "));
    std::thread::sleep(std::time::Duration::from_millis(200)); // the crash, 200 ms after the commit
    signal(successor, Signal::SIGKILL);
    server.wait_for_log(|l| l.contains("rollback:"));
    server.wait_for_log(|l| l.contains(&format!("pid {first_inside} serves (MAINPID from pid {first_inside})")));
    assert_eq!(
        server.pid().to_string(),
        first_inside,
        "the control socket answers from the first again"
    );

    // The supervisor's next SIGUSR2 reaches the process that took back: its upgrade sticks.
    signal(supervisor, Signal::SIGUSR2);
    server.wait_for_nth_log(2, |l| l.contains(" ready ") && l.contains(" generation=2 "));
    let forwarded = server.wait_for_log(|l| l.contains("forwarded SIGUSR2 to pid"));
    assert!(forwarded.ends_with(&format!("pid {first_inside}")), "{forwarded}");
    // Ready is logged before the commit; the control socket moves with the commit.
    let third = wait_until(
        "the third to answer",
        || server.pid(),
        |pid| pid.to_string() != first_inside,
    );
    assert_ne!(third.to_string(), first_inside);
    assert!(zombie_children(supervisor).is_empty() && zombie_children(first).is_empty());

    signal(supervisor, Signal::SIGTERM);
    let status = server.wait_for_first_exit();
    assert_eq!(status.code(), Some(0), "{}", server.log());
}

/// The serving process is the child of the one it succeeded. Stopped while that one still
/// drains (a client holds a connection open), it must not be reaped by it: the supervisor
/// inherits it when the old one exits, and ends with its status. Before, the old process
/// reaped it, and the run ended with 1, "not ours to reap".
#[test]
fn a_successor_stopped_while_its_predecessor_drains_ends_the_run_with_its_own_status() {
    let (mut server, supervisor, _cleanup) = tcp_echo_under_run();
    let first = settled(supervisor);
    // Held without reading or closing: the old process half-closes it and waits for our EOF.
    let held = std::net::TcpStream::connect(server.address("echo")).unwrap();
    let reply = server.upgrade();
    assert_eq!(reply["ok"], true, "{reply}");
    let successor = reply["successor_pid"].as_u64().unwrap() as u32;
    server.wait_for_log(|l| l.contains(&format!("pid {successor} serves (MAINPID from pid {first})")));
    server.wait_for_log(|l| l.contains(" draining ") && l.contains("connections=1"));

    signal(supervisor, Signal::SIGTERM);
    server.wait_for_exit(successor, std::time::Duration::from_secs(10));
    assert_eq!(
        zombie_children(first),
        vec![successor],
        "the old process leaves its exited successor unreaped for the supervisor\n{}",
        server.log()
    );
    drop(held); // the old process's drain ends
    let status = server.wait_for_first_exit();
    assert_eq!(status.code(), Some(0), "{}", server.log());
    server.wait_for_log(|l| l.contains(&format!("reaped pid {successor} (status 0)")));
}
