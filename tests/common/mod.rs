//! Shared by the integration tests: start an example server in a process group of its own,
//! wait on its log lines and control socket (never on the clock), and kill the whole group
//! (every generation) when the test ends, whether it passed or not.
#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod fake_predecessor;

/// The longest any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// The path of a built example (cargo builds a package's examples before running its
/// integration tests; the CLI's tests find the library's in the same target directory).
pub fn example(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let path = deps.parent().unwrap().parent().unwrap().join("examples").join(name);
    assert!(
        path.exists(),
        "example `{name}` is not built at {}: run the tests with `cargo test --workspace`, which builds the examples",
        path.display()
    );
    path
}

/// A running server and all the generations it spawns.
pub struct Server {
    child: Child,
    pub dir: tempfile::TempDir,
    log: Arc<Log>,
}

#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

impl Log {
    fn joined(&self) -> String {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }
}

/// Polls `check` (for a state the kernel reports but does not signal: a process gone) every
/// 10 ms until it yields, for at most `within`; then fails with `why`.
pub fn poll_until<T>(within: Duration, mut check: impl FnMut() -> Option<T>, why: impl Fn() -> String) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "{}", why());
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Server {
    /// Starts `binary` with `args`, plus `--control` and `--pid-file` in a fresh directory,
    /// and waits until it serves.
    pub fn start(binary: &Path, args: &[&str]) -> Self {
        Self::start_with(binary, args, |_| {})
    }

    /// [`start`](Self::start), with `customize` applied to the command first (an
    /// environment variable, a descriptor to inherit).
    pub fn start_with(binary: &Path, args: &[&str], customize: impl FnOnce(&mut Command)) -> Self {
        let server = Self::spawn_with(binary, args, customize);
        server.wait_for_log(|line| line.contains(" ready ") && line.contains("generation=1"));
        server
    }

    /// Starts the server like [`start_with`](Self::start_with) but does not wait for it to
    /// serve.
    pub fn spawn_with(binary: &Path, args: &[&str], customize: impl FnOnce(&mut Command)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new(binary);
        // A session of its own, not only a process group: where the tests share their session
        // with the init process (a CI runner started without `setsid`), a group whose last
        // link to that session exits while one of its members is stopped is "orphaned with
        // stopped jobs", and the kernel sends it SIGHUP, killing a successor a test stopped
        // on purpose. The group (its id is the first generation's pid) is killed whole at
        // the end, as before.
        //
        // And no descriptor but its standard streams, as under a service manager: what the
        // test harness holds (cargo's jobserver pipes, say) is marked close-on-exec, so that
        // a count of the server's descriptors is the server's own. Registered before
        // `customize`, whose own `pre_exec` may pass more.
        // SAFETY: `setsid` and `close_range` are async-signal-safe system calls and touch no
        // memory of the parent; `close_range` with CLOSE_RANGE_CLOEXEC closes nothing before
        // the exec (std's own exec-error pipe keeps working).
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                // Best effort: a kernel before 5.11, or a seccomp profile, may refuse it; then
                // the first generation keeps what it inherited, which only the descriptor
                // count of `tests/upgrade.rs` minds.
                let flags = libc::CLOSE_RANGE_CLOEXEC as libc::c_int;
                let _ = libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, flags);
                Ok(())
            });
        }
        // Before `customize`, which may ask for more (or less).
        command.env("RUST_LOG", "info,http_uuid=debug");
        customize(&mut command);
        command.args(args);
        // The tests were written for an old process that exits once drained; the ones about
        // the probation (`tests/rollback.rs`) ask for it.
        if !args.contains(&"--probation") {
            command.args(["--probation", "0"]);
        }
        command
            .arg("--control")
            .arg(dir.path().join("control.sock"))
            .arg("--pid-file")
            .arg(dir.path().join("server.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child =
            spawn_when_written(&mut command).unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lines.lock().unwrap().push(line);
                sink.grew.notify_all();
            }
        });
        Self { child, dir, log }
    }

    /// The pid of the first generation (the process this test started).
    pub fn first_pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the first generation has exited; returns its status.
    pub fn wait_for_first_exit(&mut self) -> std::process::ExitStatus {
        let child = &mut self.child;
        let log = &self.log;
        poll_until(
            WAIT,
            || child.try_wait().unwrap(),
            || format!("the first generation still runs after {WAIT:?}; log:\n{}", log.joined()),
        )
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir.path().join("server.pid")
    }

    /// The pid the PID file names, if it exists.
    pub fn pid_in_file(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file())
            .ok()
            .map(|s| s.trim().parse().unwrap())
    }

    /// Waits for a log line matching `matches` (already written or to come) and returns it.
    pub fn wait_for_log(&self, matches: impl Fn(&str) -> bool) -> String {
        self.wait_for_nth_log(1, matches)
    }

    /// Waits until `n` log lines match `matches`, and returns the n-th.
    pub fn wait_for_nth_log(&self, n: usize, matches: impl Fn(&str) -> bool) -> String {
        self.wait_for_nth_log_within(WAIT, n, matches)
    }

    /// Waits at most `within` until `n` log lines match `matches`, and returns the n-th.
    pub fn wait_for_nth_log_within(&self, within: Duration, n: usize, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().filter(|l| matches(l)).nth(n - 1) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no matching log line within {within:?}; log:\n{}",
                lines.join("\n")
            );
            lines = self.log.grew.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Whether a log line written so far matches `matches`.
    pub fn has_log(&self, matches: impl Fn(&str) -> bool) -> bool {
        self.log.lines.lock().unwrap().iter().any(|l| matches(l))
    }

    /// Waits for the drain report that process `pid` logs (its `drained` line) and returns it.
    pub fn drained_line(&self, pid: u32) -> String {
        self.wait_for_log(|l| is_drained_line(l, pid))
    }

    /// Every log line so far.
    pub fn log(&self) -> String {
        self.log.joined()
    }

    pub fn control_path(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// Sends a command to the control socket (which always reaches the serving generation).
    pub fn control(&self, command: &str) -> Value {
        handover::control::Client::new(self.control_path())
            .request(command)
            .unwrap_or_else(|e| panic!("control {command}: {e}\nlog:\n{}", self.log()))
    }

    /// Triggers an upgrade through the control socket; returns the reply.
    pub fn upgrade(&self) -> Value {
        self.control("upgrade")
    }

    /// Triggers an upgrade that must succeed, then waits until the predecessor has exited
    /// and its successor has seen it go. Returns the successor's pid.
    pub fn upgrade_and_settle(&self) -> u32 {
        let old = self.pid();
        let reply = self.upgrade();
        assert_eq!(reply["ok"], true, "upgrade failed: {reply}\nlog:\n{}", self.log());
        let new = reply["successor_pid"].as_u64().unwrap() as u32;
        self.wait_for_log(|l| l.contains("exiting") && l.contains(&format!("pid={old} ")));
        self.wait_for_log(|l| l.contains("predecessor exited") && l.contains(&format!("predecessor_pid=Some({old})")));
        // ready() returns after the PID file is written: only then is the successor settled.
        self.wait_for_log(|l| l.contains(" ready ") && l.contains(&format!("pid={new} ")));
        new
    }

    /// Triggers an upgrade that must succeed, then waits until the successor is ready and
    /// has heard that the predecessor drained (or exited): for a predecessor on probation,
    /// which outlives its drain. Returns the successor's pid.
    pub fn upgrade_until_drained(&self) -> u32 {
        let old = self.pid();
        let reply = self.upgrade();
        assert_eq!(reply["ok"], true, "upgrade failed: {reply}\nlog:\n{}", self.log());
        let new = reply["successor_pid"].as_u64().unwrap() as u32;
        self.wait_for_log(|l| l.contains(" ready ") && l.contains(&format!("pid={new} ")));
        self.wait_for_log(|l| l.contains("predecessor exited") && l.contains(&format!("predecessor_pid=Some({old})")));
        new
    }

    /// Waits at most `within` until process `pid` has exited (gone, or a zombie).
    pub fn wait_for_exit(&self, pid: u32, within: Duration) {
        poll_until(
            within,
            || (!is_running(pid)).then_some(()),
            || format!("process {pid} still running after {within:?}; log:\n{}", self.log()),
        );
    }

    /// The pid of the serving generation.
    pub fn pid(&self) -> u32 {
        self.control("status")["pid"].as_u64().unwrap() as u32
    }

    /// The address of the TCP listener named `name`.
    pub fn address(&self, name: &str) -> SocketAddr {
        let status = self.control("status");
        let socket = status["sockets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no socket {name} in {status}"));
        socket["address"].as_str().unwrap().parse().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The group holds every generation: successors are spawned into their parent's group.
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.log());
        }
    }
}

