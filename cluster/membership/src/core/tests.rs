use super::*;
use MembershipEvent as E;
use proptest::prelude::*;

const INTERVAL: u64 = 100;
const TIMEOUT: u64 = 1000;

fn addr(node: u32, link: usize) -> SocketAddr {
    SocketAddr::from(([127, link as u8 + 1, 0, node as u8], 7000))
}

fn config(this: u32, votes: &[u32], links: usize, disk: bool, ping: usize) -> MembershipConfig {
    MembershipConfig {
        this_node: NodeId(this),
        nodes: votes
            .iter()
            .enumerate()
            .map(|(i, v)| NodeConfig {
                id: NodeId(i as u32 + 1),
                votes: *v,
                addresses: (0..links).map(|l| addr(i as u32 + 1, l)).collect(),
            })
            .collect(),
        links: (0..links).map(|l| format!("link{l}")).collect(),
        heartbeat_interval_ms: INTERVAL,
        link_timeout_ms: TIMEOUT,
        lease_disk: disk,
        ping_targets: (0..ping).map(|i| SocketAddr::from(([10, 0, 0, i as u8 + 1], 53))).collect(),
    }
}

/// A driver that keeps per-(node, link) sequence numbers.
struct Sim {
    m: Membership,
    seq: u64,
}

impl Sim {
    fn new(c: MembershipConfig) -> Self {
        Self { m: Membership::new(c, 0).unwrap(), seq: 0 }
    }
    fn hb(&mut self, now: u64, node: u32, link: usize) -> Vec<MembershipEvent> {
        self.seq += 1;
        self.m.handle(now, Input::Heartbeat { link, from: NodeId(node), incarnation: 1, seq: self.seq, standby: false })
    }
    /// Heartbeats from `nodes` on `links` every interval in [from, to), collecting events.
    fn run(&mut self, from: u64, to: u64, nodes: &[u32], links: &[usize]) -> Vec<MembershipEvent> {
        let mut out = Vec::new();
        let mut t = from;
        while t < to {
            for n in nodes {
                for l in links {
                    out.extend(self.hb(t, *n, *l));
                }
            }
            out.extend(self.m.handle(t, Input::Tick));
            t += INTERVAL;
        }
        out
    }
    fn status(&self, node: u32) -> PeerStatus {
        self.m.peers().into_iter().find(|p| p.node == NodeId(node)).unwrap().status
    }
}

fn lost(events: &[MembershipEvent]) -> Vec<u32> {
    events.iter().filter_map(|e| if let E::NodeLost { node } = e { Some(node.0) } else { None }).collect()
}

#[test]
fn config_validation_names_the_problem() {
    let mut c = config(1, &[1, 1], 2, false, 0);
    c.link_timeout_ms = 250;
    assert!(matches!(c.validate(), Err(ConfigError::TimeoutTooShort { timeout_ms: 250, interval_ms: 100 })));
    let mut c = config(1, &[1, 1], 2, false, 0);
    c.nodes[1].addresses.pop();
    let e = c.validate().unwrap_err();
    assert!(e.to_string().contains("node 2 has 1 heartbeat addresses but 2 links"), "{e}");
    let c = config(9, &[1, 1], 2, false, 0);
    assert_eq!(c.validate(), Err(ConfigError::ThisNodeMissing(NodeId(9))));
    let mut c = config(1, &[1, 1], 2, false, 0);
    c.nodes[1].addresses[0] = c.nodes[0].addresses[0];
    assert!(matches!(c.validate(), Err(ConfigError::DuplicateAddress(_))));
    assert_eq!(config(1, &[0, 0], 1, false, 0).validate(), Err(ConfigError::NoVotes));
    assert_eq!(config(1, &[1], 0, false, 0).validate(), Err(ConfigError::NoLinks));
    let c = config(1, &[1, 1], 2, true, 0);
    assert_eq!(c.validate_against_lease(TIMEOUT + 1), Ok(()));
    let e = c.validate_against_lease(TIMEOUT).unwrap_err();
    assert!(e.to_string().contains("shorter than the lease host-dead time (1000 ms)"), "{e}");
}

