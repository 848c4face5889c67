//! The `HostLink` service: the handshake, then the session's messages.

use std::sync::Arc;
use std::time::Duration;

use tandem_node::api::pb;
use tandem_node::link::proof;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::warn;

use super::{Attached, LinkRegistry};

use pb::guest_to_host::Msg as Up;
use pb::host_to_guest::Msg as Down;

/// How long each handshake step may take.
pub(crate) const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// One listener's `HostLink` service.
#[derive(Debug, Clone)]
pub(crate) struct HostLinkService {
    pub registry: Arc<LinkRegistry>,
    /// `tcp`, `unix` (a per-VM vsock socket counts as `vsock`).
    pub transport: &'static str,
    /// The VM a per-VM socket belongs to: links there may claim only it.
    pub bound: Option<String>,
    /// The socket path, for per-VM sockets (their peers have no address).
    pub path: Option<String>,
}

/// Why a handshake failed: the status the guest gets, and the reason the log gets.
struct Refusal(Status);

fn refuse(code: tonic::Code, message: impl Into<String>) -> Refusal {
    Refusal(Status::new(code, message.into()))
}

#[tonic::async_trait]
impl pb::host_link_server::HostLink for HostLinkService {
    type AttachStream = ReceiverStream<Result<pb::HostToGuest, Status>>;

