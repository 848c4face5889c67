//! The handshake and the session against in-process peers: the real guest client
//! (`tandem_node::link::GuestLink`) and a raw client that sends whatever a test wants.

use std::sync::Arc;
use std::time::Duration;

use tandem_config::{GuestLinkSettings, LinkAddress};
use tandem_monitors::Secret;
use tandem_node::api::{BoxFuture, Control, ControlError, OperatorAck, OperatorRequest, pb};
use tandem_node::link::{GuestLink, GuestLinkConfig, proof};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::*;

const A: &str = "4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b01";
const B: &str = "4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b02";
const KEY_A: &str = "key-of-vm-a-0123456789";
const KEY_B: &str = "key-of-vm-b-0123456789";

struct Host {
    registry: Arc<LinkRegistry>,
    tcp: std::net::SocketAddr,
    socket_a: PathBuf,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn host() -> Host {
    let dir = tempfile::tempdir().unwrap();
    let vm = |name: &str, uuid: &str, key: &str, uds: Option<PathBuf>| LinkedVm {
        name: name.into(),
        uuid: uuid.into(),
        key: Some(Secret::new(key)),
        guest_cluster: Some("pg".into()),
        heartbeat_timeout: None,
        vsock_uds: uds,
    };
    let registry = LinkRegistry::new(
        "hv1",
        vec![
            vm("a", A, KEY_A, Some(dir.path().join("a.vsock"))),
            vm("b", B, KEY_B, None),
            LinkedVm { key: None, ..vm("nokey", "4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b03", "", None) },
        ],
    );
    let stop = CancellationToken::new();
    let settings = GuestLinkSettings { listen: Some("127.0.0.1:0".parse().unwrap()), vsock_port: 7702, tls: None };
    let l = serve(registry.clone(), Some(&settings), stop.clone()).await.unwrap();
    assert_eq!(l.sockets, vec![("a".to_string(), dir.path().join("a.vsock_7702"))]);
    Host { registry, tcp: l.tcp.unwrap(), socket_a: dir.path().join("a.vsock_7702"), stop, _dir: dir }
}

/// A raw link: what the test sends, and what the host answers.
struct Raw {
    tx: mpsc::Sender<pb::GuestToHost>,
    rx: tonic::Streaming<pb::HostToGuest>,
}

async fn raw(address: &LinkAddress) -> Raw {
    let channel = tandem_node::link::connect(address, None, Duration::from_secs(5)).await.unwrap();
    let (tx, out) = mpsc::channel(8);
    let rx =
        pb::host_link_client::HostLinkClient::new(channel).attach(ReceiverStream::new(out)).await.unwrap().into_inner();
    Raw { tx, rx }
}

fn up(m: pb::guest_to_host::Msg) -> pb::GuestToHost {
    pb::GuestToHost { msg: Some(m) }
}

fn hello(uuid: &str, nonce: &[u8]) -> pb::GuestToHost {
    up(pb::guest_to_host::Msg::Hello(pb::LinkHello {
        vm_uuid: uuid.into(),
        guest_nonce: nonce.to_vec(),
        guest_cluster: "pg".into(),
        node_name: "n1".into(),
        agent_version: "test".into(),
    }))
}

impl Raw {
    async fn next(&mut self) -> Result<pb::host_to_guest::Msg, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(10), self.rx.message()).await.expect("an answer in time") {
            Ok(Some(m)) => Ok(m.msg.expect("a message")),
            Ok(None) => Err(tonic::Status::cancelled("closed")),
            Err(s) => Err(s),
        }
    }

    /// Sends a hello, reads the challenge, answers with `proof_of(host_nonce, guest_nonce)`.
    async fn handshake(
        &mut self,
        uuid: &str,
        proof_of: impl FnOnce(&[u8], &[u8]) -> Vec<u8>,
    ) -> Result<pb::host_to_guest::Msg, tonic::Status> {
        let gn = proof::nonce();
        self.tx.send(hello(uuid, &gn)).await.unwrap();
        let pb::host_to_guest::Msg::Challenge(c) = self.next().await? else { panic!("expected a challenge") };
        assert_eq!(c.host_name, "hv1");
        let p = proof_of(&c.host_nonce, &gn);
        self.tx.send(up(pb::guest_to_host::Msg::Proof(pb::LinkProof { guest_proof: p }))).await.unwrap();
        self.next().await
    }
}

