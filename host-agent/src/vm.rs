//! `kind = "vm"`: a whole virtual machine as the resource of a failover group.
//!
//! The cluster keeps one libvirt domain XML per VM (the same file on every host). A VM is
//! defined only where it runs: [`VmResource::start`] (re)defines it from that file and
//! boots it, [`VmResource::stop`] powers it off and undefines it, so nobody starts a stale
//! copy on another host by hand. The domain is always addressed by its UUID, which the
//! file must carry: names may be reused, the UUID identifies the VM on every host.
//!
//! [`VmResource::check`] reads the hypervisor's state and tells a crash (recover the VM)
//! from a power-off somebody outside the cluster asked for (the guest shut itself down, an
//! administrator ran `virsh destroy`): the hypervisor reports both as "shut off" with a
//! reason, and the resource remembers which stops it asked for itself. The decision is
//! the pure function [`health_of`].
//!
//! Every hypervisor call is bounded: a hung libvirt daemon makes an operation fail, never
//! hang the agent.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tandem_config::{ResourceKind, VmResource as VmConfig};
use tandem_node::resources::{
    BoxFuture, HandoverReason, Health, Resource, ResourceEnv, ResourceError, ResourceFactory, StartContext,
    StopContext, StopOutcome, check_name,
};
use tokio::sync::broadcast;
use tokio::time::Instant;
use uuid::Uuid;

use crate::fence::FenceMarks;
use crate::hypervisor::{
    CrashedReason, DomainEvent, DomainState, HandoverMark, Hypervisor, HypervisorError, MigrationMode, PausedReason,
    RunningReason, ShutoffReason,
};

/// What a VM's guest agent answered when asked to prepare for a planned stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestPrepared {
    /// No guest agent is linked for this VM: it is shut down without asking.
    NoGuest,
    /// The guest agent reported every group stopped or moved away; the text says what it did.
    Ready(String),
    /// It did not report ready (it reported blockers, its link dropped, or the time ran
    /// out); the text says which. The VM is shut down all the same.
    NotReady(String),
}

/// The guest agents linked to this host, as a VM resource asks them before a planned stop.
pub trait GuestShutdown: Send + Sync + std::fmt::Debug {
    /// Asks the guest agent of VM `uuid`, if one is linked, to stop or move its application
    /// groups (`PrepareShutdown`); resolves with its answer, within `limit`.
    fn prepare(&self, uuid: &str, limit: Duration) -> BoxFuture<'_, GuestPrepared>;
}

/// Bounds how many planned VM stops (guest preparation and ACPI shutdown) run at once on
/// this host; maintenance sets the bound for its duration. Forced stops never wait.
#[derive(Debug, Clone, Default)]
pub struct StopGate {
    current: Arc<std::sync::Mutex<Option<Arc<tokio::sync::Semaphore>>>>,
}

impl StopGate {
    /// At most `n` planned stops at once from now on (`None`: no bound). Stops already
    /// under way keep their slot of the previous bound.
    pub fn limit(&self, n: Option<usize>) {
        *self.current.lock().expect("not poisoned") = n.map(|n| Arc::new(tokio::sync::Semaphore::new(n.max(1))));
    }

    /// A slot, waiting for one if the bound is reached; `queued` is called first when it must wait.
    async fn enter(&self, queued: impl FnOnce(usize)) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let sem = self.current.lock().expect("not poisoned").clone()?;
        if let Ok(p) = sem.clone().try_acquire_owned() {
            return Some(p);
        }
        queued(sem.available_permits());
        sem.acquire_owned().await.ok()
    }
}

/// One step of a VM's stop, as it happens (maintenance progress follows these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmActivity {
    /// The VM's failover group.
    pub group: String,
    /// What happened.
    pub step: VmStep,
    /// In words.
    pub detail: String,
}

/// The steps of [`VmActivity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmStep {
    /// Waiting for a slot: the host's bound of planned stops at once is reached.
    Queued,
    /// The guest agent was asked to prepare.
    GuestPreparing,
    /// It reported ready.
    GuestReady,
    /// It did not report ready.
    GuestNotReady,
    /// No guest agent is linked.
    NoGuest,
    /// ACPI shutdown sent.
    ShuttingDown,
    /// Destroyed: forced stop, a state ACPI cannot reach, or the shutdown timeout passed.
    Destroyed,
    /// Off and undefined here.
    Stopped,
    /// Live migration to another host under way (the VM keeps running here meanwhile).
    Migrating,
    /// Live-migrated: its memory is on the other host, paused until that host holds the
    /// lease and resumes it; nothing of it runs here.
    Migrated,
    /// The live migration could not be done (the text says why): the VM is shut down
    /// instead and starts afresh on the other host.
    MigrationFailed,
}

/// Default bound of one live migration; past it the migration is aborted (the VM keeps
/// running here) and the VM is shut down instead.
pub const DEFAULT_MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

/// Live migration of this host's VMs on planned handovers: this host's name, where each
/// host receives migrations, and whether a standby release (maintenance) migrates too.
/// Operator moves and failbacks migrate whenever the target has a migration URI;
/// maintenance sets [`Migration::migrate_on_standby`] for its `migrate` policy.
#[derive(Debug, Clone)]
pub struct Migration {
    me: String,
    uris: Arc<std::collections::BTreeMap<String, String>>,
    on_standby: Arc<AtomicBool>,
    timeout: Duration,
}

impl Migration {
    /// Migrations from host `me` to the hosts of `uris` (name → the URI its daemon is
    /// reached at by the source's daemon; see `crate::cluster::migration_uri_of`).
    pub fn new(me: &str, uris: std::collections::BTreeMap<String, String>) -> Migration {
        Migration {
            me: me.to_string(),
            uris: Arc::new(uris),
            on_standby: Arc::new(AtomicBool::new(false)),
            timeout: DEFAULT_MIGRATION_TIMEOUT,
        }
    }

    /// Whether VMs leaving this host because it entered standby (maintenance) migrate
    /// (`true`: the `migrate` policy) or shut down and start afresh elsewhere.
    pub fn migrate_on_standby(&self, yes: bool) {
        self.on_standby.store(yes, Ordering::SeqCst);
    }

    /// Bounds each migration (default [`DEFAULT_MIGRATION_TIMEOUT`]).
    pub fn with_timeout(mut self, limit: Duration) -> Migration {
        self.timeout = limit;
        self
    }

    /// This host's name.
    pub fn host(&self) -> &str {
        &self.me
    }
}

/// Default limit of one hypervisor call that the configuration has no timeout for
/// (reading a state, destroy, undefine).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// While waiting for a state change, the state is re-read this often even without an
/// event: events are lost while the connection is down, and a slow subscriber may lag.
const STATE_REREAD: Duration = Duration::from_millis(500);

/// A VM as the cluster defines it: what the host agent needs for placement and status,
/// and the domain XML it defines on the host that runs the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDefinition {
    /// The domain's name (`<name>`), unique on one host.
    pub name: String,
    /// The domain's UUID (`<uuid>`): identifies the VM on every host.
    pub uuid: Uuid,
    /// Maximum memory (`<memory>`), in MiB, rounded up.
    pub memory_mib: u64,
    /// Virtual CPUs (`<vcpu>`; 1 when absent).
    pub vcpus: u32,
    /// What its network interfaces attach to on the host, in XML order.
    pub attachments: Vec<Attachment>,
    /// The domain XML itself, as read.
    pub xml: String,
}

/// What one `<interface>` of a domain attaches to on the host (the kinds a `[[network]]`
/// can watch; others, like `user` or `direct`, are not listed).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Attachment {
    /// `<interface type='bridge'><source bridge='NAME'/>`.
    Bridge(String),
    /// `<interface type='network'><source network='NAME'/>`.
    Network(String),
}

/// A VM definition is unusable.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The file cannot be read.
    #[error("cannot read the domain XML file {path}; check that it exists on this host and that the agent may read it")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The XML is not well-formed.
    #[error(
        "{origin}:{line}:{column}: the domain XML is not well-formed; fix it there \
         (`virt-xml-validate {origin} domain` checks the whole file)"
    )]
    Syntax {
        /// The file (or where the text came from).
        origin: String,
        /// Line of the error, from 1.
        line: u32,
        /// Column of the error, from 1.
        column: u32,
        /// The parser's error.
        #[source]
        source: roxmltree::Error,
    },
    /// The root element is not `<domain>`.
    #[error(
        "{origin}:{line}:{column}: the root element is <{found}>, not <domain>; the file must hold one libvirt \
         domain definition (`virsh dumpxml NAME` writes one)"
    )]
    NotDomain {
        /// The file.
        origin: String,
        /// Line of the root element.
        line: u32,
        /// Column of the root element.
        column: u32,
        /// The root element's name.
        found: String,
    },
    /// `<name>` is missing or empty.
    #[error("{origin}: the domain has no <name>; add one (it must be unique on each host)")]
    MissingName {
        /// The file.
        origin: String,
    },
    /// `<uuid>` is missing.
    #[error(
        "{origin}: the domain '{name}' has no <uuid>; add a fixed one (e.g. from `uuidgen`): the UUID identifies \
         the VM on every host, so the file must carry it instead of letting each hypervisor invent one"
    )]
    MissingUuid {
        /// The file.
        origin: String,
        /// The domain's name.
        name: String,
    },
    /// `<uuid>` does not hold a UUID.
    #[error("{origin}:{line}:{column}: <uuid> '{value}' is not a UUID; write one like `uuidgen` prints")]
    BadUuid {
        /// The file.
        origin: String,
        /// Line of `<uuid>`.
        line: u32,
        /// Column of `<uuid>`.
        column: u32,
        /// The text found.
        value: String,
        /// The parser's error.
        #[source]
        source: uuid::Error,
    },
    /// `<memory>` is missing.
    #[error("{origin}: the domain '{name}' has no <memory>; add one, e.g. <memory unit='MiB'>1024</memory>")]
    MissingMemory {
        /// The file.
        origin: String,
        /// The domain's name.
        name: String,
    },
    /// `<memory>` holds no usable size.
    #[error("{origin}:{line}:{column}: <memory> {problem}")]
    BadMemory {
        /// The file.
        origin: String,
        /// Line of `<memory>`.
        line: u32,
        /// Column of `<memory>`.
        column: u32,
        /// What is wrong and what to do.
        problem: String,
    },
    /// `<vcpu>` holds no positive count.
    #[error(
        "{origin}:{line}:{column}: <vcpu> '{value}' is not a positive number of virtual CPUs; write e.g. <vcpu>2</vcpu>"
    )]
    BadVcpus {
        /// The file.
        origin: String,
        /// Line of `<vcpu>`.
        line: u32,
        /// Column of `<vcpu>`.
        column: u32,
        /// The text found.
        value: String,
    },
}

