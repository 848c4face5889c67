//! Deterministic multi-node simulation: N engines, a simulated lease authority, a runtime
//! that executes commands with delays, and faults (crashes, pauses, storage loss,
//! partitions, monitor failures, operator commands racing them). Every run is a function
//! of its seed; a failure prints the seed and the last steps.
//!
//! Run one seed: `TANDEM_SIM_SEED=1234 cargo test -p tandem-engine sim::`.
//! Change the number of seeds: `TANDEM_SIM_SEEDS=20000`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::engine::BrokenRule;
use crate::*;

/// A lease's holder stops renewing; after this long others may take it.
const LEASE_TTL: u64 = 8_000;
/// The lease layer tells the engine `LeaseLost` this long before others may take the lease.
const SELF_FENCE_BUDGET: u64 = 2_000;
/// Membership declares a silent node lost after this long.
const DETECT: u64 = 1_500;
/// The period of engine ticks, membership and lease checks.
const HEARTBEAT: u64 = 200;
/// Steps kept for a failure report (`TANDEM_SIM_TRACE` raises it when rerunning one seed).
static TRACE_LEN: std::sync::LazyLock<usize> =
    std::sync::LazyLock::new(|| std::env::var("TANDEM_SIM_TRACE").ok().and_then(|s| s.parse().ok()).unwrap_or(60));
const FAULT_PHASE: u64 = 45_000;
const QUIET_PHASE: u64 = 45_000;
/// After the faults stop, every group must have stopped changing hands this long before the end.
const STAYS_PUT: u64 = 15_000;

/// splitmix64: small, fast, and the same on every machine.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Up,
    Paused,
    Down,
}

#[derive(Debug)]
struct SimNode {
    id: NodeId,
    life: Life,
    /// Bumped on every crash: results of an older incarnation are dropped.
    inc: u64,
    /// Bumped when the node comes back from a crash or fence: its old leases are dead.
    epoch: u64,
    engine: Option<Engine>,
    partition: u32,
    storage_ok: bool,
    /// When the node stopped renewing its leases (`None`: renewing).
    renew_stopped_at: Option<u64>,
    /// Whether `LeaseLost` was delivered for the current renewal gap.
    lapse_reported: bool,
    /// Truth: per group, per resource, the token a running resource was started with.
    running: Vec<Vec<Option<LeaseToken>>>,
    resumed_at: Option<u64>,
    reported_up: Vec<bool>,
    truth_since: Vec<(bool, u64)>,
    reported_quorum: bool,
    peer_dead_reported: Vec<bool>,
    deferred: Vec<Action>,
    /// Truth: this node's standby (persisted: a restarted engine gets it back first thing).
    standby: Option<StandbyMode>,
    /// Truth: per group, whether a local veto forbids it here (re-fed to a restarted engine,
    /// as the condition's monitor would).
    veto: Vec<bool>,
    /// Per peer: the standby flag this node's engine was told.
    reported_standby: Vec<bool>,
    /// `SimOptions::batch`: the runtime is busy; what reaches it meanwhile (deliveries and
    /// completions, in order) waits here for the pending `Action::Flush`.
    held: Option<Vec<Action>>,
    /// During a flush: the events of the held actions, for one `handle_batch`.
    collecting: Option<Vec<Event>>,
}

#[derive(Debug, Clone)]
struct AuthorityLease {
    holder: Option<(usize, u64, LeaseToken)>,
    /// Once set, the holder's lease is dead from this time on whatever happens next.
    dead_after: Option<u64>,
    note: Option<LeaseNote>,
    next_token: u64,
}

#[derive(Debug, Clone)]
enum Action {
    Deliver {
        node: usize,
        inc: u64,
        event: Event,
    },
    Complete {
        node: usize,
        inc: u64,
        cmd: Command,
    },
    /// The runtime of `node` is no longer busy: the held actions take effect and their
    /// events reach the engine in one batch.
    Flush {
        node: usize,
        inc: u64,
    },
    Heartbeat,
    LeasePoll,
    Fault,
    Reboot(usize),
    Resume(usize),
    StorageBack(usize),
    Heal(usize),
    ResetWindowEnd(usize),
    QuietStart,
    Resend(Vec<(u64, OperatorCommand)>),
}

/// Per-group counters the checker keeps on its own, from what it sees happen.
#[derive(Debug, Default, Clone)]
struct GroupWatch {
    failovers_since_stable: u32,
    reset_in_flight: u32,
    /// Per node: since when every resource of the group has run there without a break.
    all_running_since: Vec<Option<u64>>,
    max_seen: u32,
    last_holder_change: u64,
}

/// Knobs of one simulation run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SimOptions {
    pub(crate) broken: Option<BrokenRule>,
    /// Make resources fail constantly (to drive failover limits).
    pub(crate) flappy: bool,
    /// Now and then a node's runtime is busy for a while: what reaches it meanwhile queues
    /// up and its events reach the engine in one `Engine::handle_batch`, as the node
    /// runtime drains its queue.
    pub(crate) batch: bool,
}

struct Sim {
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Action>,
    model: ClusterModel,
    nodes: Vec<SimNode>,
    leases: Vec<AuthorityLease>,
    watch: Vec<GroupWatch>,
    op_seq: u64,
    /// Every operator command so far: a (re)starting engine gets them replayed, as a
    /// runtime does from the API's durable operator state.
    op_log: Vec<(u64, OperatorCommand)>,
    faults_on: bool,
    opts: SimOptions,
    trace: Vec<String>,
    stats: SimStats,
    /// A rule broken inside a step (reported by the next check).
    violation: Option<String>,
    /// Per group: parked by that node with that desired sequence, from the releases applied;
    /// cleared by a later release that does not park, or by the parker's own grant while it
    /// is online (it unparks then).
    parked: Vec<Option<(NodeId, u64)>>,
    /// Per group: the node holding a paused copy a handover migrated there, and whether it
    /// is still current (no other node was granted the lease since).
    copies: Vec<Option<(usize, bool)>>,
}

/// What a run did, to show the simulation is not vacuous.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SimStats {
    pub(crate) starts: u64,
    pub(crate) failovers: u64,
    pub(crate) takeovers: u64,
    pub(crate) fences: u64,
    pub(crate) self_fences: u64,
    pub(crate) lease_lost: u64,
    pub(crate) crashes: u64,
    pub(crate) agent_restarts: u64,
    pub(crate) adoptions: u64,
    /// Steps at which a node with a capacity ran more than one group (capacity and
    /// anti-affinity were actually in play).
    pub(crate) shared_nodes: u64,
    /// Runs with a capacity model.
    pub(crate) placed_runs: u64,
    /// Nodes entering standby.
    pub(crate) standby_entries: u64,
    /// Leases released because of standby, parked or not.
    pub(crate) standby_releases: u64,
    /// Of those, parked.
    pub(crate) parked: u64,
    /// Parked groups taken back by their parker out of standby.
    pub(crate) unparks: u64,
    /// Leases released because of a local veto.
    pub(crate) veto_releases: u64,
    /// Crashes of a node in standby that still held a lease.
    pub(crate) standby_crashes: u64,
    /// Handover stops answered with `ResourceMigrated`.
    pub(crate) migrations: u64,
    /// Starts that resumed a migrated copy.
    pub(crate) resumes: u64,
    /// Batches fed with `handle_batch`.
    pub(crate) batches: u64,
    /// Events in them.
    pub(crate) batched_events: u64,
}

