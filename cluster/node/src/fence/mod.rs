//! Outside fencing: powering a node off from another node before its groups are taken over.
//!
//! A disk lease cannot stop a node that stalled as a whole: a paused VM resumes and writes
//! once more before it reads its lease again. So before the engine takes a group over from a
//! node that did not release it cleanly (`Command::RequestFence`), the runtime asks a
//! [`Fencer`] to fence that node, and answers `Event::FenceConfirmed` only once the fencer
//! confirmed it. See `docs/fencing.md`.
//!
//! * [`Fencer::fence`] runs one bounded attempt: the target's `fence_delay`, the method,
//!   the confirmation.
//! * [`Fencer::fence_until_confirmed`] retries with capped exponential backoff and reports
//!   every failed attempt; it never gives up silently.
//! * [`group_requires_fencing`] and [`fence_route`] map the configuration onto the engine's
//!   `require_fencing` flag and onto how a `RequestFence` is answered.

pub mod agent;
pub mod command;
pub mod host;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tandem_config::{ClusterConfig, FailoverGroup, FenceMethod, Node};
use tandem_engine::NodeId;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use agent::{AgentError, AgentMetadata, AgentMethod};
pub use command::{CommandError, CommandMethod};
pub use host::{FenceVmFuture, HostClusterFencing, HostClusterMethod, HostFenceError, NotBuiltHostCluster};

/// How a node's fencing was confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// The agent's `off` succeeded and its `status` then reported the node off (exit 2).
    StatusOff,
    /// The agent's `off` succeeded; the agent has no `status` action, so its own success is
    /// the only confirmation.
    OffWithoutStatus,
    /// The fence command exited 0.
    CommandSucceeded,
    /// The host cluster reported the node's VM powered off.
    HostClusterOff,
}

/// Which kind of method fenced a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodKind {
    /// A `fence-agents` agent.
    Agent,
    /// A fence command.
    Command,
    /// The host cluster.
    HostCluster,
}

/// A confirmed fencing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceReport {
    /// The fenced node.
    pub node: NodeId,
    /// Its name.
    pub name: String,
    /// The method that fenced it.
    pub method: MethodKind,
    /// How it was confirmed.
    pub confirmation: Confirmation,
    /// The `fence_delay` waited before the method ran (zero on retries).
    pub delayed: Duration,
    /// Wall time of the whole attempt, delay included.
    pub elapsed: Duration,
    /// What the method said (first meaningful line of its output), passwords removed.
    pub detail: String,
}

/// Why an attempt to fence a node did not confirm it fenced.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The engine asked for a node the configuration does not have.
    #[error("cannot fence node id {0}: no such node in the configuration")]
    UnknownNode(NodeId),
    /// The node has no `fence` table.
    #[error(
        "cannot fence node {node:?}: it has no `fence` method; configure one in its [[node]] table \
         (see docs/fencing.md)"
    )]
    NoMethod {
        /// The node.
        node: String,
    },
    /// The node is configured `lease-watchdog-only`: nothing outside can fence it.
    #[error(
        "node {node:?} is lease-watchdog-only: there is no outside action; its takeover is confirmed by \
         the lease layer seeing its host lease dead (see fence_route)"
    )]
    LeaseWatchdogOnly {
        /// The node.
        node: String,
    },
    /// This fencer was cancelled (this node is being fenced itself, lost quorum, or shuts down).
    #[error("fencing of node {node:?} cancelled before it was confirmed (this node stops fencing)")]
    Cancelled {
        /// The node.
        node: String,
    },
    /// The fence agent failed.
    #[error("fencing node {node:?} with its fence agent failed")]
    Agent {
        /// The node.
        node: String,
        /// What went wrong.
        #[source]
        source: AgentError,
    },
    /// The fence command failed.
    #[error("fencing node {node:?} with its fence command failed")]
    Command {
        /// The node.
        node: String,
        /// What went wrong.
        #[source]
        source: CommandError,
    },
    /// The host cluster did not confirm the VM off.
    #[error("fencing node {node:?} through the host cluster failed")]
    HostCluster {
        /// The node.
        node: String,
        /// What went wrong.
        #[source]
        source: HostFenceError,
    },
}

