//! `tandem.v1.HostAgent` over a real tonic server on 127.0.0.1 (the node's `ApiServer`
//! with the host service mounted through `host_api`): the cluster view derived from the
//! node status, VM commands reaching the node with the right group and action, roles with
//! mutual TLS, events, and `ListDomains` from a real libvirt (the test driver). The node
//! behind the `Control` trait is a small in-test fake with canned status: this file tests
//! the API layer; the end-to-end tests run the real node.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_config::{ApiRole, ApiSettings, ApiTls};
use tandem_host::api::{HostFacts, VmFacts, host_api};
use tandem_host::hypervisor::Hypervisor;
use tandem_host::hypervisor::libvirt::LibvirtHypervisor;
use tandem_node::agent::ApiContext;
use tandem_node::api::{
    ApiError, ApiServer, BoxFuture, Control, ControlError, OperatorAck, OperatorAction, OperatorRequest, pb,
};
use tandem_node::plan::Plan;
use tandem_testkit::certs::{TestPki, make_pki};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use pb::host_agent_client::HostAgentClient;

/// Generous bound for anything that should be immediate.
const BOUND: Duration = Duration::from_secs(20);

const DB_UUID: &str = "11111111-1111-4111-8111-111111111111";
const WEB_UUID: &str = "22222222-2222-4222-8222-222222222222";

/// The node: hosts hv1 (this one), hv2 (up), hv3 (lost); VMs db on hv1, web on hv2, big
/// blocked (fits nowhere), cold stopped by an operator.
struct Fake {
    quorum: AtomicBool,
    accepted: Mutex<Vec<OperatorRequest>>,
    events: broadcast::Sender<pb::Event>,
}

impl Fake {
    fn new() -> Arc<Fake> {
        Arc::new(Fake {
            quorum: AtomicBool::new(true),
            accepted: Mutex::new(Vec::new()),
            events: broadcast::channel(16).0,
        })
    }
}

fn node(name: &str, id: u32, state: pb::NodeState, local: bool) -> pb::NodeStatus {
    pb::NodeStatus { name: name.into(), id, state: state as i32, local, ..Default::default() }
}

fn group(name: &str, state: pb::GroupState, location: &str) -> pb::GroupStatus {
    pb::GroupStatus { name: name.into(), state: state as i32, location: location.into(), ..Default::default() }
}

impl Control for Fake {
    fn status(&self) -> BoxFuture<'_, Result<pb::GuestStatus, ControlError>> {
        Box::pin(async move {
            let reason = |r: pb::NotRunningReason| {
                Some(pb::NotRunning { reason: r as i32, node: String::new(), detail: vec![] })
            };
            Ok(pb::GuestStatus {
                node: "hv1".into(),
                node_id: 1,
                quorum: self.quorum.load(Ordering::SeqCst),
                nodes: vec![
                    node("hv1", 1, pb::NodeState::Up, true),
                    node("hv2", 2, pb::NodeState::Up, false),
                    node("hv3", 3, pb::NodeState::Down, false),
                ],
                groups: vec![
                    pb::GroupStatus { restarts: 1, ..group("db", pb::GroupState::Started, "hv1") },
                    pb::GroupStatus {
                        failovers: 2,
                        failed_on: vec!["hv3".into()],
                        ..group("web", pb::GroupState::Started, "hv2")
                    },
                    pb::GroupStatus {
                        not_running: reason(pb::NotRunningReason::NoEligibleNode),
                        ..group("big", pb::GroupState::Blocked, "")
                    },
                    pb::GroupStatus {
                        not_running: reason(pb::NotRunningReason::OperatorStopped),
                        ..group("cold", pb::GroupState::Stopped, "")
                    },
                ],
                ..Default::default()
            })
        })
    }

    fn operator(&self, request: OperatorRequest) -> BoxFuture<'_, Result<OperatorAck, ControlError>> {
        Box::pin(async move {
            if !self.quorum.load(Ordering::SeqCst) {
                return Err(ControlError::NoQuorum);
            }
            let mut log = self.accepted.lock().unwrap();
            log.push(request);
            Ok(OperatorAck { seq: log.len() as u64 + 10 })
        })
    }

    fn deliver(&self, _seq: u64, _request: OperatorRequest) -> BoxFuture<'_, Result<(), ControlError>> {
        Box::pin(async { Err(ControlError::NotPossible("not used by the host API".into())) })
    }

    fn prepare_shutdown(&self) -> BoxFuture<'_, Result<mpsc::Receiver<pb::ShutdownProgress>, ControlError>> {
        Box::pin(async { Err(ControlError::NotPossible("not used by the host API".into())) })
    }

    fn subscribe(&self) -> broadcast::Receiver<pb::Event> {
        self.events.subscribe()
    }
}

