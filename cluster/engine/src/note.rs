//! What travels with a group's lease: the fencing token and the group note.

use crate::model::{FailoverGroup, NodeId};

/// The fencing token of one lease acquisition; strictly increasing per group. The runtime
/// stamps every resource it starts with it, so storage can refuse writes from stale holders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseToken(pub u64);

/// Whether the cluster wants a group to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desired {
    /// The group should run on its best healthy eligible node.
    Started,
    /// The group should not run anywhere.
    Stopped(StopCause),
}

/// Why the cluster wants a group stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// The placement policy does not start the group on cluster start and no operator
    /// started it yet.
    NotAutoStarted,
    /// An operator stopped it.
    Operator,
    /// The failover limit was reached and the final action is `StopEverywhere`.
    FailoverLimit,
    /// The node stopped it on entering standby with `StandbyMode::Park`; it is wanted again
    /// once that node leaves standby (the node itself takes the lease and clears this). An
    /// operator command with a higher sequence overrides it like any desired state.
    Parked(NodeId),
}

/// The cluster-wide state of a group, kept in the lease's value block (sanlock's LVB):
/// written by the holder when it releases, returned with every acquisition and observation.
///
/// Operator intent is ordered by operator sequence numbers: the higher sequence wins, ties
/// go to the note (it was written by a holder that already merged it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseNote {
    /// Whether the group should run.
    pub desired: Desired,
    /// The node an operator moved the group to; ranked first while it is healthy.
    pub preferred: Option<NodeId>,
    /// Operator sequence of `desired` and `preferred`.
    pub desired_seq: u64,
    /// Operator sequence of the last counter reset.
    pub reset_seq: u64,
    /// Failovers since the last stable run (see `RecoveryPolicy::failover_window_ms`).
    pub failovers: u32,
    /// Nodes that gave the group up because of a failure since the last stable run or reset,
    /// sorted; they rank after every other healthy node.
    pub failed_on: Vec<NodeId>,
    /// The releasing holder live-migrated the group's running state to a node, where it
    /// waits paused: that node ranks first, and only that node, and only as the very next
    /// holder, may resume it (`Command::StartResource::migrated_in`): its grant's token must
    /// directly follow the releasing holder's. A later holder never resumes a copy that went
    /// stale meanwhile, even when an intermediate holder died before it could rewrite the note.
    pub migrated: Option<Migrated>,
}

/// A live migration handed over with a lease (see `LeaseNote::migrated`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// The node the running state moved to.
    pub to: NodeId,
    /// The token of the holder that migrated it (and wrote the note when it released).
    pub by_token: LeaseToken,
}

impl LeaseNote {
    /// The note of a group whose lease was never written.
    pub fn initial(group: &FailoverGroup) -> Self {
        LeaseNote {
            desired: if group.placement.start_on_cluster_start {
                Desired::Started
            } else {
                Desired::Stopped(StopCause::NotAutoStarted)
            },
            preferred: None,
            desired_seq: 0,
            reset_seq: 0,
            failovers: 0,
            failed_on: Vec::new(),
            migrated: None,
        }
    }

    pub(crate) fn mark_failed_on(&mut self, node: NodeId) {
        if let Err(i) = self.failed_on.binary_search(&node) {
            self.failed_on.insert(i, node);
        }
    }
}
