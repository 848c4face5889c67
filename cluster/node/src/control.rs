//! The runtime behind the gRPC API: [`AgentControl`] implements [`Control`] over a running
//! agent's [`AgentHandle`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tandem_engine::{GroupState, NodeId, ResourceState};
use tandem_membership::{LinkStatus, PeerStatus};
use tandem_monitors::scheduler::MonitorState;
use tokio::sync::{broadcast, mpsc};

use crate::api::{BoxFuture, Control, ControlError, OperatorAck, OperatorRequest, convert, pb};
use crate::plan::Plan;
use crate::runtime::{AgentEvent, AgentHandle, AgentStatus, RequestError};

/// How long PrepareShutdown waits for the groups to leave this node.
pub const PREPARE_SHUTDOWN_LIMIT: Duration = Duration::from_secs(600);
/// How long PrepareShutdown waits, once a group stopped here, to see it running on a peer
/// before it reports the group done anyway (a peer that cannot take it must not hold the
/// node's shutdown up: the group stays stopped, as it would after the node powers off).
pub const HANDOVER_GRACE: Duration = Duration::from_secs(15);

/// The API's view of a running agent.
#[derive(Debug, Clone)]
pub struct AgentControl {
    handle: AgentHandle,
    plan: Arc<Plan>,
    events: broadcast::Sender<pb::Event>,
    seq: Arc<AtomicU64>,
}

impl AgentControl {
    /// Wraps a running agent; starts the task that turns its events into API events.
    pub fn new(handle: AgentHandle, plan: Arc<Plan>) -> Self {
        let (events, _) = broadcast::channel(1024);
        let mut rx = handle.subscribe();
        let tx = events.clone();
        let seq = Arc::new(AtomicU64::new(0));
        let next = seq.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let _ = tx.send(convert::event(next.fetch_add(1, Ordering::Relaxed) + 1, event_kind(&ev)));
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx.send(crate::api::lagged_event(n));
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        AgentControl { handle, plan, events, seq }
    }
}

fn event_kind(ev: &AgentEvent) -> pb::event::Kind {
    if let Some(detail) = &ev.detail {
        return detail.clone();
    }
    let text = match &ev.group {
        Some(g) if !ev.message.contains(g.as_str()) => format!("{g}: {}", ev.message),
        _ => ev.message.clone(),
    };
    pb::event::Kind::Notice(pb::Notice { notice: Some(pb::notice::Notice::Text(text)) })
}

fn control_error(e: RequestError) -> ControlError {
    match e {
        RequestError::UnknownGroup(g) => ControlError::UnknownGroup(g),
        RequestError::UnknownNode(n) => ControlError::UnknownNode(n),
        RequestError::ShuttingDown => ControlError::ShuttingDown,
        RequestError::State(why) => ControlError::Internal(why),
        RequestError::NoMoveTarget(why) => ControlError::NotPossible(why),
    }
}

