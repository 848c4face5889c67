//! Watches the host networks VMs attach to (`[[network]]`): the link state of their
//! interfaces, from the kernel over rtnetlink, and optional ping targets. A change of a
//! network's health counts only once it has lasted the network's `hold`, so a flapping
//! link does not move VMs back and forth.
//!
//! Link state comes from netlink rather than `/sys/class/net`: a netlink socket belongs to
//! the network namespace of the thread that opens it, while sysfs shows the namespace it
//! was mounted in (which `nsenter --net` does not change).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage, State};
use rtnetlink::sys::AsyncSocket;
use tandem_config::Network;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How often the whole link table is read again, in case a netlink notification was lost
/// (the kernel drops them when the socket's buffer overflows).
const REDUMP: Duration = Duration::from_secs(10);
/// Bound on one ping target's TCP connect.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the monitor could not start.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    /// The netlink socket could not be opened or bound.
    #[error("cannot open a netlink socket to watch network links")]
    Netlink(#[source] std::io::Error),
    /// Reading the link table failed.
    #[error("cannot read the network links from the kernel: {0}")]
    Dump(String),
}

/// The damped health of one network, as the rest of the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkHealth {
    /// The network (`[[network]] name`).
    pub network: String,
    /// Whether it works on this host.
    pub healthy: bool,
    /// Why it does not, or what works (`br-a: up`).
    pub detail: String,
}

/// What one interface looks like now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LinkState {
    Up,
    AdminDown,
    NoCarrier,
}

/// The pure part of the monitor: one network's raw state in, damped changes out.
#[derive(Debug, Clone)]
pub struct Damper {
    hold: Duration,
    current: Option<bool>,
    pending: Option<(bool, Instant)>,
}

impl Damper {
    /// A damper whose first observation counts at once (a host that starts with a network
    /// down must not start its VMs first), and every later change once it lasted `hold`.
    pub fn new(hold: Duration) -> Damper {
        Damper { hold, current: None, pending: None }
    }

    /// The damped state, once known.
    pub fn current(&self) -> Option<bool> {
        self.current
    }

    /// Feeds the raw state at `now`; returns the new damped state when it changes.
    pub fn observe(&mut self, now: Instant, raw: bool) -> Option<bool> {
        match self.current {
            None => {
                self.current = Some(raw);
                return Some(raw);
            }
            Some(c) if c == raw => {
                self.pending = None;
                return None;
            }
            Some(_) => {}
        }
        let since = match self.pending {
            Some((p, since)) if p == raw => since,
            _ => {
                self.pending = Some((raw, now));
                now
            }
        };
        if now.duration_since(since) >= self.hold {
            self.current = Some(raw);
            self.pending = None;
            Some(raw)
        } else {
            None
        }
    }

    /// When a pending change will have lasted `hold`.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending.map(|(_, since)| since + self.hold)
    }
}