fn proof_with(key: &str, uuid: &str) -> impl FnOnce(&[u8], &[u8]) -> Vec<u8> {
    let (key, uuid) = (Secret::new(key), uuid.to_string());
    move |hn, gn| proof::guest_proof(&key, &uuid, hn, gn)
}

#[tokio::test]
async fn the_right_key_is_welcomed_and_shown() {
    let h = host().await;
    let mut r = raw(&LinkAddress::Tcp { host: "127.0.0.1".into(), port: h.tcp.port() }).await;
    // Upper case is the same UUID.
    let m = r.handshake(&A.to_uppercase(), proof_with(KEY_A, A)).await.unwrap();
    assert!(matches!(m, pb::host_to_guest::Msg::Welcome(_)), "{m:?}");
    let view = h.registry.view(A).unwrap();
    assert!(view.connected && view.ever_linked, "{view:?}");
    assert_eq!((view.transport.as_str(), view.node_name.as_str(), view.guest_cluster.as_str()), ("tcp", "n1", "pg"));
    assert!(view.peer.starts_with("127.0.0.1:"), "{view:?}");
    // The VM without a key has no link to show; unknown VMs neither.
    assert_eq!(h.registry.view("4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b03"), None);
    assert_eq!(h.registry.view("00000000-0000-4000-8000-000000000000"), None);
    drop(r);
    let lost = wait_for(|| h.registry.view(A).filter(|v| !v.connected)).await;
    assert!(lost.ever_linked, "{lost:?}");
}

async fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..100 {
        if let Some(t) = f() {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not met within 5 s");
}

#[tokio::test]
async fn impostors_are_refused() {
    let h = host().await;
    let tcp = LinkAddress::Tcp { host: "127.0.0.1".into(), port: h.tcp.port() };
    let code = |r: Result<pb::host_to_guest::Msg, tonic::Status>| r.map(|m| format!("{m:?}")).unwrap_err().code();

    // Wrong key.
    let mut r = raw(&tcp).await;
    assert_eq!(code(r.handshake(A, proof_with("not the key of vm a!!", A)).await), Code::Unauthenticated);
    // Claiming another VM: B's UUID with A's key.
    let mut r = raw(&tcp).await;
    assert_eq!(code(r.handshake(B, proof_with(KEY_A, B)).await), Code::Unauthenticated);
    // An unknown UUID, and a VM without a link key: refused before any challenge.
    for uuid in ["00000000-0000-4000-8000-000000000000", "4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b03"] {
        let mut r = raw(&tcp).await;
        r.tx.send(hello(uuid, &proof::nonce())).await.unwrap();
        let e = r.next().await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("no VM"), "{e:?}");
    }
    // B, with B's right key, on A's own socket: a socket speaks only for its VM.
    let mut r = raw(&LinkAddress::Unix(h.socket_a.clone())).await;
    let e = r.handshake(B, proof_with(KEY_B, B)).await;
    assert_eq!(code(e), Code::Unauthenticated);
    // ...while A there is welcome, as vsock.
    let mut r = raw(&LinkAddress::Unix(h.socket_a.clone())).await;
    assert!(matches!(r.handshake(A, proof_with(KEY_A, A)).await, Ok(pb::host_to_guest::Msg::Welcome(_))));
    assert_eq!(h.registry.view(A).unwrap().transport, "vsock");
    assert!(!h.registry.is_linked(B));
}

#[tokio::test]
async fn a_replayed_proof_is_refused() {
    let h = host().await;
    let tcp = LinkAddress::Tcp { host: "127.0.0.1".into(), port: h.tcp.port() };
    // A recorded session: its nonce and proof.
    let mut first = raw(&tcp).await;
    let gn = proof::nonce();
    first.tx.send(hello(A, &gn)).await.unwrap();
    let pb::host_to_guest::Msg::Challenge(c) = first.next().await.unwrap() else { panic!() };
    let recorded = proof::guest_proof(&Secret::new(KEY_A), A, &c.host_nonce, &gn);
    // Replayed on a new connection with the same guest nonce: the host's nonce is new.
    let mut r = raw(&tcp).await;
    r.tx.send(hello(A, &gn)).await.unwrap();
    let pb::host_to_guest::Msg::Challenge(c2) = r.next().await.unwrap() else { panic!() };
    assert_ne!(c.host_nonce, c2.host_nonce);
    r.tx.send(up(pb::guest_to_host::Msg::Proof(pb::LinkProof { guest_proof: recorded }))).await.unwrap();
    assert_eq!(r.next().await.unwrap_err().code(), Code::Unauthenticated);
    assert!(!h.registry.is_linked(A));
}