#[test]
fn one_silent_link_is_only_link_down() {
    let mut s = Sim::new(config(1, &[1, 1, 1], 2, false, 0));
    let ev = s.run(0, 500, &[2, 3], &[0, 1]);
    assert!(ev.contains(&E::NodeJoined { node: NodeId(2), incarnation: 1 }));
    assert!(ev.contains(&E::QuorumRegained));
    // Node 2 keeps link 0 only, node 3 link 1 only.
    let mut ev = Vec::new();
    let mut t = 500;
    while t < 5000 {
        ev.extend(s.hb(t, 2, 0));
        ev.extend(s.hb(t, 3, 1));
        ev.extend(s.m.handle(t, Input::Tick));
        t += INTERVAL;
    }
    assert_eq!(
        ev,
        vec![E::LinkDown { node: NodeId(2), link: 1 }, E::LinkDown { node: NodeId(3), link: 0 }],
        "only the silent links go down"
    );
    assert!(lost(&ev).is_empty(), "{ev:?}");
    assert!(!ev.iter().any(|e| matches!(e, E::NodePartitioned { .. } | E::QuorumLost)), "{ev:?}");
    assert_eq!(s.status(2), PeerStatus::Up);
}

#[test]
fn link_down_then_up_again() {
    let mut s = Sim::new(config(1, &[1, 1], 2, false, 0));
    s.run(0, 500, &[2], &[0, 1]);
    let ev = s.run(500, 2000, &[2], &[0]);
    assert_eq!(ev.iter().filter(|e| matches!(e, E::LinkDown { .. })).count(), 1, "{ev:?}");
    let ev = s.run(2000, 2100, &[2], &[0, 1]);
    assert_eq!(ev, vec![E::LinkUp { node: NodeId(2), link: 1 }]);
}

#[test]
fn all_links_silent_without_disk_is_lost_after_the_timeout() {
    let mut s = Sim::new(config(1, &[1, 1, 1], 2, false, 0));
    s.run(0, 500, &[2, 3], &[0, 1]);
    // Last heartbeat from node 3 at t=400.
    let ev = s.run(500, 1399, &[2], &[0, 1]);
    assert!(lost(&ev).is_empty(), "lost before the timeout: {ev:?}");
    let ev = s.m.handle(1400, Input::Tick);
    assert_eq!(
        ev,
        vec![
            E::LinkDown { node: NodeId(3), link: 0 },
            E::LinkDown { node: NodeId(3), link: 1 },
            E::NodeLost { node: NodeId(3) }
        ]
    );
    assert!(s.m.has_quorum(), "2 of 3 votes remain");
}

#[test]
fn all_links_silent_and_disk_dead_is_lost() {
    let mut s = Sim::new(config(1, &[1, 1, 1], 2, true, 0));
    s.run(0, 500, &[2, 3], &[0, 1]);
    s.m.handle(500, Input::DiskLiveness { node: NodeId(3), alive: true });
    let ev = s.run(500, 3000, &[2], &[0, 1]);
    assert!(ev.contains(&E::NodePartitioned { node: NodeId(3) }), "{ev:?}");
    assert!(lost(&ev).is_empty());
    assert_eq!(s.status(3), PeerStatus::Partitioned);
    let ev = s.m.handle(3000, Input::DiskLiveness { node: NodeId(3), alive: false });
    assert_eq!(ev, vec![E::NodeLost { node: NodeId(3) }]);
}

