//! The lease service: this node's host lease on the lease disk, its renewal and the fencing
//! guard, the groups' resource leases, and the observations the engine and membership need
//! (who holds each group, which peers' host leases are dead, the quorum tie-break).
//!
//! The lease library is blocking (every call is lease-disk I/O bounded by the I/O timeout),
//! so the service runs on its own OS threads: renewal (never delayed by anything else),
//! operations (acquire/release, in order), and observation (periodic reads).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::Duration;

use tandem_engine::{Event, GroupId, LeaseNote, LeaseToken, NodeId};
use tandem_lease::fence::{FencePlan, FenceStep};
use tandem_lease::guard::GuardHandle;
use tandem_lease::{HostLease, LeaseDisk, LeaseError, Liveness, OpError, monotonic_now};
use tokio::sync::mpsc;

use super::{AgentEvent, EventKind, Input};
use crate::note;
use crate::plan::{QUORUM_LEASE, group_lease};

/// Why the lease service could not start.
#[derive(Debug, thiserror::Error)]
pub enum LeaseServiceError {
    /// Joining the lockspace failed.
    #[error("cannot join the lockspace on the lease disk as host {host_id}")]
    Join {
        /// This node's host id.
        host_id: u32,
        /// Why.
        #[source]
        source: tandem_lease::LeaseError,
    },
    /// The timeouts on the disk do not allow a safe self-fencing plan.
    #[error("the lease area's timeouts do not allow safe self-fencing")]
    Plan(#[source] tandem_lease::fence::FenceError),
    /// The fencing guard could not be started or told about a cgroup or an address.
    #[error("the fencing guard failed")]
    Guard(#[source] tandem_lease::guard::GuardError),
}

enum Op {
    Acquire(GroupId),
    Release(GroupId, Vec<u8>),
    Leave(std_mpsc::Sender<()>),
}

/// The engine task's side of the lease service.
#[derive(Debug, Clone)]
pub struct LeaseClient {
    ops: std_mpsc::Sender<Op>,
    lease: Arc<HostLease>,
    stop: Arc<AtomicBool>,
    /// Whether this node contends for (and keeps) the quorum tie-break lease.
    tie_break: Arc<AtomicBool>,
    /// The last fencing token the observer read for each group's lease, for status.
    tokens: Arc<std::sync::Mutex<BTreeMap<GroupId, u64>>>,
    /// Leases the observer should read every round for a while.
    hints: Arc<Mutex<Hints>>,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Acquire(g) => write!(f, "acquire {g}"),
            Op::Release(g, _) => write!(f, "release {g}"),
            Op::Leave(_) => f.write_str("leave"),
        }
    }
}

impl LeaseClient {
    pub(crate) fn acquire(&self, group: &GroupId) {
        let _ = self.ops.send(Op::Acquire(group.clone()));
    }

    pub(crate) fn release(&self, group: &GroupId, note: &LeaseNote) {
        // The engine forgets the holder when it releases: it must be handed the next read.
        self.hints.lock().unwrap_or_else(|p| p.into_inner()).resend.insert(group.clone());
        let _ = self.ops.send(Op::Release(group.clone(), note::encode(note)));
    }

    /// Releases whatever is still held (orderly shutdown), after every release already
    /// queued, and waits for it (bounded), so that peers need not wait for this node's host
    /// lease to expire.
    pub(crate) fn leave(&self) {
        let (tx, rx) = std_mpsc::channel();
        if self.ops.send(Op::Leave(tx)).is_ok() {
            let io = Duration::from_millis(self.lease.timeouts().io_timeout_ms);
            let _ = rx.recv_timeout(io * 4 + Duration::from_secs(1));
        }
    }

    /// Whether this node holds on to the quorum tie-break lease: not while it considers
    /// itself isolated (ping targets unreachable), nor once it drains or stops.
    pub fn set_tie_break(&self, contend: bool) {
        self.tie_break.store(contend, Ordering::SeqCst);
    }

