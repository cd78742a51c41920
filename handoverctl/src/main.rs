//! `handoverctl`: drives a handoff server through its control socket, and supervises one as a
//! container's entrypoint.
//!
//! ```text
//! handoverctl --control /run/myserver.ctl upgrade   # a line per phase, then the result
//! handoverctl --control /run/myserver.ctl status    # a table; --json for the raw answer
//! handoverctl --control /run/myserver.ctl stop      # a final stop; again: the deadline is now
//! handoverctl run -- /usr/local/bin/myserver --listen 0.0.0.0:8080
//! handoverctl /run/myserver.ctl upgrade             # the older positional form, still accepted
//! ```
//!
//! Exit status: 0 on success; 1 when the server answers that the command failed (with its
//! reason on stderr); 2 on a usage error, when the socket cannot be reached, or when no
//! answer comes within the timeout (the outcome is then unknown: ask `status`).

mod notify;
mod supervisor;
mod table;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use handover::control::Client;
use serde_json::Value;

/// Drives a handoff server through its control socket, or supervises one (`run`).
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Exit status: 0 success; 1 the server reports a failure; 2 usage, connection or timeout."
)]
struct Cli {
    /// The server's control socket (its `--control PATH`).
    #[arg(long, global = true, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Seconds to wait for the connection to the control socket.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 5.0)]
    connect_timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Upgrades the server: prints each phase as it begins, then the result.
    Upgrade {
        /// Seconds to wait for the result (the server's own upgrade timeout bounds it too).
        #[arg(long, value_name = "SECS", default_value_t = 120.0)]
        timeout: f64,
        /// Prints the server's answer as JSON (one line), instead of the phases and a summary.
        #[arg(long)]
        json: bool,
    },
    /// Shows the serving process: pid, generation, uptime, state, sockets, connections,
    /// generations still draining, counters.
    Status {
        /// Prints the raw answer (schema: the `handover::control` docs).
        #[arg(long)]
        json: bool,
        /// Seconds to wait for the answer.
        #[arg(long, value_name = "SECS", default_value_t = 10.0)]
        timeout: f64,
    },
    /// A final stop: the server closes its listeners and drains. Again: the deadline is now.
    Stop,
    /// Runs PROGRAM as a supervised server: stays alive across every upgrade (as a container's
    /// PID 1, or as a subreaper), reaps every zombie, forwards SIGTERM, SIGINT, SIGHUP and
    /// SIGUSR2 to the serving generation, and exits with its status when it stops.
    Run {
        /// The server and its arguments.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "PROGRAM"
        )]
        program: Vec<OsString>,
    },
}

const COMMANDS: [&str; 4] = ["upgrade", "status", "stop", "run"];

fn main() -> ExitCode {
    let cli = Cli::parse_from(positional_alias(std::env::args_os().collect()));
    if let Command::Run { program } = &cli.command {
        return supervisor::run(program);
    }
    let Some(path) = cli.control.clone() else {
        eprintln!("handoverctl: --control PATH is required for this command");
        return ExitCode::from(2);
    };
    let client = Client::new(path.clone()).connect_timeout(secs(cli.connect_timeout));
    let outcome = match cli.command {
        Command::Upgrade { timeout, json } => upgrade(&client.read_timeout(Some(secs(timeout))), json),
        Command::Status { json, timeout } => status(&client.read_timeout(Some(secs(timeout))), json),
        Command::Stop => simple(&client.read_timeout(Some(Duration::from_secs(10))), "stop"),
        Command::Run { .. } => unreachable!("handled above"),
    };
    outcome.unwrap_or_else(|error| {
        eprintln!("handoverctl: {}: {error}", path.display());
        ExitCode::from(2)
    })
}

