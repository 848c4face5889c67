//! The ip resource between two network namespaces joined by a veth pair:
//! an address answering in B is refused in A (IPv4 arping -D, IPv6 kernel
//! DAD); a normal start makes the address reachable from B; stop removes it.

mod common;

use std::process::Command;

use common::{NetnsPair, ctx};
use tandem_config::{IpResource as IpConfig, ResourceKind};
use tandem_guest::resources::{Health, ResourceEnv, build};

fn arping_from(ns: &str, dev: &str, addr: &str) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "arping", "-c", "1", "-w", "2", "-I", dev, addr])
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mac(net: &NetnsPair, ns: &str, dev: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&net.ip(ns, &["-j", "link", "show", "dev", dev])).unwrap();
    v[0]["address"].as_str().unwrap().to_uppercase()
}

#[test]
fn ipv4_duplicate_refused_then_start_check_stop() {
    tandem_testkit::require_program("arping", "iputils-arping", &[]);
    let net = NetnsPair::new("ip4", "10.82.1");
    let mac_a = mac(&net, &net.a, &net.veth_a);
    let mac_b = mac(&net, &net.b, &net.veth_b);
    // B already has the floating address.
    net.ip(&net.b, &["addr", "add", "10.82.1.50/24", "dev", &net.veth_b]);

    let (a, dev) = (net.a.clone(), net.veth_a.clone());
    let refused = NetnsPair::run_in(&a, move || {
        Box::pin(async move {
            let r = resource(&dev, "10.82.1.50/24");
            let err = r.start(&ctx("g1", "vip", 1)).await.unwrap_err().to_string();
            (err, r.check().await)
        })
    });
    assert!(refused.0.contains("already answers") && refused.0.to_uppercase().contains(&mac_b), "{}", refused.0);
    assert_eq!(refused.1, Health::Stopped);
    assert!(!net.ip(&net.a, &["-o", "addr", "show", "dev", &net.veth_a]).contains("10.82.1.50"), "added anyway");

    // B gives it up: A can take it.
    net.ip(&net.b, &["addr", "del", "10.82.1.50/24", "dev", &net.veth_b]);
    let (a, dev) = (net.a.clone(), net.veth_a.clone());
    let (b, dev_b) = (net.b.clone(), net.veth_b.clone());
    let (started, from_b, stopped, from_b_after) = NetnsPair::run_in(&a, move || {
        Box::pin(async move {
            let r = resource(&dev, "10.82.1.50/24");
            r.start(&ctx("g1", "vip", 2)).await.unwrap();
            let started = r.check().await;
            let from_b = arping_from(&b, &dev_b, "10.82.1.50");
            r.stop(false).await.unwrap();
            let stopped = r.check().await;
            let from_b_after = arping_from(&b, &dev_b, "10.82.1.50");
            r.stop(true).await.unwrap();
            (started, from_b, stopped, from_b_after)
        })
    });
    assert_eq!(started, Health::Running);
    assert!(from_b.0 && from_b.1.to_uppercase().contains(&mac_a), "B cannot ARP the address: {}", from_b.1);
    assert_eq!(stopped, Health::Stopped);
    assert!(!from_b_after.0, "still answers after stop: {}", from_b_after.1);
}

#[test]
fn ipv6_duplicate_refused_by_kernel_dad_then_start_stop() {
    let net = NetnsPair::new("ip6", "10.82.2");
    // nodad: B's addresses answer at once. B keeps ::2 to reach the subnet later.
    net.ip(&net.b, &["addr", "add", "fd00:82::2/64", "dev", &net.veth_b, "nodad"]);
    net.ip(&net.b, &["addr", "add", "fd00:82::50/64", "dev", &net.veth_b, "nodad"]);
    let (a, dev) = (net.a.clone(), net.veth_a.clone());
    let refused = NetnsPair::run_in(&a, move || {
        Box::pin(async move {
            let r = resource(&dev, "fd00:82::50/64");
            let err = r.start(&ctx("g1", "vip6", 1)).await.unwrap_err().to_string();
            (err, r.check().await)
        })
    });
    assert!(refused.0.contains("duplicate address detection failed"), "{}", refused.0);
    assert_eq!(refused.1, Health::Stopped, "the dadfailed address is removed again");

    net.ip(&net.b, &["addr", "del", "fd00:82::50/64", "dev", &net.veth_b]);
    let (a, dev) = (net.a.clone(), net.veth_a.clone());
    let b = net.b.clone();
    let (started, ping, stopped) = NetnsPair::run_in(&a, move || {
        Box::pin(async move {
            let r = resource(&dev, "fd00:82::50/64");
            r.start(&ctx("g1", "vip6", 2)).await.unwrap();
            let started = r.check().await;
            let ping = Command::new("ip")
                .args(["netns", "exec", &b, "ping", "-6", "-c", "1", "-W", "2", "fd00:82::50"])
                .output()
                .unwrap();
            r.stop(false).await.unwrap();
            (started, ping, r.check().await)
        })
    });
    assert_eq!(started, Health::Running);
    assert!(
        ping.status.success(),
        "B cannot reach fd00:82::50: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );
    assert_eq!(stopped, Health::Stopped);
}

#[test]
fn missing_interface_is_a_clear_failure() {
    let net = NetnsPair::new("ipx", "10.82.3");
    let msg = NetnsPair::run_in(&net.a, || {
        Box::pin(async move {
            let r = resource("nosuchif0", "10.82.3.50/24");
            let h = r.check().await;
            (r.start(&ctx("g1", "vip", 1)).await.unwrap_err().to_string(), h)
        })
    });
    assert!(msg.0.contains("nosuchif0"), "{}", msg.0);
    assert!(matches!(&msg.1, Health::Failed(w) if w.contains("nosuchif0")), "{:?}", msg.1);
}

fn resource(dev: &str, addr: &str) -> Box<dyn tandem_guest::resources::Resource> {
    let spec = tandem_config::Resource {
        name: "vip".into(),
        depends_on: Vec::new(),
        kind: ResourceKind::Ip(IpConfig { address: addr.parse().unwrap(), interface: dev.into() }),
    };
    build("g1", &spec, &ResourceEnv::new("node-a")).unwrap()
}