fn sim_model(rng: &mut Rng) -> ClusterModel {
    let recovery = |max_failovers, final_action| RecoveryPolicy {
        max_restarts: 1,
        restart_window_ms: 10_000,
        max_failovers,
        failover_window_ms: 15_000,
        final_action,
        max_stop_attempts: 3,
    };
    let placement = |eligible: &[u32], failback, require_fencing| PlacementPolicy {
        eligible: eligible.iter().map(|i| NodeId(*i)).collect(),
        failback,
        start_on_cluster_start: true,
        require_fencing,
    };
    let flip = |rng: &mut Rng| rng.chance(50);
    // One run in three has five nodes, with random eligible lists (2 to 4 nodes, random order).
    let five = rng.chance(33);
    let size = if five { 5 } else { 3 };
    let eligible = |fixed: &[u32], rng: &mut Rng| -> Vec<u32> {
        if !five {
            return fixed.to_vec();
        }
        let mut all: Vec<u32> = (1..=size).collect();
        for i in (1..all.len()).rev() {
            all.swap(i, rng.below(i + 1));
        }
        all.truncate(rng.range(2, 4) as usize);
        all
    };
    let (db, web, vm) = (eligible(&[1, 2], rng), eligible(&[2, 3, 1], rng), eligible(&[3, 1, 2], rng));
    let timing = Timing { takeover_stagger_ms: 1_000, acquire_retry_ms: 500 };
    let mut model = ClusterModel::new(
        (1..=size).map(NodeId).collect(),
        vec![
            FailoverGroup::new(
                "db".into(),
                vec![ResourceSpec::new("disk"), ResourceSpec::new("ip"), ResourceSpec::depending_on("app", &["disk"])],
                placement(&db, Failback::Auto, flip(rng)),
                recovery(2, FinalAction::StopEverywhere),
            ),
            FailoverGroup::new(
                "web".into(),
                vec![ResourceSpec::new("vip"), ResourceSpec::depending_on("nginx", &["vip"])],
                placement(&web, Failback::Manual, flip(rng)),
                recovery(2, FinalAction::DoNothing),
            ),
            FailoverGroup::new(
                "vm".into(),
                vec![ResourceSpec::new("vm")],
                placement(&vm, if flip(rng) { Failback::Auto } else { Failback::Manual }, flip(rng)),
                recovery(1, FinalAction::StopEverywhere),
            ),
        ],
        timing,
    );
    // Half the runs give db's `sql` monitor a restart limit of its own (a monitor's failures
    // are then restarted in place up to twice, apart from the group's one restart).
    if rng.chance(50) {
        model.groups[0]
            .monitor_recovery
            .insert("sql".into(), RestartLimit { max_restarts: 2, restart_window_ms: 8_000 });
    }
    // Half the runs place by capacity and (anti-)affinity. Capped nodes hold any two of the
    // three groups but never all three, and one pair is anti-affine, so a placement always
    // exists once every node is up, and a greedy one always finds it (no preemption needed).
    if rng.chance(50) {
        let demands = [Capacity::new(1_024, 2), Capacity::new(512, 1), Capacity::new(2_048, 2)];
        for (g, d) in model.groups.iter_mut().zip(demands) {
            g.demand = d;
            g.priority = rng.range(0, 2) as i32;
        }
        for n in 1..=size {
            if rng.chance(60) {
                model.capacity.insert(NodeId(n), Capacity::new(3_072, 4));
            }
        }
        let (a, b) = match rng.range(0, 2) {
            0 => (0, 1),
            1 => (0, 2),
            _ => (1, 2),
        };
        model.groups[a].anti_affinity.push("apart".into());
        model.groups[b].anti_affinity.push("apart".into());
        // The third group likes one of the anti-affine pair.
        let c = 3 - a - b;
        model.groups[c].affinity.push("near".into());
        model.groups[if rng.chance(50) { a } else { b }].affinity.push("near".into());
    }
    model
}

impl Sim {
    fn new(seed: u64, opts: SimOptions) -> Self {
        let mut rng = Rng(seed);
        let model = sim_model(&mut rng);
        let n = model.nodes.len();
        let nodes = model
            .nodes
            .iter()
            .map(|id| SimNode {
                id: *id,
                life: Life::Down,
                inc: 0,
                epoch: 0,
                engine: None,
                partition: 0,
                storage_ok: true,
                renew_stopped_at: None,
                lapse_reported: false,
                running: model.groups.iter().map(|g| vec![None; g.resources.len()]).collect(),
                resumed_at: None,
                reported_up: vec![true; n],
                truth_since: vec![(true, 0); n],
                reported_quorum: true,
                peer_dead_reported: vec![false; n],
                deferred: Vec::new(),
                standby: None,
                veto: vec![false; model.groups.len()],
                reported_standby: vec![false; n],
                held: None,
                collecting: None,
            })
            .collect();
        let leases = model
            .groups
            .iter()
            .map(|_| AuthorityLease { holder: None, dead_after: None, note: None, next_token: 1 })
            .collect();
        let watch = vec![GroupWatch::default(); model.groups.len()];
        let n_groups = model.groups.len();
        let placed = !model.capacity.is_empty();
        let mut sim = Sim {
            rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            model,
            nodes,
            leases,
            watch,
            op_seq: 0,
            op_log: Vec::new(),
            faults_on: true,
            opts,
            trace: Vec::new(),
            stats: SimStats { placed_runs: u64::from(placed), ..SimStats::default() },
            violation: None,
            parked: vec![None; n_groups],
            copies: vec![None; n_groups],
        };
        for i in 0..n {
            let at = sim.rng.range(0, 300);
            sim.schedule(at, Action::Reboot(i));
        }
        sim.schedule(HEARTBEAT, Action::Heartbeat);
        sim.schedule(600, Action::LeasePoll);
        sim.schedule(2_000, Action::Fault);
        sim.schedule(FAULT_PHASE, Action::QuietStart);
        sim
    }

    fn schedule(&mut self, delay: u64, action: Action) {
        self.seq += 1;
        self.queue.insert((self.now + delay, self.seq), action);
    }