fn hosts() -> Vec<HostFacts> {
    vec![
        HostFacts { name: "hv1".into(), id: 1, capacity: Some((8192, 8)) },
        HostFacts { name: "hv2".into(), id: 2, capacity: Some((4096, 4)) },
        HostFacts { name: "hv3".into(), id: 3, capacity: Some((65536, 64)) },
    ]
}

fn vms() -> Vec<VmFacts> {
    let vm = |group: &str, domain: &str, uuid: &str, memory_mib, vcpus| VmFacts {
        group: group.into(),
        domain: domain.into(),
        uuid: uuid.into(),
        memory_mib,
        vcpus,
    };
    vec![
        vm("db", "db-vm", DB_UUID, 2048, 2),
        vm("web", "web-vm", WEB_UUID, 1024, 1),
        vm("big", "big-vm", "33333333-3333-4333-8333-333333333333", 7000, 4),
        vm("cold", "cold-vm", "44444444-4444-4444-8444-444444444444", 512, 1),
    ]
}

/// This host's hypervisor: libvirt's test driver with db-vm running, web-vm off and a
/// domain that is not an HA VM, paused.
struct TestHost {
    _dir: tempfile::TempDir,
    hypervisor: Arc<LibvirtHypervisor>,
}

impl TestHost {
    async fn new() -> TestHost {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.xml");
        let domain = |name: &str, uuid: &str, kib: u64, vcpus: u32, runstate: u32| {
            format!(
                "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'><name>{name}</name>\
                 <uuid>{uuid}</uuid><memory>{kib}</memory><vcpu>{vcpus}</vcpu><os><type arch='i686'>hvm</type></os>\
                 <test:runstate>{runstate}</test:runstate></domain>"
            )
        };
        // libvirt's run states: 1 running, 3 paused, 5 shut off.
        let xml = format!(
            "<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>2</threads><active>8</active>\
             <mhz>2400</mhz><model>i686</model></cpu><memory>8388608</memory>{}{}{}</node>",
            domain("db-vm", DB_UUID, 2_097_152, 2, 1),
            domain("web-vm", WEB_UUID, 1_048_576, 1, 5),
            domain("scratch", "55555555-5555-4555-8555-555555555555", 262_144, 1, 3),
        );
        std::fs::write(&path, xml).unwrap();
        let uri = format!("test://{}", path.display());
        let hypervisor = Arc::new(LibvirtHypervisor::connect(&uri).await.expect("connect to libvirt's test driver"));
        TestHost { _dir: dir, hypervisor }
    }
}

/// A plan for node hv1 of a three-host cluster (what `host_api` takes this host's name from).
fn plan() -> Arc<Plan> {
    let mut src = String::from("[cluster]\nname = \"hv\"\n\n[[link]]\nname = \"lan\"\nport = 5405\n\n");
    for id in 1..=3 {
        src.push_str(&format!("[[node]]\nname = \"hv{id}\"\nid = {id}\nlinks = {{ lan = \"10.0.0.{id}\" }}\n\n"));
    }
    src.push_str("[lease]\ndevice = \"/nonexistent/tandem.lease\"\n");
    let config = match tandem_config::check_str(&src, "test.toml") {
        Ok(c) => c.config,
        Err(e) => panic!("bad test config:\n{src}\n{e}"),
    };
    Arc::new(Plan::new(&config, "hv1").unwrap())
}

