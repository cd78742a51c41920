//! The readable forms of the control socket's answers: `status` as a table, an upgrade's
//! result as a line. The raw answers (`--json`) are documented in `handover::control`.

use std::fmt::Write;

use serde_json::Value;

/// `upgraded: pid 4242 serves as generation 3 (2 sockets; ready after 41.2 ms, committed 0.1 ms later)`.
pub fn upgraded(reply: &Value) -> String {
    let mut line = format!(
        "upgraded: pid {} serves as generation {} ({} sockets; ready after {}",
        reply["successor_pid"],
        reply["generation"],
        reply["sockets"],
        millis(&reply["elapsed_ms"])
    );
    if let Some(commit) = reply["timings"].get("ready_to_commit_ms") {
        let _ = write!(line, ", committed {} later", millis(commit));
    }
    line.push(')');
    if let Some(rollback) = rollback(&reply["last_rollback"]) {
        let _ = write!(
            line,
            "\nbefore it: {} rollback(s), the last {rollback}",
            reply["rollbacks"]
        );
    }
    line
}

/// `pid 4243 died (signal: 9 (SIGKILL)) 212.0 ms after its commit; taken back`.
fn rollback(rollback: &Value) -> Option<String> {
    (!rollback.is_null()).then(|| {
        format!(
            "pid {} died ({}) {} after its commit; taken back",
            rollback["successor_pid"],
            text(&rollback["status"]),
            millis(&rollback["after_commit_ms"])
        )
    })
}

/// `pid 4001 (generation 1, 12s, 3 connections)`; age and connections only where the server
/// says them.
fn draining_generation(generation: &Value) -> String {
    let mut about = vec![format!("generation {}", generation["generation"])];
    if let Some(age) = generation["age_s"].as_f64() {
        about.push(uptime(age));
    }
    if let Some(connections) = generation["connections"].as_u64() {
        about.push(format!("{connections} connections"));
    }
    format!("pid {} ({})", generation["pid"], about.join(", "))
}

/// The `status` answer as a table.
pub fn status(reply: &Value) -> String {
    let mut out = String::new();
    let upgrade_phase = match &reply["upgrade_phase"] {
        Value::Null => "none under way".to_owned(),
        phase => text(phase),
    };
    let draining: Vec<String> = array(&reply["draining_generations"])
        .iter()
        .map(draining_generation)
        .collect();
    for (label, value) in [
        ("pid", text(&reply["pid"])),
        ("generation", text(&reply["generation"])),
        ("state", text(&reply["state"])),
        ("uptime", uptime(reply["uptime_s"].as_f64().unwrap_or(0.0))),
        ("upgrade", upgrade_phase),
        (
            "draining",
            if draining.is_empty() {
                "none".into()
            } else {
                draining.join(", ")
            },
        ),
    ] {
        let _ = writeln!(out, "{label:<12}{value}");
    }
    sockets(&mut out, reply);
    connections(&mut out, reply);
    upgrades(&mut out, &reply["upgrades"]);
    migrated_in(&mut out, &reply["migrated_in"]);
    out
}

fn sockets(out: &mut String, reply: &Value) {
    let _ = writeln!(out, "\n{:<20}{:<16}{:<28}ORIGIN", "SOCKET", "KIND", "ADDRESS");
    for socket in array(&reply["sockets"]) {
        let address = socket
            .get("address")
            .or_else(|| socket.get("path"))
            .unwrap_or(&Value::Null);
        let _ = writeln!(
            out,
            "{:<20}{:<16}{:<28}{}",
            text(&socket["name"]),
            text(&socket["kind"]),
            text(address),
            text(&socket["origin"])
        );
    }
}

fn connections(out: &mut String, reply: &Value) {
    let _ = writeln!(
        out,
        "\n{:<20}{:<12}{:>8}{:>10}{:>8}",
        "CONNECTIONS", "PROTOCOL", "ACTIVE", "DRAINING", "FORCED"
    );
    let counts = array(&reply["connections"]);
    if counts.is_empty() {
        let _ = writeln!(out, "(no drain registered)");
    }
    for count in counts {
        // The listener's name in the registry; `-` for connections a drain tracks without one.
        let listener = count["listener"].as_str().unwrap_or("-");
        let _ = writeln!(
            out,
            "{:<20}{:<12}{:>8}{:>10}{:>8}",
            listener,
            text(&count["protocol"]),
            text(&count["active"]),
            text(&count["draining"]),
            text(&count["forced"])
        );
    }
}

