//! Guest fencing and operator pauses, end to end: real `tandem-host` processes on the
//! libvirt test driver (see `common`). Two VMs of guest cluster "pg" run on different
//! hosts; a fence request given to one host for the VM on the other is forwarded there,
//! the VM is destroyed and confirmed off by that host's hypervisor before the answer, and
//! the host cluster then recovers it like a crash. A VM of another guest cluster is
//! refused. A paused VM is neither failed nor moved.

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, Host, VmSpec, vm};
use tandem_proto::v1 as pb;

/// Two hosts; pg1 prefers h1, pg2 prefers h2 (both of guest cluster "pg"); web (guest
/// cluster "www") prefers h1.
fn vms() -> Vec<VmSpec> {
    let in_cluster = |mut v: VmSpec, gc: &str| {
        v.resource_extra = format!("guest_cluster = \"{gc}\"\n");
        v
    };
    vec![
        in_cluster(vm("pg1", 256, 1, &["h1", "h2"]), "pg"),
        in_cluster(vm("pg2", 256, 1, &["h2", "h1"]), "pg"),
        in_cluster(vm("web", 256, 1, &["h1", "h2"]), "www"),
    ]
}

fn domain<'a>(list: &'a pb::DomainList, name: &str) -> Option<&'a pb::Domain> {
    list.domains.iter().find(|d| d.name == name)
}

#[test]
fn a_guest_fences_its_peer_on_another_host_and_the_host_cluster_recovers_it() {
    let c = Cluster::new(2, &vms(), None);
    let w = c.watch();
    let _hosts: Vec<Host> = c.hosts.iter().map(|h| c.start(h)).collect();
    c.wait_all_running(&w, Duration::from_secs(60), |p| p["pg1"] == "h1" && p["pg2"] == "h2" && p["web"] == "h1");
    // h1 must know that pg2 runs on h2 (one lease observation round).
    c.wait("h1 to see pg2 on h2", Duration::from_secs(20), || {
        c.status("h1").vms.iter().any(|v| v.name == "pg2" && v.host == "h2").then_some(())
    });

    // web is not of guest cluster "pg": refused, and pg2 keeps running.
    let refused = c.fence("h1", "web", "pg2").unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("may not fence VM pg2"), "{refused:?}");
    let refused = c.fence("h1", "pg2", "pg2").unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let on_h2 = c.domains("h2");
    assert_eq!(domain(&on_h2, "pg2").map(|d| d.state()), Some(pb::DomainState::Running), "{on_h2:?}");

    // pg1's guest asks h1 to fence pg2, which runs on h2: h1 forwards, h2 destroys it.
    let asked = Instant::now();
    let answer = c.fence("h1", "pg1", "pg2").unwrap_or_else(|e| panic!("fence: {e:?}; logs:\n{}", c.logs()));
    let answered = Instant::now();
    eprintln!("pg2 fenced in {:?}: {answer:?}", answered - asked);
    assert_eq!(answer.outcome(), pb::FenceVmOutcome::PoweredOff, "{answer:?}");
    assert_eq!(answer.hypervisor, "h2");
    // Right after the answer, h2's own hypervisor reports it off: destroyed, not shut down.
    // (Its recovery waits for the VM's check, every 5 s and confirmed by a retry.)
    let on_h2 = c.domains("h2");
    let d = domain(&on_h2, "pg2").unwrap_or_else(|| panic!("pg2 not defined on h2: {on_h2:?}"));
    assert_eq!((d.state(), d.reason.as_str()), (pb::DomainState::Shutoff, "destroyed"), "{d:?}");
    // And no sample answered after the fence answer showed it running before that.
    {
        let ev = w.evidence.lock().unwrap();
        let ran = ev.samples.iter().any(|s| {
            s.sent >= answered
                && s.answered <= answered + Duration::from_millis(500)
                && s.running.as_ref().is_some_and(|r| r.iter().any(|v| v == "pg2"))
        });
        assert!(!ran, "pg2 was reported running right after the fence answer");
    }
    // The others were not touched.
    let placed = w.placed();
    assert_eq!((placed.get("pg1"), placed.get("web")), (Some(&"h1".to_string()), Some(&"h1".to_string())));

    // The host cluster recovers it like a crash (restarted in place), not as a stop by hand.
    let host = c.wait("pg2 to run again", Duration::from_secs(60), || {
        let ev = w.evidence.lock().unwrap();
        ev.samples
            .iter()
            .find(|s| s.sent > answered && s.running.as_ref().is_some_and(|r| r.iter().any(|v| v == "pg2")))
            .map(|s| s.host.clone())
    });
    eprintln!("pg2 ran again on {host} {:?} after the fence", answered.elapsed());
    let v = c.wait("h2 to report pg2 running again", Duration::from_secs(20), || {
        let s = c.status("h2");
        s.vms.into_iter().find(|v| v.name == "pg2" && v.state() == pb::VmState::Running && !v.host.is_empty())
    });
    assert!(v.restarts >= 1 || v.failovers >= 1, "recovered as a failure: {v:?}");
    let h2 = c.log_of("h2");
    assert!(h2.contains("forwarded by h1") && h2.contains("powered off by a fence request of VM pg1"), "{h2}");
    assert!(!h2.contains("stopped outside the cluster"), "the fence was taken for a stop by hand:\n{h2}");
    let h1 = c.log_of("h1");
    assert!(h1.contains("fence request refused: VM web (guest cluster www) may not fence VM pg2"), "{h1}");
    assert!(h1.contains("fence of VM pg2 (00000000-0000-4000-8000-000000000002) asked by VM pg1: PoweredOff on h2"));
    w.assert_never_two(&c);
}

