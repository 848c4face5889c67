//! The libvirt adapter against two real libvirt daemons with QEMU (TCG), each in a network
//! namespace of its own (`tandem_testkit::qemu`): live migration, checked through each
//! daemon's own view (`virsh`) and through the guest's memory (keys typed before the
//! migration are still in the BIOS keyboard buffer after it).

use std::time::{Duration, Instant};

use tandem_host::hypervisor::libvirt::LibvirtHypervisor;
use tandem_host::hypervisor::{
    DomainEvent, DomainState, EventKind, HandoverMark, Hypervisor, HypervisorError, MigrationMode,
};
use tandem_testkit::qemu::{QemuPair, idle_domain_xml, qemu_or_skip};
use tokio::sync::broadcast;

const UUID: &str = "7a000000-0000-4000-8000-000000000001";
/// Generous bound for a state change; a 32 MiB guest migrates in well under a second.
const BOUND: Duration = Duration::from_secs(30);

async fn wait_state(hv: &LibvirtHypervisor, what: &str, ok: impl Fn(Option<&DomainState>) -> bool) -> DomainState {
    let start = Instant::now();
    loop {
        let state = match hv.state(UUID).await {
            Ok(s) => Some(s),
            Err(HypervisorError::NoSuchDomain { .. }) => None,
            Err(e) => panic!("reading the state on {}: {e}", hv.uri()),
        };
        if ok(state.as_ref()) {
            return state.unwrap_or(DomainState::NoState);
        }
        assert!(start.elapsed() < BOUND, "{what}: state still {state:?} on {}", hv.uri());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first event of `kind` for the test domain, with when it arrived.
async fn next_event(rx: &mut broadcast::Receiver<DomainEvent>, kind: EventKind) -> (DomainEvent, Instant) {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(e)) if e.uuid.to_string() == UUID && e.kind == kind => return (e, Instant::now()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("event stream: {e}"),
            Err(_) => panic!("no {kind:?} event within {BOUND:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_between_two_real_daemons() {
    if !qemu_or_skip("live_migration_between_two_real_daemons") {
        return;
    }
    let pair = tokio::task::spawn_blocking(QemuPair::start).await.unwrap();
    let a = LibvirtHypervisor::connect(&pair.a.uri()).await.expect("connect to a");
    let b = LibvirtHypervisor::connect(&pair.b.uri()).await.expect("connect to b");

    // A running guest with something in its memory.
    a.define(&idle_domain_xml("mig", UUID, 32)).await.expect("define on a");
    a.start(UUID).await.expect("start on a");
    wait_state(&a, "running on a", |s| s.is_some_and(DomainState::is_running)).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // SeaBIOS gives up booting
    pair.a.send_keys("mig", &["KEY_T", "KEY_A", "KEY_N"]);
    let typed = wait_keys(&pair.a, "mig", "tan").await;
    eprintln!("keyboard buffer on a before the migration: {typed:?}");

    // 1. Live: running at the destination, gone (undefined) at the source.
    let t0 = Instant::now();
    a.migrate(UUID, &pair.b.migration_uri(), MigrationMode::Live).await.expect("live migration a -> b");
    let took = t0.elapsed();
    eprintln!("live migration a -> b took {took:?}");
    let on_b = wait_state(&b, "running on b", |s| s.is_some_and(DomainState::is_running)).await;
    eprintln!("state on b: {on_b:?}");
    assert!(matches!(a.state(UUID).await, Err(HypervisorError::NoSuchDomain { .. })), "still defined on a");
    let list_a = pair.a.virsh(&["list", "--all", "--name"]);
    assert!(!list_a.contains("mig"), "virsh on a still lists it: {list_a}");
    let list_b = pair.b.virsh(&["list", "--name"]);
    assert!(list_b.lines().any(|l| l.trim() == "mig"), "virsh on b does not list it running: {list_b}");
    let info = b.domain_info(UUID).await.unwrap();
    assert!(info.persistent, "PERSIST_DEST: the definition moved along");
    assert_eq!(pair.b.read_keyboard_buffer("mig"), "tan", "the guest's memory came along");
    assert!(pair.b.qemu_log("mig").contains("-incoming"), "b's QEMU was started for an incoming migration");

    // 2. Live, paused at the destination, under a handover mark: b -> a. The copy on a stays
    //    paused (never runs) until resumed; the downtime is from the source's last vCPU
    //    instruction (its "suspended" event) to the resume at the destination.
    let mark = HandoverMark { from: "host-b".into(), token: 7 };
    b.set_handover_mark(UUID, Some(&mark)).await.expect("mark on b");
    assert_eq!(b.handover_mark(UUID).await.unwrap(), Some(mark.clone()));
    let (mut ev_a, mut ev_b) = (a.subscribe(), b.subscribe());
    let t0 = Instant::now();
    b.migrate(UUID, &pair.a.migration_uri(), MigrationMode::LivePaused).await.expect("paused migration b -> a");
    let took = t0.elapsed();
    let (_, paused_at) = next_event(&mut ev_b, EventKind::Suspended).await;
    let state = wait_state(&a, "paused on a", |s| s.is_some()).await;
    assert!(matches!(state, DomainState::Paused(_)), "LivePaused leaves the copy paused: {state:?}");
    assert!(matches!(b.state(UUID).await, Err(HypervisorError::NoSuchDomain { .. })), "still on b");
    assert_eq!(a.handover_mark(UUID).await.unwrap(), Some(mark), "the mark travelled with the migration");
    // Still paused a moment later: nothing but a resume lets it run.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(a.state(UUID).await.unwrap(), DomainState::Paused(_)));
    a.resume(UUID).await.expect("resume on a");
    let (_, resumed_at) = next_event(&mut ev_a, EventKind::Resumed).await;
    let downtime = resumed_at.saturating_duration_since(paused_at);
    eprintln!(
        "paused migration b -> a took {took:?}; b suspended -> a resumed {downtime:?} (including the test's 300 ms \
         check that the copy stays paused)"
    );
    wait_state(&a, "running on a", |s| s.is_some_and(DomainState::is_running)).await;
    a.set_handover_mark(UUID, None).await.expect("remove the mark");
    assert_eq!(a.handover_mark(UUID).await.unwrap(), None);
    assert_eq!(pair.a.read_keyboard_buffer("mig"), "tan", "still the same guest memory");

    // 3. An unreachable destination: an error, and the guest keeps running where it was.
    let err = a.migrate(UUID, "qemu+tcp://192.0.2.1:1/system", MigrationMode::Live).await.unwrap_err();
    eprintln!("migration to an unreachable host: {err}");
    assert!(a.state(UUID).await.unwrap().is_running(), "the source keeps the guest running");

    // 4. Offline: a domain that is off moves its definition only; defined at the
    //    destination (off), gone at the source.
    a.destroy(UUID).await.unwrap();
    wait_state(&a, "off on a", |s| s.is_some_and(DomainState::is_off)).await;
    a.migrate(UUID, &pair.b.migration_uri(), MigrationMode::Offline).await.expect("offline migration a -> b");
    assert!(matches!(a.state(UUID).await, Err(HypervisorError::NoSuchDomain { .. })), "still defined on a");
    let info = b.domain_info(UUID).await.expect("defined on b");
    assert!(info.persistent, "offline migration defines it persistently at the destination");
    assert!(b.state(UUID).await.unwrap().is_off(), "and leaves it off");
    let list_b = pair.b.virsh(&["list", "--all", "--name"]);
    assert!(list_b.lines().any(|l| l.trim() == "mig"), "virsh on b does not list it: {list_b}");
    b.undefine(UUID).await.unwrap();
}

/// Polls the guest's keyboard buffer until it holds `want` (the BIOS takes the keys from
/// the keyboard controller on its next interrupt).
async fn wait_keys(daemon: &tandem_testkit::qemu::QemuDaemon, domain: &str, want: &str) -> String {
    let start = Instant::now();
    loop {
        let got = daemon.read_keyboard_buffer(domain);
        if got == want {
            return got;
        }
        assert!(start.elapsed() < BOUND, "keyboard buffer holds {got:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