impl VmDefinition {
    /// Reads and parses the domain XML file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<VmDefinition, VmError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let xml = std::fs::read_to_string(path).map_err(|source| VmError::Read { path: origin.clone(), source })?;
        VmDefinition::parse(&xml, &origin)
    }

    /// Parses a domain XML; `origin` (usually the file name) prefixes every error.
    pub fn parse(xml: &str, origin: &str) -> Result<VmDefinition, VmError> {
        let origin_s = || origin.to_string();
        let doc = roxmltree::Document::parse(xml).map_err(|source| {
            let pos = source.pos();
            VmError::Syntax { origin: origin_s(), line: pos.row, column: pos.col, source }
        })?;
        let at = |node: roxmltree::Node<'_, '_>| {
            let pos = doc.text_pos_at(node.range().start);
            (pos.row, pos.col)
        };
        let root = doc.root_element();
        if root.tag_name().name() != "domain" || root.tag_name().namespace().is_some() {
            let (line, column) = at(root);
            return Err(VmError::NotDomain { origin: origin_s(), line, column, found: root.tag_name().name().into() });
        }
        // libvirt's own elements carry no namespace; `<test:runstate>` and metadata do.
        let child = |tag: &str| {
            root.children().find(|n| n.is_element() && n.tag_name().namespace().is_none() && n.tag_name().name() == tag)
        };
        let text = |node: roxmltree::Node<'_, '_>| node.text().unwrap_or_default().trim().to_string();

        let name = child("name").map(text).unwrap_or_default();
        if name.is_empty() {
            return Err(VmError::MissingName { origin: origin_s() });
        }

        let uuid_node = child("uuid").ok_or_else(|| VmError::MissingUuid { origin: origin_s(), name: name.clone() })?;
        let value = text(uuid_node);
        let uuid = Uuid::parse_str(&value).map_err(|source| {
            let (line, column) = at(uuid_node);
            VmError::BadUuid { origin: origin_s(), line, column, value: value.clone(), source }
        })?;

        let memory =
            child("memory").ok_or_else(|| VmError::MissingMemory { origin: origin_s(), name: name.clone() })?;
        let bad_memory = |problem: String| {
            let (line, column) = at(memory);
            VmError::BadMemory { origin: origin_s(), line, column, problem }
        };
        let amount = text(memory);
        let amount: u64 = amount.parse().map_err(|_| {
            bad_memory(format!("'{amount}' is not a whole number; write e.g. <memory unit='MiB'>1024</memory>"))
        })?;
        let unit = memory.attribute("unit").unwrap_or_default().trim();
        let scale = unit_scale(unit).ok_or_else(|| {
            bad_memory(format!(
                "has unknown unit '{unit}'; use one libvirt knows: b, KiB (the default), MiB, GiB, TiB, or KB, MB, GB, TB"
            ))
        })?;
        let bytes = amount
            .checked_mul(scale)
            .ok_or_else(|| bad_memory(format!("{amount} {unit} is larger than any host; check the amount and unit")))?;
        if bytes == 0 {
            return Err(bad_memory("is 0; a VM needs memory".to_string()));
        }
        let memory_mib = bytes.div_ceil(1 << 20);

        let vcpus = match child("vcpu") {
            None => 1,
            Some(node) => {
                let value = text(node);
                match value.parse::<u32>() {
                    Ok(n) if n > 0 => n,
                    _ => {
                        let (line, column) = at(node);
                        return Err(VmError::BadVcpus { origin: origin_s(), line, column, value });
                    }
                }
            }
        };

        let mut attachments = Vec::new();
        let devices = child("devices").into_iter().flat_map(|d| d.children());
        for nic in devices.filter(|n| n.is_element() && n.tag_name().namespace().is_none()) {
            if nic.tag_name().name() != "interface" {
                continue;
            }
            let source = nic.children().find(|n| n.is_element() && n.tag_name().name() == "source");
            let attached = match (nic.attribute("type"), source) {
                (Some("bridge"), Some(src)) => src.attribute("bridge").map(|b| Attachment::Bridge(b.to_string())),
                (Some("network"), Some(src)) => src.attribute("network").map(|n| Attachment::Network(n.to_string())),
                _ => None,
            };
            attachments.extend(attached);
        }

        Ok(VmDefinition { name, uuid, memory_mib, vcpus, attachments, xml: xml.to_string() })
    }
}

/// Bytes per unit of a libvirt scaled integer (`virScaleInteger`): no unit means KiB here
/// (`<memory>`'s default); the letters are case-insensitive; `KB` is 1000, `K`/`KiB` 1024.
fn unit_scale(unit: &str) -> Option<u64> {
    if unit.is_empty() {
        return Some(1024);
    }
    let lower = unit.to_ascii_lowercase();
    if matches!(lower.as_str(), "b" | "byte" | "bytes") {
        return Some(1);
    }
    let mut chars = lower.chars();
    let prefix = chars.next()?;
    let base: u64 = match chars.as_str() {
        "" | "ib" => 1024,
        "b" => 1000,
        _ => return None,
    };
    let power = match prefix {
        'k' => 1,
        'm' => 2,
        'g' => 3,
        't' => 4,
        'p' => 5,
        'e' => 6,
        _ => return None,
    };
    Some(base.pow(power))
}

/// What a VM's state means for the cluster.
///
/// * `state`: the domain's state on this host, `None` when it is not defined here.
/// * `expected_off`: this agent asked the VM to stop (or never started it here since the
///   agent began), so a power-off is ours and not somebody else's.
///
/// Active states do not depend on `expected_off`: a crashed or error-paused domain holds
/// the VM's disks and must be cleaned up whoever stopped it.
pub fn health_of(state: Option<&DomainState>, expected_off: bool) -> Health {
    let failed = |why: &str| Health::Failed(why.to_string());
    let outside = |who: &str| Health::StoppedOutside(who.to_string());
    let Some(state) = state else {
        return if expected_off {
            Health::Stopped
        } else {
            // We started it and it is gone: someone migrated or undefined it by hand. It may
            // run elsewhere, so it must not be "recovered" (that could run it twice).
            outside("no longer defined on this hypervisor: migrated away or undefined outside the cluster")
        };
    };
    match state {
        // A guest whose crash handler (kdump) runs reports `Running(Crashed)` even after it
        // rebooted by itself: treating it as failed would restart it in a loop.
        DomainState::Running(RunningReason::PostcopyFailed) => {
            failed("post-copy migration failed; the guest's memory may be incomplete")
        }
        DomainState::Running(_) | DomainState::Blocked | DomainState::ShuttingDown => Health::Running,
        // Suspended by the guest itself (S3/S4): its own decision, it wakes up again.
        DomainState::PmSuspended => Health::Running,
        DomainState::Paused(reason) => match reason {
            // An administrator's pause, a migration, or a short management operation.
            PausedReason::User
            | PausedReason::Migration
            | PausedReason::Postcopy
            | PausedReason::Save
            | PausedReason::Dump
            | PausedReason::Snapshot
            | PausedReason::FromSnapshot
            | PausedReason::StartingUp
            | PausedReason::ShuttingDown => Health::Running,
            PausedReason::IoError => failed("paused by the hypervisor after a disk I/O error"),
            PausedReason::Watchdog => failed("paused by its watchdog: the guest stopped responding"),
            PausedReason::Crashed => failed("paused after the guest crashed"),
            PausedReason::ApiError => failed("paused after a failed hypervisor API call"),
            PausedReason::PostcopyFailed => failed("paused after a failed post-copy migration"),
            PausedReason::Unknown => failed("paused for a reason the hypervisor does not give"),
            PausedReason::Other(n) => Health::Failed(format!("paused for a reason this agent does not know ({n})")),
        },
        DomainState::Crashed(CrashedReason::Panicked) => failed("the guest kernel panicked"),
        DomainState::Crashed(_) => failed("the guest crashed"),
        DomainState::NoState => failed("the hypervisor reports no state for the domain"),
        DomainState::Shutoff(_) if expected_off => Health::Stopped,
        DomainState::Shutoff(reason) => match reason {
            ShutoffReason::Shutdown => outside("powered off from inside the guest"),
            ShutoffReason::Destroyed => outside("forced off through the hypervisor"),
            ShutoffReason::Migrated => outside("migrated to another host outside the cluster"),
            ShutoffReason::Saved => outside("saved to a file through the hypervisor"),
            ShutoffReason::FromSnapshot => outside("reverted to a snapshot of a stopped domain through the hypervisor"),
            ShutoffReason::Crashed => failed("the guest crashed or its emulator process died"),
            ShutoffReason::Failed => failed("the domain failed to start"),
            // Not an administrator's decision about this VM (e.g. the host is going down):
            // the VM should be recovered, on another host if need be.
            ShutoffReason::Daemon => failed("stopped by the hypervisor daemon itself (is the host shutting down?)"),
            ShutoffReason::Unknown => failed("off, and the hypervisor does not say why"),
            ShutoffReason::Other(n) => Health::Failed(format!("off for a reason this agent does not know ({n})")),
        },
    }
}

