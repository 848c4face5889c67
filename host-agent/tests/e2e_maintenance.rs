//! Planned maintenance of a host with guests: real `tandem-host` processes in network
//! namespaces (see e2e_hosts_netns.rs), and for each VM that runs a guest, a real
//! `tandem-guest` stand-in that follows the VM (see common/guests.rs), linked to the host
//! agent of whichever host runs it. The guest cluster `app` (nodes n1 in VM g1, n2 in VM
//! g2) runs a writer stamping each line with its fencing token and the time.
//!
//! Evidence from outside the agents: every host's own `ListDomains` (sampled all along),
//! the guest writer log, and the guests' own status.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::guests::{Guests, host_extra, vm_resource_extra, write_link_key};
use common::{Cluster, Host, VmSpec, vm};
use tandem_proto::v1 as pb;

const LIMIT: Duration = Duration::from_secs(120);

const APP: &str = "[[group]]\nname = \"app\"\nnodes = [\"n1\", \"n2\"]\n\n\
    [[group.resource]]\nname = \"data\"\nkind = \"disk\"\ndirectory = \"{dir}/shared\"\n\n\
    [[group.resource]]\nname = \"writer\"\nkind = \"exec\"\nmode = \"simple\"\nstart = {writer}\n\
    stop = [\"/bin/true\"]\nstop_timeout = \"5s\"\n";

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

/// g1 (guest n1) and `plain` (no guest) prefer h1; g2 (guest n2) prefers h2.
fn vms(prepare_timeout: &str) -> Vec<VmSpec> {
    let mut g1 = vm("g1", 256, 1, &["h1", "h2"]);
    g1.resource_extra = format!("{}prepare_timeout = \"{prepare_timeout}\"\n", vm_resource_extra("app", "n1"));
    let mut g2 = vm("g2", 256, 1, &["h2", "h1"]);
    g2.resource_extra = vm_resource_extra("app", "n2");
    vec![g1, g2, vm("plain", 256, 1, &["h1", "h2"])]
}

struct Lab {
    c: Cluster,
    w: common::Watcher,
    hosts: Vec<Host>,
    g: Guests,
}

/// Hosts up with the VMs on their preferred hosts, guests linked, n1 writing.
fn lab(prepare_timeout: &str, host_fencing: bool) -> Lab {
    let vms = vms(prepare_timeout);
    let c = Cluster::in_netns_with(2, &vms, &host_extra());
    for n in ["n1", "n2"] {
        write_link_key(&c, n);
    }
    let w = c.watch();
    let hosts: Vec<Host> = c.hosts.iter().map(|h| c.start(h)).collect();
    c.wait_all_running(&w, Duration::from_secs(60), |p| vms.iter().all(|v| p.get(&v.name) == Some(&v.hosts[0])));
    let g = Guests::new(&c, &[("n1", "g1"), ("n2", "g2")], APP, host_fencing);
    g.wait_writer(Some("n1"), 0, LIMIT, &c);
    // Both guests linked to their hosts (the host sees their heartbeats).
    for (host, vm) in [("h1", "g1"), ("h2", "g2")] {
        c.wait(&format!("{vm}'s guest linked to {host}"), LIMIT, || {
            let st = c.try_status(host).ok()?;
            st.vms.iter().find(|v| v.name == vm)?.guest.as_ref().filter(|l| l.connected).map(|_| ())
        });
    }
    Lab { c, w, hosts, g }
}

fn steps_of(msgs: &[pb::MaintenanceProgress], vm: &str) -> Vec<(pb::MaintenanceStep, String, String)> {
    msgs.iter()
        .filter_map(|m| match &m.progress {
            Some(pb::maintenance_progress::Progress::Vm(v)) if v.vm == vm => {
                Some((v.step(), v.host.clone(), v.detail.clone()))
            }
            _ => None,
        })
        .collect()
}

fn done_of(msgs: &[pb::MaintenanceProgress]) -> pb::MaintenanceDone {
    match msgs.last().and_then(|m| m.progress.clone()) {
        Some(pb::maintenance_progress::Progress::Done(d)) => d,
        other => panic!("the last message is not the verdict: {other:?}"),
    }
}

