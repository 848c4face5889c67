//! Planned maintenance of a host (`tandem.v1.HostMaintenance`, docs/host-agent.md).
//!
//! Entering maintenance puts the node in standby (the engine's `StandbyMode`): it takes no
//! VM any more and gives up the ones it runs, without counting anything as a failure:
//! `failover` moves each VM to another host, `shutdown` parks it until maintenance ends.
//! Each VM's stop asks its linked guest agent to move or stop its application groups
//! first, then shuts the VM down (ACPI, destroyed only after its shutdown timeout); the
//! VM resource reports those steps as [`VmActivity`]. `migrate` moves each VM like
//! `failover` but by live migration to the host that takes it over (no guest preparation,
//! no shutdown), falling back to the shutdown where the migration cannot be done; it only
//! switches [`crate::vm::Migration::migrate_on_standby`] on. This module only watches: it turns
//! the activity and the node's status into per-VM progress, and ends with a verdict on
//! whether the host may be powered off, checked against the hypervisor's own view.
//!
//! The progress derivation ([`Tracker`]) is pure, so its rules are unit-tested.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tandem_config::{ApiRole, ApiSettings};
use tandem_engine::StandbyMode;
use tandem_node::agent::{ApiContext, ApiExtension};
use tandem_node::api::{Access, Control, ControlError, ExtraService, pb};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::api::VmFacts;
use crate::hypervisor::{DomainState, Hypervisor};
use crate::vm::{VmActivity, VmStep};

use pb::host_maintenance_client::HostMaintenanceClient;
use pb::host_maintenance_server::{HostMaintenance, HostMaintenanceServer};

/// How often the node's status and the hypervisor are read while a call runs.
const POLL: Duration = Duration::from_millis(250);
/// The longest a call follows a host's maintenance before it ends with what blocks it
/// (the maintenance itself goes on; the call can be made again to follow it).
pub const CALL_LIMIT: Duration = Duration::from_secs(3600);
/// VMs that leave a host in maintenance at once when the request gives no bound.
pub const DEFAULT_PARALLEL: usize = 4;
/// Bound on reaching the host a call is forwarded to.
const FORWARD_CONNECT: Duration = Duration::from_secs(10);

/// What an operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Move every VM to another host.
    Failover,
    /// Shut every VM down and keep it stopped until maintenance ends.
    Shutdown,
    /// Live-migrate each VM to the host that takes it over; where that cannot be done,
    /// as `Failover` (and said so).
    Migrate,
}

impl Policy {
    /// From the API's enum; UNSPECIFIED is `Failover`.
    pub fn from_pb(p: pb::MaintenancePolicy) -> Policy {
        match p {
            pb::MaintenancePolicy::Shutdown => Policy::Shutdown,
            pb::MaintenancePolicy::Migrate => Policy::Migrate,
            pb::MaintenancePolicy::Failover | pb::MaintenancePolicy::Unspecified => Policy::Failover,
        }
    }

    /// The policy's name as operators write it.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Failover => "failover",
            Policy::Shutdown => "shutdown",
            Policy::Migrate => "migrate",
        }
    }
}

/// Whether a group occupies `host`: running, starting or stopping there.
fn occupies(g: &pb::GroupStatus, host: &str) -> bool {
    g.location == host
        && matches!(
            pb::GroupState::try_from(g.state).unwrap_or_default(),
            pb::GroupState::Started | pb::GroupState::Starting | pb::GroupState::Stopping
        )
}

/// Not-running reasons that only say a move is still under way.
fn transitional(r: pb::NotRunningReason) -> bool {
    matches!(
        r,
        pb::NotRunningReason::TakeoverPending
            | pb::NotRunningReason::WaitingForLease
            | pb::NotRunningReason::WaitingForFence
            | pb::NotRunningReason::Probing
            | pb::NotRunningReason::Unspecified
    )
}

/// What was last said about one VM.
#[derive(Debug, Clone, Default)]
struct VmTrack {
    step: Option<pb::MaintenanceStep>,
    detail: String,
    host: String,
    /// How it left this host: `Some(true)` live-migrated, `Some(false)` shut down.
    migrated: Option<bool>,
}

