//! Fencing guests: a guest agent that must take over from a stalled peer VM asks the host
//! cluster to power that VM off (`fence = { kind = "host-cluster" }` in the guest cluster;
//! docs/host-agent.md, "Fencing guests").
//!
//! [`VmFencer::fence_vm`] answers one such request for the guest whose VM is `asker_uuid`
//! (the guest link authenticated it):
//!
//! 1. **Authorization**: the asking VM and the target must both be HA VMs of this host
//!    cluster with the same `guest_cluster`, and a VM may not fence itself; anything else is
//!    `PERMISSION_DENIED`, logged as a warning naming both.
//! 2. **Who runs it** ([`locate`], pure): the VM's group location in the node's status
//!    (the lease holder as the lease layer observes it).
//!    * here: destroy it through the hypervisor (a hard power-off), confirm through the
//!      hypervisor that it is off, answer `POWERED_OFF` (or `ALREADY_OFF`). The VM resource
//!      is told first ([`FenceMarks`]) so that its check reports the power-off as a failure
//!      and the cluster recovers the VM by its policy, instead of taking it for an
//!      administrator's stop;
//!    * on a live peer host: forwarded to that host's agent (`HostAgent.FenceVm`, role
//!      `peer`), bounded by the request's `timeout_ms`; a forwarded request is never
//!      forwarded again;
//!    * on a host whose host lease is dead: `ALREADY_OFF` only where that is certain
//!      ([`crate::hypervisor::self_fence_stops_vms`]); otherwise `UNAVAILABLE`;
//!    * on a host that is silent but whose lease is alive, or anywhere this host cannot
//!      tell: `UNAVAILABLE` (the guest retries), never a success;
//!    * nowhere (the group's lease is not held): `ALREADY_OFF` once this host's hypervisor
//!      confirms it has the VM off or not defined (a VM is defined only where it runs).
//! 3. Every request is logged and published as an event of the host agent
//!    (`HostAgent.WatchEvents`, a `Notice`), with who asked, which VM and the outcome.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tandem_config::{ApiSettings, ClusterConfig, ResourceKind};
use tandem_node::api::{BoxFuture, Control, pb};
use tandem_proto::v1::{FenceVmOutcome, FenceVmRequest, FenceVmResponse};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tonic::{Code, Status};
use uuid::Uuid;

use crate::cluster::HostCluster;
use crate::hypervisor::{DomainState, Hypervisor, HypervisorError};

/// gRPC metadata of `HostAgent.FenceVm`: the UUID of the asking guest's VM.
pub const ASKER_METADATA: &str = "tandem-fence-asker";
/// gRPC metadata of `HostAgent.FenceVm`: the host that forwarded the request; a request
/// carrying it is answered from the receiving host's own hypervisor, never forwarded again.
pub const FORWARDED_BY_METADATA: &str = "tandem-fence-forwarded-by";

/// The time a request may take when it gives no `timeout_ms`.
pub const DEFAULT_FENCE_TIMEOUT: Duration = Duration::from_secs(30);

/// While confirming a power-off, the hypervisor's state is read this often.
const CONFIRM_POLL: Duration = Duration::from_millis(100);

/// VMs this host powered off because a guest fenced them, shared between the fencer and
/// the VM resources ([`crate::vm::HostResources::with_fence_marks`]).
///
/// libvirt reports a fenced VM as "shut off (destroyed)", exactly like an administrator's
/// `virsh destroy`, which the VM resource takes for a deliberate stop outside the cluster
/// (the group is then stopped, not recovered). A fence is not that: the VM was stalled or
/// failed as far as its guest cluster could tell, and the host cluster must recover it like
/// a crash. The fencer marks the VM *before* destroying it; the resource's check then
/// reports the destroyed VM as failed, and its next start clears the mark.
#[derive(Debug, Clone, Default)]
pub struct FenceMarks(Arc<Mutex<BTreeMap<Uuid, String>>>);

impl FenceMarks {
    /// Records that `vm` is being powered off by a fence; `why` is what its check reports.
    /// Returns the previous mark.
    pub fn mark(&self, vm: Uuid, why: String) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(vm, why)
    }

    /// The mark of `vm`, if it was fenced and not started since.
    pub fn get(&self, vm: &Uuid) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(vm).cloned()
    }

    /// Forgets `vm`'s mark (it starts again, or the fence did not power it off).
    pub fn clear(&self, vm: &Uuid) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(vm);
    }
}

/// One HA VM as the fencer knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceableVm {
    /// Its failover group (the VM's name in the cluster).
    pub group: String,
    /// The libvirt domain's name.
    pub domain: String,
    /// The domain's UUID.
    pub uuid: Uuid,
    /// The guest cluster its guest agent belongs to (`guest_cluster` of its resource).
    pub guest_cluster: Option<String>,
}

/// One host of the cluster as the fencer knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceHost {
    /// Its node name.
    pub name: String,
    /// Its agent's API address (`[[node]] api`), where requests are forwarded.
    pub api: Option<SocketAddr>,
    /// Whether its VMs are certainly stopped once its host lease is dead
    /// ([`crate::hypervisor::self_fence_stops_vms`] of its hypervisor URI).
    pub self_fence_stops_vms: bool,
}

/// Where a VM runs, as far as the answering host can tell ([`locate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// On the answering host.
    Here,
    /// On a peer host that is up.
    Peer(String),
    /// On a host that is lost and whose host lease the lease layer saw dead.
    DeadHost(String),
    /// Nowhere: its group's lease is not held.
    NotHeld,
    /// The answering host cannot tell; why, in words.
    Unknown(String),
}