/// Whether `line` is the drain report of process `pid`.
pub fn is_drained_line(line: &str, pid: u32) -> bool {
    line.contains(" drained ") && line.contains(&format!("pid={pid} "))
}

/// Whether process `pid` runs (exists and is not a zombie).
pub fn is_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold spaces.
    stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'))
}

/// Number of open descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// The pids of the live (not zombie) children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    children_where(pid, |state| state != "Z")
}

/// An HTTP/1.1 response as a client sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub connection_close: bool,
    pub body: String,
}

/// One GET on a new connection, through hyper's client.
pub async fn get(address: SocketAddr, path: &str) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(address).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header("host", address.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let connection_close = response
        .headers()
        .get("connection")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let body = String::from_utf8(response.into_body().collect().await?.to_bytes().to_vec())?;
    Ok(Reply {
        status,
        connection_close,
        body,
    })
}

/// Copies `binary` into `dir` so that a test may replace the copy on disk.
pub fn copy_binary(binary: &Path, dir: &Path) -> PathBuf {
    let copy = dir.join(binary.file_name().unwrap());
    std::fs::copy(binary, &copy).unwrap();
    copy
}

/// Replaces `path` with an executable shell script, atomically (write, then rename), as a
/// deploy would.
pub fn replace_with_script(path: &Path, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

/// Installs `binary` at `dest` (a hard link when on the same file system, else a copy), as a
/// deploy puts a release in place.
pub fn install(binary: &Path, dest: &Path) {
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    if std::fs::hard_link(binary, dest).is_err() {
        std::fs::copy(binary, dest).unwrap();
    }
}

/// Points the symlink `link` at `target`, atomically (a new link renamed over the old), as a
/// deploy swaps `current`.
pub fn point_symlink(link: &Path, target: &Path) {
    let temporary = link.with_extension("new");
    let _ = std::fs::remove_file(&temporary);
    std::os::unix::fs::symlink(target, &temporary).unwrap();
    std::fs::rename(&temporary, link).unwrap();
}

/// The executable process `pid` runs, as the kernel names it.
pub fn exe_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

/// The working directory of process `pid`.
pub fn cwd_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap()
}

