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
    /// Seconds since the process started.
    pub age_s: f64,
    /// The TCP connections it holds, as the kernel counts them (listening sockets aside).
    pub connections: usize,
}

/// This process as an elder of its successor, or `None` if `/proc` cannot say when it started.
pub(crate) fn this_process(generation: u64) -> Option<Elder> {
    let pid = std::process::id();
    let stat = stat(pid)?;
    Some(Elder {
        pid,
        generation,
        started: stat.started,
    })
}

/// The elder named `pid`, generation `generation`, as it is now (for a predecessor that did
/// not send its own description), or `None` if it is gone.
pub(crate) fn describe_pid(pid: u32, generation: u64) -> Option<Elder> {
    let stat = stat(pid).filter(ProcessStat::runs)?;
    Some(Elder {
        pid,
        generation,
        started: stat.started,
    })
}

/// Whether `elder` still runs: its pid names a process that started when it did, and that
/// is not a zombie.
pub(crate) fn is_alive(elder: &Elder) -> bool {
    stat(elder.pid).is_some_and(|stat| stat.started == elder.started && stat.runs())
}

/// What `status` says of `elder`.
pub(crate) fn draining(elder: &Elder) -> Draining {
    let age_s = match (uptime(), clock_ticks()) {
        (Some(uptime), Some(ticks)) => (uptime - elder.started as f64 / ticks).max(0.0),
        _ => 0.0,
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
/// closing. Zero where `/proc` will not say (another user's process).
fn tcp_connections(pid: u32) -> usize {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let held: HashSet<u64> = entries
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| socket_inode(&target.to_string_lossy()))
        .collect();
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok())
        .map(|table| connections_in(&table, &held))
        .sum()
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
        let me = this_process(1).expect("/proc/self/stat");
        assert!(is_alive(&me));
        let age = draining(&me).age_s;
        assert!((0.0..3600.0).contains(&age), "{age}");
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
