//! Starting an agent: from a checked configuration to a running engine task with every part
//! attached (resources, lease service with its guard, membership, monitors, fencing).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tandem_config::ClusterConfig;
use tandem_engine::{Engine, Event, GroupId, NodeId, ResourceId};
use tandem_membership::MembershipEvent;
use tandem_membership::runtime::{MembershipHandle, RuntimeConfig};
use tandem_monitors::SecretSource;

use crate::api::{ApiServer, peer};
use crate::control::AgentControl;
use crate::plan::{Plan, PlanError};
use crate::resources::{self, Resource, ResourceEnv, ResourceFactory};
use crate::runtime::leases::{self, LeaseServiceConfig, MembershipHooks};
use crate::runtime::{
    self, AgentEvent, AgentHandle, Driver, EventKind, Exit, Input, MonitorTable, Parts, ResourceTable,
};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration cannot run on this node.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A resource could not be set up.
    #[error("group `{group}`, resource `{resource}`")]
    Resource {
        /// The group.
        group: String,
        /// The resource.
        resource: String,
        /// Why.
        #[source]
        source: resources::ResourceError,
    },
    /// The heartbeat key is missing or unreadable.
    #[error(
        "cannot read the cluster key: set [cluster].key_file to a file holding at least 16 random characters (the same on every node)"
    )]
    Key(#[source] Option<tandem_monitors::secret::SecretError>),
    /// The lease disk cannot be opened.
    #[error("cannot open the lease device {0}")]
    Disk(PathBuf, #[source] tandem_lease::DiskError),
    /// A group's cgroup cannot be created.
    #[error("cannot create the cgroup of group `{0}`")]
    Cgroup(String, #[source] std::io::Error),
    /// The lease service failed to start.
    #[error(transparent)]
    Lease(#[from] leases::LeaseServiceError),
    /// A node's fence method is unusable.
    #[error(transparent)]
    Fence(#[from] crate::fence::FencerConfigError),
    /// The API server failed to start.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// Membership failed to start.
    #[error("cannot start the heartbeat links")]
    Membership(#[from] tandem_membership::runtime::RuntimeError),
    /// The persisted standby cannot be read.
    #[error(transparent)]
    Standby(#[from] runtime::standby::StandbyStateError),
}

/// What an agent's own API service may use (see [`AgentOptions::api_extensions`]).
#[derive(Clone)]
pub struct ApiContext {
    /// The running node, as the node API sees it.
    pub control: Arc<dyn crate::api::Control>,
    /// Whether this node's host lease is valid at this instant: false once it expired, even
    /// before the lease service noticed (a process that was paused must not answer as if it
    /// still held anything).
    pub lease_valid: Arc<dyn Fn() -> bool + Send + Sync>,
    /// The plan the node runs.
    pub plan: Arc<Plan>,
}

impl std::fmt::Debug for ApiContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiContext").field("node", &self.plan.my_name).finish_non_exhaustive()
    }
}

/// Builds an extra gRPC service for the node's API listener.
pub type ApiExtension = Arc<dyn Fn(&ApiContext) -> crate::api::ExtraService + Send + Sync>;

/// How to start an agent.
#[derive(Clone)]
pub struct AgentOptions {
    /// This node's name in the configuration.
    pub node: String,
    /// The program that runs the fencing guard (`<this binary> guard`).
    pub guard_program: PathBuf,
    /// Arguments for it.
    pub guard_args: Vec<String>,
    /// Where group cgroups are created (a directory on a cgroup2 mount); `None` finds the
    /// cgroup2 mount and uses `<mount>/tandem/<cluster>`. Without cgroup2, process groups
    /// are the only kill handle (daemons that leave their process group can then escape).
    pub cgroup_root: Option<PathBuf>,
    /// Builds this agent's resources from the configuration.
    pub resources: Arc<dyn ResourceFactory>,
    /// The agent's own gRPC services, served next to the node API.
    pub api_extensions: Vec<ApiExtension>,
    /// How `host-cluster` fence methods reach the host cluster (the guest agent's host link,
    /// [`crate::link::GuestLink::fencing`]); `None`: every such fence fails.
    pub host_cluster: Option<Arc<dyn crate::fence::HostClusterFencing>>,
}

impl std::fmt::Debug for AgentOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentOptions")
            .field("node", &self.node)
            .field("guard_program", &self.guard_program)
            .field("cgroup_root", &self.cgroup_root)
            .field("resources", &self.resources)
            .field("api_extensions", &self.api_extensions.len())
            .field("host_cluster", &self.host_cluster)
            .finish_non_exhaustive()
    }
}

/// A started agent.
pub struct Agent {
    /// Talks to the running engine task.
    pub handle: AgentHandle,
    /// Ends with the reason the engine task stopped.
    pub task: tokio::task::JoinHandle<Exit>,
    /// The plan it runs.
    pub plan: Arc<Plan>,
    /// Where the API listens.
    pub api_addr: std::net::SocketAddr,
    /// The running node as the API sees it (status, planned shutdown, events).
    pub control: Arc<dyn crate::api::Control>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.plan.my_name)
            .field("api_addr", &self.api_addr)
            .finish_non_exhaustive()
    }
}

