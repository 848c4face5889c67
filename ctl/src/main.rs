//! `tandemctl`: Tandem's command line.

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
}

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // `probe` follows the Nagios convention: bad arguments are UNKNOWN (3).
            let is_probe = argv.get(1).is_some_and(|a| a == "probe");
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ if is_probe => ExitCode::from(3),
                _ => ExitCode::from(2),
            };
        }
    };
    match cli.command {
        Command::Probe(args) => probe::run(args),
    }
}
