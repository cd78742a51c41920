//! CPU time, to say what an upgrade costs the machine: the CPU of a server's every generation
//! (alive or exited) and the benchmark's own.
//!
//! Each generation of a server is started by the one before, which exits once it has drained:
//! its successor is then reparented. With this process as their subreaper
//! ([`adopt_orphans`]), every generation ends as our child; [`Generations::seconds`] reaps the
//! ones that have exited with `wait4`, which returns what each used (its own time and that of
//! the children it reaped), and reads the live ones (and the zombies not ours yet) on their
//! CPU-time clocks. The time of a child a live generation reaped itself (after a take-back) is
//! not counted. Only processes of the server's process group are reaped: the benchmark's other
//! children (wrk, cargo) are left to whoever waits for them.

use std::fs;

/// Makes this process the subreaper of every process it starts, and of theirs.
pub fn adopt_orphans() {
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
}

/// The CPU this process used so far (every thread: the clients, and the bench's own storm and
/// readings of `/proc`), in seconds.
pub fn own_seconds() -> f64 {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).expect("getrusage");
    let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    seconds(usage.user_time()) + seconds(usage.system_time())
}

/// The CPU used by the processes of one process group: a server and its every generation.
pub struct Generations {
    pgid: i32,
    /// What the generations we reaped used, in seconds.
    reaped: f64,
}

/// One process as `/proc/PID/stat` shows it.
struct Stat {
    pid: i32,
    state: char,
    parent: i32,
    group: i32,
    /// Its own CPU and that of the children it reaped, in clock ticks.
    ticks: u64,
}

impl Generations {
    /// Counts the processes of group `pgid` from now on.
    pub fn of_group(pgid: i32) -> Self {
        Self { pgid, reaped: 0.0 }
    }

    /// The CPU every process of the group has used so far, in seconds: those alive, the
    /// zombies, and those this process reaped.
    pub fn seconds(&mut self) -> f64 {
        let ours = std::process::id() as i32;
        let members: Vec<Stat> = processes().filter(|p| p.group == self.pgid).collect();
        for zombie in members.iter().filter(|p| p.state == 'Z' && p.parent == ours) {
            self.reaped += reap(zombie.pid);
        }
        let alive: f64 = members
            .iter()
            .filter(|p| !(p.state == 'Z' && p.parent == ours))
            .map(Stat::cpu_seconds)
            .sum();
        self.reaped + alive
    }
}

impl Stat {
    /// Its CPU to the nanosecond (its CPU-time clock), or to the clock tick from `/proc` where
    /// the clock cannot be read. The ticks (10 ms) are too coarse for an upgrade's few
    /// milliseconds.
    fn cpu_seconds(&self) -> f64 {
        let clock = nix::time::clock_getcpuclockid(nix::unistd::Pid::from_raw(self.pid));
        match clock.and_then(|clock| clock.now()) {
            Ok(time) => time.tv_sec() as f64 + time.tv_nsec() as f64 / 1e9,
            Err(_) => self.ticks as f64 / clock_ticks_per_second(),
        }
    }
}

/// Reaps `pid`, one of our zombies, and returns what it used, in seconds.
fn reap(pid: i32) -> f64 {
    // SAFETY: all-zero is a valid `rusage`; `wait4` fills it in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut status = 0;
    // SAFETY: `status` and `usage` are valid for writes for the call's length, and the kernel
    // writes nothing else.
    let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
    if reaped != pid {
        return 0.0;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Every process `/proc` lists now.
fn processes() -> impl Iterator<Item = Stat> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| parse_stat(pid, &fs::read_to_string(format!("/proc/{pid}/stat")).ok()?))
}

/// `/proc/PID/stat`: the fields after the command (which may hold spaces and parentheses).
fn parse_stat(pid: i32, line: &str) -> Option<Stat> {
    let (_, rest) = line.rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state (3), ppid (4), pgrp (5), …, utime (14), stime (15),
    // cutime (16), cstime (17), numbered as in proc(5).
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    Some(Stat {
        pid,
        state: fields.first()?.chars().next()?,
        parent: field(4)? as i32,
        group: field(5)? as i32,
        ticks: field(14)? + field(15)? + field(16)? + field(17)?,
    })
}

/// The unit of `/proc/PID/stat`'s times.
fn clock_ticks_per_second() -> f64 {
    // SAFETY: `sysconf` reads a configuration value; it touches no memory of ours.
    let hertz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hertz > 0 {
        hertz as f64
    } else {
        100.0
    }
}
