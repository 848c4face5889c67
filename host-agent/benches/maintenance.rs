//! Planned maintenance benchmark: real `tandem-host` agents in network namespaces on
//! libvirt's test driver, and real `tandem-guest` stand-ins linked to them (see
//! tests/common/guests.rs).
//!
//! Measures, from outside the agents:
//! * the time to drain a host of N VMs (`EnterMaintenance` until its verdict), each VM with
//!   a linked guest running one group, by policy (`failover`, `shutdown`), against the same
//!   drain of the same VMs without guests (what asking the guests costs);
//! * the application's longest pause (its writer's largest gap between two lines) during a
//!   planned switch-over of a guest group (maintenance of its host) against an unplanned
//!   failover of the same group (its host killed).
//!
//! `cargo bench -p tandem-host --bench maintenance` (20 VMs); `-- --vms N` to change;
//! `-- --switch-over-only` for the second part alone.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::guests::{Guests, host_extra, vm_resource_extra, write_link_key};
use common::{Cluster, Host, vm};
use tandem_proto::v1 as pb;

const LIMIT: Duration = Duration::from_secs(600);

fn arg(name: &str) -> Option<usize> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

/// One group per single-node guest cluster: a process that runs until stopped.
const ONE_GROUP: &str = "[[group]]\nname = \"app\"\nnodes = [\"@NODE@\"]\n\n\
    [[group.resource]]\nname = \"work\"\nkind = \"exec\"\nmode = \"simple\"\nstart = [\"/bin/sleep\", \"100000\"]\n\
    stop_timeout = \"5s\"\n";

/// Drains h1 of `n` VMs by `policy`; with `guests`, each VM runs a linked guest with one
/// group. Returns the seconds from the call to its verdict.
fn drain(n: usize, policy: pb::MaintenancePolicy, guests: bool) -> f64 {
    let vms: Vec<common::VmSpec> = (1..=n)
        .map(|i| {
            let mut v = vm(&format!("v{i:02}"), 64, 1, &["h1", "h2"]);
            if guests {
                v.resource_extra = vm_resource_extra(&format!("c{i}"), &format!("n{i}"));
            }
            v
        })
        .collect();
    let c = Cluster::in_netns_with(2, &vms, &host_extra());
    for i in 1..=n {
        write_link_key(&c, &format!("n{i}"));
    }
    let w = c.watch();
    let _hosts: Vec<Host> = c.hosts.iter().map(|h| c.start(h)).collect();
    c.wait_all_running(&w, LIMIT, |p| p.values().all(|h| h == "h1"));
    let _guests: Vec<Guests> = if guests {
        (1..=n)
            .map(|i| {
                let node = format!("n{i}");
                let group = ONE_GROUP.replace("@NODE@", &node);
                Guests::cluster(&c, &format!("c{i}"), i - 1, &[(node.as_str(), &format!("v{i:02}"))], &group, false)
            })
            .collect()
    } else {
        Vec::new()
    };
    if guests {
        c.wait("every guest linked", LIMIT, || {
            let st = c.try_status("h1").ok()?;
            st.vms.iter().all(|v| v.guest.as_ref().is_some_and(|g| g.connected && !g.groups.is_empty())).then_some(())
        });
    }
    let t = Instant::now();
    let msgs = c.maintenance("h1", "h1", Some(policy), LIMIT, |_| false).expect("maintenance");
    let took = t.elapsed().as_secs_f64();
    match msgs.last().and_then(|m| m.progress.clone()) {
        Some(pb::maintenance_progress::Progress::Done(d)) => assert!(d.complete, "{d:?}"),
        other => panic!("no verdict: {other:?}"),
    }
    if policy == pb::MaintenancePolicy::Failover {
        c.wait("every VM on h2", LIMIT, || w.placed().values().filter(|h| *h == "h2").count().eq(&n).then_some(()));
    }
    w.assert_never_two(&c);
    took
}