/// What each open descriptor of `pid` points to, for failure messages.
pub fn fd_targets(pid: u32) -> Vec<String> {
    let mut targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            format!(
                "{}->{}",
                e.file_name().to_string_lossy(),
                std::fs::read_link(e.path())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )
        })
        .collect();
    targets.sort();
    targets
}

/// The pids of the zombie children of `pid`: exited, not reaped.
pub fn zombie_children(pid: u32) -> Vec<u32> {
    children_where(pid, |state| state == "Z")
}

/// Spawns `command`, again while the kernel says its executable is still open for writing
/// (`ETXTBSY`, at most a second): a test that has just written a script races the other
/// tests' forks, each of which holds every descriptor of this process, the script's too, until
/// its exec.
pub fn spawn_when_written(command: &mut Command) -> std::io::Result<std::process::Child> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match command.spawn() {
            Err(error) if error.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            outcome => return outcome,
        }
    }
}

/// A process of a session: its pid, state (`R`, `S`, `Z`…) and parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub pid: u32,
    pub state: char,
    pub parent: u32,
}

/// The processes of session `sid` (a test server's, whose id is its first generation's pid:
/// every generation stays in it).
pub fn session_members(sid: u32) -> Vec<Member> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        // state, ppid, pgrp, session
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 3 && fields[3] == sid.to_string() {
            members.push(Member {
                pid: entry.file_name().to_string_lossy().parse().unwrap(),
                state: fields[0].chars().next().unwrap_or('?'),
                parent: fields[1].parse().unwrap_or(0),
            });
        }
    }
    members
}

/// The pids of the children of `pid` whose state (`/proc/PID/stat`'s third field) `keep`s.
fn children_where(pid: u32, keep: impl Fn(&str) -> bool) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name (which is in parentheses and may hold spaces).
        let Some(rest) = stat.rsplit_once(") ").map(|(_, rest)| rest) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1) == Some(&pid.to_string().as_str()) && keep(fields[0]) {
            children.push(entry.file_name().to_string_lossy().parse().unwrap());
        }
    }
    children
}

/// Waits at most [`WAIT`] until `condition` holds of what `probe` returns, and returns it;
/// panics with `what` and the last value otherwise.
pub fn wait_until<T: std::fmt::Debug>(what: &str, mut probe: impl FnMut() -> T, condition: impl Fn(&T) -> bool) -> T {
    let last = std::cell::RefCell::new(None);
    let check = || {
        let value = probe();
        if condition(&value) {
            return Some(value);
        }
        *last.borrow_mut() = Some(format!("{value:?}"));
        None
    };
    poll_until(WAIT, check, || {
        format!(
            "{what}: still {} after {WAIT:?}",
            last.borrow().as_deref().unwrap_or("?")
        )
    })
}