/// Whether `steps` holds `want` in this order (other steps may come between).
fn in_order(steps: &[(pb::MaintenanceStep, String, String)], want: &[pb::MaintenanceStep]) -> bool {
    let mut it = steps.iter().map(|s| s.0);
    want.iter().all(|w| it.any(|s| s == *w))
}

#[test]
fn maintenance_moves_guest_groups_before_their_vms_stop_and_nothing_fails_over() {
    let Lab { c, w, hosts: _hosts, g } = lab("60s", true);
    let (t0, t0_ns) = (Instant::now(), now_ns());
    let (token_before, _) = g.wait_writer(Some("n1"), 0, LIMIT, &c);
    let msgs = c
        .maintenance("h2", "h1", Some(pb::MaintenancePolicy::Failover), LIMIT, |_| false)
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", c.logs(), g.logs()));
    let took = t0.elapsed();
    let done = done_of(&msgs);
    assert!(done.complete, "{done:?}");
    assert_eq!(done.summary, "host h1 holds no running HA VM and may be powered off");
    // h1's own hypervisor agrees: its next answers show no HA VM active.
    let after_done = Instant::now();
    c.wait("h1's hypervisor answers after the verdict", LIMIT, || {
        let ev = w.evidence.lock().unwrap();
        ev.samples.iter().find(|s| s.host == "h1" && s.sent > after_done && s.running.is_some()).map(|s| {
            assert!(s.running.as_ref().unwrap().is_empty(), "h1 still runs {:?} after the verdict", s.running);
        })
    });
    for v in ["g1", "plain"] {
        let m = w.evidence.lock().unwrap().moved(v, "h1", t0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.to, "h2");
    }

    use pb::MaintenanceStep as S;
    let g1 = steps_of(&msgs, "g1");
    assert!(
        in_order(
            &g1,
            &[S::Pending, S::GuestPreparing, S::GuestReady, S::ShuttingDown, S::Stopped, S::RunningElsewhere]
        ),
        "g1's steps: {g1:?}"
    );
    assert!(
        g1.iter().any(|s| s.0 == S::GuestReady && s.2.contains("app")),
        "the guest did not say it moved app: {g1:?}"
    );
    assert_eq!(g1.last().map(|s| s.1.as_str()), Some("h2"));
    let plain = steps_of(&msgs, "plain");
    assert!(in_order(&plain, &[S::NoGuest, S::ShuttingDown, S::Stopped, S::RunningElsewhere]), "{plain:?}");
    assert!(steps_of(&msgs, "g2").is_empty(), "g2 does not run on h1 and must not be touched");

    // The guest group moved to n2 before g1 stopped: n2 wrote with a newer token while h1
    // still ran g1 (per h1's own hypervisor, sampled throughout).
    let writes = g.writes();
    let first_n2 = writes.iter().find(|(t, n, _)| *t > token_before && n == "n2").cloned();
    let (token_after, _, n2_at) = first_n2.unwrap_or_else(|| panic!("n2 never took app over: {}", g.logs()));
    let g1_off_on_h1 = {
        let ev = w.evidence.lock().unwrap();
        ev.samples
            .iter()
            .filter(|s| {
                s.host == "h1" && s.sent >= t0 && s.running.as_ref().is_some_and(|r| !r.iter().any(|v| v == "g1"))
            })
            .map(|s| s.sent)
            .next()
            .expect("h1 reported g1 gone")
    };
    let g1_off_ns = t0_ns + g1_off_on_h1.duration_since(t0).as_nanos();
    assert!(n2_at < g1_off_ns, "n2 wrote first at {n2_at}, after g1 was already off on h1 at {g1_off_ns}");
    assert!(token_after > token_before);

    // Nothing counted as a failure, on either cluster.
    let st = c.status("h2");
    for v in &st.vms {
        assert_eq!((v.name.as_str(), v.failovers, v.restarts), (v.name.as_str(), 0, 0), "{v:?}");
    }
    let host_status = st.hosts.iter().find(|h| h.name == "h1").unwrap();
    assert_eq!(host_status.vm_count, 0, "h1 still holds VMs: {host_status:?}");
    assert!(host_status.maintenance, "h2 does not see h1 in maintenance: {host_status:?}");
    let app = g.status("n2").unwrap().groups.into_iter().find(|x| x.name == "app").unwrap();
    assert_eq!((app.location.as_str(), app.failovers), ("n2", 0), "{app:?}");

    let gap = g.longest_gap_after(t0_ns);
    eprintln!("maintenance of h1 took {took:?}; the guest application's longest write gap (switch-over): {gap:?}");
    assert!(gap < Duration::from_secs(30), "the switch-over took {gap:?}");
    assert!(g.two_writers().is_none(), "{:?}", g.two_writers());
    w.assert_never_two(&c);

    // Out of maintenance: the host takes VMs again (failback is manual: nothing moves back).
    let msgs = c.maintenance("h2", "h1", None, LIMIT, |_| false).unwrap();
    assert!(done_of(&msgs).complete, "{msgs:?}");
    let st = c.status("h1");
    let me = st.hosts.iter().find(|h| h.name == "h1").unwrap();
    assert_eq!(me.vm_count, 0);
    assert!(!me.maintenance, "{me:?}");
}

