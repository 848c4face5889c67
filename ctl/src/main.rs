//! `tandemctl`: Tandem's command line. One module per subcommand.

mod agent;
mod lease;
mod probe;
mod render;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Tandem's command line: probe applications, manage lease areas, and
/// drive the agents.
#[derive(Debug, Parser)]
#[command(name = "tandemctl", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    connection: agent::Connection,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Probe an application once, like a Nagios plugin (exit 0 OK, 1 WARNING,
    /// 2 CRITICAL, 3 UNKNOWN).
    Probe(probe::ProbeArgs),
    /// Disk-fencing leases: initialise and inspect a lease area, run a command under a lease.
    Lease(lease::LeaseArgs),
    /// Show the cluster as the agent sees it: nodes, groups, resources, monitors.
    #[command(after_help = AGENT_EXIT)]
    Status {
        /// One JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Start, stop, move a failover group, or reset its counters.
    #[command(subcommand, after_help = AGENT_EXIT)]
    Group(agent::GroupVerb),
    /// Suspend or resume acting on a group's monitor failures.
    #[command(subcommand, after_help = AGENT_EXIT)]
    Monitor(agent::MonitorVerb),
    /// Put a node in standby (planned maintenance) or bring it back online.
    #[command(subcommand, after_help = AGENT_EXIT)]
    Node(agent::NodeVerb),
    /// Follow the agent's events until Ctrl-C.
    #[command(after_help = AGENT_EXIT)]
    Events {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Planned shutdown of the agent's node: stop or move every group, then
    /// say whether the node is safe to power off (needs the `host` role).
    #[command(after_help = "Exit status: 0 safe to power off, 1 refused or not safe, 64 usage, 69 agent unreachable.")]
    ShutdownPrepare {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Host agent: every host of the cluster, its state and the capacity its HA VMs use.
    #[command(after_help = AGENT_EXIT)]
    Hosts {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Host agent: every HA VM, where it runs, and why not when it does not; VMs that fit nowhere.
    #[command(after_help = AGENT_EXIT)]
    Vms {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Host agent: start, stop or move an HA VM.
    #[command(subcommand, after_help = AGENT_EXIT)]
    Vm(agent::VmVerb),
    /// Host agent: planned maintenance of a host (its VMs leave without any failover).
    #[command(
        subcommand,
        after_help = "Exit status: 0 done (with --wait: the host holds no HA VM / every parked VM runs again), \
                      1 rejected or not complete, 64 usage, 69 agent unreachable."
    )]
    Maintenance(agent::MaintenanceVerb),
    /// Host agent: the domains this host's hypervisor has, HA or not (its own view).
    #[command(after_help = AGENT_EXIT)]
    Domains {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

const AGENT_EXIT: &str = "Exit status: 0 ok, 1 rejected by the agent, 64 usage, 69 agent unreachable.";

/// The subcommands that talk to an agent.
const AGENT_VERBS: [&str; 11] = [
    "status",
    "group",
    "monitor",
    "node",
    "events",
    "shutdown-prepare",
    "hosts",
    "vms",
    "vm",
    "domains",
    "maintenance",
];

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
            // Global options may come first: the subcommand is the first known name.
            let verb = argv
                .iter()
                .skip(1)
                .filter_map(|a| a.to_str())
                .find(|a| ["probe", "lease"].contains(a) || AGENT_VERBS.contains(a));
            return match verb {
                Some("probe") => ExitCode::from(3),
                Some("lease") => ExitCode::from(lease::EXIT_USAGE as u8),
                Some(_) => ExitCode::from(agent::EXIT_USAGE),
                None => ExitCode::from(2),
            };
        }
    };
    match cli.command {
        Command::Probe(args) => probe::run(args),
        Command::Lease(args) => ExitCode::from(lease::main(args).clamp(0, 255) as u8),
        Command::Status { json } => agent::run(cli.connection, agent::Verb::Status { json }),
        Command::Group(g) => agent::run(cli.connection, agent::Verb::Group(g)),
        Command::Monitor(m) => agent::run(cli.connection, agent::Verb::Monitor(m)),
        Command::Node(n) => agent::run(cli.connection, agent::Verb::Node(n)),
        Command::Events { json } => agent::run(cli.connection, agent::Verb::Events { json }),
        Command::ShutdownPrepare { json } => agent::run(cli.connection, agent::Verb::ShutdownPrepare { json }),
        Command::Hosts { json } => agent::run(cli.connection, agent::Verb::Hosts { json }),
        Command::Vms { json } => agent::run(cli.connection, agent::Verb::Vms { json }),
        Command::Vm(v) => agent::run(cli.connection, agent::Verb::Vm(v)),
        Command::Domains { json } => agent::run(cli.connection, agent::Verb::Domains { json }),
        Command::Maintenance(m) => agent::run(cli.connection, agent::Verb::Maintenance(m)),
    }
}
