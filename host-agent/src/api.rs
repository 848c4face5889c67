//! The host agent's own gRPC service, `tandem.v1.HostAgent` (docs/host-agent.md), served
//! next to the node API on the same listener, TLS and roles.
//!
//! The cluster view is derived from the node's status (`GuestStatus`: nodes, groups) and
//! two tables given at construction: the hosts ([`HostFacts`]) and the HA VMs
//! ([`VmFacts`], one failover group each). Any host agent answers for the whole cluster.
//! `ListDomains` is the exception: it is this host's hypervisor's own view, and it is
//! refused while this host's lease has expired (a host that was paused must not report
//! VMs as if it still held them). `DumpVm` acts on this host's hypervisor too, and only
//! on a VM that runs there: elsewhere it names the host that runs it.
//!
//! ```no_run
//! # fn demo(hypervisor: std::sync::Arc<dyn tandem_host::hypervisor::Hypervisor>) {
//! use tandem_host::api::{HostFacts, VmFacts, host_api};
//! let hosts = vec![HostFacts { name: "hv1".into(), id: 1, capacity: Some((65536, 32)) }];
//! let vms = vec![VmFacts {
//!     group: "db".into(),
//!     domain: "db".into(),
//!     uuid: "6f1d0c6e-8d5b-4c1e-9d7a-2b8f3c4d5e6f".into(),
//!     memory_mib: 4096,
//!     vcpus: 2,
//! }];
//! let extension = host_api(hypervisor, hosts, vms);
//! // AgentOptions { api_extensions: vec![extension], .. }
//! # let _ = extension;
//! # }
//! ```

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tandem_config::ApiRole;
use tandem_node::agent::{ApiContext, ApiExtension};
use tandem_node::api::{
    Access, Control, ControlError, ExtraService, OperatorAction, OperatorRequest, lagged_event, pb,
};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::fence::{ASKER_METADATA, FORWARDED_BY_METADATA, VmFencer};
use crate::hypervisor::{DomainInfo, DomainState, Hypervisor, HypervisorError};
use crate::link::LinkRegistry;

use pb::host_agent_server::{HostAgent, HostAgentServer};

/// One HA VM of the cluster, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFacts {
    /// Its failover group (the VM's name in the cluster).
    pub group: String,
    /// The libvirt domain's name.
    pub domain: String,
    /// The domain's UUID.
    pub uuid: String,
    /// Memory it needs, in MiB.
    pub memory_mib: u64,
    /// Virtual CPUs it needs.
    pub vcpus: u32,
}

/// One host of the cluster, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// Its node name.
    pub name: String,
    /// Its node id.
    pub id: u32,
    /// What it offers to HA VMs, `(memory MiB, vCPUs)`, when configured.
    pub capacity: Option<(u64, u32)>,
}

/// Why a `HostAgent` request was refused. Each variant maps to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum HostApiError {
    /// The request names no VM (`INVALID_ARGUMENT`).
    #[error("{call}: `vm` is empty; give the name of a VM (`tandemctl vms` lists them)")]
    NoVm {
        /// The call.
        call: &'static str,
    },
    /// A move names no target host (`INVALID_ARGUMENT`).
    #[error("MoveVm: `to_host` is empty; give the name of the host to run the VM on (`tandemctl hosts` lists them)")]
    NoHost,
    /// No HA VM of that name (`NOT_FOUND`).
    #[error("no VM named {0:?} in this cluster; `tandemctl vms` lists them")]
    UnknownVm(String),
    /// No host of that name (`NOT_FOUND`).
    #[error("no host named {0:?} in this cluster; `tandemctl hosts` lists them")]
    UnknownHost(String),
    /// This host's lease expired (`UNAVAILABLE`).
    #[error("this host's lease expired; its VMs are being destroyed")]
    LeaseExpired,
    /// The hypervisor could not answer (`UNAVAILABLE`).
    #[error("this host's hypervisor could not list its domains: {0}")]
    Hypervisor(String),
    /// A dump names no file, or a relative one (`INVALID_ARGUMENT`).
    #[error("DumpVm: `path` {0:?} is not an absolute path; give the file to write on the host, e.g. /var/tmp/VM.core")]
    DumpPath(String),
    /// The dump path exists already, has `..`, or its directory does not exist.
    #[error(
        "will not dump to {0}: the file must not exist yet (nothing is overwritten), the path must not contain \
         `..`, and its directory must exist on this host"
    )]
    DumpTarget(String),
    /// The VM runs on another host (`FAILED_PRECONDITION`).
    #[error("VM {vm} runs on {host}, not on {me}; send the request to {host}'s agent (tandemctl --endpoint)")]
    RunsElsewhere {
        /// The VM.
        vm: String,
        /// Where it runs.
        host: String,
        /// The answering host.
        me: String,
    },
    /// The VM does not run here and, as far as this host knows, nowhere else
    /// (`FAILED_PRECONDITION`).
    #[error(
        "VM {vm} is not running on {me} ({state}) nor anywhere else this host knows of; there is nothing to act on"
    )]
    NotRunning {
        /// The VM.
        vm: String,
        /// The answering host.
        me: String,
        /// Its domain's state here, in words.
        state: String,
    },
    /// The hypervisor refused or failed the dump (`INTERNAL`, `FAILED_PRECONDITION` when
    /// the domain's state did not allow it, `UNIMPLEMENTED` when the backend cannot dump).
    #[error("the dump of VM {vm} to {path} failed: {detail}")]
    DumpFailed {
        /// The VM.
        vm: String,
        /// The file.
        path: String,
        /// The hypervisor's error with its causes.
        detail: String,
        /// The gRPC code that fits the hypervisor's error.
        code: tonic::Code,
    },
    /// The hypervisor refused or failed a suspend or resume (`FAILED_PRECONDITION` when
    /// the domain's state did not allow it, `UNIMPLEMENTED` when the backend cannot,
    /// `INTERNAL` otherwise).
    #[error("{call} of VM {vm} on {me} failed: {detail}")]
    PauseFailed {
        /// The call.
        call: &'static str,
        /// The VM.
        vm: String,
        /// The answering host.
        me: String,
        /// The hypervisor's error with its causes.
        detail: String,
        /// The gRPC code that fits the hypervisor's error.
        code: tonic::Code,
    },
    /// The dump did not finish in time (`DEADLINE_EXCEEDED`).
    #[error(
        "the dump of VM {vm} to {path} did not finish within {} s; the hypervisor may still be writing it \
         (`virsh domjobinfo` shows it); the VM is recovered once it stops",
        limit.as_secs()
    )]
    DumpTimeout {
        /// The VM.
        vm: String,
        /// The file.
        path: String,
        /// The bound.
        limit: std::time::Duration,
    },
}

