//! Carries out the engine's resource commands, one operation per resource at a time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tandem_engine::{Event, GroupId, ResourceId};
use tokio::sync::{Mutex, mpsc};

use super::{AgentEvent, EventKind, Input};
use crate::resources::{HandoverTarget, Health, Resource, StartContext, StopContext, StopOutcome};

#[derive(Debug)]
struct Slot {
    resource: Arc<dyn Resource>,
    /// One operation at a time per resource: the engine never asks for two, but a forced
    /// stop may arrive while a start is still running; it waits here after the group's
    /// processes were killed (which ends the start quickly).
    busy: Mutex<()>,
    /// The token the resource was last started or adopted under (for its stop).
    token: std::sync::atomic::AtomicU64,
}

/// Every resource of every group on this node.
#[derive(Clone)]
pub struct ResourceTable {
    slots: Arc<BTreeMap<(GroupId, ResourceId), Arc<Slot>>>,
    cgroups: Arc<BTreeMap<GroupId, PathBuf>>,
    started: std::time::Instant,
    /// Whether this node's host lease is valid right now (a fresh clock reading).
    lease_valid: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for ResourceTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceTable")
            .field("slots", &self.slots)
            .field("cgroups", &self.cgroups)
            .finish_non_exhaustive()
    }
}