struct Running {
    addr: SocketAddr,
    fake: Arc<Fake>,
    lease: Arc<AtomicBool>,
    host: TestHost,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ApiError>>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(BOUND, &mut self.task).await.expect("the server stops in time").unwrap().unwrap();
    }
}

/// The node API with the host service mounted, as the host agent runs it.
async fn start(settings: ApiSettings) -> Running {
    let fake = Fake::new();
    let host = TestHost::new().await;
    let lease = Arc::new(AtomicBool::new(true));
    let valid = lease.clone();
    let control: Arc<dyn Control> = fake.clone();
    let context = ApiContext {
        control: control.clone(),
        lease_valid: Arc::new(move || valid.load(Ordering::SeqCst)),
        plan: plan(),
    };
    let hypervisor: Arc<dyn Hypervisor> = host.hypervisor.clone();
    let extension = host_api(hypervisor, hosts(), vms());
    let server = ApiServer::new(&settings, control).unwrap().with_service(extension(&context));
    let bound = server.bind().await.unwrap();
    let addr = bound.local_addr();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(bound.serve(async move {
        let _ = rx.await;
    }));
    Running { addr, fake, lease, host, stop: Some(tx), task }
}

fn loopback() -> ApiSettings {
    ApiSettings { listen: "127.0.0.1:0".parse().unwrap(), ..ApiSettings::default() }
}

fn plain(addr: SocketAddr) -> HostAgentClient<Channel> {
    let channel =
        Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_timeout(BOUND).timeout(BOUND).connect_lazy();
    HostAgentClient::new(channel)
}

fn tls(addr: SocketAddr, pki: &TestPki, identity: Option<(&Path, &Path)>) -> HostAgentClient<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca_cert).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(BOUND)
        .timeout(BOUND)
        .connect_lazy();
    HostAgentClient::new(channel)
}

fn vm(name: &str) -> pb::VmRequest {
    pb::VmRequest { vm: name.into() }
}

#[tokio::test]
async fn cluster_status_places_vms_and_counts_capacity() {
    let server = start(loopback()).await;
    let mut c = plain(server.addr);
    let s = c.get_cluster_status(pb::GetClusterStatusRequest {}).await.unwrap().into_inner();
    assert_eq!((s.host.as_str(), s.lease_valid, s.quorum), ("hv1", true, true));

    let hosts: Vec<(&str, u32, pb::HostState, u64, u32, u32)> = s
        .hosts
        .iter()
        .map(|h| (h.name.as_str(), h.id, h.state(), h.used_memory_mib, h.used_vcpus, h.vm_count))
        .collect();
    assert_eq!(
        hosts,
        vec![
            ("hv1", 1, pb::HostState::Self_, 2048, 2, 1),
            ("hv2", 2, pb::HostState::Up, 1024, 1, 1),
            ("hv3", 3, pb::HostState::Lost, 0, 0, 0),
        ]
    );
    assert_eq!(s.hosts[1].capacity, Some(pb::HostCapacity { memory_mib: 4096, vcpus: 4 }));

    let vms: Vec<(&str, &str, pb::VmState)> =
        s.vms.iter().map(|v| (v.name.as_str(), v.host.as_str(), v.state())).collect();
    assert_eq!(
        vms,
        vec![
            ("db", "hv1", pb::VmState::Running),
            ("web", "hv2", pb::VmState::Running),
            ("big", "", pb::VmState::Blocked),
            ("cold", "", pb::VmState::Stopped),
        ]
    );
    let web = &s.vms[1];
    assert_eq!((web.domain.as_str(), web.uuid.as_str()), ("web-vm", WEB_UUID));
    assert_eq!(
        (web.failovers, web.failed_on.clone(), web.memory_mib, web.vcpus),
        (2, vec!["hv3".to_string()], 1024, 1)
    );
    assert_eq!(s.vms[0].restarts, 1);
    let big = &s.vms[2];
    assert_eq!(big.not_running.as_ref().map(|n| n.reason()), Some(pb::NotRunningReason::NoEligibleNode));
    assert_eq!(big.not_running_text, "no host it may run on is up");
    assert_eq!(s.vms[3].not_running_text, "stopped by an operator; `tandemctl vm start cold` starts it");

    // big needs 7000 MiB: hv1 has 6144 free, hv2 3072, hv3 (64 GiB) is lost. cold was
    // stopped on purpose and is no problem.
    assert_eq!(
        s.problems,
        vec![pb::PlacementProblem {
            vm: "big".into(),
            reason:
                "needs 7000 MiB and 4 vCPUs; hv1: 6144 MiB and 6 vCPUs free; hv2: 3072 MiB and 3 vCPUs free; hv3: lost"
                    .into(),
        }]
    );

    // A host whose lease expired still answers, and says so.
    server.lease.store(false, Ordering::SeqCst);
    let s = c.get_cluster_status(pb::GetClusterStatusRequest {}).await.unwrap().into_inner();
    assert!(!s.lease_valid);
    server.stop().await;
}