    fn log(&mut self, s: String) {
        if self.trace.len() >= *TRACE_LEN {
            self.trace.remove(0);
        }
        self.trace.push(format!("{:>6} {s}", self.now));
    }

    fn run(mut self) -> Result<SimStats, String> {
        let end = FAULT_PHASE + QUIET_PHASE;
        while let Some(((t, _), action)) = self.queue.pop_first() {
            if t > end {
                break;
            }
            self.now = t;
            self.step(action);
            self.check().map_err(|e| self.report(&e))?;
        }
        self.now = end;
        self.check_placement().map_err(|e| self.report(&e))?;
        Ok(self.stats)
    }

    fn report(&self, e: &str) -> String {
        let mut s = format!("violation at t={}ms: {e}\nlast steps:\n", self.now);
        for l in &self.trace {
            let _ = writeln!(s, "  {l}");
        }
        s
    }

    fn lease_alive(&self, l: &AuthorityLease) -> bool {
        let Some((ni, epoch, _)) = l.holder else { return false };
        let node = &self.nodes[ni];
        if node.epoch != epoch || l.dead_after.is_some_and(|t| self.now >= t) {
            return false;
        }
        match node.renew_stopped_at {
            None => true,
            Some(t) => self.now < t + LEASE_TTL,
        }
    }

    fn step(&mut self, action: Action) {
        match action {
            Action::Deliver { node, inc, event } => {
                if self.nodes[node].inc != inc {
                    return;
                }
                if self.nodes[node].life == Life::Paused {
                    self.nodes[node].deferred.push(Action::Deliver { node, inc, event });
                    return;
                }
                if self.hold(Action::Deliver { node, inc, event: event.clone() }) {
                    return;
                }
                self.feed(node, event);
            }
            Action::Complete { node, inc, cmd } => {
                if self.nodes[node].inc != inc {
                    return;
                }
                if self.nodes[node].life == Life::Paused {
                    self.nodes[node].deferred.push(Action::Complete { node, inc, cmd });
                    return;
                }
                if self.hold(Action::Complete { node, inc, cmd: cmd.clone() }) {
                    return;
                }
                self.complete(node, cmd);
            }
            Action::Flush { node, inc } => {
                if self.nodes[node].inc != inc {
                    return;
                }
                if self.nodes[node].life == Life::Paused {
                    // Still busy: what arrives meanwhile is held too.
                    self.nodes[node].deferred.push(Action::Flush { node, inc });
                    return;
                }
                self.flush(node);
            }
            Action::Heartbeat => {
                self.heartbeat();
                self.schedule(HEARTBEAT, Action::Heartbeat);
            }
            Action::LeasePoll => {
                for ni in 0..self.nodes.len() {
                    if self.nodes[ni].life != Life::Up || !self.nodes[ni].storage_ok {
                        continue;
                    }
                    for gi in 0..self.leases.len() {
                        let l = &self.leases[gi];
                        let event = Event::LeaseObserved {
                            group: self.model.groups[gi].id.clone(),
                            holder: l.holder.map(|h| self.nodes[h.0].id),
                            note: l.note.clone(),
                        };
                        // Reads arrive late: the engine must cope with stale views.
                        let d = self.rng.range(0, 300);
                        self.deliver(ni, d, event);
                    }
                }
                // Read every 500 ms, delivered within 300 ms: the 1 s takeover stagger is
                // longer than the worst observation latency, as docs/engine.md requires.
                self.schedule(500, Action::LeasePoll);
            }
            Action::Fault => {
                if self.faults_on {
                    self.inject_fault();
                    let next = self.rng.range(300, 2_500);
                    self.schedule(next, Action::Fault);
                }
            }
            Action::Reboot(ni) => self.reboot(ni),
            Action::Resume(ni) => self.resume(ni),
            Action::StorageBack(ni) => {
                let node = &mut self.nodes[ni];
                node.storage_ok = true;
                if node.life == Life::Up {
                    self.renewal_back(ni);
                }
                self.log(format!("{} storage back", self.nodes[ni].id));
            }
            Action::Heal(ni) => {
                self.nodes[ni].partition = 0;
                self.log(format!("{} partition healed", self.nodes[ni].id));
            }
            Action::ResetWindowEnd(gi) => self.watch[gi].reset_in_flight -= 1,
            Action::QuietStart => {
                self.faults_on = false;
                for ni in 0..self.nodes.len() {
                    self.nodes[ni].partition = 0;
                    if !self.nodes[ni].storage_ok {
                        self.schedule(0, Action::StorageBack(ni));
                    }
                    if self.nodes[ni].life == Life::Paused {
                        self.schedule(0, Action::Resume(ni));
                    }
                }
                self.log("quiet phase: faults stop".into());
                // Maintenance ends and local conditions clear, as they would.
                for ni in 0..self.nodes.len() {
                    if self.nodes[ni].standby.take().is_some() && self.nodes[ni].life != Life::Down {
                        self.deliver(ni, 0, Event::SetStandby(None));
                    }
                    for gi in 0..self.model.groups.len() {
                        if std::mem::take(&mut self.nodes[ni].veto[gi]) && self.nodes[ni].life != Life::Down {
                            let group = self.model.groups[gi].id.clone();
                            self.deliver(ni, 0, Event::LocalVeto { group, reason: None });
                        }
                    }
                }
                // An operator clears what faults left behind, as a real one would; the
                // commands are re-sent (same sequence numbers) to nodes that were down.
                let groups: Vec<GroupId> = self.model.groups.iter().map(|g| g.id.clone()).collect();
                let mut ops = Vec::new();
                for g in groups {
                    for command in [
                        OperatorCommand::ResetCounters(g.clone()),
                        OperatorCommand::StartGroup(g.clone()),
                        OperatorCommand::ResumeMonitoring(g),
                    ] {
                        let seq = self.operator_at(command.clone(), 1_000);
                        ops.push((seq, command));
                    }
                }
                self.schedule(5_000, Action::Resend(ops));
            }
            Action::Resend(ops) => {
                for ni in 0..self.nodes.len() {
                    for (seq, command) in &ops {
                        self.deliver(ni, 0, Event::Operator { seq: *seq, command: command.clone() });
                    }
                }
                if self.now + 5_000 < FAULT_PHASE + QUIET_PHASE - 20_000 {
                    self.schedule(5_000, Action::Resend(ops));
                }
            }
        }
    }

    /// `SimOptions::batch`: holds a delivery or completion for `node` while its runtime is
    /// busy, and now and then makes it busy. The completion's effect (a grant, a stop) and
    /// the engine learning of it stay one step, as they are one step without batching.
    fn hold(&mut self, action: Action) -> bool {
        let (Action::Deliver { node, inc, .. } | Action::Complete { node, inc, .. }) = action else { return false };
        if let Some(held) = self.nodes[node].held.as_mut() {
            held.push(action);
            return true;
        }
        if !self.opts.batch || !self.rng.chance(25) {
            return false;
        }
        self.nodes[node].held = Some(vec![action]);
        let busy = self.rng.range(1, 150);
        self.schedule(busy, Action::Flush { node, inc });
        true
    }

