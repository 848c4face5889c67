//! Two nodes in two network namespaces joined by two veth pairs (two links);
//! iptables inside one namespace cuts one link, then both. Needs root,
//! `ip` (iproute2) and `iptables`.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tandem_membership::runtime::{MembershipHandle, RuntimeConfig};
use tandem_membership::{MembershipConfig, MembershipEvent as E, NodeConfig, NodeId};
use tandem_monitors::Secret;
use tandem_testkit::require_program;

const INTERVAL_MS: u64 = 50;
const TIMEOUT_MS: u64 = 600;
const WAIT: Duration = Duration::from_secs(15);

fn run(args: &[&str]) {
    let ip = require_program("ip", "iproute2", &[]);
    let out = Command::new(&ip).args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn iptables(ns: &str, rule: &[&str]) {
    let ipt = require_program("iptables", "iptables", &[]);
    let ipt = ipt.to_str().unwrap();
    let mut args = vec!["netns", "exec", ns, ipt];
    args.extend_from_slice(rule);
    run(&args);
}

/// Two namespaces `<base>a`/`<base>b` and two veth pairs; deleted on drop,
/// also when the test panics.
struct Lab {
    ns: [String; 2],
}

impl Lab {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // Short: interface names are limited to 15 bytes.
        let base = format!("tm{}{}{}", std::process::id() % 100_000, tag, NEXT.fetch_add(1, Ordering::Relaxed));
        let lab = Lab { ns: [format!("{base}a"), format!("{base}b")] };
        for ns in &lab.ns {
            run(&["netns", "add", ns]);
            run(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for link in 0..2 {
            let (va, vb) = (format!("{base}a{link}"), format!("{base}b{link}"));
            run(&["link", "add", &va, "netns", &lab.ns[0], "type", "veth", "peer", "name", &vb, "netns", &lab.ns[1]]);
            for (ns, dev, host) in [(&lab.ns[0], &va, 1), (&lab.ns[1], &vb, 2)] {
                run(&["-n", ns, "addr", "add", &format!("10.{}.0.{host}/24", 201 + link), "dev", dev]);
                run(&["-n", ns, "link", "set", dev, "up"]);
            }
        }
        lab
    }

    fn dev(&self, node: usize, link: usize) -> String {
        format!("{}{link}", self.ns[node])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.ns {
            // Deleting a namespace also deletes the veths inside it.
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn config(this: u32) -> RuntimeConfig {
    let addr = |node: u32, link: u32| format!("10.{}.0.{node}:7788", 201 + link).parse().unwrap();
    RuntimeConfig {
        membership: MembershipConfig {
            this_node: NodeId(this),
            nodes: (1..=2)
                .map(|n| NodeConfig { id: NodeId(n), votes: 1, addresses: vec![addr(n, 0), addr(n, 1)] })
                .collect(),
            links: vec!["public".into(), "interconnect".into()],
            heartbeat_interval_ms: INTERVAL_MS,
            link_timeout_ms: TIMEOUT_MS,
            lease_disk: true,
            ping_targets: vec![],
        },
        cluster_name: "netns-test".into(),
        key: Secret::new("netns test cluster key 32 bytes!"),
        incarnation: None,
        ping_interval: Duration::from_secs(1),
        ping_timeout: Duration::from_secs(1),
    }
}

/// Runs node `this` on a thread of its own inside namespace `ns` (sockets
/// belong to the namespace of the thread that creates them) and forwards
/// its events. Disk liveness for the peer is fed as `peer_disk_alive`.
fn spawn_node(ns: &str, this: u32, peer_disk_alive: Option<bool>) -> (mpsc::Receiver<E>, std::sync::mpsc::Sender<()>) {
    let path = format!("/run/netns/{ns}");
    let (ev_tx, ev_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns(2) on a valid namespace fd only changes this thread's network namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let mut h = MembershipHandle::start(config(this)).await.expect("start membership");
            let peer = NodeId(3 - this);
            if let Some(alive) = peer_disk_alive {
                h.disk_liveness(peer, alive);
            }
            loop {
                // Stop when asked or when the test (and its sender) is gone.
                if !matches!(stop_rx.try_recv(), Err(mpsc::TryRecvError::Empty)) {
                    break;
                }
                match tokio::time::timeout(Duration::from_millis(50), h.next_event()).await {
                    Ok(Some(e)) => {
                        if ev_tx.send(e).is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
            }
            h.stop().await;
        });
    });
    (ev_rx, stop_tx)
}

fn wait_for(rx: &mpsc::Receiver<E>, what: &str, pred: impl Fn(&E) -> bool) -> Vec<E> {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(e) = rx.recv_timeout(Duration::from_millis(100)) {
            let done = pred(&e);
            seen.push(e);
            if done {
                return seen;
            }
        }
    }
    panic!("no {what} within {WAIT:?}; saw {seen:?}");
}

fn drain_for(rx: &mpsc::Receiver<E>, d: Duration) -> Vec<E> {
    let end = Instant::now() + d;
    let mut seen = Vec::new();
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        if let Ok(e) = rx.recv_timeout(left) {
            seen.push(e);
        }
    }
    seen
}

fn joined(node: u32) -> impl Fn(&E) -> bool {
    move |e| matches!(e, E::NodeJoined { node: n, .. } if *n == NodeId(node))
}

#[test]
fn iptables_cut_of_one_link_then_both() {
    let lab = Lab::new("c");
    // Node 1 is told node 2 is alive on the lease disk: a full network cut must only partition.
    let (a, _stop_a) = spawn_node(&lab.ns[0], 1, Some(true));
    let (b, _stop_b) = spawn_node(&lab.ns[1], 2, None);
    wait_for(&a, "node 2 joining node 1", joined(2));
    wait_for(&b, "node 1 joining node 2", joined(1));

    // Cut link 1 (both directions) inside node 1's namespace.
    let dev1 = lab.dev(0, 1);
    iptables(&lab.ns[0], &["-A", "INPUT", "-i", &dev1, "-j", "DROP"]);
    iptables(&lab.ns[0], &["-A", "OUTPUT", "-o", &dev1, "-j", "DROP"]);
    let mut seen_a = wait_for(&a, "link 1 down on node 1", |e| *e == E::LinkDown { node: NodeId(2), link: 1 });
    let mut seen_b = wait_for(&b, "link 1 down on node 2", |e| *e == E::LinkDown { node: NodeId(1), link: 1 });
    seen_a.extend(drain_for(&a, Duration::from_millis(3 * TIMEOUT_MS)));
    seen_b.extend(drain_for(&b, Duration::from_millis(0)));
    for (who, seen) in [("node 1", &seen_a), ("node 2", &seen_b)] {
        let bad: Vec<_> = seen
            .iter()
            .filter(|e| {
                matches!(e, E::NodeLost { .. } | E::NodePartitioned { .. } | E::QuorumLost)
                    || matches!(e, E::LinkDown { link: 0, .. })
            })
            .collect();
        assert!(bad.is_empty(), "{who}: cutting one link caused {bad:?}");
    }

    // Cut link 0 too: silent everywhere, but alive on disk -> partitioned, never lost.
    let dev0 = lab.dev(0, 0);
    iptables(&lab.ns[0], &["-A", "INPUT", "-i", &dev0, "-j", "DROP"]);
    iptables(&lab.ns[0], &["-A", "OUTPUT", "-o", &dev0, "-j", "DROP"]);
    let mut seen = wait_for(&a, "partition of node 2", |e| *e == E::NodePartitioned { node: NodeId(2) });
    seen.extend(drain_for(&a, Duration::from_millis(2 * TIMEOUT_MS)));
    assert!(seen.contains(&E::LinkDown { node: NodeId(2), link: 0 }), "{seen:?}");
    assert!(seen.contains(&E::QuorumLost), "half the votes without the tie-break: {seen:?}");
    assert!(!seen.iter().any(|e| matches!(e, E::NodeLost { .. })), "lost while alive on disk: {seen:?}");
    wait_for(&b, "partition of node 1 (disk unknown)", |e| *e == E::NodePartitioned { node: NodeId(1) });

    // Heal link 0: both back.
    iptables(&lab.ns[0], &["-D", "INPUT", "-i", &dev0, "-j", "DROP"]);
    iptables(&lab.ns[0], &["-D", "OUTPUT", "-o", &dev0, "-j", "DROP"]);
    let seen = wait_for(&a, "node 2 back", joined(2));
    assert!(seen.contains(&E::LinkUp { node: NodeId(2), link: 0 }), "{seen:?}");
    wait_for(&a, "quorum back", |e| *e == E::QuorumRegained);
}