/// [`health_of`] for a VM that a guest's fence request may have powered off: `fenced` is
/// the fence mark ([`crate::fence::FenceMarks`]). A fenced VM shows as "shut off,
/// destroyed", like an administrator's `virsh destroy`; with the mark it is a failure the
/// cluster recovers (the guest cluster found the VM stalled), not a stop outside the cluster.
pub fn health_with_fence(state: Option<&DomainState>, expected_off: bool, fenced: Option<&str>) -> Health {
    match (state, fenced) {
        (Some(DomainState::Shutoff(ShutoffReason::Destroyed)), Some(why)) if !expected_off => {
            Health::Failed(why.to_string())
        }
        _ => health_of(state, expected_off),
    }
}

/// Whether an ACPI power-button press can reach the guest in this state (a paused or
/// crashed guest never reacts to it).
fn acpi_reaches(state: &DomainState) -> bool {
    matches!(state, DomainState::Running(_) | DomainState::Blocked | DomainState::ShuttingDown)
}

/// Why an operation on the domain failed, before it becomes a [`ResourceError`].
#[derive(Debug)]
enum Fault {
    /// The hypervisor refused or failed a step.
    Hypervisor { step: &'static str, error: HypervisorError },
    /// A step did not finish in time.
    Timeout { step: &'static str, limit: Duration },
    /// The domain went somewhere other than the goal.
    Ended { why: String },
}

impl Fault {
    fn is_state(&self) -> bool {
        matches!(self, Fault::Hypervisor { error: HypervisorError::InvalidState { .. }, .. })
    }

    fn is_missing(&self) -> bool {
        matches!(self, Fault::Hypervisor { error: HypervisorError::NoSuchDomain { .. }, .. })
    }
}

/// A VM run by this host: the resource of a `kind = "vm"` failover group.
#[derive(Debug)]
pub struct VmResource {
    /// `group/resource`, for errors.
    id: String,
    def: VmDefinition,
    /// The UUID as the hypervisor is addressed with it.
    key: String,
    hv: Arc<dyn Hypervisor>,
    start_timeout: Duration,
    shutdown_timeout: Duration,
    call_timeout: Duration,
    /// This agent asked the VM to stop, or has not started it since the agent began.
    expected_off: AtomicBool,
    group: String,
    prepare_timeout: Duration,
    guests: Option<Arc<dyn GuestShutdown>>,
    activity: Option<broadcast::Sender<VmActivity>>,
    gate: StopGate,
    /// VMs powered off by guests' fence requests (see [`health_with_fence`]).
    fence_marks: Option<FenceMarks>,
    /// The guest-heartbeat policy: the guest links and `guest_heartbeat_timeout`.
    guest_watch: Option<(Arc<crate::link::LinkRegistry>, Duration)>,
    /// When this agent last started (or adopted) the VM: only heartbeats since count.
    running_since: std::sync::Mutex<Option<std::time::Instant>>,
    /// Live migration on planned handovers (none: always shut down).
    migration: Option<Migration>,
    /// The registration of the VM's QEMU process with the fencing guard (local QEMU
    /// hypervisors only; the test driver's domains live inside the agent).
    qemu: Option<Arc<crate::qemu_fence::QemuGuard>>,
    /// The registration [`Resource::adopted`] runs off the engine's task (a `/proc` scan and a
    /// socket connect); a start or stop waits for it first, so it never lands after them.
    adopting: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Whether this host's lease is valid now: checked before a start lets the guest run.
    lease: tandem_node::resources::LeaseCheck,
}

impl VmResource {
    /// A VM resource `name` of `group` for `definition` on `hypervisor`.
    pub fn new(
        group: &str,
        name: &str,
        definition: VmDefinition,
        config: &VmConfig,
        hypervisor: Arc<dyn Hypervisor>,
    ) -> VmResource {
        VmResource {
            id: format!("{group}/{name}"),
            key: definition.uuid.to_string(),
            def: definition,
            hv: hypervisor,
            start_timeout: config.start_timeout,
            shutdown_timeout: config.shutdown_timeout,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            expected_off: AtomicBool::new(true),
            group: group.to_string(),
            prepare_timeout: config.prepare_timeout,
            guests: None,
            activity: None,
            gate: StopGate::default(),
            fence_marks: None,
            guest_watch: None,
            running_since: std::sync::Mutex::new(None),
            migration: None,
            qemu: None,
            adopting: std::sync::Mutex::new(None),
            lease: tandem_node::resources::LeaseCheck::default(),
        }
    }

    /// Checks `lease` right before letting the guest run (the start's steps may be far apart
    /// if this process was paused between them).
    pub fn with_lease(mut self, lease: tandem_node::resources::LeaseCheck) -> VmResource {
        self.lease = lease;
        self
    }

    /// Refuses to let the guest run once this host's lease has ended.
    fn lease_still_valid(&self, step: &str) -> Result<(), Fault> {
        if self.lease.valid_now() {
            return Ok(());
        }
        Err(Fault::Ended { why: format!("was not {step}: this host's lease is no longer valid") })
    }

    /// Registers the VM's QEMU process with the fencing guard whenever it runs here (see
    /// [`crate::qemu_fence`]); `None`: nothing to register (no local QEMU).
    pub fn with_qemu_guard(mut self, qemu: Option<crate::qemu_fence::QemuGuard>) -> VmResource {
        self.qemu = qemu.map(Arc::new);
        self
    }

    /// Registers the domain's QEMU process with the fencing guard (no-op without a local
    /// QEMU, or when the same process is registered already).
    /// Blocking work (a `/proc` scan, a socket connect, the guard's answer) runs on tokio's
    /// blocking pool, not on the runtime's workers.
    async fn guard_qemu(&self) -> Result<(), Fault> {
        let Some(qemu) = self.qemu.clone() else { return Ok(()) };
        let (key, id, name) = (self.key.clone(), self.id.clone(), self.def.name.clone());
        tokio::task::spawn_blocking(move || register_qemu(&qemu, &key, &id, &name))
            .await
            .unwrap_or_else(|e| Err(format!("its QEMU registration did not finish ({e}), so it may not run")))
            .map_err(|why| Fault::Ended { why })
    }

    /// Waits for the registration an adoption started in the background (see
    /// [`Resource::adopted`]).
    async fn settle_adoption(&self) {
        let pending = self.adopting.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = pending {
            let _ = task.await;
        }
    }

    /// While the VM runs here, its QEMU process must be the one registered: registers it
    /// again if a registration failed earlier or the process changed.
    async fn keep_qemu_guarded(&self) {
        let Some(qemu) = &self.qemu else { return };
        if self.expected_off.load(Ordering::SeqCst) || qemu.holds_live_process() {
            return;
        }
        if let Err(fault) = self.guard_qemu().await {
            tracing::error!(resource = %self.id, domain = %self.def.name, "{}", self.describe(&fault));
        }
    }

    /// Stops guarding the QEMU process: the VM is off here or left this host.
    fn unguard_qemu(&self) {
        if let Some(qemu) = &self.qemu
            && let Some(q) = qemu.registered()
        {
            qemu.unregister();
            tracing::info!(resource = %self.id, domain = %self.def.name, pid = q.pid,
                "QEMU unregistered from the fencing guard");
        }
    }

    /// Live-migrates the VM on planned handovers where `migration` allows it.
    pub fn with_migration(mut self, migration: Option<Migration>) -> VmResource {
        self.migration = migration;
        self
    }

    /// Asks the VM's guest agent through `guests` before every planned stop, and reports
    /// each step of a stop on `activity`.
    pub fn with_guests(
        mut self,
        guests: Option<Arc<dyn GuestShutdown>>,
        activity: Option<broadcast::Sender<VmActivity>>,
    ) -> VmResource {
        self.guests = guests;
        self.activity = activity;
        self
    }

    /// Planned stops of this VM take a slot of `gate` first.
    pub fn with_stop_gate(mut self, gate: StopGate) -> VmResource {
        self.gate = gate;
        self
    }

    fn report(&self, step: VmStep, detail: impl Into<String>) {
        if let Some(tx) = &self.activity {
            // No subscriber (no maintenance under way) is fine.
            let _ = tx.send(VmActivity { group: self.group.clone(), step, detail: detail.into() });
        }
    }

    /// A planned stop of a running VM asks its guest agent first, so that the guest's
    /// application groups move to their peers before the VM goes down; whatever it answers,
    /// the VM is shut down afterwards.
    async fn prepare_guest(&self) {
        let Some(guests) = &self.guests else { return };
        // A guest reset for silence is not asked: it would only make the reset wait.
        if let Some(silent) = self.guest_silent_for() {
            self.report(
                VmStep::GuestNotReady,
                format!("not asked: its heartbeats stopped {} ago", human_duration(silent)),
            );
            return;
        }
        self.report(VmStep::GuestPreparing, "asking the guest agent to stop or move its groups");
        let limit = self.prepare_timeout;
        let answer = match tokio::time::timeout(limit + Duration::from_secs(1), guests.prepare(&self.key, limit)).await
        {
            Ok(answer) => answer,
            Err(_) => GuestPrepared::NotReady(format!("no answer within {}", human_duration(limit))),
        };
        match answer {
            GuestPrepared::NoGuest => {
                self.report(VmStep::NoGuest, "no guest agent linked: shutting down without asking")
            }
            GuestPrepared::Ready(what) => {
                tracing::info!(resource = %self.id, domain = %self.def.name, "guest agent ready for shutdown: {what}");
                self.report(VmStep::GuestReady, what);
            }
            GuestPrepared::NotReady(why) => {
                tracing::warn!(resource = %self.id, domain = %self.def.name,
                    "guest agent not ready for shutdown ({why}); shutting the VM down all the same");
                self.report(VmStep::GuestNotReady, why);
            }
        }
    }

    /// Reads the fence marks of this host's fencer: a VM a guest fenced is reported failed
    /// (and recovered), not stopped outside the cluster.
    pub fn with_fence_marks(mut self, marks: FenceMarks) -> VmResource {
        self.fence_marks = Some(marks);
        self
    }

    /// Resets the VM (its check reports a failure) when its linked guest's heartbeats stop
    /// for `timeout` while it runs (`guest_heartbeat_timeout`; see
    /// [`crate::link::heartbeat_expired`]).
    pub fn with_guest_heartbeat(mut self, links: Arc<crate::link::LinkRegistry>, timeout: Duration) -> VmResource {
        self.guest_watch = Some((links, timeout));
        self
    }

    /// How long the linked guest has been silent past its `guest_heartbeat_timeout`, if so.
    fn guest_silent_for(&self) -> Option<Duration> {
        let (links, timeout) = self.guest_watch.as_ref()?;
        let since = (*self.running_since.lock().expect("not poisoned"))?;
        let key = self.def.uuid.to_string();
        crate::link::heartbeat_expired(*timeout, since, links.last_heartbeat(&key), std::time::Instant::now())
    }

    /// The guest-heartbeat verdict: why the VM must be reset, if it must.
    fn guest_silence(&self) -> Option<String> {
        let silent = self.guest_silent_for()?;
        let timeout = self.guest_watch.as_ref().map(|(_, t)| *t)?;
        let text = format!(
            "the guest agent's heartbeats stopped {} ago (guest_heartbeat_timeout {}): resetting the VM",
            human_duration(silent),
            human_duration(timeout)
        );
        tracing::warn!(resource = %self.id, domain = %self.def.name, "{text}");
        Some(text)
    }

    /// Loads the domain XML `config.domain` and builds the resource; a definition that
    /// cannot be used is a [`ResourceError::Config`].
    pub fn build(
        group: &str,
        name: &str,
        config: &VmConfig,
        hypervisor: Arc<dyn Hypervisor>,
    ) -> Result<VmResource, ResourceError> {
        let definition = VmDefinition::load(&config.domain)
            .map_err(|e| ResourceError::config(&format!("{group}/{name}"), crate::error_chain(&e)))?;
        Ok(VmResource::new(group, name, definition, config, hypervisor))
    }

    /// Sets the limit of each hypervisor call the configuration has no timeout for
    /// (default [`DEFAULT_CALL_TIMEOUT`]).
    pub fn with_call_timeout(mut self, limit: Duration) -> VmResource {
        self.call_timeout = limit;
        self
    }

    /// The VM's definition (name, UUID, memory, vCPUs, XML).
    pub fn definition(&self) -> &VmDefinition {
        &self.def
    }

    /// Text for a fault, naming the domain and the hypervisor.
    fn describe(&self, fault: &Fault) -> String {
        let (name, uuid, uri) = (&self.def.name, &self.def.uuid, self.hv.uri());
        match fault {
            Fault::Hypervisor { step, error } => {
                format!("{step} of domain '{name}' ({uuid}) on {uri} failed: {}", crate::error_chain(error))
            }
            Fault::Timeout { step, limit } => {
                format!("{step} of domain '{name}' ({uuid}) on {uri} did not finish within {}", human_duration(*limit))
            }
            Fault::Ended { why } => format!("domain '{name}' ({uuid}) on {uri} {why}"),
        }
    }

    /// Runs one hypervisor call, failing at `until`.
    async fn bounded<T>(
        &self,
        step: &'static str,
        until: Instant,
        limit: Duration,
        call: crate::hypervisor::BoxFuture<'_, Result<T, HypervisorError>>,
    ) -> Result<T, Fault> {
        match tokio::time::timeout_at(until, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(Fault::Hypervisor { step, error }),
            Err(_) => Err(Fault::Timeout { step, limit }),
        }
    }

    /// One call bounded by the call timeout.
    async fn call<T>(
        &self,
        step: &'static str,
        call: crate::hypervisor::BoxFuture<'_, Result<T, HypervisorError>>,
    ) -> Result<T, Fault> {
        self.bounded(step, Instant::now() + self.call_timeout, self.call_timeout, call).await
    }

    /// The domain's state here; `None` when it is not defined.
    async fn read_state(&self, until: Instant, limit: Duration) -> Result<Option<DomainState>, Fault> {
        match self.bounded("reading the state", until, limit, self.hv.state(&self.key)).await {
            Ok(state) => Ok(Some(state)),
            Err(fault) if fault.is_missing() => Ok(None),
            Err(fault) => Err(fault),
        }
    }

    /// Waits until `goal` says the state is reached (`Ok(true)`) or never will be (`Err`),
    /// re-reading the state on each of the domain's events and every [`STATE_REREAD`].
    async fn wait_for(
        &self,
        events: &mut broadcast::Receiver<DomainEvent>,
        step: &'static str,
        until: Instant,
        limit: Duration,
        goal: impl Fn(Option<&DomainState>) -> Result<bool, String>,
    ) -> Result<Option<DomainState>, Fault> {
        loop {
            let state = match self.read_state(until, limit).await {
                Ok(state) => state,
                // The deadline hit during the read: that is this step's timeout.
                Err(Fault::Timeout { .. }) => return Err(Fault::Timeout { step, limit }),
                Err(fault) => return Err(fault),
            };
            match goal(state.as_ref()) {
                Ok(true) => return Ok(state),
                Ok(false) => {}
                Err(why) => return Err(Fault::Ended { why }),
            }
            let now = Instant::now();
            if now >= until {
                return Err(Fault::Timeout { step, limit });
            }
            tokio::select! {
                () = self.next_event(events) => {}
                () = tokio::time::sleep_until(until.min(now + STATE_REREAD)) => {}
            }
        }
    }

    /// Returns on the next event about this domain, or when events were missed.
    async fn next_event(&self, events: &mut broadcast::Receiver<DomainEvent>) {
        loop {
            match events.recv().await {
                Ok(event) if event.uuid == self.def.uuid => return,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                // No more events: the periodic re-read is all that is left.
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        }
    }

    /// The handover mark of the domain here if another host wrote it: the domain is a copy
    /// that host live-migrated here and that was never resumed (resuming removes the mark).
    async fn foreign_mark(&self, until: Instant, limit: Duration) -> Result<Option<HandoverMark>, Fault> {
        let mark = match self.bounded("reading the handover mark", until, limit, self.hv.handover_mark(&self.key)).await
        {
            Ok(mark) => mark,
            Err(fault) if fault.is_missing() => None,
            Err(fault) => return Err(fault),
        };
        let me = self.migration.as_ref().map(Migration::host);
        Ok(mark.filter(|m| Some(m.from.as_str()) != me))
    }

    /// Resumes the paused copy a handover migrated here (`migrated_in`), under `token`.
    /// `Ok(false)` when there is none to resume (nothing here, not paused, or not marked as
    /// an earlier holder's migration): the caller starts the VM afresh.
    async fn resume_incoming(&self, token: u64) -> Result<bool, Fault> {
        let limit = self.start_timeout;
        let until = Instant::now() + limit;
        let mut events = self.hv.subscribe();
        let state = match self.read_state(until, limit).await? {
            Some(state @ DomainState::Paused(_)) => state,
            other => {
                tracing::warn!(resource = %self.id, domain = %self.def.name, state = ?other,
                    "no paused copy was migrated here to resume; starting the VM afresh");
                return Ok(false);
            }
        };
        match self.foreign_mark(until, limit).await? {
            // The engine resumes only as the very next holder; the mark must be that holder's.
            Some(mark) if mark.token.saturating_add(1) == token => {
                tracing::info!(resource = %self.id, domain = %self.def.name, from = %mark.from, from_token = mark.token,
                    token, ?state, "resuming the VM migrated here");
            }
            other => {
                tracing::warn!(resource = %self.id, domain = %self.def.name, mark = ?other, token,
                    "the paused domain here is not a copy an earlier holder migrated: starting the VM afresh");
                return Ok(false);
            }
        }
        // Guarded before its vCPUs run here.
        self.guard_qemu().await?;
        self.lease_still_valid("resumed")?;
        self.bounded("resume", until, limit, self.hv.resume(&self.key)).await?;
        self.wait_for(&mut events, "resume", until, limit, |state| match state {
            Some(s) if s.is_running() => Ok(true),
            Some(DomainState::Paused(_)) => Ok(false),
            Some(other) => Err(format!("went {other:?} while resuming")),
            None => Err("disappeared while resuming".to_string()),
        })
        .await?;
        // The mark has served: a later pause here is an operator's, not an incoming copy.
        if let Err(fault) = self.call("removing the handover mark", self.hv.set_handover_mark(&self.key, None)).await {
            tracing::warn!(resource = %self.id, domain = %self.def.name, "{}", self.describe(&fault));
        }
        Ok(true)
    }

    async fn start_domain(&self) -> Result<(), Fault> {
        let limit = self.start_timeout;
        let until = Instant::now() + limit;
        // Subscribed before acting, so that no event of this start is missed.
        let mut events = self.hv.subscribe();
        let mut state = self.read_state(until, limit).await?;
        if matches!(state, Some(DomainState::Paused(_))) && self.foreign_mark(until, limit).await?.is_some() {
            // Another host migrated it here, but this start is not the handover's (another
            // node held the lease since, or the migration did not complete for the sender):
            // its memory may be stale. It never ran here; throw it away.
            tracing::warn!(resource = %self.id, domain = %self.def.name,
                "destroying a paused copy another host migrated here that is not current; starting the VM afresh");
            match self.bounded("destroy", until, limit, self.hv.destroy(&self.key)).await {
                Err(fault) if !fault.is_state() && !fault.is_missing() => return Err(fault),
                _ => {}
            }
            state = None;
        }
        match state {
            Some(DomainState::Paused(reason @ (PausedReason::User | PausedReason::StartingUp))) => {
                // Not a copy another host migrated here (those were thrown away above): a start
                // of ours that stopped short of resuming it (its registration or resume failed,
                // and so did the cleanup), or an operator's pause. Counted as running, it would
                // stay paused for good while reported started: this start lets it run, guarded
                // first, as a fresh start would.
                tracing::warn!(resource = %self.id, domain = %self.def.name, ?reason,
                    "the VM is paused here although no run of it is ours: resuming it");
                self.guard_qemu().await?;
                self.lease_still_valid("resumed")?;
                match self.bounded("resume", until, limit, self.hv.resume(&self.key)).await {
                    // Running already: the wait below sees it.
                    Err(fault) if !fault.is_state() => return Err(fault),
                    _ => {}
                }
                return self
                    .wait_for(&mut events, "resume", until, limit, |state| match state {
                        Some(s) if s.is_running() => Ok(true),
                        Some(DomainState::Paused(_)) => Ok(false),
                        Some(other) => Err(format!("went {other:?} while resuming")),
                        None => Err("disappeared while resuming".to_string()),
                    })
                    .await
                    .map(|_| ());
            }
            Some(state) if health_of(Some(&state), false) == Health::Running => {
                tracing::info!(resource = %self.id, domain = %self.def.name, ?state, "the VM already runs here");
                return Ok(());
            }
            Some(state) if !state.is_off() => {
                // Crashed or paused on an error: it holds the VM's disks; start afresh.
                tracing::warn!(resource = %self.id, domain = %self.def.name, ?state, "destroying the unhealthy domain before starting it");
                match self.bounded("destroy", until, limit, self.hv.destroy(&self.key)).await {
                    Err(fault) if !fault.is_state() => return Err(fault),
                    _ => {}
                }
            }
            _ => {}
        }
        // Redefined on every start: every host runs the cluster's current definition.
        self.bounded("define", until, limit, self.hv.define(&self.def.xml)).await?;
        // With a local QEMU the guest starts paused and runs only once its QEMU process is
        // registered with the fencing guard: no guest code runs unguarded.
        let paused_first = self.qemu.is_some();
        if !paused_first {
            self.lease_still_valid("started")?;
        }
        let call = if paused_first { self.hv.start_paused(&self.key) } else { self.hv.start(&self.key) };
        match self.bounded("start", until, limit, call).await {
            // Already running (someone was quicker): the wait below sees it.
            Err(fault) if !fault.is_state() => return Err(fault),
            _ => {}
        }
        if paused_first {
            self.wait_for(&mut events, "start", until, limit, |state| match state {
                Some(s) if s.is_running() => Ok(true),
                Some(DomainState::Paused(_)) => Ok(true),
                Some(DomainState::Shutoff(reason)) => Err(format!("stopped while starting ({reason:?})")),
                Some(DomainState::Crashed(_)) => Err("crashed while starting".to_string()),
                None => Err("disappeared while starting".to_string()),
                Some(_) => Ok(false),
            })
            .await?;
            self.guard_qemu().await?;
            self.lease_still_valid("resumed")?;
            match self.bounded("resume", until, limit, self.hv.resume(&self.key)).await {
                // Running already: the wait below sees it.
                Err(fault) if !fault.is_state() => return Err(fault),
                _ => {}
            }
        }
        self.wait_for(&mut events, "start", until, limit, |state| match state {
            Some(s) if s.is_running() => Ok(true),
            Some(DomainState::Shutoff(reason)) => Err(format!("stopped while starting ({reason:?})")),
            Some(DomainState::Crashed(_)) => Err("crashed while starting".to_string()),
            None => Err("disappeared while starting".to_string()),
            Some(_) => Ok(false),
        })
        .await?;
        Ok(())
    }

    /// Destroys the domain if it is active and waits until it is off.
    async fn destroy_domain(&self, events: &mut broadcast::Receiver<DomainEvent>) -> Result<(), Fault> {
        match self.call("destroy", self.hv.destroy(&self.key)).await {
            Err(fault) if fault.is_missing() => return Ok(()),
            // Off already.
            Err(fault) if fault.is_state() => {}
            Err(fault) => return Err(fault),
            Ok(()) => {}
        }
        let until = Instant::now() + self.call_timeout;
        self.wait_for(events, "destroy", until, self.call_timeout, |s| Ok(s.is_none_or(DomainState::is_off))).await?;
        Ok(())
    }

    /// ACPI shutdown, then destroy if the guest does not power off in time.
    async fn shut_down_domain(&self, events: &mut broadcast::Receiver<DomainEvent>) -> Result<(), Fault> {
        self.report(
            VmStep::ShuttingDown,
            format!("ACPI shutdown (destroyed after {})", human_duration(self.shutdown_timeout)),
        );
        match self.call("ACPI shutdown", self.hv.shutdown(&self.key)).await {
            Err(fault) if !fault.is_state() => return Err(fault),
            _ => {}
        }
        let limit = self.shutdown_timeout;
        let until = Instant::now() + limit;
        match self.wait_for(events, "ACPI shutdown", until, limit, |s| Ok(s.is_none_or(DomainState::is_off))).await {
            Ok(_) => Ok(()),
            Err(Fault::Timeout { .. }) => {
                let after = human_duration(limit);
                if let Err(fault) = self.destroy_domain(events).await {
                    return Err(Fault::Ended {
                        why: format!(
                            "did not power off within {after} after ACPI shutdown, and destroying it failed: {}",
                            self.describe(&fault)
                        ),
                    });
                }
                tracing::warn!(
                    resource = %self.id,
                    domain = %self.def.name,
                    uri = %self.hv.uri(),
                    "domain '{}' did not power off within {after} after ACPI shutdown; destroyed",
                    self.def.name
                );
                self.report(VmStep::Destroyed, format!("did not power off within {after} after ACPI shutdown"));
                Ok(())
            }
            Err(fault) => Err(fault),
        }
    }

    async fn stop_domain(&self, force: bool) -> Result<(), Fault> {
        let mut events = self.hv.subscribe();
        let state = self.read_state(Instant::now() + self.call_timeout, self.call_timeout).await?;
        match state {
            None => {
                self.unguard_qemu();
                return Ok(());
            }
            Some(state) if state.is_off() => {}
            Some(_) if force => {
                self.destroy_domain(&mut events).await?;
                self.report(VmStep::Destroyed, "forced stop");
            }
            Some(state) if acpi_reaches(&state) => {
                let _slot = self
                    .gate
                    .enter(|_| self.report(VmStep::Queued, "waiting: the host's bound of VM stops at once is reached"))
                    .await;
                self.prepare_guest().await;
                self.shut_down_domain(&mut events).await?
            }
            Some(state) => {
                tracing::warn!(
                    resource = %self.id,
                    domain = %self.def.name,
                    ?state,
                    "an ACPI shutdown cannot reach the guest in this state; destroying the domain"
                );
                self.destroy_domain(&mut events).await?;
                self.report(VmStep::Destroyed, format!("an ACPI shutdown cannot reach the guest ({state:?})"));
            }
        }
        // The VM is off here: a definition that cannot be removed (NVRAM, a managed-save
        // image, snapshots) is worth a warning, never a failed stop — a failed stop escalates
        // to self-fencing, which must not happen over a leftover definition.
        if let Err(fault) = self.undefine_domain().await {
            tracing::warn!(resource = %self.id, domain = %self.def.name, uri = %self.hv.uri(),
                "the VM is off but its definition could not be removed: {}", self.describe(&fault));
        }
        self.unguard_qemu();
        self.report(VmStep::Stopped, "off");
        Ok(())
    }

    /// Whether a stop for `ctx` live-migrates, and where to (`Ok((host, uri))`); `Err` says
    /// why a handover that asked for it cannot be one. `None`: not a migrating stop.
    fn migration_target(&self, ctx: &StopContext) -> Option<Result<(String, String), String>> {
        let handover = ctx.handover.as_ref().filter(|_| !ctx.force)?;
        let migration = self.migration.as_ref()?;
        if handover.reason == HandoverReason::Standby && !migration.on_standby.load(Ordering::SeqCst) {
            // Maintenance with the failover policy: a clean shutdown, as asked.
            return None;
        }
        Some(match migration.uris.get(&handover.node) {
            Some(uri) => Ok((handover.node.clone(), uri.clone())),
            None => Err(format!(
                "{} cannot receive live migrations (its hypervisor cannot migrate, or its migration_uri is unknown)",
                handover.node
            )),
        })
    }

    /// Live-migrates the running VM to `node` (`uri`), leaving the copy there paused under a
    /// handover mark of `token`. `Ok` once nothing of it runs here any more.
    async fn migrate_domain(&self, node: &str, uri: &str, token: u64) -> Result<Duration, String> {
        let Some(migration) = &self.migration else { return Err("live migration is not set up".into()) };
        let state = self.read_state(Instant::now() + self.call_timeout, self.call_timeout).await;
        match state.map_err(|f| self.describe(&f))? {
            Some(s) if s.is_running() => {}
            Some(s) => return Err(format!("it is {s:?} here, and only a running VM is live-migrated")),
            None => return Err("it is not defined here".into()),
        }
        let mark = HandoverMark { from: migration.me.clone(), token };
        self.call("writing the handover mark", self.hv.set_handover_mark(&self.key, Some(&mark)))
            .await
            .map_err(|f| self.describe(&f))?;
        self.report(VmStep::Migrating, format!("live migration to {node} ({uri})"));
        let started = Instant::now();
        let limit = migration.timeout;
        let call = self.hv.migrate(&self.key, uri, MigrationMode::LivePaused);
        match self.bounded("live migration", started + limit, limit, call).await {
            Ok(()) => {
                let took = started.elapsed();
                // Its QEMU here has ended (the copy there is that host's to guard).
                self.unguard_qemu();
                // The migration undefined it here; a transient leftover would be a bug of the
                // driver, but must not stay defined where the VM does not run.
                if let Ok(Some(_)) = self.read_state(Instant::now() + self.call_timeout, self.call_timeout).await {
                    let _ = self.undefine_domain().await;
                }
                Ok(took)
            }
            Err(fault) => {
                if matches!(fault, Fault::Timeout { .. }) {
                    // The blocking call goes on: abort the job so that it ends here and the
                    // VM runs on here (libvirt removes the incomplete copy there).
                    if let Err(f) = self.call("aborting the migration", self.hv.abort_migration(&self.key)).await {
                        tracing::warn!(resource = %self.id, domain = %self.def.name, "{}", self.describe(&f));
                    }
                }
                // Back to what it was here (best effort: a stale mark only matters elsewhere).
                let _ = self.call("removing the handover mark", self.hv.set_handover_mark(&self.key, None)).await;
                Err(self.describe(&fault))
            }
        }
    }

    /// Removes the definition: a VM stays defined only where it runs.
    async fn undefine_domain(&self) -> Result<(), Fault> {
        match self.call("undefine", self.hv.undefine(&self.key)).await {
            Err(fault) if fault.is_missing() => Ok(()),
            other => other,
        }
    }
}

impl Resource for VmResource {
    fn kind(&self) -> &'static str {
        "vm"
    }

    fn start<'a>(&'a self, ctx: &'a StartContext) -> BoxFuture<'a, Result<(), ResourceError>> {
        Box::pin(async move {
            self.settle_adoption().await;
            tracing::info!(resource = %self.id, domain = %self.def.name, uuid = %self.def.uuid,
                uri = %self.hv.uri(), token = ctx.token, "starting the VM");
            // A fence mark is about the run that was fenced, not about this one.
            if let Some(m) = &self.fence_marks {
                m.clear(&self.def.uuid);
            }
            let started = match ctx.migrated_in {
                true => match self.resume_incoming(ctx.token).await {
                    Ok(true) => Ok(()),
                    Ok(false) => self.start_domain().await,
                    Err(fault) => Err(fault),
                },
                false => self.start_domain().await,
            };
            // Whichever way it came to run (also "already runs here"), its QEMU is guarded.
            let started = match started {
                Ok(()) => self.guard_qemu().await,
                Err(fault) => Err(fault),
            };
            match started {
                Ok(()) => {
                    self.expected_off.store(false, Ordering::SeqCst);
                    *self.running_since.lock().expect("not poisoned") = Some(std::time::Instant::now());
                    Ok(())
                }
                Err(fault) => {
                    let mut reason = self.describe(&fault);
                    // Nothing may be left running (nor defined) after a failed start.
                    self.expected_off.store(true, Ordering::SeqCst);
                    match self.stop_domain(true).await {
                        Ok(()) => reason.push_str("; nothing was left running"),
                        Err(cleanup) => {
                            reason.push_str("; cleaning up failed too: ");
                            reason.push_str(&self.describe(&cleanup));
                        }
                    }
                    Err(ResourceError::failed("start", &self.id, reason))
                }
            }
        })
    }

    fn stop(&self, force: bool) -> BoxFuture<'_, Result<(), ResourceError>> {
        Box::pin(async move {
            // Before anything else: a check running meanwhile must see this power-off as ours.
            self.expected_off.store(true, Ordering::SeqCst);
            self.settle_adoption().await;
            tracing::info!(resource = %self.id, domain = %self.def.name, uri = %self.hv.uri(), force, "stopping the VM");
            self.stop_domain(force)
                .await
                .map_err(|fault| ResourceError::failed("stop", &self.id, self.describe(&fault)))
        })
    }

    fn stop_for<'a>(&'a self, ctx: &'a StopContext) -> BoxFuture<'a, Result<StopOutcome, ResourceError>> {
        Box::pin(async move {
            let (node, uri) = match self.migration_target(ctx) {
                None => return self.stop(ctx.force).await.map(|()| StopOutcome::Stopped),
                Some(Ok(target)) => target,
                Some(Err(why)) => {
                    let text = format!("cannot live-migrate: {why}; shutting it down here, it starts afresh there");
                    tracing::warn!(resource = %self.id, domain = %self.def.name, "{text}");
                    self.report(VmStep::MigrationFailed, text);
                    return self.stop(false).await.map(|()| StopOutcome::Stopped);
                }
            };
            // Before anything else: the VM vanishing from here is ours.
            self.expected_off.store(true, Ordering::SeqCst);
            self.settle_adoption().await;
            tracing::info!(resource = %self.id, domain = %self.def.name, to = %node, %uri, token = ctx.token,
                "live-migrating the VM (it stays paused there until that host holds its lease)");
            let outcome = {
                let _slot = self
                    .gate
                    .enter(|_| self.report(VmStep::Queued, "waiting: the host's bound of VM stops at once is reached"))
                    .await;
                self.migrate_domain(&node, &uri, ctx.token).await
            };
            match outcome {
                Ok(took) => {
                    let text =
                        format!("live-migrated to {node} in {} ms; it resumes there under its lease", took.as_millis());
                    tracing::info!(resource = %self.id, domain = %self.def.name, "{text}");
                    self.report(VmStep::Migrated, text);
                    Ok(StopOutcome::Migrated)
                }
                Err(why) => {
                    let text = format!(
                        "live migration to {node} failed: {why}; shutting it down here, it starts afresh there"
                    );
                    tracing::warn!(resource = %self.id, domain = %self.def.name, "{text}");
                    self.report(VmStep::MigrationFailed, text);
                    self.stop(false).await.map(|()| StopOutcome::Stopped)
                }
            }
        })
    }

    fn adopted(&self) {
        // Found running after an agent restart: it runs here as if we had started it, so a
        // later power-off from outside or a migration away is not mistaken for our own stop.
        self.expected_off.store(false, Ordering::SeqCst);
        *self.running_since.lock().expect("not poisoned") = Some(std::time::Instant::now());
        // It ran unguarded since the previous agent ended: guard it now (the next check
        // tries again if this fails). Finding QEMU scans /proc and connects to libvirtd's
        // socket, and the guard's answer is awaited: not on the caller's (the engine's) task.
        let Some(qemu) = self.qemu.clone() else { return };
        let (key, id, name) = (self.key.clone(), self.id.clone(), self.def.name.clone());
        // What `describe` says of a `Fault::Ended`.
        let what = format!("domain '{name}' ({}) on {}", self.def.uuid, self.hv.uri());
        let register = move || {
            if let Err(why) = register_qemu(&qemu, &key, &id, &name) {
                tracing::error!(resource = %id, domain = %name, "{what} {why}");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let task = rt.spawn_blocking(register);
                *self.adopting.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
            }
            Err(_) => register(),
        }
    }

    fn check(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            let until = Instant::now() + self.call_timeout;
            match self.read_state(until, self.call_timeout).await {
                Ok(Some(DomainState::Paused(_)))
                    if self.expected_off.load(Ordering::SeqCst)
                        && matches!(self.foreign_mark(until, self.call_timeout).await, Ok(Some(_))) =>
                {
                    // A copy another host migrated here and that was never resumed: its vCPUs
                    // never ran here, and only a start under this host's lease resumes it.
                    Health::Stopped
                }
                Ok(state) => {
                    let fenced = self.fence_marks.as_ref().and_then(|m| m.get(&self.def.uuid));
                    match health_with_fence(state.as_ref(), self.expected_off.load(Ordering::SeqCst), fenced.as_deref())
                    {
                        Health::Running => {
                            self.keep_qemu_guarded().await;
                            self.guest_silence().map_or(Health::Running, Health::Failed)
                        }
                        other => other,
                    }
                }
                // Unknown is not stopped: the VM may well run.
                Err(fault) => Health::Failed(format!("cannot tell whether the VM runs: {}", self.describe(&fault))),
            }
        })
    }
}