#[tokio::test]
async fn garbage_is_refused_without_harm() {
    let h = host().await;
    let tcp = LinkAddress::Tcp { host: "127.0.0.1".into(), port: h.tcp.port() };
    let cases: Vec<pb::GuestToHost> = vec![
        up(pb::guest_to_host::Msg::Heartbeat(pb::GuestHeartbeat { seq: 1 })),
        pb::GuestToHost { msg: None },
        hello("not-a-uuid", &proof::nonce()),
        hello(A, b"short"),
        up(pb::guest_to_host::Msg::Proof(pb::LinkProof { guest_proof: vec![0; 32] })),
    ];
    for m in cases {
        let mut r = raw(&tcp).await;
        r.tx.send(m.clone()).await.unwrap();
        let e = r.next().await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{m:?}: {e:?}");
    }
    // A hello and then a heartbeat instead of the proof.
    let mut r = raw(&tcp).await;
    r.tx.send(hello(A, &proof::nonce())).await.unwrap();
    assert!(matches!(r.next().await, Ok(pb::host_to_guest::Msg::Challenge(_))));
    r.tx.send(up(pb::guest_to_host::Msg::Heartbeat(pb::GuestHeartbeat { seq: 1 }))).await.unwrap();
    assert_eq!(r.next().await.unwrap_err().code(), Code::InvalidArgument);
    // The host still serves the honest guest.
    let mut r = raw(&tcp).await;
    assert!(matches!(r.handshake(A, proof_with(KEY_A, A)).await, Ok(pb::host_to_guest::Msg::Welcome(_))));
}

/// A guest's node as the link sees it: one group, and a planned shutdown that reports it.
struct FakeNode;

