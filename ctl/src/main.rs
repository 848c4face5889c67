//! `tandemctl`: Tandem's command line. One module per subcommand.

mod lease;
mod probe;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Tandem's command line: probe applications, manage lease areas, and
/// drive the agents.
#[derive(Debug, Parser)]
#[command(name = "tandemctl", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Probe an application once, like a Nagios plugin (exit 0 OK, 1 WARNING,
    /// 2 CRITICAL, 3 UNKNOWN).
    Probe(probe::ProbeArgs),
    /// Disk-fencing leases: initialise and inspect a lease area, run a command under a lease.
    Lease(lease::LeaseArgs),
}

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            if !e.use_stderr() {
                return ExitCode::SUCCESS; // --help, --version
            }
            // Each subcommand keeps its own convention for bad arguments:
            // `probe` is a Nagios plugin (3 UNKNOWN), `lease` uses EX_USAGE.
            return match argv.get(1).and_then(|a| a.to_str()) {
                Some("probe") => ExitCode::from(3),
                Some("lease") => ExitCode::from(lease::EXIT_USAGE as u8),
                _ => ExitCode::from(2),
            };
        }
    };
    match cli.command {
        Command::Probe(args) => probe::run(args),
        Command::Lease(args) => ExitCode::from(lease::main(args).clamp(0, 255) as u8),
    }
}
