//! The network monitor against the kernel's real link state: bridges with a dummy port in
//! a network namespace of their own, brought down and up with `ip`.

use std::fs::File;
use std::time::Duration;

use tandem_config::Network;
use tandem_host::nic::{NetworkHealth, NicMonitor};
use tandem_testkit::netns::{delete, ip};
use tokio::time::{Instant, timeout};

struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        delete(&self.0);
    }
}

fn network(name: &str, bridge: &str, hold_ms: u64) -> Network {
    Network {
        name: name.into(),
        bridge: Some(bridge.into()),
        libvirt_network: None,
        interfaces: Vec::new(),
        ping_targets: Vec::new(),
        hold: Duration::from_millis(hold_ms),
    }
}

async fn next(m: &mut NicMonitor, within: Duration) -> Option<NetworkHealth> {
    timeout(within, m.changes.recv()).await.ok().flatten()
}

#[test]
fn a_failed_bridge_counts_after_its_hold_a_flap_does_not_and_other_networks_stay() {
    let ns = Namespace(format!("tnic{}", std::process::id()));
    let n = ns.0.as_str();
    ip(&["netns", "add", n]);
    // Each bridge's port is one end of a veth pair (no dummy driver here); the far end
    // stands for the switch: taking it down is a pulled cable.
    for (br, port, far) in [("br-a", "d-a", "s-a"), ("br-b", "d-b", "s-b")] {
        ip(&["-n", n, "link", "add", br, "type", "bridge"]);
        ip(&["-n", n, "link", "add", port, "type", "veth", "peer", "name", far]);
        ip(&["-n", n, "link", "set", port, "master", br]);
        for dev in [far, port, br] {
            ip(&["-n", n, "link", "set", dev, "up"]);
        }
    }
    // The bridges forward (and have a carrier) a moment after their port joins.
    let t = std::time::Instant::now();
    while ["br-a", "br-b"].iter().any(|br| !ip(&["-n", n, "-br", "link", "show", br]).contains(" UP ")) {
        assert!(t.elapsed() < Duration::from_secs(30), "bridges never came up: {}", ip(&["-n", n, "-br", "link"]));
        std::thread::sleep(Duration::from_millis(100));
    }
    // The monitor must see the namespace's links, not this machine's: its netlink socket is
    // opened on a thread moved into the namespace (setns changes only the calling thread).
    let path = format!("/run/netns/{n}");
    let ns_name = n.to_string();
    let worker = std::thread::spawn(move || {
        nix::sched::setns(File::open(&path).unwrap(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(&ns_name));
    });
    worker.join().expect("monitor checks");
}

async fn run(n: &str) {
    let hold = Duration::from_millis(1000);
    let mut m = NicMonitor::start(vec![network("a", "br-a", 1000), network("b", "br-b", 1000)]).await.unwrap();
    let mut first = Vec::new();
    while first.len() < 2 {
        first.push(next(&mut m, Duration::from_secs(10)).await.expect("first readings"));
    }
    first.sort_by(|x, y| x.network.cmp(&y.network));
    assert_eq!(first.iter().map(|h| (h.network.as_str(), h.healthy)).collect::<Vec<_>>(), [("a", true), ("b", true)]);
    assert_eq!(first[0].detail, "br-a: up");

    // br-a goes down: network a fails once the hold has passed, b says nothing.
    let t = Instant::now();
    ip(&["-n", n, "link", "set", "br-a", "down"]);
    let h = next(&mut m, Duration::from_secs(10)).await.expect("a fails");
    let took = t.elapsed();
    assert_eq!((h.network.as_str(), h.healthy), ("a", false), "{h:?}");
    assert!(h.detail.contains("br-a: administratively down"), "{h:?}");
    assert!(took >= hold - Duration::from_millis(50), "counted after {took:?}, before the hold");
    assert_eq!(m.current.borrow().get("a").map(|h| h.healthy), Some(false));
    assert_eq!(m.current.borrow().get("b").map(|h| h.healthy), Some(true));

    // br-b flaps every 200 ms for 3 s: never down for a whole hold, so nothing changes.
    for _ in 0..7 {
        ip(&["-n", n, "link", "set", "br-b", "down"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        ip(&["-n", n, "link", "set", "br-b", "up"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(h) = next(&mut m, Duration::from_millis(1500)).await {
        panic!("a flap shorter than the hold was reported: {h:?}");
    }

    // b's cable is pulled: its port, and so the bridge, has no carrier.
    ip(&["-n", n, "link", "set", "s-b", "down"]);
    let h = next(&mut m, Duration::from_secs(10)).await.expect("b fails");
    assert_eq!((h.network.as_str(), h.healthy), ("b", false), "{h:?}");
    assert!(h.detail.contains("br-b: no carrier"), "{h:?}");

    // a comes back.
    ip(&["-n", n, "link", "set", "br-a", "up"]);
    let h = next(&mut m, Duration::from_secs(10)).await.expect("a works again");
    assert_eq!((h.network.as_str(), h.healthy), ("a", true), "{h:?}");

    // A deleted bridge is a failed network too.
    ip(&["-n", n, "link", "del", "br-a"]);
    let h = next(&mut m, Duration::from_secs(10)).await.expect("a fails again");
    assert_eq!((h.network.as_str(), h.healthy), ("a", false), "{h:?}");
    assert!(h.detail.contains("br-a: no such interface"), "{h:?}");
}
