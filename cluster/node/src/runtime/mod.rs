//! The runtime: drives one node's failover engine.
//!
//! One task owns the [`Engine`]. Everything else — resource operations, the lease service,
//! membership, monitors, fencing, the API — talks to it through one channel of [`Input`]s,
//! and it executes the engine's [`Command`]s by handing them to those parts. The engine
//! decides; this module only carries out decisions and reports results back as events.

mod exec;
pub mod leases;
mod monitors;
pub mod standby;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_engine::{
    ClusterStatus, Command, Engine, Event, GroupId, NodeId, Notice, OperatorCommand, ResourceId, StandbyMode,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::api::{OperatorAction, OperatorRequest, convert, pb};
use crate::plan::Plan;

pub use exec::ResourceTable;
pub use monitors::MonitorTable;

/// How long an agent that lost its host lease waits for the forced stops of its resources
/// (addresses, mounts) before it exits anyway.
pub const LOST_STOP_LIMIT: Duration = Duration::from_secs(30);

/// How often the engine is ticked.
pub const TICK: Duration = Duration::from_millis(200);

/// At most this many queued engine events go to the engine in one batch
/// (`Engine::handle_batch`): one evaluation for a whole round of lease observations, but
/// never an unbounded wait for the inputs behind them.
const MAX_BATCH: usize = 256;

/// Something that happened, for the event feed and the log.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentEvent {
    /// Milliseconds since the agent started.
    pub at_ms: u64,
    /// The group concerned, if any.
    pub group: Option<String>,
    /// The resource concerned, if any.
    pub resource: Option<String>,
    /// What kind of event.
    pub kind: EventKind,
    /// One line for humans.
    pub message: String,
    /// The structured form for the API's event feed, where there is one (otherwise the
    /// feed carries `message` as a notice).
    pub detail: Option<pb::event::Kind>,
}

/// Kinds of [`AgentEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A resource operation started or finished.
    Resource,
    /// A monitor confirmed a failure or recovered.
    Monitor,
    /// A lease was acquired, released or lost.
    Lease,
    /// A node joined or was lost; quorum changed.
    Membership,
    /// A fence was requested, failed or confirmed.
    Fence,
    /// An operator command was accepted or rejected.
    Operator,
    /// The engine reported something (failover limit…).
    Notice,
}

/// Why an operator request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No such group.
    #[error("no failover group named `{0}`; `tandemctl status` lists the groups")]
    UnknownGroup(String),
    /// No such node.
    #[error("no node named `{0}`; `tandemctl status` lists the nodes")]
    UnknownNode(String),
    /// The agent is stopping.
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// This node's standby could not be persisted: nothing was changed.
    #[error("{0}")]
    State(String),
    /// A move without a target, and no other node can take the group now (says why).
    #[error("{0}")]
    NoMoveTarget(String),
}

/// Inputs to the engine task.
#[derive(Debug)]
pub(crate) enum Input {
    /// An engine event from one of the parts.
    Engine(Event),
    /// An operator command from the API; answered with its sequence number.
    Operator(OperatorRequest, oneshot::Sender<Result<u64, RequestError>>),
    /// An operator command a peer forwarded, with its cluster-wide sequence.
    Delivered(u64, OperatorRequest),
    /// A status request.
    Status(oneshot::Sender<AgentStatus>),
    /// Something to log and publish.
    Publish(AgentEvent),
    /// Stop the agent: stop every group here, release the leases, leave.
    Shutdown(oneshot::Sender<()>),
    /// Move or stop every group away from this node and keep them away (PrepareShutdown);
    /// the agent keeps running.
    Drain,
    /// The host lease could not be renewed in time: nothing may run here any more.
    HostLeaseLost(String),
    /// Enter (`Some`) or leave (`None`) standby: persisted, announced in the heartbeats,
    /// fed to the engine.
    SetStandby(Option<StandbyMode>, oneshot::Sender<Result<(), RequestError>>),
    /// Set (`Some(reason)`) or lift a local veto on a group.
    SetVeto(String, Option<String>, oneshot::Sender<Result<(), RequestError>>),
}

/// The agent's status.
#[derive(Debug, Clone)]
pub struct AgentStatus {
    /// The engine's view.
    pub cluster: ClusterStatus,
    /// Names of the nodes by id.
    pub names: Vec<(NodeId, String)>,
    /// Every peer as membership sees it.
    pub peers: Vec<tandem_membership::PeerView>,
    /// The heartbeat links' names.
    pub links: Vec<String>,
    /// Monitor states.
    pub monitors: Vec<monitors::MonitorStatus>,
    /// Remaining validity of this node's host lease, in ms (None: not held).
    pub lease_valid_ms: Option<u64>,
    /// The last fencing token read on each group's lease.
    pub tokens: std::collections::BTreeMap<GroupId, u64>,
}

