//! Runs the monitors of the resources started on this node and turns confirmed failures into
//! engine events.
//!
//! Each resource has its built-in check (the exec `monitor` program, the OCF `monitor`
//! action, the address on its interface…) plus the configured `[[group.monitor]]`s attached
//! to it; a group-level monitor (no `resource`) is attached to the group's last resource,
//! the application that depends on everything else. Monitors run only while their resource
//! runs here, so a failure always refers to the current run.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_engine::{Event, GroupId, ResourceId};
use tandem_monitors::scheduler::{MonitorDef, MonitorEvent, MonitorState, Scheduler, SchedulerConfig};
use tandem_monitors::{CheckFuture, Deadline, FailureClass, Probe, ProbeFailure, ProbeSuccess, RunLimits, Status};
use tokio::sync::mpsc;

use super::{AgentEvent, EventKind, Input};
use crate::api::{OperatorAction, OperatorRequest};
use crate::resources::{Health, Resource};

/// How often a resource's built-in check runs.
pub const BUILTIN_INTERVAL: Duration = Duration::from_secs(5);
/// Time limit of a built-in check run (the resource bounds its own operation too).
pub const BUILTIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Non-OK results in a row before a built-in check confirms a failure.
pub const BUILTIN_RETRIES: u32 = 2;

/// A monitor as `status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorStatus {
    /// The group.
    pub group: String,
    /// The resource it watches.
    pub resource: String,
    /// The monitor's name (`check` for the built-in one).
    pub name: String,
    /// The resource's built-in check (its failures count against the group's restart
    /// limit), not a configured `[[group.monitor]]`.
    pub builtin: bool,
    /// The confirmed state.
    pub state: MonitorState,
    /// The latest result's status and reason, if it ran.
    pub last: Option<(Status, String)>,
    /// Non-OK results in a row.
    pub consecutive_failures: u32,
}

#[derive(Debug)]
struct Configured {
    name: String,
    monitor: tandem_config::Monitor,
}

#[derive(Debug, Default)]
struct Shared {
    /// Scheduled monitor id → its status.
    running: BTreeMap<String, MonitorStatus>,
    generation: u64,
}

/// The monitors of this node.
#[derive(Debug, Clone)]
pub struct MonitorTable {
    scheduler: Arc<Scheduler>,
    configured: Arc<BTreeMap<(GroupId, ResourceId), Vec<Configured>>>,
    builtin: Arc<BTreeMap<(GroupId, ResourceId), Arc<dyn Resource>>>,
    shared: Arc<Mutex<Shared>>,
    tx: mpsc::UnboundedSender<Input>,
}

