//! tandem-guest: the guest agent. It runs inside a VM or on a physical server, starts and
//! stops the resources of failover groups (disks, IP addresses, programs, OCF agents,
//! systemd units) under their disk-fencing leases, watches them with `tandem-monitors`, and
//! moves a group to another node when it fails, driven by the pure `tandem-engine`.

#![warn(missing_docs)]

pub mod agent;
pub mod api;
pub mod control;
pub mod fence;
pub mod fencing;
pub mod note;
pub mod plan;
pub mod resources;
pub mod runtime;