impl From<HostApiError> for Status {
    fn from(e: HostApiError) -> Status {
        let code = match &e {
            HostApiError::NoVm { .. } | HostApiError::NoHost => tonic::Code::InvalidArgument,
            HostApiError::UnknownVm(_) | HostApiError::UnknownHost(_) => tonic::Code::NotFound,
            HostApiError::LeaseExpired | HostApiError::Hypervisor(_) => tonic::Code::Unavailable,
            HostApiError::DumpPath(_) | HostApiError::DumpTarget(_) => tonic::Code::InvalidArgument,
            HostApiError::RunsElsewhere { .. } | HostApiError::NotRunning { .. } => tonic::Code::FailedPrecondition,
            HostApiError::DumpFailed { code, .. } | HostApiError::PauseFailed { code, .. } => *code,
            HostApiError::DumpTimeout { .. } => tonic::Code::DeadlineExceeded,
        };
        Status::new(code, e.to_string())
    }
}

/// How long `DumpVm` waits for the hypervisor to write a guest's memory: a large guest
/// on slow storage takes minutes; a dump that takes longer is reported, not waited for.
pub const DUMP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The `HostAgent` service as an extension of the node API: hand it to the node with
/// `AgentOptions::api_extensions`. `hosts` and `vms` are the cluster's hosts and HA VMs.
/// `FenceVm` answers `UNIMPLEMENTED` (see [`host_api_full`]).
pub fn host_api(hypervisor: Arc<dyn Hypervisor>, hosts: Vec<HostFacts>, vms: Vec<VmFacts>) -> ApiExtension {
    extension(hypervisor, hosts, vms, None, None)
}

/// The host agent's full `HostAgent`: `FenceVm` is answered by `fencer` (bound to the
/// running node when the API starts, [`VmFencer::bind`]; `WatchEvents` carries its
/// events too), and with `links` `GetClusterStatus` shows each VM's guest link and link
/// up/down events are published on the node's event feed.
pub fn host_api_full(
    hypervisor: Arc<dyn Hypervisor>,
    hosts: Vec<HostFacts>,
    vms: Vec<VmFacts>,
    fencer: Option<VmFencer>,
    links: Option<Arc<LinkRegistry>>,
) -> ApiExtension {
    extension(hypervisor, hosts, vms, fencer, links)
}

fn extension(
    hypervisor: Arc<dyn Hypervisor>,
    hosts: Vec<HostFacts>,
    vms: Vec<VmFacts>,
    fencer: Option<VmFencer>,
    links: Option<Arc<LinkRegistry>>,
) -> ApiExtension {
    Arc::new(move |ctx: &ApiContext| {
        if let Some(f) = &fencer {
            f.bind(ctx.control.clone(), ctx.lease_valid.clone());
        }
        if let Some(links) = &links {
            let control = ctx.control.clone();
            links.set_event_sink(Arc::new(move |kind| control.publish(kind)));
        }
        service(
            ctx.plan.my_name.clone(),
            ctx.control.clone(),
            ctx.lease_valid.clone(),
            hypervisor.clone(),
            hosts.clone(),
            vms.clone(),
            (fencer.clone(), links.clone()),
        )
    })
}

/// The `HostAgent` service for an API server, from its parts: this host's name, the node
/// behind the node API, this host's lease validity, its hypervisor, the hosts and HA VMs.
/// ([`host_api`] takes the first three from the node; this is for servers built by hand.)
pub fn host_service(
    me: String,
    control: Arc<dyn Control>,
    lease_valid: Arc<dyn Fn() -> bool + Send + Sync>,
    hypervisor: Arc<dyn Hypervisor>,
    hosts: Vec<HostFacts>,
    vms: Vec<VmFacts>,
) -> ExtraService {
    service(me, control, lease_valid, hypervisor, hosts, vms, (None, None))
}

fn service(
    me: String,
    control: Arc<dyn Control>,
    lease_valid: Arc<dyn Fn() -> bool + Send + Sync>,
    hypervisor: Arc<dyn Hypervisor>,
    hosts: Vec<HostFacts>,
    vms: Vec<VmFacts>,
    (fencer, links): (Option<VmFencer>, Option<Arc<LinkRegistry>>),
) -> ExtraService {
    Box::new(move |routes, access, stop| {
        let service =
            HostAgentService { me, control, lease_valid, hypervisor, hosts, vms, access, stop, fencer, links };
        routes.add_service(HostAgentServer::new(service));
    })
}

// ---------------------------------------------------------------- status derivation

