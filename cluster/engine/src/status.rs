//! What `Engine::status` reports.

use crate::event::StandbyMode;
use crate::model::{GroupId, NodeId, ResourceId};

/// The engine's view of the cluster from its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// The node this engine decides for.
    pub node: NodeId,
    /// Whether this node's partition has quorum.
    pub quorum: bool,
    /// Whether the startup probe is still running.
    pub probing: bool,
    /// Whether this node self-fenced.
    pub self_fenced: bool,
    /// This node's standby mode (`None`: online).
    pub standby: Option<StandbyMode>,
    /// The peers this node knows to be in standby, sorted.
    pub peers_in_standby: Vec<NodeId>,
    /// Every group, in model order.
    pub groups: Vec<GroupStatus>,
}

/// One group as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    /// The group.
    pub id: GroupId,
    /// Its state.
    pub state: GroupState,
    /// Where it runs (or is being started/stopped), if anywhere known.
    pub location: Option<NodeId>,
    /// Local restarts within the current restart window (on this node): the group's own
    /// count plus every monitor's with a limit of its own.
    pub restarts: u32,
    /// Local restarts counted against a monitor's own limit (`monitor_recovery`), within
    /// that monitor's window, by monitor name; monitors with none yet are omitted.
    pub monitor_restarts: Vec<(String, u32)>,
    /// Failovers since the last stable run.
    pub failovers: u32,
    /// Nodes that gave the group up because of failures.
    pub failed_on: Vec<NodeId>,
    /// Whether monitor failures are ignored on this node.
    pub monitoring_suspended: bool,
    /// Why the group may not run on this node (`Event::LocalVeto`), if it may not.
    pub veto: Option<String>,
    /// The group's resources on this node.
    pub resources: Vec<ResourceStatus>,
    /// Why the group does not run, when it does not.
    pub not_running: Option<NotRunningReason>,
}

/// A group's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    /// Runs nowhere.
    Stopped,
    /// Being started here (lease requested or resources starting/restarting).
    Starting,
    /// Runs (here or on `location`).
    Started,
    /// Being stopped here.
    Stopping,
    /// Failed and left as is (final action `DoNothing`), or stopped by the final action.
    Failed,
    /// Should run but cannot for now (see `not_running`).
    Blocked,
}

/// A resource's state on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceStatus {
    /// The resource.
    pub id: ResourceId,
    /// Its state.
    pub state: ResourceState,
}

/// A resource's state on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceState {
    /// Not probed yet.
    Unknown,
    /// Not running.
    Stopped,
    /// Start in flight.
    Starting,
    /// Running.
    Started,
    /// Stop in flight.
    Stopping,
    /// Failed (start failure or confirmed monitor failure); will be stopped or left as is.
    Failed,
}

/// Why a group is not running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotRunningReason {
    /// An operator stopped it.
    OperatorStopped,
    /// Its policy does not start it on cluster start; an operator must start it.
    NotAutoStarted,
    /// It failed over too often; an operator must reset its counters.
    FailoverLimitReached,
    /// This node is still probing its resources.
    Probing,
    /// This node has no quorum.
    NoQuorum,
    /// This node self-fenced.
    SelfFenced,
    /// Its last holder is lost and must be fenced from outside first.
    WaitingForFence(NodeId),
    /// Its lease is still held by a lost node whose lease has not expired.
    WaitingForLease(NodeId),
    /// No eligible node is healthy.
    NoEligibleNode,
    /// A healthy eligible node should take it shortly.
    TakeoverPending,
    /// Healthy eligible nodes exist, but the group fits on none of them: why, per node, in
    /// eligible order. It starts as soon as one fits (a node joins, another group stops or
    /// moves); nothing running is preempted for it.
    NoCapacity {
        /// Each healthy eligible node and why the group does not fit there.
        nodes: Vec<(NodeId, Unfit)>,
    },
    /// The node named stopped it on entering standby in `Park` mode; it starts again when
    /// that node leaves standby, or when an operator starts it.
    Parked(NodeId),
    /// The only otherwise healthy eligible nodes are in standby (planned maintenance).
    Standby {
        /// Those nodes, in eligible order.
        nodes: Vec<NodeId>,
    },
    /// A local veto forbids it on this node and no other healthy eligible node exists.
    LocalVeto {
        /// The veto's reason.
        reason: String,
    },
}

/// Why a group cannot become active on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unfit {
    /// Not enough free memory (what the group needs and what the node has left, in MiB).
    Memory {
        /// The group's demand.
        needed: u64,
        /// The node's capacity minus the demands of the groups active there.
        free: u64,
    },
    /// Not enough free vCPUs.
    Vcpus {
        /// The group's demand.
        needed: u32,
        /// The node's capacity minus the demands of the groups active there.
        free: u32,
    },
    /// A group of one of its anti-affinity sets is active on the node.
    AntiAffinity {
        /// That group.
        group: GroupId,
        /// The set they share.
        set: String,
    },
}

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfit::Memory { needed, free } => write!(f, "needs {needed} MiB of memory, {free} MiB free"),
            Unfit::Vcpus { needed, free } => write!(f, "needs {needed} vCPUs, {free} free"),
            Unfit::AntiAffinity { group, set } => write!(f, "anti-affinity set `{set}` with group `{group}`"),
        }
    }
}

/// Why a node cannot take a group moved without a target ([`crate::Engine::move_target`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// It runs the group now.
    RunsIt,
    /// Not reachable, or its host lease is dead (for this node itself: no quorum, or still
    /// probing what runs).
    Down,
    /// In standby (planned maintenance).
    Standby,
    /// A local veto forbids the group there (known for this node only).
    Vetoed(String),
    /// The group does not fit there.
    Unfit(Unfit),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::RunsIt => write!(f, "runs it now"),
            Unavailable::Down => write!(f, "is down or cannot act"),
            Unavailable::Standby => write!(f, "is in standby"),
            Unavailable::Vetoed(why) => write!(f, "may not run it ({why})"),
            Unavailable::Unfit(u) => write!(f, "has no room for it ({u})"),
        }
    }
}

/// No node other than the current one can take a group moved without a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no other eligible node can take the group now")]
pub struct NoMoveTarget {
    /// Where the group runs now, if anywhere known.
    pub location: Option<NodeId>,
    /// Each eligible node, in policy order, and why it cannot take the group.
    pub nodes: Vec<(NodeId, Unavailable)>,
}
