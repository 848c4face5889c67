//! The engine: one instance per node, deciding for that node only.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::command::{Command, Handover, Notice, ReleaseReason};
use crate::event::{Event, OperatorCommand, StandbyMode};
use crate::loads::Loads;
use crate::model::{ClusterModel, Failback, FinalAction, GroupId, ModelError, NodeId};
use crate::note::{Desired, LeaseNote, LeaseToken, Migrated, StopCause};
use crate::status::{
    ClusterStatus, GroupState, GroupStatus, NoMoveTarget, NotRunningReason, ResourceState, ResourceStatus, Unavailable,
    Unfit,
};

/// A rule the simulation can break on purpose, to show that its checker catches it.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BrokenRule {
    /// Start resources as soon as the lease is requested, before it is granted.
    StartBeforeLease,
    /// Keep running after `LeaseLost`.
    IgnoreLeaseLost,
    /// Never take the final action: fail over forever.
    NoFailoverLimit,
    /// Every node fits every group: capacity and anti-affinity ignored.
    IgnorePlacement,
    /// `SetStandby` is ignored: a node in maintenance keeps running and starting groups.
    IgnoreStandby,
    /// A group parked by another node is treated as wanted: it is started elsewhere.
    StartParked,
    /// A grant resumes a migrated copy whenever the note names this node, without checking
    /// that it directly follows the migrating holder: a later holder may resume a copy that
    /// went stale meanwhile.
    ResumeAnyMigration,
}

#[derive(Debug, Clone, Copy, Default)]
struct Peer {
    up: bool,
    fence_confirmed: bool,
    fence_requested: bool,
    lease_dead: bool,
    /// In standby (from its heartbeats); kept across `NodeLost`/`NodeJoined`.
    standby: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    NotHeld,
    Acquiring,
    Held(LeaseToken),
}

/// What the holder does with a group it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goal {
    Run,
    /// Stop every resource, then release the lease.
    Release(ReleaseReason),
    /// Final action `DoNothing`: keep the lease, leave resources as they are.
    Hold,
}

/// Operator intent as this node received it; merged into the lease note by sequence number.
#[derive(Debug, Clone, Copy)]
struct Intent {
    desired: Desired,
    preferred: Option<NodeId>,
    desired_seq: u64,
    reset_seq: u64,
}

#[derive(Debug)]
struct GroupRuntime {
    eligible_here: bool,
    res: Vec<ResourceState>,
    stop_attempts: Vec<u32>,
    lease: Lease,
    goal: Goal,
    /// Resources found running by the probe wait for the lease answer before anything else.
    adopting: bool,
    to_restart: BTreeSet<usize>,
    /// Restart times counted against the group's own limit.
    restarts: VecDeque<u64>,
    /// Restart times counted against a monitor's own limit, by monitor.
    monitor_restarts: BTreeMap<String, VecDeque<u64>>,
    running_since: Option<u64>,
    held_note: LeaseNote,
    observed_holder: Option<NodeId>,
    observed_note: Option<LeaseNote>,
    intent: Intent,
    free_since: Option<u64>,
    next_attempt_at: u64,
    handoff_backoff_until: u64,
    monitoring_suspended: bool,
    /// This engine asked for the lease at least once: an observation naming this node as
    /// holder is then a stale read of our own past holding, not a previous incarnation's.
    asked_before: bool,
    /// A grant just arrived: check once that the group fits here before starting anything
    /// (a reclaimed lease was requested without the placement check).
    check_fit: bool,
    /// `Notice::NoCapacity` was emitted and not resolved yet.
    no_capacity_reported: bool,
    /// A local veto forbids the group here (`Event::LocalVeto`), with its reason.
    veto: Option<String>,
    /// A grant that unparked the group: hand it to the best node if that is not this one.
    check_best: bool,
    /// The lease was granted right after a holder that migrated the group here: the first start
    /// resumes the migrated state. Cleared by a failure, a loss or a release.
    migrated_in: bool,
}

/// Healthy eligible nodes a group does not fit on, with why.
type Unplaced = Vec<(NodeId, Unfit)>;

/// How a node ranks as a place for a group; lower is better. Field order is rank order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct RankKey {
    /// Not the operator's move target.
    not_target: bool,
    /// The group failed on this node since its last stable run.
    failed: bool,
    /// Runs no group sharing an affinity set with this one.
    no_partner: bool,
    /// Position in the group's eligible list.
    order: usize,
}

impl RankKey {
    /// The rank without the affinity preference: what failback compares, so that affinity
    /// alone never moves a running group (two partners would chase each other).
    fn without_affinity(self) -> (bool, bool, usize) {
        (self.not_target, self.failed, self.order)
    }
}

/// Why a group of `demand` does not fit in `free`, if it does not.
fn misfit(demand: crate::model::Capacity, free: crate::model::Capacity) -> Option<Unfit> {
    if demand.memory_mib > free.memory_mib {
        Some(Unfit::Memory { needed: demand.memory_mib, free: free.memory_mib })
    } else if demand.vcpus > free.vcpus {
        Some(Unfit::Vcpus { needed: demand.vcpus, free: free.vcpus })
    } else {
        None
    }
}

/// The failover engine of one node: feed it events with [`Engine::handle`], execute the
/// commands it returns, feed the results back. It never does I/O, reads no clock and draws
/// no random numbers: the same events at the same `now` give the same commands.
#[derive(Debug)]
pub struct Engine {
    me: NodeId,
    model: ClusterModel,
    index: BTreeMap<GroupId, usize>,
    peers: BTreeMap<NodeId, Peer>,
    quorum: bool,
    self_fenced: bool,
    /// This node's standby mode (`None`: online).
    standby: Option<StandbyMode>,
    started_up: bool,
    probes_pending: usize,
    groups: Vec<GroupRuntime>,
    /// Group indices by descending priority, then model order: the order of evaluation.
    order: Vec<usize>,
    /// Groups whose lease was released during the current evaluation: the others are
    /// evaluated once more, so that the capacity freed is used at once.
    released: BTreeSet<usize>,
    /// What is active on each node, kept up to date after every change of a group's lease,
    /// resources or observed holder (see `refresh`): placement reads it instead of scanning
    /// every group for every node of every group.
    loads: Loads,
    now: u64,
    out: Vec<Command>,
    #[cfg(test)]
    broken: Option<BrokenRule>,
}

fn merge(note: &LeaseNote, intent: &Intent) -> LeaseNote {
    let mut n = note.clone();
    if intent.desired_seq > n.desired_seq {
        n.desired = intent.desired;
        n.preferred = intent.preferred;
        n.desired_seq = intent.desired_seq;
    }
    if intent.reset_seq > n.reset_seq {
        n.reset_seq = intent.reset_seq;
        n.failovers = 0;
        n.failed_on.clear();
        if n.desired == Desired::Stopped(StopCause::FailoverLimit) {
            n.desired = Desired::Started;
        }
    }
    n
}