/// Registers the QEMU process of domain `key` (resource `id`, domain `name`) with the fencing
/// guard; the error says why it cannot, as a `Fault::Ended` reason.
fn register_qemu(qemu: &crate::qemu_fence::QemuGuard, key: &str, id: &str, name: &str) -> Result<(), String> {
    match qemu.register(key) {
        Ok((q, new)) => {
            if new {
                tracing::info!(resource = %id, domain = %name, pid = q.pid, cgroup = ?q.cgroup,
                    "QEMU registered with the fencing guard");
            }
            Ok(())
        }
        Err(why) => {
            Err(format!("its QEMU process cannot be registered with the fencing guard ({why}), so it may not run"))
        }
    }
}

/// The host agent's [`ResourceFactory`]: VMs on this host's hypervisor.
#[derive(Debug, Clone)]
pub struct HostResources {
    hypervisor: Arc<dyn Hypervisor>,
    guests: Option<Arc<dyn GuestShutdown>>,
    activity: broadcast::Sender<VmActivity>,
    gate: StopGate,
    fence_marks: Option<FenceMarks>,
    links: Option<Arc<crate::link::LinkRegistry>>,
    migration: Option<Migration>,
}

impl HostResources {
    /// Resources on `hypervisor` (the node's one connection).
    pub fn new(hypervisor: Arc<dyn Hypervisor>) -> HostResources {
        HostResources {
            hypervisor,
            guests: None,
            activity: broadcast::channel(1024).0,
            gate: StopGate::default(),
            fence_marks: None,
            links: None,
            migration: None,
        }
    }

