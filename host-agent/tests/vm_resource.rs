//! The `kind = "vm"` resource against libvirt's real test driver.
//!
//! Every test has its own simulated hypervisor: a host file without domains in a temporary
//! directory, reached as `test:///<that file>` (each connection gets a private copy). The
//! assertions read libvirt's own view of the domains, not the resource's.
//!
//! Two fakes: [`IgnoresAcpi`], the real adapter with `shutdown` swallowed, because the
//! test driver powers a guest off instantly on ACPI and a guest that ignores the power
//! button cannot be had otherwise; and [`ScriptedGuest`], a guest agent behind the
//! `GuestShutdown` trait for the order of a planned stop (the real guest link has its own
//! tests with the real binaries).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_config::{DiskResource, ResourceKind, VmResource as VmConfig};
use tandem_host::hypervisor::libvirt::{LibvirtHypervisor, LibvirtOptions};
use tandem_host::hypervisor::{
    BoxFuture, ConnectionState, DomainEvent, DomainInfo, DomainState, EventKind, EventReason, HandoverMark,
    HostCapacity, Hypervisor, HypervisorError, MigrationMode, PausedReason, RunningReason, ShutoffReason,
};
use tandem_host::vm::{
    GuestPrepared, GuestShutdown, HostResources, Migration, VmActivity, VmDefinition, VmResource, VmStep,
};
use tandem_node::resources::{
    HandoverReason, HandoverTarget, Health, Resource, ResourceEnv, ResourceError, ResourceFactory, StartContext,
    StopContext, StopOutcome,
};
use tandem_testkit::{ChildGuard, require_program};
use tokio::sync::broadcast;

const UUID: &str = "7a3c1f52-9b4e-4d21-8c6a-5e0f2b9d8a41";
/// Generous bound for anything the test driver does (it answers in milliseconds).
const BOUND: Duration = Duration::from_secs(20);

/// A simulated hypervisor host: a host file with no domains.
struct TestHost {
    dir: tempfile::TempDir,
    uri: String,
}

impl TestHost {
    fn new() -> TestHost {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("host.xml");
        std::fs::write(&path, HOST_XML).expect("write host file");
        let uri = format!("test://{}", path.display());
        TestHost { dir, uri }
    }

    async fn connect(&self) -> Arc<LibvirtHypervisor> {
        Arc::new(LibvirtHypervisor::connect(&self.uri).await.expect("connect to the test driver"))
    }

    /// Writes a domain XML file and returns its path.
    fn domain_file(&self, file: &str, xml: &str) -> PathBuf {
        let path = self.dir.path().join(file);
        std::fs::write(&path, xml).expect("write domain file");
        path
    }
}

const HOST_XML: &str = r#"<node>
  <cpu>
    <nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads>
    <active>2</active><mhz>2000</mhz><model>i686</model>
  </cpu>
  <memory>8388608</memory>
</node>
"#;

fn domain_xml(name: &str, memory: &str) -> String {
    format!(
        "<domain type='test'>\n  <name>{name}</name>\n  <uuid>{UUID}</uuid>\n  {memory}\n  <vcpu>2</vcpu>\n  \
         <os><type arch='i686'>hvm</type></os>\n</domain>\n"
    )
}

fn vm_config(domain: PathBuf, shutdown_timeout: Duration) -> VmConfig {
    VmConfig {
        domain,
        start_timeout: BOUND,
        shutdown_timeout,
        prepare_timeout: BOUND,
        link_key_file: None,
        guest_cluster: None,
        vsock_uds: None,
        guest_heartbeat_timeout: None,
    }
}

fn spec(name: &str, kind: ResourceKind) -> tandem_config::Resource {
    tandem_config::Resource { name: name.to_string(), depends_on: Vec::new(), kind }
}

fn ctx() -> StartContext {
    StartContext::new("web", "vm", 7)
}

/// A VM resource `web/vm` for domain `web` (512 MiB) on `hv`, built through the factory.
fn web_vm(host: &TestHost, hv: Arc<dyn Hypervisor>, shutdown_timeout: Duration) -> VmResource {
    let file = host.domain_file("web.xml", &domain_xml("web", "<memory unit='MiB'>512</memory>"));
    let factory = HostResources::new(hv);
    let spec = spec("vm", ResourceKind::Vm(vm_config(file, shutdown_timeout)));
    factory.build_vm("web", &spec, &ResourceEnv::new("host-a")).expect("build the VM resource")
}

/// Names of the domains the hypervisor has, running or defined.
async fn domains(hv: &dyn Hypervisor) -> Vec<DomainInfo> {
    hv.list_domains().await.expect("list domains")
}

fn is_missing<T: std::fmt::Debug>(result: Result<T, HypervisorError>) -> bool {
    matches!(result, Err(HypervisorError::NoSuchDomain { .. }))
}

