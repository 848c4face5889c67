//! The runtime over real UDP sockets on loopback: every node has two links,
//! 127.<test>.1.<node> and 127.<test>.2.<node>, so each test has addresses of
//! its own and tests run in parallel.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use tandem_membership::runtime::{MembershipHandle, RuntimeConfig};
use tandem_membership::wire::{Codec, Heartbeat};
use tandem_membership::{MembershipConfig, MembershipEvent as E, NodeConfig, NodeId, PeerStatus};
use tandem_monitors::Secret;

const KEY: &str = "test cluster key, 32 bytes long!";
const INTERVAL_MS: u64 = 50;
const TIMEOUT_MS: u64 = 600;
/// Generous bound for anything that should happen within a timeout or two.
const WAIT: Duration = Duration::from_secs(15);

/// Addresses for `nodes` nodes on two links with ports that were free.
fn addresses(test: u8, nodes: u32) -> Vec<Vec<SocketAddr>> {
    (1..=nodes)
        .map(|n| {
            (1..=2u8)
                .map(|l| {
                    let ip = IpAddr::V4(Ipv4Addr::new(127, test, l, n as u8));
                    let s = UdpSocket::bind((ip, 0)).expect("bind loopback");
                    s.local_addr().unwrap()
                })
                .collect()
        })
        .collect()
}

fn config(this: u32, addrs: &[Vec<SocketAddr>], disk: bool, ping: Vec<SocketAddr>) -> RuntimeConfig {
    RuntimeConfig {
        membership: MembershipConfig {
            this_node: NodeId(this),
            nodes: addrs
                .iter()
                .enumerate()
                .map(|(i, a)| NodeConfig { id: NodeId(i as u32 + 1), votes: 1, addresses: a.clone() })
                .collect(),
            links: vec!["public".into(), "interconnect".into()],
            heartbeat_interval_ms: INTERVAL_MS,
            link_timeout_ms: TIMEOUT_MS,
            lease_disk: disk,
            ping_targets: ping,
        },
        cluster_name: "udp-test".into(),
        key: Secret::new(KEY),
        incarnation: None,
        ping_interval: Duration::from_millis(100),
        ping_timeout: Duration::from_millis(300),
    }
}

async fn start(c: RuntimeConfig) -> MembershipHandle {
    MembershipHandle::start(c).await.expect("start membership")
}

/// Collects events until one satisfies `pred`; panics with what was seen after `WAIT`.
async fn wait_for(h: &mut MembershipHandle, what: &str, pred: impl Fn(&E) -> bool) -> Vec<E> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, h.next_event()).await {
            Ok(Some(e)) => {
                let done = pred(&e);
                seen.push(e);
                if done {
                    return seen;
                }
            }
            Ok(None) => panic!("membership stopped while waiting for {what}; saw {seen:?}"),
            Err(_) => panic!("no {what} within {WAIT:?}; saw {seen:?}"),
        }
    }
}

/// Every event arriving within `d`.
async fn events_during(h: &mut MembershipHandle, d: Duration) -> Vec<E> {
    let mut seen = Vec::new();
    let end = tokio::time::Instant::now() + d;
    while let Ok(Some(e)) = tokio::time::timeout_at(end, h.next_event()).await {
        seen.push(e);
    }
    seen
}