/// `GetClusterStatus` from the node's status and the host and VM tables (pure).
/// `lease_valid` says whether the answering host held its lease when it answered.
pub fn cluster_status(
    status: &pb::GuestStatus,
    hosts: &[HostFacts],
    vms: &[VmFacts],
    lease_valid: bool,
) -> pb::HostClusterStatus {
    let groups: BTreeMap<&str, &pb::GroupStatus> = status.groups.iter().map(|g| (g.name.as_str(), g)).collect();
    let vm_status: Vec<pb::VmStatus> =
        vms.iter().map(|v| vm_status(v, groups.get(v.group.as_str()).copied())).collect();

    // Hosts: every node the node status lists, plus configured hosts it does not know.
    let capacity: BTreeMap<&str, &HostFacts> = hosts.iter().map(|h| (h.name.as_str(), h)).collect();
    let mut host_status: Vec<pb::HostStatus> = status
        .nodes
        .iter()
        .map(|n| {
            let state = match (n.local, n.state()) {
                (true, _) => pb::HostState::Self_,
                (false, pb::NodeState::Up) => pb::HostState::Up,
                (false, pb::NodeState::Down) => pb::HostState::Lost,
                (false, pb::NodeState::Unspecified) => pb::HostState::Unspecified,
            };
            let mut row = host_row(&n.name, n.id, state, capacity.get(n.name.as_str()).copied(), &vm_status);
            row.maintenance = n.standby;
            row
        })
        .collect();
    for h in hosts {
        if !host_status.iter().any(|s| s.name == h.name) {
            host_status.push(host_row(&h.name, h.id, pb::HostState::Unspecified, Some(h), &vm_status));
        }
    }
    host_status.sort_by_key(|h| h.id);

    let problems = vm_status.iter().filter_map(|v| placement_problem(v, &host_status)).collect();
    pb::HostClusterStatus {
        host: status.node.clone(),
        lease_valid,
        quorum: status.quorum,
        hosts: host_status,
        vms: vm_status,
        problems,
    }
}

/// Fills each VM's `guest` from this host's links: for VMs that run here or whose guest is
/// linked here (elsewhere this host cannot know; that host's own answer shows it).
pub fn add_guest_links(status: &mut pb::HostClusterStatus, links: &LinkRegistry) {
    let me = status.host.clone();
    for v in &mut status.vms {
        let Some(view) = links.view(&v.uuid) else { continue };
        if view.connected || v.host == me {
            v.guest = Some(view);
        }
    }
}

/// Whether a VM in this state takes up room on its host.
fn occupies(v: &pb::VmStatus) -> bool {
    !v.host.is_empty() && matches!(v.state(), pb::VmState::Running | pb::VmState::Starting | pb::VmState::Stopping)
}

fn host_row(
    name: &str,
    id: u32,
    state: pb::HostState,
    facts: Option<&HostFacts>,
    vms: &[pb::VmStatus],
) -> pb::HostStatus {
    let here: Vec<&pb::VmStatus> = vms.iter().filter(|v| occupies(v) && v.host == name).collect();
    pb::HostStatus {
        name: name.to_string(),
        id,
        state: state as i32,
        capacity: facts.and_then(|f| f.capacity).map(|(memory_mib, vcpus)| pb::HostCapacity { memory_mib, vcpus }),
        used_memory_mib: here.iter().map(|v| v.memory_mib).sum(),
        used_vcpus: here.iter().map(|v| v.vcpus).sum(),
        vm_count: here.len() as u32,
        maintenance: false,
    }
}

fn vm_status(facts: &VmFacts, group: Option<&pb::GroupStatus>) -> pb::VmStatus {
    let mut v = pb::VmStatus {
        name: facts.group.clone(),
        domain: facts.domain.clone(),
        uuid: facts.uuid.clone(),
        memory_mib: facts.memory_mib,
        vcpus: facts.vcpus,
        ..Default::default()
    };
    let Some(g) = group else {
        v.not_running_text = "the answering host does not know this VM's group (is its configuration older?)".into();
        return v;
    };
    v.state = match g.state() {
        pb::GroupState::Started => pb::VmState::Running,
        pb::GroupState::Starting => pb::VmState::Starting,
        pb::GroupState::Stopping => pb::VmState::Stopping,
        pb::GroupState::Stopped => pb::VmState::Stopped,
        pb::GroupState::Failed => pb::VmState::Failed,
        pb::GroupState::Blocked => pb::VmState::Blocked,
        pb::GroupState::Unspecified => pb::VmState::Unspecified,
    } as i32;
    v.host = g.location.clone();
    v.fencing_token = g.fencing_token;
    v.not_running = g.not_running.clone();
    v.not_running_text = g.not_running.as_ref().map(|n| not_running_text(&v.name, n)).unwrap_or_default();
    v.restarts = g.restarts;
    v.failovers = g.failovers;
    v.failed_on = g.failed_on.clone();
    v
}