#[tokio::test]
async fn vm_commands_reach_the_node_as_group_commands() {
    let server = start(loopback()).await;
    let mut c = plain(server.addr);
    assert_eq!(c.start_vm(vm("cold")).await.unwrap().into_inner().seq, 11);
    // By domain name too.
    assert_eq!(c.stop_vm(vm("web-vm")).await.unwrap().into_inner().seq, 12);
    let ack = c.move_vm(pb::MoveVmRequest { vm: "db".into(), to_host: "hv2".into() }).await.unwrap();
    assert_eq!(ack.into_inner().seq, 13);
    let expect = |g: &str, action| OperatorRequest { group: g.into(), action };
    assert_eq!(
        *server.fake.accepted.lock().unwrap(),
        vec![
            expect("cold", OperatorAction::Start),
            expect("web", OperatorAction::Stop),
            expect("db", OperatorAction::Move { to: Some("hv2".into()) }),
        ]
    );

    let e = c.start_vm(vm("nope")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(e.message(), "no VM named \"nope\" in this cluster; `tandemctl vms` lists them");
    let e = c.move_vm(pb::MoveVmRequest { vm: "db".into(), to_host: "hv9".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(e.message(), "no host named \"hv9\" in this cluster; `tandemctl hosts` lists them");
    let e = c.move_vm(pb::MoveVmRequest { vm: "db".into(), to_host: " ".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c.stop_vm(vm("")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("StopVm: `vm` is empty"), "{e:?}");
    // The node's refusals come through with their codes.
    server.fake.quorum.store(false, Ordering::SeqCst);
    let e = c.start_vm(vm("db")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("no quorum"), "{e:?}");
    assert_eq!(server.fake.accepted.lock().unwrap().len(), 3, "no refused command reached the node");
    server.stop().await;
}

#[tokio::test]
async fn list_domains_is_the_hypervisors_own_view_while_the_lease_holds() {
    let server = start(loopback()).await;
    let mut c = plain(server.addr);
    let list = c.list_domains(pb::ListDomainsRequest {}).await.unwrap().into_inner();
    assert_eq!(list.host, "hv1");
    assert!(list.uri.starts_with("test:///"), "{}", list.uri);
    let rows: Vec<(&str, pb::DomainState, u64, u32, bool)> =
        list.domains.iter().map(|d| (d.name.as_str(), d.state(), d.memory_mib, d.vcpus, d.ha)).collect();
    assert_eq!(
        rows,
        vec![
            ("db-vm", pb::DomainState::Running, 2048, 2, true),
            ("scratch", pb::DomainState::Paused, 256, 1, false),
            ("web-vm", pb::DomainState::Shutoff, 1024, 1, true),
        ]
    );
    assert_eq!(list.domains[0].uuid, DB_UUID);

    // Live, not remembered: what libvirt does shows at once.
    server.host.hypervisor.destroy("db-vm").await.unwrap();
    let list = c.list_domains(pb::ListDomainsRequest {}).await.unwrap().into_inner();
    let db = list.domains.iter().find(|d| d.name == "db-vm").unwrap();
    assert_eq!((db.state(), db.reason.as_str()), (pb::DomainState::Shutoff, "destroyed"));

    // A host whose lease expired does not report VMs as if it still held them.
    server.lease.store(false, Ordering::SeqCst);
    let e = c.list_domains(pb::ListDomainsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(e.message(), "this host's lease expired; its VMs are being destroyed");
    server.lease.store(true, Ordering::SeqCst);
    assert_eq!(c.list_domains(pb::ListDomainsRequest {}).await.unwrap().into_inner().domains.len(), 3);
    server.stop().await;
}

#[tokio::test]
async fn events_stream_until_the_server_stops() {
    let server = start(loopback()).await;
    let mut c = plain(server.addr);
    let mut events = c.watch_events(pb::WatchEventsRequest {}).await.unwrap().into_inner();
    let deadline = tokio::time::Instant::now() + BOUND;
    while server.fake.events.receiver_count() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the stream never subscribed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent = pb::Event {
        seq: 7,
        unix_ms: 1_700_000_000_000,
        kind: Some(pb::event::Kind::GroupState(pb::GroupStateChanged {
            group: "db".into(),
            state: pb::GroupState::Started as i32,
            location: "hv2".into(),
            not_running: None,
        })),
    };
    server.fake.events.send(sent.clone()).unwrap();
    let got = tokio::time::timeout(BOUND, events.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(got, sent);

    let mut server = server;
    let _ = server.stop.take().unwrap().send(());
    let end = tokio::time::timeout(BOUND, events.message()).await.expect("the event stream ends");
    let e = end.expect_err("the stream ends with a status");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    drop(events);
    tokio::time::timeout(BOUND, server.task).await.expect("the server stops").unwrap().unwrap();
}

#[tokio::test]
async fn roles_are_enforced_with_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let settings = ApiSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: Some(ApiTls {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: Some(pki.ca_cert.clone()),
        }),
        roles: BTreeMap::from([
            ("watcher".to_string(), vec![ApiRole::Viewer]),
            ("ops".to_string(), vec![ApiRole::Operator]),
            ("hv2".to_string(), vec![ApiRole::Peer]),
        ]),
        anonymous_roles: None,
        insecure: false,
    };
    let server = start(settings).await;
    let (watcher, ops, peer) = (pki.client_cert("watcher"), pki.client_cert("ops"), pki.client_cert("hv2"));
    let mut viewer = tls(server.addr, &pki, Some((&watcher.cert, &watcher.key)));
    let mut operator = tls(server.addr, &pki, Some((&ops.cert, &ops.key)));
    let mut peer = tls(server.addr, &pki, Some((&peer.cert, &peer.key)));
    let mut anonymous = tls(server.addr, &pki, None);

    // Viewer: may look, may not act; refused before the VM name is even looked at.
    viewer.get_cluster_status(pb::GetClusterStatusRequest {}).await.unwrap();
    viewer.list_domains(pb::ListDomainsRequest {}).await.unwrap();
    viewer.watch_events(pb::WatchEventsRequest {}).await.unwrap();
    for e in [
        viewer.start_vm(vm("db")).await.unwrap_err(),
        viewer.stop_vm(vm("no-such-vm")).await.unwrap_err(),
        viewer.move_vm(pb::MoveVmRequest { vm: "db".into(), to_host: "hv2".into() }).await.unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("needs role operator"), "{e:?}");
        assert!(e.message().contains("CN=\"watcher\""), "{e:?}");
    }
    assert!(server.fake.accepted.lock().unwrap().is_empty());

    // Operator: may act (and look: operator includes viewer).
    operator.stop_vm(vm("db")).await.unwrap();
    operator.get_cluster_status(pb::GetClusterStatusRequest {}).await.unwrap();
    assert_eq!(server.fake.accepted.lock().unwrap().len(), 1);

    // A peer's certificate and no certificate: nothing of the host API.
    let e = peer.list_domains(pb::ListDomainsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().starts_with("ListDomains needs role viewer"), "{e:?}");
    let e = anonymous.get_cluster_status(pb::GetClusterStatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("anonymous client has no roles"), "{e:?}");
    let e = anonymous.watch_events(pb::WatchEventsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    server.stop().await;
}
