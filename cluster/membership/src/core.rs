//! The pure membership core: inputs in, events out, no I/O and no clock.
//!
//! The caller passes a monotonic `now` in milliseconds with every input.
//! See docs/membership.md for the rules this module implements.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;

/// A node's id in the cluster, as configured (the same id the lease disk
/// uses for its host slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}", self.0)
    }
}

/// One configured node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Its id.
    pub id: NodeId,
    /// Its votes in the quorum (usually 1; 0 for a node that must not count).
    pub votes: u32,
    /// Its heartbeat address on each link, in the order of
    /// [`MembershipConfig::links`].
    pub addresses: Vec<SocketAddr>,
}

/// The cluster as this node sees it in its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipConfig {
    /// This node's id; must be one of `nodes`.
    pub this_node: NodeId,
    /// Every node of the cluster, this one included.
    pub nodes: Vec<NodeConfig>,
    /// The heartbeat links' names (e.g. "public", "interconnect"); a link is
    /// referred to by its index in this list.
    pub links: Vec<String>,
    /// How often a heartbeat is sent on every link.
    pub heartbeat_interval_ms: u64,
    /// A link to a peer is down when no heartbeat arrived on it for this long.
    pub link_timeout_ms: u64,
    /// Whether a lease disk is configured: then a node silent on every link is
    /// lost only once the disk says it is dead, and the disk breaks quorum ties.
    pub lease_disk: bool,
    /// Addresses that prove this node is not the isolated one when it cannot
    /// hear any peer (a router, a DNS server). Empty: no isolation detection.
    pub ping_targets: Vec<SocketAddr>,
}

/// A configuration the core refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// No link configured.
    #[error(
        "membership: no heartbeat link is configured; configure at least one (two or more to survive a link failure)"
    )]
    NoLinks,
    /// `this_node` is not among `nodes`.
    #[error("membership: this node ({0}) is not in the node list; add it or fix this_node")]
    ThisNodeMissing(NodeId),
    /// Two entries share an id.
    #[error("membership: {0} is configured twice; node ids must be unique")]
    DuplicateNode(NodeId),
    /// A node's address list does not match the links.
    #[error(
        "membership: {node} has {got} heartbeat addresses but {expected} links are configured; give one address per link"
    )]
    AddressCount {
        /// The node.
        node: NodeId,
        /// Number of links.
        expected: usize,
        /// Number of addresses given.
        got: usize,
    },
    /// The same address is used twice.
    #[error("membership: heartbeat address {0} is used twice; every node needs its own address on every link")]
    DuplicateAddress(SocketAddr),
    /// No node has a vote.
    #[error("membership: no node has a vote; give at least one node votes > 0")]
    NoVotes,
    /// The interval is zero.
    #[error("membership: heartbeat_interval_ms must be greater than 0")]
    ZeroInterval,
    /// The timeout does not leave room for lost packets.
    #[error(
        "membership: link_timeout_ms ({timeout_ms}) must be at least 3 heartbeat intervals ({interval_ms} ms each) so that one or two lost packets do not take a link down"
    )]
    TimeoutTooShort {
        /// The configured timeout.
        timeout_ms: u64,
        /// The configured interval.
        interval_ms: u64,
    },
    /// The link timeout is not shorter than the lease host-dead time.
    #[error(
        "membership: link_timeout_ms ({timeout_ms}) must be shorter than the lease host-dead time ({host_dead_ms} ms); lower the link timeout or raise the lease timeouts"
    )]
    TimeoutNotBelowLease {
        /// The configured link timeout.
        timeout_ms: u64,
        /// The lease layer's host-dead time.
        host_dead_ms: u64,
    },
}

