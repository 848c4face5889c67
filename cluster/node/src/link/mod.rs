//! The host–guest link, guest side (`tandem.v1.HostLink`, proto/proto/tandem/v1/link.proto).
//!
//! A guest agent that runs in a VM keeps one link open to the host agent of the hypervisor
//! it runs on ([`GuestLink`]): it proves it holds its VM's link key (and checks that the
//! host holds it too: only its own host agent may give it orders), then sends heartbeats and
//! a summary of its groups, serves the host's planned-shutdown requests with
//! [`Control::prepare_shutdown`](crate::api::Control::prepare_shutdown), and carries the
//! node's host-cluster fence requests ([`GuestLink::fencing`]). The handshake's proofs are
//! in [`proof`], shared with the host side (tandem-host's `link` module).
//!
//! ```no_run
//! # async fn demo(agent: tandem_node::agent::Agent, settings: tandem_config::HostLinkSettings) {
//! use tandem_node::link::{GuestLink, GuestLinkConfig};
//! let key = tandem_node::link::proof::read_key(&settings.key_file).unwrap();
//! let link = GuestLink::new(GuestLinkConfig {
//!     address: settings.address.clone(),
//!     vm_uuid: "4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b01".into(),
//!     key,
//!     heartbeat_interval: settings.heartbeat_interval,
//!     cluster: "pg".into(),
//!     node: "n1".into(),
//!     tls: None,
//! });
//! // Before the agent starts: AgentOptions { host_cluster: Some(link.fencing()), .. }
//! let _task = link.spawn(agent.control.clone());
//! # }
//! ```

mod client;
pub mod proof;
mod transport;

pub use client::{GuestLink, GuestLinkConfig, LinkSessionError, LinkedHost};
pub use transport::{CONNECT_TIMEOUT, LinkTls, LinkTlsError, TransportError, connect};
