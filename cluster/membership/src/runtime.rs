//! The tokio runtime around the [`Membership`] core: one UDP socket per link
//! sending authenticated heartbeats to every peer's address on that link and
//! receiving theirs, a ping-target checker, and the task that feeds the core
//! and publishes its events.
//!
//! Ping targets are checked with a TCP connect (no raw sockets needed): a
//! completed handshake or a refusal (RST) both prove the target answered;
//! only a timeout or a network error counts as unreachable.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tandem_monitors::Secret;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::core::{ConfigError, CoreCounters, Input, Membership, MembershipConfig, MembershipEvent, NodeId, PeerView};
use crate::wire::{Codec, CodecError, Heartbeat, MAX_PACKET, WireError};

/// Everything the runtime needs.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The membership configuration (nodes, links, timeouts, ping targets).
    pub membership: MembershipConfig,
    /// The cluster's name, carried and authenticated in every packet.
    pub cluster_name: String,
    /// The shared cluster key (at least 16 bytes).
    pub key: Secret,
    /// This agent's incarnation; `None` takes the wall clock in microseconds,
    /// which grows across restarts as long as the clock is not set back.
    pub incarnation: Option<u64>,
    /// How often every ping target is checked.
    pub ping_interval: Duration,
    /// How long a ping-target check may take before it counts as unreachable.
    pub ping_timeout: Duration,
}