/// Why a VM does not run, in words, with what to do about it.
pub fn not_running_text(vm: &str, n: &pb::NotRunning) -> String {
    use pb::NotRunningReason as R;
    let host = if n.node.is_empty() { "another host" } else { n.node.as_str() };
    match R::try_from(n.reason) {
        Ok(R::OperatorStopped) => format!("stopped by an operator; `tandemctl vm start {vm}` starts it"),
        Ok(R::NotAutoStarted) => format!("not started automatically; `tandemctl vm start {vm}` starts it"),
        Ok(R::FailoverLimitReached) => {
            format!("reached its failover limit; `tandemctl group reset {vm}` releases it")
        }
        Ok(R::Probing) => "the hosts are still probing where it runs".into(),
        Ok(R::NoQuorum) => "the answering host's partition has no quorum".into(),
        Ok(R::SelfFenced) => "the answering host self-fenced; restart its agent".into(),
        Ok(R::WaitingForFence) => format!("waiting for {host} to be fenced (it may still run the VM)"),
        Ok(R::WaitingForLease) => format!("waiting for the lease of {host} to expire (it may still run the VM)"),
        Ok(R::NoEligibleNode) => "no host it may run on is up".into(),
        Ok(R::TakeoverPending) => "a host is taking it over".into(),
        Ok(R::NoCapacity) => {
            format!("fits on no host that is up ({}); it starts as soon as one has room", n.detail.join("; "))
        }
        Ok(R::Parked) => format!("parked by {host}, which is in standby; it starts when {host} is back online"),
        Ok(R::Standby) => format!("the only hosts it may run on are in standby ({})", n.detail.join(", ")),
        Ok(R::LocalVeto) => format!("it may not run on the answering host ({})", n.detail.join("; ")),
        Ok(R::Unspecified) | Err(_) => format!("reason {} (unknown to this version)", n.reason),
    }
}

/// A VM that should run but fits on no host that is up, with why (host by host).
fn placement_problem(v: &pb::VmStatus, hosts: &[pb::HostStatus]) -> Option<pb::PlacementProblem> {
    use pb::NotRunningReason as R;
    let wants_to_run = match v.state() {
        pb::VmState::Blocked => true,
        pb::VmState::Stopped => !matches!(
            v.not_running.as_ref().map(|n| n.reason()),
            Some(R::OperatorStopped | R::NotAutoStarted | R::FailoverLimitReached)
        ),
        _ => false,
    };
    // The engine's own verdict (capacity, anti-affinity, eligible hosts) when it gave one;
    // the VM may still be listed on the lost host whose lease nobody could take over.
    if let Some(n) = &v.not_running
        && n.reason() == R::NoCapacity
    {
        return Some(pb::PlacementProblem {
            vm: v.name.clone(),
            reason: format!("needs {} MiB and {} vCPUs; {}", v.memory_mib, v.vcpus, n.detail.join("; ")),
        });
    }
    if !wants_to_run || !v.host.is_empty() {
        return None;
    }
    let mut why = Vec::new();
    for h in hosts {
        match h.state() {
            pb::HostState::Up | pb::HostState::Self_ => {}
            pb::HostState::Lost => {
                why.push(format!("{}: lost", h.name));
                continue;
            }
            pb::HostState::Unspecified => {
                why.push(format!("{}: not heard from", h.name));
                continue;
            }
        }
        let Some(cap) = &h.capacity else { return None };
        let free_mem = cap.memory_mib.saturating_sub(h.used_memory_mib);
        let free_cpu = cap.vcpus.saturating_sub(h.used_vcpus);
        if v.memory_mib <= free_mem && v.vcpus <= free_cpu {
            return None;
        }
        why.push(format!("{}: {free_mem} MiB and {free_cpu} vCPUs free", h.name));
    }
    let detail = if why.is_empty() { "no hosts".to_string() } else { why.join("; ") };
    Some(pb::PlacementProblem {
        vm: v.name.clone(),
        reason: format!("needs {} MiB and {} vCPUs; {detail}", v.memory_mib, v.vcpus),
    })
}

/// One domain as `ListDomains` reports it; `ha` says whether it is one of the cluster's VMs.
pub fn domain(info: &DomainInfo, ha: bool) -> pb::Domain {
    let (state, reason) = domain_state(&info.state);
    pb::Domain {
        name: info.name.clone(),
        uuid: info.uuid.to_string(),
        state: state as i32,
        reason,
        memory_mib: info.memory_kib / 1024,
        max_memory_mib: info.max_memory_kib / 1024,
        vcpus: info.vcpus,
        persistent: info.persistent,
        ha,
    }
}

