//! The hypervisor layer: what the host agent needs from a hypervisor, behind a trait.
//!
//! [`Hypervisor`] is object safe so that the backend is chosen at run time (the shape
//! follows cloud-hypervisor's `hypervisor::Hypervisor`). [`libvirt::LibvirtHypervisor`] is
//! the implementation; it runs every blocking libvirt call on tokio's blocking pool and
//! delivers lifecycle events through a channel, without polling.
//!
//! Domains are addressed by name or UUID, like `virsh` does: a string that parses as a UUID
//! is looked up as one, anything else as a name.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::broadcast;
use uuid::Uuid;

pub mod libvirt;
pub mod state;

pub use state::{
    CrashedReason, DomainEvent, DomainState, EventKind, EventReason, PausedReason, RunningReason, ShutoffReason,
    StopCause,
};

/// A boxed future, so that [`Hypervisor`] stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One domain (VM) as the hypervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// The domain's name, unique on one host.
    pub name: String,
    /// The domain's UUID, unique everywhere and kept across migrations.
    pub uuid: Uuid,
    /// Its state and the reason for it.
    pub state: DomainState,
    /// Memory currently assigned, in KiB.
    pub memory_kib: u64,
    /// Maximum memory, in KiB.
    pub max_memory_kib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Whether the domain has a persistent definition (survives being stopped).
    pub persistent: bool,
}

/// What a host offers for placing domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCapacity {
    /// Physical memory, in KiB.
    pub total_memory_kib: u64,
    /// Memory not in use, in KiB; `None` when the hypervisor does not report it.
    pub free_memory_kib: Option<u64>,
    /// Active physical CPUs (threads).
    pub cpus: u32,
    /// Nominal CPU frequency in MHz (0 when unknown).
    pub cpu_mhz: u32,
}

/// How a domain moves to another host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationMode {
    /// The domain keeps running while its memory is copied, and runs at the destination
    /// once the copy is complete; valid while it runs.
    Live,
    /// Like `Live`, but the destination's copy is left **paused** at the end: its vCPUs run
    /// only once someone resumes it there. This is how the cluster hands a VM over under
    /// its lease: the destination resumes it only after it acquired the VM's lease, so the
    /// VM never runs where its lease is not held.
    LivePaused,
    /// Only the definition moves; valid while the domain is off (shared storage assumed).
    Offline,
}

impl MigrationMode {
    fn as_str(&self) -> &'static str {
        match self {
            MigrationMode::Live | MigrationMode::LivePaused => "live migration",
            MigrationMode::Offline => "offline migration",
        }
    }
}

/// What the cluster writes on a running domain before it live-migrates it (into the live
/// definition only, so it travels with the migration and vanishes with the copy): who sent
/// it and under which lease token. At the destination a paused domain carrying a mark from
/// another host is an incoming copy that was never resumed (see `crate::vm`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverMark {
    /// The host that migrated the domain away.
    pub from: String,
    /// The fencing token that host held the VM's lease with while it migrated it.
    pub token: u64,
}

/// State of the connection to the hypervisor, for callers that must re-read everything
/// after a gap (events that happened while disconnected are lost).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connected; `generation` increases with every (re)connection.
    Connected {
        /// 1 for the first connection, then +1 for every reconnection.
        generation: u64,
    },
    /// The connection dropped and is being re-established.
    Reconnecting {
        /// Failed attempts so far.
        attempts: u32,
        /// The last attempt's error, for logs.
        last_error: Option<String>,
    },
    /// Closed for good (the hypervisor handle was dropped).
    Closed,
}