#[test]
fn all_links_silent_and_disk_alive_or_unknown_is_not_lost() {
    let mut s = Sim::new(config(1, &[1, 1, 1], 2, true, 0));
    // Node 3 never heard and the disk never reported: unknown is not dead.
    let ev = s.run(0, 10_000, &[2], &[0, 1]);
    assert!(lost(&ev).is_empty(), "{ev:?}");
    assert!(ev.contains(&E::NodePartitioned { node: NodeId(3) }));
    let ev = s.m.handle(10_000, Input::DiskLiveness { node: NodeId(3), alive: true });
    assert!(ev.is_empty());
    // Back on the network: joins.
    let ev = s.hb(10_100, 3, 1);
    assert!(ev.contains(&E::NodeJoined { node: NodeId(3), incarnation: 1 }), "{ev:?}");
    // A dead disk verdict while the network is fresh does not make it lost.
    let ev = s.m.handle(10_200, Input::DiskLiveness { node: NodeId(3), alive: false });
    assert!(ev.is_empty(), "{ev:?}");
}

#[test]
fn lost_node_that_renews_again_on_disk_is_partitioned() {
    let mut s = Sim::new(config(1, &[1, 1, 1], 1, true, 0));
    s.run(0, 500, &[2, 3], &[0]);
    s.m.handle(500, Input::DiskLiveness { node: NodeId(3), alive: false });
    let ev = s.run(500, 2000, &[2], &[0]);
    assert_eq!(lost(&ev), vec![3]);
    let ev = s.m.handle(2000, Input::DiskLiveness { node: NodeId(3), alive: true });
    assert_eq!(ev, vec![E::NodePartitioned { node: NodeId(3) }]);
}

#[test]
fn replays_and_old_incarnations_are_ignored() {
    let mut m = Membership::new(config(1, &[1, 1], 2, false, 0), 0).unwrap();
    let hb = |link, inc, seq| Input::Heartbeat { link, from: NodeId(2), incarnation: inc, seq, standby: false };
    assert!(!m.handle(0, hb(0, 5, 10)).is_empty());
    assert!(m.handle(10, hb(0, 5, 10)).is_empty());
    assert!(m.handle(20, hb(0, 5, 9)).is_empty());
    assert!(m.handle(30, hb(0, 4, 100)).is_empty());
    assert_eq!(m.counters().stale, 3);
    // A replayed packet must not keep the link alive.
    let ev = m.handle(1000, hb(0, 5, 10));
    assert!(ev.contains(&E::LinkDown { node: NodeId(2), link: 0 }), "{ev:?}");
    assert!(lost(&ev).contains(&2), "{ev:?}");
    // The same sequence on another link is fine (links are tracked separately).
    let ev = m.handle(1010, hb(1, 5, 11));
    assert!(ev.contains(&E::NodeJoined { node: NodeId(2), incarnation: 5 }));
    // A restart: new incarnation, sequence from 0, announced as a new join.
    let ev = m.handle(1020, hb(1, 6, 0));
    assert_eq!(ev, vec![E::NodeJoined { node: NodeId(2), incarnation: 6 }]);
    // Unknown senders, own id and bad links are counted.
    m.handle(1030, Input::Heartbeat { link: 0, from: NodeId(7), incarnation: 1, seq: 1, standby: false });
    m.handle(1030, Input::Heartbeat { link: 0, from: NodeId(1), incarnation: 1, seq: 1, standby: false });
    m.handle(1030, hb(9, 6, 1));
    assert_eq!(m.counters().unknown_sender, 3);
}