    /// VMs built from now on ask their guest agents through `guests` before a planned stop.
    pub fn with_guests(mut self, guests: Arc<dyn GuestShutdown>) -> HostResources {
        self.guests = Some(guests);
        self
    }

    /// The bound of planned VM stops at once on this host (maintenance sets it).
    pub fn stop_gate(&self) -> StopGate {
        self.gate.clone()
    }

    /// The steps of every VM stop on this host, as they happen.
    pub fn activity(&self) -> broadcast::Sender<VmActivity> {
        self.activity.clone()
    }

    /// VM resources that read the fence marks of this host's fencer
    /// ([`crate::fence::VmFencer::marks`]).
    pub fn with_fence_marks(mut self, marks: FenceMarks) -> HostResources {
        self.fence_marks = Some(marks);
        self
    }

    /// VMs with a `guest_heartbeat_timeout` are reset when their guests fall silent on these links.
    pub fn with_guest_links(mut self, links: Arc<crate::link::LinkRegistry>) -> HostResources {
        self.links = Some(links);
        self
    }

    /// VMs built from now on live-migrate on planned handovers (see [`Migration`]).
    pub fn with_migration(mut self, migration: Migration) -> HostResources {
        self.migration = Some(migration);
        self
    }

    /// The live-migration settings shared by this host's VMs (maintenance switches
    /// [`Migration::migrate_on_standby`]).
    pub fn migration(&self) -> Option<Migration> {
        self.migration.clone()
    }