impl MembershipConfig {
    /// Checks the configuration (see [`ConfigError`] for the rules).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.links.is_empty() {
            return Err(ConfigError::NoLinks);
        }
        if !self.nodes.iter().any(|n| n.id == self.this_node) {
            return Err(ConfigError::ThisNodeMissing(self.this_node));
        }
        let mut ids = HashSet::new();
        let mut addrs = HashSet::new();
        for n in &self.nodes {
            if !ids.insert(n.id) {
                return Err(ConfigError::DuplicateNode(n.id));
            }
            if n.addresses.len() != self.links.len() {
                return Err(ConfigError::AddressCount {
                    node: n.id,
                    expected: self.links.len(),
                    got: n.addresses.len(),
                });
            }
            for a in &n.addresses {
                if !addrs.insert(*a) {
                    return Err(ConfigError::DuplicateAddress(*a));
                }
            }
        }
        if self.nodes.iter().map(|n| u64::from(n.votes)).sum::<u64>() == 0 {
            return Err(ConfigError::NoVotes);
        }
        if self.heartbeat_interval_ms == 0 {
            return Err(ConfigError::ZeroInterval);
        }
        if self.link_timeout_ms < self.heartbeat_interval_ms.saturating_mul(3) {
            return Err(ConfigError::TimeoutTooShort {
                timeout_ms: self.link_timeout_ms,
                interval_ms: self.heartbeat_interval_ms,
            });
        }
        Ok(())
    }

    /// Checks the link timeout against the lease layer's host-dead time:
    /// the network must detect a silent node (and the minority lose quorum)
    /// before the disk may declare it dead, or detection gains nothing and a
    /// takeover could start before the other side noticed the partition.
    pub fn validate_against_lease(&self, host_dead_ms: u64) -> Result<(), ConfigError> {
        if self.link_timeout_ms >= host_dead_ms {
            return Err(ConfigError::TimeoutNotBelowLease { timeout_ms: self.link_timeout_ms, host_dead_ms });
        }
        Ok(())
    }

    /// The configured node `id`, if any.
    pub fn node(&self, id: NodeId) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.id == id)
    }
}

/// Something the agent observed, fed to [`Membership::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// An authenticated heartbeat arrived on `link` from `from`. The runtime
    /// has checked the MAC and that the packet came in on `link`'s socket.
    Heartbeat {
        /// The link (index into [`MembershipConfig::links`]).
        link: usize,
        /// The sender.
        from: NodeId,
        /// The sender's incarnation (grows with every restart of its agent).
        incarnation: u64,
        /// The sender's packet sequence number within its incarnation.
        seq: u64,
        /// Whether the sender says it is in standby (planned maintenance).
        standby: bool,
    },
    /// The lease layer's verdict on `node`'s delta lease.
    DiskLiveness {
        /// The node (its host id on the lease disk).
        node: NodeId,
        /// `true` while its delta lease is being renewed, `false` once the
        /// lease layer considers the host dead.
        alive: bool,
    },
    /// The result of the latest reachability check of a ping target.
    PingResult {
        /// Index into [`MembershipConfig::ping_targets`].
        target: usize,
        /// Whether it answered.
        reachable: bool,
    },
    /// The result of the disk tie-breaker (holding the quorum lease on the
    /// lease disk). Only consulted when exactly half of the votes are reachable.
    TieBreak {
        /// Whether this node holds the tie-break lease.
        won: bool,
    },
    /// Time passed; re-evaluates timeouts.
    Tick,
}

/// What the core tells the engine and the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A link to `node` carries heartbeats again (informational).
    LinkUp {
        /// The peer.
        node: NodeId,
        /// The link.
        link: usize,
    },
    /// No heartbeat from `node` on `link` for the link timeout. Never a
    /// failure by itself: the node is lost only when every link is down.
    LinkDown {
        /// The peer.
        node: NodeId,
        /// The link.
        link: usize,
    },
    /// `node` is reachable (first heartbeat, back after silence, or a new
    /// incarnation: a restarted agent runs none of its old groups).
    NodeJoined {
        /// The peer.
        node: NodeId,
        /// Its incarnation.
        incarnation: u64,
    },
    /// `node` is silent on every link but not known dead on the lease disk.
    /// Its groups must NOT be taken over.
    NodePartitioned {
        /// The peer.
        node: NodeId,
    },
    /// `node` is silent on every link and dead on the lease disk (or there is
    /// no disk): its groups may be taken over if this node has quorum.
    NodeLost {
        /// The peer.
        node: NodeId,
    },
    /// This node no longer has quorum: it must stop its groups.
    QuorumLost,
    /// This node has quorum (also emitted the first time it gets it).
    QuorumRegained,
    /// This node hears no peer and no ping target: it is the isolated one.
    /// It keeps peers as partitioned instead of declaring them lost and has
    /// no quorum; the agent should release the tie-break lease.
    SelfIsolated,
    /// A peer or a ping target answers again after [`MembershipEvent::SelfIsolated`].
    SelfReconnected,
    /// A peer's standby flag (from its accepted heartbeats) changed. Emitted before the
    /// `NodeJoined` the same heartbeat causes, so a consumer knows the flag when it sees the
    /// node join. Every peer starts as not in standby; the flag is kept while it is silent.
    PeerStandby {
        /// The peer.
        node: NodeId,
        /// Whether it is in standby now.
        standby: bool,
    },
}

