//! NIC failure on a host: real `tandem-host` processes in network namespaces (see
//! e2e_hosts_netns.rs for the topology), each host with two VM bridges, `br-front` and
//! `br-back`, watched as `[[network]]`s. The link of one bridge's port goes down on one
//! host: only the VMs attached to that bridge move, the others stay, and no sampling round
//! sees a VM on two hosts.

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, Host, VmSpec, vm};
use tandem_testkit::netns::ip;

const MOVE_LIMIT: Duration = Duration::from_secs(60);

fn on_bridge(mut v: VmSpec, br: &str) -> VmSpec {
    v.devices = format!("<interface type='bridge'><source bridge='{br}'/></interface>");
    v
}

#[test]
fn a_failed_nic_moves_only_the_vms_on_its_network() {
    let vms = vec![
        on_bridge(vm("front1", 256, 1, &["h1", "h2"]), "br-front"),
        on_bridge(vm("front2", 256, 1, &["h1", "h2"]), "br-front"),
        on_bridge(vm("back1", 256, 1, &["h1", "h2"]), "br-back"),
    ];
    let extra = "[[network]]\nname = \"front\"\nbridge = \"br-front\"\nhold = \"1s\"\n\n\
                 [[network]]\nname = \"back\"\nbridge = \"br-back\"\nhold = \"1s\"\n";
    let c = Cluster::in_netns_with(2, &vms, extra);
    let net = c.net.as_ref().unwrap();
    net.vm_bridge("br-front");
    net.vm_bridge("br-back");
    let w = c.watch();
    let _hosts: Vec<Host> = c.hosts.iter().map(|h| c.start(h)).collect();
    c.wait_all_running(&w, Duration::from_secs(60), |p| p.values().all(|h| h == "h1"));

    // A flap shorter than the hold moves nothing.
    let h1 = net.of("h1").to_string();
    for _ in 0..3 {
        ip(&["-n", &h1, "link", "set", "br-front-sw", "down"]);
        std::thread::sleep(Duration::from_millis(200));
        ip(&["-n", &h1, "link", "set", "br-front-sw", "up"]);
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(w.placed().values().all(|h| h == "h1"), "a short flap moved VMs: {:?}", w.placed());

    // The cable of h1's front network is pulled.
    let cut = Instant::now();
    ip(&["-n", &h1, "link", "set", "br-front-sw", "down"]);
    let placed = c.wait("front VMs on h2", MOVE_LIMIT, || {
        let p = w.placed();
        (p.get("front1").map(String::as_str) == Some("h2") && p.get("front2").map(String::as_str) == Some("h2"))
            .then_some(p)
    });
    eprintln!("front VMs moved {:?} after the cable was pulled", cut.elapsed());
    assert_eq!(placed.get("back1").map(String::as_str), Some("h1"), "back1 moved too: {placed:?}");
    for v in ["front1", "front2"] {
        let m = w.evidence.lock().unwrap().moved(v, "h1", cut).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
        assert_eq!(m.to, "h2");
    }
    // back1 never left h1: every answer from h1 since the cut shows it.
    {
        let ev = w.evidence.lock().unwrap();
        let h1_answers: Vec<_> =
            ev.samples.iter().filter(|s| s.host == "h1" && s.sent >= cut && s.running.is_some()).collect();
        assert!(h1_answers.len() > 5, "too few samples of h1");
        assert!(
            h1_answers.iter().all(|s| s.running.as_ref().unwrap().iter().any(|v| v == "back1")),
            "back1 stopped on h1 at some point"
        );
    }
    let log = c.log_of("h1");
    assert!(log.contains("network front failed"), "h1 did not report the failure:\n{log}");

    // The cable is back: front VMs stay where they are (failback is manual), nothing else moves.
    ip(&["-n", &h1, "link", "set", "br-front-sw", "up"]);
    std::thread::sleep(Duration::from_secs(4));
    let p = w.placed();
    assert_eq!(p.get("front1").map(String::as_str), Some("h2"), "{p:?}");
    assert_eq!(p.get("back1").map(String::as_str), Some("h1"), "{p:?}");
    assert!(c.log_of("h1").contains("network front works again"));
    w.assert_never_two(&c);
}