    /// Stops renewing without releasing anything: peers take over once the host lease is
    /// dead (self-fencing, after every resource was killed).
    pub(crate) fn abandon(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether the host lease is valid now, on a fresh clock reading.
    pub(crate) fn is_valid_now(&self) -> bool {
        self.lease.is_valid(monotonic_now())
    }

    /// How long the host lease stays valid, in ms; `None` once lost.
    pub(crate) fn valid_for_ms(&self) -> Option<u64> {
        self.lease.valid_until().map(|v| v.since(monotonic_now()))
    }

    /// Tells the observer which leases are about to change, from an event the engine is
    /// fed: an operator command names its group; a peer lost or entering standby hands its
    /// groups on. Those leases are read every round for a while (see `HOT_FOR`), so that a
    /// planned move is seen at once however many leases the sweep covers.
    pub(crate) fn hint(&self, event: &Event) {
        let until = std::time::Instant::now() + HOT_FOR;
        let mut h = self.hints.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            Event::Operator { command, .. } => {
                h.groups.insert(command.group().clone(), until);
            }
            Event::NodeLost(n) | Event::PeerStandby { node: n, standby: true } => {
                h.nodes.insert(*n, until);
            }
            // The engine just changed its own view of the lease without an observation (a
            // refused acquisition names a holder or none, a lost lease is "free" to it): the
            // next read must reach it even if the lease did not change on disk since the last
            // one it was handed, or a lease freed meanwhile stays "held" to it until the
            // refresh.
            Event::LeaseAcquireFailed { group, .. } | Event::LeaseLost { group } => {
                h.resend.insert(group.clone());
            }
            _ => {}
        }
    }

