//! The declarative cluster model the engine works from: nodes, failover groups, their
//! resources, and the placement and recovery policies of each group.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::{Add, AddAssign};

/// A cluster node (a guest for the guest cluster, a hypervisor for the host cluster).
///
/// Ties between nodes are broken by this id, so it must be stable across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node-{}", self.0)
    }
}

/// The name of a failover group, unique in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub String);

impl From<&str> for GroupId {
    fn from(s: &str) -> Self {
        GroupId(s.to_owned())
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name of a resource, unique within its failover group.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceId(pub String);

impl From<&str> for ResourceId {
    fn from(s: &str) -> Self {
        ResourceId(s.to_owned())
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One resource of a group (a disk, an IP address, an application, a VM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceSpec {
    /// The resource's name within its group.
    pub id: ResourceId,
    /// Resources of the same group that must run before this one starts and keep running
    /// while it runs. They must come earlier in the group's resource list.
    pub depends_on: Vec<ResourceId>,
}

impl ResourceSpec {
    /// A resource with no dependencies.
    pub fn new(id: &str) -> Self {
        ResourceSpec { id: id.into(), depends_on: Vec::new() }
    }

    /// A resource that depends on the listed resources of its group.
    pub fn depending_on(id: &str, deps: &[&str]) -> Self {
        ResourceSpec { id: id.into(), depends_on: deps.iter().map(|d| ResourceId::from(*d)).collect() }
    }
}

/// Whether a group moves back to a more preferred node when that node becomes available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failback {
    /// The holder hands the group over to the most preferred healthy node as soon as it sees it.
    Auto,
    /// The group stays where it runs until it fails or an operator moves it.
    Manual,
}

/// Where a group may run and when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementPolicy {
    /// The nodes the group may run on, most preferred first.
    pub eligible: Vec<NodeId>,
    /// What happens when a more preferred node comes back.
    pub failback: Failback,
    /// Whether the group starts when the cluster starts (before any operator command).
    pub start_on_cluster_start: bool,
    /// Whether taking the group over from a lost node needs outside fencing
    /// (`RequestFence` then `FenceConfirmed`) before the lease is requested. Use it where
    /// the lost node may not be able to self-fence (no watchdog).
    pub require_fencing: bool,
}

/// What to do once a group has failed over `max_failovers` times without a stable run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalAction {
    /// Stop the group and keep it stopped on every node until an operator resets or starts it.
    StopEverywhere,
    /// Leave the group as it is where it is (failed resources stay failed, the lease is kept)
    /// and stop recovering it until an operator resets it.
    DoNothing,
}

/// A monitor's own restart limit ([`FailoverGroup::monitor_recovery`]): the failures that
/// monitor confirms are restarted in place up to `max_restarts` times within
/// `restart_window_ms`, counted apart from the group's other failures; one more fails the
/// group over, as the group's own limit does. Failover limit and final action stay the
/// group's: they are about the group moving, whatever failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartLimit {
    /// Local restarts allowed within `restart_window_ms`.
    pub max_restarts: u32,
    /// The sliding window over which they are counted.
    pub restart_window_ms: u64,
}

/// How failures of a group's resources are recovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryPolicy {
    /// Local restarts allowed within `restart_window_ms` before the group fails over.
    pub max_restarts: u32,
    /// The sliding window over which local restarts are counted.
    pub restart_window_ms: u64,
    /// Failovers allowed before the final action. The count resets once the group has run
    /// with every resource started for `failover_window_ms` on one node.
    pub max_failovers: u32,
    /// How long a group must run undisturbed for its failover count to reset.
    pub failover_window_ms: u64,
    /// What happens when the failover count is exhausted.
    pub final_action: FinalAction,
    /// Stop attempts for one resource before the node self-fences.
    pub max_stop_attempts: u32,
}

impl Default for RecoveryPolicy {
    fn default() -> Self {
        RecoveryPolicy {
            max_restarts: 3,
            restart_window_ms: 600_000,
            max_failovers: 3,
            failover_window_ms: 3_600_000,
            final_action: FinalAction::StopEverywhere,
            max_stop_attempts: 3,
        }
    }
}