    /// The runtime of `ni` gets to its queue: the held actions take effect in order, and
    /// their events go to the engine in one batch.
    fn flush(&mut self, ni: usize) {
        let Some(held) = self.nodes[ni].held.take() else { return };
        self.nodes[ni].collecting = Some(Vec::new());
        for action in held {
            match action {
                Action::Deliver { node, inc, event } if self.nodes[node].inc == inc => self.feed(node, event),
                Action::Complete { node, inc, cmd } if self.nodes[node].inc == inc => self.complete(node, cmd),
                _ => {}
            }
        }
        let Some(events) = self.nodes[ni].collecting.take() else { return };
        if events.is_empty() {
            return;
        }
        let now = self.now;
        let id = self.nodes[ni].id;
        self.log(format!("{id} <- the {} events above, in one batch", events.len()));
        let Some(engine) = self.nodes[ni].engine.as_mut() else { return };
        self.stats.batches += 1;
        self.stats.batched_events += events.len() as u64;
        let cmds = engine.handle_batch(now, events);
        self.run_commands(ni, cmds);
    }

    fn feed(&mut self, ni: usize, event: Event) {
        if self.nodes[ni].life != Life::Up {
            return;
        }
        let now = self.now;
        if self.nodes[ni].engine.is_none() {
            return;
        }
        if !matches!(event, Event::Tick | Event::LeaseObserved { .. }) {
            let id = self.nodes[ni].id;
            let queued = if self.nodes[ni].held.is_some() { " (held)" } else { "" };
            self.log(format!("{id} <- {event:?}{queued}"));
        }
        if let Some(events) = self.nodes[ni].collecting.as_mut() {
            events.push(event);
            return;
        }
        let inc = self.nodes[ni].inc;
        if let Some(held) = self.nodes[ni].held.as_mut() {
            // Heartbeats, ticks, lease lapses: they queue behind what is held.
            held.push(Action::Deliver { node: ni, inc, event });
            return;
        }
        let Some(engine) = self.nodes[ni].engine.as_mut() else { return };
        let cmds = engine.handle(now, event);
        self.run_commands(ni, cmds);
    }

    fn run_commands(&mut self, ni: usize, cmds: Vec<Command>) {
        let inc = self.nodes[ni].inc;
        for cmd in cmds {
            let id = self.nodes[ni].id;
            self.log(format!("{id} -> {cmd:?}"));
            let delay = match &cmd {
                Command::StartResource { group, resource, token, migrated_in } => {
                    let (gi, ri) = self.index(group, resource);
                    if *migrated_in {
                        // Only the node a handover migrated to, and only while no other node
                        // held the lease since: anything else resumes a stale copy.
                        // No copy at all (its node crashed since) is fine: the start finds
                        // nothing to resume and starts afresh.
                        if matches!(self.copies[gi], Some(c) if c != (ni, true)) && self.violation.is_none() {
                            self.violation = Some(format!(
                                "{id} resumed a migrated {group}/{resource} but the copy is {:?}",
                                self.copies[gi]
                            ));
                        }
                        self.stats.resumes += 1;
                    }
                    if self.nodes[ni].standby.is_some() && self.violation.is_none() {
                        self.violation = Some(format!("{id} started {group}/{resource} while in standby"));
                    }
                    if self.nodes[ni].veto[gi] && self.violation.is_none() {
                        self.violation = Some(format!("{id} started {group}/{resource} while vetoed there"));
                    }
                    self.nodes[ni].running[gi][ri] = Some(*token);
                    self.stats.starts += 1;
                    self.rng.range(10, 300)
                }
                Command::StopResource { force: true, .. } => self.rng.range(5, 60),
                Command::StopResource { .. } => self.rng.range(10, 300),
                Command::ProbeResource { .. } => self.rng.range(5, 50),
                Command::AdoptResource { group, resource, token } => {
                    let (gi, ri) = self.index(group, resource);
                    if self.nodes[ni].running[gi][ri].is_some() {
                        self.nodes[ni].running[gi][ri] = Some(*token);
                        self.stats.adoptions += 1;
                    }
                    continue;
                }
                Command::AcquireLease { .. } | Command::ReleaseLease { .. } => self.rng.range(10, 200),
                Command::RequestFence { .. } => self.rng.range(100, 1_000),
                Command::SelfFence { .. } => {
                    self.stats.self_fences += 1;
                    self.crash(ni, "self-fence");
                    return;
                }
                Command::Notify(_) => continue,
            };
            self.schedule(delay, Action::Complete { node: ni, inc, cmd });
        }
    }

    fn index(&self, group: &GroupId, resource: &ResourceId) -> (usize, usize) {
        let gi = self.model.groups.iter().position(|g| &g.id == group).expect("engine named an unknown group");
        let ri = self.model.groups[gi].resources.iter().position(|r| &r.id == resource).expect("unknown resource");
        (gi, ri)
    }

    fn group_index(&self, group: &GroupId) -> usize {
        self.model.groups.iter().position(|g| &g.id == group).expect("engine named an unknown group")
    }

    fn deliver(&mut self, ni: usize, delay: u64, event: Event) {
        let inc = self.nodes[ni].inc;
        self.schedule(delay, Action::Deliver { node: ni, inc, event });
    }