/// Events of the VM up to and including the first one `stop` accepts; fails after BOUND.
/// libvirt delivers events from its own thread, so events of earlier operations may still
/// arrive after a subscription: they are collected, not mistaken for the one awaited.
async fn events_until(
    rx: &mut broadcast::Receiver<DomainEvent>,
    stop: impl Fn(&DomainEvent) -> bool,
) -> Vec<DomainEvent> {
    let wait = async {
        let mut seen = Vec::new();
        loop {
            match rx.recv().await {
                Ok(event) if event.uuid.to_string() == UUID || stop(&event) => {
                    let done = stop(&event);
                    seen.push(event);
                    if done {
                        return seen;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("event channel failed: {e}"),
            }
        }
    };
    tokio::time::timeout(BOUND, wait).await.expect("the awaited event")
}

/// The first `Stopped` event of the VM and whether its definition was removed after it.
async fn how_it_stopped(rx: &mut broadcast::Receiver<DomainEvent>) -> (EventReason, bool) {
    let stopped = events_until(rx, |e| e.kind == EventKind::Stopped).await.pop().unwrap();
    let undefined = events_until(rx, |e| e.kind == EventKind::Undefined).await;
    (stopped.reason, undefined.len() == 1)
}

/// Events of the VM that happened before now: defines a marker domain and collects the
/// VM's events until the marker's (events are delivered in order).
async fn events_so_far(hv: &dyn Hypervisor, rx: &mut broadcast::Receiver<DomainEvent>) -> Vec<DomainEvent> {
    let marker = "0badc0de-0000-4000-8000-000000000001";
    hv.define(&format!(
        "<domain type='test'><name>marker</name><uuid>{marker}</uuid><memory>1024</memory>\
         <os><type arch='i686'>hvm</type></os></domain>"
    ))
    .await
    .expect("define the marker");
    let mut seen = events_until(rx, |e| e.uuid.to_string() == marker).await;
    seen.pop();
    hv.undefine(marker).await.expect("undefine the marker");
    seen
}

#[tokio::test]
async fn start_runs_the_vm_once_and_stop_powers_it_off_and_undefines_it() {
    let host = TestHost::new();
    let hv = host.connect().await;
    let vm = web_vm(&host, hv.clone(), BOUND);
    assert_eq!(vm.kind(), "vm");
    let def = vm.definition();
    assert_eq!((def.name.as_str(), def.uuid.to_string().as_str(), def.memory_mib, def.vcpus), ("web", UUID, 512, 2));

    assert_eq!(vm.check().await, Health::Stopped, "nothing is defined yet");

    let mut events = hv.subscribe();
    vm.start(&ctx()).await.expect("start");
    let kinds: Vec<_> = events_so_far(hv.as_ref(), &mut events).await.iter().map(|e| (e.kind, e.reason)).collect();
    assert_eq!(kinds, [(EventKind::Defined, EventReason::Added), (EventKind::Started, EventReason::Booted)]);
    let info = hv.domain_info(UUID).await.expect("the domain exists after start");
    assert_eq!(info.name, "web");
    assert_eq!(info.state, DomainState::Running(RunningReason::Booted));
    assert_eq!(info.max_memory_kib, 512 * 1024);
    assert!(info.persistent);
    assert_eq!(vm.check().await, Health::Running);

    // Starting a running VM changes nothing: still one domain, still the same boot.
    vm.start(&ctx()).await.expect("start again");
    assert_eq!(domains(hv.as_ref()).await.len(), 1);
    let acted = events_so_far(hv.as_ref(), &mut events).await;
    assert!(acted.is_empty(), "the second start acted: {acted:?}");
    assert_eq!(vm.check().await, Health::Running);

    vm.stop(false).await.expect("stop");
    // A clean ACPI power-off (not a destroy), then the definition went away.
    assert_eq!(how_it_stopped(&mut events).await, (EventReason::Shutdown, true), "not ACPI, or not undefined");
    assert!(is_missing(hv.domain_info(UUID).await), "the domain is still defined");
    assert!(domains(hv.as_ref()).await.is_empty());
    assert_eq!(vm.check().await, Health::Stopped);

    vm.stop(false).await.expect("stopping a stopped VM succeeds");
    vm.stop(true).await.expect("force-stopping a stopped VM succeeds");
}

#[tokio::test]
async fn start_replaces_a_stale_definition_with_the_clusters() {
    let host = TestHost::new();
    let hv = host.connect().await;
    // Somebody left an older definition (same UUID, 128 MiB) defined here.
    hv.define(&domain_xml("web", "<memory unit='MiB'>128</memory>")).await.expect("define the stale copy");
    let vm = web_vm(&host, hv.clone(), BOUND);

    vm.start(&ctx()).await.expect("start");
    let info = hv.domain_info(UUID).await.unwrap();
    assert!(info.state.is_running());
    assert_eq!(info.max_memory_kib, 512 * 1024, "the cluster's definition was not applied");
    vm.stop(true).await.unwrap();
}

#[tokio::test]
async fn a_start_after_the_lease_ended_does_not_let_the_guest_run() {
    // The lease ends while the start is under way (the agent was paused after the runtime's
    // own check): the step that would let the guest run is refused and nothing is left.
    let host = TestHost::new();
    let hv = host.connect().await;
    let file = host.domain_file("web.xml", &domain_xml("web", "<memory unit='MiB'>512</memory>"));
    let spec = spec("vm", ResourceKind::Vm(vm_config(file, BOUND)));
    let valid = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lease = {
        let valid = valid.clone();
        tandem_node::resources::LeaseCheck::new(Arc::new(move || valid.load(Ordering::SeqCst)))
    };
    let env = ResourceEnv::new("host-a").with_lease(lease);
    let vm = HostResources::new(hv.clone()).build_vm("web", &spec, &env).expect("build the VM resource");
    let err = vm.start(&ctx()).await.unwrap_err();
    assert!(format!("{err:?}").contains("lease is no longer valid"), "{err:?}");
    assert!(is_missing(hv.domain_info(UUID).await), "nothing is left defined or running");
    // With the lease valid, the same resource starts.
    valid.store(true, Ordering::SeqCst);
    vm.start(&ctx()).await.expect("start under a valid lease");
    assert!(hv.state(UUID).await.unwrap().is_running());
    vm.stop(true).await.expect("stop");
}

#[tokio::test]
async fn force_stop_destroys_at_once_and_undefines() {
    let host = TestHost::new();
    let hv = host.connect().await;
    let vm = web_vm(&host, hv.clone(), BOUND);
    vm.start(&ctx()).await.expect("start");

    let mut events = hv.subscribe();
    vm.stop(true).await.expect("force stop");
    assert_eq!(how_it_stopped(&mut events).await, (EventReason::Destroyed, true), "not destroyed, or not undefined");
    assert!(is_missing(hv.domain_info(UUID).await));
    assert_eq!(vm.check().await, Health::Stopped);
}

#[tokio::test]
async fn stops_outside_the_cluster_are_told_from_the_agents_own() {
    let host = TestHost::new();
    let hv = host.connect().await;
    let vm = web_vm(&host, hv.clone(), BOUND);

    // The guest powers itself off.
    vm.start(&ctx()).await.unwrap();
    hv.shutdown(UUID).await.unwrap();
    assert_eq!(hv.state(UUID).await.unwrap(), DomainState::Shutoff(ShutoffReason::Shutdown));
    assert_eq!(vm.check().await, Health::StoppedOutside("powered off from inside the guest".into()));
    // The agent's stop of an off VM cleans up, and from then on it is simply stopped.
    vm.stop(false).await.unwrap();
    assert!(is_missing(hv.domain_info(UUID).await));
    assert_eq!(vm.check().await, Health::Stopped);

    // An administrator's `virsh destroy`.
    vm.start(&ctx()).await.unwrap();
    hv.destroy(UUID).await.unwrap();
    assert_eq!(vm.check().await, Health::StoppedOutside("forced off through the hypervisor".into()));
    vm.stop(false).await.unwrap();
    assert_eq!(vm.check().await, Health::Stopped);

    // A crash is a failure, not a stop.
    vm.start(&ctx()).await.unwrap();
    hv.crash_dump(UUID, host.dir.path().join("web.core").to_str().unwrap()).await.unwrap();
    assert_eq!(hv.state(UUID).await.unwrap(), DomainState::Shutoff(ShutoffReason::Crashed));
    let health = vm.check().await;
    assert!(matches!(&health, Health::Failed(why) if why.contains("crashed")), "{health:?}");

    // Restarting after the crash works (the crashed definition is replaced) and clears it.
    vm.start(&ctx()).await.unwrap();
    assert_eq!(vm.check().await, Health::Running);

    // Undefined and destroyed by hand while the agent runs it: gone, maybe elsewhere.
    hv.undefine(UUID).await.unwrap();
    hv.destroy(UUID).await.unwrap();
    let health = vm.check().await;
    assert!(matches!(&health, Health::StoppedOutside(who) if who.contains("no longer defined")), "{health:?}");
}

#[tokio::test]
async fn definition_errors_name_the_file_and_the_problem() {
    let host = TestHost::new();
    let hv = host.connect().await;
    let factory = HostResources::new(hv.clone());
    let env = ResourceEnv::new("host-a");
    let build = |file: &str, xml: &str| {
        let path = host.domain_file(file, xml);
        let spec = spec("vm", ResourceKind::Vm(vm_config(path, BOUND)));
        factory.build("web", &spec, &env).map(drop)
    };

    let err = build("no-uuid.xml", "<domain type='test'><name>web</name><memory>1024</memory></domain>").unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ResourceError::Config { .. }), "{err:?}");
    assert!(text.contains("web/vm") && text.contains("no-uuid.xml") && text.contains("no <uuid>"), "{text}");

    let err =
        build("broken.xml", "<domain type='test'>\n  <name>web</name>\n  <uuid>x</uuid\n</domain>\n<").unwrap_err();
    let text = err.to_string();
    let file = host.dir.path().join("broken.xml");
    assert!(text.contains(&format!("{}:4:1:", file.display())), "no line:column in: {text}");
    assert!(text.contains("not well-formed"), "{text}");

    let err = factory
        .build("web", &spec("vm", ResourceKind::Vm(vm_config(host.dir.path().join("absent.xml"), BOUND))), &env)
        .map(drop)
        .unwrap_err();
    assert!(err.to_string().contains("absent.xml") && err.to_string().contains("cannot read"), "{err}");

    // Other kinds belong to the guest agent.
    let disk =
        DiskResource { device: None, mountpoint: None, fstype: None, fsck: true, directory: Some("/srv".into()) };
    let err = factory.build("web", &spec("data", ResourceKind::Disk(disk)), &env).map(drop).unwrap_err();
    assert!(matches!(err, ResourceError::Config { .. }), "{err:?}");
    assert!(err.to_string().contains("\"disk\"") && err.to_string().contains("tandem-guest"), "{err}");

    // Names that cannot be directory names are refused before anything else.
    let path = host.domain_file("ok.xml", &domain_xml("web", "<memory>1024</memory>"));
    let err = factory.build("web", &spec("../vm", ResourceKind::Vm(vm_config(path, BOUND))), &env).map(drop);
    assert!(matches!(err, Err(ResourceError::Config { .. })), "{err:?}");

    // Units and counts, from a file.
    for (memory, mib) in [
        ("<memory>2097152</memory>", 2048),
        ("<memory unit='KiB'>1048576</memory>", 1024),
        ("<memory unit='MiB'>3000</memory>", 3000),
        ("<memory unit='GiB'>4</memory>", 4096),
    ] {
        let def = VmDefinition::load(host.domain_file("units.xml", &domain_xml("web", memory))).unwrap();
        assert_eq!((def.memory_mib, def.vcpus), (mib, 2), "{memory}");
    }
}