/// Memory and vCPUs: what a node offers ([`ClusterModel::capacity`]) or what a group needs
/// while it is active on a node ([`FailoverGroup::demand`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Capacity {
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
}

impl Capacity {
    /// Nothing: the demand of a group that needs no capacity.
    pub const ZERO: Capacity = Capacity { memory_mib: 0, vcpus: 0 };

    /// `memory_mib` MiB of memory and `vcpus` vCPUs.
    pub const fn new(memory_mib: u64, vcpus: u32) -> Self {
        Capacity { memory_mib, vcpus }
    }

    /// Whether both amounts are zero.
    pub fn is_zero(&self) -> bool {
        *self == Capacity::ZERO
    }

    /// `self - other`, each amount floored at zero (what is left of an overcommitted node is nothing).
    pub fn saturating_sub(self, other: Capacity) -> Capacity {
        Capacity {
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            vcpus: self.vcpus.saturating_sub(other.vcpus),
        }
    }

    /// Whether `demand` fits within `self` (both amounts at most `self`'s).
    pub fn fits(&self, demand: &Capacity) -> bool {
        demand.memory_mib <= self.memory_mib && demand.vcpus <= self.vcpus
    }
}

/// Saturating: sums of demands never wrap.
impl Add for Capacity {
    type Output = Capacity;

    fn add(self, other: Capacity) -> Capacity {
        Capacity {
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
            vcpus: self.vcpus.saturating_add(other.vcpus),
        }
    }
}

impl AddAssign for Capacity {
    fn add_assign(&mut self, other: Capacity) {
        *self = *self + other;
    }
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB, {} vCPUs", self.memory_mib, self.vcpus)
    }
}

/// A set of resources that runs together on one node at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverGroup {
    /// The group's name.
    pub id: GroupId,
    /// The resources in start order; they stop in the reverse order.
    pub resources: Vec<ResourceSpec>,
    /// Where the group may run.
    pub placement: PlacementPolicy,
    /// How failures are recovered.
    pub recovery: RecoveryPolicy,
    /// What the group takes of a node's [`ClusterModel::capacity`] while it is active there
    /// (held, being acquired, or with resources not yet stopped). Zero: nothing.
    pub demand: Capacity,
    /// Higher first: when several groups compete for one node's capacity in one evaluation,
    /// the higher priority claims it first (ties: model order). Never preempts a running group.
    pub priority: i32,
    /// Affinity sets: a free group prefers (after a move target) the nodes running another
    /// group of one of these sets. A preference only; it never moves a running group.
    pub affinity: Vec<String>,
    /// Anti-affinity sets: the group never becomes active on a node where another group of
    /// one of these sets is active. A hard rule, like capacity.
    pub anti_affinity: Vec<String>,
    /// Monitors (by name, as `Event::MonitorFailed` names them) whose failures are counted
    /// against a restart limit of their own instead of the group's `recovery`.
    pub monitor_recovery: BTreeMap<String, RestartLimit>,
}

impl FailoverGroup {
    /// A group without demand, priority 0, no affinity or anti-affinity sets.
    pub fn new(
        id: GroupId,
        resources: Vec<ResourceSpec>,
        placement: PlacementPolicy,
        recovery: RecoveryPolicy,
    ) -> Self {
        FailoverGroup {
            id,
            resources,
            placement,
            recovery,
            demand: Capacity::ZERO,
            priority: 0,
            affinity: Vec::new(),
            anti_affinity: Vec::new(),
            monitor_recovery: BTreeMap::new(),
        }
    }
}

/// Cluster-wide timing knobs of the engine, in milliseconds of the runtime's monotonic clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// How long the candidate at rank `r` waits after seeing a lease free before asking for
    /// it: `r * takeover_stagger_ms`, so the most preferred healthy node asks first.
    pub takeover_stagger_ms: u64,
    /// How long to wait after a refused lease request before asking again.
    pub acquire_retry_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing { takeover_stagger_ms: 2_000, acquire_retry_ms: 1_000 }
    }
}