/// Failure to start the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The membership configuration is invalid.
    #[error("invalid membership configuration")]
    Config(#[from] ConfigError),
    /// The cluster name or key is unusable.
    #[error("invalid heartbeat authentication settings")]
    Codec(#[from] CodecError),
    /// A link's socket could not be bound.
    #[error("cannot bind heartbeat link {link} ({name}) to {addr}; check that the address is configured on this host")]
    Bind {
        /// Link index.
        link: usize,
        /// Link name.
        name: String,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Packet counters of the runtime (cumulative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireStats {
    /// Heartbeats sent.
    pub sent: u64,
    /// Sends that failed (network unreachable, no route...).
    pub send_errors: u64,
    /// Datagrams received.
    pub received: u64,
    /// Authenticated heartbeats handed to the core.
    pub accepted: u64,
    /// Not a heartbeat or wrong length.
    pub malformed: u64,
    /// Longer than the largest heartbeat.
    pub oversize: u64,
    /// Another cluster's heartbeats.
    pub foreign_cluster: u64,
    /// Wrong key or tampered.
    pub bad_mac: u64,
    /// Authentic, but addressed to another node or sent on another link.
    pub misdirected: u64,
    /// Authentic, but not from the sender's configured address on this link.
    pub wrong_source: u64,
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    send_errors: AtomicU64,
    received: AtomicU64,
    accepted: AtomicU64,
    malformed: AtomicU64,
    oversize: AtomicU64,
    foreign_cluster: AtomicU64,
    bad_mac: AtomicU64,
    misdirected: AtomicU64,
    wrong_source: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> WireStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WireStats {
            sent: l(&self.sent),
            send_errors: l(&self.send_errors),
            received: l(&self.received),
            accepted: l(&self.accepted),
            malformed: l(&self.malformed),
            oversize: l(&self.oversize),
            foreign_cluster: l(&self.foreign_cluster),
            bad_mac: l(&self.bad_mac),
            misdirected: l(&self.misdirected),
            wrong_source: l(&self.wrong_source),
        }
    }
}

/// The core's state as last published.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every peer.
    pub peers: Vec<PeerView>,
    /// Whether this node has quorum.
    pub quorum: bool,
    /// Whether this node considers itself isolated.
    pub isolated: bool,
    /// Whether the disk tie-break decides quorum now (see
    /// [`Membership::tie_break_relevant`]).
    pub tie_break_relevant: bool,
    /// Heartbeats the core refused (replays, unknown senders).
    pub core: CoreCounters,
}

/// A running membership service. Dropping it stops every task and closes the sockets.
#[derive(Debug)]
pub struct MembershipHandle {
    standby: Arc<AtomicBool>,
    events: mpsc::UnboundedReceiver<MembershipEvent>,
    inputs: mpsc::UnboundedSender<Input>,
    view: watch::Receiver<Snapshot>,
    counters: Arc<Counters>,
    links: Vec<Option<JoinHandle<()>>>,
    others: Vec<JoinHandle<()>>,
    local: Vec<SocketAddr>,
}

/// Feeds lease-layer verdicts to a running membership service and reads its view; cheap to
/// clone, usable from any thread. Inputs sent after the service stopped are dropped.
#[derive(Debug, Clone)]
pub struct MembershipController {
    inputs: mpsc::UnboundedSender<Input>,
    view: watch::Receiver<Snapshot>,
    standby: Arc<AtomicBool>,
}

impl MembershipController {
    /// Sets the standby flag this node's heartbeats carry from the next round on.
    pub fn set_standby(&self, standby: bool) {
        self.standby.store(standby, Ordering::Relaxed);
    }

    /// The standby flag this node's heartbeats carry.
    pub fn standby(&self) -> bool {
        self.standby.load(Ordering::Relaxed)
    }

    /// Feeds the lease layer's verdict on `node`'s delta lease.
    pub fn disk_liveness(&self, node: NodeId, alive: bool) {
        let _ = self.inputs.send(Input::DiskLiveness { node, alive });
    }

    /// Feeds whether this node holds the disk tie-break lease.
    pub fn tie_break(&self, won: bool) {
        let _ = self.inputs.send(Input::TieBreak { won });
    }

    /// The core's state as last published.
    pub fn view(&self) -> Snapshot {
        self.view.borrow().clone()
    }
}

impl MembershipHandle {
    /// Binds every link and starts heartbeating. Must run inside a tokio runtime.
    pub async fn start(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let codec = Arc::new(Codec::new(&config.cluster_name, &config.key)?);
        let base = Instant::now();
        let core = Membership::new(config.membership.clone(), 0)?;
        let m = config.membership;
        let this = m.this_node;
        let own = m.node(this).map(|n| n.addresses.clone()).unwrap_or_default();
        let incarnation = config
            .incarnation
            .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(1));
        let counters = Arc::new(Counters::default());
        let seq = Arc::new(AtomicU64::new(0));
        let standby = Arc::new(AtomicBool::new(false));
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (view_tx, view_rx) = watch::channel(Snapshot::default());

        let mut sockets = Vec::new();
        let mut local = Vec::new();
        for (link, addr) in own.iter().enumerate() {
            let sock = UdpSocket::bind(addr).await.map_err(|source| RuntimeError::Bind {
                link,
                name: m.links[link].clone(),
                addr: *addr,
                source,
            })?;
            local.push(sock.local_addr().unwrap_or(*addr));
            sockets.push(sock);
        }
        let interval = Duration::from_millis(m.heartbeat_interval_ms);
        let links = sockets
            .into_iter()
            .enumerate()
            .map(|(link, sock)| {
                let peers: Vec<(NodeId, SocketAddr)> =
                    m.nodes.iter().filter(|n| n.id != this).map(|n| (n.id, n.addresses[link])).collect();
                let task = LinkTask {
                    link,
                    this,
                    incarnation,
                    sock,
                    peers,
                    codec: codec.clone(),
                    seq: seq.clone(),
                    standby: standby.clone(),
                    interval,
                    inputs: in_tx.clone(),
                    counters: counters.clone(),
                };
                Some(tokio::spawn(task.run()))
            })
            .collect();
        let mut others = vec![tokio::spawn(core_task(core, base, interval, in_rx, ev_tx, view_tx))];
        if !m.ping_targets.is_empty() {
            others.push(tokio::spawn(ping_task(
                m.ping_targets.clone(),
                config.ping_interval,
                config.ping_timeout,
                in_tx.clone(),
            )));
        }
        Ok(Self { standby, events: ev_rx, inputs: in_tx, view: view_rx, counters, links, others, local })
    }

    /// The next membership event; `None` once the service stopped.
    pub async fn next_event(&mut self) -> Option<MembershipEvent> {
        self.events.recv().await
    }

    /// An event already waiting, if any.
    pub fn try_next_event(&mut self) -> Option<MembershipEvent> {
        self.events.try_recv().ok()
    }

    /// Feeds the lease layer's verdict on `node`'s delta lease.
    pub fn disk_liveness(&self, node: NodeId, alive: bool) {
        // A send fails only after shutdown, when nothing listens any more.
        let _ = self.inputs.send(Input::DiskLiveness { node, alive });
    }

    /// Feeds whether this node holds the disk tie-break lease.
    pub fn tie_break(&self, won: bool) {
        let _ = self.inputs.send(Input::TieBreak { won });
    }

    /// Sets the standby flag this node's heartbeats carry from the next round on (peers
    /// report it as [`MembershipEvent::PeerStandby`]).
    pub fn set_standby(&self, standby: bool) {
        self.standby.store(standby, Ordering::Relaxed);
    }

    /// A cloneable handle for the parts of an agent that feed the lease layer's
    /// verdicts and read the view from other threads or tasks.
    pub fn controller(&self) -> MembershipController {
        MembershipController { inputs: self.inputs.clone(), view: self.view.clone(), standby: self.standby.clone() }
    }

    /// The core's state as last published.
    pub fn view(&self) -> Snapshot {
        self.view.borrow().clone()
    }

    /// Packet counters.
    pub fn stats(&self) -> WireStats {
        self.counters.snapshot()
    }

    /// The bound local address of every link.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local
    }

    /// Stops sending and receiving on `link` and closes its socket (link
    /// maintenance). Peers see only a `LinkDown` as long as another link works.
    pub fn close_link(&mut self, link: usize) {
        if let Some(Some(t)) = self.links.get_mut(link).map(Option::take) {
            t.abort();
        }
    }

    /// Stops everything and waits until every socket is closed, so the
    /// addresses can be bound again (an agent restart).
    pub async fn stop(mut self) {
        let tasks: Vec<_> = self.links.iter_mut().filter_map(Option::take).chain(self.others.drain(..)).collect();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            // Aborted tasks end with a cancellation error; that is the point.
            let _ = t.await;
        }
    }

    /// Stops everything without waiting: peers will see this node go silent
    /// on every link; the sockets close as soon as the tasks notice.
    pub fn shutdown(&mut self) {
        for link in 0..self.links.len() {
            self.close_link(link);
        }
        for t in self.others.drain(..) {
            t.abort();
        }
    }
}

