//! Resources: the things a failover group starts, stops and checks on one node.
//!
//! Every resource kind implements [`Resource`]; each agent brings its kinds through a
//! [`ResourceFactory`] (application resources in tandem-guest, VMs in tandem-host). The runtime calls at most one operation
//! of a resource at a time, and bounds each one with the resource's own timeouts (the
//! implementations enforce them: a hung program is killed, never waited for forever).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_lease::guard::{GuardError, GuardHandle};

/// The node's fencing guard as resources reach it: for what a resource runs outside its
/// group's cgroup (a VM's QEMU process, started by libvirtd), which the guard must kill too
/// when this node's lease is about to end. Empty until the lease service started the guard;
/// the engine starts no resource before that.
#[derive(Clone, Default)]
pub struct GuardAccess {
    guard: Arc<Mutex<Option<Arc<Mutex<GuardHandle>>>>>,
}

impl std::fmt::Debug for GuardAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardAccess").field("attached", &self.attached()).finish()
    }
}

/// Whether this node's host lease is valid right now, for resources whose start takes
/// several steps: a process paused between them (SIGSTOP, a stalled VM) must not take the
/// next step (resuming a guest, say) after its lease ended. Answers true until the lease
/// service attached itself (resources built outside an agent, in tests and tools).
#[derive(Clone, Default)]
pub struct LeaseCheck {
    valid: Arc<std::sync::OnceLock<Arc<dyn Fn() -> bool + Send + Sync>>>,
}

impl std::fmt::Debug for LeaseCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseCheck").field("attached", &self.valid.get().is_some()).finish()
    }
}

impl LeaseCheck {
    /// A check that answers from `valid` (for resources built outside an agent).
    pub fn new(valid: Arc<dyn Fn() -> bool + Send + Sync>) -> LeaseCheck {
        let check = LeaseCheck::default();
        check.attach(valid);
        check
    }

    /// Answers from `valid` from now on (the agent does this once the lease service runs).
    pub(crate) fn attach(&self, valid: Arc<dyn Fn() -> bool + Send + Sync>) {
        let _ = self.valid.set(valid);
    }

    /// Whether the host lease is valid now, on a fresh clock reading.
    pub fn valid_now(&self) -> bool {
        self.valid.get().is_none_or(|f| f())
    }
}

/// Why a resource could not (un)register something with the guard.
#[derive(Debug, thiserror::Error)]
pub enum GuardAccessError {
    /// The lease service has not started the guard (or this agent runs without one).
    #[error("the fencing guard is not running")]
    NotStarted,
    /// The guard refused or could not be told.
    #[error(transparent)]
    Guard(#[from] GuardError),
}

impl GuardAccess {
    /// Connects to the running guard (the lease service does this once it started it).
    pub(crate) fn attach(&self, guard: Arc<Mutex<GuardHandle>>) {
        *self.guard.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard);
    }

    /// Whether the guard runs.
    pub fn attached(&self) -> bool {
        self.guard.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    fn with<T>(&self, f: impl FnOnce(&mut GuardHandle) -> Result<T, GuardError>) -> Result<T, GuardAccessError> {
        let guard = self.guard.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or(GuardAccessError::NotStarted)?;
        let mut handle = guard.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&mut handle)?)
    }

    /// Has the guard kill process `pid` (started at `start`, see
    /// [`tandem_lease::guard::process_start_time`]) when fencing. `Ok` only once the guard
    /// confirmed that it holds the process (see
    /// [`tandem_lease::guard::GuardHandle::register_process`]; blocks briefly for that).
    pub fn register_process(&self, pid: i32, start: u64) -> Result<(), GuardAccessError> {
        self.with(|g| g.register_process(pid, start))
    }

    /// Stops guarding process `pid` that started at `start` (a newer process that reused the
    /// pid stays guarded).
    pub fn unregister_process(&self, pid: i32, start: u64) -> Result<(), GuardAccessError> {
        self.with(|g| g.unregister_process(pid, start))
    }

    /// Has the guard kill everything in cgroup `path` when fencing.
    pub fn register_cgroup(&self, path: &Path) -> Result<(), GuardAccessError> {
        self.with(|g| g.register_cgroup(path))
    }

    /// Stops guarding cgroup `path`.
    pub fn unregister_cgroup(&self, path: &Path) -> Result<(), GuardAccessError> {
        self.with(|g| g.unregister_cgroup(path))
    }
}