/// A running monitor: damped changes arrive on `changes`; `current` always holds every
/// network's latest damped health (for status).
#[derive(Debug)]
pub struct NicMonitor {
    /// Every damped change, in order, starting with each network's first reading.
    pub changes: mpsc::UnboundedReceiver<NetworkHealth>,
    /// The latest damped health of every network, by name.
    pub current: watch::Receiver<BTreeMap<String, NetworkHealth>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for NicMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Input {
    Link(LinkMessage, bool),
    Dump(Vec<LinkMessage>),
    Ping(usize, bool),
}

impl NicMonitor {
    /// Starts watching `networks` in the calling thread's network namespace. Must be called
    /// inside a tokio runtime.
    pub async fn start(networks: Vec<Network>) -> Result<NicMonitor, NicError> {
        let (mut conn, handle, mut messages) = rtnetlink::new_connection().map_err(NicError::Netlink)?;
        let groups = rtnetlink::constants::RTMGRP_LINK;
        conn.socket_mut().socket_mut().bind(&rtnetlink::sys::SocketAddr::new(0, groups)).map_err(NicError::Netlink)?;
        let conn_task = tokio::spawn(conn);
        let (tx, mut rx) = mpsc::unbounded_channel::<Input>();

        // Notifications first, then the dump: whatever changes meanwhile arrives after it.
        let notes = tx.clone();
        let notify_task = tokio::spawn(async move {
            while let Some((msg, _)) = messages.next().await {
                let input = match msg.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => Input::Link(l, true),
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => Input::Link(l, false),
                    _ => continue,
                };
                if notes.send(input).is_err() {
                    break;
                }
            }
        });
        let first: Vec<LinkMessage> =
            handle.link().get().execute().try_collect().await.map_err(|e| NicError::Dump(e.to_string()))?;
        let _ = tx.send(Input::Dump(first));
        let dumper = tx.clone();
        let dump_task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(REDUMP).await;
                match handle.link().get().execute().try_collect::<Vec<_>>().await {
                    Ok(all) => {
                        if dumper.send(Input::Dump(all)).is_err() {
                            break;
                        }
                    }
                    Err(e) => tracing::warn!(target: "tandem_host", "re-reading network links failed: {e}"),
                }
            }
        });
        let mut ping_tasks = Vec::new();
        for (i, n) in networks.iter().enumerate() {
            if n.ping_targets.is_empty() {
                continue;
            }
            let (targets, tx, every) = (n.ping_targets.clone(), tx.clone(), ping_interval(n.hold));
            ping_tasks.push(tokio::spawn(async move {
                loop {
                    let ok = any_answers(&targets).await;
                    if tx.send(Input::Ping(i, ok)).is_err() {
                        break;
                    }
                    tokio::time::sleep(every).await;
                }
            }));
        }
        drop(tx);

        let (changes_tx, changes) = mpsc::unbounded_channel();
        let (current_tx, current) = watch::channel(BTreeMap::new());
        let task = tokio::spawn(async move {
            let mut state = Watcher::new(networks);
            loop {
                let wake = state.deadline();
                let input = tokio::select! {
                    i = rx.recv() => match i { Some(i) => Some(i), None => break },
                    _ = sleep_until(wake) => None,
                };
                match input {
                    Some(Input::Link(l, present)) => state.link(&l, present),
                    Some(Input::Dump(all)) => state.dump(&all),
                    Some(Input::Ping(i, ok)) => state.ping(i, ok),
                    None => {}
                }
                for change in state.evaluate(Instant::now()) {
                    let net = change.network.clone();
                    let level = if change.healthy { "works again" } else { "failed" };
                    tracing::warn!(target: "tandem_host", network = %net, "network {net} {level}: {}", change.detail);
                    current_tx.send_modify(|m| {
                        m.insert(net, change.clone());
                    });
                    if changes_tx.send(change).is_err() {
                        break;
                    }
                }
            }
            conn_task.abort();
            notify_task.abort();
            dump_task.abort();
            for t in ping_tasks {
                t.abort();
            }
        });
        Ok(NicMonitor { changes, current, task })
    }
}

/// Which VMs may not run on this host given the networks' health: for each VM (by group),
/// the reason it may not (naming every failed network it uses), or `None` when all its
/// networks work. Networks not read yet count as working: only a failure seen vetoes.
pub fn vetoes(
    vm_networks: &BTreeMap<String, Vec<String>>,
    health: &BTreeMap<String, NetworkHealth>,
) -> BTreeMap<String, Option<String>> {
    vm_networks
        .iter()
        .map(|(group, nets)| {
            let failed: Vec<String> = nets
                .iter()
                .filter_map(|n| {
                    health.get(n).filter(|h| !h.healthy).map(|h| format!("network {n} is down ({})", h.detail))
                })
                .collect();
            (group.clone(), (!failed.is_empty()).then(|| failed.join("; ")))
        })
        .collect()
}

/// Keeps the node's per-VM vetoes in line with the networks' health, for as long as the
/// monitor runs: a VM whose network failed here is given up and not taken here until it
/// works again.
pub async fn apply_vetoes(
    mut monitor: NicMonitor,
    vm_networks: BTreeMap<String, Vec<String>>,
    node: tandem_node::runtime::AgentHandle,
) {
    let mut applied: BTreeMap<String, Option<String>> = BTreeMap::new();
    // A veto the node could not take yet (it was busy starting) is tried again each second.
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            c = monitor.changes.recv() => if c.is_none() { return },
            _ = retry.tick() => {}
        }
        let health = monitor.current.borrow().clone();
        for (group, veto) in vetoes(&vm_networks, &health) {
            if applied.get(&group) == Some(&veto) {
                continue;
            }
            match node.set_veto(&group, veto.clone()).await {
                Ok(()) => {
                    applied.insert(group, veto);
                }
                Err(e) => {
                    tracing::warn!(target: "tandem_host", vm = %group, "cannot apply the network veto yet: {e}");
                }
            }
        }
    }
}