/// Which way the tracker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// EnterMaintenance.
    Enter(Policy),
    /// ExitMaintenance.
    Exit,
}

/// Turns activity and status snapshots into progress messages (pure: time comes in as
/// milliseconds since the call began).
#[derive(Debug)]
pub struct Tracker {
    me: String,
    direction: Direction,
    vms: BTreeMap<String, VmTrack>,
    /// When the host was first seen holding no VM (enter) or every VM settled (exit).
    settled_since: Option<u64>,
}

/// How long, once the host holds no VM, the stream waits for the VMs that left to show up
/// on their new hosts before it ends (their starts elsewhere are reported if they come
/// within it; the verdict does not depend on them).
pub const SETTLE: Duration = Duration::from_secs(30);

impl Tracker {
    /// A tracker for `me`, tracking `vms`: for Enter, the VMs that occupy the host when
    /// maintenance begins; for Exit, the VMs that are parked (not running anywhere).
    pub fn new(me: &str, direction: Direction, vms: impl IntoIterator<Item = String>) -> Tracker {
        Tracker {
            me: me.to_string(),
            direction,
            vms: vms.into_iter().map(|v| (v, VmTrack::default())).collect(),
            settled_since: None,
        }
    }

    /// The VMs tracked.
    pub fn vms(&self) -> impl Iterator<Item = &String> {
        self.vms.keys()
    }

    fn say(
        &mut self,
        vm: &str,
        step: pb::MaintenanceStep,
        host: &str,
        detail: String,
        at_ms: u64,
    ) -> Option<pb::MaintenanceProgress> {
        let t = self.vms.get_mut(vm)?;
        if t.step == Some(step) && t.host == host && t.detail == detail {
            return None;
        }
        *t = VmTrack { step: Some(step), detail: detail.clone(), host: host.to_string(), migrated: t.migrated };
        Some(pb::MaintenanceProgress {
            progress: Some(pb::maintenance_progress::Progress::Vm(pb::MaintenanceVmProgress {
                vm: vm.to_string(),
                step: step as i32,
                host: host.to_string(),
                detail,
                elapsed_ms: at_ms,
            })),
        })
    }

    /// The first messages: each VM pending, and a note where the policy cannot be followed.
    pub fn begin(&mut self, at_ms: u64) -> Vec<pb::MaintenanceProgress> {
        let vms: Vec<String> = self.vms.keys().cloned().collect();
        let mut out = Vec::new();
        for vm in vms {
            let (step, detail) = match self.direction {
                Direction::Enter(Policy::Migrate) => {
                    (pb::MaintenanceStep::Pending, "will leave by live migration (migrate policy)".to_string())
                }
                Direction::Enter(p) => (pb::MaintenanceStep::Pending, format!("will leave ({} policy)", p.name())),
                Direction::Exit => (pb::MaintenanceStep::Pending, "parked; starts again".to_string()),
            };
            out.extend(self.say(&vm, step, &self.me.clone(), detail, at_ms));
        }
        out
    }

    /// A step of a VM's stop on this host.
    pub fn activity(&mut self, a: &VmActivity, at_ms: u64) -> Option<pb::MaintenanceProgress> {
        let step = match a.step {
            VmStep::Queued => pb::MaintenanceStep::Pending,
            VmStep::GuestPreparing => pb::MaintenanceStep::GuestPreparing,
            VmStep::GuestReady => pb::MaintenanceStep::GuestReady,
            VmStep::GuestNotReady => pb::MaintenanceStep::GuestNotReady,
            VmStep::NoGuest => pb::MaintenanceStep::NoGuest,
            VmStep::ShuttingDown => pb::MaintenanceStep::ShuttingDown,
            VmStep::Destroyed => pb::MaintenanceStep::Destroyed,
            VmStep::Stopped => pb::MaintenanceStep::Stopped,
            VmStep::Migrating => pb::MaintenanceStep::Migrating,
            VmStep::Migrated => pb::MaintenanceStep::Migrated,
            VmStep::MigrationFailed => pb::MaintenanceStep::Note,
        };
        if let Some(t) = self.vms.get_mut(&a.group) {
            match a.step {
                VmStep::Migrated => t.migrated = Some(true),
                VmStep::ShuttingDown | VmStep::Destroyed | VmStep::Stopped => t.migrated = Some(false),
                _ => {}
            }
        }
        let me = self.me.clone();
        self.say(&a.group, step, &me, a.detail.clone(), at_ms)
    }

