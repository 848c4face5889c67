//! tandem-host: the host agent. It runs on every hypervisor, restarts crashed VMs, fails
//! whole VMs over between hypervisors, and runs planned maintenance (guests are told to stop
//! or move their services before the host goes down).
//!
//! This crate holds the hypervisor layer (the [`hypervisor::Hypervisor`] trait and its
//! libvirt adapter, [`hypervisor::libvirt::LibvirtHypervisor`]), the VM resource that the
//! node runtime drives ([`vm::VmResource`], built by [`vm::HostResources`]), the checks of a
//! host cluster configuration ([`cluster`]) and the host agent's own gRPC service ([`api`],
//! `tandem.v1.HostAgent`), and the host side of the host–guest link ([`link`]). The
//! `tandem-host` binary puts them on the node runtime
//! (`tandem-node`).

#![warn(missing_docs)]

pub mod api;
pub mod cluster;
pub mod fence;
pub mod handover;
pub mod hypervisor;
pub mod link;
pub mod maintenance;
pub mod nic;
pub mod qemu_fence;
pub mod vm;

/// An error with its sources, `: `-separated (for messages that must say everything).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
