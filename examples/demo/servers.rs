//! The example servers, run as child processes in process groups of their own, driven through
//! their control sockets.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// One example server and every generation it spawns (they share its process group).
pub struct ServerProcess {
    pub name: &'static str,
    child: Child,
    control: PathBuf,
    pub log: PathBuf,
    pub address: SocketAddr,
    /// Whether an upgrade samples the proportional set size too (true by default): reading
    /// `smaps_rollup` walks the processes' page tables under their mmap lock, which costs a
    /// run that measures only time (a tenth of the CPU of a migration of 10,000 connections).
    pub sample_pss: bool,
}

/// One upgrade, as measured from outside.
#[derive(Debug, Clone, Copy)]
pub struct UpgradeSample {
    /// Trigger → successor ready, as the old process reported it.
    pub ready_ms: f64,
    /// Successor ready → old process gone.
    pub old_exit_ms: f64,
    /// The largest RSS of the old and new process together, sampled while the old one drained.
    pub peak_rss_kib: u64,
    /// The RSS of the new process, serving alone, right after the old one exited.
    pub serving_rss_kib: u64,
    /// As `peak_rss_kib`, in proportional set size: pages the two share (the executable's
    /// code, say) counted once, as memory is really used, where RSS counts them in each.
    pub peak_pss_kib: u64,
    /// As `serving_rss_kib`, in proportional set size.
    pub serving_pss_kib: u64,
}

impl ServerProcess {
    /// Starts `binary` and waits (at most 30 s) until its control socket answers.
    pub fn start(
        binary: &Path,
        name: &'static str,
        listener: &str,
        dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let control = dir.join(format!("{name}.ctl"));
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(binary)
            .args(["--listen", "127.0.0.1:0", "--control"])
            .arg(&control)
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut server = Self {
            name,
            child,
            control,
            log,
            address: "0.0.0.0:0".parse()?,
            sample_pss: true,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Ok(status) = server.status() {
                break status;
            }
            if let Some(exit) = server.child.try_wait()? {
                bail!("{name} exited at start ({exit}); see {}", server.log.display());
            }
            if Instant::now() > deadline {
                bail!("{name} did not start within 30 s; see {}", server.log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let socket = status["sockets"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == listener));
        server.address = socket
            .and_then(|s| s["address"].as_str())
            .context("no listener address in status")?
            .parse()?;
        Ok(server)
    }

    pub fn status(&self) -> std::io::Result<Value> {
        handover::control::Client::new(&self.control).request("status")
    }

    /// Waits until the previous generation has exited, triggers an upgrade, and measures it.
    pub fn upgrade(&self) -> Result<UpgradeSample, String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let old = loop {
            let status = self.status().map_err(|e| format!("status: {e}"))?;
            if status["predecessor_running"] == false {
                break status["pid"].as_u64().unwrap_or(0) as u32;
            }
            if Instant::now() > deadline {
                return Err("the previous generation did not exit within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let reply = handover::control::Client::new(&self.control)
            .request("upgrade")
            .map_err(|e| format!("upgrade: {e}"))?;
        if reply["ok"] != true {
            return Err(reply["error"].as_str().unwrap_or("unknown").to_owned());
        }
        let ready = Instant::now();
        let new = reply["successor_pid"].as_u64().unwrap_or(0) as u32;
        let (mut peak_rss_kib, mut peak_pss_kib) = (0, 0);
        let mut sampled: Option<Instant> = None;
        while is_running(old) {
            // The exit is looked for every 2 ms, the memory every 25 ms: reading
            // `smaps_rollup` walks both processes' page tables under their mmap lock, and
            // done every 2 ms it slowed the very migration it measured (RSS, from
            // `/proc/PID/status`, is a counter).
            if sampled.is_none_or(|at| at.elapsed() >= MEMORY_SAMPLE_EVERY) {
                peak_rss_kib = peak_rss_kib.max(rss_kib(old) + rss_kib(new));
                if self.sample_pss {
                    peak_pss_kib = peak_pss_kib.max(pss_kib(old) + pss_kib(new));
                }
                sampled = Some(Instant::now());
            }
            if ready.elapsed() > Duration::from_secs(120) {
                return Err(format!("old process {old} still running 120 s after ready"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let old_exit_ms = ready.elapsed().as_secs_f64() * 1e3;
        let ready_ms = reply["elapsed_ms"].as_f64().unwrap_or(f64::NAN);
        Ok(UpgradeSample {
            ready_ms,
            old_exit_ms,
            peak_rss_kib,
            serving_rss_kib: rss_kib(new),
            peak_pss_kib,
            serving_pss_kib: if self.sample_pss { pss_kib(new) } else { 0 },
        })
    }

    /// The pid of the serving generation.
    pub fn pid(&self) -> Option<u32> {
        self.status().ok()?["pid"].as_u64().map(|p| p as u32)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Whether `pid` is alive (a zombie, exited but not yet reaped, counts as gone).
pub fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// How often the memory of the two processes is sampled while the old one drains.
const MEMORY_SAMPLE_EVERY: Duration = Duration::from_millis(25);

/// Resident memory of `pid` in KiB (0 if gone).
pub fn rss_kib(pid: u32) -> u64 {
    memory_kib(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// Proportional set size of `pid` in KiB (0 if gone): each shared page divided among the
/// processes that map it.
pub fn pss_kib(pid: u32) -> u64 {
    memory_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:")
}

/// The `key:   N kB` line of a /proc file, in KiB.
fn memory_kib(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Open descriptors of `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}
