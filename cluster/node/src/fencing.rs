//! Serves the engine's `RequestFence`: runs the target node's fence method until it is
//! confirmed, retrying with backoff and reporting every failure, and answers with
//! `FenceConfirmed`. A fence that cannot succeed (no method, a permanent error) is reported
//! and the takeover keeps waiting: a group is never taken over from an unfenced node.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_engine::{Event, NodeId};
use tokio::sync::mpsc;

use crate::api::pb;
use crate::fence::{FenceRoute, Fencer, FencerConfigError, RetryPolicy, fence_route};
use crate::plan::Plan;
use crate::runtime::{AgentEvent, EventKind, Input};

/// Runs fence requests, at most one per target node at a time.
#[derive(Clone)]
pub struct FenceService {
    fencer: Arc<Fencer>,
    plan: Arc<Plan>,
    in_flight: Arc<Mutex<BTreeSet<NodeId>>>,
    tx: mpsc::UnboundedSender<Input>,
    /// Nodes that are `lease-watchdog-only`: their fence is their own host lease expiring.
    lease_only: Arc<BTreeSet<NodeId>>,
    /// Whether this node has quorum now (membership's view).
    quorum: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for FenceService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FenceService").field("in_flight", &self.in_flight).finish_non_exhaustive()
    }
}

impl FenceService {
    pub(crate) fn new(
        config: &tandem_config::ClusterConfig,
        plan: &Arc<Plan>,
        tx: mpsc::UnboundedSender<Input>,
        quorum: Arc<dyn Fn() -> bool + Send + Sync>,
        host_cluster: Option<Arc<dyn crate::fence::HostClusterFencing>>,
    ) -> Result<Self, FencerConfigError> {
        let fencer = match host_cluster {
            Some(host) => Fencer::with_host_cluster(config, host)?,
            None => Fencer::from_config(config)?,
        };
        Ok(FenceService {
            fencer: Arc::new(fencer),
            plan: plan.clone(),
            in_flight: Arc::default(),
            tx,
            quorum,
            lease_only: Arc::new(
                config
                    .nodes
                    .iter()
                    .filter(|n| fence_route(n) == FenceRoute::LeaseExpiry)
                    .map(|n| NodeId(n.id))
                    .collect(),
            ),
        })
    }

    /// Whether `node`'s fence is its host lease expiring (`lease-watchdog-only`): the lease
    /// layer's `PeerFenced` then confirms it.
    pub(crate) fn confirmed_by_lease_expiry(&self, node: NodeId) -> bool {
        self.lease_only.contains(&node)
    }

    fn publish(tx: &mpsc::UnboundedSender<Input>, message: String) {
        Self::publish_result(tx, message, None);
    }

    fn publish_result(tx: &mpsc::UnboundedSender<Input>, message: String, result: Option<(String, bool)>) {
        let detail = result.map(|(node, fenced)| {
            pb::event::Kind::FenceResult(pb::FenceResult { node, fenced, message: message.clone() })
        });
        let _ = tx.send(Input::Publish(AgentEvent {
            at_ms: 0,
            group: None,
            resource: None,
            kind: EventKind::Fence,
            message,
            detail,
        }));
    }

    /// Fences `node` (in the background) and reports `FenceConfirmed` once it is.
    pub(crate) fn request(&self, node: NodeId) {
        if self.confirmed_by_lease_expiry(node) {
            let name = self.plan.name_of(node);
            Self::publish(&self.tx, format!("{name} is lease-watchdog-only: waiting for its host lease to expire"));
            return;
        }
        if !self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(node) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let name = this.plan.name_of(node);
            let tx = this.tx.clone();
            let policy = RetryPolicy::default();
            let mut attempt = 0u32;
            loop {
                // Only a quorate node fences, and only a node that is still lost: checked
                // before every attempt, since a retry may come long after the request.
                while !(this.quorum)() {
                    if this.abandoned(node) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if this.abandoned(node) {
                    Self::publish(&tx, format!("fencing {name} abandoned: it is reachable again"));
                    break;
                }
                attempt += 1;
                match this.fencer.fence(node).await {
                    Ok(report) => {
                        Self::publish_result(
                            &tx,
                            format!("{name} fenced by {:?} in {} ms", report.method, report.elapsed.as_millis()),
                            Some((name.clone(), true)),
                        );
                        let _ = tx.send(Input::Engine(Event::FenceConfirmed(node)));
                        break;
                    }
                    Err(e) if e.is_permanent() => {
                        Self::publish_result(
                            &tx,
                            format!(
                                "fencing {name} failed: {}; not retrying: an operator must fix the fence method or \
                                 fence the node by hand; its groups stay where they are",
                                e.chain()
                            ),
                            Some((name.clone(), false)),
                        );
                        break;
                    }
                    Err(e) => {
                        let pause = policy.pause_after(attempt);
                        Self::publish_result(
                            &tx,
                            format!(
                                "fencing {name} failed (attempt {attempt}): {}; retrying in {} ms",
                                e.chain(),
                                pause.as_millis()
                            ),
                            Some((name.clone(), false)),
                        );
                        tokio::time::sleep(pause).await;
                    }
                }
            }
            this.in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&node);
        });
    }

    fn abandoned(&self, node: NodeId) -> bool {
        !self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).contains(&node)
    }

    /// The node is reachable again: a fence still in progress for it must not go on.
    pub(crate) fn abandon(&self, node: NodeId) {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&node);
    }
}