    /// What the node's status shows about the tracked VMs now.
    pub fn status(&mut self, st: &pb::GuestStatus, at_ms: u64) -> Vec<pb::MaintenanceProgress> {
        let mut out = Vec::new();
        for g in &st.groups {
            if !self.vms.contains_key(&g.name) || occupies(g, &self.me) && self.direction != Direction::Exit {
                continue;
            }
            let state = pb::GroupState::try_from(g.state).unwrap_or_default();
            // A takeover under way is not a verdict: wait for where it ends.
            if g.not_running.as_ref().is_some_and(|n| transitional(n.reason())) {
                continue;
            }
            let text = g.not_running.as_ref().map(|n| crate::api::not_running_text(&g.name, n)).unwrap_or_default();
            let how = match self.vms.get(&g.name).and_then(|t| t.migrated) {
                Some(true) => "live-migrated: the same guest, resumed there".to_string(),
                Some(false) => "shut down here, started afresh there".to_string(),
                None => String::new(),
            };
            let said = match (self.direction, state) {
                (Direction::Enter(_), pb::GroupState::Started) => {
                    Some((pb::MaintenanceStep::RunningElsewhere, g.location.clone(), how))
                }
                (Direction::Enter(Policy::Shutdown), pb::GroupState::Stopped) => {
                    Some((pb::MaintenanceStep::Parked, String::new(), "stays stopped until maintenance ends".into()))
                }
                (Direction::Enter(_), pb::GroupState::Blocked | pb::GroupState::Failed | pb::GroupState::Stopped) => {
                    Some((pb::MaintenanceStep::Blocked, String::new(), text))
                }
                (Direction::Exit, pb::GroupState::Started) => {
                    Some((pb::MaintenanceStep::Returned, g.location.clone(), String::new()))
                }
                (Direction::Exit, pb::GroupState::Blocked | pb::GroupState::Failed) => {
                    Some((pb::MaintenanceStep::Blocked, String::new(), text))
                }
                _ => None,
            };
            if let Some((step, host, detail)) = said {
                out.extend(self.say(&g.name, step, &host, detail, at_ms));
            }
        }
        out
    }

    /// The VMs that still occupy this host, with their state, per the node's status.
    pub fn still_here(&self, st: &pb::GuestStatus) -> Vec<String> {
        st.groups
            .iter()
            .filter(|g| occupies(g, &self.me))
            .map(|g| {
                let state = pb::GroupState::try_from(g.state).unwrap_or_default();
                let last = self.vms.get(&g.name).and_then(|t| t.step).map(|s| {
                    format!(" (last step: {})", s.as_str_name().trim_start_matches("MAINTENANCE_STEP_").to_lowercase())
                });
                let state = state.as_str_name().trim_start_matches("GROUP_STATE_").to_lowercase();
                format!("{}: {state} here{}", g.name, last.unwrap_or_default())
            })
            .collect()
    }

    /// Whether every tracked VM reached a final step for this direction.
    fn all_settled(&self) -> bool {
        self.vms.values().all(|t| match self.direction {
            Direction::Enter(_) => matches!(
                t.step,
                Some(
                    pb::MaintenanceStep::RunningElsewhere | pb::MaintenanceStep::Parked | pb::MaintenanceStep::Blocked
                )
            ),
            Direction::Exit => matches!(t.step, Some(pb::MaintenanceStep::Returned | pb::MaintenanceStep::Blocked)),
        })
    }