/// Where the VM of `group` runs according to the node `status` of the answering host
/// (pure; the decision table of the fencer).
///
/// The group's `location` is the lease holder the lease layer observed. A holder that is
/// lost (`NODE_STATE_DOWN`) leaves the group `BLOCKED` at its location: while the engine
/// waits for that holder's lease (`WAITING_FOR_LEASE`) or fencing (`WAITING_FOR_FENCE`)
/// the holder may still run the VM; once it reports a takeover reason
/// (`TAKEOVER_PENDING`, `NO_ELIGIBLE_NODE`, `NO_CAPACITY`) it has seen the holder's host
/// lease dead (the engine checks that before any of them).
pub fn locate(status: &pb::GuestStatus, group: &str) -> Location {
    use pb::NotRunningReason as R;
    if status.self_fenced {
        return Location::Unknown(format!("{} self-fenced", status.node));
    }
    if status.probing {
        return Location::Unknown(format!("{} is still probing where the VMs run", status.node));
    }
    let Some(g) = status.groups.iter().find(|g| g.name == group) else {
        return Location::Unknown(format!("{} does not know group {group} (is its configuration older?)", status.node));
    };
    if g.location == status.node {
        return Location::Here;
    }
    if g.location.is_empty() {
        return match g.state() {
            pb::GroupState::Stopped | pb::GroupState::Failed | pb::GroupState::Blocked => Location::NotHeld,
            s => Location::Unknown(format!("group {group} is {s:?} but {} does not know where", status.node)),
        };
    }
    let holder = g.location.clone();
    let node_state = status.nodes.iter().find(|n| n.name == holder).map(|n| n.state());
    if node_state == Some(pb::NodeState::Up) {
        return Location::Peer(holder);
    }
    let reason = g.not_running.as_ref().map(|n| n.reason());
    match (g.state(), reason) {
        (pb::GroupState::Blocked, Some(R::TakeoverPending | R::NoEligibleNode | R::NoCapacity)) => {
            Location::DeadHost(holder)
        }
        (_, Some(R::WaitingForLease)) => Location::Unknown(format!(
            "{holder} is not heard from but its host lease is alive: it may still run the VM (partitioned or stalled)"
        )),
        (_, Some(R::WaitingForFence)) => {
            Location::Unknown(format!("{holder} is not heard from and not fenced yet: it may still run the VM"))
        }
        (_, Some(R::NoQuorum)) => Location::Unknown(format!(
            "{} has no quorum and {holder}, which ran the VM, is not heard from",
            status.node
        )),
        (s, r) => Location::Unknown(format!("{holder} is not heard from (group {group} {s:?}, {r:?})")),
    }
}

/// Why a fence request was not answered with the VM off. Each variant maps to one gRPC code
/// ([`FenceError::code`]); every one but the authorization errors is worth a retry.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The request is malformed (`INVALID_ARGUMENT`).
    #[error("FenceVm: {0}")]
    BadRequest(String),
    /// The asking VM is not one of this cluster's HA VMs (`PERMISSION_DENIED`).
    #[error("VM {asker} is not an HA VM of this host cluster; only VMs of one guest cluster may fence each other")]
    UnknownAsker {
        /// The asking VM's UUID.
        asker: String,
    },
    /// The target is not one of this cluster's HA VMs (`PERMISSION_DENIED`).
    #[error("VM {target} is not an HA VM of this host cluster; {asker} may not fence it")]
    UnknownTarget {
        /// The asking VM.
        asker: String,
        /// The target's UUID.
        target: String,
    },
    /// Not the same guest cluster (`PERMISSION_DENIED`).
    #[error(
        "VM {asker} (guest cluster {asker_cluster}) may not fence VM {target} (guest cluster {target_cluster}): only \
         VMs with the same `guest_cluster` may fence each other"
    )]
    OtherGuestCluster {
        /// The asking VM.
        asker: String,
        /// Its guest cluster, or `none`.
        asker_cluster: String,
        /// The target.
        target: String,
        /// Its guest cluster, or `none`.
        target_cluster: String,
    },
    /// A VM asked to fence itself (`PERMISSION_DENIED`).
    #[error("VM {0} asked to fence itself; a guest may fence only its peers")]
    SelfFence(String),
    /// The fencer is not connected to the running node yet (`UNAVAILABLE`).
    #[error("the host agent is still starting; retry")]
    NotReady,
    /// This host's lease expired (`UNAVAILABLE`).
    #[error("this host's lease expired; it answers no fence request until it holds it again")]
    LeaseExpired,
    /// The node's status could not be read (`UNAVAILABLE`).
    #[error("cannot read the cluster status: {0}")]
    Status(String),
    /// Nobody can say whether the VM is off (`UNAVAILABLE`).
    #[error("cannot confirm VM {vm} off: {why}")]
    Unconfirmed {
        /// The target.
        vm: String,
        /// Why not.
        why: String,
    },
    /// The VM's host is dead but its VMs may still run (`UNAVAILABLE`).
    #[error(
        "cannot confirm VM {vm} off: host {host} is dead but its QEMU processes are not fenced by Tandem \
         (docs/host-agent.md, \"Limits\"); power {host} off, then retry"
    )]
    DeadHostNotFenced {
        /// The target.
        vm: String,
        /// The dead host.
        host: String,
    },
    /// The hypervisor failed (`UNAVAILABLE`).
    #[error("cannot confirm VM {vm} off: {step} on {host} failed: {detail}")]
    Hypervisor {
        /// The target.
        vm: String,
        /// The host.
        host: String,
        /// What failed.
        step: &'static str,
        /// The hypervisor's error with its causes.
        detail: String,
    },
    /// The request was forwarded here, but this host sees the VM elsewhere (`UNAVAILABLE`).
    #[error("{from} forwarded the fencing of VM {vm} here, but {me} sees it on {runs_on}; retry")]
    ViewsDisagree {
        /// The target.
        vm: String,
        /// Who forwarded.
        from: String,
        /// This host.
        me: String,
        /// Where this host sees the VM.
        runs_on: String,
    },
    /// The peer that runs the VM answered with an error (its code, or `UNAVAILABLE`).
    #[error("{host}, which runs VM {vm}, did not confirm it off: {message}")]
    Peer {
        /// The target.
        vm: String,
        /// The peer.
        host: String,
        /// The peer's code.
        code: Code,
        /// Its message.
        message: String,
    },
    /// The request's time ran out (`DEADLINE_EXCEEDED`).
    #[error("VM {vm} was not confirmed off within {} ms", limit.as_millis())]
    TimedOut {
        /// The target.
        vm: String,
        /// The bound.
        limit: Duration,
    },
}

impl FenceError {
    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            FenceError::BadRequest(_) => Code::InvalidArgument,
            FenceError::UnknownAsker { .. }
            | FenceError::UnknownTarget { .. }
            | FenceError::OtherGuestCluster { .. }
            | FenceError::SelfFence(_) => Code::PermissionDenied,
            FenceError::Peer { code, .. } => match code {
                Code::PermissionDenied | Code::InvalidArgument | Code::DeadlineExceeded => *code,
                _ => Code::Unavailable,
            },
            FenceError::TimedOut { .. } => Code::DeadlineExceeded,
            _ => Code::Unavailable,
        }
    }
}