impl Drop for MembershipHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct LinkTask {
    link: usize,
    this: NodeId,
    incarnation: u64,
    sock: UdpSocket,
    peers: Vec<(NodeId, SocketAddr)>,
    codec: Arc<Codec>,
    seq: Arc<AtomicU64>,
    standby: Arc<AtomicBool>,
    interval: Duration,
    inputs: mpsc::UnboundedSender<Input>,
    counters: Arc<Counters>,
}

impl LinkTask {
    async fn run(self) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One byte more than the largest heartbeat, so oversize datagrams are recognised.
        let mut buf = [0u8; MAX_PACKET + 1];
        loop {
            tokio::select! {
                _ = ticker.tick() => self.send_round().await,
                r = self.sock.recv_from(&mut buf) => match r {
                    Ok((n, src)) => {
                        if self.receive(&buf[..n], src).is_err() {
                            return;
                        }
                    }
                    // ICMP errors from earlier sends (port unreachable) surface here; the next recv is fine.
                    Err(e) => tracing::trace!(link = self.link, error = %e, "heartbeat receive error"),
                },
            }
        }
    }

    async fn send_round(&self) {
        for (peer, addr) in &self.peers {
            let hb = Heartbeat {
                link: self.link as u8,
                from: self.this,
                to: *peer,
                incarnation: self.incarnation,
                seq: self.seq.fetch_add(1, Ordering::Relaxed),
                standby: self.standby.load(Ordering::Relaxed),
            };
            match self.sock.send_to(&self.codec.encode(&hb), addr).await {
                Ok(_) => bump(&self.counters.sent),
                Err(e) => {
                    bump(&self.counters.send_errors);
                    tracing::trace!(link = self.link, peer = peer.0, error = %e, "heartbeat send failed");
                }
            }
        }
    }

    /// Handles one datagram; `Err` when the core is gone.
    fn receive(&self, packet: &[u8], src: SocketAddr) -> Result<(), ()> {
        let c = &self.counters;
        bump(&c.received);
        let hb = match self.codec.decode(packet) {
            Ok(hb) => hb,
            Err(e) => {
                bump(match e {
                    WireError::Malformed => &c.malformed,
                    WireError::Oversize => &c.oversize,
                    WireError::ForeignCluster => &c.foreign_cluster,
                    WireError::BadMac => &c.bad_mac,
                });
                tracing::debug!(link = self.link, %src, reason = %e, "heartbeat dropped");
                return Ok(());
            }
        };
        if hb.to != self.this || usize::from(hb.link) != self.link {
            bump(&c.misdirected);
            return Ok(());
        }
        if !self.peers.iter().any(|(id, addr)| *id == hb.from && *addr == src) {
            bump(&c.wrong_source);
            return Ok(());
        }
        bump(&c.accepted);
        self.inputs
            .send(Input::Heartbeat {
                link: self.link,
                from: hb.from,
                incarnation: hb.incarnation,
                seq: hb.seq,
                standby: hb.standby,
            })
            .map_err(|_| ())
    }
}