/// A peer's state as the core judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerStatus {
    /// Not heard from yet and the start-up grace (one link timeout) not over.
    Unknown,
    /// At least one link carries heartbeats.
    Up,
    /// Silent on every link, not dead on the disk (or this node is isolated).
    Partitioned,
    /// Silent on every link and dead on the disk (or no disk configured).
    Lost,
}

/// What the lease disk says about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskStatus {
    /// No disk configured, or no verdict yet.
    Unknown,
    /// Its delta lease is renewed.
    Alive,
    /// Its delta lease expired.
    Dead,
}

/// The state of one link to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkStatus {
    /// Not heard on yet and the start-up grace not over.
    Unknown,
    /// A heartbeat arrived within the link timeout.
    Up,
    /// Silent for the link timeout.
    Down,
}

/// One peer in [`Membership::peers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    /// The peer.
    pub node: NodeId,
    /// Its votes.
    pub votes: u32,
    /// Overall verdict.
    pub status: PeerStatus,
    /// Per link, in configuration order.
    pub links: Vec<LinkStatus>,
    /// The lease disk's verdict.
    pub disk: DiskStatus,
    /// The latest accepted incarnation, if any heartbeat was accepted.
    pub incarnation: Option<u64>,
    /// Whether its latest accepted heartbeat said it is in standby.
    pub standby: bool,
}

/// Heartbeats the core refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreCounters {
    /// Heartbeats with an old incarnation or a sequence number not above the
    /// last one accepted on that link (replays, reordering).
    pub stale: u64,
    /// Heartbeats from an unconfigured node, from this node itself, or on a
    /// link that does not exist.
    pub unknown_sender: u64,
    /// Inputs naming an unconfigured node or ping target.
    pub bad_input: u64,
}

#[derive(Debug, Clone)]
struct LinkState {
    last_heard_ms: Option<u64>,
    /// Highest (incarnation, seq) accepted on this link.
    last_seq: Option<(u64, u64)>,
    status: LinkStatus,
}

#[derive(Debug, Clone)]
struct PeerState {
    votes: u32,
    links: Vec<LinkState>,
    disk: DiskStatus,
    incarnation: Option<u64>,
    status: PeerStatus,
    standby: bool,
}

/// The membership state machine. See the crate docs and docs/membership.md.
#[derive(Debug, Clone)]
pub struct Membership {
    config: MembershipConfig,
    started_ms: u64,
    now_ms: u64,
    own_votes: u32,
    total_votes: u64,
    peers: BTreeMap<NodeId, PeerState>,
    ping: Vec<Option<bool>>,
    tie_break_won: bool,
    isolated: bool,
    quorum: bool,
    counters: CoreCounters,
}