    /// The hypervisor the resources run on.
    pub fn hypervisor(&self) -> &Arc<dyn Hypervisor> {
        &self.hypervisor
    }

    /// Builds a VM resource (the concrete type, for callers that need its definition).
    pub fn build_vm(
        &self,
        group: &str,
        spec: &tandem_config::Resource,
        env: &ResourceEnv,
    ) -> Result<VmResource, ResourceError> {
        check_name(group, spec)?;
        match &spec.kind {
            ResourceKind::Vm(config) => {
                let uri = self.hypervisor.uri();
                if crate::qemu_fence::local_daemon_socket(uri).is_none() && !uri.starts_with("test:") {
                    tracing::warn!(%uri, group, "this hypervisor's guests are not local QEMU processes: the fencing \
                        guard cannot stop them if this agent stalls or dies");
                }
                let vm = VmResource::build(group, &spec.name, config, self.hypervisor.clone())?
                    .with_guests(self.guests.clone(), Some(self.activity.clone()))
                    .with_stop_gate(self.gate.clone())
                    .with_migration(self.migration.clone())
                    .with_qemu_guard(crate::qemu_fence::QemuGuard::for_uri(self.hypervisor.uri(), env.guard.clone()))
                    .with_lease(env.lease.clone());
                let vm = match &self.fence_marks {
                    Some(m) => vm.with_fence_marks(m.clone()),
                    None => vm,
                };
                Ok(match (&self.links, config.guest_heartbeat_timeout) {
                    (Some(links), Some(timeout)) => vm.with_guest_heartbeat(links.clone(), timeout),
                    _ => vm,
                })
            }
            other => Err(ResourceError::config(
                &format!("{group}/{}", spec.name),
                format!(
                    "kind \"{}\" runs inside a VM under the guest agent (tandem-guest); the host agent runs only \
                     kind \"vm\"",
                    other.name()
                ),
            )),
        }
    }
}