const APP: &str = "[[group]]\nname = \"app\"\nnodes = [\"n1\", \"n2\"]\n\n\
    [[group.resource]]\nname = \"data\"\nkind = \"disk\"\ndirectory = \"{dir}/shared\"\n\n\
    [[group.resource]]\nname = \"writer\"\nkind = \"exec\"\nmode = \"simple\"\nstart = {writer}\n\
    stop = [\"/bin/true\"]\nstop_timeout = \"5s\"\n";

/// The guest group `app` active in g1 on h1, its peer in g2 on h2; then h1 is either put
/// in maintenance (planned) or killed (unplanned). Returns the writer's longest gap.
fn switch_over(planned: bool) -> Duration {
    let mut g1 = vm("g1", 256, 1, &["h1", "h2"]);
    g1.resource_extra = vm_resource_extra("app", "n1");
    let mut g2 = vm("g2", 256, 1, &["h2", "h1"]);
    g2.resource_extra = vm_resource_extra("app", "n2");
    let c = Cluster::in_netns_with(2, &[g1, g2], &host_extra());
    write_link_key(&c, "n1");
    write_link_key(&c, "n2");
    let w = c.watch();
    let mut hosts: Vec<Host> = c.hosts.iter().map(|h| c.start(h)).collect();
    c.wait_all_running(&w, LIMIT, |p| p.get("g1").map(String::as_str) == Some("h1") && p.len() == 2);
    let g = Guests::new(&c, &[("n1", "g1"), ("n2", "g2")], APP, false);
    let (before, _) = g.wait_writer(Some("n1"), 0, LIMIT, &c);
    c.wait("n1 linked", LIMIT, || {
        let st = c.try_status("h1").ok()?;
        st.vms.iter().find(|v| v.name == "g1")?.guest.as_ref().filter(|l| l.connected).map(|_| ())
    });
    // Let the writer run steadily first.
    std::thread::sleep(Duration::from_secs(2));
    let t0 = now_ns();
    if planned {
        c.maintenance("h1", "h1", Some(pb::MaintenancePolicy::Failover), LIMIT, |_| false).expect("maintenance");
    } else {
        // The host crashes: its agent and, with it, every VM it ran (the guest inside too).
        hosts[0].agent.kill();
        g.crash_node("n1");
    }
    g.wait_writer(Some("n2"), before, LIMIT, &c);
    std::thread::sleep(Duration::from_secs(2));
    assert!(g.two_writers().is_none(), "{:?}", g.two_writers());
    g.longest_gap_after(t0)
}

fn main() {
    let n = arg("--vms").unwrap_or(20);
    // Each result is printed as soon as it is measured.
    println!("planned maintenance: {n} VMs on a host of 2, libvirt test driver, 2 cores");
    if !std::env::args().any(|a| a == "--switch-over-only") {
        drains(n);
    }
    switch_overs();
}

fn drains(n: usize) {
    let bare = drain(n, pb::MaintenancePolicy::Failover, false);
    println!("drain of {n} VMs without guests (failover policy, baseline): {bare:.2} s");
    let failover = drain(n, pb::MaintenancePolicy::Failover, true);
    println!(
        "drain of {n} VMs, each guest moving one group, failover policy: {failover:.2} s ({:.1}x)",
        failover / bare
    );
    let shutdown = drain(n, pb::MaintenancePolicy::Shutdown, true);
    println!(
        "drain of {n} VMs, each guest stopping one group, shutdown policy: {shutdown:.2} s ({:.1}x)",
        shutdown / bare
    );
}

fn switch_overs() {
    let planned = switch_over(true);
    println!("guest group unavailable during a planned switch-over: {:.2} s", planned.as_secs_f64());
    let unplanned = switch_over(false);
    println!(
        "guest group unavailable during an unplanned failover (host killed): {:.2} s ({:.1}x the planned)",
        unplanned.as_secs_f64(),
        unplanned.as_secs_f64() / planned.as_secs_f64()
    );
}
