//! Live migration end to end: two real `tandem-host` agents, each in its own network
//! namespace with its own real libvirt daemon running QEMU (TCG), one HA VM (a real QEMU
//! guest with no OS). `tandemctl vm move` and maintenance with the `migrate` policy
//! live-migrate it; the evidence comes from outside the agents:
//!
//! * each hypervisor's own view, sampled through libvirt in rounds (h1 then h2) while the
//!   VM moves: no round shows it executing (running) on both hosts;
//! * libvirt's lifecycle events on both daemons: the destination resumes the VM only after
//!   the source paused it for good, and never boots it;
//! * the guest's memory: keys typed into the guest before the move are still in its BIOS
//!   keyboard buffer after it (a rebooted guest would have an empty one);
//! * the lease: the VM's fencing token increases with the move.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Cluster, vm};
use tandem_host::hypervisor::libvirt::LibvirtHypervisor;
use tandem_host::hypervisor::{DomainEvent, DomainState, EventKind, EventReason, Hypervisor, RunningReason};
use tandem_proto::v1 as pb;
use tandem_proto::v1::host_agent_client::HostAgentClient;
use tandem_testkit::qemu::qemu_or_skip;

/// Generous bound for a move; the VM's 32 MiB migrate in well under a second.
const BOUND: Duration = Duration::from_secs(60);

/// What the test saw of the VM on each host, through libvirt.
#[derive(Default)]
struct Seen {
    rounds: u64,
    /// Rounds in which the VM was running on both hosts.
    both_running: Vec<String>,
    /// Rounds in which a paused copy sat on one host while it ran on the other (the
    /// migration's incoming copy: allowed, never running).
    paused_beside_running: u64,
    /// Every lifecycle event of the VM, per host, with when it arrived.
    events: Vec<(usize, DomainEvent, Instant)>,
}

/// Samples both hypervisors' views (h1 then h2, each over its own connection) and
/// collects their events, until dropped.
struct Sampler {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(uris: Vec<String>, uuid: &str) -> Sampler {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, uuid) = (seen.clone(), stop.clone(), uuid.to_string());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let mut hvs = Vec::new();
                for uri in &uris {
                    hvs.push(LibvirtHypervisor::connect(uri).await.expect("sampler connects"));
                }
                for (i, hv) in hvs.iter().enumerate() {
                    let mut rx = hv.subscribe();
                    let (s, uuid) = (s.clone(), uuid.clone());
                    tokio::spawn(async move {
                        while let Ok(e) = rx.recv().await {
                            if e.uuid.to_string() == uuid {
                                s.lock().unwrap().events.push((i, e, Instant::now()));
                            }
                        }
                    });
                }
                let _ = ready_tx.send(());
                while !st.load(Ordering::SeqCst) {
                    let mut states = Vec::new();
                    for hv in &hvs {
                        let state = hv.state(&uuid).await.ok();
                        states.push(state);
                    }
                    {
                        let mut seen = s.lock().unwrap();
                        seen.rounds += 1;
                        let running = |s: &Option<DomainState>| s.as_ref().is_some_and(DomainState::is_running);
                        let paused = |s: &Option<DomainState>| matches!(s, Some(DomainState::Paused(_)));
                        if states.iter().filter(|s| running(s)).count() > 1 {
                            let n = seen.rounds;
                            seen.both_running.push(format!("round {n}: {states:?}"));
                        }
                        if states.iter().any(running) && states.iter().any(paused) {
                            seen.paused_beside_running += 1;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        });
        ready_rx.recv_timeout(Duration::from_secs(30)).expect("the sampler connected");
        Sampler { seen, stop, thread: Some(thread) }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The VM's state on host `i` (0-based), through libvirt.
fn state_on(c: &Cluster, i: usize, uuid: &str) -> Option<DomainState> {
    let uri = c.qemu[i].uri();
    let uuid = uuid.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let hv = LibvirtHypervisor::connect(&uri).await.expect("connect");
            let s = hv.state(&uuid).await.ok();
            hv.close().await;
            s
        })
    })
    .join()
    .unwrap()
}

/// The VM as `host` reports it: where it runs and its fencing token.
fn vm_status(c: &Cluster, host: &str, name: &str) -> (String, Option<u64>, i32) {
    let s = c.status(host);
    let v = s.vms.iter().find(|v| v.name == name).expect("the VM is listed");
    (v.host.clone(), v.fencing_token, v.state)
}