impl FenceError {
    /// True when retrying cannot help until the configuration or the installation changes
    /// (the retry driver reports it and returns instead of looping).
    pub fn is_permanent(&self) -> bool {
        match self {
            FenceError::UnknownNode(_) | FenceError::NoMethod { .. } | FenceError::LeaseWatchdogOnly { .. } => true,
            FenceError::Cancelled { .. } => true,
            FenceError::Agent { source, .. } => source.is_permanent(),
            FenceError::Command { source, .. } => source.is_permanent(),
            FenceError::HostCluster { source, .. } => source.is_permanent(),
        }
    }

    /// The error and its sources on one line, for logs and notices.
    pub fn chain(&self) -> String {
        let mut s = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }
}

/// How a `RequestFence` for a node is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceRoute {
    /// Run [`Fencer::fence_until_confirmed`]; answer `FenceConfirmed` on success.
    Outside,
    /// The node is explicitly `lease-watchdog-only`: answer `FenceConfirmed` once the lease
    /// layer reports the node's host lease dead (`PeerFenced`), which on that node means its
    /// self-fencing (and watchdog) has run.
    LeaseExpiry,
}

/// How a `RequestFence` for `node` is answered (see [`FenceRoute`]).
pub fn fence_route(node: &Node) -> FenceRoute {
    match node.fence {
        // No `fence` at all is not a silent "lease only": the lease alone cannot stop a node
        // that stalled as a whole, so that mode must be chosen explicitly. Fencing such a
        // node fails with `NoMethod` (reported), and takeovers from it wait.
        Some(FenceMethod::Agent(_) | FenceMethod::Command(_) | FenceMethod::HostCluster(_)) | None => {
            FenceRoute::Outside
        }
        Some(FenceMethod::LeaseWatchdogOnly(_)) => FenceRoute::LeaseExpiry,
    }
}

/// The engine's `PlacementPolicy::require_fencing` for `group`: true unless every eligible
/// node is explicitly `lease-watchdog-only`; the engine then waits for the lease layer
/// alone, which is all such a node offers. In a mixed group the flag is set and a
/// `RequestFence` for a lease-only node is answered by its lease expiry ([`fence_route`]).
pub fn group_requires_fencing(cfg: &ClusterConfig, group: &FailoverGroup) -> bool {
    group.nodes.iter().filter_map(|n| cfg.node(n)).any(|n| fence_route(n) == FenceRoute::Outside)
}

/// One node's fencing, resolved from its configuration.
#[derive(Debug)]
enum Method {
    Agent(AgentMethod),
    Command(CommandMethod),
    HostCluster(HostClusterMethod),
    LeaseWatchdogOnly,
    None,
}

#[derive(Debug)]
struct Target {
    name: String,
    delay: Duration,
    method: Method,
}

/// Fences the nodes of one cluster, as its configuration says.
///
/// Cancellation: [`Fencer::cancel_token`] stops every attempt of this fencer, during the
/// delay, before the method starts, or while it runs (its process group is killed). The
/// runtime cancels it when this node itself must stop fencing: it lost quorum (only the
/// quorate side may fence), it is shutting down, or it learns it is being fenced. This is
/// what makes `fence_delay` decide a fence race: the node without a delay fences first, and
/// the delayed attempt of the fenced node never runs its method.
#[derive(Debug)]
pub struct Fencer {
    targets: BTreeMap<NodeId, Target>,
    cancel: CancellationToken,
}

/// Why a [`Fencer`] could not be built from a configuration.
#[derive(Debug, thiserror::Error)]
pub enum FencerConfigError {
    /// A node's fence agent parameters cannot be passed on the agent's stdin.
    #[error("node {node:?}: bad fence agent configuration")]
    Agent {
        /// The node.
        node: String,
        /// What is wrong.
        #[source]
        source: AgentError,
    },
    /// A node's fence command is empty.
    #[error("node {node:?}: bad fence command")]
    Command {
        /// The node.
        node: String,
        /// What is wrong.
        #[source]
        source: CommandError,
    },
}