impl MonitorTable {
    /// Builds the table and starts the task that reports confirmed failures to the engine.
    pub(crate) fn new(
        config: &tandem_config::ClusterConfig,
        builtin: BTreeMap<(GroupId, ResourceId), Arc<dyn Resource>>,
        tx: mpsc::UnboundedSender<Input>,
    ) -> Self {
        let mut configured: BTreeMap<(GroupId, ResourceId), Vec<Configured>> = BTreeMap::new();
        for g in &config.groups {
            let Some(last) = g.resources.last() else { continue };
            for m in &g.monitors {
                let res = m.resource.clone().unwrap_or_else(|| last.name.clone());
                configured
                    .entry((GroupId(g.name.clone()), ResourceId(res)))
                    .or_default()
                    .push(Configured { name: m.name.clone(), monitor: m.clone() });
            }
        }
        let (scheduler, events) = Scheduler::new(SchedulerConfig::default());
        let shared = Arc::new(Mutex::new(Shared::default()));
        tokio::spawn(forward(events, shared.clone(), tx.clone()));
        MonitorTable {
            scheduler: Arc::new(scheduler),
            configured: Arc::new(configured),
            builtin: Arc::new(builtin),
            shared,
            tx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The resource runs here now: start its monitors.
    pub(crate) fn resource_started(&self, group: &GroupId, resource: &ResourceId) {
        let key = (group.clone(), resource.clone());
        // Never two sets of monitors for one resource (an adoption after a start, say).
        if self.lock().running.values().any(|m| m.group == group.0 && m.resource == resource.0) {
            return;
        }
        let mut defs = Vec::new();
        if let Some(r) = self.builtin.get(&key) {
            let probe = BuiltinCheck {
                target: format!("{group}/{resource}"),
                group: group.0.clone(),
                resource: r.clone(),
                tx: self.tx.clone(),
                stop_asked: std::sync::atomic::AtomicBool::new(false),
            };
            defs.push((
                "check".to_string(),
                true,
                Ok::<Box<dyn Probe>, String>(Box::new(probe)),
                RunLimits { timeout: BUILTIN_TIMEOUT, warning: None },
                BUILTIN_INTERVAL,
                BUILTIN_RETRIES,
            ));
        }
        for c in self.configured.get(&key).into_iter().flatten() {
            let spec = c.monitor.probe_spec();
            let probe = tandem_monitors::build_probe(&spec).map_err(|e| e.to_string());
            defs.push((c.name.clone(), false, probe, spec.limits, c.monitor.interval, c.monitor.retries));
        }
        let mut shared = self.lock();
        shared.generation += 1;
        let generation = shared.generation;
        for (name, builtin, probe, limits, interval, retries) in defs {
            let id = format!("{group}/{resource}/{name}#{generation}");
            let status = MonitorStatus {
                group: group.0.clone(),
                resource: resource.0.clone(),
                name: name.clone(),
                builtin,
                state: MonitorState::Pending,
                last: None,
                consecutive_failures: 0,
            };
            match probe {
                Ok(probe) => {
                    match self.scheduler.add(MonitorDef { id: id.clone(), probe, limits, interval, retries }) {
                        Ok(()) => {
                            shared.running.insert(id, status);
                        }
                        Err(e) => tracing::error!(target: "tandem_node", "monitor {id}: {e}"),
                    }
                }
                // The configuration was checked at load time, so this is rare (a password
                // file that vanished); the monitor shows as failed rather than silently absent.
                Err(e) => {
                    tracing::error!(target: "tandem_node", "monitor {id} cannot run: {e}");
                    shared.running.insert(
                        id,
                        MonitorStatus {
                            state: MonitorState::Failed(Status::Unknown),
                            last: Some((Status::Unknown, e)),
                            ..status
                        },
                    );
                }
            }
        }
    }

    /// The resource is being stopped: stop its monitors.
    pub(crate) fn resource_stopping(&self, group: &GroupId, resource: &ResourceId) {
        let ids: Vec<String> = {
            let mut shared = self.lock();
            let ids: Vec<String> = shared
                .running
                .iter()
                .filter(|(_, m)| m.group == group.0 && m.resource == resource.0)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &ids {
                shared.running.remove(id);
            }
            ids
        };
        let scheduler = self.scheduler.clone();
        tokio::spawn(async move {
            for id in ids {
                let _ = scheduler.remove(&id).await;
            }
        });
    }

    /// Every running monitor.
    pub fn status(&self) -> Vec<MonitorStatus> {
        self.lock().running.values().cloned().collect()
    }
}

async fn forward(
    mut events: mpsc::Receiver<MonitorEvent>,
    shared: Arc<Mutex<Shared>>,
    tx: mpsc::UnboundedSender<Input>,
) {
    while let Some(ev) = events.recv().await {
        let failed = {
            let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
            // A monitor removed meanwhile (its resource is stopping) reports nothing.
            let Some(m) = s.running.get_mut(&ev.id) else { continue };
            m.state = ev.state;
            m.last = Some((ev.result.status, ev.result.reason.clone()));
            m.consecutive_failures = ev.consecutive_failures;
            (ev.changed && matches!(ev.state, MonitorState::Failed(_))).then(|| {
                let monitor = (!m.builtin).then(|| m.name.clone());
                (
                    GroupId(m.group.clone()),
                    ResourceId(m.resource.clone()),
                    m.name.clone(),
                    monitor,
                    ev.result.reason.clone(),
                )
            })
        };
        if let Some((group, resource, name, monitor, reason)) = failed {
            tracing::warn!(target: "tandem_node", "monitor {name} of {group}/{resource} failed: {reason}");
            let _ = tx.send(Input::Engine(Event::MonitorFailed { group, resource, monitor }));
        }
    }
}

/// A resource's own check as a probe.
#[derive(Debug)]
struct BuiltinCheck {
    target: String,
    group: String,
    resource: Arc<dyn Resource>,
    tx: mpsc::UnboundedSender<Input>,
    /// The operator stop for a stop from outside was sent (once per monitor run).
    stop_asked: std::sync::atomic::AtomicBool,
}

impl Probe for BuiltinCheck {
    fn kind(&self) -> &'static str {
        "resource"
    }

    fn target(&self) -> String {
        self.target.clone()
    }

    fn check<'a>(&'a self, deadline: Deadline) -> CheckFuture<'a> {
        Box::pin(async move {
            match deadline.run("resource check", self.resource.check()).await? {
                Health::Running => Ok(ProbeSuccess::new(format!("{} is running", self.target))),
                Health::Stopped => {
                    Err(ProbeFailure::critical(FailureClass::NotRunning, format!("{} is not running", self.target)))
                }
                Health::Failed(why) => Err(ProbeFailure::critical(FailureClass::UnexpectedAnswer, why)),
                Health::StoppedOutside(who) => {
                    // Someone stopped it on purpose: stop the group like an operator would
                    // (every node learns it), rather than restarting what was meant to stop.
                    if !self.stop_asked.swap(true, std::sync::atomic::Ordering::SeqCst) {
                        let message = format!(
                            "{} was stopped outside the cluster ({who}); the group is stopped, not recovered \
                             (start it again with tandemctl)",
                            self.target
                        );
                        tracing::warn!(target: "tandem_node", "{message}");
                        let _ = self.tx.send(Input::Publish(AgentEvent {
                            at_ms: 0,
                            group: Some(self.group.clone()),
                            resource: None,
                            kind: EventKind::Operator,
                            message,
                            detail: None,
                        }));
                        let (ack, _) = tokio::sync::oneshot::channel();
                        let request = OperatorRequest { group: self.group.clone(), action: OperatorAction::Stop };
                        let _ = self.tx.send(Input::Operator(request, ack));
                    }
                    Ok(ProbeSuccess::new(format!("{} was stopped outside the cluster ({who})", self.target)))
                }
            }
        })
    }
}