    /// The final message once the call is over: for Enter, once the host holds no VM
    /// (per the status and per `active_domains`, the HA VMs the hypervisor reports active
    /// here) and every VM settled or [`SETTLE`] passed; for Exit, once every parked VM runs
    /// again or is blocked. `None` while it is not over.
    pub fn done(&mut self, st: &pb::GuestStatus, active_domains: &[String], at_ms: u64) -> Option<pb::MaintenanceDone> {
        let host = self.me.clone();
        match self.direction {
            Direction::Enter(_) => {
                let here = self.still_here(st);
                if !here.is_empty() || !active_domains.is_empty() {
                    self.settled_since = None;
                    return None;
                }
                let since = *self.settled_since.get_or_insert(at_ms);
                if !self.all_settled() && at_ms.saturating_sub(since) < SETTLE.as_millis() as u64 {
                    return None;
                }
                let nowhere: Vec<String> = self
                    .vms
                    .iter()
                    .filter(|(_, t)| t.step == Some(pb::MaintenanceStep::Blocked))
                    .map(|(vm, t)| format!("{vm} ({})", t.detail))
                    .collect();
                let mut summary = format!("host {host} holds no running HA VM and may be powered off");
                if !nowhere.is_empty() {
                    summary.push_str(&format!("; runs nowhere now: {}", nowhere.join(", ")));
                }
                Some(pb::MaintenanceDone { summary, host, complete: true, blockers: Vec::new(), elapsed_ms: at_ms })
            }
            Direction::Exit => {
                if !self.all_settled() {
                    return None;
                }
                let blocked: Vec<String> = self
                    .vms
                    .iter()
                    .filter(|(_, t)| t.step == Some(pb::MaintenanceStep::Blocked))
                    .map(|(vm, t)| format!("{vm}: {}", t.detail))
                    .collect();
                let summary = if blocked.is_empty() {
                    format!("host {host} is out of maintenance; every VM it parked runs again")
                } else {
                    format!("host {host} is out of maintenance; {} parked VM(s) cannot run", blocked.len())
                };
                Some(pb::MaintenanceDone {
                    host,
                    complete: blocked.is_empty(),
                    blockers: blocked,
                    summary,
                    elapsed_ms: at_ms,
                })
            }
        }
    }

    /// The final message when the call gives up after its limit.
    pub fn gave_up(&self, st: &pb::GuestStatus, active_domains: &[String], at_ms: u64) -> pb::MaintenanceDone {
        let mut blockers = self.still_here(st);
        for d in active_domains {
            if !blockers.iter().any(|b| b.starts_with(&format!("{d}:"))) {
                blockers.push(format!("{d}: still active on the hypervisor"));
            }
        }
        if let Direction::Exit = self.direction {
            for (vm, t) in &self.vms {
                if !matches!(t.step, Some(pb::MaintenanceStep::Returned)) {
                    blockers.push(format!("{vm}: not running yet"));
                }
            }
        }
        pb::MaintenanceDone {
            host: self.me.clone(),
            complete: false,
            summary: format!("host {}: maintenance step not complete; see blockers", self.me),
            blockers,
            elapsed_ms: at_ms,
        }
    }
}

// ---------------------------------------------------------------- the service

/// What the maintenance service needs besides the running node.
#[derive(Debug, Clone)]
pub struct MaintenanceSetup {
    /// Every host's API address, by name (calls for another host are forwarded there).
    pub hosts: BTreeMap<String, Option<SocketAddr>>,
    /// This agent's API settings (its TLS identity towards peers).
    pub api: ApiSettings,
    /// This host's hypervisor: the final check that no HA VM is active here.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// The HA VMs.
    pub vms: Vec<VmFacts>,
    /// The steps of every VM stop on this host ([`crate::vm::HostResources::activity`]).
    pub activity: broadcast::Sender<VmActivity>,
    /// The bound of VM stops at once ([`crate::vm::HostResources::stop_gate`]).
    pub gate: crate::vm::StopGate,
    /// Live migration of this host's VMs ([`crate::vm::HostResources::migration`]); `None`:
    /// the `migrate` policy falls back to `failover`.
    pub migration: Option<crate::vm::Migration>,
}