impl Membership {
    /// A core for `config`, started at `now_ms`. Peers are [`PeerStatus::Unknown`]
    /// for one link timeout; the core starts without quorum.
    pub fn new(config: MembershipConfig, now_ms: u64) -> Result<Self, ConfigError> {
        config.validate()?;
        let own_votes = config.node(config.this_node).map_or(0, |n| n.votes);
        let total_votes = config.nodes.iter().map(|n| u64::from(n.votes)).sum();
        let peers = config
            .nodes
            .iter()
            .filter(|n| n.id != config.this_node)
            .map(|n| {
                let links = (0..config.links.len())
                    .map(|_| LinkState { last_heard_ms: None, last_seq: None, status: LinkStatus::Unknown })
                    .collect();
                (
                    n.id,
                    PeerState {
                        votes: n.votes,
                        links,
                        disk: DiskStatus::Unknown,
                        incarnation: None,
                        status: PeerStatus::Unknown,
                        standby: false,
                    },
                )
            })
            .collect();
        let ping = vec![None; config.ping_targets.len()];
        Ok(Self {
            config,
            started_ms: now_ms,
            now_ms,
            own_votes,
            total_votes,
            peers,
            ping,
            tie_break_won: false,
            isolated: false,
            quorum: false,
            counters: CoreCounters::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    /// Whether this node has quorum now.
    pub fn has_quorum(&self) -> bool {
        self.quorum
    }

    /// Whether this node considers itself isolated.
    pub fn is_isolated(&self) -> bool {
        self.isolated
    }

    /// Heartbeats and inputs refused so far.
    pub fn counters(&self) -> CoreCounters {
        self.counters
    }

    /// Every peer's view, by node id.
    pub fn peers(&self) -> Vec<PeerView> {
        self.peers
            .iter()
            .map(|(id, p)| PeerView {
                node: *id,
                votes: p.votes,
                status: p.status,
                links: p.links.iter().map(|l| l.status).collect(),
                disk: p.disk,
                incarnation: p.incarnation,
                standby: p.standby,
            })
            .collect()
    }

    /// Whether the disk tie-break decides quorum right now: a lease disk is
    /// configured, this node is not isolated and exactly half of the votes are
    /// reachable. The agent should contend for the tie-break lease only then
    /// (and release it when this turns false without quorum, or when isolated).
    pub fn tie_break_relevant(&self) -> bool {
        self.config.lease_disk && !self.isolated && self.reachable_votes() * 2 == self.total_votes
    }

    /// The votes of this node plus those of the peers that are up.
    pub fn reachable_votes(&self) -> u64 {
        u64::from(self.own_votes)
            + self.peers.values().filter(|p| p.status == PeerStatus::Up).map(|p| u64::from(p.votes)).sum::<u64>()
    }

    /// The earliest time at which a [`Input::Tick`] can change something
    /// (a link timing out or the start-up grace ending), if any.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let timeout = self.config.link_timeout_ms;
        let grace = self.started_ms.saturating_add(timeout);
        let mut next: Option<u64> = None;
        for p in self.peers.values() {
            for l in &p.links {
                let due = match (l.status, l.last_heard_ms) {
                    (LinkStatus::Up, Some(t)) => Some(t.saturating_add(timeout)),
                    (LinkStatus::Unknown, _) => Some(grace),
                    _ => None,
                };
                if let Some(d) = due {
                    next = Some(next.map_or(d, |n| n.min(d)));
                }
            }
        }
        next
    }

    /// Feeds one input observed at `now_ms` (monotonic; a value smaller than
    /// an earlier one is treated as that earlier one) and returns the events
    /// it causes, in a deterministic order.
    pub fn handle(&mut self, now_ms: u64, input: Input) -> Vec<MembershipEvent> {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        let mut events = Vec::new();
        match input {
            Input::Heartbeat { link, from, incarnation, seq, standby } => {
                self.heartbeat(now, link, from, (incarnation, seq), standby, &mut events)
            }
            Input::DiskLiveness { node, alive } => match self.peers.get_mut(&node) {
                Some(p) => p.disk = if alive { DiskStatus::Alive } else { DiskStatus::Dead },
                // Our own slot is the lease layer's business, not membership's.
                None if node == self.config.this_node => {}
                None => self.counters.bad_input += 1,
            },
            Input::PingResult { target, reachable } => match self.ping.get_mut(target) {
                Some(slot) => *slot = Some(reachable),
                None => self.counters.bad_input += 1,
            },
            Input::TieBreak { won } => self.tie_break_won = won,
            Input::Tick => {}
        }
        self.evaluate(now, &mut events);
        events
    }

    fn heartbeat(
        &mut self,
        now: u64,
        link: usize,
        from: NodeId,
        (incarnation, seq): (u64, u64),
        standby: bool,
        events: &mut Vec<MembershipEvent>,
    ) {
        let Some(peer) = self.peers.get_mut(&from) else {
            self.counters.unknown_sender += 1;
            return;
        };
        if peer.incarnation.is_some_and(|cur| incarnation < cur) {
            self.counters.stale += 1;
            return;
        }
        let Some(state) = peer.links.get_mut(link) else {
            self.counters.unknown_sender += 1;
            return;
        };
        if state.last_seq.is_some_and(|last| (incarnation, seq) <= last) {
            self.counters.stale += 1;
            return;
        }
        state.last_seq = Some((incarnation, seq));
        state.last_heard_ms = Some(now);
        if state.status != LinkStatus::Up {
            state.status = LinkStatus::Up;
            events.push(MembershipEvent::LinkUp { node: from, link });
        }
        if peer.standby != standby {
            peer.standby = standby;
            events.push(MembershipEvent::PeerStandby { node: from, standby });
        }
        let restarted = peer.incarnation.is_some_and(|cur| incarnation > cur);
        peer.incarnation = Some(incarnation);
        if restarted {
            // A new incarnation on one link makes the old one's sequence
            // numbers on the other links meaningless.
            for (i, l) in peer.links.iter_mut().enumerate() {
                if i != link {
                    l.last_seq = None;
                }
            }
            if peer.status == PeerStatus::Up {
                events.push(MembershipEvent::NodeJoined { node: from, incarnation });
            }
        }
    }

    fn evaluate(&mut self, now: u64, events: &mut Vec<MembershipEvent>) {
        let timeout = self.config.link_timeout_ms;
        let grace_over = now >= self.started_ms.saturating_add(timeout);

        // 1. Links time out.
        for (id, p) in self.peers.iter_mut() {
            for (i, l) in p.links.iter_mut().enumerate() {
                let silent = match l.last_heard_ms {
                    Some(t) => now.saturating_sub(t) >= timeout,
                    None => grace_over,
                };
                if silent && l.status != LinkStatus::Down {
                    l.status = LinkStatus::Down;
                    events.push(MembershipEvent::LinkDown { node: *id, link: i });
                }
            }
        }

        // 2. Isolation: no peer up and no ping target reachable.
        let any_peer_up = self.peers.values().any(|p| p.links.iter().any(|l| l.status == LinkStatus::Up));
        let any_target = self.ping.contains(&Some(true));
        let isolated = grace_over && !self.ping.is_empty() && !any_peer_up && !any_target;
        if isolated != self.isolated {
            self.isolated = isolated;
            events.push(if isolated { MembershipEvent::SelfIsolated } else { MembershipEvent::SelfReconnected });
        }

        // 3. Peer verdicts.
        let lease_disk = self.config.lease_disk;
        for (id, p) in self.peers.iter_mut() {
            let any_up = p.links.iter().any(|l| l.status == LinkStatus::Up);
            let all_down = p.links.iter().all(|l| l.status == LinkStatus::Down);
            let next = if any_up {
                PeerStatus::Up
            } else if !all_down {
                PeerStatus::Unknown
            } else if isolated || (lease_disk && p.disk != DiskStatus::Dead) {
                PeerStatus::Partitioned
            } else {
                PeerStatus::Lost
            };
            if next != p.status {
                p.status = next;
                match next {
                    PeerStatus::Up => events.push(MembershipEvent::NodeJoined {
                        node: *id,
                        incarnation: p.incarnation.unwrap_or_default(),
                    }),
                    PeerStatus::Partitioned => events.push(MembershipEvent::NodePartitioned { node: *id }),
                    PeerStatus::Lost => events.push(MembershipEvent::NodeLost { node: *id }),
                    PeerStatus::Unknown => {}
                }
            }
        }

        // 4. Quorum.
        let quorum = !self.isolated && self.quorum_arithmetic();
        if quorum != self.quorum {
            self.quorum = quorum;
            events.push(if quorum { MembershipEvent::QuorumRegained } else { MembershipEvent::QuorumLost });
        }
    }

    fn quorum_arithmetic(&self) -> bool {
        let reachable = self.reachable_votes();
        let doubled = reachable * 2;
        if doubled > self.total_votes {
            true
        } else if doubled == self.total_votes && reachable > 0 {
            self.config.lease_disk && self.tie_break_won
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests;