#[tokio::test]
async fn a_definition_the_hypervisor_rejects_fails_the_start_and_leaves_nothing() {
    let host = TestHost::new();
    let hv = host.connect().await;
    // Well-formed, with name, UUID and memory, but with a typo only libvirt knows about.
    let xml = format!(
        "<domain type='test'><name>web</name><uuid>{UUID}</uuid><memory>65536</memory>\
         <on_poweroff>explode</on_poweroff><os><type arch='i686'>hvm</type></os></domain>"
    );
    let file = host.domain_file("web.xml", &xml);
    let vm = HostResources::new(hv.clone())
        .build_vm("web", &spec("vm", ResourceKind::Vm(vm_config(file, BOUND))), &ResourceEnv::new("host-a"))
        .expect("the file itself is fine");

    let err = vm.start(&ctx()).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ResourceError::Failed { op: "start", .. }), "{err:?}");
    assert!(text.contains("define of domain 'web'") && text.contains(&host.uri), "{text}");
    assert!(text.contains("on_poweroff"), "libvirt's own reason is missing: {text}");
    assert!(text.contains("nothing was left running"), "{text}");
    assert!(domains(hv.as_ref()).await.is_empty(), "something was left defined or running");
    assert_eq!(vm.check().await, Health::Stopped);
}

