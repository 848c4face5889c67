//! tandem-node: the runtime every Tandem agent runs on one node of its cluster.
//!
//! One task drives the pure failover engine (`tandem-engine`) and carries out its
//! commands: resource operations through the agent's [`resources::ResourceFactory`], the
//! lease service with its fencing guard (`tandem-lease`), heartbeats and quorum
//! (`tandem-membership`), fencing of lost peers, monitors, and the node API
//! (`tandem.v1.GuestAgent`, the group-level API both agents serve). The guest agent brings
//! application resources; the host agent brings VMs.

#![warn(missing_docs)]

pub mod agent;
pub mod api;
pub mod control;
pub mod fence;
pub mod fencing;
pub mod link;
pub mod note;
pub mod plan;
pub mod resources;
pub mod runtime;