fn move_vm(c: &Cluster, via: &str, name: &str, to: &str) {
    let (name, to) = (name.to_string(), to.to_string());
    c.on_host(via, move |url| {
        Box::pin(async move {
            let mut client = HostAgentClient::connect(url.clone()).await.unwrap_or_else(|e| panic!("{url}: {e}"));
            client.move_vm(pb::MoveVmRequest { vm: name, to_host: to }).await.expect("MoveVm accepted");
        })
    });
}

/// Waits until the VM runs on host `i` per its hypervisor and per the cluster.
fn wait_running_on(c: &Cluster, i: usize, host: &str, name: &str, uuid: &str) -> DomainState {
    c.wait(&format!("{name} running on {host}"), BOUND, || {
        let state = state_on(c, i, uuid).filter(DomainState::is_running)?;
        let (at, _, st) = vm_status(c, host, name);
        (at == host && st == pb::VmState::Running as i32).then_some(state)
    })
}

#[test]
fn a_moved_vm_is_live_migrated_and_never_runs_on_two_hosts() {
    if !qemu_or_skip("a_moved_vm_is_live_migrated_and_never_runs_on_two_hosts") {
        return;
    }
    let c = Cluster::in_netns_qemu(2, &[vm("m1", 32, 1, &["h1", "h2"])]);
    let uuid = c.uuid_of("m1");
    let _h1 = c.start("h1");
    let _h2 = c.start("h2");

    let first = wait_running_on(&c, 0, "h1", "m1", &uuid);
    eprintln!("m1 runs on h1: {first:?}");
    // Something only this guest's memory holds: keys typed into it (the BIOS stores them).
    std::thread::sleep(Duration::from_millis(500));
    c.qemu[0].send_keys("m1", &["KEY_T", "KEY_A", "KEY_N"]);
    c.wait("keys in the guest's buffer", BOUND, || (c.qemu[0].read_keyboard_buffer("m1") == "tan").then_some(()));
    let (_, token_before, _) = vm_status(&c, "h1", "m1");

    // 1. tandemctl vm move m1 --to h2.
    let sampler = Sampler::start(c.qemu.iter().map(|d| d.uri()).collect(), &uuid);
    let asked = Instant::now();
    move_vm(&c, "h1", "m1", "h2");
    let on_h2 = wait_running_on(&c, 1, "h2", "m1", &uuid);
    let moved_in = asked.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let (rounds, both, beside, events) = {
        let s = sampler.seen.lock().unwrap();
        (s.rounds, s.both_running.clone(), s.paused_beside_running, s.events.clone())
    };
    drop(sampler);
    eprintln!("sampled {rounds} rounds; a paused copy beside the running VM in {beside} of them");
    for (i, e, at) in &events {
        eprintln!("  +{:>5} ms h{} {:?} {:?}", at.duration_since(asked).as_millis(), i + 1, e.kind, e.reason);
    }
    assert!(rounds > 10, "the sampler ran only {rounds} rounds");
    assert!(both.is_empty(), "m1 ran on two hosts: {both:?}; logs:\n{}", c.logs());

    // The destination resumed it (libvirt: running, unpaused), it did not boot it.
    assert_eq!(on_h2, DomainState::Running(RunningReason::Unpaused), "resumed, not booted; logs:\n{}", c.logs());
    assert!(
        !events.iter().any(|(i, e, _)| *i == 1 && e.kind == EventKind::Started && e.reason == EventReason::Booted),
        "h2 booted m1: {events:?}"
    );
    assert!(c.qemu[1].qemu_log("m1").contains("-incoming"), "h2's QEMU was started for an incoming migration");
    // Gone from h1: not running, not defined.
    assert_eq!(state_on(&c, 0, &uuid), None, "m1 is still defined on h1");
    // Its memory came along.
    assert_eq!(c.qemu[1].read_keyboard_buffer("m1"), "tan", "the guest's memory did not come along");
    // Ordering and downtime, from libvirt's events: the source's last pause before the
    // destination's resume.
    let paused_on_h1 = events
        .iter()
        .filter(|(i, e, _)| *i == 0 && e.kind == EventKind::Suspended)
        .map(|(_, _, at)| *at)
        .next_back()
        .expect("h1 paused m1 for the migration");
    let resumed_on_h2 = events
        .iter()
        .find(|(i, e, _)| *i == 1 && e.kind == EventKind::Resumed)
        .map(|(_, _, at)| *at)
        .expect("h2 resumed m1");
    assert!(resumed_on_h2 > paused_on_h1, "h2 resumed m1 before h1 paused it");
    let downtime = resumed_on_h2 - paused_on_h1;
    // The fencing token increased: h2 holds the lease under a newer token.
    let (at, token_after, _) = vm_status(&c, "h2", "m1");
    assert_eq!(at, "h2");
    assert!(token_after > token_before, "token {token_before:?} -> {token_after:?}");
    let h1_log = c.log_of("h1");
    let took = h1_log
        .split("live-migrated to h2 in ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .unwrap_or_else(|| panic!("h1 does not say it live-migrated m1; log:\n{h1_log}"))
        .to_string();
    assert!(c.log_of("h2").contains("resuming the VM migrated here"), "h2 does not say it resumed m1");
    // The fencing guards follow the VM: h2's guards the one QEMU left (its own), h1's let go.
    let pid = c.wait("h1's QEMU of m1 to end", BOUND, || match common::qemu_pids(&uuid).as_slice() {
        &[pid] => Some(pid),
        _ => None,
    });
    common::wait_registered(&c, "h2", pid);
    let h1_plain = common::strip_ansi(&h1_log);
    assert!(h1_plain.contains("QEMU unregistered from the fencing guard"), "h1 still guards m1's old QEMU");
    eprintln!(
        "MEASURED move h1 -> h2: migration {took} ms (h1's agent); running on h2 {} ms after the request; \
         downtime (h1 paused -> h2 resumed, libvirt events) {} ms; tokens {token_before:?} -> {token_after:?}",
        moved_in.as_millis(),
        downtime.as_millis(),
    );

    // 2. Maintenance of h2 with the migrate policy: the VM leaves by live migration too.
    let sampler = Sampler::start(c.qemu.iter().map(|d| d.uri()).collect(), &uuid);
    let asked = Instant::now();
    let progress = c
        .maintenance("h1", "h2", Some(pb::MaintenancePolicy::Migrate), BOUND, |_| false)
        .unwrap_or_else(|e| panic!("{e}; logs:\n{}", c.logs()));
    let back = wait_running_on(&c, 0, "h1", "m1", &uuid);
    let moved_in = asked.elapsed();
    let (both, events) = {
        let s = sampler.seen.lock().unwrap();
        (s.both_running.clone(), s.events.clone())
    };
    drop(sampler);
    assert!(both.is_empty(), "m1 ran on two hosts during maintenance: {both:?}");
    assert_eq!(back, DomainState::Running(RunningReason::Unpaused), "resumed on h1, not booted");
    assert_eq!(c.qemu[0].read_keyboard_buffer("m1"), "tan", "the same guest after maintenance");
    let steps: BTreeMap<i32, String> = progress
        .iter()
        .filter_map(|m| match &m.progress {
            Some(pb::maintenance_progress::Progress::Vm(v)) => Some((v.step, format!("{} {}", v.host, v.detail))),
            _ => None,
        })
        .collect();
    eprintln!("maintenance progress: {progress:?}");
    assert!(steps.contains_key(&(pb::MaintenanceStep::Migrated as i32)), "no migrated step: {steps:?}");
    assert!(!steps.contains_key(&(pb::MaintenanceStep::ShuttingDown as i32)), "it was shut down: {steps:?}");
    let elsewhere = steps.get(&(pb::MaintenanceStep::RunningElsewhere as i32)).cloned().unwrap_or_default();
    assert!(elsewhere.contains("h1") && elsewhere.contains("live-migrated"), "{elsewhere}");
    let paused = events.iter().filter(|(i, e, _)| *i == 1 && e.kind == EventKind::Suspended).map(|x| x.2).next_back();
    let resumed = events.iter().find(|(i, e, _)| *i == 0 && e.kind == EventKind::Resumed).map(|x| x.2);
    let (Some(paused), Some(resumed)) = (paused, resumed) else { panic!("no pause/resume pair: {events:?}") };
    assert!(resumed > paused);
    let Some(pb::maintenance_progress::Progress::Done(done)) = &progress.last().and_then(|m| m.progress.clone()) else {
        panic!("no verdict: {progress:?}")
    };
    assert!(done.complete, "{done:?}");
    eprintln!(
        "MEASURED maintenance of h2 (migrate): m1 running on h1 {} ms after the request; downtime {} ms; verdict: {}",
        moved_in.as_millis(),
        (resumed - paused).as_millis(),
        done.summary
    );
}