    /// The last fencing token observed on each group's lease (the holder's, while held).
    pub(crate) fn tokens(&self) -> BTreeMap<GroupId, u64> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What the service needs to run.
pub(crate) struct LeaseServiceConfig {
    pub disk: Arc<dyn LeaseDisk>,
    pub cluster: String,
    pub me: NodeId,
    pub groups: Vec<GroupId>,
    pub nodes: Vec<NodeId>,
    /// The program and arguments that run the fencing guard (`tandem-guest guard`).
    pub guard: std::process::Command,
    /// Cgroups the guard kills when the lease expires.
    pub cgroups: Vec<std::path::PathBuf>,
    /// How resources reach the guard once it runs.
    pub guard_access: crate::resources::GuardAccess,
    /// The hardware watchdog the guard keeps alive (`[lease] watchdog`).
    pub watchdog: Option<std::path::PathBuf>,
    /// Floating addresses the guard removes when the lease expires (after the kills).
    pub addresses: Vec<tandem_lease::guard::GuardedAddress>,
}

/// Membership hooks the observer feeds.
pub(crate) struct MembershipHooks {
    pub disk_liveness: Box<dyn Fn(NodeId, bool) + Send>,
    pub tie_break: Box<dyn Fn(bool) + Send>,
}

fn publish(tx: &mpsc::UnboundedSender<Input>, group: Option<&GroupId>, message: String) {
    let _ = tx.send(Input::Publish(AgentEvent {
        at_ms: 0,
        group: group.map(|g| g.0.clone()),
        resource: None,
        kind: EventKind::Lease,
        message,
        detail: None,
    }));
}

/// How many times a join that failed on slow lease I/O is tried before the agent gives up.
const JOIN_ATTEMPTS: u32 = 4;

/// Joins the lockspace, trying again when the lease disk was too slow or failed an I/O
/// (storage that is slow for a moment at boot should not need a supervisor's restart).
/// Safe: nothing runs under a lease before the join, and a new attempt treats the slot the
/// failed one wrote as a possibly live owner, so it waits `T` before writing again.
fn join(
    disk: &Arc<dyn LeaseDisk>,
    cluster: &str,
    me: NodeId,
    tx: &mpsc::UnboundedSender<Input>,
) -> Result<HostLease, LeaseServiceError> {
    let mut attempt = 1;
    loop {
        match HostLease::join(disk.clone(), cluster, me.0) {
            Ok(lease) => return Ok(lease),
            Err(LeaseError::Op(e @ OpError::Io { .. })) if attempt < JOIN_ATTEMPTS => {
                let text = format!("joining the lockspace failed ({e}); trying again ({attempt} of {JOIN_ATTEMPTS})");
                tracing::warn!("{text}");
                publish(tx, None, text);
                attempt += 1;
                std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
            }
            Err(source) => return Err(LeaseServiceError::Join { host_id: me.0, source }),
        }
    }
}

/// Joins the lockspace (blocking: call from `spawn_blocking`), starts the guard and the
/// service threads.
pub(crate) fn start(
    cfg: LeaseServiceConfig,
    hooks: MembershipHooks,
    tx: mpsc::UnboundedSender<Input>,
) -> Result<LeaseClient, LeaseServiceError> {
    // The plan comes from the area's own timeouts (every host uses those), read before the
    // guard starts because a watchdog's timing is on the guard's command line.
    let join_err = |source| LeaseServiceError::Join { host_id: cfg.me.0, source };
    let timeouts = tandem_lease::Lockspace::open(&*cfg.disk, &cfg.cluster)
        .map_err(|e| join_err(tandem_lease::LeaseError::Lockspace(e)))?
        .timeouts;
    let watchdog = cfg.watchdog.clone().map(|device| tandem_lease::fence::WatchdogConfig { device });
    let plan =
        FencePlan::new(timeouts, FencePlan::default_grace_ms(&timeouts), watchdog).map_err(LeaseServiceError::Plan)?;
    let mut guard_cmd = cfg.guard;
    guard_cmd.args(GuardHandle::watchdog_args(&plan));
    // The guard first: nothing may run under a lease without it.
    let guard = GuardHandle::spawn(guard_cmd).map_err(LeaseServiceError::Guard)?;
    let guard = Arc::new(Mutex::new(guard));
    for cg in &cfg.cgroups {
        guard.lock().unwrap_or_else(|p| p.into_inner()).register_cgroup(cg).map_err(LeaseServiceError::Guard)?;
    }
    for a in &cfg.addresses {
        guard.lock().unwrap_or_else(|p| p.into_inner()).register_address(a).map_err(LeaseServiceError::Guard)?;
    }
    cfg.guard_access.attach(guard.clone());
    let lease = join(&cfg.disk, &cfg.cluster, cfg.me, &tx)?;
    let lease = Arc::new(lease);
    let stop = Arc::new(AtomicBool::new(false));
    let tie_break = Arc::new(AtomicBool::new(true));

    // Renewal: pets the guard after every successful renewal with the kill deadline that
    // renewal allows; a lost host lease ends the agent's right to run anything.
    {
        let (lease, stop, guard, tx, plan) = (lease.clone(), stop.clone(), guard.clone(), tx.clone(), plan.clone());
        std::thread::Builder::new()
            .name("lease-renewal".into())
            .spawn(move || {
                let res = lease.renewal_loop(&stop, |res| match res {
                    Ok(valid_until) => {
                        if let Err(e) =
                            guard.lock().unwrap_or_else(|p| p.into_inner()).pet(plan.kill_deadline(*valid_until))
                        {
                            tracing::error!(target: "tandem_node", "{e}");
                        }
                    }
                    Err(e) => tracing::warn!(target: "tandem_node", "lease renewal failed: {e}"),
                });
                if let Err(e) = res {
                    let _ = tx.send(Input::HostLeaseLost(e.to_string()));
                }
            })
            .expect("spawning a thread");
    }

    // Watchdog of our own validity: the renewal thread may be stuck in I/O, so the clock
    // decides, not the renewal result. Past the fence deadline, stop everything.
    {
        let (lease, stop, tx) = (lease.clone(), stop.clone(), tx.clone());
        std::thread::Builder::new()
            .name("lease-deadline".into())
            .spawn(move || {
                let mut reported = false;
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                    let step = match lease.valid_until() {
                        Some(v) => plan.step_at(v, monotonic_now()),
                        None => FenceStep::Kill,
                    };
                    if step != FenceStep::Valid && !reported {
                        reported = true;
                        let why =
                            lease.lost_reason().unwrap_or_else(|| "the fence deadline passed without a renewal".into());
                        let _ = tx.send(Input::HostLeaseLost(why));
                    }
                }
            })
            .expect("spawning a thread");
    }

    // Operations, in order.
    let (ops_tx, ops_rx) = std_mpsc::channel::<Op>();
    {
        let (lease, tx) = (lease.clone(), tx.clone());
        std::thread::Builder::new()
            .name("lease-ops".into())
            .spawn(move || operations(&lease, ops_rx, &tx))
            .expect("spawning a thread");
    }