/// What the resources of this node share: who we are, where processes go, and
/// the limits of operations the configuration has no field for.
#[derive(Debug, Clone)]
pub struct ResourceEnv {
    /// This node's name (written into a disk directory's owner file).
    pub node: String,
    /// The group's cgroup v2 directory. Each resource puts everything it
    /// starts into `<cgroup>/<resource>/service` (the service) or
    /// `<cgroup>/<resource>/ops` (monitor, stop and helper programs), so a
    /// `cgroup.kill` of this directory kills every process of the group, even
    /// daemons that left their process group. `None`: process groups only.
    pub cgroup: Option<PathBuf>,
    /// The OCF root (`/usr/lib/ocf`).
    pub ocf_root: PathBuf,
    /// SIGTERM → SIGKILL grace when an operation's program times out.
    pub kill_grace: Duration,
    /// Limit for a disk directory's stat, owner file and fsync, and for a
    /// mounted disk's checks (a hung NFS server must not hang the agent).
    pub disk_io_timeout: Duration,
    /// Limit for `fsck` + `mount`, and for `umount`.
    pub mount_timeout: Duration,
    /// Limit for each `ip` and `arping` run.
    pub ip_timeout: Duration,
    /// The directory whose existence says systemd is the init system
    /// (`/run/systemd/system`, as `sd_booted(3)` checks).
    pub systemd_marker: PathBuf,
    /// The node's fencing guard, for processes a resource runs outside its cgroup.
    pub guard: GuardAccess,
    /// Whether the node's host lease is valid now (between the steps of a start).
    pub lease: LeaseCheck,
}

impl ResourceEnv {
    /// Defaults for node `node`, without a cgroup.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            cgroup: None,
            ocf_root: PathBuf::from(tandem_monitors::ocf::DEFAULT_OCF_ROOT),
            kill_grace: tandem_monitors::exec::DEFAULT_KILL_GRACE,
            disk_io_timeout: Duration::from_secs(10),
            mount_timeout: Duration::from_secs(120),
            ip_timeout: Duration::from_secs(10),
            systemd_marker: PathBuf::from("/run/systemd/system"),
            guard: GuardAccess::default(),
            lease: LeaseCheck::default(),
        }
    }

    /// Sets the fencing guard resources may register processes with.
    pub fn with_guard(mut self, guard: GuardAccess) -> Self {
        self.guard = guard;
        self
    }

    /// Sets the check of the node's host lease.
    pub fn with_lease(mut self, lease: LeaseCheck) -> Self {
        self.lease = lease;
        self
    }

    /// Sets the group's cgroup directory.
    pub fn with_cgroup(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cgroup = Some(dir.into());
        self
    }
}

/// Builds an agent's resources from their configuration.
pub trait ResourceFactory: Send + Sync + std::fmt::Debug {
    /// Builds the resource `spec` of group `group`. Checks what can be checked without side
    /// effects (programs exist, the user exists, the hypervisor answers…); nothing is started.
    /// A kind this agent does not run is a [`ResourceError::Config`] that names the agent
    /// that does.
    fn build(
        &self,
        group: &str,
        spec: &tandem_config::Resource,
        env: &ResourceEnv,
    ) -> Result<Box<dyn Resource>, ResourceError>;
}

/// Refuses resource names that cannot be a directory name (they name cgroups and files).
pub fn check_name(group: &str, spec: &tandem_config::Resource) -> Result<(), ResourceError> {
    if spec.name.is_empty() || spec.name == "." || spec.name == ".." || spec.name.contains(['/', '\0']) {
        return Err(ResourceError::config(
            &format!("{group}/{}", spec.name),
            "the resource name must be usable as a directory name",
        ));
    }
    Ok(())
}

/// A boxed future, so that [`Resource`] stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a start operation knows about the lease it runs under.
#[derive(Debug, Clone)]
pub struct StartContext {
    /// The failover group.
    pub group: String,
    /// The resource's name within its group.
    pub resource: String,
    /// The group's fencing token (strictly increasing per group); programs get it as
    /// `TANDEM_FENCING_TOKEN` so that storage can refuse writes from stale holders.
    pub token: u64,
    /// The previous holder moved this resource's running state here (a VM's live
    /// migration) and released the lease only afterwards, naming this node: the state waits
    /// here, paused, and the start should resume it. A resource that finds nothing to
    /// resume starts afresh. Never set for resources that do not migrate.
    pub migrated_in: bool,
}

impl StartContext {
    /// A plain start of `group/resource` under `token` (nothing migrated in).
    pub fn new(group: impl Into<String>, resource: impl Into<String>, token: u64) -> Self {
        StartContext { group: group.into(), resource: resource.into(), token, migrated_in: false }
    }
}

/// Why a planned stop hands the group to another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverReason {
    /// An operator moved the group there (`MoveGroup`), or it fails back there.
    Move,
    /// This node entered standby (planned maintenance, move mode): the group goes to the
    /// best other node.
    Standby,
    /// A local veto forbids the group here (a failed network): it goes to the best other node.
    Veto,
}

/// The node a planned stop hands the group to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverTarget {
    /// The node's name in the configuration.
    pub node: String,
    /// Why.
    pub reason: HandoverReason,
}

