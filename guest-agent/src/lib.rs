//! tandem-guest: the guest agent. It runs inside a VM or on a physical server, starts and
//! stops the resources of failover groups (disks, IP addresses, programs, OCF agents,
//! systemd units) under their disk-fencing leases, watches them with `tandem-monitors`, and
//! moves a group to another node when it fails. The node runtime it shares with the host
//! agent (engine driver, leases, membership, fencing, API) is `tandem-node`, re-exported
//! here under its usual paths.

#![warn(missing_docs)]

pub use tandem_node::{agent, api, control, fence, fencing, note, plan, runtime};

pub mod resources;