impl From<FenceError> for Status {
    fn from(e: FenceError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

/// Reaches the other host agents to forward a fence request (`HostAgent.FenceVm`).
pub trait FenceForwarding: Send + Sync + std::fmt::Debug {
    /// Sends `request`, from the guest whose VM is `asker`, to `host`'s agent marked as
    /// forwarded by this host, waiting at most `timeout`.
    fn forward<'a>(
        &'a self,
        host: &'a str,
        asker: &'a str,
        request: FenceVmRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<FenceVmResponse, Status>>;
}

/// [`FenceForwarding`] over gRPC to the peers' `[[node]] api` addresses, with this agent's
/// `[api.tls]` identity (as the node forwards operator commands).
#[derive(Debug, Clone)]
pub struct GrpcForwarding {
    me: String,
    api: ApiSettings,
    addrs: BTreeMap<String, Option<SocketAddr>>,
}

impl GrpcForwarding {
    /// Forwarding from host `me` of `config`.
    pub fn new(me: &str, config: &ClusterConfig) -> GrpcForwarding {
        GrpcForwarding {
            me: me.to_string(),
            api: config.api.clone(),
            addrs: config.nodes.iter().map(|n| (n.name.clone(), n.api)).collect(),
        }
    }
}

impl FenceForwarding for GrpcForwarding {
    fn forward<'a>(
        &'a self,
        host: &'a str,
        asker: &'a str,
        request: FenceVmRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<FenceVmResponse, Status>> {
        Box::pin(async move {
            let Some(addr) = self.addrs.get(host).copied().flatten() else {
                return Err(Status::unavailable(format!(
                    "host {host} has no `api` address in the configuration; its agent cannot be asked"
                )));
            };
            let channel = tandem_node::api::peer::channel(host, addr, &self.api, timeout)
                .await
                .map_err(|e| Status::unavailable(crate::error_chain(&e)))?;
            let mut client = pb::host_agent_client::HostAgentClient::new(channel);
            let mut call = tonic::Request::new(request);
            call.set_timeout(timeout);
            let meta = call.metadata_mut();
            meta.insert(ASKER_METADATA, asker.parse().map_err(|_| Status::invalid_argument("bad asker UUID"))?);
            meta.insert(
                FORWARDED_BY_METADATA,
                self.me.parse().map_err(|_| Status::internal("host name not valid as gRPC metadata"))?,
            );
            Ok(client.fence_vm(call).await?.into_inner())
        })
    }
}

/// The running node, once the API is up ([`VmFencer::bind`]).
#[derive(Clone)]
struct NodeView {
    control: Arc<dyn Control>,
    lease_valid: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// Whether a request may be forwarded ([`VmFencer::fence_vm`]) or was forwarded here
/// ([`VmFencer::fence_forwarded`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hop {
    First,
    ForwardedBy(String),
}

struct Inner {
    me: String,
    vms: Vec<FenceableVm>,
    hosts: BTreeMap<String, FenceHost>,
    hypervisor: Arc<dyn Hypervisor>,
    forwarding: Arc<dyn FenceForwarding>,
    marks: FenceMarks,
    events: broadcast::Sender<pb::Event>,
    view: OnceLock<NodeView>,
}

/// The host agent's side of guest fencing (see the module documentation). Cheap to clone.
#[derive(Clone)]
pub struct VmFencer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VmFencer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmFencer").field("me", &self.inner.me).field("vms", &self.inner.vms.len()).finish()
    }
}

impl VmFencer {
    /// The fencer of host `me`: the HA VMs of `cluster` with the `guest_cluster` of their
    /// resource in `config`, every host's forwarding address and hypervisor rule from
    /// `config`, this host's `hypervisor`, and peers reached through [`GrpcForwarding`].
    /// Until [`VmFencer::bind`] connects it to the running node, every request is answered
    /// `UNAVAILABLE`.
    pub fn new(me: &str, config: &ClusterConfig, cluster: &HostCluster, hypervisor: Arc<dyn Hypervisor>) -> VmFencer {
        VmFencer::with_forwarding(me, config, cluster, hypervisor, Arc::new(GrpcForwarding::new(me, config)))
    }

    /// Like [`VmFencer::new`], with peers reached through `forwarding`.
    pub fn with_forwarding(
        me: &str,
        config: &ClusterConfig,
        cluster: &HostCluster,
        hypervisor: Arc<dyn Hypervisor>,
        forwarding: Arc<dyn FenceForwarding>,
    ) -> VmFencer {
        let guest_cluster = |group: &str, resource: &str| {
            config.groups.iter().filter(|g| g.name == group).flat_map(|g| &g.resources).find_map(|r| match &r.kind {
                ResourceKind::Vm(vm) if r.name == resource => vm.guest_cluster.clone(),
                _ => None,
            })
        };
        let vms = cluster
            .vms
            .iter()
            .map(|v| FenceableVm {
                group: v.group.clone(),
                domain: v.definition.name.clone(),
                uuid: v.definition.uuid,
                guest_cluster: guest_cluster(&v.group, &v.resource),
            })
            .collect();
        let hosts = config
            .nodes
            .iter()
            .map(|n| {
                let stops = n.hypervisor.as_deref().is_some_and(crate::hypervisor::self_fence_stops_vms);
                (n.name.clone(), FenceHost { name: n.name.clone(), api: n.api, self_fence_stops_vms: stops })
            })
            .collect();
        VmFencer::from_parts(me, vms, hosts, hypervisor, forwarding)
    }

    /// A fencer from its tables: the HA VMs and the hosts (by name).
    pub fn from_parts(
        me: &str,
        vms: Vec<FenceableVm>,
        hosts: BTreeMap<String, FenceHost>,
        hypervisor: Arc<dyn Hypervisor>,
        forwarding: Arc<dyn FenceForwarding>,
    ) -> VmFencer {
        VmFencer {
            inner: Arc::new(Inner {
                me: me.to_string(),
                vms,
                hosts,
                hypervisor,
                forwarding,
                marks: FenceMarks::default(),
                events: broadcast::channel(64).0,
                view: OnceLock::new(),
            }),
        }
    }

    /// Connects the fencer to the running node: its status and this host's lease validity
    /// (what `ApiContext` gives an API extension). Only the first call counts.
    pub fn bind(&self, control: Arc<dyn Control>, lease_valid: Arc<dyn Fn() -> bool + Send + Sync>) {
        let _ = self.inner.view.set(NodeView { control, lease_valid });
    }

    /// The marks to hand to the VM resources ([`crate::vm::HostResources::with_fence_marks`]).
    pub fn marks(&self) -> FenceMarks {
        self.inner.marks.clone()
    }

    /// Every fence request's outcome, as host agent events (`Notice`, `seq` 0: they are
    /// not in the node's event log).
    pub fn subscribe(&self) -> broadcast::Receiver<pb::Event> {
        self.inner.events.subscribe()
    }

    /// A guest's request, from the guest whose VM is `asker_uuid` (authenticated by the
    /// guest link): power `req.vm_uuid` off and confirm it. Answers only once the VM is
    /// known off (`POWERED_OFF` / `ALREADY_OFF`), or with an error status; forwards to the
    /// host that runs the VM when that is another host.
    pub async fn fence_vm(&self, asker_uuid: &str, req: FenceVmRequest) -> Result<FenceVmResponse, Status> {
        self.handle(asker_uuid, req, Hop::First).await
    }

