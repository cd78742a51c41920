//! `handoffctl`: drives a handoff server through its control socket.
//!
//! ```text
//! handoffctl /run/myserver.ctl upgrade   # exit 0 once the successor serves, 1 if it failed
//! handoffctl /run/myserver.ctl status
//! handoffctl /run/myserver.ctl stop      # a final stop; again: the drain deadline is now
//! ```

use std::process::ExitCode;

const USAGE: &str = "usage: handoffctl [--control] PATH upgrade|status|stop";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--control").collect();
    let [path, command] = args.as_slice() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match handoff::control::request(path, command) {
        Ok(reply) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&reply).unwrap_or_else(|_| reply.to_string())
            );
            if reply["ok"] == true {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(error) => {
            eprintln!("handoffctl: {path}: {error}");
            ExitCode::from(2)
        }
    }
}