/// Capped exponential backoff between fence attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Pause after the first failed attempt.
    pub initial: Duration,
    /// The pause never grows past this.
    pub max: Duration,
}

impl Default for RetryPolicy {
    /// 1 s, doubling, capped at 60 s.
    fn default() -> Self {
        Self { initial: Duration::from_secs(1), max: Duration::from_secs(60) }
    }
}

impl RetryPolicy {
    /// The pause after failed attempt number `attempt` (1-based).
    pub fn pause_after(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1).min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// One failed attempt, as reported to the retry driver's callback.
#[derive(Debug)]
pub struct FailedAttempt {
    /// The node being fenced.
    pub node: NodeId,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Why it failed.
    pub error: FenceError,
    /// When the next attempt starts; `None` when the driver stops (permanent error).
    pub retry_in: Option<Duration>,
}

impl Fencer {
    /// A fencer for every node of `cfg` that has a `fence` table, with the host-cluster
    /// method answered by [`NotBuiltHostCluster`] (for a node that runs no host link).
    pub fn from_config(cfg: &ClusterConfig) -> Result<Self, FencerConfigError> {
        Self::with_host_cluster(cfg, Arc::new(NotBuiltHostCluster))
    }

    /// Like [`Fencer::from_config`], with the host cluster reached through `host`.
    pub fn with_host_cluster(
        cfg: &ClusterConfig,
        host: Arc<dyn HostClusterFencing>,
    ) -> Result<Self, FencerConfigError> {
        let mut targets = BTreeMap::new();
        for n in &cfg.nodes {
            let method = match &n.fence {
                Some(FenceMethod::Agent(a)) => Method::Agent(
                    AgentMethod::from_config(a)
                        .map_err(|source| FencerConfigError::Agent { node: n.name.clone(), source })?,
                ),
                Some(FenceMethod::Command(c)) => Method::Command(
                    CommandMethod::from_config(c)
                        .map_err(|source| FencerConfigError::Command { node: n.name.clone(), source })?,
                ),
                Some(FenceMethod::HostCluster(h)) => Method::HostCluster(HostClusterMethod::new(
                    host.clone(),
                    cfg.cluster.name.clone(),
                    h.vm_uuid.clone(),
                    h.timeout,
                )),
                Some(FenceMethod::LeaseWatchdogOnly(_)) => Method::LeaseWatchdogOnly,
                None => Method::None,
            };
            targets.insert(NodeId(n.id), Target { name: n.name.clone(), delay: n.fence_delay, method });
        }
        Ok(Self { targets, cancel: CancellationToken::new() })
    }

    /// The token that cancels every attempt of this fencer (see the type's documentation).
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// One bounded attempt to fence `target`: wait its `fence_delay`, run its method, confirm.
    /// Bounded by delay + the method's timeouts (an agent: two runs, `off` and `status`).
    pub async fn fence(&self, target: NodeId) -> Result<FenceReport, FenceError> {
        self.attempt(target, true).await
    }

