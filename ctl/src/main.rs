//! tandemctl: Tandem's command line. One module per subcommand.

use clap::{Parser, Subcommand};

mod lease;

/// Tandem's command line.
#[derive(Debug, Parser)]
#[command(name = "tandemctl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Disk-fencing leases: initialise and inspect a lease area, run a command under a lease.
    Lease(lease::LeaseArgs),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            std::process::exit(if usage { lease::EXIT_USAGE } else { 0 });
        }
    };
    let code = match cli.command {
        Command::Lease(args) => lease::main(args),
    };
    std::process::exit(code);
}