fn upgrades(out: &mut String, upgrades: &Value) {
    let _ = writeln!(
        out,
        "\nupgrades    attempted {}, succeeded {}, failed {}, refused {}",
        upgrades["attempted"], upgrades["succeeded"], upgrades["failed"], upgrades["refused"]
    );
    let failure = &upgrades["last_failure"];
    if !failure.is_null() {
        let phase = failure["phase"]
            .as_str()
            .map(|p| format!(" (phase {p})"))
            .unwrap_or_default();
        let _ = writeln!(out, "last failure{phase}: {}", text(&failure["reason"]));
    }
    let handoff = &upgrades["last_handoff"];
    if !handoff.is_null() {
        let _ = writeln!(
            out,
            "last handoff to pid {}: trigger -> ready {}, ready -> commit {}",
            handoff["successor_pid"],
            millis(&handoff["trigger_to_ready_ms"]),
            millis(&handoff["ready_to_commit_ms"])
        );
    }
    if let Some(rollback) = rollback(&upgrades["last_rollback"]) {
        let _ = writeln!(out, "rollbacks   {}: the last {rollback}", upgrades["rollbacks"]);
    }
    let arrival = &upgrades["arrival"];
    if !arrival.is_null() {
        let _ = writeln!(
            out,
            "arrived from pid {}: adopted -> ready {}, ready -> commit {}",
            arrival["predecessor_pid"],
            millis(&arrival["adopted_to_ready_ms"]),
            millis(&arrival["ready_to_commit_ms"])
        );
    }
}

/// Connections live-migrated from the predecessor, if any.
fn migrated_in(out: &mut String, counts: &Value) {
    if counts["batches"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            out,
            "migrated in {} connections in {} batches, {} refused (drained by the predecessor)",
            counts["connections"], counts["batches"], counts["refused"]
        );
    }
}

fn array(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

/// A JSON value without the quotes of a string.
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn millis(value: &Value) -> String {
    value.as_f64().map_or_else(|| "-".into(), |ms| format!("{ms:.1} ms"))
}

fn uptime(seconds: f64) -> String {
    let whole = seconds as u64;
    match whole {
        0..=59 => format!("{seconds:.1}s"),
        60..=3599 => format!("{}m {:02}s", whole / 60, whole % 60),
        _ => format!("{}h {:02}m {:02}s", whole / 3600, whole / 60 % 60, whole % 60),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_status_table_names_every_part() {
        let reply = json!({
            "ok": true, "pid": 4100, "generation": 2, "state": "ready", "uptime_s": 3725.0,
            "upgrade_phase": null, "draining_generations": [{"pid": 4001, "generation": 1, "age_s": 12.0, "connections": 3}],
            "sockets": [{"name": "http", "kind": "tcp_listener", "address": "127.0.0.1:8081", "origin": "inherited"}],
            "connections": [{"listener": "web", "protocol": "http", "active": 3, "draining": 0, "forced": 0},
                {"listener": "admin", "protocol": "http", "active": 1, "draining": 0, "forced": 0}],
            "upgrades": {"attempted": 2, "succeeded": 0, "failed": 1, "refused": 1,
                "last_failure": {"reason": "successor pid 9 timed out", "phase": "startup", "at_unix": 1},
                "last_handoff": null, "rollbacks": 1,
                "last_rollback": {"successor_pid": 4243, "status": "signal: 9 (SIGKILL)", "after_commit_ms": 212.0, "at_unix": 2},
                "arrival": {"predecessor_pid": 4001, "adopted_to_ready_ms": 12.5, "ready_to_commit_ms": 0.31}},
            "migrated_in": {"batches": 2, "connections": 300, "refused": 1},
        });
        let table = status(&reply);
        for expected in [
            "pid         4100",
            "uptime      1h 02m 05s",
            "draining    pid 4001 (generation 1, 12.0s, 3 connections)",
            "http                tcp_listener    127.0.0.1:8081              inherited",
            "web                 http               3         0       0",
            "admin               http               1         0       0",
            "attempted 2, succeeded 0, failed 1, refused 1",
            "last failure (phase startup): successor pid 9 timed out",
            "rollbacks   1: the last pid 4243 died (signal: 9 (SIGKILL)) 212.0 ms after its commit; taken back",
            "arrived from pid 4001: adopted -> ready 12.5 ms, ready -> commit 0.3 ms",
            "migrated in 300 connections in 2 batches, 1 refused (drained by the predecessor)",
        ] {
            assert!(table.contains(expected), "{expected:?} not in\n{table}");
        }
    }
}
