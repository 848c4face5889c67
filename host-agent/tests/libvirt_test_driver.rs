//! The libvirt adapter against libvirt's real test driver.
//!
//! Every test writes its own host description (`<node>` with domains) into a temporary
//! directory and connects to `test:///<that file>`: each connection gets a private copy,
//! so tests running in parallel never see each other's domains.

use std::path::PathBuf;
use std::time::Duration;

use tandem_host::hypervisor::libvirt::LibvirtHypervisor;
use tandem_host::hypervisor::{
    DomainEvent, DomainState, EventKind, EventReason, Hypervisor, HypervisorError, MigrationMode, RunningReason,
    ShutoffReason, StopCause,
};
use tokio::sync::broadcast;

const ALPHA_UUID: &str = "11111111-1111-4111-8111-111111111111";
const BETA_UUID: &str = "22222222-2222-4222-8222-222222222222";
/// Generous bound for an event to arrive; the test driver delivers them in milliseconds.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A simulated hypervisor: a host file in its own temporary directory.
struct TestHost {
    dir: tempfile::TempDir,
    uri: String,
}

impl TestHost {
    /// A host with 8 CPUs and 8 GiB, running `alpha` (2 vCPUs, 128 of 256 MiB) and with
    /// `beta` defined but off.
    fn new() -> TestHost {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("host.xml");
        let xml = format!(
            r#"<node>
  <cpu>
    <nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>2</threads>
    <active>8</active><mhz>2400</mhz><model>i686</model>
  </cpu>
  <memory>8388608</memory>
  <domain type='test'>
    <name>alpha</name>
    <uuid>{ALPHA_UUID}</uuid>
    <memory>262144</memory>
    <currentMemory>131072</currentMemory>
    <vcpu>2</vcpu>
    <os><type arch='i686'>hvm</type></os>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>beta</name>
    <uuid>{BETA_UUID}</uuid>
    <memory>131072</memory>
    <vcpu>1</vcpu>
    <os><type arch='i686'>hvm</type></os>
    <test:runstate>5</test:runstate>
  </domain>
</node>
"#
        );
        std::fs::write(&path, xml).expect("write host file");
        let uri = format!("test://{}", path.display());
        TestHost { dir, uri }
    }

    async fn connect(&self) -> LibvirtHypervisor {
        LibvirtHypervisor::connect(&self.uri).await.expect("connect to the test driver")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn domain_xml(name: &str, uuid: &str) -> String {
    format!(
        "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory>65536</memory>\
         <vcpu>1</vcpu><os><type arch='i686'>hvm</type></os></domain>"
    )
}

/// The next event for `name`, skipping other domains' events; fails after EVENT_TIMEOUT.
async fn next_event(rx: &mut broadcast::Receiver<DomainEvent>, name: &str) -> DomainEvent {
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(event) if event.name == name => return event,
                Ok(_) => continue,
                Err(e) => panic!("event channel failed: {e}"),
            }
        }
    };
    tokio::time::timeout(EVENT_TIMEOUT, wait)
        .await
        .unwrap_or_else(|_| panic!("no event for {name} within {EVENT_TIMEOUT:?}"))
}

#[tokio::test]
async fn lists_the_domains_of_the_host_file_with_state_memory_and_vcpus() {
    let host = TestHost::new();
    let hv = host.connect().await;
    assert_eq!(hv.uri(), host.uri);

    let domains = hv.list_domains().await.expect("list");
    let names: Vec<&str> = domains.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta"]);

    let alpha = &domains[0];
    assert_eq!(alpha.uuid.to_string(), ALPHA_UUID);
    // The test driver loads running domains from the file without a reason.
    assert!(alpha.state.is_running(), "{:?}", alpha.state);
    assert_eq!(alpha.memory_kib, 131072);
    assert_eq!(alpha.max_memory_kib, 262144);
    assert_eq!(alpha.vcpus, 2);
    assert!(alpha.persistent);

    let beta = &domains[1];
    assert_eq!(beta.uuid.to_string(), BETA_UUID);
    assert!(beta.state.is_off(), "beta should be off: {:?}", beta.state);
    assert_eq!(beta.vcpus, 1);

    // Lookup by UUID finds the same domain as by name.
    let by_uuid = hv.domain_info(BETA_UUID).await.expect("lookup by UUID");
    assert_eq!(by_uuid.name, "beta");

    let capacity = hv.capacity().await.expect("capacity");
    assert_eq!(capacity.cpus, 8);
    assert_eq!(capacity.cpu_mhz, 2400);
    assert_eq!(capacity.total_memory_kib, 8388608);
    // The test driver keeps no NUMA cells for a custom host file, so it cannot say.
    assert_eq!(capacity.free_memory_kib, None);
}

