//! tandem-host: the host agent. It runs on every hypervisor, restarts crashed VMs, fails
//! whole VMs over between hypervisors, and runs planned maintenance (guests are told to stop
//! or move their services before the host goes down).
//!
//! This crate currently holds the hypervisor layer: the [`hypervisor::Hypervisor`] trait and
//! its libvirt adapter, [`hypervisor::libvirt::LibvirtHypervisor`], and the host agent's own gRPC
//! service ([`api`], `tandem.v1.HostAgent`).

#![warn(missing_docs)]

pub mod api;
pub mod hypervisor;