#[test]
fn peer_standby_is_reported_on_change_before_the_join_and_kept_while_silent() {
    let mut m = Membership::new(config(1, &[1, 1, 1], 2, false, 0), 0).unwrap();
    let hb = |link, inc, seq, standby| Input::Heartbeat { link, from: NodeId(2), incarnation: inc, seq, standby };
    // The first heartbeat says standby: reported before the join it causes.
    let ev = m.handle(0, hb(0, 5, 1, true));
    let standby_at = ev.iter().position(|e| *e == E::PeerStandby { node: NodeId(2), standby: true });
    let joined_at = ev.iter().position(|e| matches!(e, E::NodeJoined { node: NodeId(2), .. }));
    assert!(standby_at.is_some() && standby_at < joined_at, "{ev:?}");
    assert!(m.peers().iter().any(|p| p.node == NodeId(2) && p.standby));
    // Unchanged: nothing more; the other link says the same.
    assert!(!m.handle(10, hb(0, 5, 2, true)).iter().any(|e| matches!(e, E::PeerStandby { .. })));
    assert!(!m.handle(10, hb(1, 5, 3, true)).iter().any(|e| matches!(e, E::PeerStandby { .. })));
    // A replayed old packet cannot change it.
    assert!(m.handle(20, hb(0, 5, 1, false)).is_empty());
    assert!(m.peers().iter().any(|p| p.node == NodeId(2) && p.standby));
    // Leaves standby.
    assert_eq!(m.handle(30, hb(0, 5, 4, false)), vec![E::PeerStandby { node: NodeId(2), standby: false }]);
    // Silent and lost: the flag is kept; a restart with a new incarnation reports its own
    // flag with its first heartbeat.
    m.handle(30, hb(1, 5, 5, true));
    let ev = m.handle(5_000, Input::Tick);
    assert!(lost(&ev).contains(&2), "{ev:?}");
    assert!(m.peers().iter().any(|p| p.node == NodeId(2) && p.standby));
    let ev = m.handle(5_010, hb(0, 6, 0, false));
    let standby_at = ev.iter().position(|e| *e == E::PeerStandby { node: NodeId(2), standby: false });
    let joined_at = ev.iter().position(|e| *e == E::NodeJoined { node: NodeId(2), incarnation: 6 });
    assert!(standby_at.is_some() && standby_at < joined_at, "{ev:?}");
}

/// Quorum with `votes` (node 1 is this node) when the peers in `up` are reachable.
fn quorum_with(votes: &[u32], up: &[u32], disk: bool, won: bool) -> bool {
    let mut s = Sim::new(config(1, votes, 1, disk, 0));
    s.m.handle(0, Input::TieBreak { won });
    s.run(0, 3000, up, &[0]);
    s.m.has_quorum()
}

#[test]
fn quorum_arithmetic() {
    // Two nodes: alone is exactly half; without a disk there is no quorum.
    assert!(quorum_with(&[1, 1], &[2], false, false));
    assert!(!quorum_with(&[1, 1], &[], false, true));
    // Three nodes.
    assert!(quorum_with(&[1, 1, 1], &[2], false, false));
    assert!(!quorum_with(&[1, 1, 1], &[], true, true), "1 of 3 is a minority even with the tie-break");
    assert!(quorum_with(&[1, 1, 1], &[2, 3], false, false));
    // Five nodes.
    assert!(quorum_with(&[1, 1, 1, 1, 1], &[2, 3], false, false));
    assert!(!quorum_with(&[1, 1, 1, 1, 1], &[2], true, true));
    // Votes: node 1 with 3 of 5 votes is a majority alone.
    assert!(quorum_with(&[3, 1, 1], &[], false, false));
    assert!(!quorum_with(&[1, 1, 3], &[2], false, false));
    // Four votes split 2/2: the tie-break decides.
    assert!(quorum_with(&[1, 1, 1, 1], &[2], true, true));
    assert!(!quorum_with(&[1, 1, 1, 1], &[2], true, false));
    assert!(!quorum_with(&[1, 1, 1, 1], &[2], false, true), "no disk, no tie-break");
    // A node without votes only counts what others give.
    assert!(!quorum_with(&[0, 1, 1], &[], true, true));
    assert!(quorum_with(&[0, 1, 1], &[2, 3], false, false));
}