/// `handoverctl PATH COMMAND …` → `handoverctl --control PATH COMMAND …`.
fn positional_alias(mut args: Vec<OsString>) -> Vec<OsString> {
    let is_command = |arg: Option<&OsString>| arg.and_then(|a| a.to_str()).is_some_and(|a| COMMANDS.contains(&a));
    let first_is_path = args.get(1).is_some_and(|a| !a.to_string_lossy().starts_with('-')) && !is_command(args.get(1));
    if first_is_path && is_command(args.get(2)) {
        args.insert(1, "--control".into());
    }
    args
}

fn secs(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
}

fn upgrade(client: &Client, json: bool) -> std::io::Result<ExitCode> {
    let started = Instant::now();
    let reply = client.request_with_progress("upgrade --progress", |line| {
        if !json {
            println!(
                "{:>8.3}s  {}",
                started.elapsed().as_secs_f64(),
                phase_text(&line["phase"])
            );
        }
    })?;
    if json {
        println!("{reply}");
    } else if reply["ok"] == true {
        println!("{:>8.3}s  {}", started.elapsed().as_secs_f64(), table::upgraded(&reply));
    }
    Ok(verdict(&reply))
}

fn phase_text(phase: &Value) -> String {
    match phase.as_str() {
        Some("spawn") => "spawning the successor".into(),
        Some("transfer") => "sending the sockets".into(),
        Some("hello") => "waiting for the successor's hello".into(),
        Some("adoption") => "the successor adopts the sockets".into(),
        Some("startup") => "waiting for the successor to be ready".into(),
        Some("commit") => "committing to the ready successor".into(),
        _ => phase.to_string(),
    }
}

fn status(client: &Client, json: bool) -> std::io::Result<ExitCode> {
    let reply = client.request("status")?;
    if json {
        println!("{reply}");
    } else if reply["ok"] == true {
        print!("{}", table::status(&reply));
    }
    Ok(verdict(&reply))
}

fn simple(client: &Client, command: &str) -> std::io::Result<ExitCode> {
    let reply = client.request(command)?;
    if reply["ok"] == true {
        println!("{}", reply["state"].as_str().unwrap_or("done"));
    }
    Ok(verdict(&reply))
}

/// 0 if the server says `ok`, else 1 with its reason (and phase) on stderr.
fn verdict(reply: &Value) -> ExitCode {
    if reply["ok"] == true {
        return ExitCode::SUCCESS;
    }
    let error = reply["error"].as_str().unwrap_or("the server gave no reason");
    match reply["phase"].as_str() {
        Some(phase) => eprintln!("handoverctl: failed while {}: {error}", phase_text(&Value::from(phase))),
        None => eprintln!("handoverctl: failed: {error}"),
    }
    ExitCode::from(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alias(args: &[&str]) -> Vec<String> {
        let args = args.iter().map(OsString::from).collect();
        positional_alias(args)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn the_positional_form_is_an_alias_of_control() {
        assert_eq!(
            alias(&["h", "/s.ctl", "upgrade"]),
            ["h", "--control", "/s.ctl", "upgrade"]
        );
        assert_eq!(
            alias(&["h", "--control", "/s.ctl", "status"]),
            ["h", "--control", "/s.ctl", "status"]
        );
        assert_eq!(alias(&["h", "run", "--", "status"]), ["h", "run", "--", "status"]);
        assert_eq!(alias(&["h", "upgrade"]), ["h", "upgrade"]);
    }

    #[test]
    fn the_command_line_parses() {
        Cli::command_for_test().debug_assert();
        let cli = Cli::try_parse_from(["h", "run", "--", "/bin/server", "--listen", "x"]).unwrap();
        let Command::Run { program } = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(program, ["/bin/server", "--listen", "x"]);
        let cli = Cli::try_parse_from(["h", "--control", "/s", "upgrade", "--timeout", "3"]).unwrap();
        assert!(matches!(cli.command, Command::Upgrade { timeout, json: false } if timeout == 3.0));
    }

    impl Cli {
        fn command_for_test() -> clap::Command {
            <Self as clap::CommandFactory>::command()
        }
    }
}
