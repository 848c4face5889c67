//! Cluster membership for Tandem's guest and host clusters.
//!
//! * [`core`]: a pure state machine (no I/O, no clock: `now` comes with every
//!   input) that turns heartbeats per link, lease-disk liveness, ping-target
//!   reachability and the disk tie-break into [`MembershipEvent`]s for the
//!   failover engine: a node is lost only when every link is silent for the
//!   link timeout AND the lease disk says it is dead.
//! * `runtime` (feature `runtime`, on by default): authenticated UDP
//!   heartbeats on every link and ping-target checks, driving the core.
//!
//! docs/membership.md describes the model, the timing and the quorum rules.

#![warn(missing_docs)]

pub mod core;
#[cfg(feature = "runtime")]
pub mod runtime;
#[cfg(feature = "runtime")]
pub mod wire;

pub use crate::core::{
    ConfigError, CoreCounters, DiskStatus, Input, LinkStatus, Membership, MembershipConfig, MembershipEvent,
    NodeConfig, NodeId, PeerStatus, PeerView,
};
