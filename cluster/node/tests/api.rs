//! The gRPC API over a real tonic server on 127.0.0.1: roles from client
//! certificates (mutual TLS with a throw-away CA), error code mapping,
//! health, reflection, event lag, graceful stop. The runtime behind the
//! `Control` trait is a small in-test fake: this file tests the API layer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_config::{ApiRole, ApiSettings, ApiTls};
use tandem_node::api::{
    ApiError, ApiServer, BoxFuture, Control, ControlError, OperatorAck, OperatorAction, OperatorRequest, pb,
};
use tandem_testkit::certs::{TestPki, make_pki};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use pb::guest_agent_client::GuestAgentClient;

/// Generous bound for anything that should be immediate.
const BOUND: Duration = Duration::from_secs(20);

/// Groups "pg" (nodes a, b) and "web" (node a only); nodes a and b.
struct Fake {
    seq: AtomicU64,
    quorum: AtomicBool,
    shutting_down: AtomicBool,
    accepted: Mutex<Vec<(u64, OperatorRequest)>>,
    events: broadcast::Sender<pb::Event>,
}

impl Fake {
    fn new(event_capacity: usize) -> Arc<Self> {
        Arc::new(Fake {
            seq: AtomicU64::new(0),
            quorum: AtomicBool::new(true),
            shutting_down: AtomicBool::new(false),
            accepted: Mutex::new(Vec::new()),
            events: broadcast::channel(event_capacity).0,
        })
    }

    fn check(&self, r: &OperatorRequest) -> Result<(), ControlError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ControlError::ShuttingDown);
        }
        let nodes: &[&str] = match r.group.as_str() {
            "pg" => &["a", "b"],
            "web" => &["a"],
            other => return Err(ControlError::UnknownGroup(other.to_string())),
        };
        if let OperatorAction::Move { to: None } = &r.action
            && nodes.len() < 2
        {
            // What the runtime answers when no other eligible node exists.
            return Err(ControlError::NotPossible(format!(
                "cannot move group `{}`: no other eligible node can take it now (a runs it now)",
                r.group
            )));
        }
        if let OperatorAction::Move { to: Some(to) } = &r.action {
            if !["a", "b"].contains(&to.as_str()) {
                return Err(ControlError::UnknownNode(to.clone()));
            }
            if !nodes.contains(&to.as_str()) {
                return Err(ControlError::InvalidArgument(format!("group {:?} may not run on {to:?}", r.group)));
            }
        }
        if !self.quorum.load(Ordering::SeqCst) {
            return Err(ControlError::NoQuorum);
        }
        Ok(())
    }
}

impl Control for Fake {
    fn status(&self) -> BoxFuture<'_, Result<pb::GuestStatus, ControlError>> {
        Box::pin(async move {
            Ok(pb::GuestStatus {
                node: "a".into(),
                node_id: 1,
                quorum: self.quorum.load(Ordering::SeqCst),
                groups: vec![pb::GroupStatus {
                    name: "pg".into(),
                    state: pb::GroupState::Started as i32,
                    location: "a".into(),
                    restarts: self.accepted.lock().unwrap().len() as u32,
                    ..Default::default()
                }],
                ..Default::default()
            })
        })
    }

    fn operator(&self, request: OperatorRequest) -> BoxFuture<'_, Result<OperatorAck, ControlError>> {
        Box::pin(async move {
            self.check(&request)?;
            let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
            self.accepted.lock().unwrap().push((seq, request));
            Ok(OperatorAck { seq })
        })
    }

    fn deliver(&self, seq: u64, request: OperatorRequest) -> BoxFuture<'_, Result<(), ControlError>> {
        Box::pin(async move {
            self.check(&request)?;
            self.accepted.lock().unwrap().push((seq, request));
            Ok(())
        })
    }

    fn prepare_shutdown(&self) -> BoxFuture<'_, Result<mpsc::Receiver<pb::ShutdownProgress>, ControlError>> {
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                for (group, step) in [("pg", pb::ShutdownStep::Started), ("pg", pb::ShutdownStep::Done)] {
                    let p = pb::ShutdownGroupProgress {
                        group: group.into(),
                        action: pb::ShutdownAction::Move as i32,
                        to: "b".into(),
                        step: step as i32,
                        message: String::new(),
                    };
                    let _ = tx
                        .send(pb::ShutdownProgress { progress: Some(pb::shutdown_progress::Progress::Group(p)) })
                        .await;
                }
                let done = pb::ShutdownDone { safe_to_power_off: true, blockers: vec![] };
                let _ =
                    tx.send(pb::ShutdownProgress { progress: Some(pb::shutdown_progress::Progress::Done(done)) }).await;
            });
            Ok(rx)
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<pb::Event> {
        self.events.subscribe()
    }
}

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ApiError>>,
}