/// The floating addresses of the groups this node may run: the guard removes them when it
/// fences, since a node that stopped answering for its lease must also stop answering for
/// the group's address (its kernel would, and the next holder would refuse a duplicate).
fn guarded_addresses(
    config: &ClusterConfig,
    node: &str,
) -> Result<Vec<tandem_lease::guard::GuardedAddress>, tandem_lease::guard::GuardError> {
    let mut out = Vec::new();
    for g in config.groups.iter().filter(|g| g.nodes.iter().any(|n| n == node)) {
        for r in &g.resources {
            if let tandem_config::ResourceKind::Ip(ip) = &r.kind {
                out.push(tandem_lease::guard::GuardedAddress::new(&ip.interface, &ip.address.to_string())?);
            }
        }
    }
    Ok(out)
}

/// Starts an agent. Joining the lockspace takes a few seconds (it must prove no other node
/// uses this node's host id).
pub async fn start(config: ClusterConfig, opts: AgentOptions) -> Result<Agent, AgentError> {
    let plan = Arc::new(Plan::new(&config, &opts.node)?);
    let lease_cfg = config.lease.clone().ok_or(PlanError::NoLease)?;
    let key = match &config.cluster.key_file {
        Some(f) => SecretSource::File(f.clone()).resolve().map_err(|e| AgentError::Key(Some(e)))?,
        None => return Err(AgentError::Key(None)),
    };

    // One cgroup per group: every process a resource starts goes there, so the guard and
    // forced stops can kill daemons that left their process group.
    let cg_root = match &opts.cgroup_root {
        Some(r) => Some(r.clone()),
        None => tandem_lease::cgroup::cgroup2_mount().ok().map(|m| m.join("tandem").join(&config.cluster.name)),
    };
    let mut cgroups = BTreeMap::new();
    if let Some(root) = &cg_root {
        for g in &config.groups {
            let dir = root.join(&g.name);
            std::fs::create_dir_all(&dir).map_err(|e| AgentError::Cgroup(g.name.clone(), e))?;
            cgroups.insert(GroupId(g.name.clone()), dir);
        }
    } else {
        tracing::warn!(target: "tandem_node", "no cgroup2 mount: self-fencing kills process groups only");
    }

    let guard_access = resources::GuardAccess::default();
    let lease_check = resources::LeaseCheck::default();
    let mut built: Vec<(GroupId, ResourceId, Arc<dyn Resource>)> = Vec::new();
    for g in &config.groups {
        let gid = GroupId(g.name.clone());
        let mut env =
            ResourceEnv::new(opts.node.clone()).with_guard(guard_access.clone()).with_lease(lease_check.clone());
        if let Some(cg) = cgroups.get(&gid) {
            env = env.with_cgroup(cg.clone());
        }
        for r in &g.resources {
            let res = opts.resources.build(&g.name, r, &env).map_err(|source| AgentError::Resource {
                group: g.name.clone(),
                resource: r.name.clone(),
                source,
            })?;
            built.push((gid.clone(), ResourceId(r.name.clone()), Arc::from(res)));
        }
    }

    let standby_file =
        runtime::standby::state_file(config.cluster.state_dir.as_deref(), &config.cluster.name, &opts.node);
    let standby = runtime::standby::load(&standby_file)?;
    let (handle, rx, tx) = runtime::channel();

    let mut membership = MembershipHandle::start(RuntimeConfig {
        membership: plan.membership.clone(),
        cluster_name: config.cluster.name.clone(),
        key,
        incarnation: None,
        ping_interval: Duration::from_secs(1),
        ping_timeout: Duration::from_millis(500),
    })
    .await?;
    let ctl = membership.controller();
    // As early as possible: peers must not rank a node in maintenance as a candidate.
    ctl.set_standby(standby.is_some());

    let disk: Arc<dyn tandem_lease::LeaseDisk> = Arc::new(
        tandem_lease::FileDisk::open(&lease_cfg.device).map_err(|e| AgentError::Disk(lease_cfg.device.clone(), e))?,
    );
    let mut guard = std::process::Command::new(&opts.guard_program);
    guard.args(&opts.guard_args);
    let lease_service = LeaseServiceConfig {
        disk,
        cluster: config.cluster.name.clone(),
        me: plan.me,
        groups: plan.model.groups.iter().map(|g| g.id.clone()).collect(),
        nodes: plan.model.nodes.clone(),
        guard,
        cgroups: cgroups.values().cloned().collect(),
        guard_access,
        watchdog: lease_cfg.watchdog.clone(),
        addresses: guarded_addresses(&config, &opts.node)
            .map_err(|e| AgentError::Lease(leases::LeaseServiceError::Guard(e)))?,
    };
    let hooks = {
        let (c1, c3) = (ctl.clone(), ctl.clone());
        MembershipHooks {
            disk_liveness: Box::new(move |n, alive| c1.disk_liveness(tandem_membership::NodeId(n.0), alive)),
            tie_break: Box::new(move |won| c3.tie_break(won)),
        }
    };
    let lease_tx = tx.clone();
    let leases = tokio::task::spawn_blocking(move || leases::start(lease_service, hooks, lease_tx))
        .await
        .expect("the lease service start does not panic")?;

    // Membership events become engine events.
    {
        let tx = tx.clone();
        let tie_break = leases.clone();
        let plan = plan.clone();
        tokio::spawn(async move {
            while let Some(first) = membership.next_event().await {
                // The core publishes a peer's silence before the quorum change it causes;
                // the engine must learn about lost quorum first, or it could act on the
                // silent peer (request a fence, take over) as if it still had quorum.
                let mut batch = vec![first];
                while let Some(ev) = membership.try_next_event() {
                    batch.push(ev);
                }
                batch.sort_by_key(|ev| !matches!(ev, MembershipEvent::QuorumLost));
                for ev in batch {
                    let input = match ev {
                        MembershipEvent::NodeJoined { node, .. } => Input::Engine(Event::NodeJoined(NodeId(node.0))),
                        // The engine's "lost" means silent on every link: whether the node's lease
                        // is dead comes separately (PeerFenced). A partitioned node is exactly
                        // that, and it must count as unreachable at once, or a lease-dead
                        // observation could be mistaken for a reachable node that stopped itself.
                        MembershipEvent::NodeLost { node } => Input::Engine(Event::NodeLost(NodeId(node.0))),
                        MembershipEvent::NodePartitioned { node } => {
                            let _ = tx.send(Input::Publish(AgentEvent {
                                at_ms: 0,
                                group: None,
                                resource: None,
                                kind: EventKind::Membership,
                                message: describe(&plan, &ev),
                                detail: None,
                            }));
                            Input::Engine(Event::NodeLost(NodeId(node.0)))
                        }
                        MembershipEvent::PeerStandby { node, standby } => {
                            Input::Engine(Event::PeerStandby { node: NodeId(node.0), standby })
                        }
                        MembershipEvent::QuorumLost => Input::Engine(Event::QuorumLost),
                        MembershipEvent::QuorumRegained => Input::Engine(Event::QuorumRegained),
                        MembershipEvent::SelfIsolated | MembershipEvent::SelfReconnected => {
                            // An isolated node gives the tie-break up so the peers can form quorum.
                            tie_break.set_tie_break(matches!(ev, MembershipEvent::SelfReconnected));
                            Input::Publish(AgentEvent {
                                at_ms: 0,
                                group: None,
                                resource: None,
                                kind: EventKind::Membership,
                                message: describe(&plan, &ev),
                                detail: None,
                            })
                        }
                        other => Input::Publish(AgentEvent {
                            at_ms: 0,
                            group: None,
                            resource: None,
                            kind: EventKind::Membership,
                            message: describe(&plan, &other),
                            detail: None,
                        }),
                    };
                    if tx.send(input).is_err() {
                        return;
                    }
                }
            }
            membership.stop().await;
        });
    }

    let builtin: BTreeMap<(GroupId, ResourceId), Arc<dyn Resource>> =
        built.iter().map(|(g, r, res)| ((g.clone(), r.clone()), res.clone())).collect();
    let monitors = MonitorTable::new(&config, builtin, tx.clone());
    let valid = leases.clone();
    let lease_valid: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(move || valid.is_valid_now());
    lease_check.attach(lease_valid.clone());
    let resources = ResourceTable::new(built, cgroups, lease_valid.clone());

    let quorum_view = ctl.clone();
    let fencer = crate::fencing::FenceService::new(
        &config,
        &plan,
        tx.clone(),
        Arc::new(move || quorum_view.view().quorum),
        opts.host_cluster.clone(),
    )?;
    let peers_view = ctl.clone();
    let flag = ctl.clone();
    let parts = Parts {
        standby_flag: Box::new(move |on| flag.set_standby(on)),
        standby_file,
        standby,
        plan: plan.clone(),
        resources,
        monitors,
        leases,
        fence: fencer,
        forward: forwarder(&config, &plan),
        peers: Box::new(move || peers_view.view().peers),
    };
    let engine = Engine::new(plan.me, plan.model.clone()).map_err(PlanError::from)?;
    let driver = Driver::new(engine, parts, &handle);

    // The API, on this node's own `api` address when the node has one.
    let mut settings = config.api.clone();
    if let Some(addr) = config.node(&opts.node).and_then(|n| n.api) {
        settings.listen = addr;
    }
    let control: Arc<dyn crate::api::Control> = Arc::new(AgentControl::new(handle.clone(), plan.clone()));
    let mut api = ApiServer::new(&settings, control.clone())?;
    let context = ApiContext { control: control.clone(), lease_valid, plan: plan.clone() };
    for extension in &opts.api_extensions {
        api = api.with_service(extension(&context));
    }
    let api = api.bind().await?;
    let api_addr = api.local_addr();
    tracing::info!(target: "tandem_node", "API listening on {api_addr}");
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        if let Err(e) = api
            .serve(async move {
                let _ = api_stopped.await;
            })
            .await
        {
            tracing::error!(target: "tandem_node", "API server: {e}");
        }
    });
    let task = tokio::spawn(async move {
        let exit = driver.run(rx).await;
        let _ = stop_api.send(());
        exit
    });
    Ok(Agent { handle, task, plan, api_addr, control })
}