    // Observation.
    let tokens = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let hints = Arc::new(Mutex::new(Hints::default()));
    {
        let (lease, stop, tx, contend) = (lease.clone(), stop.clone(), tx.clone(), tie_break.clone());
        let (groups, nodes, me, tokens) = (cfg.groups.clone(), cfg.nodes.clone(), cfg.me, tokens.clone());
        let hints = hints.clone();
        std::thread::Builder::new()
            .name("lease-observer".into())
            .spawn(move || {
                let seen = Observed { groups: &groups, nodes: &nodes, me, tokens: &tokens, hints: &hints };
                observe(&lease, &stop, &contend, &seen, &hooks, &tx)
            })
            .expect("spawning a thread");
    }

    Ok(LeaseClient { ops: ops_tx, lease, stop, tie_break, tokens, hints })
}

fn decode_note(tx: &mpsc::UnboundedSender<Input>, group: &GroupId, value: Option<Vec<u8>>) -> Option<LeaseNote> {
    let bytes = value?;
    if bytes.is_empty() {
        return None;
    }
    match note::decode(&bytes) {
        Ok(n) => Some(n),
        Err(e) => {
            publish(
                tx,
                Some(group),
                format!("the lease note of {group} is unreadable ({e}); using the group's defaults"),
            );
            None
        }
    }
}

fn operations(lease: &HostLease, ops: std_mpsc::Receiver<Op>, tx: &mpsc::UnboundedSender<Input>) {
    for op in ops {
        match op {
            Op::Acquire(group) => {
                let ev = match lease.acquire_with_value(&group_lease(&group), None) {
                    Ok(acquired) => {
                        let note = decode_note(tx, &group, acquired.value);
                        Event::LeaseAcquired { group, token: LeaseToken(acquired.token.0), note }
                    }
                    Err(e) => {
                        let holder = match &e {
                            LeaseError::Op(OpError::Busy { owner, .. }) => Some(NodeId(*owner)),
                            _ => None,
                        };
                        if holder.is_none() {
                            publish(tx, Some(&group), format!("cannot acquire the lease of {group}: {e}"));
                        }
                        Event::LeaseAcquireFailed { group, holder }
                    }
                };
                let _ = tx.send(Input::Engine(ev));
            }
            Op::Release(group, value) => {
                let name = group_lease(&group);
                if let Err(e) = lease.release_with_value(&name, &value).or_else(|e| {
                    // The note could not be written: release without it rather than keep a
                    // lease the engine considers released (peers would get Busy for as long
                    // as this node lives); the next holder starts from the older note.
                    publish(
                        tx,
                        Some(&group),
                        format!("writing the note of {group} failed ({e}); releasing without it"),
                    );
                    lease.release(&name)
                }) {
                    publish(
                        tx,
                        Some(&group),
                        format!(
                            "releasing the lease of {group} failed: {e}; peers take it over once this node's host lease is dead"
                        ),
                    );
                }
            }
            Op::Leave(done) => {
                for (name, _) in lease.held() {
                    let _ = lease.release(&name);
                }
                let _ = done.send(());
                return;
            }
        }
    }
}

/// What the observer watches, and where it leaves the tokens it reads.
struct Observed<'a> {
    groups: &'a [GroupId],
    nodes: &'a [NodeId],
    me: NodeId,
    tokens: &'a std::sync::Mutex<BTreeMap<GroupId, u64>>,
    hints: &'a Mutex<Hints>,
}

/// Bytes of resource leases the observer reads per round at least. With the default area
/// (16 host slots, 512-byte sectors: 9.5 KiB per lease) that is 53 leases: a cluster of up to
/// 53 groups has every lease read every round.
const ROUND_BUDGET_BYTES: u64 = 512 * 1024;

/// A larger cluster reads its hot leases every round and sweeps the others so that each is
/// read at least once every this many rounds (poll interval `R/4`: within `0.75 R`; fewer
/// rounds where the poll interval's 100 ms floor makes rounds longer, see `sweep_rounds`). That
/// keeps the engine's assumption that a freed lease is seen by every node within the
/// takeover stagger (`R`). At 1,000 groups on the default area that is 334 leases, 3.2 MB,
/// per round: about 13 MB/s of lease reads per host at `R = 1 s`, in reads of up to 1 MiB,
/// and a few milliseconds of CPU per second (one lease per read and a full decode of every
/// ballot block, as before, cost an agent most of a core at 100 groups).
const SWEEP_ROUNDS: usize = 3;