/// The whole cluster as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterModel {
    /// Every node of the cluster.
    pub nodes: Vec<NodeId>,
    /// Every failover group.
    pub groups: Vec<FailoverGroup>,
    /// Timing knobs.
    pub timing: Timing,
    /// What each node offers to groups' demands. A node without an entry is unlimited.
    pub capacity: BTreeMap<NodeId, Capacity>,
}

impl ClusterModel {
    /// A model whose nodes are all unlimited.
    pub fn new(nodes: Vec<NodeId>, groups: Vec<FailoverGroup>, timing: Timing) -> Self {
        ClusterModel { nodes, groups, timing, capacity: BTreeMap::new() }
    }
}

/// Why a cluster model was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The node list is empty.
    #[error("the cluster model lists no nodes; add at least one node")]
    NoNodes,
    /// A node id appears twice.
    #[error("{0} is listed twice in the cluster's nodes; node ids must be unique")]
    DuplicateNode(NodeId),
    /// The engine was created for a node that is not in the model.
    #[error("{0} is not one of the cluster's nodes; add it to the cluster or start the engine with a listed node id")]
    NodeNotInCluster(NodeId),
    /// A group id appears twice.
    #[error("group `{0}` is defined twice; group ids must be unique")]
    DuplicateGroup(GroupId),
    /// A group has no resources.
    #[error("group `{0}` has no resources; add at least one resource")]
    EmptyGroup(GroupId),
    /// A resource id appears twice in one group.
    #[error("group `{group}`: resource `{resource}` is defined twice; resource ids must be unique within a group")]
    DuplicateResource {
        /// The group.
        group: GroupId,
        /// The repeated resource.
        resource: ResourceId,
    },
    /// A dependency names something that is not a resource of the group.
    #[error(
        "group `{group}`: resource `{resource}` depends on `{dependency}`, which is not a resource of this group; fix the name or add the resource"
    )]
    UnknownDependency {
        /// The group.
        group: GroupId,
        /// The dependent resource.
        resource: ResourceId,
        /// The missing dependency.
        dependency: ResourceId,
    },
    /// A dependency comes at or after its dependent in the start order.
    #[error(
        "group `{group}`: resource `{resource}` depends on `{dependency}`, which does not come before it in the start order; list dependencies before the resources that need them"
    )]
    DependencyOrder {
        /// The group.
        group: GroupId,
        /// The dependent resource.
        resource: ResourceId,
        /// The misplaced dependency.
        dependency: ResourceId,
    },
    /// A group may run nowhere.
    #[error("group `{0}` has no eligible nodes; list at least one node in its placement policy")]
    NoEligibleNodes(GroupId),
    /// An eligible node is not a cluster node.
    #[error(
        "group `{group}`: eligible node {node} is not a cluster node; add it to the cluster or remove it from the group"
    )]
    UnknownEligibleNode {
        /// The group.
        group: GroupId,
        /// The unknown node.
        node: NodeId,
    },
    /// An eligible node appears twice.
    #[error("group `{group}`: eligible node {node} is listed twice; list each node once, in order of preference")]
    DuplicateEligibleNode {
        /// The group.
        group: GroupId,
        /// The repeated node.
        node: NodeId,
    },
    /// Self-fencing without a single stop attempt would fence on every stop.
    #[error("group `{0}`: recovery.max_stop_attempts is 0; allow at least one stop attempt before self-fencing")]
    NoStopAttempts(GroupId),
    /// A counting window is empty.
    #[error("group `{group}`: recovery.{field} is 0 ms; a counting window must be positive")]
    ZeroWindow {
        /// The group.
        group: GroupId,
        /// The field.
        field: &'static str,
    },
    /// A capacity is given for a node that is not a cluster node.
    #[error("a capacity is given for {0}, which is not a cluster node; add the node or remove its capacity")]
    UnknownCapacityNode(NodeId),
    /// An affinity or anti-affinity set name is empty.
    #[error("group `{0}` lists an empty affinity or anti-affinity set name; name every set")]
    EmptySetName(GroupId),
    /// A group is both affine and anti-affine to the same set.
    #[error(
        "group `{group}` lists set `{set}` in both affinity and anti_affinity; a group cannot both seek and avoid the same set, remove it from one"
    )]
    AffinityConflict {
        /// The group.
        group: GroupId,
        /// The set in both lists.
        set: String,
    },
}