async fn core_task(
    mut core: Membership,
    base: Instant,
    interval: Duration,
    mut inputs: mpsc::UnboundedReceiver<Input>,
    events: mpsc::UnboundedSender<MembershipEvent>,
    view: watch::Sender<Snapshot>,
) {
    let now_ms = || base.elapsed().as_millis() as u64;
    loop {
        // Wake at the core's next deadline (rounded up) but at least every interval.
        let wake = core
            .next_deadline_ms()
            .map(|d| base + Duration::from_millis(d + 1))
            .unwrap_or_else(|| Instant::now() + interval)
            .min(Instant::now() + interval);
        let input = tokio::select! {
            i = inputs.recv() => match i {
                Some(i) => i,
                None => return,
            },
            _ = tokio::time::sleep_until(wake) => Input::Tick,
        };
        let mut out = core.handle(now_ms(), input);
        // A quorum loss goes out before the silence that caused it: a consumer that acts on
        // a lost peer must already know it has no quorum (it must not fence or take over).
        out.sort_by_key(|e| !matches!(e, MembershipEvent::QuorumLost));
        publish_view(&core, &view);
        for e in out {
            tracing::info!(event = ?e, "membership");
            if events.send(e).is_err() {
                return;
            }
        }
    }
}

fn publish_view(core: &Membership, view: &watch::Sender<Snapshot>) {
    view.send_if_modified(|v| {
        let next = Snapshot {
            peers: core.peers(),
            quorum: core.has_quorum(),
            isolated: core.is_isolated(),
            tie_break_relevant: core.tie_break_relevant(),
            core: core.counters(),
        };
        let changed = *v != next;
        *v = next;
        changed
    });
}

async fn ping_task(targets: Vec<SocketAddr>, every: Duration, timeout: Duration, inputs: mpsc::UnboundedSender<Input>) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let checks = targets.iter().map(|t| reachable(*t, timeout));
        let results = futures_join_all(checks).await;
        for (target, reachable) in results.into_iter().enumerate() {
            if inputs.send(Input::PingResult { target, reachable }).is_err() {
                return;
            }
        }
    }
}

/// Checks all targets concurrently so one black hole does not delay the others.
async fn futures_join_all<F: std::future::Future<Output = bool> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<bool> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap_or(false));
    }
    out
}

/// Whether `target` answers a TCP connect within `timeout`: an accepted
/// connection or a refusal both prove the host is there.
pub async fn reachable(target: SocketAddr, timeout: Duration) -> bool {
    match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Err(_) => false,
    }
}