/// Rounds of `period_ms` a sweep may take so that every lease is read within `0.75 R` (at
/// most `SWEEP_ROUNDS`, at least 1: every lease every round).
fn sweep_rounds(renewal_ms: u64, period: Duration) -> usize {
    let rounds = (renewal_ms * 3 / 4) / (period.as_millis() as u64).max(1);
    usize::try_from(rounds).unwrap_or(SWEEP_ROUNDS).clamp(1, SWEEP_ROUNDS)
}

/// An observation that did not change is handed to the engine again after this many
/// rounds anyway (`2 R`): the engine's own view of a lease it does not hold can change
/// without the lease changing (after a release or a refused acquisition), and it must not
/// wait for the next change on disk to be corrected.
const REFRESH_ROUNDS: u64 = 8;

/// How long a lease stays hot (read every round) after a change was seen on it or a hint
/// named it: a change is usually followed by more (a release by the next acquisition).
const HOT_FOR: Duration = Duration::from_secs(5);

/// What the runtime knows that makes some leases worth reading every round for a while.
#[derive(Debug, Default)]
pub(crate) struct Hints {
    /// Groups an operator command named.
    groups: BTreeMap<GroupId, std::time::Instant>,
    /// Nodes that were lost or went to standby: the leases they hold are about to move.
    nodes: BTreeMap<NodeId, std::time::Instant>,
    /// Groups whose next observation the engine must be handed even if unchanged (read in
    /// the next round; removed once handed over).
    resend: BTreeSet<GroupId>,
}

/// The observer's memory of one group's lease.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// Read successfully at least once.
    read: bool,
    holder: Option<NodeId>,
    token: Option<u64>,
    value: Option<Vec<u8>>,
    /// Round of the last read (for fairness among hot leases).
    round: u64,
    /// Round in which the engine was last handed this lease's observation.
    sent_round: u64,
    hot_until: Option<std::time::Instant>,
}

/// Which groups to read this round: the hot ones first (least recently read first, at most
/// `budget`), then at least `sweep` others in turn, and more while under `budget`.
fn pick(hot: &[bool], seen: &[Seen], cursor: &mut usize, budget: usize, sweep: usize) -> Vec<usize> {
    let n = hot.len();
    let budget = budget.max(1);
    let mut hot_ones: Vec<usize> = (0..n).filter(|&i| hot[i]).collect();
    hot_ones.sort_by_key(|&i| (seen[i].round, i));
    hot_ones.truncate(budget);
    let mut chosen = vec![false; n];
    for &i in &hot_ones {
        chosen[i] = true;
    }
    let target = (hot_ones.len() + sweep).max(budget);
    let mut picked = hot_ones;
    let mut visited = 0;
    while picked.len() < target && visited < n {
        let i = *cursor % n;
        *cursor = (*cursor + 1) % n;
        visited += 1;
        if !chosen[i] {
            chosen[i] = true;
            picked.push(i);
        }
    }
    picked
}

