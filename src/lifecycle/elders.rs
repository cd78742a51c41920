//! The generations older than this process that still drain: whether each is alive, its age
//! and its connections, read from `/proc`. A generation talks only to its direct successor,
//! so an elder further back has no channel to us: its predecessor named it at the commit
//! ([`Elder`]), by pid and start time, and the kernel says the rest.

use std::collections::HashSet;

use serde::Serialize;

use crate::wire::Elder;

/// What `status` says of a generation that still drains.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Draining {
    pub pid: u32,
    pub generation: u64,
    /// Seconds since the process started, where `/proc` says.
    pub age_s: Option<f64>,
    /// The TCP connections it holds, as the kernel counts them (listening sockets aside),
    /// where `/proc` says.
    pub connections: Option<usize>,
}

/// A start time of 0: `/proc` could not say it (hidden, or another user's process).
const UNKNOWN_START: u64 = 0;

/// This process as an elder of its successor.
pub(crate) fn this_process(generation: u64) -> Elder {
    describe_pid(std::process::id(), generation)
}

/// The process `pid`, generation `generation`, as it is now: with its start time if `/proc`
/// says it (else [`UNKNOWN_START`]).
pub(crate) fn describe_pid(pid: u32, generation: u64) -> Elder {
    Elder {
        pid,
        generation,
        started: stat(pid).map_or(UNKNOWN_START, |stat| stat.started),
    }
}

/// Whether `elder` still runs: its pid names a process that started when it did, and that
/// is not a zombie. Where its start time is unknown, whether its pid names a process at all
/// (a pid reused meanwhile counts: a generation too many is refused rather than one too few).
pub(crate) fn is_alive(elder: &Elder) -> bool {
    match stat(elder.pid) {
        Some(stat) => stat.runs() && (elder.started == UNKNOWN_START || stat.started == elder.started),
        None => elder.started == UNKNOWN_START && pid_exists(elder.pid),
    }
}

/// Whether `pid` names a process (ours to signal or not).
fn pid_exists(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// What `status` says of `elder`.
pub(crate) fn draining(elder: &Elder) -> Draining {
    let age_s = match (uptime(), clock_ticks(), elder.started) {
        (_, _, UNKNOWN_START) | (None, _, _) | (_, None, _) => None,
        (Some(uptime), Some(ticks), started) => Some((uptime - started as f64 / ticks).max(0.0)),
    };
    Draining {
        pid: elder.pid,
        generation: elder.generation,
        age_s,
        connections: tcp_connections(elder.pid),
    }
}

/// The fields of `/proc/PID/stat` that we read.
struct ProcessStat {
    state: char,
    started: u64,
}

impl ProcessStat {
    fn runs(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

fn stat(pid: u32) -> Option<ProcessStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<ProcessStat> {
    // The command (field 2) is in parentheses and may itself hold spaces and ')': the other
    // fields start after the last ')'. From there: state (3), ..., starttime (22).
    let mut fields = text[text.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let started = fields.nth(18)?.parse().ok()?;
    Some(ProcessStat { state, started })
}

/// Seconds since the boot.
fn uptime() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

fn clock_ticks() -> Option<f64> {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    (ticks > 0).then_some(ticks as f64)
}

/// The TCP sockets `pid` holds that are not listening: its connections, established or
/// closing. `None` where `/proc` will not say (another user's process, a hidden `/proc`).
fn tcp_connections(pid: u32) -> Option<usize> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let held: HashSet<u64> = entries
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| socket_inode(&target.to_string_lossy()))
        .collect();
    let tables: Vec<String> = ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok())
        .collect();
    if tables.is_empty() {
        return None;
    }
    Some(tables.iter().map(|table| connections_in(table, &held)).sum())
}

/// `socket:[12345]` → 12345.
fn socket_inode(target: &str) -> Option<u64> {
    target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// The rows of a `/proc/net/tcp` table whose inode is in `held` and whose state is not
/// `LISTEN` (0A).
fn connections_in(table: &str, held: &HashSet<u64>) -> usize {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter(|row| {
            let fields: Vec<&str> = row.split_whitespace().collect();
            let (Some(state), Some(inode)) = (fields.get(3), fields.get(9)) else {
                return false;
            };
            *state != LISTEN && inode.parse().is_ok_and(|inode: u64| held.contains(&inode))
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_young() {
        let me = this_process(1);
        assert_ne!(me.started, UNKNOWN_START, "/proc/self/stat");
        assert!(is_alive(&me));
        let age = draining(&me).age_s.unwrap();
        assert!((0.0..3600.0).contains(&age), "{age}");
        let unknown = Elder {
            started: UNKNOWN_START,
            ..me
        };
        assert!(is_alive(&unknown), "a start time unknown: the pid decides");
        let gone = Elder {
            pid: u32::MAX,
            ..unknown
        };
        assert!(!is_alive(&gone));
        let reused = Elder {
            started: me.started + 1,
            ..me
        };
        assert!(
            !is_alive(&reused),
            "a pid that started at another time is another process"
        );
    }

    #[test]
    fn a_command_with_spaces_and_parentheses_is_read_past() {
        let line = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        let stat = parse_stat(line).unwrap();
        assert_eq!((stat.state, stat.started), ('S', 987654));
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn only_held_sockets_that_do_not_listen_count() {
        let table =
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 111 1\n\
           1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 222 1\n\
           2: 0100007F:1F90 0100007F:C351 01 00000000:00000000 00:00000000 00000000  1000        0 333 1\n\
           3: 0100007F:1F90 0100007F:C352 08 00000000:00000000 00:00000000 00000000  1000        0 444 1\n";
        let held = HashSet::from([111, 222, 444]);
        assert_eq!(
            connections_in(table, &held),
            2,
            "the listener (111) and another's (333) aside"
        );
        assert_eq!(socket_inode("socket:[222]"), Some(222));
        assert_eq!(socket_inode("pipe:[222]"), None);
    }
}