#[test]
fn two_node_tie_break_decides_and_can_be_lost() {
    let mut s = Sim::new(config(1, &[1, 1], 2, true, 0));
    let ev = s.run(0, 500, &[2], &[0, 1]);
    assert!(ev.contains(&E::QuorumRegained));
    // Peer silent on both links: exactly half; not holding the tie-break.
    let ev = s.run(500, 2000, &[], &[]);
    assert!(ev.contains(&E::QuorumLost), "{ev:?}");
    assert!(ev.contains(&E::NodePartitioned { node: NodeId(2) }));
    assert!(s.m.tie_break_relevant());
    let ev = s.m.handle(2000, Input::TieBreak { won: true });
    assert_eq!(ev, vec![E::QuorumRegained]);
    let ev = s.m.handle(2100, Input::TieBreak { won: false });
    assert_eq!(ev, vec![E::QuorumLost]);
    // With the peer back, the tie-break no longer matters.
    let ev = s.hb(2200, 2, 0);
    assert!(ev.contains(&E::QuorumRegained), "{ev:?}");
    assert!(!s.m.tie_break_relevant());
}

#[test]
fn isolated_node_does_not_declare_peers_lost() {
    let mut s = Sim::new(config(1, &[1, 1, 1], 2, false, 2));
    s.m.handle(0, Input::PingResult { target: 0, reachable: true });
    s.run(0, 500, &[2, 3], &[0, 1]);
    assert!(s.m.has_quorum());
    // This node's cables are cut: no peer, no ping target.
    s.m.handle(600, Input::PingResult { target: 0, reachable: false });
    s.m.handle(600, Input::PingResult { target: 1, reachable: false });
    let ev = s.run(600, 3000, &[], &[]);
    assert!(ev.contains(&E::SelfIsolated), "{ev:?}");
    assert!(ev.contains(&E::QuorumLost), "{ev:?}");
    assert!(lost(&ev).is_empty(), "{ev:?}");
    assert_eq!(s.status(2), PeerStatus::Partitioned);
    assert!(s.m.is_isolated());
    // The router answers again while the peers stay silent: they really are gone.
    let ev = s.m.handle(3000, Input::PingResult { target: 1, reachable: true });
    assert_eq!(ev[0], E::SelfReconnected);
    assert_eq!(lost(&ev), vec![2, 3]);
    assert!(!s.m.has_quorum(), "1 of 3 votes");
}

#[test]
fn peers_dead_but_ping_target_reachable_is_not_isolation() {
    let mut s = Sim::new(config(1, &[1, 1], 1, false, 1));
    s.m.handle(0, Input::PingResult { target: 0, reachable: true });
    s.run(0, 500, &[2], &[0]);
    let ev = s.run(500, 3000, &[], &[]);
    assert!(!ev.contains(&E::SelfIsolated));
    assert_eq!(lost(&ev), vec![2]);
    // No ping result at all counts as isolated (not proven otherwise).
    let mut s = Sim::new(config(1, &[1, 1], 1, false, 1));
    let ev = s.run(0, 3000, &[], &[]);
    assert!(ev.contains(&E::SelfIsolated) && lost(&ev).is_empty(), "{ev:?}");
    assert_eq!(s.m.handle(3000, Input::PingResult { target: 5, reachable: true }), vec![]);
    assert_eq!(s.m.counters().bad_input, 1);
}