/// The real adapter, except that the guest ignores the ACPI power button.
#[derive(Debug)]
struct IgnoresAcpi {
    inner: Arc<LibvirtHypervisor>,
    presses: AtomicUsize,
}

impl Hypervisor for IgnoresAcpi {
    fn uri(&self) -> &str {
        self.inner.uri()
    }
    fn list_domains(&self) -> BoxFuture<'_, Result<Vec<DomainInfo>, HypervisorError>> {
        self.inner.list_domains()
    }
    fn domain_info<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<DomainInfo, HypervisorError>> {
        self.inner.domain_info(domain)
    }
    fn define<'a>(&'a self, xml: &'a str) -> BoxFuture<'a, Result<DomainInfo, HypervisorError>> {
        self.inner.define(xml)
    }
    fn undefine<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        self.inner.undefine(domain)
    }
    fn start<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        self.inner.start(domain)
    }
    fn shutdown<'a>(&'a self, _domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        self.presses.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
    fn destroy<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        self.inner.destroy(domain)
    }
    fn state<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<DomainState, HypervisorError>> {
        self.inner.state(domain)
    }
    fn domain_xml<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<String, HypervisorError>> {
        self.inner.domain_xml(domain)
    }
    fn migrate<'a>(
        &'a self,
        domain: &'a str,
        dest_uri: &'a str,
        mode: MigrationMode,
    ) -> BoxFuture<'a, Result<(), HypervisorError>> {
        self.inner.migrate(domain, dest_uri, mode)
    }
    fn capacity(&self) -> BoxFuture<'_, Result<HostCapacity, HypervisorError>> {
        self.inner.capacity()
    }
    fn subscribe(&self) -> broadcast::Receiver<DomainEvent> {
        self.inner.subscribe()
    }
}