impl ResourceTable {
    /// A table of built resources and the cgroup of each group (where there is one).
    pub fn new(
        resources: Vec<(GroupId, ResourceId, Arc<dyn Resource>)>,
        cgroups: BTreeMap<GroupId, PathBuf>,
        lease_valid: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Self {
        let slots = resources
            .into_iter()
            .map(|(g, r, resource)| {
                ((g, r), Arc::new(Slot { resource, busy: Mutex::new(()), token: Default::default() }))
            })
            .collect();
        ResourceTable {
            slots: Arc::new(slots),
            cgroups: Arc::new(cgroups),
            started: std::time::Instant::now(),
            lease_valid,
        }
    }

    /// Tells the resource it was adopted (see [`crate::resources::Resource::adopted`]).
    pub(crate) fn adopted(&self, group: &GroupId, resource: &ResourceId, token: u64) {
        if let Some(slot) = self.slot(group, resource) {
            slot.token.store(token, std::sync::atomic::Ordering::SeqCst);
            slot.resource.adopted();
        }
    }

    fn slot(&self, group: &GroupId, resource: &ResourceId) -> Option<Arc<Slot>> {
        self.slots.get(&(group.clone(), resource.clone())).cloned()
    }

    fn report(&self, tx: &mpsc::UnboundedSender<Input>, group: &GroupId, resource: &ResourceId, message: String) {
        let _ = tx.send(Input::Publish(AgentEvent {
            at_ms: self.started.elapsed().as_millis() as u64,
            group: Some(group.0.clone()),
            resource: Some(resource.0.clone()),
            kind: EventKind::Resource,
            message,
            detail: None,
        }));
    }

    /// Startup probe: is the resource already running here?
    pub(crate) fn probe(&self, group: &GroupId, resource: &ResourceId, tx: mpsc::UnboundedSender<Input>) {
        let Some(slot) = self.slot(group, resource) else { return };
        let (group, resource, this) = (group.clone(), resource.clone(), self.clone());
        tokio::spawn(async move {
            let _one = slot.busy.lock().await;
            let health = guarded(slot.resource.check()).await.unwrap_or_else(Health::Failed);
            let running = match &health {
                Health::Running => true,
                Health::Stopped | Health::StoppedOutside(_) => false,
                // Something is there but unhealthy: count it as running so that it is
                // stopped before anything starts, never left behind.
                Health::Failed(why) => {
                    this.report(&tx, &group, &resource, format!("startup probe of {group}/{resource}: {why}"));
                    true
                }
            };
            let _ = tx.send(Input::Engine(Event::ProbeResult { group, resource, running }));
        });
    }

    /// Starts a resource under `token`; `migrated_in`: resume a state a handover moved here.
    pub(crate) fn start(
        &self,
        group: &GroupId,
        resource: &ResourceId,
        token: u64,
        migrated_in: bool,
        tx: mpsc::UnboundedSender<Input>,
    ) {
        let Some(slot) = self.slot(group, resource) else { return };
        let (group, resource, this) = (group.clone(), resource.clone(), self.clone());
        tokio::spawn(async move {
            let _one = slot.busy.lock().await;
            // A process that was paused (SIGSTOP, a stalled VM) may run this long after the
            // engine decided: check the lease on a fresh clock reading right before acting.
            if !(this.lease_valid)() {
                this.report(
                    &tx,
                    &group,
                    &resource,
                    format!("not starting {group}/{resource}: this node's host lease is no longer valid"),
                );
                let _ = tx.send(Input::Engine(Event::ResourceStartFailed { group, resource }));
                return;
            }
            slot.token.store(token, std::sync::atomic::Ordering::SeqCst);
            let ctx = StartContext { group: group.0.clone(), resource: resource.0.clone(), token, migrated_in };
            let ev = match guarded(slot.resource.start(&ctx)).await.unwrap_or_else(|p| Err(panicked("start", &ctx, p)))
            {
                Ok(()) => Event::ResourceStarted { group, resource },
                Err(e) => {
                    this.report(&tx, &group, &resource, e.to_string());
                    Event::ResourceStartFailed { group, resource }
                }
            };
            let _ = tx.send(Input::Engine(ev));
        });
    }

    /// Stops a resource; `force` kills the group's processes first. `handover`: the stop is
    /// a planned handover to that node (name and id), which the resource may migrate to.
    pub(crate) fn stop(
        &self,
        group: &GroupId,
        resource: &ResourceId,
        force: bool,
        handover: Option<(HandoverTarget, tandem_engine::NodeId)>,
        tx: mpsc::UnboundedSender<Input>,
    ) {
        let Some(slot) = self.slot(group, resource) else { return };
        if force {
            self.kill_group(group);
        }
        let (group, resource, this) = (group.clone(), resource.clone(), self.clone());
        tokio::spawn(async move {
            let _one = slot.busy.lock().await;
            let (target, to) = match handover {
                Some((t, id)) => (Some(t), Some(id)),
                None => (None, None),
            };
            let ctx = StopContext {
                group: group.0.clone(),
                resource: resource.0.clone(),
                force,
                token: slot.token.load(std::sync::atomic::Ordering::SeqCst),
                handover: target,
            };
            let outcome = guarded(slot.resource.stop_for(&ctx))
                .await
                .unwrap_or_else(|p| Err(panicked("stop", &StartContext::new(&*group.0, &*resource.0, 0), p)));
            let ev = match (outcome, to, &ctx.handover) {
                (Ok(StopOutcome::Migrated), Some(to), Some(t)) => {
                    this.report(&tx, &group, &resource, format!("{group}/{resource} live-migrated to {}", t.node));
                    Event::ResourceMigrated { group, resource, to }
                }
                (Ok(_), _, _) => Event::ResourceStopped { group, resource },
                (Err(e), _, _) => {
                    this.report(&tx, &group, &resource, e.to_string());
                    Event::ResourceStopFailed { group, resource }
                }
            };
            let _ = tx.send(Input::Engine(ev));
        });
    }

    /// Kills every process of the group at once (its cgroup).
    pub(crate) fn kill_group(&self, group: &GroupId) {
        if let Some(cg) = self.cgroups.get(group) {
            if let Err(e) = tandem_lease::cgroup::kill_path(cg) {
                tracing::error!(target: "tandem_node", "cannot kill the processes of {group} in {}: {e}", cg.display());
            }
        }
    }

    /// Kills every process of every group (self-fencing).
    pub(crate) fn kill_all(&self) {
        for g in self.cgroups.keys() {
            self.kill_group(g);
        }
    }
}

/// Runs a resource operation so that a panic in it becomes an answer: the engine must
/// always hear back, or the resource would stay "starting" or "stopping" forever.
async fn guarded<T>(fut: impl std::future::Future<Output = T>) -> Result<T, String> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(fut).catch_unwind().await.map_err(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        format!("internal error (panic: {what})")
    })
}

fn panicked(op: &'static str, ctx: &StartContext, why: String) -> crate::resources::ResourceError {
    crate::resources::ResourceError::Failed { op, resource: format!("{}/{}", ctx.group, ctx.resource), reason: why }
}