/// A handle to a running agent, for the API and for tests.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    inputs: mpsc::UnboundedSender<Input>,
    events: broadcast::Sender<AgentEvent>,
}

impl AgentHandle {
    /// The agent's current status.
    pub async fn status(&self) -> Result<AgentStatus, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.inputs.send(Input::Status(tx)).map_err(|_| RequestError::ShuttingDown)?;
        rx.await.map_err(|_| RequestError::ShuttingDown)
    }

    /// Applies an operator command cluster-wide; returns its sequence number.
    pub async fn operator(&self, req: OperatorRequest) -> Result<u64, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.inputs.send(Input::Operator(req, tx)).map_err(|_| RequestError::ShuttingDown)?;
        rx.await.map_err(|_| RequestError::ShuttingDown)?
    }

    /// A command a peer forwarded.
    pub fn deliver(&self, seq: u64, req: OperatorRequest) -> Result<(), RequestError> {
        self.inputs.send(Input::Delivered(seq, req)).map_err(|_| RequestError::ShuttingDown)
    }

    /// The event feed.
    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    /// Puts this node in standby (`Some`: planned maintenance; every group here is stopped
    /// and released, moved or parked, and none starts here) or brings it back (`None`).
    /// The mode is persisted in the state directory before anything changes, so a restarted
    /// agent stays in standby; peers learn it from the heartbeats. Not a failure: nothing is
    /// counted. Returns once the engine has it (the groups are then stopping).
    pub async fn set_standby(&self, mode: Option<StandbyMode>) -> Result<(), RequestError> {
        let (tx, rx) = oneshot::channel();
        self.inputs.send(Input::SetStandby(mode, tx)).map_err(|_| RequestError::ShuttingDown)?;
        rx.await.map_err(|_| RequestError::ShuttingDown)?
    }

    /// Forbids `group` on this node (`Some(reason)`, e.g. its network is down here) or lifts
    /// the veto (`None`). While vetoed the node does not take the group, and stops and
    /// releases it if it holds it, marked as failed here (peers rank this node last); no
    /// restart or failover is counted. Not persisted: whoever detects the condition sets it
    /// again after an agent restart.
    pub async fn set_veto(&self, group: &str, reason: Option<String>) -> Result<(), RequestError> {
        let (tx, rx) = oneshot::channel();
        self.inputs.send(Input::SetVeto(group.to_owned(), reason, tx)).map_err(|_| RequestError::ShuttingDown)?;
        rx.await.map_err(|_| RequestError::ShuttingDown)?
    }

    /// Moves or stops every group away from this node (PrepareShutdown).
    pub fn drain(&self) -> Result<(), RequestError> {
        self.inputs.send(Input::Drain).map_err(|_| RequestError::ShuttingDown)
    }

    /// Stops the agent cleanly (every local group stopped, leases released).
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inputs.send(Input::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Sends an operator command with its sequence number to the peers.
pub type Forward = Box<dyn FnMut(u64, &OperatorRequest) + Send>;

/// Everything the engine task drives.
pub(crate) struct Parts {
    pub plan: Arc<Plan>,
    pub resources: ResourceTable,
    pub monitors: MonitorTable,
    pub leases: leases::LeaseClient,
    pub fence: crate::fencing::FenceService,
    pub forward: Forward,
    pub peers: Box<dyn Fn() -> Vec<tandem_membership::PeerView> + Send>,
    /// Sets the standby flag of this node's heartbeats.
    pub standby_flag: Box<dyn Fn(bool) + Send>,
    /// Where this node's standby is persisted.
    pub standby_file: std::path::PathBuf,
    /// The standby restored from it at start-up.
    pub standby: Option<StandbyMode>,
}

/// How the engine task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// An orderly shutdown.
    Shutdown,
    /// A stop failed too often: everything was killed.
    SelfFenced(String),
    /// The host lease was lost: every group was stopped.
    LeaseLost(String),
}

impl Exit {
    /// The process exit status both agents use for it: 0, 75 (self-fenced) or 76 (host
    /// lease lost). 78 is for a bad configuration, before any of this.
    pub fn status(&self) -> u8 {
        match self {
            Exit::Shutdown => 0,
            Exit::SelfFenced(_) => EXIT_SELF_FENCED,
            Exit::LeaseLost(_) => EXIT_LEASE_LOST,
        }
    }
}

/// Exit status when the configuration is invalid.
pub const EXIT_CONFIG: u8 = 78;
/// Exit status after self-fencing (a stop failed too often).
pub const EXIT_SELF_FENCED: u8 = 75;
/// Exit status after the host lease was lost.
pub const EXIT_LEASE_LOST: u8 = 76;