/// The `HostMaintenance` service as an extension of the node API.
pub fn maintenance_api(setup: MaintenanceSetup) -> ApiExtension {
    Arc::new(move |ctx: &ApiContext| {
        let (me, control, setup) = (ctx.plan.my_name.clone(), ctx.control.clone(), setup.clone());
        let service: ExtraService = Box::new(move |routes, access, stop| {
            routes.add_service(HostMaintenanceServer::new(MaintenanceService { me, control, setup, access, stop }));
        });
        service
    })
}

struct MaintenanceService {
    me: String,
    control: Arc<dyn Control>,
    setup: MaintenanceSetup,
    access: Arc<Access>,
    stop: CancellationToken,
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::MaintenanceProgress, Status>> + Send + 'static>>;

fn stream_of(rx: mpsc::Receiver<pb::MaintenanceProgress>) -> ProgressStream {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (Ok(m), rx)) }))
}

impl MaintenanceService {
    /// Forwards the call to the host it names and relays its progress.
    async fn forward(&self, req: pb::MaintenanceRequest, enter: bool) -> Result<ProgressStream, Status> {
        let Some(addr) = self.setup.hosts.get(&req.host) else {
            return Err(Status::not_found(format!(
                "no host named {:?} in this cluster; `tandemctl hosts` lists them",
                req.host
            )));
        };
        let Some(addr) = *addr else {
            return Err(Status::failed_precondition(format!(
                "host {} has no `api` address in the configuration: send the request to its agent directly",
                req.host
            )));
        };
        let channel = tandem_node::api::peer::channel(&req.host, addr, &self.setup.api, FORWARD_CONNECT)
            .await
            .map_err(|e| Status::unavailable(format!("cannot reach host {}'s agent at {addr}: {e}", req.host)))?;
        let mut client = HostMaintenanceClient::new(channel);
        let stream = if enter { client.enter_maintenance(req).await? } else { client.exit_maintenance(req).await? };
        Ok(Box::pin(stream.into_inner()))
    }

    /// The HA VMs the hypervisor reports active (running, paused, shutting down…) here.
    async fn active_here(&self) -> Result<Vec<String>, Status> {
        let domains = self
            .setup
            .hypervisor
            .list_domains()
            .await
            .map_err(|e| Status::unavailable(format!("this host's hypervisor could not list its domains: {e}")))?;
        Ok(domains
            .into_iter()
            .filter(|d| !matches!(d.state, DomainState::Shutoff(_)))
            .filter_map(|d| {
                let uuid = d.uuid.to_string();
                self.setup.vms.iter().find(|v| v.uuid == uuid).map(|v| v.group.clone())
            })
            .collect())
    }