#[test]
fn a_suspended_vm_stays_paused_where_it_is_until_resumed() {
    let c = Cluster::new(2, &vms(), None);
    let w = c.watch();
    let _hosts: Vec<Host> = c.hosts.iter().map(|h| c.start(h)).collect();
    c.wait_all_running(&w, Duration::from_secs(60), |p| p["pg1"] == "h1" && p["pg2"] == "h2");
    c.wait("h2 to see pg1 on h1", Duration::from_secs(20), || {
        c.status("h2").vms.iter().any(|v| v.name == "pg1" && v.host == "h1").then_some(())
    });

    // Only the host that runs it may pause it; the other names that host.
    let elsewhere = c.pause("h2", "pg1", true).unwrap_err();
    assert_eq!(elsewhere.code(), tonic::Code::FailedPrecondition, "{elsewhere:?}");
    assert!(elsewhere.message().contains("runs on h1, not on h2"), "{elsewhere:?}");

    let suspended = Instant::now();
    let r = c.pause("h1", "pg1", true).unwrap_or_else(|e| panic!("suspend: {e:?}"));
    assert_eq!((r.host.as_str(), r.domain.as_str(), r.state()), ("h1", "pg1", pb::DomainState::Paused));
    assert_eq!(r.reason, "user");
    // Suspending twice is refused by the hypervisor's state check.
    assert_eq!(c.pause("h1", "pg1", true).unwrap_err().code(), tonic::Code::FailedPrecondition);

    // Well past two check intervals (5 s each, a failure confirmed by a retry): still
    // paused on h1, never started on h2, and the cluster reports it running on h1.
    std::thread::sleep(Duration::from_secs(14));
    let on_h1 = c.domains("h1");
    assert_eq!(domain(&on_h1, "pg1").map(|d| d.state()), Some(pb::DomainState::Paused), "{on_h1:?}");
    {
        let ev = w.evidence.lock().unwrap();
        let moved = ev.samples.iter().any(|s| {
            s.sent > suspended && s.host == "h2" && s.running.as_ref().is_some_and(|r| r.iter().any(|v| v == "pg1"))
        });
        assert!(!moved, "pg1 was started on h2 while paused; logs:\n{}", c.logs());
    }
    for h in ["h1", "h2"] {
        let v = c.status(h).vms.into_iter().find(|v| v.name == "pg1").unwrap();
        assert_eq!((v.host.as_str(), v.state(), v.restarts, v.failovers), ("h1", pb::VmState::Running, 0, 0), "{h}");
    }

    let r = c.pause("h1", "pg1", false).unwrap_or_else(|e| panic!("resume: {e:?}"));
    assert_eq!((r.state(), r.reason.as_str()), (pb::DomainState::Running, "unpaused"));
    c.wait_all_running(&w, Duration::from_secs(10), |p| p["pg1"] == "h1");
    assert_eq!(c.pause("h1", "pg1", false).unwrap_err().code(), tonic::Code::FailedPrecondition);
    w.assert_never_two(&c);
}