pub(crate) fn channel() -> (AgentHandle, mpsc::UnboundedReceiver<Input>, mpsc::UnboundedSender<Input>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (events, _) = broadcast::channel(1024);
    (AgentHandle { inputs: tx.clone(), events }, rx, tx)
}

/// The engine task.
pub(crate) struct Driver {
    engine: Engine,
    parts: Parts,
    inputs: mpsc::UnboundedSender<Input>,
    events: broadcast::Sender<AgentEvent>,
    started: Instant,
    /// Lamport clock of operator commands: the highest sequence seen.
    seq_seen: u64,
    shutdown: Option<oneshot::Sender<()>>,
    draining: bool,
    /// The host lease was lost (why, when): stopping everything, then exiting.
    lost: Option<(String, Instant)>,
    /// Peers whose host lease was reported dead (published once per death).
    lease_dead: std::collections::BTreeSet<NodeId>,
    /// Each group's (state, location) as last published.
    group_states: Vec<(tandem_engine::GroupState, Option<NodeId>)>,
    exit: Option<Exit>,
    /// An input taken from the queue while collecting a batch of engine events, which ends
    /// the batch: handled next, before anything else is received.
    next: Option<Input>,
}

impl Driver {
    pub(crate) fn new(engine: Engine, parts: Parts, handle: &AgentHandle) -> Self {
        Driver {
            engine,
            parts,
            inputs: handle.inputs.clone(),
            events: handle.events.clone(),
            started: Instant::now(),
            seq_seen: 0,
            shutdown: None,
            draining: false,
            lost: None,
            group_states: Vec::new(),
            lease_dead: Default::default(),
            exit: None,
            next: None,
        }
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn publish(&self, kind: EventKind, group: Option<&GroupId>, resource: Option<&ResourceId>, message: String) {
        self.publish_detail(kind, group, resource, message, None);
    }

    fn publish_detail(
        &self,
        kind: EventKind,
        group: Option<&GroupId>,
        resource: Option<&ResourceId>,
        message: String,
        detail: Option<pb::event::Kind>,
    ) {
        let ev = AgentEvent {
            detail,
            at_ms: self.now(),
            group: group.map(|g| g.0.clone()),
            resource: resource.map(|r| r.0.clone()),
            kind,
            message,
        };
        tracing::info!(target: "tandem_node", group = ev.group.as_deref(), resource = ev.resource.as_deref(), "{}", ev.message);
        let _ = self.events.send(ev);
    }

    /// Runs until shutdown, self-fence or lease loss.
    pub(crate) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) -> Exit {
        let now = self.now();
        if let Some(mode) = self.parts.standby {
            // Before the engine's first evaluation: a restarted agent stays in maintenance.
            (self.parts.standby_flag)(true);
            let cmds = self.engine.handle(now, Event::SetStandby(Some(mode)));
            self.execute(cmds);
        }
        let cmds = self.engine.startup(now);
        self.execute(cmds);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some(exit) = self.exit.take() {
                return exit;
            }
            if let Some((why, since)) = &self.lost
                && (self.all_stopped_here() || since.elapsed() > LOST_STOP_LIMIT)
            {
                if !self.all_stopped_here() {
                    tracing::error!(target: "tandem_node", "resources still not stopped {} s after the host lease was lost", LOST_STOP_LIMIT.as_secs());
                }
                self.parts.resources.kill_all();
                return Exit::LeaseLost(why.clone());
            }
            if self.shutdown.is_some() && self.all_stopped_here() {
                // Bounded lease I/O: keep the other tasks of this worker running meanwhile.
                let leases = self.parts.leases.clone();
                if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
                    tokio::task::block_in_place(|| leases.leave());
                } else {
                    leases.leave();
                }
                if let Some(tx) = self.shutdown.take() {
                    let _ = tx.send(());
                }
                return Exit::Shutdown;
            }
            let input = match self.next.take() {
                Some(i) => i,
                None => tokio::select! {
                    i = rx.recv() => match i { Some(i) => i, None => return Exit::Shutdown },
                    _ = tick.tick() => Input::Engine(Event::Tick),
                },
            };
            match input {
                Input::Engine(ev) => {
                    let (batch, next) = collect_batch(ev, &mut rx, MAX_BATCH);
                    self.next = next;
                    self.feed_batch(batch);
                }
                input => self.handle(input),
            }
            self.publish_group_changes();
        }
    }

    fn all_stopped_here(&self) -> bool {
        let me = self.engine.node();
        self.engine.status().groups.iter().all(|g| {
            g.resources.iter().all(|r| r.state == tandem_engine::ResourceState::Stopped)
                && !(g.location == Some(me) && g.state != tandem_engine::GroupState::Stopped)
        })
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Engine(ev) => self.feed(ev),
            Input::Operator(req, reply) => match self.pick_move_target(req).and_then(|req| {
                let cmd = self.resolve(&req)?;
                Ok((req, cmd))
            }) {
                Ok((req, cmd)) => {
                    // Unique cluster-wide: a Lamport counter in the high bits, our node id
                    // (1..=2000 < 2^11) in the low bits.
                    let counter = ((self.seq_seen >> 11) + 1).min(u64::MAX >> 11);
                    let seq = (counter << 11) | u64::from(self.engine.node().0);
                    self.seq_seen = seq;
                    self.publish(
                        EventKind::Operator,
                        Some(cmd.group()),
                        None,
                        format!("operator: {req:?} (seq {seq})"),
                    );
                    (self.parts.forward)(seq, &req);
                    self.operator(seq, cmd);
                    let _ = reply.send(Ok(seq));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Input::Delivered(seq, req) => {
                if let Ok(cmd) = self.resolve(&req) {
                    self.seq_seen = self.seq_seen.max(seq);
                    self.publish(
                        EventKind::Operator,
                        Some(cmd.group()),
                        None,
                        format!("operator from a peer: {req:?} (seq {seq})"),
                    );
                    self.operator(seq, cmd);
                }
            }
            Input::Status(reply) => {
                let _ = reply.send(AgentStatus {
                    cluster: self.engine.status(),
                    names: self.parts.plan.names.clone(),
                    peers: (self.parts.peers)(),
                    links: self.parts.plan.membership.links.clone(),
                    monitors: self.parts.monitors.status(),
                    lease_valid_ms: self.parts.leases.valid_for_ms(),
                    tokens: self.parts.leases.tokens(),
                });
            }
            Input::Publish(ev) => {
                tracing::info!(target: "tandem_node", group = ev.group.as_deref(), "{}", ev.message);
                let _ = self.events.send(ev);
            }
            Input::HostLeaseLost(why) => self.host_lease_lost(why),
            Input::SetStandby(mode, reply) => {
                // Persisted first: a standby that would not survive a restart is refused.
                if let Err(e) = standby::store(&self.parts.standby_file, mode) {
                    let _ = reply.send(Err(RequestError::State(e.to_string())));
                    return;
                }
                self.parts.standby = mode;
                (self.parts.standby_flag)(mode.is_some());
                self.feed(Event::SetStandby(mode));
                let _ = reply.send(Ok(()));
            }
            Input::SetVeto(group, reason, reply) => {
                let g = GroupId(group.clone());
                if !self.parts.plan.model.groups.iter().any(|x| x.id == g) {
                    let _ = reply.send(Err(RequestError::UnknownGroup(group)));
                    return;
                }
                let text = match &reason {
                    Some(r) => format!("{g} may not run on this node: {r}"),
                    None => format!("{g} may run on this node again"),
                };
                self.publish(EventKind::Notice, Some(&g), None, text);
                self.feed(Event::LocalVeto { group: g, reason });
                let _ = reply.send(Ok(()));
            }
            Input::Drain => {
                if !self.draining {
                    self.draining = true;
                    // A drained node must not keep the tie-break: once it is powered off,
                    // the peers would otherwise lose quorum until its host lease expires.
                    self.parts.leases.set_tie_break(false);
                    self.publish(
                        EventKind::Operator,
                        None,
                        None,
                        "preparing for shutdown: moving every group away from this node".into(),
                    );
                    // Leaving the partition is what draining is: every local group stops and
                    // releases its lease for a peer to take over, and none starts here again.
                    self.feed(Event::QuorumLost);
                }
            }
            Input::Shutdown(reply) => {
                self.publish(EventKind::Operator, None, None, "agent shutting down: stopping local groups".into());
                self.shutdown = Some(reply);
                self.parts.leases.set_tie_break(false);
                // Stopping the local groups is what a node leaving does: the engine treats
                // quorum loss exactly so (stop, release with a QuorumLost reason).
                self.feed(Event::QuorumLost);
            }
        }
    }

    fn operator(&mut self, seq: u64, cmd: OperatorCommand) {
        let resumed = match &cmd {
            OperatorCommand::ResumeMonitoring(g) => Some(g.clone()),
            _ => None,
        };
        self.feed(Event::Operator { seq, command: cmd });
        // Failures confirmed while monitoring was suspended were ignored by the engine and
        // will not be reported again by their monitors: report them now.
        if let Some(g) = resumed {
            let failed: Vec<(ResourceId, Option<String>)> = self
                .parts
                .monitors
                .status()
                .into_iter()
                .filter(|m| m.group == g.0 && matches!(m.state, tandem_monitors::scheduler::MonitorState::Failed(_)))
                .map(|m| (ResourceId(m.resource), (!m.builtin).then_some(m.name)))
                .collect();
            for (resource, monitor) in failed {
                self.feed(Event::MonitorFailed { group: g.clone(), resource, monitor });
            }
        }
    }

    /// A move without a target gets one here, before the command is numbered and forwarded:
    /// the best other node by the engine's own placement, as this node sees it. Peers then
    /// all apply the same, named target.
    fn pick_move_target(&self, req: OperatorRequest) -> Result<OperatorRequest, RequestError> {
        let OperatorAction::Move { to: None } = &req.action else { return Ok(req) };
        let plan = &self.parts.plan;
        match self.engine.move_target(&GroupId(req.group.clone())) {
            None => Err(RequestError::UnknownGroup(req.group)),
            Some(Ok(node)) => {
                Ok(OperatorRequest { action: OperatorAction::Move { to: Some(plan.name_of(node)) }, ..req })
            }
            Some(Err(none)) => {
                let why: Vec<String> = none.nodes.iter().map(|(n, u)| format!("{} {u}", plan.name_of(*n))).collect();
                Err(RequestError::NoMoveTarget(format!(
                    "cannot move group `{}`: no other eligible node can take it now ({}); bring one back \
                     (`tandemctl status` shows the nodes) or name a target with --to",
                    req.group,
                    why.join("; ")
                )))
            }
        }
    }

    fn resolve(&self, req: &OperatorRequest) -> Result<OperatorCommand, RequestError> {
        let g = GroupId(req.group.clone());
        if !self.parts.plan.model.groups.iter().any(|x| x.id == g) {
            return Err(RequestError::UnknownGroup(req.group.clone()));
        }
        Ok(match &req.action {
            OperatorAction::Start => OperatorCommand::StartGroup(g),
            OperatorAction::Stop => OperatorCommand::StopGroup(g),
            OperatorAction::Reset => OperatorCommand::ResetCounters(g),
            OperatorAction::SuspendMonitoring => OperatorCommand::SuspendMonitoring(g),
            OperatorAction::ResumeMonitoring => OperatorCommand::ResumeMonitoring(g),
            OperatorAction::Move { to: Some(to) } => OperatorCommand::MoveGroup {
                group: g,
                to: self.parts.plan.id_of(to).ok_or_else(|| RequestError::UnknownNode(to.clone()))?,
            },
            // Given a target by `pick_move_target` before this is reached.
            OperatorAction::Move { to: None } => {
                return Err(RequestError::NoMoveTarget(format!("the move of group `{}` names no target", req.group)));
            }
        })
    }

    fn feed(&mut self, ev: Event) {
        self.feed_batch(vec![ev]);
    }

    /// Does each event's bookkeeping (logging, publishing, the operator clock) in order,
    /// then hands the events to the engine in one `handle_batch`. A peer fenced by its host
    /// lease expiring is followed by its `FenceConfirmed` in a decision of its own, as when
    /// events are fed one by one.
    fn feed_batch(&mut self, events: Vec<Event>) {
        let mut batch = Vec::with_capacity(events.len());
        for ev in events {
            let Some(lease_fenced) = self.note_event(&ev) else { continue };
            batch.push(ev);
            if let Some(n) = lease_fenced {
                self.decide(std::mem::take(&mut batch));
                let now = self.now();
                let cmds = self.engine.handle(now, Event::FenceConfirmed(n));
                self.execute(cmds);
            }
        }
        self.decide(batch);
    }

    /// Hands already noted events to the engine (one evaluation) and executes its commands.
    fn decide(&mut self, mut batch: Vec<Event>) {
        let now = self.now();
        let cmds = match batch.len() {
            0 => return,
            1 => self.engine.handle(now, batch.remove(0)),
            _ => self.engine.handle_batch(now, batch),
        };
        self.execute(cmds);
    }

    /// The runtime's own part of an event before the engine gets it: `None` if the engine
    /// must not get it, else whether it is a peer fenced by its host lease expiring (whose
    /// `FenceConfirmed` follows it).
    fn note_event(&mut self, ev: &Event) -> Option<Option<NodeId>> {
        // The shutdown path keeps the node out of quorum: nothing may start here again.
        if (self.shutdown.is_some() || self.draining || self.lost.is_some()) && matches!(ev, Event::QuorumRegained) {
            return None;
        }
        self.parts.leases.hint(ev);
        // Not an arm of the match below: an acquisition with a note must still be published.
        if let Event::LeaseObserved { note: Some(n), .. } | Event::LeaseAcquired { note: Some(n), .. } = ev {
            self.seq_seen = self.seq_seen.max(n.desired_seq).max(n.reset_seq);
        }
        match ev {
            Event::ResourceStarted { group, resource } => {
                self.publish_detail(
                    EventKind::Resource,
                    Some(group),
                    Some(resource),
                    format!("{group}/{resource} started"),
                    res_op(group, resource, pb::ResourceOp::Start, pb::OpOutcome::Succeeded),
                );
                self.parts.monitors.resource_started(group, resource);
            }
            Event::ResourceStartFailed { group, resource } => {
                self.publish_detail(
                    EventKind::Resource,
                    Some(group),
                    Some(resource),
                    format!("{group}/{resource} failed to start"),
                    res_op(group, resource, pb::ResourceOp::Start, pb::OpOutcome::Failed),
                );
            }
            Event::ResourceStopped { group, resource } => {
                self.publish_detail(
                    EventKind::Resource,
                    Some(group),
                    Some(resource),
                    format!("{group}/{resource} stopped"),
                    res_op(group, resource, pb::ResourceOp::Stop, pb::OpOutcome::Succeeded),
                );
            }
            Event::ResourceMigrated { group, resource, to } => {
                self.publish_detail(
                    EventKind::Resource,
                    Some(group),
                    Some(resource),
                    format!("{group}/{resource} stopped here: live-migrated to {}", self.parts.plan.name_of(*to)),
                    res_op(group, resource, pb::ResourceOp::Stop, pb::OpOutcome::Succeeded),
                );
            }
            Event::ResourceStopFailed { group, resource } => {
                self.publish_detail(
                    EventKind::Resource,
                    Some(group),
                    Some(resource),
                    format!("{group}/{resource} failed to stop"),
                    res_op(group, resource, pb::ResourceOp::Stop, pb::OpOutcome::Failed),
                );
            }
            Event::LeaseAcquired { group, token, .. } => {
                self.publish(
                    EventKind::Lease,
                    Some(group),
                    None,
                    format!("acquired the lease of {group} (token {})", token.0),
                );
            }
            Event::MonitorFailed { group, resource, .. } => {
                let detail = pb::event::Kind::MonitorFailure(pb::MonitorFailure {
                    group: group.0.clone(),
                    resource: resource.0.clone(),
                    confirmed: true,
                    ..Default::default()
                });
                self.publish_detail(
                    EventKind::Monitor,
                    Some(group),
                    Some(resource),
                    format!("monitor failure confirmed on {group}/{resource}"),
                    Some(detail),
                );
            }
            Event::NodeJoined(n) => {
                self.parts.fence.abandon(*n);
                self.lease_dead.remove(n);
                self.publish(EventKind::Membership, None, None, format!("{} joined", self.parts.plan.name_of(*n)))
            }
            Event::NodeLost(n) => {
                self.publish(EventKind::Membership, None, None, format!("{} lost", self.parts.plan.name_of(*n)))
            }
            Event::PeerFenced(n) if self.lease_dead.insert(*n) => {
                self.publish(
                    EventKind::Lease,
                    None,
                    None,
                    format!("host lease of {} is dead", self.parts.plan.name_of(*n)),
                );
            }
            Event::PeerLeaseAlive(n) if self.lease_dead.remove(n) => self.publish(
                EventKind::Lease,
                None,
                None,
                format!("host lease of {} is renewed again", self.parts.plan.name_of(*n)),
            ),
            Event::FenceConfirmed(n) => {
                self.publish(EventKind::Fence, None, None, format!("{} was fenced", self.parts.plan.name_of(*n)))
            }
            Event::QuorumLost => {
                self.publish(EventKind::Membership, None, None, "quorum lost: stopping every local group".into())
            }
            Event::QuorumRegained => self.publish(EventKind::Membership, None, None, "quorum".into()),
            Event::PeerStandby { node, standby } => self.publish(
                EventKind::Membership,
                None,
                None,
                format!(
                    "{} is {}",
                    self.parts.plan.name_of(*node),
                    if *standby { "in standby: it takes no group" } else { "online again" }
                ),
            ),
            Event::LeaseLost { group } => {
                self.publish(EventKind::Lease, Some(group), None, format!("lease of {group} lost: stopping it at once"))
            }
            _ => {}
        }
        // A lease-watchdog-only node's fence is its own host lease expiring.
        Some(match ev {
            Event::PeerFenced(n) if self.parts.fence.confirmed_by_lease_expiry(*n) => Some(*n),
            _ => None,
        })
    }

    /// Publishes the groups whose state or location changed since the last call.
    fn publish_group_changes(&mut self) {
        let status = self.engine.status();
        let plan = self.parts.plan.clone();
        let name = |n: NodeId| plan.name_of(n);
        for (i, g) in status.groups.iter().enumerate() {
            let now = (g.state, g.location);
            if self.group_states.get(i) == Some(&now) {
                continue;
            }
            if i < self.group_states.len() {
                self.group_states[i] = now;
            } else {
                self.group_states.push(now);
            }
            let pg = convert::group_status(g, &name);
            let detail = pb::event::Kind::GroupState(pb::GroupStateChanged {
                group: pg.name.clone(),
                state: pg.state,
                location: pg.location.clone(),
                not_running: pg.not_running,
            });
            let where_ = if pg.location.is_empty() { String::new() } else { format!(" on {}", pg.location) };
            self.publish_detail(
                EventKind::Notice,
                Some(&g.id),
                None,
                format!("{} is {:?}{where_}", g.id, g.state),
                Some(detail),
            );
        }
    }

    fn execute(&mut self, cmds: Vec<Command>) {
        for cmd in cmds {
            match cmd {
                Command::ProbeResource { group, resource } => {
                    self.parts.resources.probe(&group, &resource, self.inputs.clone());
                }
                Command::StartResource { group, resource, token, migrated_in } => {
                    let how = if migrated_in { "resuming the migrated" } else { "starting" };
                    self.publish_detail(
                        EventKind::Resource,
                        Some(&group),
                        Some(&resource),
                        format!("{how} {group}/{resource} (token {})", token.0),
                        res_op(&group, &resource, pb::ResourceOp::Start, pb::OpOutcome::Begun),
                    );
                    self.parts.resources.start(&group, &resource, token.0, migrated_in, self.inputs.clone());
                }
                Command::AdoptResource { group, resource, token } => {
                    self.publish(EventKind::Resource, Some(&group), Some(&resource), format!("adopted running {group}/{resource} under token {}", token.0));
                    self.parts.resources.adopted(&group, &resource, token.0);
                    self.parts.monitors.resource_started(&group, &resource);
                }
                Command::StopResource { group, resource, force, handover } => {
                    self.parts.monitors.resource_stopping(&group, &resource);
                    let how = match (force, &handover) {
                        (true, _) => "force-stopping".to_string(),
                        (false, Some(h)) => format!("handing over to {}:", self.parts.plan.name_of(h.to)),
                        (false, None) => "stopping".to_string(),
                    };
                    let op = if force { pb::ResourceOp::ForceStop } else { pb::ResourceOp::Stop };
                    self.publish_detail(
                        EventKind::Resource,
                        Some(&group),
                        Some(&resource),
                        format!("{how} {group}/{resource}"),
                        res_op(&group, &resource, op, pb::OpOutcome::Begun),
                    );
                    let handover = handover.map(|h| {
                        let reason = match h.reason {
                            tandem_engine::ReleaseReason::Standby => crate::resources::HandoverReason::Standby,
                            tandem_engine::ReleaseReason::Vetoed => crate::resources::HandoverReason::Veto,
                            _ => crate::resources::HandoverReason::Move,
                        };
                        (crate::resources::HandoverTarget { node: self.parts.plan.name_of(h.to), reason }, h.to)
                    });
                    self.parts.resources.stop(&group, &resource, force, handover, self.inputs.clone());
                }
                Command::AcquireLease { group } => self.parts.leases.acquire(&group),
                Command::ReleaseLease { group, token, note, reason } => {
                    self.publish(EventKind::Lease, Some(&group), None, format!("releasing the lease of {group} (token {}, {reason:?})", token.0));
                    self.parts.leases.release(&group, &note);
                }
                Command::RequestFence { node } => {
                    let name = self.parts.plan.name_of(node);
                    self.publish_detail(
                        EventKind::Fence,
                        None,
                        None,
                        format!("fencing {name} before taking its groups over"),
                        Some(pb::event::Kind::FenceRequested(pb::FenceRequested { node: name.clone() })),
                    );
                    self.parts.fence.request(node);
                }
                Command::SelfFence { group, resource } => {
                    let why = format!("{group}/{resource} would not stop: killing every resource of this node");
                    self.publish(EventKind::Notice, Some(&group), Some(&resource), why.clone());
                    self.parts.resources.kill_all();
                    self.parts.leases.abandon();
                    self.exit = Some(Exit::SelfFenced(why));
                }
                Command::Notify(n) => match n {
                    Notice::FailoverLimitReached { group, failovers } => self.publish(
                        EventKind::Notice,
                        Some(&group),
                        None,
                        format!("{group} failed over {failovers} times: final action taken; `tandemctl group reset {group}` re-arms it"),
                    ),
                    Notice::OperatorRejected { seq, reason } => {
                        self.publish(EventKind::Operator, None, None, format!("operator command {seq} rejected: {reason}"))
                    }
                    // Placement notices: only with a capacity model, which the guest plan has not.
                    Notice::NoCapacity { group, nodes } => {
                        let why: Vec<String> = nodes.iter().map(|(n, u)| format!("{n}: {u}")).collect();
                        let text = format!("{group} fits on no healthy node ({})", why.join("; "));
                        self.publish(EventKind::Notice, Some(&group), None, text)
                    }
                    Notice::NoCapacityResolved { group } => self.publish(
                        EventKind::Notice,
                        Some(&group),
                        None,
                        format!("{group} is no longer blocked by capacity"),
                    ),
                    Notice::Standby { mode } => self.publish(
                        EventKind::Operator,
                        None,
                        None,
                        match mode {
                            Some(StandbyMode::Move) => "standby (move): every group here is stopped and left to the other nodes; none starts here".into(),
                            Some(StandbyMode::Park) => "standby (park): every group here is stopped and kept stopped until this node is back online; none starts here".into(),
                            None => "online: this node takes groups again".into(),
                        },
                    ),
                    Notice::StandbyReleased { group, parked } => self.publish(
                        EventKind::Notice,
                        Some(&group),
                        None,
                        if parked {
                            format!("{group} stopped for this node's standby and parked: it stays stopped until this node is online again")
                        } else {
                            format!("{group} stopped for this node's standby: another node may take it over (not a failover)")
                        },
                    ),
                    Notice::VetoReleased { group, reason } => self.publish(
                        EventKind::Notice,
                        Some(&group),
                        None,
                        format!("{group} released: it may not run on this node ({reason})"),
                    ),
                },
            }
        }
    }

    /// The host lease is gone: nothing may run here any more.
    fn host_lease_lost(&mut self, why: String) {
        if self.lost.is_some() {
            return;
        }
        // Processes first (at once), then the engine's forced stops undo what is not a
        // process (addresses, mounts); the agent exits once they are done, or after a bound.
        self.parts.resources.kill_all();
        self.lost = Some((why, Instant::now()));
        // One decision for all of them (nothing is started or kept in between), and nothing
        // may be acquired again under this host lease.
        let lost = self.parts.plan.model.groups.iter().map(|g| Event::LeaseLost { group: g.id.clone() });
        let events: Vec<Event> = lost.chain([Event::QuorumLost]).collect();
        self.feed_batch(events);
    }
}

