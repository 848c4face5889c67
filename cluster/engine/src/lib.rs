//! The pure failover engine of Tandem's guest and host clusters.
//!
//! One [`Engine`] runs per node and decides for that node only. The runtime (the agent)
//! feeds it [`Event`]s — resource operation results, monitor failures, lease answers and
//! observations, membership changes, operator commands, ticks — each stamped with its
//! monotonic clock in milliseconds, and executes the [`Command`]s it returns. The engine
//! never does I/O, never reads a clock, never sleeps and never draws random numbers, so it
//! is tested by comparing emitted commands, and simulated over thousands of seeds.
//!
//! Exclusivity comes from the group lease: resources start only under a lease token the
//! engine was granted (`LeaseAcquired`), the lease is released only once every resource is
//! stopped, and a lost lease stops the group at once. See `docs/engine.md`.
//!
//! Placement by node [`Capacity`], anti-affinity (both hard, checked by each node on its
//! own state), affinity (a preference) and priority is described in `docs/placement.md`; a
//! group that fits nowhere is reported ([`NotRunningReason::NoCapacity`],
//! [`Notice::NoCapacity`]) and starts once room appears.

#![warn(missing_docs)]

mod command;
mod engine;
mod event;
mod loads;
mod model;
mod note;
mod status;

#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

pub use command::{Command, Handover, Notice, ReleaseReason};
pub use engine::Engine;
pub use event::{Event, OperatorCommand, StandbyMode};
pub use model::{
    Capacity, ClusterModel, Failback, FailoverGroup, FinalAction, GroupId, ModelError, NodeId, PlacementPolicy,
    RecoveryPolicy, ResourceId, ResourceSpec, RestartLimit, Timing,
};
pub use note::{Desired, LeaseNote, LeaseToken, Migrated, StopCause};
pub use status::{
    ClusterStatus, GroupState, GroupStatus, NoMoveTarget, NotRunningReason, ResourceState, ResourceStatus, Unavailable,
    Unfit,
};