#[test]
fn a_guest_that_never_answers_delays_the_shutdown_by_its_prepare_timeout_then_it_goes_on() {
    // The guests fence by lease expiry here: a hung n1 is not powered off by its peer, so
    // its VM is still running (and its link still open) when maintenance asks it.
    let Lab { c, w, hosts: _hosts, g } = lab("3s", false);
    // n1's agent hangs while its VM runs: the link stays up, nobody answers.
    g.freeze_node("n1", true);
    let msgs = c
        .maintenance("h1", "h1", Some(pb::MaintenancePolicy::Failover), LIMIT, |_| false)
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert!(done_of(&msgs).complete, "{msgs:?}");
    use pb::MaintenanceStep as S;
    let g1 = steps_of(&msgs, "g1");
    assert!(
        in_order(&g1, &[S::GuestPreparing, S::GuestNotReady, S::ShuttingDown, S::Stopped, S::RunningElsewhere]),
        "{g1:?}"
    );
    let not_ready = g1.iter().find(|s| s.0 == S::GuestNotReady).unwrap();
    assert!(not_ready.2.contains("within 3 s"), "the report does not say why: {not_ready:?}");
    // The shutdown waited for the guest's prepare_timeout, and no longer than needed.
    let at = |step: S| {
        msgs.iter()
            .find_map(|m| match &m.progress {
                Some(pb::maintenance_progress::Progress::Vm(v)) if v.vm == "g1" && v.step() == step => {
                    Some(v.elapsed_ms)
                }
                _ => None,
            })
            .unwrap()
    };
    let waited = at(S::ShuttingDown) - at(S::GuestPreparing);
    assert!((2_900..20_000).contains(&waited), "the shutdown came {waited} ms after asking the guest");
    let log = c.log_of("h1");
    assert!(log.contains("guest agent not ready for shutdown"), "h1 did not log it:\n{log}");
    assert!(g.two_writers().is_none(), "{:?}", g.two_writers());
    w.assert_never_two(&c);
}