    fn complete(&mut self, ni: usize, cmd: Command) {
        match cmd {
            Command::StartResource { group, resource, .. } => {
                let (gi, ri) = self.index(&group, &resource);
                let fail = if self.opts.flappy { 10 } else { 3 };
                if self.faults_on && self.rng.chance(fail) {
                    self.nodes[ni].running[gi][ri] = None;
                    self.feed(ni, Event::ResourceStartFailed { group, resource });
                } else {
                    self.feed(ni, Event::ResourceStarted { group, resource });
                }
            }
            Command::StopResource { group, resource, handover, .. } => {
                let (gi, ri) = self.index(&group, &resource);
                if self.faults_on && self.rng.chance(10) {
                    self.feed(ni, Event::ResourceStopFailed { group, resource });
                } else {
                    self.nodes[ni].running[gi][ri] = None;
                    let target = handover.and_then(|h| self.nodes.iter().position(|n| n.id == h.to));
                    match target {
                        // Half the handovers move the state (a live migration), half stop.
                        Some(to) if self.rng.chance(50) => {
                            self.copies[gi] = Some((to, true));
                            self.stats.migrations += 1;
                            let to = self.nodes[to].id;
                            self.feed(ni, Event::ResourceMigrated { group, resource, to });
                        }
                        _ => self.feed(ni, Event::ResourceStopped { group, resource }),
                    }
                }
            }
            Command::ProbeResource { group, resource } => {
                let (gi, ri) = self.index(&group, &resource);
                let running = self.nodes[ni].running[gi][ri].is_some();
                self.feed(ni, Event::ProbeResult { group, resource, running });
            }
            Command::AcquireLease { group } => {
                let gi = self.group_index(&group);
                let l = self.leases[gi].clone();
                let free = l.holder.is_none() || l.holder.is_some_and(|h| h.0 == ni) || !self.lease_alive(&l);
                if self.nodes[ni].storage_ok && free {
                    let token = LeaseToken(l.next_token);
                    if l.holder.is_some_and(|h| h.0 != ni) {
                        self.stats.takeovers += 1;
                    }
                    if let Some((c, current)) = &mut self.copies[gi]
                        && *c != ni
                    {
                        *current = false;
                    }
                    let lease = &mut self.leases[gi];
                    lease.next_token += 1;
                    lease.holder = Some((ni, self.nodes[ni].epoch, token));
                    lease.dead_after = None;
                    self.watch[gi].last_holder_change = self.now;
                    let note = lease.note.clone();
                    if note
                        .as_ref()
                        .is_some_and(|n| n.desired == Desired::Stopped(StopCause::Parked(self.nodes[ni].id)))
                        && self.nodes[ni].standby.is_none()
                    {
                        self.stats.unparks += 1;
                        self.parked[gi] = None;
                    }
                    self.feed(ni, Event::LeaseAcquired { group, token, note });
                } else {
                    let holder = l.holder.map(|h| self.nodes[h.0].id);
                    self.feed(ni, Event::LeaseAcquireFailed { group, holder });
                }
            }
            Command::ReleaseLease { group, token, note, reason } => {
                let gi = self.group_index(&group);
                let lease = &mut self.leases[gi];
                if self.nodes[ni].storage_ok && lease.holder.is_some_and(|h| h.0 == ni && h.2 == token) {
                    lease.holder = None;
                    self.watch[gi].last_holder_change = self.now;
                    lease.dead_after = None;
                    lease.note = Some(note);
                    self.parked[gi] = match &lease.note {
                        Some(LeaseNote { desired: Desired::Stopped(StopCause::Parked(p)), desired_seq, .. }) => {
                            Some((*p, *desired_seq))
                        }
                        _ => None,
                    };
                    match reason {
                        ReleaseReason::Standby => {
                            self.stats.standby_releases += 1;
                            if matches!(
                                lease.note,
                                Some(LeaseNote { desired: Desired::Stopped(StopCause::Parked(_)), .. })
                            ) {
                                self.stats.parked += 1;
                            }
                        }
                        ReleaseReason::Vetoed => self.stats.veto_releases += 1,
                        _ => {}
                    }
                    if reason == ReleaseReason::Failover {
                        self.stats.failovers += 1;
                        let w = &mut self.watch[gi];
                        if w.reset_in_flight == 0 {
                            w.failovers_since_stable += 1;
                            w.max_seen = w.max_seen.max(w.failovers_since_stable);
                        }
                    }
                }
            }
            Command::RequestFence { node } => {
                let Some(target) = self.nodes.iter().position(|n| n.id == node) else { return };
                self.stats.fences += 1;
                if self.nodes[target].life != Life::Down {
                    self.crash(target, "fenced");
                }
                // Powered off: whatever lease it held is dead now.
                self.nodes[target].epoch += 1;
                self.feed(ni, Event::FenceConfirmed(node));
            }
            _ => {}
        }
    }

    fn crash(&mut self, ni: usize, why: &str) {
        self.stats.crashes += 1;
        if self.nodes[ni].standby.is_some() && self.leases.iter().any(|l| l.holder.is_some_and(|h| h.0 == ni)) {
            self.stats.standby_crashes += 1;
        }
        let now = self.now;
        let node = &mut self.nodes[ni];
        node.life = Life::Down;
        node.inc += 1;
        node.engine = None;
        node.deferred.clear();
        node.held = None;
        node.collecting = None;
        node.renew_stopped_at.get_or_insert(now);
        for g in &mut node.running {
            g.iter_mut().for_each(|r| *r = None);
        }
        let id = node.id;
        for copy in &mut self.copies {
            if copy.is_some_and(|(c, _)| c == ni) {
                *copy = None;
            }
        }
        self.log(format!("{id} down ({why})"));
        let back = self.rng.range(1_000, 8_000);
        self.schedule(back, Action::Reboot(ni));
    }

    /// The agent process dies and comes back at once; resources and leases survive it, the
    /// answers to whatever was in flight are lost. The new engine must probe and adopt.
    fn restart_agent(&mut self, ni: usize) {
        let n = self.nodes.len();
        let mut engine = Engine::new(self.nodes[ni].id, self.model.clone()).expect("sim model is valid");
        if let Some(rule) = self.opts.broken {
            engine.break_rule(rule);
        }
        self.stats.agent_restarts += 1;
        self.restore_local_state(ni, &mut engine);
        let node = &mut self.nodes[ni];
        node.inc += 1;
        // What was queued for the old engine is lost with it.
        node.held = None;
        node.collecting = None;
        node.reported_standby = vec![false; n];
        node.reported_up = vec![true; n];
        node.reported_quorum = true;
        node.peer_dead_reported = vec![false; n];
        let cmds = engine.startup(self.now);
        node.engine = Some(engine);
        let id = node.id;
        self.log(format!("{id} agent restarts"));
        self.run_commands(ni, cmds);
        self.replay_operator_log(ni);
    }

    /// What a runtime restores before the engine's first evaluation: the persisted standby,
    /// and the vetoes its monitors report again.
    fn restore_local_state(&self, ni: usize, engine: &mut Engine) {
        let node = &self.nodes[ni];
        if node.standby.is_some() {
            engine.handle(self.now, Event::SetStandby(node.standby));
        }
        for (gi, vetoed) in node.veto.iter().enumerate() {
            if *vetoed {
                let group = self.model.groups[gi].id.clone();
                engine.handle(self.now, Event::LocalVeto { group, reason: Some("sim veto".into()) });
            }
        }
    }

    fn replay_operator_log(&mut self, ni: usize) {
        for (seq, command) in self.op_log.clone() {
            self.deliver(ni, 0, Event::Operator { seq, command });
        }
    }