    async fn run(&self, req: pb::MaintenanceRequest, enter: bool) -> Result<ProgressStream, Status> {
        if self.stop.is_cancelled() {
            return Err(ControlError::ShuttingDown.into());
        }
        if req.host.trim().is_empty() {
            return Err(Status::invalid_argument(
                "`host` is empty; give the host's name (`tandemctl hosts` lists them)",
            ));
        }
        if req.host != self.me {
            return self.forward(req, enter).await;
        }
        let policy = Policy::from_pb(req.policy());
        let before = self.control.status().await?;
        let direction = if enter { Direction::Enter(policy) } else { Direction::Exit };
        let tracked: Vec<String> = if enter {
            before.groups.iter().filter(|g| occupies(g, &self.me)).map(|g| g.name.clone()).collect()
        } else {
            // The VMs this host parked: stopped, waiting for it to leave maintenance.
            before
                .groups
                .iter()
                .filter(|g| {
                    g.not_running.as_ref().is_some_and(|n| {
                        n.reason() == pb::NotRunningReason::Parked && (n.node == self.me || n.node.is_empty())
                    })
                })
                .map(|g| g.name.clone())
                .collect()
        };
        let mode = if !enter {
            None
        } else if policy == Policy::Shutdown {
            Some(StandbyMode::Park)
        } else {
            Some(StandbyMode::Move)
        };
        // Subscribe before the standby takes effect: no step is missed.
        let mut activity = self.setup.activity.subscribe();
        if enter {
            let n = if req.parallel == 0 { DEFAULT_PARALLEL } else { req.parallel as usize };
            self.setup.gate.limit(Some(n));
        } else {
            self.setup.gate.limit(None);
        }
        if let Some(m) = &self.setup.migration {
            m.migrate_on_standby(enter && policy == Policy::Migrate);
        }
        self.control.set_standby(mode).await?;
        tracing::info!(target: "tandem_host", host = %self.me, policy = policy.name(), enter,
            "maintenance {}", if enter { "entered" } else { "ended" });

        let (tx, rx) = mpsc::channel(256);
        let mut tracker = Tracker::new(&self.me, direction, tracked);
        let started = Instant::now();
        let at = move || started.elapsed().as_millis() as u64;
        for m in tracker.begin(at()) {
            let _ = tx.send(m).await;
        }
        let this = MaintenanceService {
            me: self.me.clone(),
            control: self.control.clone(),
            setup: self.setup.clone(),
            access: self.access.clone(),
            stop: self.stop.clone(),
        };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            let done = |d: pb::MaintenanceDone| pb::MaintenanceProgress {
                progress: Some(pb::maintenance_progress::Progress::Done(d)),
            };
            let mut last_status: Option<pb::GuestStatus> = None;
            loop {
                tokio::select! {
                    a = activity.recv() => match a {
                        Ok(a) => {
                            if let Some(m) = tracker.activity(&a, at()) && tx.send(m).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => {}
                    },
                    _ = tick.tick() => {}
                    // The caller went away: the maintenance goes on, the watching stops.
                    _ = tx.closed() => return,
                    _ = this.stop.cancelled() => {
                        let st = last_status.clone().unwrap_or_default();
                        let mut d = tracker.gave_up(&st, &[], at());
                        d.summary = format!("host {}: the agent is stopping; the maintenance state is kept", this.me);
                        let _ = tx.send(done(d)).await;
                        return;
                    }
                }
                let over = started.elapsed() >= CALL_LIMIT;
                let st = match this.control.status().await {
                    Ok(st) => st,
                    Err(e) if over => {
                        let mut d = tracker.gave_up(&last_status.clone().unwrap_or_default(), &[], at());
                        d.blockers.push(format!("this host's node status cannot be read: {e}"));
                        let _ = tx.send(done(d)).await;
                        return;
                    }
                    Err(_) => continue,
                };
                for m in tracker.status(&st, at()) {
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
                last_status = Some(st.clone());
                let active = match this.active_here().await {
                    Ok(a) => a,
                    Err(e) if over => {
                        let mut d = tracker.gave_up(&st, &[], at());
                        d.blockers.push(e.message().to_string());
                        let _ = tx.send(done(d)).await;
                        return;
                    }
                    // The hypervisor's view decides the verdict: without it, no verdict yet.
                    Err(_) => continue,
                };
                let verdict = match tracker.done(&st, &active, at()) {
                    Some(d) => Some(d),
                    None if over => Some(tracker.gave_up(&st, &active, at())),
                    None => None,
                };
                if let Some(d) = verdict {
                    tracing::info!(target: "tandem_host", host = %this.me, complete = d.complete, "{}", d.summary);
                    let _ = tx.send(done(d)).await;
                    return;
                }
            }
        });
        Ok(stream_of(rx))
    }
}

/// An operator, or a peer host agent forwarding an operator's call (agents authenticate to
/// each other with their own identity, which has the `peer` role).
fn authorize<T>(access: &Access, req: &Request<T>, call: &str) -> Result<(), Status> {
    match access.authorize(req, ApiRole::Operator, call) {
        Ok(_) => Ok(()),
        Err(denied) => access.authorize(req, ApiRole::Peer, call).map(|_| ()).map_err(|_| denied),
    }
}