/// Forwards each operator command to every peer that has an `api` address, so that every
/// engine sees it (best effort: a peer that misses it learns the intent from the lease note).
fn forwarder(config: &ClusterConfig, plan: &Plan) -> crate::runtime::Forward {
    let peers: Vec<(String, std::net::SocketAddr)> = config
        .nodes
        .iter()
        .filter(|n| n.name != plan.my_name)
        .filter_map(|n| n.api.map(|a| (n.name.clone(), a)))
        .collect();
    let settings = config.api.clone();
    Box::new(move |seq, req| {
        for (name, addr) in peers.clone() {
            let (req, settings) = (req.clone(), settings.clone());
            tokio::spawn(async move {
                let res = async {
                    let mut client = peer::connect(&name, addr, &settings, Duration::from_secs(2)).await?;
                    peer::deliver(&mut client, &name, seq, &req).await
                }
                .await;
                if let Err(e) = res {
                    tracing::warn!(target: "tandem_node", "operator command {seq} not delivered to {name}: {e}");
                }
            });
        }
    })
}

fn describe(plan: &Plan, ev: &MembershipEvent) -> String {
    match ev {
        MembershipEvent::LinkUp { node, link } => {
            format!("link {} to {} is up", plan.membership.links[*link], plan.name_of(NodeId(node.0)))
        }
        MembershipEvent::LinkDown { node, link } => {
            format!("link {} to {} is down", plan.membership.links[*link], plan.name_of(NodeId(node.0)))
        }
        MembershipEvent::NodePartitioned { node } => format!(
            "{} is silent on every link but its host lease is alive: its groups stay where they are",
            plan.name_of(NodeId(node.0))
        ),
        MembershipEvent::SelfIsolated => "this node hears no peer: it considers itself isolated".into(),
        MembershipEvent::SelfReconnected => "this node hears peers again".into(),
        other => format!("{other:?}"),
    }
}