/// What a stop operation knows.
#[derive(Debug, Clone)]
pub struct StopContext {
    /// The failover group.
    pub group: String,
    /// The resource's name within its group.
    pub resource: String,
    /// Stop without grace: the lease is gone or was never ours.
    pub force: bool,
    /// The fencing token the resource was started (or adopted) under here; 0 if unknown.
    pub token: u64,
    /// The stop is a planned handover to this node (never with `force`): a resource that
    /// can move its running state there may do so ([`StopOutcome::Migrated`]).
    pub handover: Option<HandoverTarget>,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// Stopped here; nothing of it runs anywhere.
    Stopped,
    /// Its running state moved to the handover target, where it waits paused until that
    /// node holds the lease and resumes it; nothing of it runs here any more.
    Migrated,
}

/// The outcome of a resource's own check (exec `monitor`, OCF `monitor`, address present…).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Running and healthy.
    Running,
    /// Cleanly not running here.
    Stopped,
    /// Running but failed, or in an unknown state; the text says why.
    Failed(String),
    /// Stopped on purpose by someone outside the cluster (a VM powered off from inside the
    /// guest, or forced off by an administrator through the hypervisor); the text says who.
    /// Not a failure: the runtime stops the group, as an operator stop would, instead of
    /// recovering it.
    StoppedOutside(String),
}

/// One resource of a failover group on this node.
///
/// Operations are bounded by the resource's configured timeouts. `stop(force = true)` is
/// used when the lease is gone or was never ours: no grace, kill everything at once.
pub trait Resource: Send + Sync + std::fmt::Debug {
    /// The `kind` string of the configuration (`exec`, `ocf`, …).
    fn kind(&self) -> &'static str;
    /// Starts the resource under the lease token in `ctx`. Returns once it runs.
    fn start<'a>(&'a self, ctx: &'a StartContext) -> BoxFuture<'a, Result<(), ResourceError>>;
    /// Stops the resource. Returns once it is stopped; stopping a stopped resource succeeds.
    fn stop(&self, force: bool) -> BoxFuture<'_, Result<(), ResourceError>>;
    /// Stops the resource for `ctx`: the runtime's entry point. The default stops it
    /// ([`Resource::stop`]); a resource that can hand its running state over to
    /// `ctx.handover` (a VM's live migration) overrides it and may answer
    /// [`StopOutcome::Migrated`], falling back to a plain stop when it cannot.
    fn stop_for<'a>(&'a self, ctx: &'a StopContext) -> BoxFuture<'a, Result<StopOutcome, ResourceError>> {
        Box::pin(async move { self.stop(ctx.force).await.map(|()| StopOutcome::Stopped) })
    }
    /// Checks the resource here: used by the startup probe (is it already running?) and as
    /// the resource's built-in monitor.
    fn check(&self) -> BoxFuture<'_, Health>;
    /// The startup probe found the resource running and the node adopted it under its lease:
    /// from now on it runs here as if this agent had started it.
    fn adopted(&self) {}
}

/// Why a resource operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// The operation did not finish within its timeout (what was running was killed).
    #[error("{op} of {resource} did not finish within {timeout_ms} ms; its processes were killed")]
    Timeout {
        /// `start`, `stop` or `check`.
        op: &'static str,
        /// The resource, `group/resource`.
        resource: String,
        /// The limit.
        timeout_ms: u64,
    },
    /// The operation ran and failed.
    #[error("{op} of {resource} failed: {reason}")]
    Failed {
        /// `start`, `stop` or `check`.
        op: &'static str,
        /// The resource, `group/resource`.
        resource: String,
        /// What went wrong (a program's exit status and first line of output, an errno…).
        reason: String,
    },
    /// The resource cannot be used as configured on this node (found by
    /// `build`, or by a start's validation).
    #[error("resource {resource} cannot be used here: {reason}")]
    Config {
        /// The resource, `group/resource`.
        resource: String,
        /// What is wrong and what to do.
        reason: String,
    },
}

impl ResourceError {
    /// A [`ResourceError::Failed`].
    pub fn failed(op: &'static str, resource: &str, reason: impl Into<String>) -> Self {
        ResourceError::Failed { op, resource: resource.to_string(), reason: reason.into() }
    }

    /// A [`ResourceError::Timeout`].
    pub fn timeout(op: &'static str, resource: &str, timeout: Duration) -> Self {
        ResourceError::Timeout { op, resource: resource.to_string(), timeout_ms: timeout.as_millis() as u64 }
    }

    /// A [`ResourceError::Config`].
    pub fn config(resource: &str, reason: impl Into<String>) -> Self {
        ResourceError::Config { resource: resource.to_string(), reason: reason.into() }
    }
}