impl Running {
    async fn stop(mut self) -> Result<(), ApiError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(BOUND, &mut self.task).await.expect("the server stops in time").unwrap()
    }
}

async fn start(settings: ApiSettings, control: Arc<dyn Control>) -> Running {
    let bound = ApiServer::new(&settings, control).unwrap().bind().await.unwrap();
    let addr = bound.local_addr();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(bound.serve(async move {
        let _ = rx.await;
    }));
    Running { addr, stop: Some(tx), task }
}

fn loopback() -> ApiSettings {
    ApiSettings { listen: "127.0.0.1:0".parse().unwrap(), ..ApiSettings::default() }
}

async fn plain_channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_timeout(BOUND).timeout(BOUND).connect_lazy()
}

async fn tls_channel(addr: SocketAddr, pki: &TestPki, identity: Option<(&Path, &Path)>) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca_cert).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(BOUND)
        .timeout(BOUND)
        .connect_lazy()
}

fn group(name: &str) -> pb::GroupRequest {
    pb::GroupRequest { group: name.into() }
}

#[tokio::test]
async fn plaintext_loopback_calls_and_error_codes() {
    let fake = Fake::new(16);
    let server = start(loopback(), fake.clone()).await;
    let mut c = GuestAgentClient::new(plain_channel(server.addr).await);

    let s = c.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!((s.node.as_str(), s.node_id, s.quorum), ("a", 1, true));
    assert_eq!(s.groups[0].state(), pb::GroupState::Started);

    let ack = c.move_group(pb::MoveGroupRequest { group: "pg".into(), to: "b".into() }).await.unwrap();
    assert_eq!(ack.into_inner().seq, 1);
    assert_eq!(c.stop_group(group("web")).await.unwrap().into_inner().seq, 2);
    assert_eq!(c.reset_group(group("pg")).await.unwrap().into_inner().seq, 3);
    assert_eq!(c.suspend_monitoring(group("pg")).await.unwrap().into_inner().seq, 4);
    assert_eq!(c.resume_monitoring(group("pg")).await.unwrap().into_inner().seq, 5);
    assert_eq!(c.start_group(group("pg")).await.unwrap().into_inner().seq, 6);
    let actions: Vec<OperatorAction> = fake.accepted.lock().unwrap().iter().map(|(_, r)| r.action.clone()).collect();
    assert_eq!(
        actions,
        vec![
            OperatorAction::Move { to: Some("b".into()) },
            OperatorAction::Stop,
            OperatorAction::Reset,
            OperatorAction::SuspendMonitoring,
            OperatorAction::ResumeMonitoring,
            OperatorAction::Start,
        ]
    );

    // Error code mapping, each with a message that says what was wrong.
    let e = c.stop_group(group("nope")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("no group named \"nope\""), "{e:?}");
    let e = c.move_group(pb::MoveGroupRequest { group: "pg".into(), to: "zz".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("no node named \"zz\""), "{e:?}");
    let e = c.move_group(pb::MoveGroupRequest { group: "web".into(), to: "b".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c.start_group(group(" ")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("`group` is empty"), "{e:?}");
    // No target: passed on as such (the runtime picks one), or refused when none exists.
    let before = fake.accepted.lock().unwrap().len();
    c.move_group(pb::MoveGroupRequest { group: "pg".into(), to: " ".into() }).await.unwrap();
    assert_eq!(fake.accepted.lock().unwrap()[before].1.action, OperatorAction::Move { to: None });
    let e = c.move_group(pb::MoveGroupRequest { group: "web".into(), to: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("no other eligible node can take it now"), "{e:?}");
    let e = c.deliver_operator(pb::DeliverOperatorRequest { seq: 9, command: None }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    fake.quorum.store(false, Ordering::SeqCst);
    let e = c.start_group(group("pg")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("no quorum"), "{e:?}");
    fake.quorum.store(true, Ordering::SeqCst);
    fake.shutting_down.store(true, Ordering::SeqCst);
    let e = c.start_group(group("pg")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    fake.shutting_down.store(false, Ordering::SeqCst);
    assert_eq!(fake.accepted.lock().unwrap().len(), 7, "no rejected command reached the runtime's log");

    // A peer's forwarded command keeps the peer's sequence number.
    let fwd = OperatorRequest { group: "pg".into(), action: OperatorAction::Move { to: Some("a".into()) } };
    c.deliver_operator(pb::DeliverOperatorRequest { seq: 42, command: Some(fwd.to_proto()) }).await.unwrap();
    assert_eq!(fake.accepted.lock().unwrap().last().unwrap(), &(42, fwd));
    // Forwarded moves always name their target (the accepting node picked it).
    let untargeted = OperatorRequest { group: "pg".into(), action: OperatorAction::Move { to: None } };
    let e = c
        .deliver_operator(pb::DeliverOperatorRequest { seq: 43, command: Some(untargeted.to_proto()) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Planned shutdown: progress, then exactly one final message.
    let mut stream = c.prepare_shutdown(pb::PrepareShutdownRequest {}).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(p) = stream.message().await.unwrap() {
        got.push(p.progress.unwrap());
    }
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(matches!(&got[2], pb::shutdown_progress::Progress::Done(d) if d.safe_to_power_off), "{got:?}");

    server.stop().await.unwrap();
}

#[tokio::test]
async fn health_serving_and_reflection_lists_the_service() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let server = start(loopback(), Fake::new(16)).await;
    let channel = plain_channel(server.addr).await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "tandem.v1.GuestAgent"] {
        let r = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    let mut watch =
        health.watch(HealthCheckRequest { service: "tandem.v1.GuestAgent".into() }).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status(), ServingStatus::Serving);

    let mut reflection = ServerReflectionClient::new(channel.clone());
    let ask = |m: MessageRequest| ServerReflectionRequest { host: String::new(), message_request: Some(m) };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter(vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol("tandem.v1.GuestStatus".into())),
        ]))
        .await
        .unwrap()
        .into_inner();
    let first: ServerReflectionResponse = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else { panic!("{first:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"tandem.v1.GuestAgent".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
    let second = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = second.message_response else { panic!("{second:?}") };
    assert!(!files.file_descriptor_proto.is_empty());

    // Stopping: health watchers hear NOT_SERVING, open event streams end.
    drop(answers);
    let mut events = GuestAgentClient::new(channel).watch_events(pb::WatchEventsRequest {}).await.unwrap().into_inner();
    let mut server = server;
    let _ = server.stop.take().unwrap().send(());
    let mut saw_not_serving = false;
    while let Ok(Ok(Some(m))) = tokio::time::timeout(BOUND, watch.message()).await {
        if m.status() == ServingStatus::NotServing {
            saw_not_serving = true;
            break;
        }
    }
    assert!(saw_not_serving, "health watchers hear NOT_SERVING when the API stops");
    let end = tokio::time::timeout(BOUND, events.message()).await.expect("the event stream ends");
    let e = end.expect_err("the event stream ends with a status");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("shutting down"), "{e:?}");
    drop(watch);
    drop(events);
    let started = std::time::Instant::now();
    tokio::time::timeout(BOUND, server.task).await.expect("the server stops").unwrap().unwrap();
    assert!(
        started.elapsed() < tandem_node::api::DEFAULT_SHUTDOWN_GRACE,
        "with every stream closed, the stop does not wait for the grace period"
    );
}

#[tokio::test]
async fn a_client_that_never_lets_go_cannot_hold_up_the_stop() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let bound = ApiServer::new(&loopback(), Fake::new(16)).unwrap().bind().await.unwrap();
    let addr = bound.local_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(bound.shutdown_grace(Duration::from_millis(200)).serve(async move {
        let _ = rx.await;
    }));
    // A health watch never ends by itself.
    let mut health = HealthClient::new(plain_channel(addr).await);
    let _watch = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    tx.send(()).unwrap();
    tokio::time::timeout(BOUND, task).await.expect("the stop is bounded by the grace").unwrap().unwrap();
}

fn mtls_settings(pki: &TestPki) -> ApiSettings {
    ApiSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: Some(ApiTls {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: Some(pki.ca_cert.clone()),
        }),
        roles: BTreeMap::from([
            ("watcher".to_string(), vec![ApiRole::Viewer]),
            ("ops".to_string(), vec![ApiRole::Operator]),
            ("node-b".to_string(), vec![ApiRole::Peer]),
            ("hv1".to_string(), vec![ApiRole::Host]),
        ]),
        anonymous_roles: None,
        insecure: false,
    }
}

#[tokio::test]
async fn mutual_tls_roles_by_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let fake = Fake::new(16);
    let server = start(mtls_settings(&pki), fake.clone()).await;
    let addr = server.addr;
    let client = |cn: Option<&str>| {
        let pki = pki.clone();
        let cn = cn.map(str::to_string);
        async move {
            let cert = cn.map(|cn| pki.client_cert(&cn));
            let ident = cert.as_ref().map(|c| (c.cert.as_path(), c.key.as_path()));
            GuestAgentClient::new(tls_channel(addr, &pki, ident).await)
        }
    };

    // No client certificate: TLS works, but an anonymous client has no roles.
    let mut anon = client(None).await;
    let e = anon.get_status(pb::GetStatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("GetStatus needs role viewer"), "{e:?}");
    assert!(e.message().contains("anonymous client has no roles"), "{e:?}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(tls_channel(addr, &pki, None).await);
    let e = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "health needs viewer too: {e:?}");

    // viewer: status yes, commands no.
    let mut viewer = client(Some("watcher")).await;
    assert_eq!(viewer.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner().node, "a");
    let e = viewer.stop_group(group("pg")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("StopGroup needs role operator"), "{e:?}");
    assert!(e.message().contains("CN=\"watcher\" has roles viewer"), "{e:?}");
    // Arguments are not looked at before authorization.
    let e = viewer.stop_group(group("")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // operator: commands and status, but not peer or host calls.
    let mut ops = client(Some("ops")).await;
    assert_eq!(ops.stop_group(group("pg")).await.unwrap().into_inner().seq, 1);
    ops.get_status(pb::GetStatusRequest {}).await.unwrap();
    let e = ops.deliver_operator(pb::DeliverOperatorRequest { seq: 5, command: None }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("needs role peer"), "{e:?}");
    let e = ops.prepare_shutdown(pb::PrepareShutdownRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("needs role host"), "{e:?}");

    // peer and host.
    let mut peer = client(Some("node-b")).await;
    let fwd = OperatorRequest { group: "pg".into(), action: OperatorAction::Start };
    peer.deliver_operator(pb::DeliverOperatorRequest { seq: 7, command: Some(fwd.to_proto()) }).await.unwrap();
    let e = peer.get_status(pb::GetStatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "peer does not imply viewer: {e:?}");
    let mut host = client(Some("hv1")).await;
    let mut progress = host.prepare_shutdown(pb::PrepareShutdownRequest {}).await.unwrap().into_inner();
    let mut last = None;
    while let Some(p) = progress.message().await.unwrap() {
        last = p.progress;
    }
    assert!(matches!(last, Some(pb::shutdown_progress::Progress::Done(_))), "{last:?}");

    // A CN the table does not know: no roles.
    let mut stranger = client(Some("mallory")).await;
    let e = stranger.get_status(pb::GetStatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("CN=\"mallory\" has no roles"), "{e:?}");

    // A certificate from another CA with a known CN: refused at the handshake.
    let other_dir = tempfile::tempdir().unwrap();
    let other = make_pki(other_dir.path()).client_cert("ops");
    let mut forged = GuestAgentClient::new(tls_channel(addr, &pki, Some((&other.cert, &other.key))).await);
    let e = tokio::time::timeout(BOUND, forged.stop_group(group("pg"))).await.expect("bounded").unwrap_err();
    assert!(matches!(e.code(), Code::Unavailable | Code::Unknown), "{e:?}");
    assert!(format!("{e:?}").contains("alert"), "the handshake failed: {e:?}");

    // A plaintext client against the TLS listener fails, promptly.
    let mut plain = GuestAgentClient::new(plain_channel(addr).await);
    let e = tokio::time::timeout(BOUND, plain.get_status(pb::GetStatusRequest {})).await.expect("bounded").unwrap_err();
    assert!(matches!(e.code(), Code::Unavailable | Code::Unknown | Code::Internal), "{e:?}");

    assert_eq!(fake.accepted.lock().unwrap().len(), 2, "exactly the permitted commands reached the runtime");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn network_listener_without_tls_needs_insecure() {
    let settings = ApiSettings { listen: "0.0.0.0:0".parse().unwrap(), ..ApiSettings::default() };
    let e = ApiServer::new(&settings, Fake::new(1)).unwrap_err();
    assert!(matches!(e, ApiError::Insecure(_)), "{e}");
    assert!(e.to_string().contains("insecure = true"), "{e}");
    let settings = ApiSettings { insecure: true, ..settings };
    assert!(ApiServer::new(&settings, Fake::new(1)).is_ok());

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    let settings = ApiSettings {
        tls: Some(ApiTls { cert: missing.clone(), key: missing.clone(), client_ca: None }),
        ..loopback()
    };
    let e = ApiServer::new(&settings, Fake::new(1)).unwrap_err();
    assert!(e.to_string().contains(&missing.display().to_string()), "{e}");
}

/// Runs on one thread, so the burst below is sent before the server reads any of it.
#[tokio::test(flavor = "current_thread")]
async fn slow_event_subscriber_gets_a_lag_message_and_the_stream_goes_on() {
    let fake = Fake::new(16);
    let server = start(loopback(), fake.clone()).await;
    let mut c = GuestAgentClient::new(plain_channel(server.addr).await);
    let mut events = c.watch_events(pb::WatchEventsRequest {}).await.unwrap().into_inner();
    let deadline = tokio::time::Instant::now() + BOUND;
    while fake.events.receiver_count() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the server never subscribed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let notice = |seq: u64| pb::Event {
        seq,
        unix_ms: 0,
        kind: Some(pb::event::Kind::FenceRequested(pb::FenceRequested { node: format!("n{seq}") })),
    };
    // 1000 events without yielding: the agent never waits for a subscriber.
    for seq in 1..=1000 {
        fake.events.send(notice(seq)).unwrap();
    }
    let first = events.message().await.unwrap().unwrap();
    let Some(pb::event::Kind::Lagged(lag)) = first.kind else { panic!("expected a lag message first: {first:?}") };
    assert_eq!(lag.message, format!("lagged, {} events dropped", lag.dropped));
    assert!(lag.dropped > 0);
    let mut received = Vec::new();
    while received.len() as u64 + lag.dropped < 1000 {
        received.push(events.message().await.unwrap().unwrap().seq);
    }
    let expected: Vec<u64> = (lag.dropped + 1..=1000).collect();
    assert_eq!(received, expected, "after the lag, the newest events in order");
    // And the stream goes on.
    fake.events.send(notice(1001)).unwrap();
    assert_eq!(events.message().await.unwrap().unwrap().seq, 1001);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn peers_forward_commands_with_their_own_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let mut settings = mtls_settings(&pki);
    // The test PKI's agent certificate has CN "localhost"; as a peer it gets the `peer` role.
    settings.roles.insert("localhost".to_string(), vec![ApiRole::Peer]);
    let fake = Fake::new(16);
    let server = start(settings.clone(), fake.clone()).await;

    let mut client = tandem_node::api::peer::connect("localhost", server.addr, &settings, BOUND).await.unwrap();
    let fwd = OperatorRequest { group: "pg".into(), action: OperatorAction::Stop };
    tandem_node::api::peer::deliver(&mut client, "localhost", 77, &fwd).await.unwrap();
    assert_eq!(fake.accepted.lock().unwrap().as_slice(), &[(77, fwd)]);

    let bad = OperatorRequest { group: "nope".into(), action: OperatorAction::Stop };
    let e = tandem_node::api::peer::deliver(&mut client, "localhost", 78, &bad).await.unwrap_err();
    assert!(e.to_string().starts_with("peer localhost refused command #78: no group named \"nope\""), "{e}");

    // The peer's certificate must name the node we meant.
    let e = tandem_node::api::peer::connect("node-b", server.addr, &settings, BOUND).await.unwrap_err();
    assert!(matches!(e, tandem_node::api::peer::PeerError::Connect { .. }), "{e}");
    server.stop().await.unwrap();
}
