//! End-to-end partition of a host cluster: three real `tandem-host` processes, each in a
//! network namespace of its own on one bridge (10.78.1.1–3), each on its own libvirt
//! test-driver hypervisor; the lease file is on the shared file system, so it stays
//! reachable from every host while the network is cut.
//!
//! ```text
//!              ns sw: bridge br0 (10.78.1.0/24)
//!            /              |               \
//!   ns h1: eth0 .1     ns h2: eth0 .2     ns h3: eth0 .3
//! ```
//!
//! How the test keeps seeing a cut-off host: h1 is cut with iptables rules on its `eth0`
//! (every packet in and out dropped: heartbeats and every peer's API calls alike), but the
//! test never reaches a host's API over the bridge. Its sampler and its status calls enter
//! the host's own namespace (setns on the calling thread) and connect to the host's address
//! from there; the kernel routes traffic to a local address over that namespace's `lo`,
//! which no rule touches. So the partition is total for the cluster, and h1's hypervisor
//! view (its `ListDomains`) can still be sampled throughout. Cutting only the heartbeat
//! port instead would have left the peers' API traffic flowing, a weaker partition.
//!
//! The evidence is each hypervisor's own view, sampled continuously: no sampling round sees
//! a VM running on two hosts, and for every VM that moved, the last sample showing it on h1
//! was answered before the first sample showing it elsewhere was sent.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Cluster, Host, VmSpec, vm};
use tandem_proto::v1 as pb;

/// Bound for a partitioned host's VMs to run elsewhere: quorum loss after the 1 s link
/// timeout, the VMs' stop, the lease release, the survivors' takeover; the rest is slack
/// for a loaded machine.
const MOVE_LIMIT: Duration = Duration::from_secs(60);

/// Six VMs over three hosts, two preferring each host, each then the next host.
fn six_vms() -> Vec<VmSpec> {
    let order = [["h1", "h2", "h3"], ["h2", "h3", "h1"], ["h3", "h1", "h2"]];
    (1..=6).map(|i| vm(&format!("vm{i}"), 256, 1, &order[(i - 1) % 3])).collect()
}

/// Whether `s` (one host's view) has quorum and sees every other host up.
fn all_up(s: &pb::HostClusterStatus) -> bool {
    s.quorum
        && s.hosts.len() == 3
        && s.hosts.iter().all(|h| matches!(h.state(), pb::HostState::Up | pb::HostState::Self_))
}