#[test]
fn startup_grace_and_deadlines() {
    let mut s = Sim::new(config(1, &[1, 1], 2, false, 0));
    assert_eq!(s.m.next_deadline_ms(), Some(TIMEOUT));
    assert!(s.m.handle(999, Input::Tick).is_empty(), "nothing before the grace ends");
    let ev = s.m.handle(1000, Input::Tick);
    assert_eq!(lost(&ev), vec![2]);
    assert_eq!(s.m.next_deadline_ms(), None);
    s.hb(1500, 2, 0);
    assert_eq!(s.m.next_deadline_ms(), Some(2500));
    // Time going backwards is clamped.
    assert!(s.m.handle(10, Input::Tick).is_empty());
}

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    Hb { node: u32, link: usize, inc: u64, seq: u64 },
    Disk { node: u32, alive: bool },
    Ping { target: usize, reachable: bool },
    Tie(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..1500).prop_map(Op::Advance),
        (0u32..6, 0usize..3, 0u64..3, 0u64..20).prop_map(|(node, link, inc, seq)| Op::Hb { node, link, inc, seq }),
        (0u32..6, any::<bool>()).prop_map(|(node, alive)| Op::Disk { node, alive }),
        (0usize..3, any::<bool>()).prop_map(|(target, reachable)| Op::Ping { target, reachable }),
        any::<bool>().prop_map(Op::Tie),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random inputs never panic; NodeLost only for a node whose every link
    /// has been silent for the timeout (by an independent model) and which
    /// the disk says is dead when a disk is configured; quorum only with a
    /// majority or a won tie.
    #[test]
    fn node_lost_only_when_every_link_is_stale_and_disk_dead(
        nodes in 2usize..5,
        links in 1usize..3,
        disk in any::<bool>(),
        pings in 0usize..2,
        ops in proptest::collection::vec(op(), 0..200),
    ) {
        let votes = vec![1; nodes];
        let mut m = Membership::new(config(1, &votes, links, disk, pings), 0).unwrap();
        let mut now = 0u64;
        // Model: per (node, link) the last accepted (inc, seq) and time; per node the max incarnation.
        let mut last_seq: BTreeMap<(u32, usize), (u64, u64)> = BTreeMap::new();
        let mut last_time: BTreeMap<(u32, usize), u64> = BTreeMap::new();
        let mut inc_of: BTreeMap<u32, u64> = BTreeMap::new();
        let mut disk_of: BTreeMap<u32, bool> = BTreeMap::new();
        let mut tie = false;
        for op in ops {
            let input = match op {
                Op::Advance(d) => { now += d; Input::Tick }
                Op::Hb { node, link, inc, seq } => {
                    let known = node >= 2 && node <= nodes as u32 && link < links;
                    let fresh_inc = inc_of.get(&node).is_none_or(|c| inc >= *c);
                    let newer = last_seq.get(&(node, link)).is_none_or(|s| (inc, seq) > *s);
                    if known && fresh_inc && newer {
                        if inc_of.get(&node).is_some_and(|c| inc > *c) {
                            last_seq.retain(|(n, _), _| *n != node);
                        }
                        last_seq.insert((node, link), (inc, seq));
                        last_time.insert((node, link), now);
                        inc_of.insert(node, inc);
                    }
                    Input::Heartbeat { link, from: NodeId(node), incarnation: inc, seq, standby: false }
                }
                Op::Disk { node, alive } => { disk_of.insert(node, alive); Input::DiskLiveness { node: NodeId(node), alive } }
                Op::Ping { target, reachable } => Input::PingResult { target, reachable },
                Op::Tie(won) => { tie = won; Input::TieBreak { won } }
            };
            let events = m.handle(now, input);
            for e in &events {
                if let MembershipEvent::NodeLost { node } = e {
                    for l in 0..links {
                        if let Some(t) = last_time.get(&(node.0, l)) {
                            prop_assert!(now - t >= TIMEOUT, "{node} lost with link {l} fresh ({t} vs {now})");
                        }
                    }
                    prop_assert!(now >= TIMEOUT, "lost during the start-up grace");
                    if disk {
                        prop_assert_eq!(disk_of.get(&node.0), Some(&false), "{} lost while the disk says alive/unknown", node);
                    }
                    prop_assert!(!m.is_isolated());
                }
            }
            let up: u64 = 1 + m.peers().iter().filter(|p| p.status == PeerStatus::Up).count() as u64;
            let total = nodes as u64;
            if m.has_quorum() {
                prop_assert!(2 * up > total || (2 * up == total && disk && tie));
                prop_assert!(!m.is_isolated());
            }
            // The view agrees: no Lost peer has a fresh link.
            for p in m.peers() {
                if p.status == PeerStatus::Lost {
                    prop_assert!(p.links.iter().all(|l| *l == LinkStatus::Down));
                }
            }
        }
    }
}