    async fn attach(&self, req: Request<Streaming<pb::GuestToHost>>) -> Result<Response<Self::AttachStream>, Status> {
        let peer = match (&self.path, req.remote_addr()) {
            (Some(p), _) => p.clone(),
            (None, Some(a)) => a.to_string(),
            (None, None) => "unknown peer".into(),
        };
        let (tx, rx) = mpsc::channel(64);
        let service = self.clone();
        tokio::spawn(async move { service.run(req.into_inner(), tx, peer).await });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl HostLinkService {
    async fn run(
        self,
        mut inbound: Streaming<pb::GuestToHost>,
        tx: mpsc::Sender<Result<pb::HostToGuest, Status>>,
        peer: String,
    ) {
        let mut claimed = String::from("(none)");
        let attached = match self.handshake(&mut inbound, &tx, &peer, &mut claimed).await {
            Ok(a) => a,
            Err(Refusal(status)) => {
                warn!(target: "tandem_host::link", peer = %peer, transport = self.transport, claimed_vm = %claimed,
                    "guest link refused: {}", status.message());
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        let uuid = attached.uuid.clone();
        let id = self.registry.attach(&attached, tx.clone());
        let why = loop {
            let msg = match inbound.message().await {
                Ok(Some(m)) => m.msg,
                Ok(None) => break "the guest closed the link".to_string(),
                Err(status) => break format!("the connection failed: {}", status.message()),
            };
            match msg {
                Some(Up::Heartbeat(_)) => self.registry.heartbeat(&uuid, id),
                Some(Up::Summary(s)) => self.registry.summary(&uuid, id, s.groups),
                Some(Up::ShutdownProgress(p)) => {
                    if let Some(progress) = p.progress {
                        self.registry.shutdown_progress(&uuid, id, p.request_id, progress).await;
                    }
                }
                Some(Up::FenceRequest(f)) => {
                    let (registry, tx, asker) = (self.registry.clone(), tx.clone(), uuid.clone());
                    tokio::spawn(async move {
                        let result = match f.request {
                            Some(req) => registry.fence(&asker, req).await,
                            None => Err(Status::invalid_argument("LinkFenceRequest without a request")),
                        };
                        let result = match result {
                            Ok(r) => pb::link_fence_reply::Result::Response(r),
                            Err(s) => pb::link_fence_reply::Result::Error(pb::LinkError {
                                code: s.code() as i32,
                                message: s.message().to_string(),
                            }),
                        };
                        let reply = pb::LinkFenceReply { request_id: f.request_id, result: Some(result) };
                        let _ = tx.send(Ok(pb::HostToGuest { msg: Some(Down::FenceReply(reply)) })).await;
                    });
                }
                Some(Up::Hello(_) | Up::Proof(_)) | None => {
                    let _ = tx
                        .send(Err(Status::invalid_argument("handshake messages are not allowed once the link is up")))
                        .await;
                    break "the guest broke the protocol (a handshake message after the handshake)".to_string();
                }
            }
        };
        self.registry.detach(&uuid, id, &why);
    }

    async fn handshake(
        &self,
        inbound: &mut Streaming<pb::GuestToHost>,
        tx: &mpsc::Sender<Result<pb::HostToGuest, Status>>,
        peer: &str,
        claimed: &mut String,
    ) -> Result<Attached, Refusal> {
        use tonic::Code;
        let hello = match next(inbound).await? {
            Up::Hello(h) => h,
            _ => return Err(refuse(Code::InvalidArgument, "the link starts with LinkHello")),
        };
        *claimed = hello.vm_uuid.chars().take(64).collect();
        let uuid = proof::canonical_uuid(&hello.vm_uuid)
            .ok_or_else(|| refuse(Code::InvalidArgument, "vm_uuid is not a UUID (8-4-4-4-12 hex digits)"))?;
        if hello.guest_nonce.len() != proof::NONCE_LEN {
            return Err(refuse(Code::InvalidArgument, format!("guest_nonce must be {} bytes", proof::NONCE_LEN)));
        }
        if let Some(bound) = &self.bound
            && *bound != uuid
        {
            return Err(refuse(
                Code::Unauthenticated,
                format!("this socket belongs to another VM ({bound}); a guest may only link for its own VM"),
            ));
        }
        let unknown = || {
            refuse(
                Code::Unauthenticated,
                format!("host {} has no VM {uuid} with a link key (link_key_file)", self.registry.host()),
            )
        };
        let vm = self.registry.vm(&uuid).ok_or_else(unknown)?;
        let key = vm.key.clone().ok_or_else(unknown)?;
        let host_nonce = proof::nonce();
        let challenge = pb::LinkChallenge {
            host_name: self.registry.host().to_string(),
            host_nonce: host_nonce.to_vec(),
            host_proof: proof::host_proof(&key, &uuid, &hello.guest_nonce, &host_nonce),
        };
        tx.send(Ok(pb::HostToGuest { msg: Some(Down::Challenge(challenge)) }))
            .await
            .map_err(|_| refuse(Code::Cancelled, "the guest went away"))?;
        let guest_proof = match next(inbound).await? {
            Up::Proof(p) => p.guest_proof,
            _ => return Err(refuse(Code::InvalidArgument, "expected LinkProof after the challenge")),
        };
        if !proof::verify_guest_proof(&key, &uuid, &host_nonce, &hello.guest_nonce, &guest_proof) {
            return Err(refuse(
                Code::Unauthenticated,
                format!("wrong proof for VM {uuid}: the guest does not hold this VM's link key"),
            ));
        }
        // A host that resets silent guests asks for heartbeats often enough to tell.
        let interval = vm.heartbeat_timeout.map(|t| (t / 4).as_millis().clamp(1, u128::from(u32::MAX)) as u32);
        let welcome = pb::LinkWelcome { heartbeat_interval_ms: interval.unwrap_or(0) };
        tx.send(Ok(pb::HostToGuest { msg: Some(Down::Welcome(welcome)) }))
            .await
            .map_err(|_| refuse(Code::Cancelled, "the guest went away"))?;
        let transport = if self.bound.is_some() { "vsock" } else { self.transport };
        Ok(Attached {
            uuid,
            transport,
            peer: peer.to_string(),
            node_name: hello.node_name.chars().take(128).collect(),
            guest_cluster: hello.guest_cluster.chars().take(128).collect(),
        })
    }
}

/// The next message of the handshake, within its time limit.
async fn next(inbound: &mut Streaming<pb::GuestToHost>) -> Result<Up, Refusal> {
    use tonic::Code;
    match tokio::time::timeout(HANDSHAKE_LIMIT, inbound.message()).await {
        Err(_) => Err(refuse(Code::Unauthenticated, "the handshake did not complete in time")),
        Ok(Err(status)) => Err(refuse(Code::InvalidArgument, format!("unreadable message: {}", status.message()))),
        Ok(Ok(None)) => Err(refuse(Code::Cancelled, "the guest closed the link during the handshake")),
        Ok(Ok(Some(pb::GuestToHost { msg: Some(m) }))) => Ok(m),
        Ok(Ok(Some(_))) => Err(refuse(Code::InvalidArgument, "empty message")),
    }
}
