//! `handoverctl` as an operator uses it: its exit statuses, its output, and the counters of
//! `status`, against a real server.

// The library's process-test helpers (spawn an example, wait for it, clean up its group).
#[path = "../../tests/common/mod.rs"]
mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{example, Server};
use serde_json::Value;

fn ctl(args: &[&str]) -> Output {
    Command::new(handoverctl())
        .args(args)
        .output()
        .expect("running handoverctl")
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn status_json(server: &Server) -> Value {
    let control = server.control_path();
    let output = ctl(&["--control", control.to_str().unwrap(), "status", "--json"]);
    assert_eq!(output.status.code(), Some(0), "{:?}", text(&output));
    serde_json::from_slice(&output.stdout).expect("status --json is one JSON document")
}

#[test]
fn help_usage_and_connection_errors_have_their_exit_statuses() {
    let help = ctl(&["--help"]);
    let (out, _) = text(&help);
    assert_eq!(help.status.code(), Some(0));
    for command in ["upgrade", "status", "stop", "run"] {
        assert!(out.contains(command), "--help does not mention {command}:\n{out}");
    }
    assert_eq!(ctl(&[]).status.code(), Some(2), "no command is a usage error");
    assert_eq!(ctl(&["--control", "/x", "frobnicate"]).status.code(), Some(2));
    assert_eq!(ctl(&["status"]).status.code(), Some(2), "status without --control");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nobody.sock");
    let output = ctl(&["--control", missing.to_str().unwrap(), "status"]);
    let (_, err) = text(&output);
    assert_eq!(output.status.code(), Some(2));
    assert!(err.contains("nobody.sock"), "the error names the socket: {err}");
}

#[test]
fn a_server_that_never_answers_times_out_with_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap(); // accepts (backlog), never answers
    let started = Instant::now();
    let output = ctl(&["--control", path.to_str().unwrap(), "status", "--timeout", "0.5"]);
    let (_, err) = text(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.contains("no answer within 500ms"), "{err}");
}

#[test]
fn upgrade_prints_its_phases_and_status_counts_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let binary = common::copy_binary(&example("tcp_echo"), dir.path());
    let server = Server::start(&binary, &["--listen", "127.0.0.1:0"]);
    let control = server.control_path();
    let control = control.to_str().unwrap();
    let first = server.pid();

    let output = ctl(&["--control", control, "upgrade"]);
    let (out, err) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{out}{err}");
    let phases = [
        "spawning the successor",
        "sending the sockets",
        "waiting for the successor's hello",
        "the successor adopts the sockets",
        "waiting for the successor to be ready",
        "committing to the ready successor",
        "upgraded: pid",
    ];
    let positions: Vec<Option<usize>> = phases.iter().map(|p| out.find(p)).collect();
    assert!(
        positions.iter().all(Option::is_some) && positions.windows(2).all(|w| w[0] < w[1]),
        "every phase, in order:\n{out}"
    );
    let successor = server.wait_for_log(|l| l.contains("successor started"));
    assert!(
        out.contains("upgraded: pid") && out.contains("generation 2"),
        "{out}\n{successor}"
    );
    server.wait_for_log(|l| l.contains("predecessor exited"));

    // One client connected: counted as an active Echo connection of the new generation.
    let _client = std::net::TcpStream::connect(server.address("echo")).unwrap();
    let status = common::wait_until(
        "the connection is counted",
        || status_json(&server),
        |s| s["connections"][0]["active"] == 1,
    );
    assert_eq!(status["generation"], 2);
    assert_eq!(status["connections"][0]["protocol"], "tcp");
    assert_eq!(status["connections"][0]["listener"], "echo");
    assert_eq!(status["upgrades"]["arrival"]["predecessor_pid"], first);
    assert!(status["uptime_s"].as_f64().unwrap() > 0.0);
    let echo = status["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "echo")
        .unwrap();
    assert_eq!(echo["origin"], "inherited");

    // The table, through the positional alias.
    let output = ctl(&[control, "status"]);
    let (table, _) = text(&output);
    assert_eq!(output.status.code(), Some(0));
    // Counted across generations: the upgrade that brought generation 2 in.
    for expected in ["generation  2", "state       ready", "inherited", "tcp", "attempted 1"] {
        assert!(table.contains(expected), "{expected:?} not in\n{table}");
    }

    // A failing successor: exit 1 with the reason, counted with its phase.
    common::replace_with_script(&binary, "exit 3");
    let output = ctl(&["--control", control, "upgrade"]);
    let (_, err) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(err.contains("exited") && err.contains('3'), "the reason: {err}");
    let upgrades = status_json(&server)["upgrades"].clone();
    assert_eq!(
        (upgrades["attempted"].as_u64(), upgrades["failed"].as_u64()),
        (Some(2), Some(1))
    );
    assert!(upgrades["last_failure"]["phase"].is_string(), "{upgrades}");
    assert!(
        upgrades["last_failure"]["reason"].as_str().unwrap().contains("exited"),
        "{upgrades}"
    );

    // --json: the raw answer, one line, and still exit 1.
    let output = ctl(&["--control", control, "upgrade", "--json"]);
    assert_eq!(output.status.code(), Some(1));
    let reply: Value = serde_json::from_slice(&output.stdout).expect("one JSON line");
    assert_eq!(reply["ok"], false);
    assert!(reply["error"].as_str().unwrap().contains("exited"), "{reply}");

    let output = ctl(&["--control", control, "stop"]);
    assert_eq!(output.status.code(), Some(0), "{:?}", text(&output));
}

/// The CLI this package builds.
fn handoverctl() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_handoverctl"))
}