impl ResourceFactory for HostResources {
    fn build(
        &self,
        group: &str,
        spec: &tandem_config::Resource,
        env: &ResourceEnv,
    ) -> Result<Box<dyn Resource>, ResourceError> {
        Ok(Box::new(self.build_vm(group, spec, env)?))
    }
}

/// `120 s`, `1.5 s`, `300 ms`: how limits read in messages.
fn human_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{} s", d.as_secs())
    } else if d.as_secs() > 0 {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = "<domain type='test'>\n  <name>web</name>\n  <uuid>8f1b6a34-0d5e-4c3b-9a51-2e7f4b8c9d10</uuid>\n  \
                          <memory unit='GiB'>2</memory>\n  <vcpu placement='static'>4</vcpu>\n</domain>\n";

    #[test]
    fn parses_name_uuid_memory_and_vcpus() {
        let def = VmDefinition::parse(DOMAIN, "web.xml").unwrap();
        assert_eq!(def.name, "web");
        assert_eq!(def.uuid.to_string(), "8f1b6a34-0d5e-4c3b-9a51-2e7f4b8c9d10");
        assert_eq!(def.memory_mib, 2048);
        assert_eq!(def.vcpus, 4);
        assert_eq!(def.xml, DOMAIN);
        assert!(def.attachments.is_empty());
    }

    #[test]
    fn lists_what_interfaces_attach_to() {
        let xml = DOMAIN.replace(
            "</domain>",
            "<devices><disk type='file'/><interface type='bridge'><mac address='52:54:00:00:00:01'/>\
             <source bridge='br-a'/></interface><interface type='network'><source network='default'/></interface>\
             <interface type='user'/><interface type='direct'><source dev='eth0' mode='bridge'/></interface>\
             </devices></domain>",
        );
        let def = VmDefinition::parse(&xml, "web.xml").unwrap();
        assert_eq!(def.attachments, vec![Attachment::Bridge("br-a".into()), Attachment::Network("default".into())]);
    }

    fn memory(unit: Option<&str>, amount: &str) -> Result<u64, VmError> {
        let attr = unit.map(|u| format!(" unit='{u}'")).unwrap_or_default();
        let xml = format!(
            "<domain><name>m</name><uuid>8f1b6a34-0d5e-4c3b-9a51-2e7f4b8c9d10</uuid><memory{attr}>{amount}</memory></domain>"
        );
        VmDefinition::parse(&xml, "m.xml").map(|d| d.memory_mib)
    }

    #[test]
    fn memory_units_follow_libvirt() {
        for (unit, amount, mib) in [
            (None, "1048576", 1024),
            (Some("KiB"), "524288", 512),
            (Some("k"), "1024", 1),
            (Some("KB"), "1024000", 977), // 1.024e9 bytes = 976.6 MiB, rounded up
            (Some("MiB"), "768", 768),
            (Some("M"), "3", 3),
            (Some("MB"), "1000", 954), // 1e9 bytes, rounded up to whole MiB
            (Some("GiB"), "2", 2048),
            (Some("gib"), "1", 1024),
            (Some("G"), "4", 4096),
            (Some("GB"), "1", 954),
            (Some("TiB"), "1", 1024 * 1024),
            (Some("T"), "2", 2 * 1024 * 1024),
            (Some("TB"), "1", 953_675),
            (Some("b"), "1048577", 2),
            (Some("bytes"), "1048576", 1),
        ] {
            assert_eq!(memory(unit, amount).unwrap(), mib, "{amount} {unit:?}");
        }
        for (unit, amount) in [(Some("XiB"), "1"), (Some("Kx"), "1"), (None, "lots"), (None, "-5"), (None, "0")] {
            let err = memory(unit, amount).unwrap_err();
            assert!(matches!(err, VmError::BadMemory { .. }), "{unit:?} {amount}: {err:?}");
            assert!(err.to_string().starts_with("m.xml:1:"), "{err}");
        }
        let err = memory(Some("EiB"), "100").unwrap_err();
        assert!(err.to_string().contains("larger than any host"), "{err}");
    }

    #[test]
    fn definition_errors_say_where_and_what_to_do() {
        let err = VmDefinition::parse("<domain><name>x</name></domain>", "x.xml").unwrap_err();
        assert!(matches!(err, VmError::MissingUuid { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("x.xml") && text.contains("<uuid>") && text.contains("every host"), "{text}");

        let err = VmDefinition::parse("<domain>\n  <name>x</name>\n  <uuid>1</uuid>\n</domain>", "x.xml").unwrap_err();
        assert!(err.to_string().starts_with("x.xml:3:3: <uuid> '1' is not a UUID"), "{err}");

        let err = VmDefinition::parse("<domain>\n<name>x</name>\n<memory unit=GiB>1</memory>\n</domain>", "x.xml")
            .unwrap_err();
        assert!(matches!(err, VmError::Syntax { line: 3, .. }), "{err:?}");
        assert!(err.to_string().starts_with("x.xml:3:"), "{err}");

        let err = VmDefinition::parse("<node/>", "n.xml").unwrap_err();
        assert!(err.to_string().starts_with("n.xml:1:1: the root element is <node>"), "{err}");

        let err = VmDefinition::parse("<domain><uuid>8f1b6a34-0d5e-4c3b-9a51-2e7f4b8c9d10</uuid></domain>", "x.xml")
            .unwrap_err();
        assert!(matches!(err, VmError::MissingName { .. }), "{err:?}");

        let err = VmDefinition::parse(
            "<domain><name>x</name><uuid>8f1b6a34-0d5e-4c3b-9a51-2e7f4b8c9d10</uuid></domain>",
            "x.xml",
        )
        .unwrap_err();
        assert!(matches!(err, VmError::MissingMemory { .. }), "{err:?}");

        for vcpu in ["0", "two", ""] {
            let xml = format!(
                "<domain><name>x</name><uuid>8f1b6a34-0d5e-4c3b-9a51-2e7f4b8c9d10</uuid><memory>1024</memory>\
                 <vcpu>{vcpu}</vcpu></domain>"
            );
            let err = VmDefinition::parse(&xml, "x.xml").unwrap_err();
            assert!(matches!(err, VmError::BadVcpus { .. }), "{vcpu}: {err:?}");
        }
        let xml =
            "<domain><name>x</name><uuid>8f1b6a34-0d5e-4c3b-9a51-2e7f4b8c9d10</uuid><memory>1024</memory></domain>";
        assert_eq!(VmDefinition::parse(xml, "x.xml").unwrap().vcpus, 1);
    }

    #[test]
    fn a_missing_file_is_a_read_error_naming_it() {
        let err = VmDefinition::load("/nonexistent/tandem/web.xml").unwrap_err();
        assert!(matches!(err, VmError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/tandem/web.xml"), "{err}");
    }

    fn is_stopped_outside(h: &Health, who: &str) -> bool {
        matches!(h, Health::StoppedOutside(w) if w.contains(who))
    }

    #[test]
    fn classification_of_active_states_ignores_who_asked_to_stop() {
        use DomainState as S;
        let running = [
            S::Running(RunningReason::Booted),
            S::Running(RunningReason::Unknown),
            S::Running(RunningReason::Migrated),
            S::Running(RunningReason::Restored),
            S::Running(RunningReason::FromSnapshot),
            S::Running(RunningReason::Unpaused),
            S::Running(RunningReason::MigrationCanceled),
            S::Running(RunningReason::SaveCanceled),
            S::Running(RunningReason::Wakeup),
            S::Running(RunningReason::Crashed),
            S::Running(RunningReason::Postcopy),
            S::Running(RunningReason::Other(99)),
            S::Blocked,
            S::ShuttingDown,
            S::PmSuspended,
            S::Paused(PausedReason::User),
            S::Paused(PausedReason::Migration),
            S::Paused(PausedReason::Postcopy),
            S::Paused(PausedReason::Save),
            S::Paused(PausedReason::Dump),
            S::Paused(PausedReason::Snapshot),
            S::Paused(PausedReason::FromSnapshot),
            S::Paused(PausedReason::StartingUp),
            S::Paused(PausedReason::ShuttingDown),
        ];
        let failed = [
            (S::Running(RunningReason::PostcopyFailed), "post-copy"),
            (S::Paused(PausedReason::IoError), "I/O error"),
            (S::Paused(PausedReason::Watchdog), "watchdog"),
            (S::Paused(PausedReason::Crashed), "crashed"),
            (S::Paused(PausedReason::ApiError), "API call"),
            (S::Paused(PausedReason::PostcopyFailed), "post-copy"),
            (S::Paused(PausedReason::Unknown), "does not give"),
            (S::Paused(PausedReason::Other(42)), "42"),
            (S::Crashed(CrashedReason::Panicked), "panicked"),
            (S::Crashed(CrashedReason::Unknown), "crashed"),
            (S::Crashed(CrashedReason::Other(3)), "crashed"),
            (S::NoState, "no state"),
        ];
        for expected_off in [false, true] {
            for state in &running {
                assert_eq!(health_of(Some(state), expected_off), Health::Running, "{state:?} {expected_off}");
            }
            for (state, why) in &failed {
                let health = health_of(Some(state), expected_off);
                assert!(
                    matches!(&health, Health::Failed(w) if w.contains(why)),
                    "{state:?} {expected_off}: {health:?}"
                );
            }
        }
    }

    #[test]
    fn classification_of_off_states_depends_on_who_asked() {
        use ShutoffReason as R;
        let all = [
            R::Unknown,
            R::Shutdown,
            R::Destroyed,
            R::Crashed,
            R::Migrated,
            R::Saved,
            R::Failed,
            R::FromSnapshot,
            R::Daemon,
            R::Other(17),
        ];
        // Ours (or never started here): whatever the reason, it is simply stopped.
        for reason in all {
            assert_eq!(health_of(Some(&DomainState::Shutoff(reason)), true), Health::Stopped, "{reason:?}");
        }
        assert_eq!(health_of(None, true), Health::Stopped);

        // Not ours: who did it decides.
        let off = |r| health_of(Some(&DomainState::Shutoff(r)), false);
        assert_eq!(off(R::Shutdown), Health::StoppedOutside("powered off from inside the guest".into()));
        assert_eq!(off(R::Destroyed), Health::StoppedOutside("forced off through the hypervisor".into()));
        assert!(is_stopped_outside(&off(R::Migrated), "migrated"));
        assert!(is_stopped_outside(&off(R::Saved), "saved"));
        assert!(is_stopped_outside(&off(R::FromSnapshot), "snapshot"));
        assert!(is_stopped_outside(&health_of(None, false), "no longer defined"));
        for (reason, why) in [
            (R::Crashed, "crashed"),
            (R::Failed, "failed to start"),
            (R::Daemon, "daemon"),
            (R::Unknown, "does not say"),
            (R::Other(17), "17"),
        ] {
            let health = off(reason);
            assert!(matches!(&health, Health::Failed(w) if w.contains(why)), "{reason:?}: {health:?}");
        }
        // Every failure cause of the hypervisor layer is a failure here too.
        for reason in all {
            if reason.stop_cause().is_failure() {
                assert!(matches!(off(reason), Health::Failed(_)), "{reason:?}");
            }
        }
    }

    #[test]
    fn a_fenced_vm_is_a_failure_not_a_stop_outside() {
        let destroyed = DomainState::Shutoff(ShutoffReason::Destroyed);
        let why = "powered off by a fence request of VM pg2 (guest cluster pg)";
        assert_eq!(health_with_fence(Some(&destroyed), false, Some(why)), Health::Failed(why.into()));
        // Without the mark it is an administrator's destroy.
        assert!(is_stopped_outside(&health_with_fence(Some(&destroyed), false, None), "forced off"));
        // Our own stop stays ours; other states are not affected by a mark.
        assert_eq!(health_with_fence(Some(&destroyed), true, Some(why)), Health::Stopped);
        let shutdown = DomainState::Shutoff(ShutoffReason::Shutdown);
        assert!(is_stopped_outside(&health_with_fence(Some(&shutdown), false, Some(why)), "inside the guest"));
        let paused = DomainState::Paused(PausedReason::User);
        assert_eq!(health_with_fence(Some(&paused), false, Some(why)), Health::Running);
    }

    #[test]
    fn acpi_is_used_only_where_the_guest_can_react() {
        assert!(acpi_reaches(&DomainState::Running(RunningReason::Booted)));
        assert!(acpi_reaches(&DomainState::ShuttingDown));
        assert!(!acpi_reaches(&DomainState::Paused(PausedReason::User)));
        assert!(!acpi_reaches(&DomainState::Crashed(CrashedReason::Panicked)));
        assert!(!acpi_reaches(&DomainState::PmSuspended));
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(Duration::from_secs(120)), "120 s");
        assert_eq!(human_duration(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(human_duration(Duration::from_millis(300)), "300 ms");
    }
}