impl Engine {
    /// An engine for node `me`. Every other node of the model is assumed up until membership
    /// says otherwise: the runtime must report `NodeLost` for nodes it does not hear from
    /// within its startup timeout.
    pub fn new(me: NodeId, model: ClusterModel) -> Result<Self, ModelError> {
        model.validate()?;
        if !model.nodes.contains(&me) {
            return Err(ModelError::NodeNotInCluster(me));
        }
        let peers =
            model.nodes.iter().filter(|n| **n != me).map(|n| (*n, Peer { up: true, ..Peer::default() })).collect();
        let mut probes_pending = 0;
        let groups = model
            .groups
            .iter()
            .map(|g| {
                let eligible_here = g.placement.eligible.contains(&me);
                let n = g.resources.len();
                if eligible_here {
                    probes_pending += n;
                }
                let initial = LeaseNote::initial(g);
                GroupRuntime {
                    eligible_here,
                    res: vec![if eligible_here { ResourceState::Unknown } else { ResourceState::Stopped }; n],
                    stop_attempts: vec![0; n],
                    lease: Lease::NotHeld,
                    goal: Goal::Run,
                    adopting: false,
                    to_restart: BTreeSet::new(),
                    restarts: VecDeque::new(),
                    monitor_restarts: BTreeMap::new(),
                    running_since: None,
                    intent: Intent { desired: initial.desired, preferred: None, desired_seq: 0, reset_seq: 0 },
                    held_note: initial,
                    observed_holder: None,
                    observed_note: None,
                    free_since: None,
                    next_attempt_at: 0,
                    handoff_backoff_until: 0,
                    monitoring_suspended: false,
                    asked_before: false,
                    check_fit: false,
                    no_capacity_reported: false,
                    veto: None,
                    check_best: false,
                    migrated_in: false,
                }
            })
            .collect();
        let index = model.groups.iter().enumerate().map(|(i, g)| (g.id.clone(), i)).collect();
        let mut order: Vec<usize> = (0..model.groups.len()).collect();
        // Stable: equal priorities keep model order.
        order.sort_by_key(|gi| std::cmp::Reverse(model.groups[*gi].priority));
        let loads = Loads::new(&model, me);
        Ok(Engine {
            me,
            model,
            index,
            peers,
            quorum: true,
            self_fenced: false,
            standby: None,
            started_up: false,
            probes_pending,
            groups,
            order,
            released: BTreeSet::new(),
            loads,
            now: 0,
            out: Vec::new(),
            #[cfg(test)]
            broken: None,
        })
    }

    #[cfg(test)]
    pub(crate) fn break_rule(&mut self, rule: BrokenRule) {
        self.broken = Some(rule);
    }

    #[cfg(test)]
    fn is_broken(&self, rule: BrokenRule) -> bool {
        self.broken == Some(rule)
    }

    /// The node this engine decides for.
    pub fn node(&self) -> NodeId {
        self.me
    }

    /// The model the engine runs.
    pub fn model(&self) -> &ClusterModel {
        &self.model
    }

    /// Starts the engine: emits `ProbeResource` for every resource of every group this node
    /// is eligible for. Nothing is started or acquired before every probe has answered.
    /// Call once, before feeding events.
    pub fn startup(&mut self, now: u64) -> Vec<Command> {
        self.now = self.now.max(now);
        if !self.started_up {
            self.started_up = true;
            for (g, rt) in self.model.groups.iter().zip(&self.groups) {
                if rt.eligible_here {
                    for r in &g.resources {
                        self.out.push(Command::ProbeResource { group: g.id.clone(), resource: r.id.clone() });
                    }
                }
            }
            self.evaluate();
        }
        self.check_loads();
        std::mem::take(&mut self.out)
    }

    /// Feeds one event observed at `now` (the runtime's monotonic clock in milliseconds; a
    /// value lower than an earlier one is treated as the earlier one) and returns what to do.
    pub fn handle(&mut self, now: u64, event: Event) -> Vec<Command> {
        self.now = self.now.max(now);
        if self.self_fenced {
            return Vec::new();
        }
        self.apply_tracked(event);
        if self.started_up && !self.self_fenced {
            self.evaluate();
        }
        self.check_loads();
        std::mem::take(&mut self.out)
    }

    /// Feeds several events observed at `now`, in order, and decides once, after the last:
    /// what the runtime calls with everything that queued up while it was busy (a round of
    /// lease observations is one event per group). Costs one evaluation instead of one per
    /// event.
    ///
    /// Same as [`Engine::handle`] for each event in turn, except that the evaluations
    /// between the events are skipped: the result is identical whenever those evaluations
    /// would have issued no command and changed nothing (e.g. observations that confirm
    /// what the engine knows, results of operations that leave nothing new to do).
    /// Otherwise the engine decides on the state after the last event, as if all of them had
    /// arrived at the same instant: a decision a later event makes moot is not issued (an
    /// `AcquireLease` for a group the batch then shows held elsewhere), and timers count from
    /// `now`. Delivery order and timing of events is never a safety assumption of the engine
    /// (the lease is), so the guarantees are those of `handle`. Events after one that makes
    /// this node self-fence are ignored, as `handle` ignores them.
    pub fn handle_batch(&mut self, now: u64, events: Vec<Event>) -> Vec<Command> {
        self.now = self.now.max(now);
        if self.self_fenced {
            return Vec::new();
        }
        for event in events {
            self.apply_tracked(event);
            if self.self_fenced {
                break;
            }
        }
        if self.started_up && !self.self_fenced {
            self.evaluate();
        }
        self.check_loads();
        std::mem::take(&mut self.out)
    }

    /// Applies one event and brings the loads of the groups it may have changed up to date.
    fn apply_tracked(&mut self, event: Event) {
        let group = match &event {
            Event::ProbeResult { group, .. }
            | Event::ResourceStarted { group, .. }
            | Event::ResourceStartFailed { group, .. }
            | Event::ResourceStopped { group, .. }
            | Event::ResourceMigrated { group, .. }
            | Event::ResourceStopFailed { group, .. }
            | Event::MonitorFailed { group, .. }
            | Event::LeaseAcquired { group, .. }
            | Event::LeaseAcquireFailed { group, .. }
            | Event::LeaseLost { group }
            | Event::LeaseObserved { group, .. }
            | Event::LocalVeto { group, .. } => self.index.get(group).copied(),
            Event::Operator { command, .. } => self.index.get(command.group()).copied(),
            _ => None,
        };
        let probes_pending = self.probes_pending;
        self.apply(event);
        // The last probe answer adopts running resources of every group.
        let adopted = probes_pending > 0 && self.probes_pending == 0;
        match group {
            Some(gi) if !adopted => self.refresh(gi),
            _ => self.refresh_all(),
        }
    }

    /// Where group `gi` counts as active: here (`occupies_here`), and on the peer observed
    /// holding its lease while this node does not hold or ask for it.
    fn presence(&self, gi: usize) -> (bool, Option<NodeId>) {
        let rt = &self.groups[gi];
        let peer = if rt.lease == Lease::NotHeld { rt.observed_holder.filter(|h| *h != self.me) } else { None };
        (self.occupies_here(gi), peer)
    }

    /// Brings group `gi`'s entry in the loads up to date; call after any change of its lease,
    /// resource states or observed holder.
    fn refresh(&mut self, gi: usize) {
        let (here, peer) = self.presence(gi);
        self.loads.set(gi, here, peer);
    }

    fn refresh_all(&mut self) {
        for gi in 0..self.groups.len() {
            self.refresh(gi);
        }
    }

    /// Debug builds: the loads kept incrementally must equal a recomputation from scratch.
    fn check_loads(&self) {
        #[cfg(any(test, debug_assertions))]
        {
            let mut fresh = Loads::new(&self.model, self.me);
            for gi in 0..self.groups.len() {
                let (here, peer) = self.presence(gi);
                fresh.set(gi, here, peer);
            }
            if let Some(diff) = self.loads.diff(&fresh) {
                panic!("{}: incremental loads out of date: {diff}", self.me);
            }
        }
    }

    fn probing(&self) -> bool {
        !self.started_up || self.probes_pending > 0
    }

