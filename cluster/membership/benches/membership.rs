//! Membership figures: core input throughput, packet encode+verify cost, and
//! the real detection delay of a stopped node over UDP on loopback compared
//! with the configured link timeout (the baseline the delay is bounded by).
//!
//! Run with `cargo bench -p tandem-membership --bench membership`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use tandem_membership::runtime::{MembershipHandle, RuntimeConfig};
use tandem_membership::wire::{Codec, Heartbeat};
use tandem_membership::{Input, Membership, MembershipConfig, MembershipEvent, NodeConfig, NodeId};
use tandem_monitors::Secret;

const KEY: &str = "bench cluster key, 32 bytes long";

fn membership(this: u32, addrs: &[Vec<SocketAddr>], interval: u64, timeout: u64) -> MembershipConfig {
    MembershipConfig {
        this_node: NodeId(this),
        nodes: addrs
            .iter()
            .enumerate()
            .map(|(i, a)| NodeConfig { id: NodeId(i as u32 + 1), votes: 1, addresses: a.clone() })
            .collect(),
        links: vec!["public".into(), "interconnect".into()],
        heartbeat_interval_ms: interval,
        link_timeout_ms: timeout,
        lease_disk: false,
        ping_targets: vec![],
    }
}

fn loopback_addrs(nodes: u32) -> Vec<Vec<SocketAddr>> {
    (1..=nodes)
        .map(|n| {
            (1..=2u8)
                .map(|l| {
                    let s = UdpSocket::bind((IpAddr::V4(Ipv4Addr::new(127, 99, l, n as u8)), 0)).unwrap();
                    s.local_addr().unwrap()
                })
                .collect()
        })
        .collect()
}

fn core_throughput() {
    let addrs = loopback_addrs(16);
    let mut m = Membership::new(membership(1, &addrs, 100, 1000), 0).unwrap();
    let n = 2_000_000u64;
    let start = Instant::now();
    for i in 0..n {
        let from = NodeId(2 + (i % 15) as u32);
        black_box(m.handle(
            i / 1000,
            Input::Heartbeat { link: (i % 2) as usize, from, incarnation: 1, seq: i, standby: false },
        ));
    }
    let dt = start.elapsed();
    println!(
        "core: {:.0} heartbeats/s into a 16-node core ({:.0} ns each)",
        n as f64 / dt.as_secs_f64(),
        dt.as_nanos() as f64 / n as f64
    );
}

fn codec_cost() {
    let c = Codec::new("bench", &Secret::new(KEY)).unwrap();
    let n = 200_000u64;
    let start = Instant::now();
    for seq in 0..n {
        let p = c.encode(&Heartbeat { link: 0, from: NodeId(1), to: NodeId(2), incarnation: 1, seq, standby: false });
        black_box(c.decode(&p).unwrap());
    }
    let dt = start.elapsed();
    println!("wire: encode+verify {:.0} ns per heartbeat", dt.as_nanos() as f64 / n as f64);
}

async fn detection(interval: u64, timeout: u64, rounds: u32) {
    let mut delays = Vec::new();
    for _ in 0..rounds {
        let addrs = loopback_addrs(2);
        let cfg = |this| RuntimeConfig {
            membership: membership(this, &addrs, interval, timeout),
            cluster_name: "bench".into(),
            key: Secret::new(KEY),
            incarnation: None,
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_secs(1),
        };
        let mut a = MembershipHandle::start(cfg(1)).await.unwrap();
        let b = MembershipHandle::start(cfg(2)).await.unwrap();
        while !matches!(a.next_event().await, Some(MembershipEvent::NodeJoined { .. })) {}
        b.stop().await;
        let stopped = Instant::now();
        while !matches!(a.next_event().await, Some(MembershipEvent::NodeLost { .. })) {}
        delays.push(stopped.elapsed());
        a.stop().await;
    }
    delays.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "detection (interval {interval} ms, timeout {timeout} ms, {rounds} rounds): min {:.0} ms, median {:.0} ms, max {:.0} ms; median/timeout = {:.2}",
        ms(delays[0]),
        ms(delays[delays.len() / 2]),
        ms(delays[delays.len() - 1]),
        ms(delays[delays.len() / 2]) / timeout as f64
    );
}

fn main() {
    core_throughput();
    codec_cost();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(detection(100, 1000, 5));
}
