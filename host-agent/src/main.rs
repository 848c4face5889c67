//! `tandem-host`: the host agent.
//!
//! * `tandem-host --config FILE [--node NAME]` runs the agent on one hypervisor host.
//! * `tandem-host validate --config FILE` checks a configuration and exits.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tandem_host::cluster::{HostCluster, HostClusterError};
use tandem_host::hypervisor::Hypervisor;
use tandem_host::hypervisor::libvirt::LibvirtHypervisor;
use tandem_node::agent::{self, AgentOptions};
use tandem_node::runtime::EXIT_CONFIG;

#[derive(Parser, Debug)]
#[command(name = "tandem-host", version, about = "Tandem's host agent: HA VMs failed over between hypervisors")]
struct Cli {
    /// The cluster configuration (TOML).
    #[arg(long, short, global = true, env = "TANDEM_CONFIG", default_value = "/etc/tandem/host.toml")]
    config: PathBuf,
    /// This host's name in the configuration (default: the host name).
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
    /// Check the configuration: every problem with file:line:column and the field, then
    /// what a host agent needs (hypervisor URIs, one VM per group, domain XML files).
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
            eprintln!("tandem-host: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG").unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json { b.json().init() } else { b.init() }
}

fn print_host_errors(path: &Path, errors: &[HostClusterError]) {
    for e in errors {
        let mut line = format!("{}: error: {e}", path.display());
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            line += &format!(": {s}");
            source = s.source();
        }
        eprintln!("{line}");
    }
}

fn print_host_errors_any(path: &Path, e: &dyn std::error::Error) {
    let mut line = format!("{}: error: {e}", path.display());
    let mut source = e.source();
    while let Some(s) = source {
        line += &format!(": {s}");
        source = s.source();
    }
    eprintln!("{line}");
}

fn validate(path: &Path, json: bool) -> ExitCode {
    let checked = match tandem_config::check(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for w in &checked.warnings {
        eprintln!("{w}");
    }
    let cluster = match HostCluster::new(&checked.config) {
        Ok(c) => c,
        Err(errors) => {
            print_host_errors(path, &errors);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&checked.config).expect("the configuration serialises"));
    } else {
        let c = &checked.config;
        println!(
            "{}: ok: cluster `{}`, {} hosts, {} HA VMs",
            path.display(),
            c.cluster.name,
            c.nodes.len(),
            cluster.vms.len()
        );
    }
    ExitCode::SUCCESS
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = match tandem_config::load(&cli.config) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let cluster = match HostCluster::new(&config) {
        Ok(c) => c,
        Err(errors) => {
            print_host_errors(&cli.config, &errors);
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let node = match cli.node {
        Some(n) => n,
        None => agent::default_node_name().context("cannot read the host name; pass --node")?,
    };
    let Some(uri) = cluster.hypervisors.get(&node).cloned() else {
        eprintln!(
            "{}: error: no [[node]] named `{node}`; pass --node with one of the configured hosts",
            cli.config.display()
        );
        return Ok(ExitCode::from(EXIT_CONFIG));
    };
    let config = tandem_host::cluster::with_vm_demands(config, &cluster);
    let links = match tandem_host::link::linked_vms(&config, &cluster) {
        Ok(vms) => tandem_host::link::LinkRegistry::new(node.clone(), vms),
        Err(e) => {
            print_host_errors_any(&cli.config, &e);
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start tokio")?;
    rt.block_on(async move {
        let hypervisor: Arc<dyn Hypervisor> = Arc::new(
            LibvirtHypervisor::connect(&uri).await.with_context(|| format!("cannot open the hypervisor {uri}"))?,
        );
        tracing::info!("hypervisor {uri} connected");
        // Guest fencing: the fencer marks what it powers off, so that the VM resources report
        // a fenced VM as failed (and the cluster recovers it) rather than stopped by hand.
        // Guests ask for it over their links.
        let fencer = tandem_host::fence::VmFencer::new(&node, &config, &cluster, hypervisor.clone());
        links.set_fence_handler(Arc::new(fencer.clone()));
        // A planned stop of a VM asks its linked guest agent to move or stop its groups first.
        // Planned handovers (moves, failbacks, maintenance with the migrate policy)
        // live-migrate to the hosts that can receive it.
        let resources = tandem_host::vm::HostResources::new(hypervisor.clone())
            .with_fence_marks(fencer.marks())
            .with_guest_links(links.clone())
            .with_guests(links.clone())
            .with_migration(tandem_host::vm::Migration::new(&node, cluster.migration_uris.clone()));
        let stop_links = tokio_util::sync::CancellationToken::new();
        tandem_host::link::serve(links.clone(), config.guest_link.as_ref(), stop_links.clone()).await?;
        let maintenance = tandem_host::maintenance::maintenance_api(tandem_host::maintenance::MaintenanceSetup {
            hosts: config.nodes.iter().map(|n| (n.name.clone(), n.api)).collect(),
            api: config.api.clone(),
            hypervisor: hypervisor.clone(),
            vms: tandem_host::cluster::vm_facts(&cluster),
            activity: resources.activity(),
            gate: resources.stop_gate(),
            migration: resources.migration(),
        });
        // Watched before the node starts: a host whose network is down must not start the
        // VMs that need it.
        let nic = if config.networks.is_empty() {
            None
        } else {
            Some(
                tandem_host::nic::NicMonitor::start(config.networks.clone())
                    .await
                    .context("cannot watch the [[network]]s' interfaces")?,
            )
        };
        let vm_networks: std::collections::BTreeMap<String, Vec<String>> =
            cluster.vms.iter().map(|v| (v.group.clone(), v.networks.clone())).collect();
        let stale_copies = (hypervisor.clone(), node.clone());
        let opts = AgentOptions {
            resources: Arc::new(resources),
            node,
            guard_program: std::env::current_exe().context("cannot find this program's path for the guard")?,
            guard_args: vec!["guard".into()],
            cgroup_root: cli.cgroup_root,
            api_extensions: vec![
                tandem_host::api::host_api_full(
                    hypervisor.clone(),
                    tandem_host::cluster::host_facts(&config),
                    tandem_host::cluster::vm_facts(&cluster),
                    Some(fencer),
                    Some(links),
                ),
                maintenance,
            ],
            host_cluster: None,
        };
        // The node takes its first decisions right after it starts: have every network read
        // by then, so that vetoes are in place at once.
        let mut nic = nic;
        if let Some(m) = &mut nic
            && !m.first_readings(config.networks.len(), std::time::Duration::from_secs(10)).await
        {
            tracing::warn!(target: "tandem_host", "not every [[network]] could be read within 10 s; starting anyway");
        }
        let agent = agent::start(config, opts).await?;
        if let Some(nic) = nic {
            tokio::spawn(tandem_host::nic::apply_vetoes(nic, vm_networks, agent.handle.clone()));
        }
        // Paused copies a live migration left here for nobody (see tandem_host::handover).
        let vm_uuids = cluster.vms.iter().map(|v| (v.group.clone(), v.definition.uuid)).collect();
        tokio::spawn(tandem_host::handover::discard_stale_copies(
            stale_copies.0,
            stale_copies.1,
            vm_uuids,
            agent.handle.clone(),
        ));
        let exit = agent::run_until_stopped(agent).await?;
        stop_links.cancel();
        Ok(ExitCode::from(exit.status()))
    })
}
