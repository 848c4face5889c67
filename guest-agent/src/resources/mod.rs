//! Resources: the things a failover group starts, stops and checks on one node.
//!
//! Every resource kind implements [`Resource`]. The runtime calls at most one operation
//! of a resource at a time, and bounds each one with the resource's own timeouts (the
//! implementations enforce them: a hung program is killed, never waited for forever).

use std::future::Future;
use std::pin::Pin;

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
    /// Checks the resource here: used by the startup probe (is it already running?) and as
    /// the resource's built-in monitor.
    fn check(&self) -> BoxFuture<'_, Health>;
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
}