#[test]
fn a_partitioned_host_stops_its_vms_before_the_others_take_them_over() {
    let vms = six_vms();
    let c = Cluster::in_netns(3, &vms);
    let w = c.watch();
    let _hosts: Vec<Host> = c.hosts.iter().map(|h| c.start(h)).collect();
    let placed =
        c.wait_all_running(&w, Duration::from_secs(60), |p| vms.iter().all(|v| p.get(&v.name) == Some(&v.hosts[0])));
    let on_h1: Vec<String> = placed.iter().filter(|(_, h)| *h == "h1").map(|(v, _)| v.clone()).collect();
    assert_eq!(on_h1.len(), 2, "{placed:?}");
    c.wait("every host sees the others", Duration::from_secs(20), || {
        c.hosts.iter().all(|h| c.try_status(h).is_ok_and(|s| all_up(&s))).then_some(())
    });

    // Cut h1 off from h2 and h3; the lease file stays reachable.
    let cut = Instant::now();
    c.net.as_ref().unwrap().cut("h1");
    let after = c.wait_all_running(&w, MOVE_LIMIT, |p| p.values().all(|h| h != "h1"));
    let moved_at = cut.elapsed();
    // h1's VMs run on a survivor; not necessarily on their next preference: the most
    // preferred survivor asks first but is refused while h1 still holds the lease, and its
    // retry (one renewal interval later) races the next survivor's staggered first attempt
    // (also one renewal interval), which then finds the lease released. Either is safe.
    for v in &vms {
        let on = after.get(&v.name).map(String::as_str);
        if v.hosts[0] == "h1" {
            assert!(matches!(on, Some("h2" | "h3")), "{} runs on a survivor: {on:?}; logs:\n{}", v.name, c.logs());
        } else {
            assert_eq!(on, Some(v.hosts[0].as_str()), "{} stays where it was; logs:\n{}", v.name, c.logs());
        }
    }

    // h1 is alone (1 of 3): no quorum; it still holds its host lease (the disk is reachable)
    // and so still answers, with none of the VMs running there.
    let s1 = c.status("h1");
    assert!(!s1.quorum, "h1 must have lost quorum: {s1:?}");
    assert!(s1.lease_valid, "h1's host lease stays valid (the disk is reachable): {s1:?}");
    let s2 = c.status("h2");
    assert!(s2.quorum, "h2 and h3 keep quorum: {s2:?}");
    assert_eq!(s2.hosts.iter().find(|h| h.name == "h1").map(|h| h.state()), Some(pb::HostState::Lost), "{s2:?}");

    // The order, VM by VM: h1 stopped running it before another host started it.
    {
        let ev = w.evidence.lock().unwrap();
        for v in &on_h1 {
            let m = ev.moved(v, "h1", cut).unwrap_or_else(|e| panic!("{e}; logs:\n{}", c.logs()));
            // Moved once: after the cut it ran on one survivor only.
            let ran_on: std::collections::BTreeSet<&str> = ev
                .samples
                .iter()
                .filter(|s| s.sent >= cut && s.running.as_ref().is_some_and(|r| r.contains(v)))
                .map(|s| s.host.as_str())
                .collect();
            assert!(
                ran_on.len() == 1 || (ran_on.len() == 2 && ran_on.contains("h1")),
                "{v} moved more than once after the cut: ran on {ran_on:?}; logs:\n{}",
                c.logs()
            );
            eprintln!(
                "{v}: last seen on h1 {:?} after the cut, first seen on {} {:?} after the cut ({} between; h1 seen \
                 without it in between: {})",
                m.last_on_from.saturating_duration_since(cut),
                m.to,
                m.first_elsewhere.saturating_duration_since(cut),
                fmt_gap(m.first_elsewhere.saturating_duration_since(m.last_on_from)),
                m.seen_gone_in_between,
            );
        }
        // The VMs that never were on h1 never moved.
        for v in vms.iter().filter(|v| !on_h1.contains(&v.name)) {
            let moved = ev
                .samples
                .iter()
                .any(|s| s.host != v.hosts[0] && s.running.as_ref().is_some_and(|r| r.contains(&v.name)));
            assert!(!moved, "{} ran somewhere else than {}", v.name, v.hosts[0]);
        }
    }
    eprintln!("partition: h1's VMs all ran elsewhere {moved_at:?} after the cut");
    let log = c.log_of("h1");
    assert!(log.to_lowercase().contains("quorum"), "h1 says it lost quorum:\n{log}");

    // Long past every timeout, nothing comes back on h1.
    std::thread::sleep(Duration::from_secs(3));
    assert!(w.placed().values().all(|h| h != "h1"), "h1 runs a VM again: {:?}", w.placed());

    // Heal: h1 rejoins, every host sees the others, and each VM still runs exactly once
    // where it went (failback is manual).
    let healed = Instant::now();
    c.net.as_ref().unwrap().heal("h1");
    c.wait("h1 rejoins", Duration::from_secs(30), || {
        c.hosts.iter().all(|h| c.try_status(h).is_ok_and(|s| all_up(&s))).then_some(())
    });
    eprintln!("partition healed: every host saw the others again {:?} after", healed.elapsed());
    std::thread::sleep(Duration::from_secs(3));
    let end: BTreeMap<String, String> = c.wait_all_running(&w, Duration::from_secs(10), |_| true);
    assert_eq!(end, after, "nothing moved after the heal; logs:\n{}", c.logs());
    let s1 = c.status("h1");
    for v in &s1.vms {
        assert_eq!(v.state(), pb::VmState::Running, "h1's view after the heal: {v:?}");
        assert_eq!(Some(&v.host), after.get(&v.name), "h1's view after the heal: {v:?}");
    }
    w.assert_never_two(&c);
}

fn fmt_gap(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}