impl NicMonitor {
    /// Waits until every network was read once (link state, and a first round of pings),
    /// at most `limit`; says whether they all were.
    pub async fn first_readings(&mut self, networks: usize, limit: Duration) -> bool {
        let wait = async {
            while self.current.borrow().len() < networks {
                if self.current.changed().await.is_err() {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(limit, wait).await.unwrap_or(false)
    }
}

fn ping_interval(hold: Duration) -> Duration {
    (hold / 2).clamp(Duration::from_millis(250), Duration::from_secs(5))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// True when one target accepts or refuses a TCP connection within [`PING_TIMEOUT`]: either
/// proves the path works (the membership layer's ping targets count the same way).
async fn any_answers(targets: &[SocketAddr]) -> bool {
    let tries = targets.iter().map(|t| async move {
        match tokio::time::timeout(PING_TIMEOUT, tokio::net::TcpStream::connect(t)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
            Err(_) => false,
        }
    });
    futures::future::join_all(tries).await.into_iter().any(|ok| ok)
}

/// Interfaces and ping results in, per-network damped health out.
struct Watcher {
    networks: Vec<Network>,
    dampers: Vec<Damper>,
    links: HashMap<String, LinkState>,
    pings: Vec<Option<bool>>,
    dumped: bool,
}

impl Watcher {
    fn new(networks: Vec<Network>) -> Watcher {
        let dampers = networks.iter().map(|n| Damper::new(n.hold)).collect();
        let pings = vec![None; networks.len()];
        Watcher { networks, dampers, links: HashMap::new(), pings, dumped: false }
    }

    fn link(&mut self, l: &LinkMessage, present: bool) {
        if let Some(name) = name_of(l) {
            if present {
                self.links.insert(name, state_of(l));
            } else {
                self.links.remove(&name);
            }
        }
    }

    fn dump(&mut self, all: &[LinkMessage]) {
        self.links = all.iter().filter_map(|l| Some((name_of(l)?, state_of(l)))).collect();
        self.dumped = true;
    }

    fn ping(&mut self, i: usize, ok: bool) {
        self.pings[i] = Some(ok);
    }

    fn deadline(&self) -> Option<Instant> {
        self.dampers.iter().filter_map(Damper::deadline).min()
    }

    /// The raw health of network `i`, or `None` until everything it depends on was read once.
    fn raw(&self, i: usize) -> Option<(bool, String)> {
        if !self.dumped {
            return None;
        }
        let n = &self.networks[i];
        let ifaces = n.watched_interfaces();
        let mut problems = Vec::new();
        let mut up = Vec::new();
        for ifname in &ifaces {
            match self.links.get(ifname) {
                Some(LinkState::Up) => up.push(ifname.as_str()),
                Some(LinkState::AdminDown) => problems.push(format!("{ifname}: administratively down")),
                Some(LinkState::NoCarrier) => problems.push(format!("{ifname}: no carrier")),
                None => problems.push(format!("{ifname}: no such interface")),
            }
        }
        let links_ok = ifaces.is_empty() || !up.is_empty();
        let pings_ok = match (n.ping_targets.is_empty(), self.pings[i]) {
            (true, _) => true,
            (false, None) => return None,
            (false, Some(ok)) => ok,
        };
        if !pings_ok {
            let targets: Vec<String> = n.ping_targets.iter().map(ToString::to_string).collect();
            problems.push(format!("no ping target answers ({})", targets.join(", ")));
        }
        if links_ok && pings_ok {
            Some((true, format!("{}: up", up.join(", "))))
        } else {
            Some((false, problems.join("; ")))
        }
    }

    fn evaluate(&mut self, now: Instant) -> Vec<NetworkHealth> {
        let mut out = Vec::new();
        for i in 0..self.networks.len() {
            let Some((raw, detail)) = self.raw(i) else { continue };
            if let Some(healthy) = self.dampers[i].observe(now, raw) {
                out.push(NetworkHealth { network: self.networks[i].name.clone(), healthy, detail });
            }
        }
        out
    }
}

fn name_of(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// Up means administratively up with a carrier (`IFF_LOWER_UP`) and an operational state
/// that is not down; interfaces without operational state tracking report `Unknown`.
fn state_of(l: &LinkMessage) -> LinkState {
    let flags = l.header.flags;
    if !flags.contains(LinkFlags::Up) {
        return LinkState::AdminDown;
    }
    let oper = l.attributes.iter().find_map(|a| match a {
        LinkAttribute::OperState(s) => Some(*s),
        _ => None,
    });
    let oper_down = matches!(oper, Some(State::Down | State::LowerLayerDown | State::NotPresent));
    if flags.contains(LinkFlags::LowerUp) && !oper_down { LinkState::Up } else { LinkState::NoCarrier }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reading_counts_at_once_and_later_changes_after_hold() {
        let t0 = Instant::now();
        let hold = Duration::from_secs(2);
        let mut d = Damper::new(hold);
        assert_eq!(d.observe(t0, true), Some(true));
        assert_eq!(d.observe(t0 + Duration::from_millis(100), false), None);
        assert_eq!(d.deadline(), Some(t0 + Duration::from_millis(100) + hold));
        assert_eq!(d.observe(t0 + Duration::from_millis(1500), false), None);
        assert_eq!(d.observe(t0 + Duration::from_millis(2100), false), Some(false));
        assert_eq!(d.current(), Some(false));
        assert_eq!(d.deadline(), None);
    }

    #[test]
    fn a_flap_shorter_than_hold_changes_nothing() {
        let t0 = Instant::now();
        let mut d = Damper::new(Duration::from_secs(2));
        assert_eq!(d.observe(t0, true), Some(true));
        for k in 1..20u64 {
            // Down and up every 300 ms for six seconds: never down for two seconds.
            let raw = k % 2 == 1;
            assert_eq!(d.observe(t0 + Duration::from_millis(300 * k), !raw), None, "step {k}");
        }
        assert_eq!(d.current(), Some(true));
    }

    #[test]
    fn a_zero_hold_counts_every_change() {
        let t0 = Instant::now();
        let mut d = Damper::new(Duration::ZERO);
        assert_eq!(d.observe(t0, false), Some(false));
        assert_eq!(d.observe(t0, true), Some(true));
        assert_eq!(d.observe(t0, true), None);
    }

    fn network(name: &str, interfaces: &[&str]) -> Network {
        Network {
            name: name.into(),
            bridge: Some("br0".into()),
            libvirt_network: None,
            interfaces: interfaces.iter().map(|s| s.to_string()).collect(),
            ping_targets: Vec::new(),
            hold: Duration::ZERO,
        }
    }

    #[test]
    fn only_vms_on_a_failed_network_are_vetoed() {
        let vms: BTreeMap<String, Vec<String>> = [
            ("web".to_string(), vec!["front".to_string()]),
            ("db".to_string(), vec!["back".to_string(), "front".to_string()]),
            ("batch".to_string(), vec!["back".to_string()]),
            ("lonely".to_string(), vec![]),
        ]
        .into();
        let h = |n: &str, healthy: bool| {
            (n.to_string(), NetworkHealth { network: n.into(), healthy, detail: format!("{n}-detail") })
        };
        let health: BTreeMap<String, NetworkHealth> = [h("front", false), h("back", true)].into();
        let v = vetoes(&vms, &health);
        assert_eq!(v["web"].as_deref(), Some("network front is down (front-detail)"));
        assert_eq!(v["db"].as_deref(), Some("network front is down (front-detail)"));
        assert_eq!(v["batch"], None);
        assert_eq!(v["lonely"], None);
        assert!(vetoes(&vms, &BTreeMap::new()).values().all(Option::is_none), "unknown counts as working");
    }

    #[test]
    fn any_interface_up_keeps_the_network_working() {
        let mut w = Watcher::new(vec![network("lan", &["eth1", "eth2"])]);
        assert_eq!(w.raw(0), None, "nothing is known before the first dump");
        w.dumped = true;
        w.links.insert("eth1".into(), LinkState::NoCarrier);
        w.links.insert("eth2".into(), LinkState::Up);
        assert_eq!(w.raw(0), Some((true, "eth2: up".into())));
        w.links.insert("eth2".into(), LinkState::AdminDown);
        assert_eq!(w.raw(0), Some((false, "eth1: no carrier; eth2: administratively down".into())));
        w.links.remove("eth1");
        assert_eq!(w.raw(0).unwrap().1, "eth1: no such interface; eth2: administratively down");
    }

    #[test]
    fn ping_targets_must_answer_too() {
        let mut n = network("lan", &[]);
        n.ping_targets = vec!["192.0.2.1:53".parse().unwrap()];
        let mut w = Watcher::new(vec![n]);
        w.dumped = true;
        w.links.insert("br0".into(), LinkState::Up);
        assert_eq!(w.raw(0), None, "waits for the first ping round");
        w.ping(0, false);
        assert_eq!(w.raw(0), Some((false, "no ping target answers (192.0.2.1:53)".into())));
        w.ping(0, true);
        assert_eq!(w.raw(0), Some((true, "br0: up".into())));
    }
}