/// This node's name when none is given: the kernel's host name.
pub fn default_node_name() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")?.trim().to_string())
}

/// Runs a started agent until it ends by itself or SIGTERM/SIGINT asks for an orderly stop
/// (every group here stopped, leases released), and logs why it ended.
pub async fn run_until_stopped(agent: Agent) -> Result<Exit, RunError> {
    let handle = agent.handle.clone();
    let mut task = agent.task;
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(RunError::Signals)?;
    let exit = tokio::select! {
        exit = &mut task => exit,
        _ = tokio::signal::ctrl_c() => { handle.shutdown().await; task.await }
        _ = term.recv() => { handle.shutdown().await; task.await }
    }
    .map_err(RunError::Panicked)?;
    match &exit {
        Exit::Shutdown => {}
        Exit::SelfFenced(why) => tracing::error!(target: "tandem_node", "self-fenced: {why}"),
        Exit::LeaseLost(why) => tracing::error!(
            target: "tandem_node",
            "host lease lost: {why}; every resource here was force-stopped (any that could not be is logged above)"
        ),
    }
    Ok(exit)
}

/// Why [`run_until_stopped`] could not run the agent to its end.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The signal handlers could not be installed.
    #[error("cannot watch for SIGTERM")]
    Signals(#[source] std::io::Error),
    /// The engine task panicked (a bug).
    #[error("the agent's engine task failed; this is a bug in Tandem, please report it")]
    Panicked(#[source] tokio::task::JoinError),
}