#[test]
fn a_host_that_dies_during_maintenance_fails_over_what_it_still_ran() {
    let Lab { c, w, mut hosts, g } = lab("60s", false);
    g.freeze_node("n1", true);
    // Maintenance begins; g1 waits for its (hung) guest...
    let first = c
        .maintenance("h1", "h1", Some(pb::MaintenancePolicy::Failover), LIMIT, |m| {
            matches!(&m.progress, Some(pb::maintenance_progress::Progress::Vm(v))
                if v.vm == "g1" && v.step() == pb::MaintenanceStep::GuestPreparing)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert!(!first.is_empty());
    // ...and h1 dies meanwhile.
    let killed = Instant::now();
    hosts[0].agent.kill();
    let placed = c.wait("g1 and plain on h2", LIMIT, || {
        let p = w.placed();
        (p.get("g1").map(String::as_str) == Some("h2") && p.get("plain").map(String::as_str) == Some("h2")).then_some(p)
    });
    eprintln!("after h1 died in maintenance, its VMs ran on h2 {:?} later: {placed:?}", killed.elapsed());
    // The guest cluster keeps one writer: n2 took app over from the hung n1.
    g.wait_writer(Some("n2"), 0, LIMIT, &c);
    assert!(g.two_writers().is_none(), "{:?}", g.two_writers());
    w.assert_never_two(&c);
}

#[test]
fn a_paused_active_vm_is_fenced_through_the_host_cluster_and_never_writes_again_with_its_old_token() {
    let Lab { c, w, hosts: _hosts, g } = lab("60s", true);
    let (before, _) = g.wait_writer(Some("n1"), 0, LIMIT, &c);
    // The active guest's VM pauses (the harness freezes every process of its stand-in).
    let paused = Instant::now();
    c.on_host("h1", |url| {
        Box::pin(async move {
            let mut h = tandem_proto::v1::host_agent_client::HostAgentClient::connect(url).await.unwrap();
            h.suspend_vm(pb::VmRequest { vm: "g1".into() }).await.unwrap();
        })
    });
    // n2 finds n1 lost, has its VM powered off through the host agents, and takes over.
    let (after, _) = g.wait_writer(Some("n2"), before, LIMIT, &c);
    eprintln!("n2 took over {:?} after g1 paused (token {before} -> {after})", paused.elapsed());
    // The host agents say so: the fence was confirmed with g1 powered off on h1.
    c.wait("a host reports g1 fenced", LIMIT, || {
        let log = c.log_of("h1") + &c.log_of("h2");
        log.lines().any(|l| l.contains("fence of VM g1") && l.contains("PoweredOff on h1")).then_some(())
    });
    // The paused VM was destroyed, not resumed: the host cluster recovers it as a crash
    // (a fresh boot: its frozen stand-in is killed and a new one boots).
    c.wait("g1 booted again", LIMIT, || {
        let h = g.history.lock().unwrap();
        let kinds: Vec<&str> = h.iter().filter(|(_, n, _)| n == "n1").map(|(_, _, what)| what.as_str()).collect();
        (kinds.iter().filter(|k| k.starts_with("start")).count() >= 2 && kinds.contains(&"kill")).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let writes = g.writes();
    let stale: Vec<_> = writes.iter().skip_while(|(t, _, _)| *t < after).filter(|(t, _, _)| *t < after).collect();
    assert!(stale.is_empty(), "writes with an old token after the takeover: {stale:?}");
    assert!(g.two_writers().is_none(), "{:?}", g.two_writers());
    w.assert_never_two(&c);
}

#[test]
fn a_physical_primary_fails_over_to_its_virtual_standby_in_one_guest_cluster() {
    // n1 is a physical server (no VM, no link), n2 runs in VM g2 on h2 and is linked.
    let c = Cluster::in_netns_with(2, &vms("60s"), &host_extra());
    for n in ["n1", "n2"] {
        write_link_key(&c, n);
    }
    let w = c.watch();
    let _hosts: Vec<Host> = c.hosts.iter().map(|h| c.start(h)).collect();
    c.wait_all_running(&w, Duration::from_secs(60), |p| p.len() == 3);
    // The virtual node fences through the host cluster; the physical one by lease expiry
    // (it has no VM a host could power off).
    let g = Guests::new(&c, &[("n1", ""), ("n2", "g2")], APP, true);
    let (before, _) = g.wait_writer(Some("n1"), 0, LIMIT, &c);
    c.wait("g2's guest linked to h2", LIMIT, || {
        let st = c.try_status("h2").ok()?;
        let link = st.vms.iter().find(|v| v.name == "g2")?.guest.clone()?;
        (link.connected && link.node_name == "n2").then_some(())
    });
    // The physical primary loses power: the virtual standby takes the group over.
    g.crash_node("n1");
    let (after, _) = g.wait_writer(Some("n2"), before, LIMIT, &c);
    assert!(after > before);
    assert!(g.two_writers().is_none(), "{:?}", g.two_writers());
    w.assert_never_two(&c);
}