    fn reboot(&mut self, ni: usize) {
        if self.nodes[ni].life != Life::Down {
            return;
        }
        let n = self.nodes.len();
        let mut engine = Engine::new(self.nodes[ni].id, self.model.clone()).expect("sim model is valid");
        if let Some(rule) = self.opts.broken {
            engine.break_rule(rule);
        }
        self.restore_local_state(ni, &mut engine);
        let node = &mut self.nodes[ni];
        node.reported_standby = vec![false; n];
        node.life = Life::Up;
        node.epoch += 1;
        node.renew_stopped_at = if node.storage_ok { None } else { Some(self.now) };
        node.lapse_reported = false;
        node.reported_up = vec![true; n];
        node.reported_quorum = true;
        node.peer_dead_reported = vec![false; n];
        let cmds = engine.startup(self.now);
        node.engine = Some(engine);
        let id = node.id;
        self.log(format!("{id} boots"));
        self.run_commands(ni, cmds);
        self.replay_operator_log(ni);
    }

    fn resume(&mut self, ni: usize) {
        if self.nodes[ni].life != Life::Paused {
            return;
        }
        self.nodes[ni].life = Life::Up;
        self.nodes[ni].resumed_at = Some(self.now);
        let id = self.nodes[ni].id;
        self.log(format!("{id} resumes"));
        if self.nodes[ni].storage_ok {
            self.renewal_back(ni);
        }
        // What was in flight during the pause lands now, after any LeaseLost.
        let deferred = std::mem::take(&mut self.nodes[ni].deferred);
        for a in deferred {
            self.schedule(0, a);
        }
    }

    /// The node renews again. If the gap was long enough for the lease layer to give the
    /// leases up, the engine hears `LeaseLost` first.
    fn renewal_back(&mut self, ni: usize) {
        let Some(stopped) = self.nodes[ni].renew_stopped_at else { return };
        if self.now >= stopped + LEASE_TTL - SELF_FENCE_BUDGET {
            self.report_lapse(ni, stopped);
        }
        self.nodes[ni].renew_stopped_at = None;
        self.nodes[ni].lapse_reported = false;
    }

    fn report_lapse(&mut self, ni: usize, stopped: u64) {
        if self.nodes[ni].lapse_reported {
            return;
        }
        self.nodes[ni].lapse_reported = true;
        for gi in 0..self.leases.len() {
            if self.leases[gi].holder.is_some_and(|h| h.0 == ni) {
                self.leases[gi].dead_after.get_or_insert(stopped + LEASE_TTL);
            }
            let group = self.model.groups[gi].id.clone();
            self.stats.lease_lost += 1;
            self.feed(ni, Event::LeaseLost { group });
        }
    }

    fn heartbeat(&mut self) {
        let n = self.nodes.len();
        for ni in 0..n {
            // The lease layer of a running node without storage gives up in time.
            if self.nodes[ni].life == Life::Up
                && let Some(stopped) = self.nodes[ni].renew_stopped_at
                && self.now >= stopped + LEASE_TTL - SELF_FENCE_BUDGET
            {
                self.report_lapse(ni, stopped);
            }
        }
        for ni in 0..n {
            if self.nodes[ni].life != Life::Up {
                continue;
            }
            self.feed(ni, Event::Tick);
            // Membership.
            let mut up_count = 1;
            for pj in 0..n {
                if pj == ni {
                    continue;
                }
                let reach = self.nodes[pj].life == Life::Up && self.nodes[pj].partition == self.nodes[ni].partition;
                let (prev, since) = self.nodes[ni].truth_since[pj];
                if prev != reach {
                    self.nodes[ni].truth_since[pj] = (reach, self.now);
                }
                let (truth, since) = if prev != reach { (reach, self.now) } else { (prev, since) };
                let reported = self.nodes[ni].reported_up[pj];
                if truth != reported && (self.now - since >= DETECT || truth) {
                    self.nodes[ni].reported_up[pj] = truth;
                    let id = self.nodes[pj].id;
                    self.feed(ni, if truth { Event::NodeJoined(id) } else { Event::NodeLost(id) });
                }
                if self.nodes[ni].reported_up[pj] {
                    up_count += 1;
                }
                // Heartbeats carry the standby flag.
                let flag = self.nodes[pj].standby.is_some();
                if reach && self.nodes[ni].reported_standby[pj] != flag {
                    self.nodes[ni].reported_standby[pj] = flag;
                    let id = self.nodes[pj].id;
                    self.feed(ni, Event::PeerStandby { node: id, standby: flag });
                }
                // The lease layer sees a peer's host lease dead.
                let peer_dead = match self.nodes[pj].renew_stopped_at {
                    Some(t) => self.now >= t + LEASE_TTL,
                    None => false,
                };
                if peer_dead && !self.nodes[ni].peer_dead_reported[pj] && self.nodes[ni].storage_ok {
                    self.nodes[ni].peer_dead_reported[pj] = true;
                    let id = self.nodes[pj].id;
                    self.feed(ni, Event::PeerFenced(id));
                } else if !peer_dead {
                    self.nodes[ni].peer_dead_reported[pj] = false;
                }
            }
            if self.nodes[ni].life != Life::Up {
                continue;
            }
            let quorum = up_count * 2 > n;
            if quorum != self.nodes[ni].reported_quorum {
                self.nodes[ni].reported_quorum = quorum;
                self.feed(ni, if quorum { Event::QuorumRegained } else { Event::QuorumLost });
            }
        }
    }

    fn operator_at(&mut self, command: OperatorCommand, base_delay: u64) -> u64 {
        self.op_seq += 1;
        let seq = self.op_seq;
        self.op_log.push((seq, command.clone()));
        let mut max_delay = base_delay;
        for ni in 0..self.nodes.len() {
            if self.nodes[ni].life == Life::Down {
                continue;
            }
            let d = base_delay + self.rng.range(0, 500);
            max_delay = max_delay.max(d);
            self.deliver(ni, d, Event::Operator { seq, command: command.clone() });
        }
        if let OperatorCommand::ResetCounters(g) = &command {
            let gi = self.group_index(g);
            // Until every engine has the reset, failovers may be counted by either side.
            self.watch[gi].failovers_since_stable = 0;
            self.watch[gi].reset_in_flight += 1;
            // A paused node applies it late: keep the window open generously.
            self.schedule(max_delay + 20_000, Action::ResetWindowEnd(gi));
        }
        seq
    }