/// A hypervisor the host agent drives. Every method is safe to call concurrently.
///
/// Operations that change a domain return once the hypervisor accepted them: `shutdown`
/// only *requests* an ACPI power-off, the guest finishes later (watch the events).
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// Where this hypervisor is, for messages (a libvirt URI).
    fn uri(&self) -> &str;

    /// All domains, running or defined.
    fn list_domains(&self) -> BoxFuture<'_, Result<Vec<DomainInfo>, HypervisorError>>;

    /// One domain, by name or UUID.
    fn domain_info<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<DomainInfo, HypervisorError>>;

    /// Defines (or redefines) a persistent domain from its XML; it stays off.
    fn define<'a>(&'a self, xml: &'a str) -> BoxFuture<'a, Result<DomainInfo, HypervisorError>>;

    /// Removes a domain's persistent definition. Valid while it is off (a running domain
    /// becomes transient and disappears when it stops).
    fn undefine<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>>;

    /// Starts a defined domain that is off.
    fn start<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>>;

    /// Starts a defined domain that is off with its vCPUs paused (it reports `Paused`):
    /// what a start does when it must register the emulator process with the fencing
    /// guard before the guest runs, then [`Hypervisor::resume`]s it.
    ///
    /// The default implementation reports [`HypervisorError::Unsupported`].
    fn start_paused<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let _ = domain;
        Box::pin(async move {
            Err(HypervisorError::Unsupported {
                op: "start paused",
                uri: self.uri().to_string(),
                source: "this hypervisor backend cannot start a domain paused".into(),
            })
        })
    }

    /// Asks the guest to power off (ACPI power button); returns once requested.
    fn shutdown<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>>;

    /// Stops a domain at once, like pulling the power cord.
    fn destroy<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>>;

    /// A domain's state and the reason for it.
    fn state<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<DomainState, HypervisorError>>;

    /// A domain's XML description (the live one while it runs).
    fn domain_xml<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<String, HypervisorError>>;

    /// Moves a domain to the hypervisor at `dest_uri` (peer to peer: this host's hypervisor
    /// connects to the destination). The domain is defined there and undefined here.
    /// Fails with [`HypervisorError::Unsupported`] where the driver cannot migrate.
    fn migrate<'a>(
        &'a self,
        domain: &'a str,
        dest_uri: &'a str,
        mode: MigrationMode,
    ) -> BoxFuture<'a, Result<(), HypervisorError>>;

    /// Aborts the migration job running on `domain` here (the source), if any: the domain
    /// keeps running here and libvirt removes the destination's incomplete copy.
    ///
    /// The default implementation reports [`HypervisorError::Unsupported`].
    fn abort_migration<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let _ = domain;
        Box::pin(async move {
            Err(HypervisorError::Unsupported {
                op: "abort migration",
                uri: self.uri().to_string(),
                source: "this hypervisor backend cannot migrate".into(),
            })
        })
    }

    /// Writes (`Some`) or removes (`None`) the [`HandoverMark`] in the live definition of a
    /// running or paused domain.
    ///
    /// The default implementation reports [`HypervisorError::Unsupported`].
    fn set_handover_mark<'a>(
        &'a self,
        domain: &'a str,
        mark: Option<&'a HandoverMark>,
    ) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let _ = (domain, mark);
        Box::pin(async move {
            Err(HypervisorError::Unsupported {
                op: "set handover mark",
                uri: self.uri().to_string(),
                source: "this hypervisor backend keeps no domain metadata".into(),
            })
        })
    }

    /// The [`HandoverMark`] in the live definition of an active domain, if it has one.
    ///
    /// The default implementation answers `None`: a backend that cannot migrate receives no
    /// marked domains.
    fn handover_mark<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<Option<HandoverMark>, HypervisorError>> {
        let _ = domain;
        Box::pin(async move { Ok(None) })
    }

    /// The host's memory and CPUs.
    fn capacity(&self) -> BoxFuture<'_, Result<HostCapacity, HypervisorError>>;

    /// Lifecycle events of all domains, in the order the hypervisor reported them. A
    /// receiver that falls behind gets `Lagged` and must re-read the domains' states.
    fn subscribe(&self) -> broadcast::Receiver<DomainEvent>;

    /// Writes a running domain's memory to `path` on the hypervisor host, then stops it as
    /// crashed (`virsh dump --crash`): for diagnosing a hung guest. The domain ends shut off
    /// with the reason "crashed", which the cluster recovers like any crash.
    ///
    /// The default implementation reports [`HypervisorError::Unsupported`]: a backend that
    /// cannot dump memory says so instead of stopping the guest without a dump.
    fn crash_dump<'a>(&'a self, domain: &'a str, path: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let _ = (domain, path);
        Box::pin(async move {
            Err(HypervisorError::Unsupported {
                op: "crash dump",
                uri: self.uri().to_string(),
                source: "this hypervisor backend cannot write a domain's memory to a file".into(),
            })
        })
    }

    /// Pauses a running domain's vCPUs; its memory is kept (`virsh suspend`). The domain
    /// then reports `Paused(User)`. [`HypervisorError::InvalidState`] when it is not running.
    ///
    /// The default implementation reports [`HypervisorError::Unsupported`].
    fn suspend<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let _ = domain;
        Box::pin(async move {
            Err(HypervisorError::Unsupported {
                op: "suspend",
                uri: self.uri().to_string(),
                source: "this hypervisor backend cannot pause a domain".into(),
            })
        })
    }

    /// Lets a paused domain run again (`virsh resume`). [`HypervisorError::InvalidState`]
    /// when it is not paused.
    ///
    /// The default implementation reports [`HypervisorError::Unsupported`].
    fn resume<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let _ = domain;
        Box::pin(async move {
            Err(HypervisorError::Unsupported {
                op: "resume",
                uri: self.uri().to_string(),
                source: "this hypervisor backend cannot resume a domain".into(),
            })
        })
    }

    /// Whether this host's VMs are certainly stopped once its agent self-fenced (see
    /// [`self_fence_stops_vms`], the rule for a URI). The default is the safe answer, false.
    fn self_fence_stops_vms(&self) -> bool {
        false
    }
}