/// Log output captured in memory, to check what the agent tells the administrator.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// Single-threaded runtime: the log subscriber below is set for this thread only.
#[tokio::test(flavor = "current_thread")]
async fn a_guest_that_ignores_acpi_is_destroyed_after_the_shutdown_timeout() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt().with_writer(logs.clone()).with_ansi(false).finish();
    let _logging = tracing::subscriber::set_default(subscriber);
    let host = TestHost::new();
    let real = host.connect().await;
    let hv = Arc::new(IgnoresAcpi { inner: real.clone(), presses: AtomicUsize::new(0) });
    let timeout = Duration::from_millis(600);
    let vm = web_vm(&host, hv.clone(), timeout);
    vm.start(&ctx()).await.expect("start");

    let mut events = real.subscribe();
    let began = Instant::now();
    vm.stop(false).await.expect("stop escalates instead of failing");
    let took = began.elapsed();

    assert_eq!(hv.presses.load(Ordering::SeqCst), 1, "the power button was not pressed first");
    assert!(took >= timeout, "destroyed after {took:?}, before the {timeout:?} grace");
    assert!(took < timeout + BOUND, "stop took {took:?}");
    assert_eq!(how_it_stopped(&mut events).await, (EventReason::Destroyed, true), "not destroyed, or not undefined");
    assert!(is_missing(real.domain_info(UUID).await), "the domain is still defined");
    assert_eq!(vm.check().await, Health::Stopped);

    let logs = logs.text();
    let warning = logs.lines().find(|l| l.contains("WARN")).unwrap_or_else(|| panic!("no warning logged:\n{logs}"));
    assert!(
        warning.contains("domain 'web' did not power off within 600 ms after ACPI shutdown; destroyed"),
        "{warning}"
    );
}