#[tokio::test]
async fn define_start_shutdown_destroy_undefine_round_trip() {
    let host = TestHost::new();
    let hv = host.connect().await;
    let uuid = "33333333-3333-4333-8333-333333333333";

    let info = hv.define(&domain_xml("gamma", uuid)).await.expect("define");
    assert_eq!(info.name, "gamma");
    assert_eq!(info.uuid.to_string(), uuid);
    assert!(info.state.is_off());
    assert_eq!(info.memory_kib, 65536);
    let xml = hv.domain_xml("gamma").await.expect("xml");
    assert!(xml.contains("<name>gamma</name>") && xml.contains(uuid), "{xml}");

    hv.start("gamma").await.expect("start");
    assert_eq!(hv.state("gamma").await.unwrap(), DomainState::Running(RunningReason::Booted));

    hv.shutdown("gamma").await.expect("shutdown");
    let state = hv.state("gamma").await.unwrap();
    assert_eq!(state, DomainState::Shutoff(ShutoffReason::Shutdown));
    assert_eq!(state.stop_cause(), Some(StopCause::Shutdown));
    assert!(!state.stop_cause().unwrap().is_failure());

    hv.start(uuid).await.expect("start by UUID");
    hv.destroy("gamma").await.expect("destroy");
    let state = hv.state("gamma").await.unwrap();
    assert_eq!(state, DomainState::Shutoff(ShutoffReason::Destroyed));
    assert_eq!(state.stop_cause(), Some(StopCause::Destroyed));

    hv.start("gamma").await.expect("start again");
    hv.crash_dump("gamma", host.path("gamma.core").to_str().unwrap()).await.expect("crash dump");
    let state = hv.state("gamma").await.unwrap();
    assert_eq!(state, DomainState::Shutoff(ShutoffReason::Crashed));
    assert!(state.stop_cause().unwrap().is_failure());

    hv.undefine("gamma").await.expect("undefine");
    let names: Vec<String> = hv.list_domains().await.unwrap().into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert!(matches!(hv.state("gamma").await, Err(HypervisorError::NoSuchDomain { .. })));
}

#[tokio::test]
async fn lifecycle_events_arrive_in_order_through_the_channel() {
    let host = TestHost::new();
    let hv = host.connect().await;
    let mut rx = hv.subscribe();

    hv.define(&domain_xml("delta", "44444444-4444-4444-8444-444444444444")).await.unwrap();
    hv.start("delta").await.unwrap();
    hv.shutdown("delta").await.unwrap();
    hv.start("delta").await.unwrap();
    hv.destroy("delta").await.unwrap();
    hv.start("delta").await.unwrap();
    hv.crash_dump("delta", host.path("delta.core").to_str().unwrap()).await.unwrap();
    hv.undefine("delta").await.unwrap();

    let expected = [
        (EventKind::Defined, EventReason::Added, None),
        (EventKind::Started, EventReason::Booted, None),
        (EventKind::Stopped, EventReason::Shutdown, Some(StopCause::Shutdown)),
        (EventKind::Started, EventReason::Booted, None),
        (EventKind::Stopped, EventReason::Destroyed, Some(StopCause::Destroyed)),
        (EventKind::Started, EventReason::Booted, None),
        (EventKind::Stopped, EventReason::Crashed, Some(StopCause::Crashed)),
        (EventKind::Undefined, EventReason::Removed, None),
    ];
    for (i, (kind, reason, cause)) in expected.into_iter().enumerate() {
        let event = next_event(&mut rx, "delta").await;
        assert_eq!((event.kind, event.reason), (kind, reason), "event #{i}: {event:?}");
        assert_eq!(event.stop_cause(), cause, "event #{i}: {event:?}");
        assert_eq!(event.uuid.to_string(), "44444444-4444-4444-8444-444444444444");
    }

    // A domain from the host file reports through the same channel.
    hv.destroy("alpha").await.unwrap();
    let event = next_event(&mut rx, "alpha").await;
    assert_eq!((event.kind, event.reason), (EventKind::Stopped, EventReason::Destroyed));
    assert_eq!(event.uuid.to_string(), ALPHA_UUID);
}