impl Control for FakeNode {
    fn status(&self) -> BoxFuture<'_, Result<pb::GuestStatus, ControlError>> {
        Box::pin(async {
            Ok(pb::GuestStatus {
                node: "n1".into(),
                groups: vec![pb::GroupStatus {
                    name: "app".into(),
                    state: pb::GroupState::Started as i32,
                    location: "n1".into(),
                    fencing_token: Some(3),
                    ..Default::default()
                }],
                ..Default::default()
            })
        })
    }
    fn operator(&self, _: OperatorRequest) -> BoxFuture<'_, Result<OperatorAck, ControlError>> {
        Box::pin(async { Err(ControlError::Internal("not here".into())) })
    }
    fn deliver(&self, _: u64, _: OperatorRequest) -> BoxFuture<'_, Result<(), ControlError>> {
        Box::pin(async { Ok(()) })
    }
    fn prepare_shutdown(&self) -> BoxFuture<'_, Result<mpsc::Receiver<pb::ShutdownProgress>, ControlError>> {
        Box::pin(async {
            let (tx, rx) = mpsc::channel(4);
            tx.send(pb::ShutdownProgress {
                progress: Some(pb::shutdown_progress::Progress::Group(pb::ShutdownGroupProgress {
                    group: "app".into(),
                    step: pb::ShutdownStep::Done as i32,
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
            tx.send(pb::ShutdownProgress {
                progress: Some(pb::shutdown_progress::Progress::Done(pb::ShutdownDone {
                    safe_to_power_off: true,
                    blockers: vec![],
                })),
            })
            .await
            .unwrap();
            Ok(rx)
        })
    }
    fn subscribe(&self) -> broadcast::Receiver<pb::Event> {
        broadcast::channel(1).1
    }
}

fn guest(address: LinkAddress, uuid: &str, key: &str) -> GuestLink {
    GuestLink::new(GuestLinkConfig {
        address,
        vm_uuid: uuid.into(),
        key: Secret::new(key),
        heartbeat_interval: Duration::from_millis(100),
        cluster: "pg".into(),
        node: "n1".into(),
        tls: None,
    })
}

struct Fencer;

#[tonic::async_trait]
impl GuestFenceHandler for Fencer {
    async fn fence_vm(&self, asker: &str, req: pb::FenceVmRequest) -> Result<pb::FenceVmResponse, Status> {
        Ok(pb::FenceVmResponse {
            outcome: pb::FenceVmOutcome::PoweredOff as i32,
            hypervisor: "hv1".into(),
            detail: format!("{asker} fenced {}", req.vm_uuid),
        })
    }
}

#[tokio::test]
async fn a_real_guest_links_reports_drains_and_fences() {
    let h = host().await;
    let g = guest(LinkAddress::Unix(h.socket_a.clone()), A, KEY_A);
    let task = g.spawn(Arc::new(FakeNode));
    let view = wait_for(|| h.registry.view(A).filter(|v| v.connected && !v.groups.is_empty())).await;
    assert_eq!(view.groups[0].name, "app");
    assert!(view.groups[0].active_here && view.groups[0].fencing_token == Some(3), "{view:?}");
    assert_eq!(g.linked().unwrap().host, "hv1");
    let before = h.registry.last_heartbeat(A).unwrap();
    wait_for(|| h.registry.last_heartbeat(A).filter(|t| *t > before)).await;

    // Planned shutdown: progress, then the guest's own ShutdownDone.
    let mut rx = h.registry.prepare_shutdown(A).await.unwrap();
    let first = rx.recv().await.unwrap().unwrap();
    assert!(matches!(first.progress, Some(pb::shutdown_progress::Progress::Group(ref g)) if g.group == "app"));
    let last = rx.recv().await.unwrap().unwrap();
    assert!(
        matches!(last.progress, Some(pb::shutdown_progress::Progress::Done(ref d)) if d.safe_to_power_off),
        "{last:?}"
    );
    assert!(rx.recv().await.is_none());
    assert_eq!(
        h.registry.prepare_shutdown(B).await.unwrap_err(),
        LinkError::NotLinked { vm: "b".into(), host: "hv1".into() }
    );

    // Fencing: refused while the host has no fencer, never success; then served.
    let req = pb::FenceVmRequest { vm_uuid: B.into(), cluster: "pg".into(), timeout_ms: 5000, ..Default::default() };
    let e = g.fencing().fence_vm(req.clone()).await.unwrap_err();
    assert!(e.to_string().contains("host-cluster fencing is not enabled on host hv1"), "{e}");
    h.registry.set_fence_handler(Arc::new(Fencer));
    let ok = g.fencing().fence_vm(req).await.unwrap();
    assert_eq!(ok.detail, format!("{A} fenced {B}"));
    // Its own VM, and VMs outside the registry, are refused.
    let own = pb::FenceVmRequest { vm_uuid: A.into(), ..Default::default() };
    assert!(g.fencing().fence_vm(own).await.is_err());

    // The guest goes away: the link is lost, reported, and fencing over it fails.
    task.abort();
    let _ = task.await;
    drop(g);
    let lost = wait_for(|| h.registry.view(A).filter(|v| !v.connected)).await;
    assert!(lost.ever_linked);
}

#[tokio::test]
async fn a_guest_refuses_a_host_that_cannot_prove_the_key() {
    // The host holds another key for VM A: its challenge proof is wrong for this guest.
    let dir = tempfile::tempdir().unwrap();
    let registry = LinkRegistry::new(
        "hv1",
        vec![LinkedVm {
            name: "a".into(),
            uuid: A.into(),
            key: Some(Secret::new("the host's wrong key for a")),
            guest_cluster: None,
            heartbeat_timeout: None,
            vsock_uds: Some(dir.path().join("a.vsock")),
        }],
    );
    let stop = CancellationToken::new();
    serve(registry.clone(), None, stop.clone()).await.unwrap();
    let g = guest(LinkAddress::Unix(dir.path().join("a.vsock_7702")), A, KEY_A);
    let task = g.spawn(Arc::new(FakeNode));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The guest never proved itself (it stopped at the host's bad proof), and is not linked.
    assert_eq!(g.linked(), None);
    assert!(!registry.is_linked(A));
    assert!(registry.view(A).is_some_and(|v| !v.ever_linked));
    task.abort();
    stop.cancel();
}