    fn inject_fault(&mut self) {
        let ni = self.rng.below(self.nodes.len());
        let id = self.nodes[ni].id;
        let roll = self.rng.range(0, 99);
        match roll {
            0..=7 => {
                if self.nodes[ni].life == Life::Up {
                    self.crash(ni, "crash");
                }
            }
            8..=10 => {
                if self.nodes[ni].life == Life::Up {
                    self.restart_agent(ni);
                }
            }
            11..=15 => {
                if self.nodes[ni].life == Life::Up {
                    self.nodes[ni].life = Life::Paused;
                    self.nodes[ni].renew_stopped_at.get_or_insert(self.now);
                    let d = self.rng.range(500, 14_000);
                    self.log(format!("{id} paused for {d}ms"));
                    self.schedule(d, Action::Resume(ni));
                }
            }
            16..=22 => {
                if self.nodes[ni].storage_ok && self.nodes[ni].life != Life::Down {
                    self.nodes[ni].storage_ok = false;
                    self.nodes[ni].renew_stopped_at.get_or_insert(self.now);
                    let d = self.rng.range(1_000, 14_000);
                    self.log(format!("{id} loses storage for {d}ms"));
                    self.schedule(d, Action::StorageBack(ni));
                }
            }
            23..=30 => {
                let d = self.rng.range(1_000, 10_000);
                self.nodes[ni].partition = 1 + self.rng.range(0, 1) as u32;
                self.log(format!("{id} partitioned for {d}ms"));
                self.schedule(d, Action::Heal(ni));
            }
            71..=76 => {
                // Maintenance: enter standby (either mode), switch mode, or leave it.
                if self.nodes[ni].life == Life::Up {
                    let mode = match self.nodes[ni].standby {
                        None => {
                            self.stats.standby_entries += 1;
                            Some(if self.rng.chance(50) { StandbyMode::Move } else { StandbyMode::Park })
                        }
                        Some(StandbyMode::Move) if self.rng.chance(20) => Some(StandbyMode::Park),
                        Some(StandbyMode::Park) if self.rng.chance(20) => Some(StandbyMode::Move),
                        Some(_) => None,
                    };
                    self.nodes[ni].standby = mode;
                    self.feed(ni, Event::SetStandby(mode));
                }
            }
            77..=80 => {
                // A local condition (a NIC) forbids a group here, or clears.
                if self.nodes[ni].life == Life::Up {
                    let gi = self.rng.below(self.model.groups.len());
                    let on = !self.nodes[ni].veto[gi];
                    self.nodes[ni].veto[gi] = on;
                    let group = self.model.groups[gi].id.clone();
                    self.feed(ni, Event::LocalVeto { group, reason: on.then(|| "sim veto".into()) });
                }
            }
            31..=70 => {
                // A monitor confirms a failure of something running.
                let gi = self.rng.below(self.model.groups.len());
                let ri = self.rng.below(self.model.groups[gi].resources.len());
                if self.nodes[ni].running[gi][ri].is_some() {
                    let group = self.model.groups[gi].id.clone();
                    let resource = self.model.groups[gi].resources[ri].id.clone();
                    let d = self.rng.range(0, 100);
                    let monitor = self.rng.chance(50).then(|| "sql".to_string());
                    self.deliver(ni, d, Event::MonitorFailed { group, resource, monitor });
                }
            }
            _ => {
                let gi = self.rng.below(self.model.groups.len());
                let g = self.model.groups[gi].id.clone();
                let to = NodeId(1 + self.rng.below(self.nodes.len()) as u32);
                let command = match self.rng.range(0, 9) {
                    0 | 1 => OperatorCommand::StopGroup(g),
                    2..=4 => OperatorCommand::StartGroup(g),
                    5 | 6 => OperatorCommand::MoveGroup { group: g, to },
                    7 => OperatorCommand::ResetCounters(g),
                    8 => OperatorCommand::SuspendMonitoring(g),
                    _ => OperatorCommand::ResumeMonitoring(g),
                };
                self.log(format!("operator {command:?}"));
                self.operator_at(command, 0);
            }
        }
        if self.opts.flappy {
            // Keep failing whatever runs, to exercise restart and failover limits.
            for ni in 0..self.nodes.len() {
                for gi in 0..self.model.groups.len() {
                    if let Some(ri) = self.nodes[ni].running[gi].iter().position(|r| r.is_some()) {
                        let group = self.model.groups[gi].id.clone();
                        let resource = self.model.groups[gi].resources[ri].id.clone();
                        let monitor = (ri % 2 == 0).then(|| "sql".to_string());
                        self.deliver(ni, 50, Event::MonitorFailed { group, resource, monitor });
                    }
                }
            }
        }
    }

    /// Safety and ping-pong invariants, checked after every step.
    fn check(&mut self) -> Result<(), String> {
        if let Some(v) = self.violation.take() {
            return Err(v);
        }
        self.check_capacity()?;
        self.check_parked()?;
        for gi in 0..self.model.groups.len() {
            let current = self.leases[gi].holder.map(|h| (h.0, h.2));
            let mut active = Vec::new();
            for (ni, node) in self.nodes.iter().enumerate() {
                let tokens: Vec<LeaseToken> = node.running[gi].iter().flatten().copied().collect();
                if tokens.is_empty() || node.life != Life::Up {
                    continue;
                }
                // A node that resumed from a pause past its lease runs under a stale token
                // (storage refuses it) until it has stopped: allowed for the self-fence budget.
                let in_grace = node.resumed_at.is_some_and(|t| self.now <= t + SELF_FENCE_BUDGET);
                let current_here = tokens.iter().all(|t| current == Some((ni, *t)));
                if current_here {
                    active.push(node.id);
                } else if !in_grace {
                    return Err(format!(
                        "group {} runs on {} under token(s) {tokens:?} but the lease is {current:?}",
                        self.model.groups[gi].id, node.id
                    ));
                }
            }
            if active.len() > 1 {
                return Err(format!("group {} active on {active:?} at once", self.model.groups[gi].id));
            }
            // Stability: all resources running on one node for the failover window.
            let window = self.model.groups[gi].recovery.failover_window_ms;
            let now = self.now;
            let w = &mut self.watch[gi];
            w.all_running_since.resize(self.nodes.len(), None);
            for (ni, node) in self.nodes.iter().enumerate() {
                if node.running[gi].iter().all(|r| r.is_some()) {
                    let since = *w.all_running_since[ni].get_or_insert(now);
                    if now - since >= window {
                        w.failovers_since_stable = 0;
                    }
                } else {
                    w.all_running_since[ni] = None;
                }
            }
            let limit = self.model.groups[gi].recovery.max_failovers;
            if w.failovers_since_stable > limit {
                return Err(format!(
                    "group {} failed over {} times without a stable run; its limit is {limit}",
                    self.model.groups[gi].id, w.failovers_since_stable
                ));
            }
        }
        Ok(())
    }