#[tokio::test]
async fn two_hypervisors_on_two_files_do_not_see_each_other() {
    let (host_a, host_b) = (TestHost::new(), TestHost::new());
    let (a, b) = (host_a.connect().await, host_b.connect().await);
    let mut rx_b = b.subscribe();

    a.define(&domain_xml("only-on-a", "55555555-5555-4555-8555-555555555555")).await.unwrap();
    a.destroy("alpha").await.unwrap();
    let mut rx_a = a.subscribe();
    a.start("only-on-a").await.unwrap();
    // A's own event arrives, so a leaked event would have arrived at B by now too.
    next_event(&mut rx_a, "only-on-a").await;

    assert!(matches!(b.domain_info("only-on-a").await, Err(HypervisorError::NoSuchDomain { .. })));
    assert!(b.state("alpha").await.unwrap().is_running());
    assert_eq!(a.state("alpha").await.unwrap(), DomainState::Shutoff(ShutoffReason::Destroyed));
    assert!(matches!(rx_b.try_recv(), Err(broadcast::error::TryRecvError::Empty)), "B got an event of A");

    // Two connections to the same file are independent copies as well.
    let a2 = host_a.connect().await;
    assert!(matches!(a2.domain_info("only-on-a").await, Err(HypervisorError::NoSuchDomain { .. })));
    assert!(a2.state("alpha").await.unwrap().is_running());
}

