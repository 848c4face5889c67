//! tandem-host: the host agent. It runs on every hypervisor, restarts crashed VMs, fails
//! whole VMs over between hypervisors, and runs planned maintenance (guests are told to stop
//! or move their services before the host goes down).
//!
//! This crate holds the hypervisor layer (the [`hypervisor::Hypervisor`] trait and its
//! libvirt adapter, [`hypervisor::libvirt::LibvirtHypervisor`]) and the VM resource that
//! the node runtime drives ([`vm::VmResource`], built by [`vm::HostResources`]).

#![warn(missing_docs)]

pub mod cluster;
pub mod hypervisor;
pub mod vm;