    /// A group parked by a node still in standby runs nowhere, unless an operator started or
    /// moved it with a later command (a node that just resumed from a pause is allowed its
    /// self-fence budget, as in `check`).
    fn check_parked(&self) -> Result<(), String> {
        for (gi, parked) in self.parked.iter().enumerate() {
            let Some((p, desired_seq)) = parked else { continue };
            let Some(parker) = self.nodes.iter().find(|n| n.id == *p) else { continue };
            if parker.standby.is_none() {
                continue;
            }
            let g = &self.model.groups[gi].id;
            let overridden = self.op_log.iter().any(|(seq, c)| {
                *seq > *desired_seq
                    && matches!(c, OperatorCommand::StartGroup(x) | OperatorCommand::MoveGroup { group: x, .. } if x == g)
            });
            if overridden {
                continue;
            }
            for node in &self.nodes {
                let in_grace = node.resumed_at.is_some_and(|t| self.now <= t + SELF_FENCE_BUDGET);
                if node.life == Life::Up && !in_grace && node.running[gi].iter().any(Option::is_some) {
                    return Err(format!("group {g} runs on {} while parked by {p}, which is in standby", node.id));
                }
            }
        }
        Ok(())
    }

    /// Placement's hard rules, on the truth: on every node, the groups with anything running
    /// there fit its capacity, and no two of them share an anti-affinity set.
    fn check_capacity(&mut self) -> Result<(), String> {
        for node in &self.nodes {
            if node.life == Life::Down {
                continue;
            }
            let active: Vec<&FailoverGroup> = self
                .model
                .groups
                .iter()
                .enumerate()
                .filter(|(gi, _)| node.running[*gi].iter().any(Option::is_some))
                .map(|(_, g)| g)
                .collect();
            if let Some(cap) = self.model.capacity.get(&node.id) {
                let used = active.iter().fold(Capacity::ZERO, |sum, g| sum + g.demand);
                if !cap.fits(&used) {
                    let ids: Vec<&GroupId> = active.iter().map(|g| &g.id).collect();
                    return Err(format!("{} runs {ids:?} needing {used}, over its capacity {cap}", node.id));
                }
            }
            for (i, a) in active.iter().enumerate() {
                for b in &active[i + 1..] {
                    if let Some(set) = a.anti_affinity.iter().find(|s| b.anti_affinity.contains(s)) {
                        return Err(format!("{} runs {} and {}, anti-affine through set {set}", node.id, a.id, b.id));
                    }
                }
            }
            if active.len() > 1 && self.model.capacity.contains_key(&node.id) {
                self.stats.shared_nodes += 1;
            }
        }
        Ok(())
    }

    /// Once faults stop, every group runs somewhere, exactly once, and stays put.
    fn check_placement(&self) -> Result<(), String> {
        for (gi, g) in self.model.groups.iter().enumerate() {
            let settled = FAULT_PHASE + QUIET_PHASE - STAYS_PUT;
            if self.watch[gi].last_holder_change > settled {
                return Err(format!(
                    "group {} still changed hands at t={}ms, {}ms after the faults stopped (ping-pong?)",
                    g.id,
                    self.watch[gi].last_holder_change,
                    self.watch[gi].last_holder_change - FAULT_PHASE
                ));
            }
            let full: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|n| n.life == Life::Up && n.running[gi].iter().all(|r| r.is_some()))
                .map(|n| n.id)
                .collect();
            if full.len() != 1 {
                let status: Vec<String> = self
                    .nodes
                    .iter()
                    .filter_map(|n| n.engine.as_ref())
                    .map(|e| format!("{:?}", e.status().groups[gi]))
                    .collect();
                return Err(format!(
                    "group {} should run on exactly one node after the faults stopped, runs fully on {full:?}; engines say: {status:#?}",
                    g.id
                ));
            }
        }
        Ok(())
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("TANDEM_SIM_SEED") {
        return vec![s.parse().expect("TANDEM_SIM_SEED must be a number")];
    }
    let count = std::env::var("TANDEM_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2_000);
    (0..count).collect()
}

pub(crate) fn run_seed(seed: u64, opts: SimOptions) -> Result<SimStats, String> {
    Sim::new(seed, opts).run()
}

#[test]
fn simulation_holds_invariants_over_many_seeds() {
    let mut total = SimStats::default();
    for seed in seeds() {
        let opts = SimOptions { broken: None, flappy: seed % 4 == 0, batch: seed % 3 == 1 };
        match run_seed(seed, opts) {
            Ok(s) => {
                total.starts += s.starts;
                total.failovers += s.failovers;
                total.takeovers += s.takeovers;
                total.fences += s.fences;
                total.self_fences += s.self_fences;
                total.lease_lost += s.lease_lost;
                total.crashes += s.crashes;
                total.agent_restarts += s.agent_restarts;
                total.adoptions += s.adoptions;
                total.shared_nodes += s.shared_nodes;
                total.placed_runs += s.placed_runs;
                total.standby_entries += s.standby_entries;
                total.standby_releases += s.standby_releases;
                total.parked += s.parked;
                total.unparks += s.unparks;
                total.veto_releases += s.veto_releases;
                total.standby_crashes += s.standby_crashes;
                total.migrations += s.migrations;
                total.resumes += s.resumes;
                total.batches += s.batches;
                total.batched_events += s.batched_events;
            }
            Err(e) => panic!("simulation failed for seed {seed} (rerun: TANDEM_SIM_SEED={seed}):\n{e}"),
        }
    }
    eprintln!("simulation totals: {total:?}");
    // The faults must actually exercise the paths the invariants are about.
    if seeds().len() >= 100 {
        assert!(total.failovers > 0 && total.takeovers > 0 && total.fences > 0 && total.lease_lost > 0, "{total:?}");
        assert!(total.self_fences > 0 && total.crashes > 0 && total.adoptions > 0, "{total:?}");
        assert!(total.placed_runs > 0 && total.shared_nodes > 0, "{total:?}");
        assert!(total.standby_releases > 0 && total.parked > 0 && total.unparks > 0, "{total:?}");
        assert!(total.veto_releases > 0 && total.standby_crashes > 0, "{total:?}");
        assert!(total.migrations > 0 && total.resumes > 0, "{total:?}");
        assert!(total.batched_events > total.batches, "{total:?}");
    }
}

/// The checker can fail: each deliberately broken rule is caught on some seed.
#[test]
fn simulation_catches_deliberately_broken_rules() {
    for (rule, flappy) in [
        (BrokenRule::StartBeforeLease, false),
        (BrokenRule::IgnoreLeaseLost, false),
        (BrokenRule::NoFailoverLimit, true),
        (BrokenRule::IgnorePlacement, false),
        (BrokenRule::IgnoreStandby, false),
        (BrokenRule::StartParked, false),
        (BrokenRule::ResumeAnyMigration, false),
    ] {
        // With events fed one by one and in batches alike.
        for batch in [false, true] {
            let caught =
                (0..300).find_map(|seed| run_seed(seed, SimOptions { broken: Some(rule), flappy, batch }).err());
            let Some(report) = caught else {
                panic!("breaking {rule:?} went unnoticed over 300 seeds (batch: {batch})")
            };
            eprintln!("{rule:?} caught (batch: {batch}): {}", report.lines().next().unwrap_or_default());
        }
    }
}