#[tokio::test]
async fn migration_on_the_test_driver_is_unsupported() {
    let (source, dest) = (TestHost::new(), TestHost::new());
    let hv = source.connect().await;

    let err = hv.migrate("alpha", &dest.uri, MigrationMode::Live).await.unwrap_err();
    assert!(matches!(err, HypervisorError::Unsupported { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("live migration") && text.contains(&source.uri), "{text}");

    let err = hv.migrate("beta", &dest.uri, MigrationMode::Offline).await.unwrap_err();
    assert!(matches!(err, HypervisorError::Unsupported { .. }), "{err:?}");

    // Nothing moved.
    assert!(hv.state("alpha").await.unwrap().is_running());
    assert!(hv.domain_info("beta").await.is_ok());
}

#[tokio::test]
async fn errors_are_typed_and_say_what_and_where() {
    let host = TestHost::new();
    let hv = host.connect().await;

    for (op, result) in [
        ("start", hv.start("nope").await),
        ("shutdown", hv.shutdown("nope").await),
        ("destroy", hv.destroy("nope").await),
        ("undefine", hv.undefine("nope").await),
        ("state", hv.state("nope").await.map(drop)),
        ("xml", hv.domain_xml("nope").await.map(drop)),
        ("migrate", hv.migrate("nope", "test:///default", MigrationMode::Live).await),
    ] {
        let err = result.expect_err(op);
        assert!(matches!(err, HypervisorError::NoSuchDomain { .. }), "{op}: {err:?}");
        let text = err.to_string();
        assert!(text.contains("'nope'") && text.contains(&host.uri), "{op}: {text}");
    }
    let missing_uuid = "99999999-9999-4999-8999-999999999999";
    let err = hv.state(missing_uuid).await.unwrap_err();
    assert!(matches!(&err, HypervisorError::NoSuchDomain { domain, .. } if domain == missing_uuid), "{err:?}");

    for bad in
        ["this is not XML", "<domain type='test'><name>x</name>", "<domain type='test'><memory>1</memory></domain>"]
    {
        let err = hv.define(bad).await.expect_err(bad);
        assert!(matches!(err, HypervisorError::InvalidXml { .. }), "{bad}: {err:?}");
        let source = std::error::Error::source(&err).expect("the parse error is kept as the source");
        assert!(!source.to_string().is_empty());
    }

    let err = hv.start("alpha").await.unwrap_err();
    assert!(matches!(err, HypervisorError::InvalidState { op: "start", .. }), "{err:?}");

    let missing = host.path("missing.xml");
    let err = LibvirtHypervisor::connect(&format!("test://{}", missing.display())).await.unwrap_err();
    assert!(matches!(err, HypervisorError::Connect { .. }), "{err:?}");
}

/// A libvirt call that hangs (here: connecting to a peer that accepts and never answers)
/// must not stop other tasks on a single-threaded runtime.
#[test]
fn a_hung_libvirt_call_does_not_block_the_runtime() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let host = TestHost::new();
    let uri = format!("test+tcp://127.0.0.1:{port}{}", host.path("host.xml").display());

    // Accepts and holds the connection without ever answering libvirt's RPC, until told to
    // let go or for 8 s at most (so that a blocking implementation fails instead of hanging).
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let acceptor = std::thread::spawn(move || {
        let (socket, _) = listener.accept().expect("accept");
        held_tx.send(()).unwrap();
        let _ = release_rx.recv_timeout(Duration::from_secs(8));
        drop(socket);
    });

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (ticks, outcome) = runtime.block_on(async {
        let ticker = tokio::spawn(async {
            let mut ticks = 0u32;
            let mut interval = tokio::time::interval(Duration::from_millis(20));
            loop {
                interval.tick().await;
                ticks += 1;
                if ticks == 50 {
                    return ticks;
                }
            }
        });
        let outcome = tokio::time::timeout(Duration::from_secs(3), LibvirtHypervisor::connect(&uri)).await;
        (ticker.await.unwrap(), outcome)
    });
    held_rx.recv_timeout(Duration::from_secs(5)).expect("libvirt connected to the silent peer");
    // The ticker completed its 50 ticks (~1 s) while the connect hung, and the connect was
    // still hanging when the 3 s bound fired.
    assert_eq!(ticks, 50);
    assert!(outcome.is_err(), "connect to a silent peer returned: {:?}", outcome.map(|r| r.map(drop)));

    // Closing the socket makes the blocked libvirt call fail, which frees its thread.
    release_tx.send(()).unwrap();
    acceptor.join().unwrap();
    runtime.shutdown_timeout(Duration::from_secs(10));
}

#[tokio::test]
async fn suspend_and_resume_pause_and_unpause_a_running_domain() {
    use tandem_host::hypervisor::PausedReason;
    let host = TestHost::new();
    let hv = host.connect().await;
    let mut events = hv.subscribe();

    hv.suspend("alpha").await.expect("suspend");
    assert_eq!(hv.state("alpha").await.unwrap(), DomainState::Paused(PausedReason::User));
    let e = next_event(&mut events, "alpha").await;
    assert_eq!(e.kind, EventKind::Suspended, "{e:?}");
    // A paused domain holds its memory: it is neither running nor off.
    let paused = hv.state(ALPHA_UUID).await.unwrap();
    assert!(!paused.is_running() && !paused.is_off(), "{paused:?}");

    let again = hv.suspend("alpha").await.unwrap_err();
    assert!(matches!(again, HypervisorError::InvalidState { op: "suspend", .. }), "{again:?}");
    assert!(format!("{again} {:?}", std::error::Error::source(&again)).contains("already paused"), "{again:?}");

    hv.resume(ALPHA_UUID).await.expect("resume");
    assert_eq!(hv.state("alpha").await.unwrap(), DomainState::Running(RunningReason::Unpaused));
    let e = next_event(&mut events, "alpha").await;
    assert_eq!(e.kind, EventKind::Resumed, "{e:?}");

    let again = hv.resume("alpha").await.unwrap_err();
    assert!(matches!(again, HypervisorError::InvalidState { op: "resume", .. }), "{again:?}");
    // An off domain can be neither.
    assert!(matches!(hv.suspend("beta").await.unwrap_err(), HypervisorError::InvalidState { .. }));
    assert!(matches!(hv.resume("beta").await.unwrap_err(), HypervisorError::InvalidState { .. }));
    assert!(matches!(hv.suspend("gamma").await.unwrap_err(), HypervisorError::NoSuchDomain { .. }));
    // The test driver's domains live in this process: a dead agent means dead VMs.
    assert!(hv.self_fence_stops_vms());
    assert!(!tandem_host::hypervisor::self_fence_stops_vms("qemu:///system"));
}

#[tokio::test]
async fn a_paused_domain_is_destroyed_and_then_reported_shut_off_as_destroyed() {
    let host = TestHost::new();
    let hv = host.connect().await;
    hv.suspend("alpha").await.expect("suspend");
    // What a fence does: destroy (a paused guest cannot react to anything gentler), then
    // confirm from the hypervisor's own state.
    hv.destroy("alpha").await.expect("destroy a paused domain");
    let state = hv.state("alpha").await.unwrap();
    assert_eq!(state, DomainState::Shutoff(ShutoffReason::Destroyed));
    assert_eq!(state.stop_cause(), Some(StopCause::Destroyed));
    let again = hv.destroy("alpha").await.unwrap_err();
    assert!(matches!(again, HypervisorError::InvalidState { op: "destroy", .. }), "{again:?}");
}
