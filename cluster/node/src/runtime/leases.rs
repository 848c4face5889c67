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
    {
        let (lease, stop, tx, contend) = (lease.clone(), stop.clone(), tx.clone(), tie_break.clone());
        let (groups, nodes, me, tokens) = (cfg.groups.clone(), cfg.nodes.clone(), cfg.me, tokens.clone());
        std::thread::Builder::new()
            .name("lease-observer".into())
            .spawn(move || {
                let seen = Observed { groups: &groups, nodes: &nodes, me, tokens: &tokens };
                observe(&lease, &stop, &contend, &seen, &hooks, &tx)
            })
            .expect("spawning a thread");
    }

    Ok(LeaseClient { ops: ops_tx, lease, stop, tie_break, tokens })
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
}

fn observe(
    lease: &HostLease,
    stop: &AtomicBool,
    contend: &AtomicBool,
    seen: &Observed<'_>,
    hooks: &MembershipHooks,
    tx: &mpsc::UnboundedSender<Input>,
) {
    let Observed { groups, nodes, me, tokens } = *seen;
    let period = Duration::from_millis(lease.timeouts().poll_interval_ms().max(100));
    let mut dead: BTreeSet<NodeId> = BTreeSet::new();
    let mut last_alive: BTreeMap<NodeId, bool> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) {
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
        // Every group's lease: holder and note.
        for group in groups {
            // The holders' liveness comes from this round's host observations.
            let obs = match &observed {
                Ok(hosts) => lease.observe_resource_with(&group_lease(group), hosts),
                Err(_) => lease.observe_resource(&group_lease(group)),
            };
            match obs {
                Ok(obs) => {
                    let note = decode_note(tx, group, obs.value_bytes().map(<[u8]>::to_vec));
                    let holder = obs.holder.as_ref().map(|h| NodeId(h.host_id));
                    if let Some(t) = obs.last_token {
                        tokens.lock().unwrap_or_else(|p| p.into_inner()).insert(group.clone(), t.0);
                    }
                    let _ = tx.send(Input::Engine(Event::LeaseObserved { group: group.clone(), holder, note }));
                }
                Err(e) => tracing::warn!(target: "tandem_node", "cannot read the lease of {group}: {e}"),
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