    async fn attempt(&self, id: NodeId, with_delay: bool) -> Result<FenceReport, FenceError> {
        let t = self.targets.get(&id).ok_or(FenceError::UnknownNode(id))?;
        let node = || t.name.clone();
        match t.method {
            Method::None => return Err(FenceError::NoMethod { node: node() }),
            Method::LeaseWatchdogOnly => return Err(FenceError::LeaseWatchdogOnly { node: node() }),
            _ => {}
        }
        let start = Instant::now();
        let delayed = if with_delay { t.delay } else { Duration::ZERO };
        if !delayed.is_zero() {
            tracing::info!(node = %t.name, delay_ms = delayed.as_millis() as u64, "waiting fence_delay before fencing");
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(FenceError::Cancelled { node: node() }),
                _ = tokio::time::sleep(delayed) => {}
            }
        }
        if self.cancel.is_cancelled() {
            return Err(FenceError::Cancelled { node: node() });
        }
        tracing::warn!(node = %t.name, "fencing node");
        let run = async {
            match &t.method {
                Method::Agent(a) => a
                    .off_and_confirm()
                    .await
                    .map(|(c, d)| (MethodKind::Agent, c, d))
                    .map_err(|source| FenceError::Agent { node: node(), source }),
                Method::Command(c) => c
                    .run(&t.name, id.0)
                    .await
                    .map(|d| (MethodKind::Command, Confirmation::CommandSucceeded, d))
                    .map_err(|source| FenceError::Command { node: node(), source }),
                Method::HostCluster(h) => h
                    .fence(&t.name, id.0)
                    .await
                    .map(|d| (MethodKind::HostCluster, Confirmation::HostClusterOff, d))
                    .map_err(|source| FenceError::HostCluster { node: node(), source }),
                Method::LeaseWatchdogOnly | Method::None => unreachable!("returned above"),
            }
        };
        // Dropping `run` on cancellation kills the agent's or command's process group.
        let (method, confirmation, detail) = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return Err(FenceError::Cancelled { node: node() }),
            r = run => r?,
        };
        tracing::warn!(node = %t.name, ?confirmation, "node fenced");
        Ok(FenceReport { node: id, name: node(), method, confirmation, delayed, elapsed: start.elapsed(), detail })
    }

    /// Fences `target` until confirmed: the first attempt waits the target's `fence_delay`,
    /// each failed attempt is passed to `on_failure` and followed by a pause from `policy`.
    /// Returns the report once confirmed, or the error of an attempt that cannot succeed on
    /// retry (unknown node, no outside method, host cluster not built, agent not installed,
    /// cancelled), after passing it to `on_failure` too. It never returns on a transient
    /// failure: the engine's takeover keeps waiting, and the operator sees every failure.
    pub async fn fence_until_confirmed(
        &self,
        target: NodeId,
        policy: RetryPolicy,
        mut on_failure: impl FnMut(&FailedAttempt),
    ) -> Result<FenceReport, FenceError> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let error = match self.attempt(target, attempt == 1).await {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            if matches!(error, FenceError::Cancelled { .. }) {
                return Err(error);
            }
            if error.is_permanent() {
                tracing::error!(%target, attempt, error = %error.chain(), "fencing cannot succeed; not retrying");
                let failed = FailedAttempt { node: target, attempt, error, retry_in: None };
                on_failure(&failed);
                return Err(failed.error);
            }
            let pause = policy.pause_after(attempt);
            tracing::error!(%target, attempt, retry_in_ms = pause.as_millis() as u64, error = %error.chain(), "fencing failed");
            on_failure(&FailedAttempt { node: target, attempt, error, retry_in: Some(pause) });
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => {
                    let node = self.targets.get(&target).map(|t| t.name.clone()).unwrap_or_default();
                    return Err(FenceError::Cancelled { node });
                }
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// The first meaningful line of a program's output, for reports and errors: an `ERROR`/
/// `Failed` line of stderr if there is one, else stderr's last line, else stdout's. Every
/// occurrence of `secret` is replaced by `***`.
pub(crate) fn summarize(stdout: &[u8], stderr: &[u8], secret: Option<&str>) -> String {
    let err = String::from_utf8_lossy(stderr);
    let out = String::from_utf8_lossy(stdout);
    let lines = |s: &str| s.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect::<Vec<_>>();
    let (e, o) = (lines(&err), lines(&out));
    // Python's DeprecationWarning noise from fence-agents is never the answer.
    let useful: Vec<&String> = e
        .iter()
        .filter(|l| !l.contains("DeprecationWarning") && !l.starts_with("from ") && !l.starts_with("import "))
        .collect();
    let pick = useful
        .iter()
        .find(|l| l.contains("ERROR") || l.contains("Failed"))
        .or(useful.last())
        .map(|s| s.to_string())
        .or_else(|| o.last().cloned())
        .unwrap_or_default();
    let mut s: String = pick.chars().take(300).collect();
    if let Some(p) = secret.filter(|p| !p.is_empty()) {
        s = s.replace(p, "***");
    }
    s
}