    /// A request another host agent (`from`) forwarded here (`HostAgent.FenceVm` with
    /// [`FORWARDED_BY_METADATA`]): authorized again, answered from this host's own view and
    /// hypervisor, never forwarded again.
    pub async fn fence_forwarded(
        &self,
        from: &str,
        asker_uuid: &str,
        req: FenceVmRequest,
    ) -> Result<FenceVmResponse, Status> {
        self.handle(asker_uuid, req, Hop::ForwardedBy(from.to_string())).await
    }

    async fn handle(&self, asker_uuid: &str, req: FenceVmRequest, hop: Hop) -> Result<FenceVmResponse, Status> {
        let limit =
            if req.timeout_ms == 0 { DEFAULT_FENCE_TIMEOUT } else { Duration::from_millis(req.timeout_ms.into()) };
        let target_text = req.vm_uuid.clone();
        let (asker, target) = match self.authorize(asker_uuid, &req.vm_uuid) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(asker = %asker_uuid, target = %req.vm_uuid, cluster = %req.cluster,
                    node = %req.node_name, "fence request refused: {e}");
                self.publish(format!("fence of VM {} asked by VM {asker_uuid} refused: {e}", req.vm_uuid));
                return Err(e.into());
            }
        };
        let via = match &hop {
            Hop::First => String::new(),
            Hop::ForwardedBy(from) => format!(" (forwarded by {from})"),
        };
        tracing::warn!(asker = %asker.group, target = %target.group, uuid = %target.uuid,
            guest_cluster = %req.cluster, node = %req.node_name, "fence request{via}: powering VM {} off", target.group);
        // Answer before the caller gives up: it then retries instead of guessing.
        let deadline = Instant::now() + limit.mul_f64(0.9);
        let result = match tokio::time::timeout_at(deadline, self.fence(&asker, &target, req, &hop, deadline)).await {
            Ok(r) => r,
            Err(_) => Err(FenceError::TimedOut { vm: target.group.clone(), limit }),
        };
        let who = format!("VM {} ({}) asked by VM {}{via}", target.group, target_text, asker.group);
        match &result {
            Ok(r) => {
                tracing::warn!(asker = %asker.group, target = %target.group, outcome = ?r.outcome(),
                    host = %r.hypervisor, "fence of {who}: {:?} on {}: {}", r.outcome(), r.hypervisor, r.detail);
                self.publish(format!("fence of {who}: {:?} on {}: {}", r.outcome(), r.hypervisor, r.detail));
            }
            Err(e) => {
                tracing::error!(asker = %asker.group, target = %target.group, "fence of {who} not confirmed: {e}");
                self.publish(format!("fence of {who} not confirmed: {e}"));
            }
        }
        result.map_err(Status::from)
    }

    /// The asking and the target VM, if the asker may fence the target.
    fn authorize(&self, asker_uuid: &str, target_uuid: &str) -> Result<(FenceableVm, FenceableVm), FenceError> {
        authorize(&self.inner.vms, asker_uuid, target_uuid).map(|(a, t)| (a.clone(), t.clone()))
    }

    async fn fence(
        &self,
        asker: &FenceableVm,
        target: &FenceableVm,
        req: FenceVmRequest,
        hop: &Hop,
        deadline: Instant,
    ) -> Result<FenceVmResponse, FenceError> {
        let me = &self.inner.me;
        let view = self.inner.view.get().ok_or(FenceError::NotReady)?;
        if !(view.lease_valid)() {
            return Err(FenceError::LeaseExpired);
        }
        let status = view.control.status().await.map_err(|e| FenceError::Status(e.to_string()))?;
        let location = locate(&status, &target.group);
        tracing::info!(target = %target.group, ?location, "fence: where the VM runs");
        let answer = match location {
            Location::Here => self.power_off_here(asker, target, deadline).await?,
            Location::NotHeld => self.confirm_off_here(asker, target, deadline).await?,
            Location::Peer(host) => match hop {
                Hop::ForwardedBy(from) => {
                    return Err(FenceError::ViewsDisagree {
                        vm: target.group.clone(),
                        from: from.clone(),
                        me: me.clone(),
                        runs_on: host,
                    });
                }
                Hop::First => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let mut forwarded = req;
                    forwarded.timeout_ms = u32::try_from(left.as_millis()).unwrap_or(u32::MAX);
                    let asker_uuid = asker.uuid.to_string();
                    self.inner.forwarding.forward(&host, &asker_uuid, forwarded, left).await.map_err(|s| {
                        FenceError::Peer {
                            vm: target.group.clone(),
                            host: host.clone(),
                            code: s.code(),
                            message: s.message().to_string(),
                        }
                    })?
                }
            },
            Location::DeadHost(host) => {
                let certain = self.inner.hosts.get(&host).is_some_and(|h| h.self_fence_stops_vms);
                if !certain {
                    return Err(FenceError::DeadHostNotFenced { vm: target.group.clone(), host });
                }
                FenceVmResponse {
                    outcome: FenceVmOutcome::AlreadyOff as i32,
                    hypervisor: host.clone(),
                    detail: format!(
                        "host {host}'s host lease is dead, and its hypervisor's domains live inside its agent's \
                         process (libvirt test driver): VM {} stopped with it",
                        target.group
                    ),
                }
            }
            Location::Unknown(why) => return Err(FenceError::Unconfirmed { vm: target.group.clone(), why }),
        };
        // Read once more: a host that was paused while it acted must not answer for the past.
        if !(view.lease_valid)() {
            return Err(FenceError::LeaseExpired);
        }
        Ok(answer)
    }

    fn hv_error(&self, target: &FenceableVm, step: &'static str, e: &HypervisorError) -> FenceError {
        FenceError::Hypervisor {
            vm: target.group.clone(),
            host: self.inner.me.clone(),
            step,
            detail: crate::error_chain(e),
        }
    }

    /// The target's state on this hypervisor; `None` when it is not defined here.
    async fn state_here(&self, target: &FenceableVm) -> Result<Option<DomainState>, FenceError> {
        match self.inner.hypervisor.state(&target.uuid.to_string()).await {
            Ok(s) => Ok(Some(s)),
            Err(HypervisorError::NoSuchDomain { .. }) => Ok(None),
            Err(e) => Err(self.hv_error(target, "reading the domain's state", &e)),
        }
    }

    /// The group is not held anywhere: confirm the VM off here (destroying it if, against
    /// expectations, it runs here after all).
    async fn confirm_off_here(
        &self,
        asker: &FenceableVm,
        target: &FenceableVm,
        deadline: Instant,
    ) -> Result<FenceVmResponse, FenceError> {
        match self.state_here(target).await? {
            None => Ok(self.answer(
                FenceVmOutcome::AlreadyOff,
                format!(
                    "VM {} runs nowhere (its group's lease is free) and is not defined on {}",
                    target.group, self.inner.me
                ),
            )),
            Some(s) if s.is_off() => Ok(self.answer(
                FenceVmOutcome::AlreadyOff,
                format!(
                    "VM {} runs nowhere (its group's lease is free) and is shut off on {}",
                    target.group, self.inner.me
                ),
            )),
            Some(_) => self.power_off_here(asker, target, deadline).await,
        }
    }

    /// Destroys the target here and waits until the hypervisor reports it off.
    async fn power_off_here(
        &self,
        asker: &FenceableVm,
        target: &FenceableVm,
        deadline: Instant,
    ) -> Result<FenceVmResponse, FenceError> {
        let key = target.uuid.to_string();
        // Marked before the destroy: a check in between must see a fence, not an admin's stop.
        let why = format!(
            "powered off by a fence request of VM {} (guest cluster {})",
            asker.group,
            asker.guest_cluster.as_deref().unwrap_or("none")
        );
        let previous = self.inner.marks.mark(target.uuid, why);
        let unmark = || {
            if previous.is_none() {
                self.inner.marks.clear(&target.uuid);
            }
        };
        match self.inner.hypervisor.destroy(&key).await {
            Ok(()) => {}
            // Not running (or not defined): nothing was powered off by this request.
            Err(HypervisorError::InvalidState { .. } | HypervisorError::NoSuchDomain { .. }) => {
                let state = self.state_here(target).await;
                return match state {
                    Ok(None) => {
                        unmark();
                        Ok(self.answer(
                            FenceVmOutcome::AlreadyOff,
                            format!("VM {} is not defined on {}", target.group, self.inner.me),
                        ))
                    }
                    Ok(Some(s)) if s.is_off() => {
                        unmark();
                        Ok(self.answer(
                            FenceVmOutcome::AlreadyOff,
                            format!("VM {} was already shut off on {} ({s:?})", target.group, self.inner.me),
                        ))
                    }
                    Ok(Some(s)) => Err(FenceError::Unconfirmed {
                        vm: target.group.clone(),
                        why: format!("the hypervisor refused to destroy it and reports it {s:?}"),
                    }),
                    Err(e) => Err(e),
                };
            }
            Err(e) => {
                unmark();
                return Err(self.hv_error(target, "destroy", &e));
            }
        }
        // Confirmed by the hypervisor's own state, not by the destroy call returning.
        loop {
            match self.state_here(target).await? {
                None => break,
                Some(s) if s.is_off() => break,
                Some(_) if Instant::now() >= deadline => {
                    return Err(FenceError::Unconfirmed {
                        vm: target.group.clone(),
                        why: "destroyed, but the hypervisor still reports it active".into(),
                    });
                }
                Some(_) => tokio::time::sleep(CONFIRM_POLL).await,
            }
        }
        Ok(self.answer(
            FenceVmOutcome::PoweredOff,
            format!(
                "VM {} (domain {}) destroyed on {}; {} reports it shut off; the host cluster recovers it like a crash",
                target.group,
                target.domain,
                self.inner.me,
                self.inner.hypervisor.uri()
            ),
        ))
    }

    fn answer(&self, outcome: FenceVmOutcome, detail: String) -> FenceVmResponse {
        FenceVmResponse { outcome: outcome as i32, hypervisor: self.inner.me.clone(), detail }
    }

    fn publish(&self, text: String) {
        let event = pb::Event {
            seq: 0,
            unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            kind: Some(pb::event::Kind::Notice(pb::Notice { notice: Some(pb::notice::Notice::Text(text)) })),
        };
        let _ = self.inner.events.send(event);
    }
}

