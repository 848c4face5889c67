//! Everything the engine asks the runtime to do.

use crate::event::StandbyMode;
use crate::model::{GroupId, NodeId, ResourceId};
use crate::note::{LeaseNote, LeaseToken};
use crate::status::Unfit;

/// An output of the engine. The runtime executes commands in the order given (commands of
/// different groups are independent) and reports each result back as an [`crate::Event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Find out whether the resource already runs on this node; answer with `ProbeResult`.
    /// Emitted only by `Engine::startup`.
    ProbeResource {
        /// The group.
        group: GroupId,
        /// The resource.
        resource: ResourceId,
    },
    /// Start the resource, stamped with the group's fencing token; answer with
    /// `ResourceStarted` or `ResourceStartFailed`. Only emitted while this node holds the
    /// group's lease with that token, and only once every dependency runs.
    StartResource {
        /// The group.
        group: GroupId,
        /// The resource.
        resource: ResourceId,
        /// The lease token to stamp it with.
        token: LeaseToken,
        /// The previous holder live-migrated the group here before it released the lease
        /// (`LeaseNote::migrated` named this node, and this grant directly follows that
        /// holder's): the resource's state waits here,
        /// paused, and the start should resume it rather than start afresh. Set only for the
        /// first start under this lease.
        migrated_in: bool,
    },
    /// A resource found running at startup now belongs to the lease acquired with `token`:
    /// re-stamp it. No answer expected.
    AdoptResource {
        /// The group.
        group: GroupId,
        /// The resource.
        resource: ResourceId,
        /// The new lease token.
        token: LeaseToken,
    },
    /// Stop the resource; answer with `ResourceStopped` or `ResourceStopFailed`. Resources
    /// stop in reverse start order, dependents first.
    StopResource {
        /// The group.
        group: GroupId,
        /// The resource.
        resource: ResourceId,
        /// Stop without grace (kill the process group at once): the lease is gone or was
        /// never ours, so another node may start the group any moment.
        force: bool,
        /// The stop is part of a planned handover to one known node (an operator move, a
        /// failback, a standby move to the best other node): a resource that can move its
        /// running state there (a VM's live migration) may do so and answer
        /// `ResourceMigrated`. `None` for every other stop, and always with `force`.
        handover: Option<Handover>,
    },
    /// Ask the lease layer for the group's lease; answer with `LeaseAcquired` or
    /// `LeaseAcquireFailed`.
    AcquireLease {
        /// The group.
        group: GroupId,
    },
    /// Release the group's lease, writing `note` into it. Emitted only once every resource
    /// of the group is stopped here. No answer expected.
    ReleaseLease {
        /// The group.
        group: GroupId,
        /// The token being released.
        token: LeaseToken,
        /// The group's cluster-wide state for the next holder.
        note: LeaseNote,
        /// Why the group leaves this node.
        reason: ReleaseReason,
    },
    /// Fence the node from outside (power it off, kill its VM); answer with `FenceConfirmed`.
    RequestFence {
        /// The node to fence.
        node: NodeId,
    },
    /// A stop failed `max_stop_attempts` times: kill everything on this node (reboot)
    /// rather than risk the group running twice. The engine ignores every later event.
    SelfFence {
        /// The group whose stop failed.
        group: GroupId,
        /// The resource that would not stop.
        resource: ResourceId,
    },
    /// Something an operator should hear about. No answer expected.
    Notify(Notice),
}

/// A planned stop that hands the group to one node (see `Command::StopResource`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handover {
    /// The node that should take the group next.
    pub to: NodeId,
    /// Why the group leaves: `ReleaseReason::Handoff` (operator move, failback),
    /// `ReleaseReason::Standby` (this node entered standby in move mode) or
    /// `ReleaseReason::Vetoed` (a local veto, e.g. a failed network here).
    pub reason: ReleaseReason,
}

/// Why a group's lease is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReason {
    /// The group should not run (operator stop, not auto-started).
    Stopped,
    /// Local restarts were exhausted: the next eligible node should take it.
    Failover,
    /// Failback or operator move: `to` should take it.
    Handoff {
        /// The node that should take the group.
        to: NodeId,
    },
    /// This node lost quorum.
    QuorumLost,
    /// The failover limit was reached and the final action stops the group everywhere.
    FailoverLimit,
    /// The lease came back to this node (a reclaim after an agent restart) but the group
    /// does not fit here (capacity or anti-affinity): a node where it fits should take it.
    NoCapacity,
    /// This node is in standby (planned maintenance). Not a failure: no failover is counted
    /// and the node is not marked failed. The note says whether the group is parked
    /// (`Desired::Stopped(StopCause::Parked(node))`) or free for the best other node.
    Standby,
    /// A local veto forbids the group here (`Event::LocalVeto`): the note marks this node in
    /// `failed_on`; no failover is counted.
    Vetoed,
}

/// Operator-visible notices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The group reached its failover limit; the final action was taken.
    FailoverLimitReached {
        /// The group.
        group: GroupId,
        /// Its failover count.
        failovers: u32,
    },
    /// An operator command could not be applied.
    OperatorRejected {
        /// The command's sequence number.
        seq: u64,
        /// What was wrong and what to do.
        reason: String,
    },
    /// The group should run and healthy eligible nodes exist, but it fits on none of them
    /// (see `NotRunningReason::NoCapacity`). Emitted once per episode by each eligible node
    /// that sees it; it is not dropped: it starts once capacity appears.
    NoCapacity {
        /// The group.
        group: GroupId,
        /// Each healthy eligible node and why the group does not fit there.
        nodes: Vec<(NodeId, Unfit)>,
    },
    /// A group reported with `NoCapacity` is no longer blocked by capacity: a node where it
    /// fits is taking it, or it no longer should run.
    NoCapacityResolved {
        /// The group.
        group: GroupId,
    },
    /// This node entered standby (`Some`), changed its mode, or left it (`None`).
    Standby {
        /// The new mode.
        mode: Option<StandbyMode>,
    },
    /// A group was released because this node is in standby.
    StandbyReleased {
        /// The group.
        group: GroupId,
        /// Whether it was parked (stays stopped everywhere) rather than left to other nodes.
        parked: bool,
    },
    /// A group was released because of a local veto.
    VetoReleased {
        /// The group.
        group: GroupId,
        /// The veto's reason.
        reason: String,
    },
}
