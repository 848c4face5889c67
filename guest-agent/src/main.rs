//! `tandem-guest`: the guest agent.
//!
//! * `tandem-guest --config FILE [--node NAME]` runs the agent.
//! * `tandem-guest validate --config FILE` checks a configuration and exits.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tandem_guest::agent::{self, AgentOptions};
use tandem_guest::runtime::EXIT_CONFIG;
use tandem_node::link::{GuestLink, GuestLinkConfig};

#[derive(Parser, Debug)]
#[command(name = "tandem-guest", version, about = "Tandem's guest agent: failover groups with disk-fencing leases")]
struct Cli {
    /// The cluster configuration (TOML).
    #[arg(long, short, global = true, env = "TANDEM_CONFIG", default_value = "/etc/tandem/tandem.toml")]
    config: PathBuf,
    /// This node's name in the configuration (default: the host name).
    #[arg(long, env = "TANDEM_NODE")]
    node: Option<String>,
    /// Directory on a cgroup2 mount where group cgroups are created (default: found).
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check the configuration: every problem with file:line:column and the field.
    Validate {
        /// Print the normalized configuration as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The fencing guard (started by the agent itself).
    #[command(hide = true)]
    Guard {
        /// Hardware watchdog device to keep alive while the agent pets.
        #[arg(long)]
        watchdog: Option<std::path::PathBuf>,
        /// Milliseconds after a missed kill deadline by which the watchdog fires (M − grace).
        #[arg(long)]
        watchdog_extra_ms: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Guard { watchdog, watchdog_extra_ms }) => {
            // The guard must not depend on anything the agent does: no runtime, no logging setup.
            let options = tandem_lease::guard::GuardOptions { watchdog, watchdog_extra_ms };
            return match tandem_lease::guard::run_guard_on_stdin(&options) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tandem-guard: {e}");
                    ExitCode::from(70)
                }
            };
        }
        Some(Cmd::Validate { json }) => return validate(&cli.config, json),
        None => {}
    }
    init_logging(cli.log_json);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("tandem-guest: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG").unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json { b.json().init() } else { b.init() }
}

fn validate(path: &std::path::Path, json: bool) -> ExitCode {
    match tandem_config::check(path) {
        Ok(checked) => {
            for w in &checked.warnings {
                eprintln!("{w}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&checked.config).expect("the configuration serialises"));
            } else {
                let c = &checked.config;
                println!(
                    "{}: ok: cluster `{}`, {} nodes, {} groups",
                    path.display(),
                    c.cluster.name,
                    c.nodes.len(),
                    c.groups.len()
                );
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// The host link of `[host_link]`, for this node: `None` without the section, or on a node
/// with no VM UUID (a physical server of the cluster).
fn host_link(config: &tandem_config::ClusterConfig, node: &str) -> anyhow::Result<Option<GuestLink>> {
    let Some(settings) = &config.host_link else { return Ok(None) };
    let own_fence = config.node(node).and_then(|n| match &n.fence {
        Some(tandem_config::FenceMethod::HostCluster(h)) => Some(h.vm_uuid.clone()),
        _ => None,
    });
    let Some(vm_uuid) = settings.vm_uuid.clone().or(own_fence) else {
        tracing::info!("[host_link]: node {node} has no VM UUID (no vm_uuid, no host-cluster fence): no host link");
        return Ok(None);
    };
    let key = tandem_node::link::proof::read_key(&settings.key_file)
        .with_context(|| format!("[host_link] key_file {}", settings.key_file.display()))?;
    let tls = settings.tls.as_ref().map(tandem_node::link::LinkTls::load).transpose().context("[host_link.tls]")?;
    Ok(Some(GuestLink::new(GuestLinkConfig {
        address: settings.address.clone(),
        vm_uuid,
        key,
        heartbeat_interval: settings.heartbeat_interval,
        cluster: config.cluster.name.clone(),
        node: node.to_string(),
        tls,
    })))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = match tandem_config::load(&cli.config) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let node = match cli.node {
        Some(n) => n,
        None => agent::default_node_name().context("cannot read the host name; pass --node")?,
    };
    let link = host_link(&config, &node)?;
    let opts = AgentOptions {
        node,
        guard_program: std::env::current_exe().context("cannot find this program's path for the guard")?,
        guard_args: vec!["guard".into()],
        cgroup_root: cli.cgroup_root,
        resources: std::sync::Arc::new(tandem_guest::resources::GuestResources),
        api_extensions: Vec::new(),
        host_cluster: link.as_ref().map(|l| l.fencing()),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start tokio")?;
    rt.block_on(async move {
        let agent = agent::start(config, opts).await?;
        let _link = link.map(|l| l.spawn(agent.control.clone()));
        let exit = agent::run_until_stopped(agent).await?;
        Ok(ExitCode::from(exit.status()))
    })
}