/// Whether the VM `asker_uuid` may fence the VM `target_uuid` among `vms` (pure): both HA
/// VMs, with the same `guest_cluster`, not the same VM.
pub fn authorize<'a>(
    vms: &'a [FenceableVm],
    asker_uuid: &str,
    target_uuid: &str,
) -> Result<(&'a FenceableVm, &'a FenceableVm), FenceError> {
    let target_id = Uuid::parse_str(target_uuid.trim()).map_err(|_| {
        FenceError::BadRequest(format!("`vm_uuid` {target_uuid:?} is not a UUID; give the VM's `virsh domuuid`"))
    })?;
    let asker = Uuid::parse_str(asker_uuid.trim())
        .ok()
        .and_then(|id| vms.iter().find(|v| v.uuid == id))
        .ok_or_else(|| FenceError::UnknownAsker { asker: asker_uuid.to_string() })?;
    let target = vms
        .iter()
        .find(|v| v.uuid == target_id)
        .ok_or_else(|| FenceError::UnknownTarget { asker: asker.group.clone(), target: target_uuid.to_string() })?;
    if asker.uuid == target.uuid {
        return Err(FenceError::SelfFence(asker.group.clone()));
    }
    match (&asker.guest_cluster, &target.guest_cluster) {
        (Some(a), Some(t)) if a == t => Ok((asker, target)),
        (a, t) => Err(FenceError::OtherGuestCluster {
            asker: asker.group.clone(),
            asker_cluster: a.clone().unwrap_or_else(|| "none".into()),
            target: target.group.clone(),
            target_cluster: t.clone().unwrap_or_else(|| "none".into()),
        }),
    }
}