impl ClusterModel {
    /// Checks the model; the engine only runs validated models.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.nodes.is_empty() {
            return Err(ModelError::NoNodes);
        }
        let mut nodes = BTreeSet::new();
        for n in &self.nodes {
            if !nodes.insert(*n) {
                return Err(ModelError::DuplicateNode(*n));
            }
        }
        let mut groups = BTreeSet::new();
        for g in &self.groups {
            if !groups.insert(&g.id) {
                return Err(ModelError::DuplicateGroup(g.id.clone()));
            }
            if g.resources.is_empty() {
                return Err(ModelError::EmptyGroup(g.id.clone()));
            }
            let all: BTreeSet<&ResourceId> = g.resources.iter().map(|r| &r.id).collect();
            let mut seen = BTreeSet::new();
            for r in &g.resources {
                for d in &r.depends_on {
                    if !all.contains(d) {
                        return Err(ModelError::UnknownDependency {
                            group: g.id.clone(),
                            resource: r.id.clone(),
                            dependency: d.clone(),
                        });
                    }
                    if !seen.contains(d) {
                        return Err(ModelError::DependencyOrder {
                            group: g.id.clone(),
                            resource: r.id.clone(),
                            dependency: d.clone(),
                        });
                    }
                }
                if !seen.insert(&r.id) {
                    return Err(ModelError::DuplicateResource { group: g.id.clone(), resource: r.id.clone() });
                }
            }
            if g.placement.eligible.is_empty() {
                return Err(ModelError::NoEligibleNodes(g.id.clone()));
            }
            let mut eligible = BTreeSet::new();
            for n in &g.placement.eligible {
                if !nodes.contains(n) {
                    return Err(ModelError::UnknownEligibleNode { group: g.id.clone(), node: *n });
                }
                if !eligible.insert(*n) {
                    return Err(ModelError::DuplicateEligibleNode { group: g.id.clone(), node: *n });
                }
            }
            if g.recovery.max_stop_attempts == 0 {
                return Err(ModelError::NoStopAttempts(g.id.clone()));
            }
            if g.recovery.restart_window_ms == 0 {
                return Err(ModelError::ZeroWindow { group: g.id.clone(), field: "restart_window_ms" });
            }
            if g.recovery.failover_window_ms == 0 {
                return Err(ModelError::ZeroWindow { group: g.id.clone(), field: "failover_window_ms" });
            }
            if g.affinity.iter().chain(&g.anti_affinity).any(String::is_empty) {
                return Err(ModelError::EmptySetName(g.id.clone()));
            }
            if let Some(set) = g.affinity.iter().find(|s| g.anti_affinity.contains(s)) {
                return Err(ModelError::AffinityConflict { group: g.id.clone(), set: set.clone() });
            }
        }
        if let Some(n) = self.capacity.keys().find(|n| !nodes.contains(*n)) {
            return Err(ModelError::UnknownCapacityNode(*n));
        }
        Ok(())
    }
}

impl FailoverGroup {
    /// Indices of the resources that depend on resource `i`, directly or not (excluding `i`).
    pub(crate) fn dependents_of(&self, i: usize) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        // Dependencies always come earlier, so one forward pass finds the transitive closure.
        for (j, r) in self.resources.iter().enumerate().skip(i + 1) {
            let depends = r
                .depends_on
                .iter()
                .any(|d| self.resources.iter().position(|x| &x.id == d).is_some_and(|k| k == i || out.contains(&k)));
            if depends {
                out.insert(j);
            }
        }
        out
    }
}