#[tonic::async_trait]
impl HostMaintenance for MaintenanceService {
    type EnterMaintenanceStream = ProgressStream;
    type ExitMaintenanceStream = ProgressStream;

    async fn enter_maintenance(
        &self,
        req: Request<pb::MaintenanceRequest>,
    ) -> Result<Response<Self::EnterMaintenanceStream>, Status> {
        authorize(&self.access, &req, "EnterMaintenance")?;
        self.run(req.into_inner(), true).await.map(Response::new)
    }

    async fn exit_maintenance(
        &self,
        req: Request<pb::MaintenanceRequest>,
    ) -> Result<Response<Self::ExitMaintenanceStream>, Status> {
        authorize(&self.access, &req, "ExitMaintenance")?;
        self.run(req.into_inner(), false).await.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, state: pb::GroupState, location: &str) -> pb::GroupStatus {
        pb::GroupStatus { name: name.into(), state: state as i32, location: location.into(), ..Default::default() }
    }

    fn status(groups: Vec<pb::GroupStatus>) -> pb::GuestStatus {
        pb::GuestStatus { node: "h1".into(), groups, ..Default::default() }
    }

    fn steps(p: &[pb::MaintenanceProgress]) -> Vec<(String, pb::MaintenanceStep, String)> {
        p.iter()
            .filter_map(|m| match &m.progress {
                Some(pb::maintenance_progress::Progress::Vm(v)) => Some((v.vm.clone(), v.step(), v.host.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn failover_reports_each_step_once_and_ends_when_the_host_is_empty() {
        let mut t = Tracker::new("h1", Direction::Enter(Policy::Failover), ["a".to_string(), "b".to_string()]);
        let begin = t.begin(0);
        assert_eq!(steps(&begin).iter().map(|s| s.1).collect::<Vec<_>>(), [pb::MaintenanceStep::Pending; 2]);
        let a = VmActivity { group: "a".into(), step: VmStep::GuestReady, detail: "1 group moved".into() };
        assert!(t.activity(&a, 5).is_some());
        assert!(t.activity(&a, 6).is_none(), "the same step twice is said once");
        let not_tracked = VmActivity { group: "z".into(), step: VmStep::Stopped, detail: String::new() };
        assert!(t.activity(&not_tracked, 6).is_none());

        let st = status(vec![group("a", pb::GroupState::Started, "h2"), group("b", pb::GroupState::Stopping, "h1")]);
        let p = t.status(&st, 10);
        assert_eq!(steps(&p), [("a".into(), pb::MaintenanceStep::RunningElsewhere, "h2".into())]);
        assert!(t.done(&st, &[], 10).is_none(), "b still stops here");
        assert_eq!(t.still_here(&st), ["b: stopping here (last step: pending)".to_string()]);

        let st = status(vec![group("a", pb::GroupState::Started, "h2"), group("b", pb::GroupState::Started, "h3")]);
        assert!(t.done(&st, &["b".into()], 20).is_none(), "the hypervisor still runs b here");
        t.status(&st, 20);
        let done = t.done(&st, &[], 30).expect("done");
        assert!(done.complete);
        assert_eq!(done.summary, "host h1 holds no running HA VM and may be powered off");
    }

    #[test]
    fn shutdown_parks_and_an_unsettled_vm_delays_the_end_by_settle_at_most() {
        let mut t = Tracker::new("h1", Direction::Enter(Policy::Shutdown), ["a".to_string(), "b".to_string()]);
        t.begin(0);
        let st = status(vec![group("a", pb::GroupState::Stopped, ""), group("b", pb::GroupState::Starting, "h2")]);
        let p = t.status(&st, 10);
        assert_eq!(steps(&p), [("a".into(), pb::MaintenanceStep::Parked, String::new())]);
        assert!(t.done(&st, &[], 10).is_none(), "b has not settled yet");
        let done = t.done(&st, &[], 10 + SETTLE.as_millis() as u64).expect("done after SETTLE");
        assert!(done.complete, "the host is empty: b starting elsewhere does not block power-off");
    }

    #[test]
    fn a_takeover_under_way_is_not_reported_as_blocked() {
        let mut t = Tracker::new("h1", Direction::Enter(Policy::Failover), ["a".to_string()]);
        t.begin(0);
        let mut g = group("a", pb::GroupState::Blocked, "");
        g.not_running = Some(pb::NotRunning {
            reason: pb::NotRunningReason::TakeoverPending as i32,
            node: String::new(),
            detail: vec![],
        });
        assert!(t.status(&status(vec![g]), 5).is_empty());
        let p = t.status(&status(vec![group("a", pb::GroupState::Started, "h2")]), 6);
        assert_eq!(steps(&p), [("a".into(), pb::MaintenanceStep::RunningElsewhere, "h2".into())]);
    }

    #[test]
    fn migrate_reports_how_each_vm_left() {
        let mut t = Tracker::new("h1", Direction::Enter(Policy::Migrate), ["a".to_string(), "b".to_string()]);
        let p = t.begin(0);
        assert_eq!(steps(&p)[0].1, pb::MaintenanceStep::Pending);
        let act = |group: &str, step| VmActivity { group: group.into(), step, detail: String::new() };
        assert_eq!(
            steps(&t.activity(&act("a", VmStep::Migrating), 1).into_iter().collect::<Vec<_>>())[0].1,
            pb::MaintenanceStep::Migrating
        );
        t.activity(&act("a", VmStep::Migrated), 2);
        // b cannot migrate: it is shut down instead, and that is said.
        let note = t.activity(&act("b", VmStep::MigrationFailed), 2).expect("said");
        assert_eq!(steps(&[note])[0].1, pb::MaintenanceStep::Note);
        t.activity(&act("b", VmStep::ShuttingDown), 3);
        t.activity(&act("b", VmStep::Stopped), 4);
        let st = status(vec![group("a", pb::GroupState::Started, "h2"), group("b", pb::GroupState::Started, "h3")]);
        let p = t.status(&st, 5);
        let details: Vec<(String, String)> = p
            .iter()
            .filter_map(|m| match &m.progress {
                Some(pb::maintenance_progress::Progress::Vm(v)) => Some((v.vm.clone(), v.detail.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(details[0], ("a".into(), "live-migrated: the same guest, resumed there".into()));
        assert_eq!(details[1], ("b".into(), "shut down here, started afresh there".into()));
    }

    #[test]
    fn exit_ends_when_every_parked_vm_runs_or_is_blocked() {
        let mut t = Tracker::new("h1", Direction::Exit, ["a".to_string(), "b".to_string()]);
        t.begin(0);
        let st = status(vec![group("a", pb::GroupState::Started, "h1"), group("b", pb::GroupState::Stopped, "")]);
        t.status(&st, 10);
        assert!(t.done(&st, &[], 10).is_none());
        let mut blocked = group("b", pb::GroupState::Blocked, "");
        blocked.not_running = Some(pb::NotRunning {
            reason: pb::NotRunningReason::NoCapacity as i32,
            node: String::new(),
            detail: vec!["h1: needs 4096 MiB, 1024 free".into()],
        });
        let st = status(vec![group("a", pb::GroupState::Started, "h1"), blocked]);
        let p = t.status(&st, 20);
        assert_eq!(steps(&p)[0].1, pb::MaintenanceStep::Blocked);
        let done = t.done(&st, &[], 20).expect("done");
        assert!(!done.complete);
        assert_eq!(done.blockers.len(), 1);
        assert!(done.blockers[0].starts_with("b: "), "{:?}", done.blockers);
    }

    #[test]
    fn giving_up_lists_what_is_still_here() {
        let t = Tracker::new("h1", Direction::Enter(Policy::Failover), ["a".to_string()]);
        let st = status(vec![group("a", pb::GroupState::Stopping, "h1")]);
        let d = t.gave_up(&st, &["a".into(), "x".into()], 99);
        assert!(!d.complete);
        assert_eq!(d.blockers, ["a: stopping here".to_string(), "x: still active on the hypervisor".to_string()]);
    }
}