    fn locate(&self, group: &GroupId, resource: Option<&crate::model::ResourceId>) -> Option<(usize, usize)> {
        let gi = *self.index.get(group)?;
        match resource {
            None => Some((gi, 0)),
            Some(r) => {
                let ri = self.model.groups[gi].resources.iter().position(|x| &x.id == r)?;
                self.groups[gi].eligible_here.then_some((gi, ri))
            }
        }
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::ProbeResult { group, resource, running } => {
                let Some((gi, ri)) = self.locate(&group, Some(&resource)) else { return };
                let rt = &mut self.groups[gi];
                if rt.res[ri] != ResourceState::Unknown {
                    return;
                }
                rt.res[ri] = if running { ResourceState::Started } else { ResourceState::Stopped };
                self.probes_pending -= 1;
                if self.probes_pending == 0 {
                    self.adopt_running_resources();
                }
            }
            Event::ResourceStarted { group, resource } => {
                let Some((gi, ri)) = self.locate(&group, Some(&resource)) else { return };
                let rt = &mut self.groups[gi];
                if rt.res[ri] == ResourceState::Starting {
                    rt.res[ri] = ResourceState::Started;
                }
            }
            Event::ResourceStartFailed { group, resource } => {
                let Some((gi, ri)) = self.locate(&group, Some(&resource)) else { return };
                if self.groups[gi].res[ri] == ResourceState::Starting {
                    self.groups[gi].res[ri] = ResourceState::Failed;
                    self.on_resource_failure(gi, ri, None);
                }
            }
            Event::ResourceStopped { group, resource } => {
                let Some((gi, ri)) = self.locate(&group, Some(&resource)) else { return };
                let rt = &mut self.groups[gi];
                if rt.res[ri] == ResourceState::Stopping {
                    rt.res[ri] = ResourceState::Stopped;
                    rt.stop_attempts[ri] = 0;
                }
            }
            Event::ResourceMigrated { group, resource, to } => {
                let Some((gi, ri)) = self.locate(&group, Some(&resource)) else { return };
                let me = self.me;
                let rt = &mut self.groups[gi];
                if rt.res[ri] == ResourceState::Stopping {
                    rt.res[ri] = ResourceState::Stopped;
                    rt.stop_attempts[ri] = 0;
                    // Only while this node still holds the lease and is giving the group up:
                    // the note it releases with tells `to` that its paused copy is current.
                    if let Lease::Held(by_token) = rt.lease
                        && matches!(rt.goal, Goal::Release(_))
                        && to != me
                    {
                        rt.held_note.migrated = Some(Migrated { to, by_token });
                    }
                }
            }
            Event::ResourceStopFailed { group, resource } => {
                let Some((gi, ri)) = self.locate(&group, Some(&resource)) else { return };
                if self.groups[gi].res[ri] != ResourceState::Stopping {
                    return;
                }
                self.groups[gi].stop_attempts[ri] += 1;
                let g = &self.model.groups[gi];
                if self.groups[gi].stop_attempts[ri] >= g.recovery.max_stop_attempts {
                    // Better to kill the whole node than to let the next holder start the
                    // group while this copy may still run.
                    self.self_fenced = true;
                    self.out.push(Command::SelfFence { group: g.id.clone(), resource: g.resources[ri].id.clone() });
                } else {
                    let force = !matches!(self.groups[gi].lease, Lease::Held(_));
                    let handover = if force { None } else { self.handover_of(gi) };
                    let g = &self.model.groups[gi];
                    self.out.push(Command::StopResource {
                        group: g.id.clone(),
                        resource: g.resources[ri].id.clone(),
                        force,
                        handover,
                    });
                }
            }
            Event::MonitorFailed { group, resource, monitor } => {
                let Some((gi, ri)) = self.locate(&group, Some(&resource)) else { return };
                let rt = &mut self.groups[gi];
                if rt.res[ri] == ResourceState::Started && !rt.monitoring_suspended {
                    rt.res[ri] = ResourceState::Failed;
                    self.on_resource_failure(gi, ri, monitor.as_deref());
                }
            }
            Event::LeaseAcquired { group, token, note } => {
                let Some((gi, _)) = self.locate(&group, None) else { return };
                self.on_lease_acquired(gi, token, note);
            }
            Event::LeaseAcquireFailed { group, holder } => {
                let Some((gi, _)) = self.locate(&group, None) else { return };
                let retry = self.model.timing.acquire_retry_ms;
                let me = self.me;
                let rt = &mut self.groups[gi];
                if rt.lease == Lease::Acquiring {
                    rt.lease = Lease::NotHeld;
                    // Resources adopted from the probe now belong to someone else's lease:
                    // `reconcile` force-stops them.
                    rt.adopting = false;
                    rt.observed_holder = holder.filter(|h| *h != me);
                    rt.next_attempt_at = self.now + retry;
                }
            }
            Event::LeaseLost { group } => {
                let Some((gi, _)) = self.locate(&group, None) else { return };
                #[cfg(test)]
                if self.is_broken(BrokenRule::IgnoreLeaseLost) {
                    return;
                }
                let retry = self.model.timing.acquire_retry_ms;
                let rt = &mut self.groups[gi];
                // While acquiring there is nothing to lose yet: the pending answer decides.
                if matches!(rt.lease, Lease::Held(_)) {
                    rt.lease = Lease::NotHeld;
                    rt.goal = Goal::Run;
                    rt.adopting = false;
                    rt.migrated_in = false;
                    rt.to_restart.clear();
                    rt.running_since = None;
                    rt.observed_holder = None;
                    rt.observed_note = Some(rt.held_note.clone());
                    rt.next_attempt_at = self.now + retry;
                }
            }
            Event::LeaseObserved { group, holder, note } => {
                let Some((gi, _)) = self.locate(&group, None) else { return };
                if let Some(h) = holder
                    && self.groups[gi].observed_holder != Some(h)
                    && let Some(p) = self.peers.get_mut(&h)
                {
                    // A node seen taking a lease has a live lease layer again. A lease it
                    // still names from before its death says nothing (no one has taken it
                    // over yet, e.g. for want of capacity).
                    p.lease_dead = false;
                }
                let now = self.now;
                let me = self.me;
                let rt = &mut self.groups[gi];
                if rt.lease == Lease::NotHeld {
                    if holder.is_none() && rt.observed_holder.is_some_and(|h| h != me) {
                        // A lost holder released the lease (it stopped the group itself,
                        // e.g. on quorum loss): like a lease seen dead, ask again now and let
                        // the stagger count from here so the preferred node goes first.
                        rt.next_attempt_at = now;
                        if rt.free_since.is_some() {
                            rt.free_since = Some(now);
                        }
                    }
                    rt.observed_holder = holder;
                    if note.is_some() {
                        rt.observed_note = note;
                    }
                }
            }
            Event::NodeJoined(n) => {
                if let Some(p) = self.peers.get_mut(&n) {
                    *p = Peer { up: true, standby: p.standby, ..Peer::default() };
                }
            }
            Event::NodeLost(n) => {
                if let Some(p) = self.peers.get_mut(&n) {
                    *p = Peer { up: false, standby: p.standby, ..Peer::default() };
                }
            }
            Event::PeerStandby { node, standby } => {
                if let Some(p) = self.peers.get_mut(&node) {
                    p.standby = standby;
                }
            }
            Event::SetStandby(mode) => {
                #[cfg(test)]
                if self.is_broken(BrokenRule::IgnoreStandby) {
                    return;
                }
                self.set_standby(mode)
            }
            Event::LocalVeto { group, reason } => {
                let Some((gi, _)) = self.locate(&group, None) else { return };
                self.groups[gi].veto = reason;
            }
            Event::PeerFenced(n) => {
                if let Some(p) = self.peers.get_mut(&n) {
                    let newly_dead = !p.lease_dead;
                    p.lease_dead = true;
                    let now = self.now;
                    for rt in &mut self.groups {
                        if rt.observed_holder == Some(n) {
                            rt.next_attempt_at = now;
                            // The takeover stagger counts from the moment the lease is seen
                            // dead: every candidate tried (and was refused) while it was
                            // alive, so otherwise the first to notice would win, not the most
                            // preferred. Only on that edge: the observer repeats the verdict
                            // every round, and a stagger restarted each time would never let
                            // a lower-ranked node act when the first one cannot.
                            if newly_dead && rt.free_since.is_some() {
                                rt.free_since = Some(now);
                            }
                        }
                    }
                }
            }
            Event::PeerLeaseAlive(n) => {
                if let Some(p) = self.peers.get_mut(&n) {
                    p.lease_dead = false;
                }
            }
            Event::FenceConfirmed(n) => {
                if let Some(p) = self.peers.get_mut(&n) {
                    p.fence_confirmed = true;
                    p.fence_requested = false;
                }
            }
            Event::QuorumLost => self.quorum = false,
            Event::QuorumRegained => self.quorum = true,
            Event::Operator { seq, command } => self.apply_operator(seq, command),
            Event::Tick => {}
        }
    }

    fn set_standby(&mut self, mode: Option<StandbyMode>) {
        if self.standby == mode {
            return;
        }
        self.standby = mode;
        self.out.push(Command::Notify(Notice::Standby { mode }));
        let me = self.me;
        for rt in &mut self.groups {
            // A standby release still stopping follows the new mode: parked or not as the
            // mode now says. Leaving standby does not turn it back into a run here (a group
            // held as failed, or with a failure ignored while stopping, would not restart
            // correctly): it completes, unparked, and this node competes for it again.
            if !matches!(rt.lease, Lease::Held(_)) || rt.goal != Goal::Release(ReleaseReason::Standby) {
                continue;
            }
            let parked = rt.held_note.desired == Desired::Stopped(StopCause::Parked(me));
            match mode {
                None | Some(StandbyMode::Move) if parked => rt.held_note.desired = Desired::Started,
                Some(StandbyMode::Park) if rt.held_note.desired == Desired::Started => {
                    rt.held_note.desired = Desired::Stopped(StopCause::Parked(me));
                }
                _ => {}
            }
        }
    }

    /// Decision (documented in docs/engine.md): resources found running are adopted if this
    /// node can get the lease (nobody else holds it, so nobody else runs them); otherwise
    /// they are force-stopped. Adopting avoids bouncing applications on an agent restart.
    fn adopt_running_resources(&mut self) {
        for (g, rt) in self.model.groups.iter().zip(self.groups.iter_mut()) {
            if rt.eligible_here && rt.res.contains(&ResourceState::Started) && rt.lease == Lease::NotHeld {
                rt.adopting = true;
                rt.asked_before = true;
                rt.lease = Lease::Acquiring;
                self.out.push(Command::AcquireLease { group: g.id.clone() });
            }
        }
    }

    fn on_lease_acquired(&mut self, gi: usize, token: LeaseToken, note: Option<LeaseNote>) {
        let g = &self.model.groups[gi];
        let me = self.me;
        let online = self.standby.is_none();
        #[cfg(test)]
        let resume_any = self.is_broken(BrokenRule::ResumeAnyMigration);
        #[cfg(not(test))]
        let resume_any = false;
        let rt = &mut self.groups[gi];
        match rt.lease {
            Lease::Acquiring => {
                rt.lease = Lease::Held(token);
                rt.held_note = merge(&note.unwrap_or_else(|| LeaseNote::initial(g)), &rt.intent);
                // A migrated state is resumed by the very next holder or never: this grant
                // consumes the mark, whoever got it.
                // Only the very next holder after the migrating one may resume: consecutive
                // grants have consecutive tokens, so any holder in between (even one that died
                // before it could rewrite the note) shows as a gap.
                let next = |m: &Migrated| resume_any || token.0 == m.by_token.0.saturating_add(1);
                rt.migrated_in = rt.held_note.migrated.is_some_and(|m| m.to == me && next(&m)) && !rt.adopting;
                rt.held_note.migrated = None;
                #[cfg(test)]
                let me = match (self.broken, rt.held_note.desired) {
                    (Some(BrokenRule::StartParked), Desired::Stopped(StopCause::Parked(p))) => p,
                    _ => me,
                };
                if online && rt.held_note.desired == Desired::Stopped(StopCause::Parked(me)) {
                    // This node parked the group and is back: it is wanted again, on its
                    // best node (this one keeps it only if it is that node).
                    rt.held_note.desired = Desired::Started;
                    rt.check_best = true;
                }
                rt.observed_holder = Some(self.me);
                rt.goal = Goal::Run;
                // Adopted resources already run here: they are not moved for placement.
                rt.check_fit = !rt.adopting;
                rt.to_restart.clear();
                rt.restarts.clear();
                rt.monitor_restarts.clear();
                rt.running_since = None;
                if rt.adopting {
                    rt.adopting = false;
                    for (i, r) in g.resources.iter().enumerate() {
                        if matches!(rt.res[i], ResourceState::Started | ResourceState::Failed) {
                            self.out.push(Command::AdoptResource {
                                group: g.id.clone(),
                                resource: r.id.clone(),
                                token,
                            });
                        }
                        if rt.res[i] == ResourceState::Failed {
                            // Failed while we waited for the lease: restart it and what needs it.
                            rt.to_restart.insert(i);
                            rt.to_restart.extend(g.dependents_of(i));
                        }
                    }
                }
            }
            Lease::Held(t) if token > t => {
                // A newer grant of the same lease (the runtime re-acquired it): whatever runs
                // must carry the new token.
                rt.lease = Lease::Held(token);
                for (i, r) in g.resources.iter().enumerate() {
                    if !matches!(rt.res[i], ResourceState::Stopped | ResourceState::Unknown) {
                        self.out.push(Command::AdoptResource { group: g.id.clone(), resource: r.id.clone(), token });
                    }
                }
            }
            Lease::Held(_) => {}
            Lease::NotHeld => {
                // A grant nobody waits for (a late answer after LeaseLost, a duplicate):
                // give it back untouched.
                let n = merge(&note.unwrap_or_else(|| LeaseNote::initial(g)), &rt.intent);
                self.out.push(Command::ReleaseLease {
                    group: g.id.clone(),
                    token,
                    note: n,
                    reason: ReleaseReason::Stopped,
                });
            }
        }
    }

    /// A resource failed (its start, its built-in check, or `monitor`): restart it in place
    /// while the restart limit that applies allows (the monitor's own, else the group's),
    /// else fail the group over, or take the final action past the failover limit.
    fn on_resource_failure(&mut self, gi: usize, ri: usize, monitor: Option<&str>) {
        let now = self.now;
        let me = self.me;
        let g = &self.model.groups[gi];
        let rt = &mut self.groups[gi];
        rt.running_since = None;
        // A restart starts afresh: whatever was migrated in is no longer what should run.
        rt.migrated_in = false;
        if !matches!(rt.lease, Lease::Held(_)) || rt.goal != Goal::Run {
            // Already leaving or not ours: the stop path cleans it up.
            return;
        }
        let own = monitor.and_then(|m| g.monitor_recovery.get_key_value(m));
        let (limit, window_ms, restarts) = match own {
            Some((name, l)) => {
                (l.max_restarts, l.restart_window_ms, rt.monitor_restarts.entry(name.clone()).or_default())
            }
            None => (g.recovery.max_restarts, g.recovery.restart_window_ms, &mut rt.restarts),
        };
        let window_start = now.saturating_sub(window_ms);
        while restarts.front().is_some_and(|t| *t < window_start) {
            restarts.pop_front();
        }
        if (restarts.len() as u64) < u64::from(limit) {
            restarts.push_back(now);
            rt.to_restart.insert(ri);
            rt.to_restart.extend(g.dependents_of(ri));
            return;
        }
        #[cfg(test)]
        let limit_enforced = self.broken != Some(BrokenRule::NoFailoverLimit);
        #[cfg(not(test))]
        let limit_enforced = true;
        let note = &mut rt.held_note;
        if note.failovers >= g.recovery.max_failovers && limit_enforced {
            self.out
                .push(Command::Notify(Notice::FailoverLimitReached { group: g.id.clone(), failovers: note.failovers }));
            match g.recovery.final_action {
                FinalAction::StopEverywhere => {
                    note.desired = Desired::Stopped(StopCause::FailoverLimit);
                    rt.goal = Goal::Release(ReleaseReason::FailoverLimit);
                }
                FinalAction::DoNothing => rt.goal = Goal::Hold,
            }
        } else {
            note.failovers = note.failovers.saturating_add(1);
            note.mark_failed_on(me);
            if note.preferred == Some(me) {
                note.preferred = None;
            }
            rt.goal = Goal::Release(ReleaseReason::Failover);
        }
    }

    fn apply_operator(&mut self, seq: u64, command: OperatorCommand) {
        let Some(&gi) = self.index.get(command.group()) else {
            self.out.push(Command::Notify(Notice::OperatorRejected {
                seq,
                reason: format!("unknown group `{}`; check the group name against the cluster status", command.group()),
            }));
            return;
        };
        let g = &self.model.groups[gi];
        let rt = &mut self.groups[gi];
        let set_desired = |rt: &mut GroupRuntime, desired: Desired, preferred: Option<NodeId>| {
            if seq > rt.intent.desired_seq {
                rt.intent.desired = desired;
                rt.intent.preferred = preferred;
                rt.intent.desired_seq = seq;
                rt.handoff_backoff_until = 0;
            }
        };
        match command {
            OperatorCommand::StartGroup(_) => set_desired(rt, Desired::Started, None),
            OperatorCommand::StopGroup(_) => set_desired(rt, Desired::Stopped(StopCause::Operator), None),
            OperatorCommand::MoveGroup { to, .. } => {
                if !g.placement.eligible.contains(&to) {
                    self.out.push(Command::Notify(Notice::OperatorRejected {
                        seq,
                        reason: format!(
                            "cannot move group `{}` to {to}: it is not eligible; eligible nodes: {:?}",
                            g.id, g.placement.eligible
                        ),
                    }));
                    return;
                }
                set_desired(rt, Desired::Started, Some(to));
            }
            OperatorCommand::ResetCounters(_) => {
                if seq > rt.intent.reset_seq {
                    rt.intent.reset_seq = seq;
                }
                rt.restarts.clear();
                rt.monitor_restarts.clear();
                if rt.goal == Goal::Hold {
                    rt.goal = Goal::Run;
                    for i in 0..rt.res.len() {
                        if rt.res[i] == ResourceState::Failed {
                            rt.to_restart.insert(i);
                            rt.to_restart.extend(g.dependents_of(i));
                        }
                    }
                }
            }
            OperatorCommand::SuspendMonitoring(_) => rt.monitoring_suspended = true,
            OperatorCommand::ResumeMonitoring(_) => rt.monitoring_suspended = false,
        }
        if matches!(rt.lease, Lease::Held(_)) {
            rt.held_note = merge(&rt.held_note, &rt.intent);
        }
    }

    /// The note this node acts on for group `gi`.
    fn effective_note(&self, gi: usize) -> LeaseNote {
        let rt = &self.groups[gi];
        match rt.lease {
            Lease::Held(_) => rt.held_note.clone(),
            _ => {
                let base = rt.observed_note.clone().unwrap_or_else(|| LeaseNote::initial(&self.model.groups[gi]));
                merge(&base, &rt.intent)
            }
        }
    }

    /// Whether this node may take part at all: quorum, not self-fenced, probes done.
    fn can_act(&self) -> bool {
        self.quorum && !self.self_fenced && !self.probing()
    }

    /// Whether node `n` is a healthy place for groups: up (itself: able to act), host lease
    /// not dead, and not in standby.
    fn node_healthy(&self, n: NodeId) -> bool {
        if n == self.me {
            self.can_act() && self.standby.is_none()
        } else {
            self.peers.get(&n).is_some_and(|p| p.up && !p.lease_dead && !p.standby)
        }
    }

    /// Whether node `n` would be healthy but for its standby.
    fn healthy_but_standby(&self, n: NodeId) -> bool {
        if n == self.me {
            self.can_act() && self.standby.is_some()
        } else {
            self.peers.get(&n).is_some_and(|p| p.up && !p.lease_dead && p.standby)
        }
    }

    /// Whether group `gj` occupies this node: held, being acquired, or with resources not
    /// stopped (starting, running, failed, stopping). Exact: it is this node's own state.
    fn occupies_here(&self, gj: usize) -> bool {
        let rt = &self.groups[gj];
        rt.lease != Lease::NotHeld
            || rt.res.iter().any(|s| !matches!(s, ResourceState::Stopped | ResourceState::Unknown))
    }

    /// Why group `gi` cannot become active on node `n`, if it cannot: an anti-affine group
    /// active there (the lowest-index one, named with the first of `gi`'s sets it is in), or
    /// not enough capacity left for its demand. "Active on n": this node's own state for
    /// itself (`occupies_here`), the observed lease holders for peers (see `presence`).
    fn unfit(&self, gi: usize, n: NodeId) -> Option<Unfit> {
        let why = self.unfit_by_loads(gi, n);
        #[cfg(test)]
        assert_eq!(why, self.unfit_by_scan(gi, n), "{}: loads and scan disagree on group {gi} on {n}", self.me);
        why
    }

    fn unfit_by_loads(&self, gi: usize, n: NodeId) -> Option<Unfit> {
        let g = &self.model.groups[gi];
        let cap = self.model.capacity.get(&n);
        if g.anti_affinity.is_empty() && (cap.is_none() || g.demand.is_zero()) {
            return None;
        }
        #[cfg(test)]
        if self.is_broken(BrokenRule::IgnorePlacement) {
            return None;
        }
        if let Some(gj) = self.loads.anti_affine_on(gi, n) {
            let other = &self.model.groups[gj];
            if let Some(set) = g.anti_affinity.iter().find(|s| other.anti_affinity.contains(s)) {
                return Some(Unfit::AntiAffinity { group: other.id.clone(), set: set.clone() });
            }
        }
        misfit(g.demand, cap?.saturating_sub(self.loads.used_by_others(gi, n)))
    }

    /// Whether node `n` runs a group sharing an affinity set with group `gi`.
    fn has_partner(&self, gi: usize, n: NodeId) -> bool {
        let partner = !self.model.groups[gi].affinity.is_empty() && self.loads.partner_on(gi, n);
        #[cfg(test)]
        assert_eq!(
            partner,
            self.has_partner_by_scan(gi, n),
            "{}: loads and scan disagree on group {gi} on {n}",
            self.me
        );
        partner
    }

    /// Tests: the groups other than `except` active on node `n`, by scanning every group
    /// (what placement did before the loads; every answer of the loads is checked with it).
    #[cfg(test)]
    fn active_on(&self, n: NodeId, except: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.groups.len()).filter(move |&gj| {
            gj != except
                && if n == self.me {
                    self.occupies_here(gj)
                } else {
                    self.groups[gj].lease == Lease::NotHeld && self.groups[gj].observed_holder == Some(n)
                }
        })
    }

    /// Tests: `unfit` by scanning every group.
    #[cfg(test)]
    fn unfit_by_scan(&self, gi: usize, n: NodeId) -> Option<Unfit> {
        let g = &self.model.groups[gi];
        let cap = self.model.capacity.get(&n);
        if g.anti_affinity.is_empty() && (cap.is_none() || g.demand.is_zero()) {
            return None;
        }
        if self.is_broken(BrokenRule::IgnorePlacement) {
            return None;
        }
        let mut used = crate::model::Capacity::ZERO;
        for gj in self.active_on(n, gi) {
            let other = &self.model.groups[gj];
            if let Some(set) = g.anti_affinity.iter().find(|s| other.anti_affinity.contains(s)) {
                return Some(Unfit::AntiAffinity { group: other.id.clone(), set: set.clone() });
            }
            used += other.demand;
        }
        misfit(g.demand, cap?.saturating_sub(used))
    }

    /// Tests: `has_partner` by scanning every group.
    #[cfg(test)]
    fn has_partner_by_scan(&self, gi: usize, n: NodeId) -> bool {
        let g = &self.model.groups[gi];
        !g.affinity.is_empty()
            && self.active_on(n, gi).any(|gj| self.model.groups[gj].affinity.iter().any(|s| g.affinity.contains(s)))
    }

    /// The healthy eligible nodes of group `gi`: those it fits on, best first (the operator's
    /// move target first, nodes that failed the group last, nodes running an affinity
    /// partner before the others, policy order otherwise: unique, so no further ties), and
    /// those it does not fit on, with why, in policy order.
    fn placement(&self, gi: usize, note: &LeaseNote) -> (Vec<(RankKey, NodeId)>, Unplaced) {
        let mut fit = Vec::new();
        let mut unfit = Vec::new();
        for (order, n) in self.model.groups[gi].placement.eligible.iter().enumerate() {
            if !self.node_healthy(*n) || (*n == self.me && self.groups[gi].veto.is_some()) {
                continue;
            }
            match self.unfit(gi, *n) {
                Some(why) => unfit.push((*n, why)),
                None => fit.push((
                    RankKey {
                        // The node holding a migrated paused copy ranks with the move target:
                        // it can resume the VM instead of booting it.
                        not_target: note.preferred != Some(*n) && note.migrated.is_none_or(|m| m.to != *n),
                        failed: note.failed_on.contains(n),
                        no_partner: !self.has_partner(gi, *n),
                        order,
                    },
                    *n,
                )),
            }
        }
        fit.sort();
        (fit, unfit)
    }

    /// Healthy eligible nodes the group fits on, best first (see `placement`).
    fn candidates(&self, gi: usize, note: &LeaseNote) -> Vec<NodeId> {
        self.placement(gi, note).0.into_iter().map(|(_, n)| n).collect()
    }

    /// Evaluates every group; once more if a lease was released meanwhile (its capacity
    /// may let another group start now); then reports groups that fit nowhere.
    fn evaluate(&mut self) {
        self.released.clear();
        self.evaluate_all(None);
        let released = std::mem::take(&mut self.released);
        if !released.is_empty() && !self.self_fenced {
            // A group just released is not reconsidered here: its own timers start at the
            // next event, as they would without the second pass.
            self.evaluate_all(Some(&released));
        }
        self.track_no_capacity();
    }

    /// Emits `NoCapacity` when a group this node is eligible for becomes unplaceable, and
    /// `NoCapacityResolved` when it no longer is.
    fn track_no_capacity(&mut self) {
        if self.probing() || !self.quorum || self.self_fenced {
            // Nothing can be judged from here now; keep the last verdict.
            return;
        }
        for gi in 0..self.groups.len() {
            if !self.groups[gi].eligible_here {
                continue;
            }
            let blocked = self.no_capacity(gi);
            let group = self.model.groups[gi].id.clone();
            let rt = &mut self.groups[gi];
            match (blocked, rt.no_capacity_reported) {
                (Some(nodes), false) => {
                    rt.no_capacity_reported = true;
                    self.out.push(Command::Notify(Notice::NoCapacity { group, nodes }));
                }
                (None, true) => {
                    rt.no_capacity_reported = false;
                    self.out.push(Command::Notify(Notice::NoCapacityResolved { group }));
                }
                _ => {}
            }
        }
    }

    /// Why group `gi` fits on no healthy eligible node, when it should run, runs nowhere
    /// (as far as this node knows) and some healthy eligible node exists.
    fn no_capacity(&self, gi: usize) -> Option<Vec<(NodeId, Unfit)>> {
        if self.occupies_here(gi) {
            return None;
        }
        // Before the note: the common case at scale, and no note to copy for it.
        if let Some(h) = self.groups[gi].observed_holder
            && h != self.me
            && (self.node_healthy(h) || self.healthy_but_standby(h))
        {
            // It runs there (a standby holder is still stopping it): not blocked yet.
            return None;
        }
        let note = self.effective_note(gi);
        if note.desired != Desired::Started {
            return None;
        }
        let (fit, unfit) = self.placement(gi, &note);
        (fit.is_empty() && !unfit.is_empty()).then_some(unfit)
    }

    /// One pass over the groups, highest priority first, so that a higher-priority group
    /// claims this node's capacity before a lower one in the same pass.
    fn evaluate_all(&mut self, skip: Option<&BTreeSet<usize>>) {
        if self.probing() {
            return;
        }
        for k in 0..self.order.len() {
            let gi = self.order[k];
            if skip.is_some_and(|s| s.contains(&gi)) {
                continue;
            }
            if !self.groups[gi].eligible_here {
                continue;
            }
            match self.groups[gi].lease {
                Lease::Held(_) => self.evaluate_held(gi),
                Lease::NotHeld => self.consider_acquire(gi),
                Lease::Acquiring => {}
            }
            self.reconcile(gi);
            // Later groups of this pass place themselves around this one's new state.
            self.refresh(gi);
        }
    }

    fn evaluate_held(&mut self, gi: usize) {
        let now = self.now;
        let g = &self.model.groups[gi];
        let note = self.groups[gi].held_note.clone();
        let (fit, _) = self.placement(gi, &note);
        let quorum = self.quorum;
        let me = self.me;
        let best = fit.first().copied();
        let mine = fit.iter().find(|(_, n)| *n == me).map(|(k, _)| *k);
        let standby = self.standby;
        let rt = &mut self.groups[gi];
        let check_fit = std::mem::take(&mut rt.check_fit);
        let check_best = std::mem::take(&mut rt.check_best);
        if matches!(rt.goal, Goal::Run | Goal::Hold) && !quorum {
            rt.goal = Goal::Release(ReleaseReason::QuorumLost);
        }
        if !matches!(rt.goal, Goal::Run | Goal::Hold) {
            return;
        }
        match note.desired {
            Desired::Stopped(StopCause::FailoverLimit) => {
                rt.goal = Goal::Release(ReleaseReason::FailoverLimit);
                return;
            }
            Desired::Stopped(_) => {
                rt.goal = Goal::Release(ReleaseReason::Stopped);
                return;
            }
            Desired::Started => {}
        }
        if let Some(mode) = standby {
            // Planned maintenance, not a failure: nothing is counted or marked.
            if mode == StandbyMode::Park {
                rt.held_note.desired = Desired::Stopped(StopCause::Parked(me));
            }
            rt.goal = Goal::Release(ReleaseReason::Standby);
            return;
        }
        if rt.veto.is_some() {
            // A failure of this node for this group (peers rank it last), but not of the
            // group: no restart and no failover counted.
            rt.held_note.mark_failed_on(me);
            if rt.held_note.preferred == Some(me) {
                rt.held_note.preferred = None;
            }
            rt.goal = Goal::Release(ReleaseReason::Vetoed);
            return;
        }
        if check_fit && rt.goal == Goal::Run && mine.is_none() {
            // Granted a lease without the placement check (a reclaim), and the group does
            // not fit here: give it to a node where it fits before starting anything.
            rt.goal = Goal::Release(ReleaseReason::NoCapacity);
            return;
        }
        if check_best
            && rt.goal == Goal::Run
            && let Some((_, b)) = best
            && b != me
        {
            // Unparked by this node, but another node is the group's best place now.
            rt.goal = Goal::Release(ReleaseReason::Handoff { to: b });
            return;
        }
        if let Some((best_key, best)) = best
            && best != me
            && now >= rt.handoff_backoff_until
            && (note.preferred == Some(best)
                || (rt.goal == Goal::Run
                    && g.placement.failback == Failback::Auto
                    && !note.failed_on.contains(&best)
                    && mine.is_none_or(|m| best_key.without_affinity() < m.without_affinity())))
        {
            rt.goal = Goal::Release(ReleaseReason::Handoff { to: best });
            return;
        }
        // A stable run clears the failover history (the failover window).
        if rt.goal == Goal::Run
            && rt.running_since.is_some_and(|t| now.saturating_sub(t) >= g.recovery.failover_window_ms)
            && (rt.held_note.failovers > 0 || !rt.held_note.failed_on.is_empty())
        {
            rt.held_note.failovers = 0;
            rt.held_note.failed_on.clear();
        }
    }

    fn consider_acquire(&mut self, gi: usize) {
        if !self.quorum || self.self_fenced {
            return;
        }
        let now = self.now;
        let me = self.me;
        #[allow(unused_mut)]
        let mut note = self.effective_note(gi);
        #[cfg(test)]
        if self.is_broken(BrokenRule::StartParked) && matches!(note.desired, Desired::Stopped(StopCause::Parked(_))) {
            note.desired = Desired::Started;
        }
        let require_fencing = self.model.groups[gi].placement.require_fencing;
        let stagger = self.model.timing.takeover_stagger_ms;
        let holder = self.groups[gi].observed_holder;
        if self.groups[gi].res.iter().any(|s| *s != ResourceState::Stopped) {
            // Leftovers of a lost or refused lease are still stopping: a new token must not
            // cover resources started under an old one.
            return;
        }
        if holder == Some(me) && !self.groups[gi].asked_before {
            // Our own lease from before a restart: take it back, then keep or release it.
            if now >= self.groups[gi].next_attempt_at {
                self.request_lease(gi);
            }
            return;
        }
        if note.desired == Desired::Stopped(StopCause::Parked(me)) {
            // Parked by this node: once out of standby, take the lease to unpark it (the
            // grant rewrites the note, then the group runs on its best node).
            self.groups[gi].free_since = None;
            if self.standby.is_none() && holder.is_none_or(|h| h == me) && now >= self.groups[gi].next_attempt_at {
                self.request_lease(gi);
            }
            return;
        }
        if note.desired != Desired::Started {
            self.groups[gi].free_since = None;
            return;
        }
        if let Some(h) = holder
            && h != me
            && self.peers.get(&h).is_some_and(|p| p.up && !p.lease_dead)
        {
            // A reachable holder with a live lease: not free, whatever the candidates (the
            // common case at scale, so placement is not computed for it).
            self.groups[gi].free_since = None;
            return;
        }
        let candidates = self.candidates(gi, &note);
        let Some(rank) = candidates.iter().position(|n| *n == me) else {
            self.groups[gi].free_since = None;
            if holder == Some(me) && self.can_act() && now >= self.groups[gi].next_attempt_at {
                // The lease says we hold a group that does not fit here (a release that
                // never reached the disk): peers wait for us, so take it back; the grant's
                // placement check releases it to a node where it fits.
                self.request_lease(gi);
            }
            return;
        };
        let free = match holder {
            None => true,
            Some(h) if h == me => true,
            Some(h) => {
                let p = self.peers.get(&h).copied().unwrap_or_default();
                if p.up {
                    // A reachable holder whose lease died stopped the group itself.
                    p.lease_dead
                } else if require_fencing {
                    if !p.fence_confirmed && !p.fence_requested {
                        if let Some(peer) = self.peers.get_mut(&h) {
                            peer.fence_requested = true;
                        }
                        self.out.push(Command::RequestFence { node: h });
                    }
                    p.fence_confirmed
                } else {
                    // The lease layer refuses until the lost holder's lease is dead: the
                    // first candidate asks at once (it gets the lease the moment the lease
                    // layer agrees); the others wait until they see the lease dead, so that a
                    // refused early attempt cannot let a less preferred node win the race.
                    rank == 0 || p.lease_dead
                }
            }
        };
        let rt = &mut self.groups[gi];
        if !free {
            rt.free_since = None;
            return;
        }
        let since = *rt.free_since.get_or_insert(now);
        if now >= since + stagger * rank as u64 && now >= rt.next_attempt_at {
            self.request_lease(gi);
        }
    }

    fn request_lease(&mut self, gi: usize) {
        let rt = &mut self.groups[gi];
        rt.lease = Lease::Acquiring;
        rt.asked_before = true;
        self.out.push(Command::AcquireLease { group: self.model.groups[gi].id.clone() });
        #[cfg(test)]
        if self.broken == Some(BrokenRule::StartBeforeLease) {
            let note = self.effective_note(gi);
            let rt = &mut self.groups[gi];
            rt.lease = Lease::Held(LeaseToken(0));
            rt.goal = Goal::Run;
            rt.held_note = note;
        }
    }

    /// Where a planned stop of group `gi` hands it to, if it is a handover to one known node:
    /// the target of a handoff (operator move, failback), or, for a standby release in move
    /// mode or a veto release, the best other node by this node's placement (the one that
    /// will take the lease first). `None` for every other stop (failures, quorum loss, parking, operator stop…).
    fn handover_of(&self, gi: usize) -> Option<Handover> {
        let rt = &self.groups[gi];
        if !matches!(rt.lease, Lease::Held(_)) {
            return None;
        }
        match rt.goal {
            Goal::Release(reason @ ReleaseReason::Handoff { to }) => Some(Handover { to, reason }),
            Goal::Release(reason @ ReleaseReason::Standby)
                if self.standby == Some(StandbyMode::Move) && rt.held_note.desired == Desired::Started =>
            {
                let (fit, _) = self.placement(gi, &rt.held_note);
                fit.into_iter().map(|(_, n)| n).find(|n| *n != self.me).map(|to| Handover { to, reason })
            }
            // A local veto (a failed network here): the group is healthy and leaves for the
            // best other node, like a standby move.
            Goal::Release(reason @ ReleaseReason::Vetoed) if rt.held_note.desired == Desired::Started => {
                let (fit, _) = self.placement(gi, &rt.held_note);
                fit.into_iter().map(|(_, n)| n).find(|n| *n != self.me).map(|to| Handover { to, reason })
            }
            _ => None,
        }
    }

    /// Moves the group's resources one step towards what the lease and goal call for.
    /// One resource operation at a time per group, so order is easy to prove.
    fn reconcile(&mut self, gi: usize) {
        let now = self.now;
        let retry = self.model.timing.acquire_retry_ms;
        let handover = self.handover_of(gi);
        let g = &self.model.groups[gi];
        let rt = &mut self.groups[gi];
        if rt.adopting || rt.res.iter().any(|s| matches!(s, ResourceState::Starting | ResourceState::Stopping)) {
            return;
        }
        let active = |s: &ResourceState| matches!(s, ResourceState::Started | ResourceState::Failed);
        let held = matches!(rt.lease, Lease::Held(_));
        let stop_all = !held || matches!(rt.goal, Goal::Release(_));
        let victim = if stop_all {
            (0..rt.res.len()).rev().find(|i| active(&rt.res[*i]))
        } else if rt.goal == Goal::Hold {
            None
        } else {
            rt.to_restart.iter().rev().copied().find(|i| active(&rt.res[*i]))
        };
        if let Some(i) = victim {
            rt.res[i] = ResourceState::Stopping;
            rt.running_since = None;
            self.out.push(Command::StopResource {
                group: g.id.clone(),
                resource: g.resources[i].id.clone(),
                force: !held,
                handover: if held { handover } else { None },
            });
            return;
        }
        rt.to_restart.clear();
        let Lease::Held(token) = rt.lease else { return };
        match rt.goal {
            Goal::Release(reason) => {
                self.out.push(Command::ReleaseLease { group: g.id.clone(), token, note: rt.held_note.clone(), reason });
                match reason {
                    ReleaseReason::Standby => self.out.push(Command::Notify(Notice::StandbyReleased {
                        group: g.id.clone(),
                        parked: rt.held_note.desired == Desired::Stopped(StopCause::Parked(self.me)),
                    })),
                    ReleaseReason::Vetoed => self.out.push(Command::Notify(Notice::VetoReleased {
                        group: g.id.clone(),
                        reason: rt.veto.clone().unwrap_or_default(),
                    })),
                    _ => {}
                }
                rt.lease = Lease::NotHeld;
                rt.goal = Goal::Run;
                rt.migrated_in = false;
                rt.observed_holder = None;
                rt.observed_note = Some(rt.held_note.clone());
                rt.free_since = None;
                self.released.insert(gi);
                rt.restarts.clear();
                rt.monitor_restarts.clear();
                rt.next_attempt_at = now + retry;
                if matches!(reason, ReleaseReason::Handoff { .. }) {
                    // If the target never takes it, we take it back and do not hand it off
                    // again before a failover window passed: no handoff ping-pong.
                    rt.handoff_backoff_until = now + g.recovery.failover_window_ms;
                }
            }
            Goal::Run => match rt.res.iter().position(|s| *s == ResourceState::Stopped) {
                Some(i) => {
                    let deps_up = g.resources[i].depends_on.iter().all(|d| {
                        g.resources.iter().position(|r| &r.id == d).is_some_and(|k| rt.res[k] == ResourceState::Started)
                    });
                    if deps_up {
                        rt.res[i] = ResourceState::Starting;
                        self.out.push(Command::StartResource {
                            group: g.id.clone(),
                            resource: g.resources[i].id.clone(),
                            token,
                            migrated_in: rt.migrated_in,
                        });
                    }
                }
                None => {
                    if rt.res.iter().all(|s| *s == ResourceState::Started) {
                        rt.running_since.get_or_insert(now);
                    }
                }
            },
            Goal::Hold => {}
        }
    }

    /// Where an operator move without a target should send `group`: the best node, by the
    /// group's own placement (`candidates`: healthy, eligible, fits; the pinned node first,
    /// nodes that failed it last, then policy order), other than the node running it now. A
    /// query on this node's view: changes nothing. `None` for an unknown group.
    ///
    /// The runtime turns the answer into an ordinary `MoveGroup { to }`, so every node
    /// applies the same target whatever its own view.
    pub fn move_target(&self, group: &GroupId) -> Option<Result<NodeId, NoMoveTarget>> {
        let gi = *self.index.get(group)?;
        let rt = &self.groups[gi];
        let location = match rt.lease {
            Lease::Held(_) | Lease::Acquiring => Some(self.me),
            Lease::NotHeld if self.occupies_here(gi) => Some(self.me),
            Lease::NotHeld => rt.observed_holder,
        };
        let note = self.effective_note(gi);
        let (fit, unfit) = self.placement(gi, &note);
        if let Some((_, best)) = fit.iter().find(|(_, n)| Some(*n) != location) {
            return Some(Ok(*best));
        }
        let nodes = self.model.groups[gi]
            .placement
            .eligible
            .iter()
            .map(|&n| {
                let why = if Some(n) == location {
                    Unavailable::RunsIt
                } else if let Some((_, u)) = unfit.iter().find(|(m, _)| *m == n) {
                    Unavailable::Unfit(u.clone())
                } else if self.healthy_but_standby(n) {
                    Unavailable::Standby
                } else if n == self.me
                    && self.node_healthy(n)
                    && let Some(v) = &rt.veto
                {
                    Unavailable::Vetoed(v.clone())
                } else {
                    Unavailable::Down
                };
                (n, why)
            })
            .collect();
        Some(Err(NoMoveTarget { location, nodes }))
    }

    /// What this node knows of every group, and why groups that should run do not.
    pub fn status(&self) -> ClusterStatus {
        let groups = self
            .model
            .groups
            .iter()
            .enumerate()
            .map(|(gi, g)| {
                let rt = &self.groups[gi];
                let note = self.effective_note(gi);
                let any_active = rt.res.iter().any(|s| !matches!(s, ResourceState::Stopped | ResourceState::Unknown));
                let all_started = rt.res.iter().all(|s| *s == ResourceState::Started);
                let (state, location) = match rt.lease {
                    Lease::Held(_) => {
                        let s = match rt.goal {
                            Goal::Release(_) => GroupState::Stopping,
                            Goal::Hold => GroupState::Failed,
                            Goal::Run if all_started => GroupState::Started,
                            Goal::Run => GroupState::Starting,
                        };
                        (s, Some(self.me))
                    }
                    Lease::Acquiring => (GroupState::Starting, Some(self.me)),
                    Lease::NotHeld if any_active => (GroupState::Stopping, Some(self.me)),
                    Lease::NotHeld => match rt.observed_holder {
                        Some(h) if self.peers.get(&h).is_some_and(|p| p.up) => (GroupState::Started, Some(h)),
                        _ => match note.desired {
                            Desired::Stopped(StopCause::FailoverLimit) => (GroupState::Failed, None),
                            Desired::Stopped(_) => (GroupState::Stopped, None),
                            Desired::Started => (GroupState::Blocked, rt.observed_holder),
                        },
                    },
                };
                let not_running = match state {
                    GroupState::Started | GroupState::Starting => None,
                    _ => Some(self.not_running_reason(gi, &note)),
                };
                let within = |times: &VecDeque<u64>, window_ms: u64| {
                    let start = self.now.saturating_sub(window_ms);
                    times.iter().filter(|t| **t >= start).count() as u32
                };
                let monitor_restarts: Vec<(String, u32)> = rt
                    .monitor_restarts
                    .iter()
                    .filter_map(|(m, times)| {
                        let window = g.monitor_recovery.get(m)?.restart_window_ms;
                        Some((m.clone(), within(times, window))).filter(|(_, n)| *n > 0)
                    })
                    .collect();
                GroupStatus {
                    id: g.id.clone(),
                    state,
                    location,
                    restarts: within(&rt.restarts, g.recovery.restart_window_ms)
                        + monitor_restarts.iter().map(|(_, n)| n).sum::<u32>(),
                    monitor_restarts,
                    failovers: note.failovers,
                    failed_on: note.failed_on.clone(),
                    monitoring_suspended: rt.monitoring_suspended,
                    veto: rt.veto.clone(),
                    resources: g
                        .resources
                        .iter()
                        .zip(&rt.res)
                        .map(|(r, s)| ResourceStatus { id: r.id.clone(), state: *s })
                        .collect(),
                    not_running,
                }
            })
            .collect();
        ClusterStatus {
            node: self.me,
            quorum: self.quorum,
            probing: self.probing(),
            self_fenced: self.self_fenced,
            standby: self.standby,
            peers_in_standby: self.peers.iter().filter(|(_, p)| p.standby).map(|(n, _)| *n).collect(),
            groups,
        }
    }

    fn not_running_reason(&self, gi: usize, note: &LeaseNote) -> NotRunningReason {
        let rt = &self.groups[gi];
        if self.self_fenced {
            return NotRunningReason::SelfFenced;
        }
        match note.desired {
            Desired::Stopped(StopCause::Operator) => return NotRunningReason::OperatorStopped,
            Desired::Stopped(StopCause::NotAutoStarted) => return NotRunningReason::NotAutoStarted,
            Desired::Stopped(StopCause::FailoverLimit) => return NotRunningReason::FailoverLimitReached,
            Desired::Stopped(StopCause::Parked(n)) => return NotRunningReason::Parked(n),
            Desired::Started => {}
        }
        if rt.goal == Goal::Hold {
            return NotRunningReason::FailoverLimitReached;
        }
        if self.probing() {
            return NotRunningReason::Probing;
        }
        if !self.quorum {
            return NotRunningReason::NoQuorum;
        }
        if let Some(h) = rt.observed_holder
            && h != self.me
        {
            let p = self.peers.get(&h).copied().unwrap_or_default();
            if !p.up && self.model.groups[gi].placement.require_fencing && !p.fence_confirmed {
                return NotRunningReason::WaitingForFence(h);
            }
            if !p.lease_dead {
                return NotRunningReason::WaitingForLease(h);
            }
        }
        let (fit, unfit) = self.placement(gi, note);
        let standby: Vec<NodeId> =
            self.model.groups[gi].placement.eligible.iter().copied().filter(|n| self.healthy_but_standby(*n)).collect();
        if !fit.is_empty() {
            NotRunningReason::TakeoverPending
        } else if !unfit.is_empty() {
            NotRunningReason::NoCapacity { nodes: unfit }
        } else if let Some(reason) = &rt.veto
            && self.node_healthy(self.me)
        {
            NotRunningReason::LocalVeto { reason: reason.clone() }
        } else if !standby.is_empty() {
            NotRunningReason::Standby { nodes: standby }
        } else {
            NotRunningReason::NoEligibleNode
        }
    }
}