fn observe(
    lease: &HostLease,
    stop: &AtomicBool,
    contend: &AtomicBool,
    seen_by: &Observed<'_>,
    hooks: &MembershipHooks,
    tx: &mpsc::UnboundedSender<Input>,
) {
    let Observed { groups, nodes, me, tokens, hints } = *seen_by;
    let period = Duration::from_millis(lease.timeouts().poll_interval_ms().max(100));
    let mut dead: BTreeSet<NodeId> = BTreeSet::new();
    let mut last_alive: BTreeMap<NodeId, bool> = BTreeMap::new();
    let mut reader = tandem_lease::observe::ResourceReader::new(lease);
    let budget = usize::try_from(ROUND_BUDGET_BYTES / reader.slot_len().max(1)).unwrap_or(usize::MAX);
    let sweep = groups.len().div_ceil(sweep_rounds(lease.timeouts().renewal_ms, period));
    let names: Vec<String> = groups.iter().map(group_lease).collect();
    let mut seen: Vec<Seen> = vec![Seen::default(); groups.len()];
    let mut cursor = 0usize;
    let mut round = 0u64;
    while !stop.load(Ordering::SeqCst) {
        round += 1;
        // Peers' host leases, judged on our own clock.
        let observed = lease.observe_hosts();
        match &observed {
            Ok(hosts) => {
                for n in nodes.iter().filter(|n| **n != me) {
                    // A slot never seen (beyond the area) is treated as alive: never assume
                    // a peer dead without having watched it for the host-dead time.
                    let alive = hosts.iter().find(|h| h.host_id == n.0).is_none_or(|h| h.liveness == Liveness::Alive);
                    if last_alive.insert(*n, alive) != Some(alive) {
                        (hooks.disk_liveness)(*n, alive);
                    }
                    // Repeated every round while the peer stays dead: a membership verdict
                    // that arrives later resets the engine's view of the peer, and the
                    // engine must not forget that its lease is dead.
                    if !alive {
                        dead.insert(*n);
                        let _ = tx.send(Input::Engine(Event::PeerFenced(*n)));
                    } else if dead.remove(n) {
                        // Renewed again: the peer rejoined the lockspace (a restart).
                        let _ = tx.send(Input::Engine(Event::PeerLeaseAlive(*n)));
                    }
                }
            }
            Err(e) => tracing::warn!(target: "tandem_node", "cannot read the host leases: {e}"),
        }
        // Which leases are hot: never read, free, held by a node whose host lease is not
        // alive (its groups are being taken over: every node must see who got them), changed
        // lately, or named by a hint.
        let now = std::time::Instant::now();
        // One lock per round: the resend requests of this round are a snapshot, and only
        // those handed over are removed afterwards (a request arriving meanwhile stays).
        let (hot, resend): (Vec<bool>, BTreeSet<GroupId>) = {
            let mut h = hints.lock().unwrap_or_else(|p| p.into_inner());
            h.groups.retain(|_, until| *until > now);
            h.nodes.retain(|_, until| *until > now);
            let hot = groups
                .iter()
                .zip(&seen)
                .map(|(g, s)| {
                    !s.read
                        || s.holder.is_none()
                        || s.holder.is_some_and(|n| dead.contains(&n) || h.nodes.contains_key(&n))
                        || s.hot_until.is_some_and(|t| t > now)
                        || h.groups.contains_key(g)
                        || h.resend.contains(g)
                })
                .collect();
            (hot, h.resend.clone())
        };
        let mut resent = Vec::new();
        let picked = pick(&hot, &seen, &mut cursor, budget, sweep);
        let batch: Vec<&str> = picked.iter().map(|&i| names[i].as_str()).collect();
        // Without this round's host observations, holders are judged alive (never dead
        // without having been watched for the host-dead time).
        let hosts = observed.as_deref().unwrap_or(&[]);
        for (&i, obs) in picked.iter().zip(reader.observe(lease, &batch, hosts)) {
            let group = &groups[i];
            match obs {
                Ok(obs) => {
                    let value = obs.value_bytes().map(<[u8]>::to_vec);
                    let holder = obs.holder.as_ref().map(|h| NodeId(h.host_id));
                    let token = obs.last_token.map(|t| t.0);
                    let s = &mut seen[i];
                    let changed = !s.read || s.holder != holder || s.token != token || s.value != value;
                    if changed && s.read {
                        s.hot_until = Some(now + HOT_FOR);
                    }
                    s.read = true;
                    s.round = round;
                    let asked = resend.contains(group);
                    if !changed && !asked && round < s.sent_round + REFRESH_ROUNDS {
                        continue;
                    }
                    if asked {
                        resent.push(group);
                    }
                    s.sent_round = round;
                    s.holder = holder;
                    s.token = token;
                    s.value.clone_from(&value);
                    let note = decode_note(tx, group, value);
                    if let Some(t) = token {
                        tokens.lock().unwrap_or_else(|p| p.into_inner()).insert(group.clone(), t);
                    }
                    let _ = tx.send(Input::Engine(Event::LeaseObserved { group: group.clone(), holder, note }));
                }
                Err(e) => {
                    seen[i].round = round;
                    tracing::warn!(target: "tandem_node", "cannot read the lease of {group}: {e}")
                }
            }
        }
        if !resent.is_empty() {
            let mut h = hints.lock().unwrap_or_else(|p| p.into_inner());
            for g in resent {
                h.resend.remove(g);
            }
        }
        // The quorum tie-break (two-node clusters). The lease is held continuously by
        // whichever node got it first, so that when the cluster splits in half the holder
        // already knows it won and keeps its groups without a stop/start bounce; the other
        // half gets it only once the holder's host lease is dead or the holder gives it up
        // (isolated from its ping targets, draining, stopping).
        if contend.load(Ordering::SeqCst) {
            if lease.holds(QUORUM_LEASE).is_none() {
                let _ = lease.acquire(QUORUM_LEASE, None);
            }
        } else if lease.holds(QUORUM_LEASE).is_some() {
            let _ = lease.release(QUORUM_LEASE);
        }
        (hooks.tie_break)(lease.holds(QUORUM_LEASE).is_some());
        std::thread::sleep(period);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(n: usize) -> Vec<Seen> {
        vec![Seen::default(); n]
    }

    /// Within the budget every lease is read every round, as without one.
    #[test]
    fn everything_fits_in_the_budget() {
        let (hot, s) = (vec![false; 10], seen(10));
        let mut cursor = 0;
        for _ in 0..3 {
            let mut p = pick(&hot, &s, &mut cursor, 53, 4);
            p.sort_unstable();
            assert_eq!(p, (0..10).collect::<Vec<_>>());
        }
    }

    /// Over the budget: the hot leases first, then a sweep that reaches every other lease
    /// within ceil(cold / (budget - hot)) rounds.
    #[test]
    fn hot_leases_first_then_a_sweep_of_the_rest() {
        let n = 100;
        let mut hot = vec![false; n];
        hot[7] = true;
        hot[93] = true;
        let s = seen(n);
        let mut cursor = 0;
        let mut covered = BTreeSet::new();
        for round in 0..10 {
            let p = pick(&hot, &s, &mut cursor, 12, 5);
            assert_eq!(p.len(), 12);
            assert!(p[..2].contains(&7) && p[..2].contains(&93), "round {round}: {p:?}");
            covered.extend(p);
        }
        assert_eq!(covered.len(), n, "98 cold leases, 10 per round: all read in 10 rounds");
    }

    /// More hot leases than the budget: the least recently read first, so none starves.
    #[test]
    fn hot_leases_over_the_budget_take_turns() {
        let hot = vec![true; 6];
        let mut s = seen(6);
        let mut cursor = 0;
        let mut counts = [0; 6];
        for round in 1..=6 {
            for i in pick(&hot, &s, &mut cursor, 2, 0) {
                counts[i] += 1;
                s[i].round = round;
            }
        }
        assert_eq!(counts, [2; 6]);
    }

    /// Beyond the budget, the sweep still reads its share every round: with 1,000 leases,
    /// 40 of them hot and a budget of 53, every lease is read within 3 rounds.
    #[test]
    fn the_sweep_reaches_every_lease_within_its_rounds() {
        let n = 1000;
        let hot: Vec<bool> = (0..n).map(|i| i % 25 == 0).collect();
        let s = seen(n);
        let mut cursor = 0;
        let mut covered = BTreeSet::new();
        for _ in 0..SWEEP_ROUNDS {
            covered.extend(pick(&hot, &s, &mut cursor, 53, n.div_ceil(SWEEP_ROUNDS)));
        }
        assert_eq!(covered.len(), n);
    }

    /// The sweep fits in `0.75 R` whatever the poll interval's floor does to the rounds.
    #[test]
    fn sweep_rounds_fit_in_three_quarters_of_r() {
        let ms = Duration::from_millis;
        assert_eq!(sweep_rounds(1000, ms(250)), 3);
        assert_eq!(sweep_rounds(300, ms(100)), 2);
        assert_eq!(sweep_rounds(200, ms(100)), 1);
        assert_eq!(sweep_rounds(100, ms(100)), 1);
        assert_eq!(sweep_rounds(10_000, ms(2500)), 3);
    }

    /// A budget of zero still reads one lease per round.
    #[test]
    fn at_least_one_lease_per_round() {
        let mut cursor = 0;
        assert_eq!(pick(&[false, false], &seen(2), &mut cursor, 0, 0).len(), 1);
    }
}