fn status(plan: &Plan, st: &AgentStatus) -> pb::GuestStatus {
    let name = |n: NodeId| plan.name_of(n);
    let mut out = convert::cluster_status(&st.cluster, &name);
    for g in &mut out.groups {
        g.fencing_token = st.tokens.get(&tandem_engine::GroupId(g.name.clone())).copied();
    }
    out.nodes = plan
        .names
        .iter()
        .map(|(id, n)| {
            let peer = st.peers.iter().find(|p| p.node.0 == id.0);
            let local = *id == plan.me;
            let state = match peer.map(|p| p.status) {
                _ if local => pb::NodeState::Up,
                Some(PeerStatus::Up) => pb::NodeState::Up,
                Some(PeerStatus::Partitioned | PeerStatus::Lost) => pb::NodeState::Down,
                Some(PeerStatus::Unknown) | None => pb::NodeState::Unspecified,
            };
            let links = peer
                .map(|p| {
                    p.links
                        .iter()
                        .zip(&st.links)
                        .map(|(l, name)| pb::LinkStatus {
                            name: name.clone(),
                            state: match l {
                                LinkStatus::Up => pb::LinkState::Up,
                                LinkStatus::Down => pb::LinkState::Down,
                                LinkStatus::Unknown => pb::LinkState::Unspecified,
                            } as i32,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let (standby, standby_mode) = if local {
                (st.cluster.standby.is_some(), convert::standby_mode(st.cluster.standby))
            } else {
                (st.cluster.peers_in_standby.contains(id), pb::StandbyMode::Unspecified)
            };
            pb::NodeStatus {
                name: n.clone(),
                id: id.0,
                state: state as i32,
                local,
                links,
                standby,
                standby_mode: standby_mode as i32,
            }
        })
        .collect();
    out.lease = Some(pb::HostLeaseStatus {
        host_id: plan.me.0,
        valid: st.lease_valid_ms.is_some_and(|ms| ms > 0),
        valid_for_ms: st.lease_valid_ms.unwrap_or(0),
    });
    for g in &mut out.groups {
        let suspended = g.monitoring_suspended;
        let engine_group = st.cluster.groups.iter().find(|e| e.id.0 == g.name);
        let own_restarts = |name: &str| {
            engine_group.and_then(|e| e.monitor_restarts.iter().find(|(m, _)| m == name)).map_or(0, |(_, n)| *n)
        };
        g.monitors = st
            .monitors
            .iter()
            .filter(|m| m.group == g.name)
            .map(|m| pb::MonitorStatus {
                name: m.name.clone(),
                resource: m.resource.clone(),
                state: match m.state {
                    _ if suspended => pb::MonitorState::Suspended,
                    MonitorState::Pending => pb::MonitorState::Idle,
                    MonitorState::Ok => pb::MonitorState::Active,
                    MonitorState::Failed(_) => pb::MonitorState::Failed,
                } as i32,
                last_result: m.last.as_ref().map(|(status, reason)| pb::ProbeResult {
                    status: probe_status(*status) as i32,
                    reason: reason.clone(),
                    ..Default::default()
                }),
                consecutive_failures: m.consecutive_failures,
                last_probe_ms_ago: 0,
                restarts: if m.builtin { 0 } else { own_restarts(&m.name) },
            })
            .collect();
    }
    out
}

fn probe_status(s: tandem_monitors::Status) -> pb::ProbeStatus {
    match s {
        tandem_monitors::Status::Ok => pb::ProbeStatus::Ok,
        tandem_monitors::Status::Warning => pb::ProbeStatus::Warning,
        tandem_monitors::Status::Critical => pb::ProbeStatus::Critical,
        tandem_monitors::Status::Unknown => pb::ProbeStatus::Unknown,
    }
}

/// Groups that still have something on this node, with what is left.
fn here(plan: &Plan, st: &AgentStatus) -> Vec<(String, String)> {
    st.cluster
        .groups
        .iter()
        .filter_map(|g| {
            let running: Vec<&str> =
                g.resources.iter().filter(|r| r.state != ResourceState::Stopped).map(|r| r.id.0.as_str()).collect();
            let located = g.location == Some(plan.me) && !matches!(g.state, GroupState::Stopped | GroupState::Blocked);
            (!running.is_empty() || located).then(|| (g.id.0.clone(), running.join(", ")))
        })
        .collect()
}

impl Control for AgentControl {
    fn status(&self) -> BoxFuture<'_, Result<pb::GuestStatus, ControlError>> {
        Box::pin(async move {
            let st = self.handle.status().await.map_err(control_error)?;
            Ok(status(&self.plan, &st))
        })
    }

    fn operator(&self, request: OperatorRequest) -> BoxFuture<'_, Result<OperatorAck, ControlError>> {
        Box::pin(async move {
            let seq = self.handle.operator(request).await.map_err(control_error)?;
            Ok(OperatorAck { seq })
        })
    }

    fn deliver(&self, seq: u64, request: OperatorRequest) -> BoxFuture<'_, Result<(), ControlError>> {
        Box::pin(async move { self.handle.deliver(seq, request).map_err(control_error) })
    }

    fn prepare_shutdown(&self) -> BoxFuture<'_, Result<mpsc::Receiver<pb::ShutdownProgress>, ControlError>> {
        Box::pin(async move {
            let before = self.handle.status().await.map_err(control_error)?;
            self.handle.drain().map_err(control_error)?;
            let (tx, rx) = mpsc::channel(64);
            let (handle, plan) = (self.handle.clone(), self.plan.clone());
            tokio::spawn(async move {
                let mut pending = here(&plan, &before);
                for (g, _) in &pending {
                    let _ = tx
                        .send(progress_group(
                            g,
                            pb::ShutdownStep::Started,
                            "stopping here; a peer takes it over if one can",
                        ))
                        .await;
                }
                let start = tokio::time::Instant::now();
                // Groups stopped here, waiting to be seen running on a peer (or for the
                // handover grace to pass): "moved" means running there, not merely gone.
                let mut handing: Vec<(String, tokio::time::Instant)> = Vec::new();
                loop {
                    let Ok(st) = handle.status().await else { break };
                    let now_here = here(&plan, &st);
                    for (g, _) in pending.iter().filter(|(g, _)| !now_here.iter().any(|(h, _)| h == g)) {
                        handing.push((g.clone(), tokio::time::Instant::now()));
                    }
                    pending = now_here;
                    let any_peer_up = st.peers.iter().any(|p| p.status == PeerStatus::Up);
                    let mut still = Vec::new();
                    for (g, since) in handing {
                        let gs = st.cluster.groups.iter().find(|x| x.id.0 == g);
                        let elsewhere = gs.and_then(|x| match (x.state, x.location) {
                            (GroupState::Started, Some(n)) if n != plan.me => Some(plan.name_of(n)),
                            _ => None,
                        });
                        let msg = match elsewhere {
                            Some(to) => Some((to.clone(), format!("stopped here; now runs on {to}"))),
                            None if !any_peer_up => {
                                Some((String::new(), "stopped here; no peer is up to take it over".to_string()))
                            }
                            None if since.elapsed() >= HANDOVER_GRACE => Some((
                                String::new(),
                                format!("stopped here; no peer runs it after {} s", HANDOVER_GRACE.as_secs()),
                            )),
                            None => None,
                        };
                        match msg {
                            Some((to, text)) => {
                                let mut p = progress_group(&g, pb::ShutdownStep::Done, &text);
                                if let Some(pb::shutdown_progress::Progress::Group(x)) = &mut p.progress {
                                    x.to = to;
                                }
                                let _ = tx.send(p).await;
                            }
                            None => still.push((g, since)),
                        }
                    }
                    handing = still;
                    if (pending.is_empty() && handing.is_empty()) || start.elapsed() > PREPARE_SHUTDOWN_LIMIT {
                        let blockers: Vec<String> =
                            pending.iter().map(|(g, r)| format!("{g}: still running here: {r}")).collect();
                        let done = pb::ShutdownDone { safe_to_power_off: blockers.is_empty(), blockers };
                        let _ = tx
                            .send(pb::ShutdownProgress { progress: Some(pb::shutdown_progress::Progress::Done(done)) })
                            .await;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
            Ok(rx)
        })
    }

    fn set_standby(&self, mode: Option<tandem_engine::StandbyMode>) -> BoxFuture<'_, Result<(), ControlError>> {
        Box::pin(async move { self.handle.set_standby(mode).await.map_err(control_error) })
    }

    fn subscribe(&self) -> broadcast::Receiver<pb::Event> {
        self.events.subscribe()
    }

    fn publish(&self, kind: pb::event::Kind) {
        let _ = self.events.send(convert::event(self.seq.fetch_add(1, Ordering::Relaxed) + 1, kind));
    }
}

fn progress_group(group: &str, step: pb::ShutdownStep, message: &str) -> pb::ShutdownProgress {
    pb::ShutdownProgress {
        progress: Some(pb::shutdown_progress::Progress::Group(pb::ShutdownGroupProgress {
            group: group.to_string(),
            action: pb::ShutdownAction::Move as i32,
            to: String::new(),
            step: step as i32,
            message: message.to_string(),
        })),
    }
}