/// `MigrationCanceled` -> `migration-canceled`; `Other(7)` -> `reason 7`; `Unknown` -> empty.
fn reason_text(reason: &impl std::fmt::Debug) -> String {
    let debug = format!("{reason:?}");
    if let Some(n) = debug.strip_prefix("Other(").and_then(|r| r.strip_suffix(')')) {
        return format!("reason {n}");
    }
    if debug == "Unknown" {
        return String::new();
    }
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn domain_state(s: &DomainState) -> (pb::DomainState, String) {
    use pb::DomainState as P;
    match s {
        DomainState::NoState => (P::NoState, String::new()),
        DomainState::Running(r) => (P::Running, reason_text(r)),
        DomainState::Blocked => (P::Blocked, String::new()),
        DomainState::Paused(r) => (P::Paused, reason_text(r)),
        DomainState::ShuttingDown => (P::ShuttingDown, String::new()),
        DomainState::Shutoff(r) => (P::Shutoff, reason_text(r)),
        DomainState::Crashed(r) => (P::Crashed, reason_text(r)),
        DomainState::PmSuspended => (P::PmSuspended, String::new()),
    }
}

/// A hypervisor error with its causes, for a status message.
fn with_causes(e: &HypervisorError) -> String {
    crate::error_chain(e)
}

// ---------------------------------------------------------------- the service

struct HostAgentService {
    me: String,
    control: Arc<dyn Control>,
    lease_valid: Arc<dyn Fn() -> bool + Send + Sync>,
    hypervisor: Arc<dyn Hypervisor>,
    hosts: Vec<HostFacts>,
    vms: Vec<VmFacts>,
    access: Arc<Access>,
    stop: CancellationToken,
    fencer: Option<VmFencer>,
    links: Option<Arc<LinkRegistry>>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send + 'static>>;

impl HostAgentService {
    /// The VM's group: by group name first, then by domain name.
    fn group_of(&self, call: &'static str, vm: &str) -> Result<String, HostApiError> {
        self.vm_of(call, vm).map(|v| v.group.clone())
    }

    /// The VM: by group name first, then by domain name.
    fn vm_of(&self, call: &'static str, vm: &str) -> Result<&VmFacts, HostApiError> {
        if vm.trim().is_empty() {
            return Err(HostApiError::NoVm { call });
        }
        self.vms
            .iter()
            .find(|v| v.group == vm)
            .or_else(|| self.vms.iter().find(|v| v.domain == vm))
            .ok_or_else(|| HostApiError::UnknownVm(vm.to_string()))
    }

    /// `DumpVm` once authorized: checks that the VM runs on this host's hypervisor, then
    /// dumps it within [`DUMP_TIMEOUT`].
    async fn dump(&self, vm: &str, path: &str) -> Result<pb::DumpVmReply, Status> {
        let facts = self.vm_of("DumpVm", vm)?.clone();
        if !path.starts_with('/') {
            return Err(HostApiError::DumpPath(path.to_string()).into());
        }
        // libvirt writes the dump as root: never over an existing file (an operator role must
        // not become "overwrite any file on the host"), and only into an existing directory.
        let p = std::path::Path::new(path);
        if p.components().any(|c| c == std::path::Component::ParentDir)
            || std::fs::symlink_metadata(p).is_ok()
            || !p.parent().is_some_and(|d| d.is_dir())
        {
            return Err(HostApiError::DumpTarget(path.to_string()).into());
        }
        self.must_run_here(&facts, |s| matches!(s, DomainState::Running(_))).await?;
        info!(vm = %facts.group, domain = %facts.domain, path, "dumping the VM's memory; it stops as crashed");
        let failed = |e: HypervisorError| {
            let code = match &e {
                HypervisorError::InvalidState { .. } => tonic::Code::FailedPrecondition,
                HypervisorError::Unsupported { .. } => tonic::Code::Unimplemented,
                HypervisorError::Disconnected { .. } | HypervisorError::Connect { .. } => tonic::Code::Unavailable,
                _ => tonic::Code::Internal,
            };
            HostApiError::DumpFailed { vm: facts.group.clone(), path: path.to_string(), detail: with_causes(&e), code }
        };
        match tokio::time::timeout(DUMP_TIMEOUT, self.hypervisor.crash_dump(&facts.uuid, path)).await {
            Ok(Ok(())) => Ok(pb::DumpVmReply { host: self.me.clone(), domain: facts.domain, path: path.to_string() }),
            Ok(Err(e)) => Err(failed(e).into()),
            Err(_) => {
                Err(HostApiError::DumpTimeout { vm: facts.group.clone(), path: path.to_string(), limit: DUMP_TIMEOUT }
                    .into())
            }
        }
    }

    /// Succeeds when this host's lease is valid and the VM's domain here is in a state
    /// `acceptable` takes; else names the host that runs it, or says it runs nowhere.
    async fn must_run_here(&self, facts: &VmFacts, acceptable: impl Fn(&DomainState) -> bool) -> Result<(), Status> {
        if !(self.lease_valid)() {
            return Err(HostApiError::LeaseExpired.into());
        }
        // This hypervisor's own view decides: the cluster status may lag behind it.
        let here = match self.hypervisor.domain_info(&facts.uuid).await {
            Ok(info) => Some(info.state),
            Err(HypervisorError::NoSuchDomain { .. }) => None,
            Err(e) => return Err(HostApiError::Hypervisor(with_causes(&e)).into()),
        };
        if here.as_ref().is_some_and(acceptable) {
            return Ok(());
        }
        let status = self.control.status().await?;
        let elsewhere = status
            .groups
            .iter()
            .find(|g| g.name == facts.group && !g.location.is_empty() && g.location != self.me)
            .map(|g| g.location.clone());
        Err(match elsewhere {
            Some(host) => HostApiError::RunsElsewhere { vm: facts.group.clone(), host, me: self.me.clone() },
            None => HostApiError::NotRunning {
                vm: facts.group.clone(),
                me: self.me.clone(),
                state: here.map_or_else(|| "not defined here".to_string(), |s| format!("{s:?}")),
            },
        }
        .into())
    }

    /// `SuspendVm` / `ResumeVm` once authorized: on this host only, then the state the
    /// hypervisor reports afterwards.
    async fn pause(&self, call: &'static str, vm: &str, suspend: bool) -> Result<pb::VmStateReply, Status> {
        let facts = self.vm_of(call, vm)?.clone();
        // A paused VM counts as "runs here" for both: suspending it again is refused by the
        // hypervisor with a clear state error, not as "runs nowhere".
        self.must_run_here(&facts, |s| s.is_running() || matches!(s, DomainState::Paused(_))).await?;
        let result = if suspend {
            self.hypervisor.suspend(&facts.uuid).await
        } else {
            self.hypervisor.resume(&facts.uuid).await
        };
        if let Err(e) = result {
            let code = match &e {
                HypervisorError::InvalidState { .. } => tonic::Code::FailedPrecondition,
                HypervisorError::Unsupported { .. } => tonic::Code::Unimplemented,
                HypervisorError::Disconnected { .. } | HypervisorError::Connect { .. } => tonic::Code::Unavailable,
                _ => tonic::Code::Internal,
            };
            let detail = with_causes(&e);
            return Err(HostApiError::PauseFailed { call, vm: facts.group, me: self.me.clone(), detail, code }.into());
        }
        let info =
            self.hypervisor.domain_info(&facts.uuid).await.map_err(|e| HostApiError::Hypervisor(with_causes(&e)))?;
        info!(vm = %facts.group, domain = %facts.domain, state = ?info.state, "{call}: done");
        let (state, reason) = domain_state(&info.state);
        Ok(pb::VmStateReply { host: self.me.clone(), domain: info.name, state: state as i32, reason })
    }

    async fn operator(&self, request: OperatorRequest) -> Result<Response<pb::OperatorAck>, Status> {
        if self.stop.is_cancelled() {
            return Err(ControlError::ShuttingDown.into());
        }
        let ack = self.control.operator(request.clone()).await?;
        info!(vm = %request.group, action = ?request.action, seq = ack.seq, "VM command accepted");
        Ok(Response::new(pb::OperatorAck { seq: ack.seq }))
    }

    async fn vm_command(
        &self,
        call: &'static str,
        req: Request<pb::VmRequest>,
        action: OperatorAction,
    ) -> Result<Response<pb::OperatorAck>, Status> {
        // Authorize before looking at the arguments: strangers learn nothing.
        self.access.authorize(&req, ApiRole::Operator, call)?;
        let group = self.group_of(call, &req.into_inner().vm)?;
        self.operator(OperatorRequest { group, action }).await
    }
}

#[tonic::async_trait]
impl HostAgent for HostAgentService {
    async fn get_cluster_status(
        &self,
        req: Request<pb::GetClusterStatusRequest>,
    ) -> Result<Response<pb::HostClusterStatus>, Status> {
        self.access.authorize(&req, ApiRole::Viewer, "GetClusterStatus")?;
        let status = self.control.status().await?;
        // Read after the status: a lease lost while the status was gathered shows.
        let lease_valid = (self.lease_valid)();
        let mut out = cluster_status(&status, &self.hosts, &self.vms, lease_valid);
        if let Some(links) = &self.links {
            add_guest_links(&mut out, links);
        }
        Ok(Response::new(out))
    }

    async fn start_vm(&self, req: Request<pb::VmRequest>) -> Result<Response<pb::OperatorAck>, Status> {
        self.vm_command("StartVm", req, OperatorAction::Start).await
    }

    async fn stop_vm(&self, req: Request<pb::VmRequest>) -> Result<Response<pb::OperatorAck>, Status> {
        self.vm_command("StopVm", req, OperatorAction::Stop).await
    }

    async fn move_vm(&self, req: Request<pb::MoveVmRequest>) -> Result<Response<pb::OperatorAck>, Status> {
        self.access.authorize(&req, ApiRole::Operator, "MoveVm")?;
        let pb::MoveVmRequest { vm, to_host } = req.into_inner();
        let group = self.group_of("MoveVm", &vm)?;
        if to_host.trim().is_empty() {
            return Err(HostApiError::NoHost.into());
        }
        if !self.hosts.iter().any(|h| h.name == to_host) {
            return Err(HostApiError::UnknownHost(to_host).into());
        }
        self.operator(OperatorRequest { group, action: OperatorAction::Move { to: Some(to_host) } }).await
    }

    async fn dump_vm(&self, req: Request<pb::DumpVmRequest>) -> Result<Response<pb::DumpVmReply>, Status> {
        self.access.authorize(&req, ApiRole::Operator, "DumpVm")?;
        if self.stop.is_cancelled() {
            return Err(ControlError::ShuttingDown.into());
        }
        let pb::DumpVmRequest { vm, path } = req.into_inner();
        Ok(Response::new(self.dump(&vm, &path).await?))
    }

    async fn suspend_vm(&self, req: Request<pb::VmRequest>) -> Result<Response<pb::VmStateReply>, Status> {
        self.access.authorize(&req, ApiRole::Operator, "SuspendVm")?;
        if self.stop.is_cancelled() {
            return Err(ControlError::ShuttingDown.into());
        }
        Ok(Response::new(self.pause("SuspendVm", &req.into_inner().vm, true).await?))
    }

    async fn resume_vm(&self, req: Request<pb::VmRequest>) -> Result<Response<pb::VmStateReply>, Status> {
        self.access.authorize(&req, ApiRole::Operator, "ResumeVm")?;
        if self.stop.is_cancelled() {
            return Err(ControlError::ShuttingDown.into());
        }
        Ok(Response::new(self.pause("ResumeVm", &req.into_inner().vm, false).await?))
    }

    async fn fence_vm(&self, req: Request<pb::FenceVmRequest>) -> Result<Response<pb::FenceVmResponse>, Status> {
        self.access.authorize(&req, ApiRole::Peer, "FenceVm")?;
        if self.stop.is_cancelled() {
            return Err(ControlError::ShuttingDown.into());
        }
        let Some(fencer) = &self.fencer else {
            return Err(Status::unimplemented("this HostAgent server has no guest fencer"));
        };
        let text = |key: &str| req.metadata().get(key).and_then(|v| v.to_str().ok()).map(str::to_string);
        let Some(asker) = text(ASKER_METADATA) else {
            return Err(Status::invalid_argument(format!(
                "FenceVm: metadata `{ASKER_METADATA}` (the asking guest's VM UUID) is missing"
            )));
        };
        let forwarded_by = text(FORWARDED_BY_METADATA);
        let request = req.into_inner();
        let answer = match forwarded_by {
            Some(from) => fencer.fence_forwarded(&from, &asker, request).await?,
            None => fencer.fence_vm(&asker, request).await?,
        };
        Ok(Response::new(answer))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.access.authorize(&req, ApiRole::Viewer, "WatchEvents")?;
        if self.stop.is_cancelled() {
            return Err(ControlError::ShuttingDown.into());
        }
        let fences = self.fencer.as_ref().map(VmFencer::subscribe);
        Ok(Response::new(watch(self.control.subscribe(), fences, self.stop.clone())))
    }

    async fn list_domains(&self, req: Request<pb::ListDomainsRequest>) -> Result<Response<pb::DomainList>, Status> {
        self.access.authorize(&req, ApiRole::Viewer, "ListDomains")?;
        if !(self.lease_valid)() {
            return Err(HostApiError::LeaseExpired.into());
        }
        let domains = self.hypervisor.list_domains().await.map_err(|e| HostApiError::Hypervisor(with_causes(&e)))?;
        // Checked again: the host may have been paused while libvirt answered.
        if !(self.lease_valid)() {
            return Err(HostApiError::LeaseExpired.into());
        }
        let ha = |d: &DomainInfo| {
            self.vms.iter().any(|v| v.uuid.eq_ignore_ascii_case(&d.uuid.to_string()) || v.domain == d.name)
        };
        let mut domains: Vec<pb::Domain> = domains.iter().map(|d| domain(d, ha(d))).collect();
        domains.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(pb::DomainList { host: self.me.clone(), uri: self.hypervisor.uri().to_string(), domains }))
    }
}

/// The node's events, and the fencer's when there is one: a lag becomes one `Lagged` event
/// and the stream goes on; the node closing its sender or the server stopping ends the
/// stream with `UNAVAILABLE`.
fn watch(
    rx: broadcast::Receiver<pb::Event>,
    fences: Option<broadcast::Receiver<pb::Event>>,
    stop: CancellationToken,
) -> EventStream {
    Box::pin(futures::stream::unfold(Some((rx, fences, stop)), |state| async move {
        let (mut rx, mut fences, stop) = state?;
        loop {
            let from_fences = async {
                match fences.as_mut() {
                    Some(f) => f.recv().await,
                    None => std::future::pending().await,
                }
            };
            let (next, fenced) = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    return Some((Err(Status::unavailable("the agent's API is shutting down; the stream ends here")), None));
                }
                r = rx.recv() => (r, false),
                r = from_fences => (r, true),
            };
            return match next {
                Ok(event) => Some((Ok(event), Some((rx, fences, stop)))),
                Err(RecvError::Lagged(n)) => Some((Ok(lagged_event(n)), Some((rx, fences, stop)))),
                // The fencer is gone (never while the service holds it): follow the node only.
                Err(RecvError::Closed) if fenced => {
                    fences = None;
                    continue;
                }
                Err(RecvError::Closed) => {
                    Some((Err(Status::unavailable("the agent stopped publishing events (it is shutting down)")), None))
                }
            };
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{PausedReason, RunningReason, ShutoffReason};

    fn node(name: &str, id: u32, state: pb::NodeState, local: bool) -> pb::NodeStatus {
        pb::NodeStatus { name: name.into(), id, state: state as i32, local, ..Default::default() }
    }

    fn group(name: &str, state: pb::GroupState, location: &str) -> pb::GroupStatus {
        pb::GroupStatus { name: name.into(), state: state as i32, location: location.into(), ..Default::default() }
    }

    fn vm(group: &str, memory_mib: u64, vcpus: u32) -> VmFacts {
        VmFacts {
            group: group.into(),
            domain: format!("{group}-dom"),
            uuid: format!("uuid-{group}"),
            memory_mib,
            vcpus,
        }
    }

    fn hosts() -> Vec<HostFacts> {
        vec![
            HostFacts { name: "hv1".into(), id: 1, capacity: Some((8192, 8)) },
            HostFacts { name: "hv2".into(), id: 2, capacity: Some((4096, 4)) },
            HostFacts { name: "hv3".into(), id: 3, capacity: None },
        ]
    }

    #[test]
    fn hosts_count_what_runs_on_them() {
        let status = pb::GuestStatus {
            node: "hv1".into(),
            node_id: 1,
            quorum: true,
            nodes: vec![
                node("hv1", 1, pb::NodeState::Up, true),
                node("hv2", 2, pb::NodeState::Up, false),
                node("hv3", 3, pb::NodeState::Down, false),
            ],
            groups: vec![
                group("a", pb::GroupState::Started, "hv1"),
                group("b", pb::GroupState::Starting, "hv1"),
                group("c", pb::GroupState::Stopping, "hv2"),
                pb::GroupStatus {
                    restarts: 2,
                    failovers: 1,
                    failed_on: vec!["hv2".into()],
                    not_running: Some(pb::NotRunning {
                        reason: pb::NotRunningReason::OperatorStopped as i32,
                        node: "".into(),
                        detail: vec![],
                    }),
                    ..group("d", pb::GroupState::Stopped, "")
                },
                // Not a VM: ignored.
                group("other", pb::GroupState::Started, "hv2"),
            ],
            ..Default::default()
        };
        let vms = vec![vm("a", 2048, 2), vm("b", 1024, 1), vm("c", 512, 1), vm("d", 4096, 4), vm("e", 64, 1)];
        let s = cluster_status(&status, &hosts(), &vms, true);
        assert_eq!((s.host.as_str(), s.lease_valid, s.quorum), ("hv1", true, true));
        let h: Vec<(&str, pb::HostState, u64, u32, u32)> =
            s.hosts.iter().map(|h| (h.name.as_str(), h.state(), h.used_memory_mib, h.used_vcpus, h.vm_count)).collect();
        assert_eq!(
            h,
            vec![
                ("hv1", pb::HostState::Self_, 3072, 3, 2),
                ("hv2", pb::HostState::Up, 512, 1, 1),
                ("hv3", pb::HostState::Lost, 0, 0, 0),
            ]
        );
        assert_eq!(s.hosts[0].capacity, Some(pb::HostCapacity { memory_mib: 8192, vcpus: 8 }));
        assert_eq!(s.hosts[2].capacity, None);

        let v: Vec<(&str, &str, pb::VmState)> =
            s.vms.iter().map(|v| (v.name.as_str(), v.host.as_str(), v.state())).collect();
        assert_eq!(
            v,
            vec![
                ("a", "hv1", pb::VmState::Running),
                ("b", "hv1", pb::VmState::Starting),
                ("c", "hv2", pb::VmState::Stopping),
                ("d", "", pb::VmState::Stopped),
                ("e", "", pb::VmState::Unspecified),
            ]
        );
        let d = &s.vms[3];
        assert_eq!((d.restarts, d.failovers, d.failed_on.as_slice()), (2, 1, &["hv2".to_string()][..]));
        assert_eq!((d.domain.as_str(), d.uuid.as_str(), d.memory_mib, d.vcpus), ("d-dom", "uuid-d", 4096, 4));
        assert_eq!(d.not_running_text, "stopped by an operator; `tandemctl vm start d` starts it");
        assert!(s.vms[4].not_running_text.contains("does not know this VM's group"), "{:?}", s.vms[4]);
        // Stopped on purpose: not a placement problem even though it would not fit on hv2.
        assert!(s.problems.is_empty(), "{:?}", s.problems);
    }

    #[test]
    fn a_vm_that_fits_nowhere_is_a_problem() {
        let blocked =
            pb::NotRunning { reason: pb::NotRunningReason::NoEligibleNode as i32, node: String::new(), detail: vec![] };
        let status = pb::GuestStatus {
            node: "hv2".into(),
            nodes: vec![
                node("hv1", 1, pb::NodeState::Up, false),
                node("hv2", 2, pb::NodeState::Up, true),
                node("hv3", 3, pb::NodeState::Down, false),
            ],
            groups: vec![
                group("a", pb::GroupState::Started, "hv1"),
                pb::GroupStatus { not_running: Some(blocked.clone()), ..group("big", pb::GroupState::Blocked, "") },
                pb::GroupStatus { not_running: Some(blocked), ..group("small", pb::GroupState::Blocked, "") },
            ],
            ..Default::default()
        };
        let vms = vec![vm("a", 6144, 2), vm("big", 5000, 2), vm("small", 1024, 1)];
        let s = cluster_status(&status, &hosts(), &vms, false);
        assert!(!s.lease_valid);
        assert_eq!(
            s.problems,
            vec![pb::PlacementProblem {
                vm: "big".into(),
                reason: "needs 5000 MiB and 2 vCPUs; hv1: 2048 MiB and 6 vCPUs free; hv2: 4096 MiB and 4 vCPUs free; \
                         hv3: lost"
                    .into(),
            }]
        );
        assert_eq!(s.vms[1].not_running_text, "no host it may run on is up");

        // An up host without configured capacity takes anything.
        let mut status = status;
        status.nodes[2].state = pb::NodeState::Up as i32;
        assert!(cluster_status(&status, &hosts(), &vms, true).problems.is_empty());
    }

    #[test]
    fn not_running_texts_name_the_host_and_the_way_out() {
        let nr = |reason: pb::NotRunningReason, node: &str| pb::NotRunning {
            reason: reason as i32,
            node: node.into(),
            detail: vec![],
        };
        assert_eq!(
            not_running_text("db", &nr(pb::NotRunningReason::WaitingForFence, "hv2")),
            "waiting for hv2 to be fenced (it may still run the VM)"
        );
        assert_eq!(
            not_running_text("db", &nr(pb::NotRunningReason::FailoverLimitReached, "")),
            "reached its failover limit; `tandemctl group reset db` releases it"
        );
        assert_eq!(
            not_running_text("db", &pb::NotRunning { reason: 999, node: String::new(), detail: vec![] }),
            "reason 999 (unknown to this version)"
        );
    }

    #[test]
    fn domains_show_state_reason_and_mib() {
        let info = |state| DomainInfo {
            name: "web".into(),
            uuid: uuid::Uuid::from_u128(0x1111_1111_1111_4111_8111_1111_1111_1111),
            state,
            memory_kib: 131072,
            max_memory_kib: 262144,
            vcpus: 2,
            persistent: true,
        };
        let d = domain(&info(DomainState::Running(RunningReason::MigrationCanceled)), true);
        assert_eq!((d.state(), d.reason.as_str()), (pb::DomainState::Running, "migration-canceled"));
        assert_eq!((d.memory_mib, d.max_memory_mib, d.vcpus, d.persistent, d.ha), (128, 256, 2, true, true));
        assert_eq!(d.uuid, "11111111-1111-4111-8111-111111111111");
        let d = domain(&info(DomainState::Paused(PausedReason::IoError)), false);
        assert_eq!((d.state(), d.reason.as_str()), (pb::DomainState::Paused, "io-error"));
        let d = domain(&info(DomainState::Shutoff(ShutoffReason::Other(42))), false);
        assert_eq!((d.state(), d.reason.as_str()), (pb::DomainState::Shutoff, "reason 42"));
        let d = domain(&info(DomainState::Shutoff(ShutoffReason::Unknown)), false);
        assert_eq!((d.state(), d.reason.as_str()), (pb::DomainState::Shutoff, ""));
    }
}
