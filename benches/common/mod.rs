//! What the benches share: arguments, and building the example servers they run.
#![allow(dead_code)] // each bench uses its own subset

pub mod cpu;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Builds `examples` in release mode and returns the directory holding them.
pub fn build_examples(examples: &[&str]) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(["build", "--quiet", "--release"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    for example in examples {
        command.args(["--example", example]);
    }
    assert!(
        command.status().expect("running cargo build").success(),
        "building the servers failed"
    );
    // A bench runs from target/release/deps; the examples are in target/release/examples.
    let exe = std::env::current_exe().expect("our path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("examples")
}

/// The value of `--name N` on our command line, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// True under `cargo test --benches` or `--list`: there is nothing to smoke-test.
pub fn listing_only() -> bool {
    std::env::args().any(|a| a == "--list" || a == "--test")
}

/// A server's process group, killed when dropped.
pub struct Group(pub Child);

impl Drop for Group {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
        // Where the bench is the generations' subreaper (`cpu::adopt_orphans`), every
        // generation killed is ours to reap: until none of the group is our child.
        let everyone = nix::unistd::Pid::from_raw(-group.as_raw());
        while nix::sys::wait::waitpid(everyone, None).is_ok() {}
    }
}

/// The pid a server's PID file names, if it names one yet.
pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is alive (a zombie is not).
pub fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| !r.starts_with('Z')))
}

/// Polls `condition` every millisecond for at most `limit`.
pub fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}