/// The guests' fence requests over their links (authorized by the link registry, checked
/// again here).
#[tonic::async_trait]
impl crate::link::GuestFenceHandler for VmFencer {
    async fn fence_vm(
        &self,
        asker_uuid: &str,
        req: tandem_proto::v1::FenceVmRequest,
    ) -> Result<tandem_proto::v1::FenceVmResponse, tonic::Status> {
        VmFencer::fence_vm(self, asker_uuid, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{
        BoxFuture as HvFuture, DomainEvent, DomainInfo, HostCapacity, MigrationMode, PausedReason, RunningReason,
        ShutoffReason,
    };
    use tandem_node::api::{ControlError, OperatorAck, OperatorRequest};
    use tokio::sync::mpsc;

    const PG1: &str = "00000000-0000-4000-8000-000000000001";
    const PG2: &str = "00000000-0000-4000-8000-000000000002";
    const WEB: &str = "00000000-0000-4000-8000-000000000003";
    const LONE: &str = "00000000-0000-4000-8000-000000000004";

    fn vms() -> Vec<FenceableVm> {
        let vm = |group: &str, uuid: &str, gc: Option<&str>| FenceableVm {
            group: group.into(),
            domain: format!("{group}-dom"),
            uuid: Uuid::parse_str(uuid).unwrap(),
            guest_cluster: gc.map(str::to_string),
        };
        vec![
            vm("pg1", PG1, Some("pg")),
            vm("pg2", PG2, Some("pg")),
            vm("web", WEB, Some("www")),
            vm("lone", LONE, None),
        ]
    }

    // ------------------------------------------------------------ authorization

    #[test]
    fn only_peers_of_one_guest_cluster_may_fence_each_other() {
        let vms = vms();
        let (a, t) = authorize(&vms, PG1, PG2).unwrap();
        assert_eq!((a.group.as_str(), t.group.as_str()), ("pg1", "pg2"));
        // Case and spaces of the UUID text do not matter.
        assert!(authorize(&vms, &PG2.to_uppercase(), &format!(" {PG1} ")).is_ok());

        let e = authorize(&vms, WEB, PG2).unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(e.to_string().contains("VM web (guest cluster www) may not fence VM pg2 (guest cluster pg)"), "{e}");
        // No guest cluster on either side: nobody may.
        let e = authorize(&vms, LONE, PG2).unwrap_err();
        assert!(e.to_string().contains("(guest cluster none)"), "{e}");
        assert!(matches!(authorize(&vms, PG1, LONE), Err(FenceError::OtherGuestCluster { .. })));

        let e = authorize(&vms, PG1, PG1).unwrap_err();
        assert!(matches!(e, FenceError::SelfFence(ref v) if v == "pg1"), "{e:?}");
        assert_eq!(e.code(), Code::PermissionDenied);

        let stranger = "00000000-0000-4000-8000-0000000000ff";
        assert!(matches!(authorize(&vms, stranger, PG2), Err(FenceError::UnknownAsker { .. })));
        assert!(matches!(authorize(&vms, "not-a-uuid", PG2), Err(FenceError::UnknownAsker { .. })));
        let e = authorize(&vms, PG1, stranger).unwrap_err();
        assert!(matches!(e, FenceError::UnknownTarget { .. }) && e.code() == Code::PermissionDenied, "{e:?}");
        let e = authorize(&vms, PG1, "pg2").unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }

    // ------------------------------------------------------------ where it runs

    fn node(name: &str, state: pb::NodeState, local: bool) -> pb::NodeStatus {
        pb::NodeStatus { name: name.into(), id: 0, state: state as i32, local, links: vec![], ..Default::default() }
    }

    fn status(group: pb::GroupStatus) -> pb::GuestStatus {
        pb::GuestStatus {
            node: "h1".into(),
            node_id: 1,
            quorum: true,
            nodes: vec![
                node("h1", pb::NodeState::Up, true),
                node("h2", pb::NodeState::Up, false),
                node("h3", pb::NodeState::Down, false),
            ],
            groups: vec![group],
            ..Default::default()
        }
    }

    fn group(state: pb::GroupState, location: &str, reason: Option<pb::NotRunningReason>) -> pb::GroupStatus {
        pb::GroupStatus {
            name: "pg2".into(),
            state: state as i32,
            location: location.into(),
            not_running: reason.map(|r| pb::NotRunning { reason: r as i32, node: location.into(), detail: vec![] }),
            ..Default::default()
        }
    }

    #[test]
    fn the_decision_table() {
        use pb::GroupState as G;
        use pb::NotRunningReason as R;
        let at = |g| locate(&status(g), "pg2");
        assert_eq!(at(group(G::Started, "h1", None)), Location::Here);
        assert_eq!(at(group(G::Starting, "h1", None)), Location::Here);
        assert_eq!(at(group(G::Stopping, "h1", None)), Location::Here);
        assert_eq!(at(group(G::Failed, "h1", None)), Location::Here);
        assert_eq!(at(group(G::Started, "h2", None)), Location::Peer("h2".into()));
        // A lost holder whose lease the engine saw dead: the takeover reasons.
        for r in [R::TakeoverPending, R::NoEligibleNode, R::NoCapacity] {
            assert_eq!(at(group(G::Blocked, "h3", Some(r))), Location::DeadHost("h3".into()), "{r:?}");
        }
        // A lost holder whose lease is alive (partitioned or stalled), or not fenced yet.
        for (r, says) in [(R::WaitingForLease, "host lease is alive"), (R::WaitingForFence, "not fenced yet")] {
            match at(group(G::Blocked, "h3", Some(r))) {
                Location::Unknown(why) => assert!(why.contains(says) && why.contains("h3"), "{why}"),
                other => panic!("{r:?}: {other:?}"),
            }
        }
        assert!(matches!(at(group(G::Blocked, "h3", Some(R::NoQuorum))), Location::Unknown(_)));
        // A holder nobody has heard of at all.
        assert!(matches!(at(group(G::Blocked, "h9", Some(R::TakeoverPending))), Location::DeadHost(_)));
        assert!(matches!(at(group(G::Started, "h9", None)), Location::Unknown(_)));
        // Held by nobody.
        for (s, r) in [
            (G::Stopped, Some(R::OperatorStopped)),
            (G::Failed, Some(R::FailoverLimitReached)),
            (G::Blocked, Some(R::NoEligibleNode)),
        ] {
            assert_eq!(at(group(s, "", r)), Location::NotHeld, "{s:?}");
        }
        assert!(matches!(at(group(G::Started, "", None)), Location::Unknown(_)));
        // This host cannot judge: probing, self-fenced, or the group unknown.
        let mut s = status(group(G::Started, "h1", None));
        s.probing = true;
        assert!(matches!(locate(&s, "pg2"), Location::Unknown(w) if w.contains("probing")));
        let mut s = status(group(G::Started, "h1", None));
        s.self_fenced = true;
        assert!(matches!(locate(&s, "pg2"), Location::Unknown(w) if w.contains("self-fenced")));
        assert!(matches!(locate(&status(group(G::Started, "h1", None)), "other"), Location::Unknown(_)));
    }

    // ------------------------------------------------------------ the whole request, on fakes

    /// One domain, `pg2`, on a hypervisor that changes state as asked.
    #[derive(Debug)]
    struct FakeHv {
        state: Mutex<Option<DomainState>>,
        destroys: Mutex<u32>,
    }

    impl FakeHv {
        fn with(state: Option<DomainState>) -> Arc<FakeHv> {
            Arc::new(FakeHv { state: Mutex::new(state), destroys: Mutex::new(0) })
        }
        fn state_now(&self) -> Option<DomainState> {
            *self.state.lock().unwrap()
        }
        fn missing(&self, domain: &str) -> HypervisorError {
            HypervisorError::NoSuchDomain { uri: "fake://".into(), domain: domain.into() }
        }
    }

    impl Hypervisor for FakeHv {
        fn uri(&self) -> &str {
            "fake://"
        }
        fn list_domains(&self) -> HvFuture<'_, Result<Vec<DomainInfo>, HypervisorError>> {
            Box::pin(async { Ok(vec![]) })
        }
        fn domain_info<'a>(&'a self, d: &'a str) -> HvFuture<'a, Result<DomainInfo, HypervisorError>> {
            Box::pin(async move { Err(self.missing(d)) })
        }
        fn define<'a>(&'a self, _: &'a str) -> HvFuture<'a, Result<DomainInfo, HypervisorError>> {
            Box::pin(async move { Err(self.missing("define")) })
        }
        fn undefine<'a>(&'a self, _: &'a str) -> HvFuture<'a, Result<(), HypervisorError>> {
            Box::pin(async { Ok(()) })
        }
        fn start<'a>(&'a self, _: &'a str) -> HvFuture<'a, Result<(), HypervisorError>> {
            Box::pin(async { Ok(()) })
        }
        fn shutdown<'a>(&'a self, _: &'a str) -> HvFuture<'a, Result<(), HypervisorError>> {
            Box::pin(async { Ok(()) })
        }
        fn destroy<'a>(&'a self, d: &'a str) -> HvFuture<'a, Result<(), HypervisorError>> {
            Box::pin(async move {
                let mut s = self.state.lock().unwrap();
                match *s {
                    None => Err(self.missing(d)),
                    Some(x) if x.is_off() => Err(HypervisorError::InvalidState {
                        op: "destroy",
                        domain: d.into(),
                        uri: "fake://".into(),
                        source: "the domain is not running".into(),
                    }),
                    Some(_) => {
                        *s = Some(DomainState::Shutoff(ShutoffReason::Destroyed));
                        *self.destroys.lock().unwrap() += 1;
                        Ok(())
                    }
                }
            })
        }
        fn state<'a>(&'a self, d: &'a str) -> HvFuture<'a, Result<DomainState, HypervisorError>> {
            Box::pin(async move { self.state_now().ok_or_else(|| self.missing(d)) })
        }
        fn domain_xml<'a>(&'a self, d: &'a str) -> HvFuture<'a, Result<String, HypervisorError>> {
            Box::pin(async move { Err(self.missing(d)) })
        }
        fn migrate<'a>(
            &'a self,
            d: &'a str,
            _: &'a str,
            _: MigrationMode,
        ) -> HvFuture<'a, Result<(), HypervisorError>> {
            Box::pin(async move { Err(self.missing(d)) })
        }
        fn capacity(&self) -> HvFuture<'_, Result<HostCapacity, HypervisorError>> {
            Box::pin(async {
                Ok(HostCapacity { total_memory_kib: 1 << 20, free_memory_kib: None, cpus: 1, cpu_mhz: 0 })
            })
        }
        fn subscribe(&self) -> broadcast::Receiver<DomainEvent> {
            broadcast::channel(1).1
        }
    }

    struct FakeNode(pb::GuestStatus);

    impl Control for FakeNode {
        fn status(&self) -> BoxFuture<'_, Result<pb::GuestStatus, ControlError>> {
            Box::pin(async move { Ok(self.0.clone()) })
        }
        fn operator(&self, _: OperatorRequest) -> BoxFuture<'_, Result<OperatorAck, ControlError>> {
            Box::pin(async { Err(ControlError::Internal("not in this test".into())) })
        }
        fn deliver(&self, _: u64, _: OperatorRequest) -> BoxFuture<'_, Result<(), ControlError>> {
            Box::pin(async { Err(ControlError::Internal("not in this test".into())) })
        }
        fn prepare_shutdown(&self) -> BoxFuture<'_, Result<mpsc::Receiver<pb::ShutdownProgress>, ControlError>> {
            Box::pin(async { Err(ControlError::Internal("not in this test".into())) })
        }
        fn subscribe(&self) -> broadcast::Receiver<pb::Event> {
            broadcast::channel(1).1
        }
    }

    /// Records what is forwarded and answers POWERED_OFF from the host it was sent to.
    #[derive(Debug, Default)]
    struct FakePeers(Mutex<Vec<(String, String, u32)>>);

    impl FenceForwarding for FakePeers {
        fn forward<'a>(
            &'a self,
            host: &'a str,
            asker: &'a str,
            request: FenceVmRequest,
            timeout: Duration,
        ) -> BoxFuture<'a, Result<FenceVmResponse, Status>> {
            Box::pin(async move {
                assert!(timeout <= Duration::from_millis(request.timeout_ms.into()) + Duration::from_millis(1));
                self.0.lock().unwrap().push((host.to_string(), asker.to_string(), request.timeout_ms));
                Ok(FenceVmResponse {
                    outcome: FenceVmOutcome::PoweredOff as i32,
                    hypervisor: host.to_string(),
                    detail: "fake".into(),
                })
            })
        }
    }

    struct Setup {
        fencer: VmFencer,
        hv: Arc<FakeHv>,
        peers: Arc<FakePeers>,
        events: broadcast::Receiver<pb::Event>,
    }

    /// h1's fencer: h2 is a peer, h3 lost; h3 self-fences its VMs away only if `h3_stops`.
    fn setup(g: pb::GroupStatus, here: Option<DomainState>, h3_stops: bool, lease_valid: bool) -> Setup {
        let hv = FakeHv::with(here);
        let peers = Arc::new(FakePeers::default());
        let hosts = [("h1", true), ("h2", true), ("h3", h3_stops)]
            .into_iter()
            .map(|(n, stops)| (n.to_string(), FenceHost { name: n.into(), api: None, self_fence_stops_vms: stops }))
            .collect();
        let fencer = VmFencer::from_parts("h1", vms(), hosts, hv.clone(), peers.clone());
        let events = fencer.subscribe();
        fencer.bind(Arc::new(FakeNode(status(g))), Arc::new(move || lease_valid));
        Setup { fencer, hv, peers, events }
    }

    fn request(target: &str) -> FenceVmRequest {
        FenceVmRequest {
            vm_uuid: target.into(),
            cluster: "pg".into(),
            node_name: "pg-b".into(),
            node_id: 2,
            timeout_ms: 5000,
        }
    }

    fn notice(rx: &mut broadcast::Receiver<pb::Event>) -> String {
        match rx.try_recv().expect("an event").kind {
            Some(pb::event::Kind::Notice(pb::Notice { notice: Some(pb::notice::Notice::Text(t)) })) => t,
            other => panic!("{other:?}"),
        }
    }

    const RUNNING: DomainState = DomainState::Running(RunningReason::Booted);

    #[tokio::test]
    async fn here_the_vm_is_destroyed_confirmed_off_and_marked_as_fenced() {
        use pb::GroupState as G;
        let mut s = setup(group(G::Started, "h1", None), Some(RUNNING), true, true);
        let r = s.fencer.fence_vm(PG1, request(PG2)).await.unwrap();
        assert_eq!((r.outcome(), r.hypervisor.as_str()), (FenceVmOutcome::PoweredOff, "h1"));
        assert_eq!(s.hv.state_now(), Some(DomainState::Shutoff(ShutoffReason::Destroyed)));
        let mark = s.fencer.marks().get(&Uuid::parse_str(PG2).unwrap()).expect("marked");
        assert!(mark.contains("fence request of VM pg1 (guest cluster pg)"), "{mark}");
        let text = notice(&mut s.events);
        assert!(text.contains("pg2") && text.contains("asked by VM pg1") && text.contains("PoweredOff"), "{text}");

        // Again: already off, nothing destroyed twice, the mark stays (it was fenced).
        let r = s.fencer.fence_vm(PG1, request(PG2)).await.unwrap();
        assert_eq!(r.outcome(), FenceVmOutcome::AlreadyOff);
        assert_eq!(*s.hv.destroys.lock().unwrap(), 1);
        assert!(s.fencer.marks().get(&Uuid::parse_str(PG2).unwrap()).is_some());

        // A paused VM is destroyed too (a stalled guest is exactly what is fenced).
        let s = setup(group(G::Started, "h1", None), Some(DomainState::Paused(PausedReason::User)), true, true);
        let r = s.fencer.fence_vm(PG1, request(PG2)).await.unwrap();
        assert_eq!(r.outcome(), FenceVmOutcome::PoweredOff);
    }

    #[tokio::test]
    async fn already_off_here_leaves_no_mark() {
        let s = setup(
            group(pb::GroupState::Stopping, "h1", None),
            Some(DomainState::Shutoff(ShutoffReason::Shutdown)),
            true,
            true,
        );
        let r = s.fencer.fence_vm(PG1, request(PG2)).await.unwrap();
        assert_eq!(r.outcome(), FenceVmOutcome::AlreadyOff);
        assert!(s.fencer.marks().get(&Uuid::parse_str(PG2).unwrap()).is_none());
        assert_eq!(*s.hv.destroys.lock().unwrap(), 0);
    }

    #[tokio::test]
    async fn on_a_live_peer_it_is_forwarded_once_with_the_asker_and_a_bounded_timeout() {
        let s = setup(group(pb::GroupState::Started, "h2", None), None, true, true);
        let r = s.fencer.fence_vm(PG1, request(PG2)).await.unwrap();
        assert_eq!((r.outcome(), r.hypervisor.as_str()), (FenceVmOutcome::PoweredOff, "h2"));
        let sent = s.peers.0.lock().unwrap().clone();
        assert_eq!(sent.len(), 1);
        assert_eq!((sent[0].0.as_str(), sent[0].1.as_str()), ("h2", PG1));
        assert!(sent[0].2 > 0 && sent[0].2 <= 4500, "timeout {} within 90% of 5000 ms", sent[0].2);

        // A forwarded request that finds the VM elsewhere is not forwarded again.
        let e = s.fencer.fence_forwarded("h3", PG1, request(PG2)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().contains("h3 forwarded") && e.message().contains("sees it on h2"), "{e}");
        assert_eq!(s.peers.0.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_dead_host_answers_off_only_when_its_self_fence_stops_its_vms() {
        let g = || group(pb::GroupState::Blocked, "h3", Some(pb::NotRunningReason::TakeoverPending));
        let s = setup(g(), None, true, true);
        let r = s.fencer.fence_vm(PG1, request(PG2)).await.unwrap();
        assert_eq!((r.outcome(), r.hypervisor.as_str()), (FenceVmOutcome::AlreadyOff, "h3"));
        assert!(r.detail.contains("host lease is dead"), "{}", r.detail);

        let s = setup(g(), None, false, true);
        let e = s.fencer.fence_vm(PG1, request(PG2)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(
            e.message().contains("host h3 is dead but its QEMU processes are not fenced by Tandem"),
            "{}",
            e.message()
        );
        assert!(s.peers.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_silent_holder_with_a_live_lease_is_never_a_success() {
        let g = group(pb::GroupState::Blocked, "h3", Some(pb::NotRunningReason::WaitingForLease));
        let mut s = setup(g, None, true, true);
        let e = s.fencer.fence_vm(PG1, request(PG2)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().contains("host lease is alive"), "{}", e.message());
        assert!(notice(&mut s.events).contains("not confirmed"));
    }

    #[tokio::test]
    async fn not_held_anywhere_is_already_off_once_this_hypervisor_agrees() {
        let g = || group(pb::GroupState::Stopped, "", Some(pb::NotRunningReason::OperatorStopped));
        for here in [None, Some(DomainState::Shutoff(ShutoffReason::Destroyed))] {
            let s = setup(g(), here, true, true);
            let r = s.fencer.fence_vm(PG1, request(PG2)).await.unwrap();
            assert_eq!(r.outcome(), FenceVmOutcome::AlreadyOff, "{here:?}");
        }
        // Running here although nobody holds its lease: powered off, not reported off.
        let s = setup(g(), Some(RUNNING), true, true);
        let r = s.fencer.fence_vm(PG1, request(PG2)).await.unwrap();
        assert_eq!(r.outcome(), FenceVmOutcome::PoweredOff);
        assert!(s.hv.state_now().unwrap().is_off());
    }

    #[tokio::test]
    async fn refusals_touch_nothing_and_are_published() {
        let mut s = setup(group(pb::GroupState::Started, "h1", None), Some(RUNNING), true, true);
        let e = s.fencer.fence_vm(WEB, request(PG2)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(notice(&mut s.events).contains("refused"));
        let e = s.fencer.fence_vm(PG2, request(PG2)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(e.message().contains("fence itself"), "{}", e.message());
        assert_eq!(s.hv.state_now(), Some(RUNNING));

        // A host whose lease expired answers nothing.
        let s = setup(group(pb::GroupState::Started, "h1", None), Some(RUNNING), true, false);
        let e = s.fencer.fence_vm(PG1, request(PG2)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert_eq!(s.hv.state_now(), Some(RUNNING));

        // Nor does a fencer not yet bound to its node.
        let unbound =
            VmFencer::from_parts("h1", vms(), BTreeMap::new(), FakeHv::with(None), Arc::new(FakePeers::default()));
        let e = unbound.fence_vm(PG1, request(PG2)).await.unwrap_err();
        assert!(e.code() == Code::Unavailable && e.message().contains("starting"), "{e}");
    }
}
