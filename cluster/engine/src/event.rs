//! Everything the runtime tells the engine.

use crate::model::{GroupId, NodeId, ResourceId};
use crate::note::{LeaseNote, LeaseToken};

/// An input to [`crate::Engine::handle`]. Events the engine cannot use (unknown group,
/// a result nobody asked for, a duplicate) are ignored: they never panic and never cause a
/// resource to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Answer to `ProbeResource`: whether the resource was found running on this node.
    /// Valid once per resource after `Engine::startup`.
    ProbeResult {
        /// The group.
        group: GroupId,
        /// The probed resource.
        resource: ResourceId,
        /// Whether it runs here now.
        running: bool,
    },
    /// Answer to `StartResource`: the resource runs.
    ResourceStarted {
        /// The group.
        group: GroupId,
        /// The resource.
        resource: ResourceId,
    },
    /// Answer to `StartResource`: the start failed (counts as a resource failure).
    ResourceStartFailed {
        /// The group.
        group: GroupId,
        /// The resource.
        resource: ResourceId,
    },
    /// Answer to `StopResource`: the resource is stopped.
    ResourceStopped {
        /// The group.
        group: GroupId,
        /// The resource.
        resource: ResourceId,
    },
    /// Answer to a `StopResource` with a `handover`: the resource no longer runs here; its
    /// running state moved to `to` (a VM live-migrated there), where it waits, paused,
    /// until `to` holds the lease and resumes it. The engine writes `to` into the lease
    /// note (`LeaseNote::migrated`) when it releases the lease. Otherwise like
    /// `ResourceStopped`.
    ResourceMigrated {
        /// The group.
        group: GroupId,
        /// The resource.
        resource: ResourceId,
        /// The node its state moved to.
        to: NodeId,
    },
    /// Answer to `StopResource`: the stop failed; the engine retries, then self-fences.
    ResourceStopFailed {
        /// The group.
        group: GroupId,
        /// The resource.
        resource: ResourceId,
    },
    /// A monitor confirmed a failure of a started resource (the scheduler already retried).
    /// Ignored for resources that are not started here and while monitoring is suspended.
    MonitorFailed {
        /// The group.
        group: GroupId,
        /// The failed resource.
        resource: ResourceId,
        /// The monitor that confirmed it; `None` for the resource's built-in check. A monitor
        /// listed in the group's `monitor_recovery` counts its restarts against its own limit,
        /// every other failure against the group's.
        monitor: Option<String>,
    },
    /// Answer to `AcquireLease`: this node now holds the group's lease.
    LeaseAcquired {
        /// The group.
        group: GroupId,
        /// The new fencing token.
        token: LeaseToken,
        /// The note found in the lease (`None` if never written).
        note: Option<LeaseNote>,
    },
    /// Answer to `AcquireLease`: refused, because another node holds it.
    LeaseAcquireFailed {
        /// The group.
        group: GroupId,
        /// The holder, if the lease layer knows it.
        holder: Option<NodeId>,
    },
    /// The lease layer could not renew this node's lease for the group (or found it taken):
    /// other nodes may take the group over soon. Valid at any time; the engine stops the
    /// group at once, forcefully.
    LeaseLost {
        /// The group.
        group: GroupId,
    },
    /// The lease layer's periodic read of a group's lease.
    LeaseObserved {
        /// The group.
        group: GroupId,
        /// The current holder (`None`: free).
        holder: Option<NodeId>,
        /// The note in the lease (`None` if never written).
        note: Option<LeaseNote>,
    },
    /// Membership: the node is reachable again (or for the first time).
    NodeJoined(NodeId),
    /// Membership: the node stopped answering on every link.
    NodeLost(NodeId),
    /// The lease layer found the node's host lease dead (it stopped renewing). Triggers an
    /// immediate takeover attempt; not enough for groups that require outside fencing.
    PeerFenced(NodeId),
    /// The lease layer sees the node's host lease renewed again after it was found dead (the
    /// node restarted and rejoined the lockspace).
    PeerLeaseAlive(NodeId),
    /// Answer to `RequestFence`: the node was fenced from outside (powered off, killed).
    FenceConfirmed(NodeId),
    /// Membership: this node's partition lost quorum. Every local group stops.
    QuorumLost,
    /// Membership: this node's partition has quorum again.
    QuorumRegained,
    /// An operator command. The runtime delivers each one to every engine of the cluster,
    /// with a cluster-wide increasing `seq` (the later command wins).
    Operator {
        /// Cluster-wide operator sequence number.
        seq: u64,
        /// The command.
        command: OperatorCommand,
    },
    /// Time passed; the engine re-evaluates its timers (takeover stagger, retries, windows).
    /// The runtime sends one every few hundred milliseconds.
    Tick,
    /// This node enters standby (`Some`: planned maintenance) or leaves it (`None`). Valid at
    /// any time, also before `Engine::startup` (a runtime restores a persisted standby so).
    /// In standby the node acquires no lease for a group to run it; groups it holds are
    /// stopped gracefully and released (`ReleaseReason::Standby`), which is not a failure.
    SetStandby(Option<StandbyMode>),
    /// Membership: a peer's standby flag changed (from its heartbeats). A peer in standby is
    /// not a candidate for any group. The flag survives `NodeLost`/`NodeJoined`.
    PeerStandby {
        /// The peer.
        node: NodeId,
        /// Whether it is in standby.
        standby: bool,
    },
    /// A local condition forbids the group on this node (`Some(reason)`), or no longer does
    /// (`None`): e.g. the group's network is down here. While vetoed this node does not
    /// acquire the group; if it holds it, it stops it gracefully and releases it with
    /// `ReleaseReason::Vetoed`, marked as failed on this node (peers rank it last).
    LocalVeto {
        /// The group.
        group: GroupId,
        /// Why, or `None` to lift the veto.
        reason: Option<String>,
    },
}

/// What a node in standby does with the groups it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandbyMode {
    /// Stop them and let the best other node take them over (not a failover).
    Move,
    /// Stop them and keep them stopped everywhere, parked by this node
    /// (`StopCause::Parked`), until this node leaves standby or an operator starts them.
    Park,
}

/// What an operator can ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorCommand {
    /// Run the group on its best node (clears a move pin).
    StartGroup(GroupId),
    /// Stop the group everywhere.
    StopGroup(GroupId),
    /// Run the group on `to` (an eligible node); pins it there until it fails or is moved.
    MoveGroup {
        /// The group.
        group: GroupId,
        /// The target node.
        to: NodeId,
    },
    /// Clear restart and failover counters and failure marks; releases a final action.
    ResetCounters(GroupId),
    /// Ignore monitor failures of the group on this node.
    SuspendMonitoring(GroupId),
    /// Act on monitor failures again.
    ResumeMonitoring(GroupId),
}

impl OperatorCommand {
    /// The group the command is about.
    pub fn group(&self) -> &GroupId {
        match self {
            OperatorCommand::StartGroup(g)
            | OperatorCommand::StopGroup(g)
            | OperatorCommand::ResetCounters(g)
            | OperatorCommand::SuspendMonitoring(g)
            | OperatorCommand::ResumeMonitoring(g) => g,
            OperatorCommand::MoveGroup { group, .. } => group,
        }
    }
}