/// `first` and the engine events queued right behind it (at most `max` in all, taken without
/// waiting): at scale a lease-observation round is one event per group, and the engine then
/// evaluates once for all of them. Returns them with the input that ended the batch, if
/// another kind of input did: the caller handles it next, so inputs keep their order.
fn collect_batch(first: Event, rx: &mut mpsc::UnboundedReceiver<Input>, max: usize) -> (Vec<Event>, Option<Input>) {
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(Input::Engine(ev)) => batch.push(ev),
            Ok(other) => return (batch, Some(other)),
            Err(_) => break,
        }
    }
    (batch, None)
}

fn res_op(
    group: &GroupId,
    resource: &ResourceId,
    op: pb::ResourceOp,
    outcome: pb::OpOutcome,
) -> Option<pb::event::Kind> {
    Some(pb::event::Kind::ResourceOp(pb::ResourceOperation {
        group: group.0.clone(),
        resource: resource.0.clone(),
        op: op as i32,
        outcome: outcome as i32,
        message: String::new(),
        duration_ms: 0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_takes_the_engine_events_queued_up_to_the_first_other_input() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for input in [
            Input::Engine(Event::Tick),
            Input::Engine(Event::NodeLost(NodeId(2))),
            Input::Drain,
            Input::Engine(Event::NodeJoined(NodeId(2))),
        ] {
            tx.send(input).unwrap();
        }
        let (batch, next) = collect_batch(Event::QuorumLost, &mut rx, MAX_BATCH);
        assert_eq!(batch, vec![Event::QuorumLost, Event::Tick, Event::NodeLost(NodeId(2))]);
        assert!(matches!(next, Some(Input::Drain)), "{next:?}");
        // What follows the input that ended the batch stays queued, in order.
        let (batch, next) = collect_batch(Event::Tick, &mut rx, MAX_BATCH);
        assert_eq!(batch, vec![Event::Tick, Event::NodeJoined(NodeId(2))]);
        assert!(next.is_none());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_batch_is_bounded() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for _ in 0..300 {
            tx.send(Input::Engine(Event::Tick)).unwrap();
        }
        let (batch, next) = collect_batch(Event::QuorumLost, &mut rx, MAX_BATCH);
        assert_eq!(batch.len(), MAX_BATCH);
        assert!(next.is_none());
        let (rest, _) = collect_batch(Event::QuorumRegained, &mut rx, MAX_BATCH);
        assert_eq!(rest.len(), 300 - (MAX_BATCH - 1) + 1);
    }
}