/// Whether a host's VMs are certainly stopped once that host's agent has self-fenced (its
/// host lease is dead), for the hypervisor at `uri`. This is the rule a host agent uses
/// before it answers a guest's fence request for a VM of a dead host with "off":
///
/// * `test://…` (the libvirt test driver): the domains live inside the agent's own
///   process, so a host whose lease is dead (agent killed by its fencing guard, or never
///   running again before it destroys them) runs none of them: **true**.
/// * anything else: **false**. Remote URIs run QEMU on another machine, out of the
///   guard's reach. With a local QEMU (`qemu:///system`) the guard does kill each VM's
///   registered QEMU process ([`crate::qemu_fence`]), but a VM whose registration failed
///   (adopted at start-up, retried by checks) or a guard that died before its agent would
///   leave one running, and "off" is an answer a guest acts on: the rule stays the safe
///   one until those cases are closed too (docs/host-agent.md, "Limits").
pub fn self_fence_stops_vms(uri: &str) -> bool {
    uri.starts_with("test://")
}

/// A hypervisor operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The hypervisor could not be reached.
    #[error("cannot connect to the hypervisor at {uri}; check that libvirt runs there and that the URI is right")]
    Connect {
        /// The URI.
        uri: String,
        /// libvirt's error.
        #[source]
        source: BoxError,
    },
    /// The connection is down and being re-established.
    #[error("the connection to {uri} is down and Tandem is reconnecting; retry {op} once it is back")]
    Disconnected {
        /// The URI.
        uri: String,
        /// The operation that could not run.
        op: &'static str,
    },
    /// No domain has this name or UUID.
    #[error("no domain '{domain}' on {uri}; check the name or UUID (`virsh -c {uri} list --all` lists them)")]
    NoSuchDomain {
        /// The URI.
        uri: String,
        /// The name or UUID asked for.
        domain: String,
    },
    /// The domain XML was rejected.
    #[error("the hypervisor at {uri} rejected the domain XML; fix the part the cause names")]
    InvalidXml {
        /// The URI.
        uri: String,
        /// libvirt's parse or validation error.
        #[source]
        source: BoxError,
    },
    /// The operation is not valid in the domain's current state (e.g. starting a running one).
    #[error("cannot {op} domain '{domain}' on {uri} in its current state; check its state first")]
    InvalidState {
        /// The operation.
        op: &'static str,
        /// The domain.
        domain: String,
        /// The URI.
        uri: String,
        /// libvirt's error.
        #[source]
        source: BoxError,
    },
    /// The hypervisor driver does not implement the operation.
    #[error(
        "{op} is not supported by the hypervisor driver at {uri}; use a driver that supports it (qemu:///system does)"
    )]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The URI.
        uri: String,
        /// libvirt's error.
        #[source]
        source: BoxError,
    },
    /// An operation on a domain failed for another reason.
    #[error("{op} of domain '{domain}' on {uri} failed")]
    Domain {
        /// The operation.
        op: &'static str,
        /// The domain.
        domain: String,
        /// The URI.
        uri: String,
        /// libvirt's error.
        #[source]
        source: BoxError,
    },
    /// A host-level operation (listing, capacity…) failed.
    #[error("{op} on {uri} failed")]
    Host {
        /// The operation.
        op: &'static str,
        /// The URI.
        uri: String,
        /// libvirt's error.
        #[source]
        source: BoxError,
    },
    /// The worker thread running a blocking call panicked.
    #[error("the worker thread running {op} on {uri} panicked; this is a bug in Tandem, please report it")]
    Worker {
        /// The operation.
        op: &'static str,
        /// The URI.
        uri: String,
    },
    /// libvirt's event loop could not be set up, so lifecycle events would be lost.
    #[error("cannot start libvirt's event loop (needed for lifecycle events); check the libvirt installation")]
    EventLoop {
        /// libvirt's error.
        #[source]
        source: BoxError,
    },
}

/// The boxed error type carried as a source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
