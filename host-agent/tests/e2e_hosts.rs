//! End-to-end failover of a host cluster: real `tandem-host` processes on loopback
//! addresses (127.0.0.21, .22, …), each on its own libvirt test-driver hypervisor
//! (`test:///<file>`: the domains live inside the agent process, so killing the agent is
//! a host crash), a shared lease file.
//!
//! The evidence comes from each hypervisor's own view, sampled continuously through every
//! agent's `ListDomains` (the test driver's state is private to the agent's connection):
//! in no sampling round may two hosts report the same VM running.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Cluster, Host, VmSpec, vm};
use tandem_proto::v1 as pb;

/// How long after a host's death its VMs may take to run elsewhere: the lease takeover
/// time at this renewal interval is about 2 s; the rest is slack for a loaded machine.
const TAKEOVER_LIMIT: Duration = Duration::from_secs(40);

/// Ten VMs over three hosts, each preferring one host and then the next.
fn ten_vms() -> Vec<VmSpec> {
    let order = [["h1", "h2", "h3"], ["h2", "h3", "h1"], ["h3", "h1", "h2"]];
    (1..=10).map(|i| vm(&format!("vm{i:02}"), 256, 1, &order[(i - 1) % 3])).collect()
}

#[test]
fn a_killed_host_s_vms_restart_on_the_survivors_by_preference() {
    let c = Cluster::new(3, &ten_vms(), None);
    let w = c.watch();
    let mut hosts: Vec<Host> = c.hosts.iter().map(|h| c.start(h)).collect();
    let placed = c.wait_all_running(&w, Duration::from_secs(60), |p| {
        // Each VM on its first preference once all hosts are up.
        ten_vms().iter().all(|v| p.get(&v.name) == Some(&v.hosts[0]))
    });
    assert_eq!(placed.values().filter(|h| *h == "h1").count(), 4);

    // h1 crashes: its test-driver VMs vanish with the process.
    let killed = Instant::now();
    hosts[0].agent.kill();
    let after = c.wait_all_running(&w, TAKEOVER_LIMIT, |p| p.values().all(|h| h != "h1"));
    eprintln!("h1's VMs ran elsewhere {:?} after the kill", killed.elapsed());
    for v in ten_vms() {
        // The VMs h1 ran go to their second preference; the others stay.
        let expect = if v.hosts[0] == "h1" { &v.hosts[1] } else { &v.hosts[0] };
        assert_eq!(after.get(&v.name), Some(expect), "{} placed by preference; logs:\n{}", v.name, c.logs());
    }
    std::thread::sleep(Duration::from_secs(2));
    w.assert_never_two(&c);
    // The status shows each VM's fencing token: 1 where it first started, 2 where it moved.
    let s = c.status("h2");
    for v in &s.vms {
        let moved = ten_vms().iter().any(|t| t.name == v.name && t.hosts[0] == "h1");
        assert_eq!(v.fencing_token, Some(if moved { 2 } else { 1 }), "{}: {v:?}", v.name);
    }
    drop(hosts);
}