/// A private libvirt daemon serving only the built-in test driver (as in libvirt_reconnect).
fn start_libvirtd(dir: &Path) -> ChildGuard {
    let libvirtd = require_program("libvirtd", "libvirt-daemon", &[]);
    let run = dir.join("run");
    let empty = dir.join("no-drivers");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::create_dir_all(&empty).unwrap();
    let conf = dir.join("libvirtd.conf");
    std::fs::write(
        &conf,
        format!(
            "unix_sock_dir = \"{}\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n\
             unix_sock_rw_perms = \"0700\"\nlog_outputs = \"3:file:{}\"\n",
            run.display(),
            dir.join("libvirtd.log").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(libvirtd);
    cmd.arg("-f").arg(&conf).arg("-p").arg(dir.join("libvirtd.pid"));
    cmd.env("LIBVIRT_DRIVER_DIR", &empty);
    cmd.stdout(std::fs::File::create(dir.join("libvirtd.out")).unwrap());
    cmd.stderr(std::fs::File::create(dir.join("libvirtd.err")).unwrap());
    let guard = ChildGuard::spawn("libvirtd", cmd);
    let socket = run.join("libvirt-sock");
    let deadline = Instant::now() + BOUND;
    while !socket.exists() {
        assert!(Instant::now() < deadline, "libvirtd did not create {} in time", socket.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    guard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_hypervisor_is_a_failure_not_a_stop() {
    let host = TestHost::new();
    let socket = host.dir.path().join("run").join("libvirt-sock");
    let uri = format!("test+unix://{}?socket={}", host.dir.path().join("host.xml").display(), socket.display());
    let mut daemon = start_libvirtd(host.dir.path());
    let options = LibvirtOptions {
        keepalive_interval: Duration::from_secs(1),
        reconnect_min: Duration::from_secs(5),
        reconnect_max: Duration::from_secs(5),
        ..LibvirtOptions::default()
    };
    let hv = Arc::new(LibvirtHypervisor::connect_with(&uri, options).await.expect("connect through libvirtd"));
    let vm = web_vm(&host, hv.clone(), BOUND);
    vm.start(&ctx()).await.expect("start");
    assert_eq!(vm.check().await, Health::Running);

    let mut connection = hv.connection_state();
    daemon.kill();
    tokio::time::timeout(BOUND, connection.wait_for(|s| matches!(s, ConnectionState::Reconnecting { .. })))
        .await
        .expect("the loss is noticed")
        .unwrap();

    let health = vm.check().await;
    let Health::Failed(why) = &health else { panic!("a lost hypervisor reads as {health:?}") };
    assert!(why.contains("cannot tell whether the VM runs") && why.contains("'web'") && why.contains(&uri), "{why}");

    let err = vm.stop(false).await.unwrap_err();
    assert!(err.to_string().contains(&uri) && err.to_string().contains("'web'"), "{err}");
}

/// A guest agent stand-in behind the `GuestShutdown` trait: answers with `answer` after
/// `delay`, and records which VM it was asked about and with what limit.
#[derive(Debug)]
struct ScriptedGuest {
    answer: GuestPrepared,
    delay: Duration,
    asked: std::sync::Mutex<Vec<(String, Duration)>>,
}

impl GuestShutdown for ScriptedGuest {
    fn prepare(&self, uuid: &str, limit: Duration) -> tandem_node::resources::BoxFuture<'_, GuestPrepared> {
        self.asked.lock().unwrap().push((uuid.to_string(), limit));
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.answer.clone()
        })
    }
}

async fn steps_of(rx: &mut broadcast::Receiver<VmActivity>) -> Vec<(VmStep, String)> {
    let mut out = Vec::new();
    while let Ok(a) = rx.try_recv() {
        assert_eq!(a.group, "web");
        out.push((a.step, a.detail));
    }
    out
}

#[tokio::test]
async fn a_planned_stop_asks_the_guest_first_and_a_forced_one_does_not() {
    let host = TestHost::new();
    let hv = host.connect().await;
    let file = host.domain_file("web.xml", &domain_xml("web", "<memory unit='MiB'>512</memory>"));
    let guest = Arc::new(ScriptedGuest {
        answer: GuestPrepared::Ready("1 group moved".into()),
        delay: Duration::from_millis(300),
        asked: Default::default(),
    });
    let factory = HostResources::new(hv.clone()).with_guests(guest.clone());
    let mut activity = factory.activity().subscribe();
    let mut config = vm_config(file, BOUND);
    config.prepare_timeout = Duration::from_secs(7);
    let vm = factory.build_vm("web", &spec("vm", ResourceKind::Vm(config)), &ResourceEnv::new("h")).unwrap();

    vm.start(&ctx()).await.expect("start");
    let mut events = hv.subscribe();
    vm.stop(false).await.expect("stop");
    assert_eq!(*guest.asked.lock().unwrap(), [(UUID.to_string(), Duration::from_secs(7))]);
    assert_eq!(how_it_stopped(&mut events).await, (EventReason::Shutdown, true), "ACPI after the guest's answer");
    let steps: Vec<VmStep> = steps_of(&mut activity).await.into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [VmStep::GuestPreparing, VmStep::GuestReady, VmStep::ShuttingDown, VmStep::Stopped]);

    // A forced stop (the lease is gone) never waits for the guest.
    vm.start(&ctx()).await.expect("start again");
    vm.stop(true).await.expect("forced stop");
    assert_eq!(guest.asked.lock().unwrap().len(), 1, "the guest was asked before a forced stop");
    let steps: Vec<VmStep> = steps_of(&mut activity).await.into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [VmStep::Destroyed, VmStep::Stopped]);
    // Nothing runs, nothing asked, when the VM is already off.
    vm.stop(false).await.expect("stop a stopped VM");
    assert_eq!(guest.asked.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_guest_that_does_not_answer_in_time_delays_the_shutdown_by_its_timeout_only() {
    let host = TestHost::new();
    let hv = host.connect().await;
    let file = host.domain_file("web.xml", &domain_xml("web", "<memory unit='MiB'>512</memory>"));
    let guest = Arc::new(ScriptedGuest {
        answer: GuestPrepared::Ready("too late".into()),
        delay: Duration::from_secs(3600),
        asked: Default::default(),
    });
    let factory = HostResources::new(hv.clone()).with_guests(guest.clone());
    let mut activity = factory.activity().subscribe();
    let mut config = vm_config(file, BOUND);
    config.prepare_timeout = Duration::from_millis(500);
    let vm = factory.build_vm("web", &spec("vm", ResourceKind::Vm(config)), &ResourceEnv::new("h")).unwrap();
    vm.start(&ctx()).await.expect("start");
    let t = std::time::Instant::now();
    vm.stop(false).await.expect("stop");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(10), "the stop waited {took:?} for a guest that never answers");
    let steps = steps_of(&mut activity).await;
    assert_eq!(steps[1].0, VmStep::GuestNotReady, "{steps:?}");
    assert!(steps[1].1.contains("no answer within"), "{steps:?}");
    assert_eq!(steps.last().unwrap().0, VmStep::Stopped, "{steps:?}");
    assert!(is_missing(hv.domain_info(UUID).await), "the VM was not shut down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_gate_bounds_how_many_planned_stops_run_at_once() {
    let host = TestHost::new();
    let hv = host.connect().await;
    let guest = Arc::new(ScriptedGuest {
        answer: GuestPrepared::Ready("done".into()),
        delay: Duration::from_millis(600),
        asked: Default::default(),
    });
    let factory = HostResources::new(hv.clone()).with_guests(guest.clone());
    factory.stop_gate().limit(Some(1));
    let mut activity = factory.activity().subscribe();
    let mut vms = Vec::new();
    for (name, uuid) in [("web", UUID), ("db", "7a3c1f52-9b4e-4d21-8c6a-5e0f2b9d8a42")] {
        let xml = domain_xml(name, "<memory unit='MiB'>64</memory>").replace(UUID, uuid);
        let file = host.domain_file(&format!("{name}.xml"), &xml);
        let vm = factory
            .build_vm(name, &spec("vm", ResourceKind::Vm(vm_config(file, BOUND))), &ResourceEnv::new("h"))
            .unwrap();
        vm.start(&ctx()).await.expect("start");
        vms.push(vm);
    }
    let t = Instant::now();
    let (a, b) = tokio::join!(vms[0].stop(false), vms[1].stop(false));
    a.expect("stop web");
    b.expect("stop db");
    let took = t.elapsed();
    // One at a time: the second guest is asked only once the first VM is off.
    assert!(took >= Duration::from_millis(1150), "both stops ran at once: {took:?}");
    let mut queued = 0;
    while let Ok(a) = activity.try_recv() {
        queued += usize::from(a.step == VmStep::Queued);
    }
    assert_eq!(queued, 1, "exactly one stop waited for a slot");
    // Without a bound they overlap.
    factory.stop_gate().limit(None);
    for vm in &vms {
        vm.start(&ctx()).await.expect("start again");
    }
    let t = Instant::now();
    let (a, b) = tokio::join!(vms[0].stop(false), vms[1].stop(false));
    a.unwrap();
    b.unwrap();
    assert!(t.elapsed() < Duration::from_millis(1150), "unbounded stops did not overlap: {:?}", t.elapsed());
}

/// A VM resource on `hv` whose host (`host-a`) migrates to `uris`, with its activity.
fn migrating_vm(
    host: &TestHost,
    hv: Arc<dyn Hypervisor>,
    uris: &[(&str, &str)],
) -> (VmResource, Migration, broadcast::Receiver<VmActivity>) {
    let file = host.domain_file("web.xml", &domain_xml("web", "<memory unit='MiB'>512</memory>"));
    let migration = Migration::new("host-a", uris.iter().map(|(h, u)| (h.to_string(), u.to_string())).collect());
    let factory = HostResources::new(hv).with_migration(migration.clone());
    let activity = factory.activity().subscribe();
    let vm = factory
        .build_vm("web", &spec("vm", ResourceKind::Vm(vm_config(file, BOUND))), &ResourceEnv::new("host-a"))
        .expect("build the VM resource");
    (vm, migration, activity)
}

fn handover(node: &str, reason: HandoverReason) -> StopContext {
    StopContext {
        group: "web".into(),
        resource: "vm".into(),
        force: false,
        token: 7,
        handover: Some(HandoverTarget { node: node.into(), reason }),
    }
}

#[tokio::test]
async fn a_handover_that_cannot_migrate_shuts_the_vm_down_and_says_so() {
    let host = TestHost::new();
    let hv = host.connect().await;
    // host-b's "daemon" is the test driver, which cannot migrate; host-c has no URI at all.
    let (vm, migration, mut activity) = migrating_vm(&host, hv.clone(), &[("host-b", "test:///default")]);

    vm.start(&ctx()).await.expect("start");
    let outcome = vm.stop_for(&handover("host-b", HandoverReason::Move)).await.expect("stop");
    assert_eq!(outcome, StopOutcome::Stopped, "nothing migrated");
    assert!(domains(&*hv).await.is_empty(), "the VM is off and undefined here");
    let steps = steps_of(&mut activity).await;
    let (_, why) = steps.iter().find(|(s, _)| *s == VmStep::MigrationFailed).expect("the fallback is reported");
    assert!(why.contains("live migration to host-b failed") && why.contains("starts afresh there"), "{why}");
    assert!(steps.iter().any(|(s, _)| *s == VmStep::ShuttingDown), "{steps:?}");

    vm.start(&ctx()).await.expect("start again");
    assert_eq!(vm.stop_for(&handover("host-c", HandoverReason::Move)).await.unwrap(), StopOutcome::Stopped);
    let steps = steps_of(&mut activity).await;
    let (_, why) = steps.iter().find(|(s, _)| *s == VmStep::MigrationFailed).expect("reported");
    assert!(why.contains("host-c cannot receive live migrations"), "{why}");

    // Maintenance with the failover policy: a standby handover is a plain shutdown; with
    // the migrate policy it tries to migrate.
    vm.start(&ctx()).await.expect("start again");
    vm.stop_for(&handover("host-b", HandoverReason::Standby)).await.unwrap();
    let steps: Vec<VmStep> = steps_of(&mut activity).await.into_iter().map(|(s, _)| s).collect();
    assert!(!steps.contains(&VmStep::MigrationFailed) && !steps.contains(&VmStep::Migrating), "{steps:?}");
    migration.migrate_on_standby(true);
    vm.start(&ctx()).await.expect("start again");
    vm.stop_for(&handover("host-b", HandoverReason::Standby)).await.unwrap();
    let steps: Vec<VmStep> = steps_of(&mut activity).await.into_iter().map(|(s, _)| s).collect();
    assert!(steps.contains(&VmStep::MigrationFailed), "{steps:?}");
}

/// Leaves the VM's domain on `hv` paused under a handover mark from `from` with `token`: what
/// an incoming live migration leaves on the destination.
async fn incoming_copy(host: &TestHost, hv: &Arc<LibvirtHypervisor>, from: &str, token: u64) {
    hv.define(&domain_xml("web", "<memory unit='MiB'>512</memory>")).await.unwrap();
    hv.start(UUID).await.unwrap();
    hv.suspend(UUID).await.unwrap();
    let mark = HandoverMark { from: from.into(), token };
    hv.set_handover_mark(UUID, Some(&mark)).await.expect("the test driver keeps metadata");
    assert_eq!(hv.handover_mark(UUID).await.unwrap(), Some(mark));
    let _ = host;
}

#[tokio::test]
async fn the_handover_start_resumes_the_paused_copy_instead_of_booting() {
    let host = TestHost::new();
    let hv = host.connect().await;
    incoming_copy(&host, &hv, "host-b", 6).await;
    let (vm, _, _) = migrating_vm(&host, hv.clone(), &[]);
    // Before the start, the probe sees nothing running here: the copy never ran here.
    assert_eq!(vm.check().await, Health::Stopped);
    let mut ctx = StartContext::new("web", "vm", 7);
    ctx.migrated_in = true;
    vm.start(&ctx).await.expect("resume");
    assert_eq!(hv.state(UUID).await.unwrap(), DomainState::Running(RunningReason::Unpaused), "resumed, not booted");
    assert_eq!(hv.handover_mark(UUID).await.unwrap(), None, "the mark has served");
    assert_eq!(vm.check().await, Health::Running);
    // An operator's pause afterwards is a pause, not an incoming copy.
    hv.suspend(UUID).await.unwrap();
    assert_eq!(vm.check().await, Health::Running);
}

/// A domain left paused here without a handover mark (a start of ours that failed between
/// its paused boot and the resume, and whose cleanup failed too; or an operator's pause while
/// the group was stopped) is resumed by the next start, never reported started while paused.
#[tokio::test]
async fn a_start_resumes_a_domain_left_paused_here() {
    let host = TestHost::new();
    let hv = host.connect().await;
    hv.define(&domain_xml("web", "<memory unit='MiB'>512</memory>")).await.unwrap();
    hv.start(UUID).await.unwrap();
    hv.suspend(UUID).await.unwrap();
    assert!(matches!(hv.state(UUID).await.unwrap(), DomainState::Paused(PausedReason::User)));
    let vm = web_vm(&host, hv.clone(), BOUND);
    vm.start(&ctx()).await.expect("start");
    assert_eq!(
        hv.state(UUID).await.unwrap(),
        DomainState::Running(RunningReason::Unpaused),
        "resumed, not left paused"
    );
    assert_eq!(vm.check().await, Health::Running);
}

#[tokio::test]
async fn a_paused_copy_that_is_not_the_handovers_is_destroyed_and_the_vm_boots() {
    for (migrated_in, token) in [(false, 7), (true, 9)] {
        let host = TestHost::new();
        let hv = host.connect().await;
        // Subscribed before the copy is made: the copy's own events (its define and boot) may
        // arrive late under load, and must not pass for the start's.
        let mut events = hv.subscribe();
        incoming_copy(&host, &hv, "host-b", 6).await;
        let (vm, _, _) = migrating_vm(&host, hv.clone(), &[]);
        let mut ctx = StartContext::new("web", "vm", token);
        ctx.migrated_in = migrated_in;
        vm.start(&ctx).await.expect("start");
        assert_eq!(
            hv.state(UUID).await.unwrap(),
            DomainState::Running(RunningReason::Booted),
            "migrated_in {migrated_in}, token {token}: booted afresh"
        );
        // The copy's boot, its destruction, then the new boot.
        let destroyed = std::sync::atomic::AtomicBool::new(false);
        let seen = events_until(&mut events, |e| {
            if e.kind == EventKind::Stopped && e.reason == EventReason::Destroyed {
                destroyed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            e.kind == EventKind::Started && destroyed.load(std::sync::atomic::Ordering::Relaxed)
        })
        .await;
        let copy_boot = seen.iter().position(|e| e.kind == EventKind::Started).expect("the copy booted");
        let destroy = seen.iter().position(|e| e.kind == EventKind::Stopped && e.reason == EventReason::Destroyed);
        assert!(destroy.is_some_and(|d| d > copy_boot), "the stale copy was destroyed before the boot: {seen:?}");
        assert_eq!(hv.handover_mark(UUID).await.unwrap(), None, "the booted VM carries no mark");
    }
}