async fn all_joined(h: &mut MembershipHandle, peers: &[u32]) {
    for p in peers {
        let node = NodeId(*p);
        if h.view().peers.iter().any(|v| v.node == node && v.status == PeerStatus::Up) {
            continue;
        }
        wait_for(h, &format!("join of {node}"), |e| matches!(e, E::NodeJoined { node: n, .. } if *n == node)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_node_is_lost_after_the_timeout_on_both_survivors() {
    let addrs = addresses(61, 3);
    let mut a = start(config(1, &addrs, false, vec![])).await;
    let mut b = start(config(2, &addrs, false, vec![])).await;
    let mut c = start(config(3, &addrs, false, vec![])).await;
    all_joined(&mut a, &[2, 3]).await;
    all_joined(&mut b, &[1, 3]).await;
    all_joined(&mut c, &[1, 2]).await;
    assert!(a.view().quorum && b.view().quorum);

    c.shutdown();
    let stopped = Instant::now();
    let seen = wait_for(&mut a, "loss of node 3", |e| *e == E::NodeLost { node: NodeId(3) }).await;
    let took = stopped.elapsed();
    // It may not be declared before the timeout (minus the one interval since its last heartbeat).
    assert!(took >= Duration::from_millis(TIMEOUT_MS - INTERVAL_MS), "lost after only {took:?}");
    assert!(seen.contains(&E::LinkDown { node: NodeId(3), link: 0 }), "{seen:?}");
    assert!(seen.contains(&E::LinkDown { node: NodeId(3), link: 1 }), "{seen:?}");
    assert!(!seen.iter().any(|e| matches!(e, E::NodeLost { node } if *node != NodeId(3))), "{seen:?}");
    wait_for(&mut b, "loss of node 3 on node 2", |e| *e == E::NodeLost { node: NodeId(3) }).await;
    assert!(a.view().quorum, "2 of 3 votes keep quorum");
    let st = a.stats();
    assert!(st.accepted > 0 && st.bad_mac == 0 && st.malformed == 0, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_one_link_is_only_link_down() {
    let addrs = addresses(62, 3);
    let mut a = start(config(1, &addrs, false, vec![])).await;
    let mut b = start(config(2, &addrs, false, vec![])).await;
    let mut c = start(config(3, &addrs, false, vec![])).await;
    all_joined(&mut a, &[2, 3]).await;
    all_joined(&mut b, &[1, 3]).await;
    all_joined(&mut c, &[1, 2]).await;

    b.close_link(1);
    let mut seen = wait_for(&mut a, "link 1 to node 2 down", |e| *e == E::LinkDown { node: NodeId(2), link: 1 }).await;
    seen.extend(events_during(&mut a, Duration::from_millis(3 * TIMEOUT_MS)).await);
    let bad: Vec<_> = seen
        .iter()
        .filter(|e| {
            matches!(e, E::NodeLost { .. } | E::NodePartitioned { .. } | E::QuorumLost | E::SelfIsolated)
                || matches!(e, E::LinkDown { node, link } if (*node, *link) != (NodeId(2), 1))
        })
        .collect();
    assert!(bad.is_empty(), "one closed link caused {bad:?}");
    let v = a.view();
    let peer2 = v.peers.iter().find(|p| p.node == NodeId(2)).unwrap();
    assert_eq!(peer2.status, PeerStatus::Up);
    assert!(v.quorum);
    // Node 2 stops hearing on its closed link, but keeps everybody through link 0.
    let v = b.view();
    assert!(v.peers.iter().all(|p| p.status == PeerStatus::Up), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_alive_on_disk_is_partitioned_not_lost() {
    let addrs = addresses(63, 3);
    let mut a = start(config(1, &addrs, true, vec![])).await;
    let _b = start(config(2, &addrs, true, vec![])).await;
    let mut c = start(config(3, &addrs, true, vec![])).await;
    all_joined(&mut a, &[2, 3]).await;
    a.disk_liveness(NodeId(3), true);
    c.shutdown();
    let seen = wait_for(&mut a, "partition of node 3", |e| *e == E::NodePartitioned { node: NodeId(3) }).await;
    assert!(!seen.iter().any(|e| matches!(e, E::NodeLost { .. })), "{seen:?}");
    let seen = events_during(&mut a, Duration::from_millis(2 * TIMEOUT_MS)).await;
    assert!(!seen.iter().any(|e| matches!(e, E::NodeLost { .. })), "lost while alive on disk: {seen:?}");
    a.disk_liveness(NodeId(3), false);
    wait_for(&mut a, "loss of node 3 once dead on disk", |e| *e == E::NodeLost { node: NodeId(3) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_foreign_garbage_and_replayed_packets_are_dropped_and_counted() {
    let addrs = addresses(64, 2);
    let mut a = start(config(1, &addrs, false, vec![])).await;
    let target = a.local_addrs()[0];
    // Node 2 is configured but not running: we speak from its address on link 0.
    let spoof = UdpSocket::bind(addrs[1][0]).unwrap();
    let hb = |seq| Heartbeat { link: 0, from: NodeId(2), to: NodeId(1), incarnation: 1, seq, standby: false };
    let forged = Codec::new("udp-test", &Secret::new("the wrong key, also 32 bytes....")).unwrap();
    let foreign = Codec::new("other-cluster", &Secret::new(KEY)).unwrap();
    for seq in 0..5 {
        spoof.send_to(&forged.encode(&hb(seq)), target).unwrap();
        spoof.send_to(&foreign.encode(&hb(seq)), target).unwrap();
    }
    spoof.send_to(b"garbage", target).unwrap();
    spoof.send_to(&[0xffu8; 1400], target).unwrap();
    spoof.send_to(&[], target).unwrap();
    // A genuine packet from a wrong source address.
    let genuine = Codec::new("udp-test", &Secret::new(KEY)).unwrap();
    let other = UdpSocket::bind((addrs[1][0].ip(), 0)).unwrap();
    other.send_to(&genuine.encode(&hb(100)), target).unwrap();
    // A genuine packet addressed to another node.
    spoof.send_to(&genuine.encode(&Heartbeat { to: NodeId(5), ..hb(101) }), target).unwrap();

    let deadline = Instant::now() + WAIT;
    let st = loop {
        let st = a.stats();
        if st.received >= 15 || Instant::now() > deadline {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (st.bad_mac, st.foreign_cluster, st.malformed, st.oversize, st.wrong_source, st.misdirected, st.accepted),
        (5, 5, 2, 1, 1, 1, 0),
        "{st:?}"
    );
    let seen = events_during(&mut a, Duration::from_millis(300)).await;
    assert!(!seen.iter().any(|e| matches!(e, E::NodeJoined { .. } | E::LinkUp { .. })), "{seen:?}");

    // Now a genuine heartbeat, then its replay: the first counts, the replay does not.
    let p = genuine.encode(&hb(200));
    spoof.send_to(&p, target).unwrap();
    wait_for(&mut a, "join of node 2", |e| matches!(e, E::NodeJoined { node, .. } if *node == NodeId(2))).await;
    spoof.send_to(&p, target).unwrap();
    let deadline = Instant::now() + WAIT;
    while a.view().core.stale == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.view().core.stale, 1, "the replay was not refused as stale");
    // Replays do not keep a silent node alive.
    let replay = async {
        loop {
            let _ = spoof.send_to(&p, target);
            tokio::time::sleep(Duration::from_millis(INTERVAL_MS)).await;
        }
    };
    tokio::select! {
        _ = replay => unreachable!(),
        seen = wait_for(&mut a, "loss of node 2 despite replays", |e| *e == E::NodeLost { node: NodeId(2) }) => {
            assert!(seen.contains(&E::LinkDown { node: NodeId(2), link: 0 }), "{seen:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_targets_tell_isolation_from_a_dead_peer() {
    // Node 2 never runs. A ping target that never answers (a documentation
    // prefix: no route, or a connect that times out): this node is the isolated one.
    let addrs = addresses(65, 2);
    let black_hole: SocketAddr = "[2001:db8::1]:9".parse().unwrap();
    let mut a = start(config(1, &addrs, false, vec![black_hole])).await;
    let seen = wait_for(&mut a, "self isolation", |e| *e == E::SelfIsolated).await;
    let seen2 = events_during(&mut a, Duration::from_millis(2 * TIMEOUT_MS)).await;
    assert!(!seen.iter().chain(&seen2).any(|e| matches!(e, E::NodeLost { .. })), "{seen:?} {seen2:?}");
    assert!(!a.view().quorum);
    drop(a);

    // A ping target that answers (a real listener): the peer is the dead one.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = addresses(66, 2);
    let mut a = start(config(1, &addrs, false, vec![listener.local_addr().unwrap()])).await;
    let seen = wait_for(&mut a, "loss of node 2", |e| *e == E::NodeLost { node: NodeId(2) }).await;
    assert!(!seen.contains(&E::SelfIsolated), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_rejoins_with_a_new_incarnation() {
    let addrs = addresses(67, 2);
    let mut a = start(config(1, &addrs, false, vec![])).await;
    let mut c = config(2, &addrs, false, vec![]);
    c.incarnation = Some(10);
    let b = start(c.clone()).await;
    wait_for(&mut a, "join of node 2", |e| *e == E::NodeJoined { node: NodeId(2), incarnation: 10 }).await;
    b.stop().await;
    c.incarnation = Some(11);
    let _b = start(c).await;
    wait_for(&mut a, "rejoin of node 2", |e| *e == E::NodeJoined { node: NodeId(2), incarnation: 11 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_s_standby_flag_travels_in_its_heartbeats() {
    let addrs = addresses(68, 2);
    let mut a = start(config(1, &addrs, false, vec![])).await;
    let b = start(config(2, &addrs, false, vec![])).await;
    wait_for(&mut a, "join of node 2", |e| matches!(e, E::NodeJoined { node: NodeId(2), .. })).await;
    assert!(!a.view().peers[0].standby);
    b.set_standby(true);
    wait_for(&mut a, "node 2 in standby", |e| *e == E::PeerStandby { node: NodeId(2), standby: true }).await;
    assert!(a.view().peers[0].standby);
    b.controller().set_standby(false);
    wait_for(&mut a, "node 2 online", |e| *e == E::PeerStandby { node: NodeId(2), standby: false }).await;
}