#[test]
fn a_paused_host_destroys_its_vms_on_resume_before_anything_else() {
    let c = Cluster::new(3, &ten_vms(), None);
    let w = c.watch();
    let hosts: Vec<Host> = c.hosts.iter().map(|h| c.start(h)).collect();
    c.wait_all_running(&w, Duration::from_secs(60), |p| ten_vms().iter().all(|v| p.get(&v.name) == Some(&v.hosts[0])));

    // SIGSTOP h1's agent (its VMs freeze with it) well past the takeover time.
    let pid = nix::unistd::Pid::from_raw(hosts[0].agent.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    c.wait_all_running(&w, TAKEOVER_LIMIT, |p| p.values().all(|h| h != "h1"));
    std::thread::sleep(Duration::from_secs(2));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();

    // The resumed agent learns its lease is gone, destroys its VMs and exits (76); it never
    // reports them running again.
    let start = Instant::now();
    let mut agent = hosts.into_iter().next().unwrap().agent;
    let status = loop {
        if let Some(s) = agent.try_wait() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "h1 did not exit after resuming; logs:\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(76), "h1 exits with 'host lease lost'; logs:\n{}", c.logs());
    let log = std::fs::read_to_string(c.path("h1.log")).unwrap();
    assert!(log.contains("lease"), "h1 says why it stopped:\n{log}");
    std::thread::sleep(Duration::from_secs(1));
    w.assert_never_two(&c);
}

#[test]
fn vms_that_fit_nowhere_are_reported_and_start_when_a_host_returns() {
    // Each host holds two 1 GiB VMs; six VMs fill the cluster.
    let order = [["h1", "h2", "h3"], ["h2", "h3", "h1"], ["h3", "h1", "h2"]];
    let vms: Vec<VmSpec> = (1..=6).map(|i| vm(&format!("big{i}"), 1024, 1, &order[(i - 1) % 3])).collect();
    let c = Cluster::new(3, &vms, Some((2 * 1024, 8)));
    let w = c.watch();
    let mut hosts: Vec<Host> = c.hosts.iter().map(|h| c.start(h)).collect();
    let placed = c.wait_all_running(&w, Duration::from_secs(60), |_| true);
    for h in &c.hosts {
        assert_eq!(placed.values().filter(|p| *p == h).count(), 2, "two VMs per host: {placed:?}");
    }
    let on_h1: BTreeSet<String> = placed.iter().filter(|(_, h)| *h == "h1").map(|(v, _)| v.clone()).collect();

    // h1 dies: its two VMs have nowhere to go (h2 and h3 are full).
    hosts[0].agent.kill();
    let start = Instant::now();
    loop {
        let s = c.status("h2");
        let blocked: BTreeSet<String> = s.problems.iter().map(|p| p.vm.clone()).collect();
        if blocked == on_h1 {
            assert!(
                s.problems.iter().all(|p| p.reason.contains("h2") && p.reason.contains("h3")),
                "the problem names why each host cannot take it: {:?}",
                s.problems
            );
            break;
        }
        assert!(start.elapsed() < TAKEOVER_LIMIT, "no placement problem reported: {s:?}; logs:\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    // Nothing was squeezed in: the survivors still run two VMs each.
    std::thread::sleep(Duration::from_secs(2));
    {
        let ev = w.evidence.lock().unwrap();
        let running: Vec<&String> = ev.last.keys().collect();
        assert_eq!(running.len(), 4, "only the survivors' VMs run: {:?}", ev.last);
    }

    // h1 comes back: they start there.
    hosts[0] = c.start("h1");
    let after = c.wait_all_running(&w, TAKEOVER_LIMIT, |_| true);
    for v in &on_h1 {
        assert_eq!(after.get(v).map(String::as_str), Some("h1"), "{v}; logs:\n{}", c.logs());
    }
    w.assert_never_two(&c);
}

#[test]
fn a_crashed_vm_restarts_in_place_up_to_its_limit_then_moves() {
    let mut crashy = vm("crashy", 256, 1, &["h1", "h2", "h3"]);
    crashy.group_extra = "restart_limit = 2\nrestart_window = \"10m\"\n".into();
    let c = Cluster::new(3, &[crashy, vm("steady", 256, 1, &["h2", "h3", "h1"])], None);
    let w = c.watch();
    let _hosts: Vec<Host> = c.hosts.iter().map(|h| c.start(h)).collect();
    c.wait_all_running(&w, Duration::from_secs(60), |p| p["crashy"] == "h1" && p["steady"] == "h2");
    let vm_status = |host: &str| {
        let s = c.status(host);
        s.vms.into_iter().find(|v| v.name == "crashy").unwrap_or_else(|| panic!("no crashy in {host}'s status"))
    };
    assert_eq!(vm_status("h1").restarts, 0);

    // Only the host that runs it may dump it; the others name that host.
    // (h2 may need an observation round to learn where crashy runs.)
    let refused = c.wait("h2 to name h1 as crashy's host", Duration::from_secs(10), || {
        let e = c.dump("h2", "crashy", &c.path("never.core").display().to_string()).unwrap_err();
        e.message().contains("runs on h1, not on h2").then_some(e)
    });
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(!c.path("never.core").exists());

    // Two crashes: each time a new start on the same host.
    for n in 1..=2u32 {
        let core = c.path(&format!("crashy-{n}.core"));
        let dumped = Instant::now();
        let reply = c.dump("h1", "crashy", &core.display().to_string()).unwrap_or_else(|e| panic!("dump {n}: {e:?}"));
        assert_eq!((reply.host.as_str(), reply.domain.as_str()), ("h1", "crashy"));
        assert!(core.exists(), "no dump file {}", core.display());
        // The restart counter is the holder's own count (it is not in the lease's note, so
        // peers report 0): ask h1. Detection is the VM's built-in check (every 5 s, the
        // failure confirmed by a retry), so a restart takes 5-10 s.
        let v = c.wait(&format!("crashy restarted on h1 (crash {n})"), Duration::from_secs(40), || {
            let v = vm_status("h1");
            let seen_on_h1 = w.evidence.lock().unwrap().samples.iter().any(|s| {
                s.host == "h1" && s.sent > dumped && s.running.as_ref().is_some_and(|r| r.iter().any(|d| d == "crashy"))
            });
            (v.restarts == n && v.host == "h1" && v.state() == pb::VmState::Running && seen_on_h1).then_some(v)
        });
        eprintln!("crash {n}: crashy ran again on h1 {:?} after the dump (restarts {})", dumped.elapsed(), v.restarts);
        let log = c.log_of("h1");
        assert!(log.contains("crashed"), "h1 says the VM crashed:\n{log}");
    }

    // The third crash is past the limit: the VM moves to its next host.
    let third = Instant::now();
    c.dump("h1", "crashy", &c.path("crashy-3.core").display().to_string()).expect("third dump");
    let placed = c.wait_all_running(&w, TAKEOVER_LIMIT, |p| p["crashy"] != "h1");
    eprintln!("crash 3: crashy ran on {} {:?} after the dump", placed["crashy"], third.elapsed());
    assert_eq!(placed["crashy"], "h2", "the next host by preference; logs:\n{}", c.logs());
    assert_eq!(placed["steady"], "h2", "the other VM never moved");
    let moved = w.evidence.lock().unwrap().moved("crashy", "h1", third).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(moved.to, "h2");
    let v = c.wait("h2 reports the failover", Duration::from_secs(10), || {
        let v = vm_status("h2");
        (v.host == "h2" && v.state() == pb::VmState::Running).then_some(v)
    });
    assert!(v.failed_on.contains(&"h1".to_string()), "h1 gave it up because of failures: {v:?}");
    assert!(v.failovers >= 1, "{v:?}");
    // Now h1 refuses a dump and names h2.
    let refused = c.wait("h1 to name h2 as crashy's host", Duration::from_secs(10), || {
        let e = c.dump("h1", "crashy", &c.path("never.core").display().to_string()).unwrap_err();
        e.message().contains("runs on h2, not on h1").then_some(e)
    });
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    std::thread::sleep(Duration::from_secs(1));
    w.assert_never_two(&c);
}
