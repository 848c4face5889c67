//! The guest's link task and its host-cluster fencing over the link.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_config::LinkAddress;
use tandem_monitors::Secret;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use super::proof;
use super::transport::{self, TransportError};
use crate::api::{Control, pb};
use crate::fence::{FenceVmFuture, HostClusterFencing, HostFenceError};

use pb::guest_to_host::Msg as Up;
use pb::host_to_guest::Msg as Down;

/// How long each handshake step may take.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// How often the group picture is compared with the last summary sent.
const SUMMARY_CHECK: Duration = Duration::from_secs(1);
/// A summary is sent at least this often, changed or not.
const SUMMARY_REFRESH: Duration = Duration::from_secs(10);
/// Reconnection backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What the guest's link needs.
#[derive(Debug, Clone)]
pub struct GuestLinkConfig {
    /// Where the host agent listens.
    pub address: LinkAddress,
    /// The VM this node runs in.
    pub vm_uuid: String,
    /// The VM's link key.
    pub key: Secret,
    /// How often to send a heartbeat (the host may ask for a shorter interval).
    pub heartbeat_interval: Duration,
    /// This node's cluster and name, for the host's display.
    pub cluster: String,
    /// This node's name.
    pub node: String,
    /// TLS for a `tcp:` address.
    pub tls: Option<transport::LinkTls>,
}

/// Why one link session ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkSessionError {
    /// The host agent could not be reached.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The host agent refused the link or closed it with an error.
    #[error("the host agent ended the link: {}", .0.message())]
    Refused(tonic::Status),
    /// The host could not prove it holds this VM's key: it is not this VM's host agent (or
    /// the keys differ). Its orders are never followed.
    #[error(
        "the host agent {host:?} failed to prove it holds this VM's link key: refusing it (check that [host_link] \
         key_file matches the host's link_key_file for VM {vm_uuid})"
    )]
    HostNotAuthenticated {
        /// The name the host gave.
        host: String,
        /// This VM.
        vm_uuid: String,
    },
    /// The host sent something the protocol does not allow at this point.
    #[error("protocol error from the host agent: {0}")]
    Protocol(String),
    /// A handshake step took too long.
    #[error("the host agent did not complete the handshake within {} s", HANDSHAKE_LIMIT.as_secs())]
    HandshakeTimeout,
    /// The host agent closed the link.
    #[error("the host agent closed the link")]
    Closed,
}

/// The host this guest is linked to right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedHost {
    /// The host agent's node name.
    pub host: String,
    /// The address it was reached at.
    pub address: String,
}

type FenceAnswer = Result<pb::FenceVmResponse, String>;

#[derive(Debug, Default)]
struct Shared {
    /// The open session's sender, `None` while the link is down.
    session: Mutex<Option<(mpsc::Sender<pb::GuestToHost>, LinkedHost)>>,
    /// Fence requests waiting for the host's answer.
    pending: Mutex<HashMap<u64, oneshot::Sender<FenceAnswer>>>,
    next_id: AtomicU64,
}

/// A guest's link to its host agent (see the module documentation).
#[derive(Debug, Clone)]
pub struct GuestLink {
    config: Arc<GuestLinkConfig>,
    shared: Arc<Shared>,
}

impl GuestLink {
    /// A link that is not running yet; [`GuestLink::spawn`] runs it.
    pub fn new(config: GuestLinkConfig) -> GuestLink {
        GuestLink { config: Arc::new(config), shared: Arc::default() }
    }

    /// The host this guest is linked to, while it is.
    pub fn linked(&self) -> Option<LinkedHost> {
        self.shared.session.lock().expect("not poisoned").as_ref().map(|(_, h)| h.clone())
    }

    /// Host-cluster fencing over this link: each request goes to the host agent as a
    /// `LinkFenceRequest`; while the link is down every request fails (never succeeds).
    pub fn fencing(&self) -> Arc<dyn HostClusterFencing> {
        Arc::new(LinkFencing { shared: self.shared.clone() })
    }

    /// Runs the link until the process ends: connect (with backoff), handshake, then
    /// heartbeats, summaries and the host's requests, served with `control`.
    pub fn spawn(&self, control: Arc<dyn Control>) -> tokio::task::JoinHandle<()> {
        let link = self.clone();
        tokio::spawn(async move {
            let mut backoff = BACKOFF_MIN;
            loop {
                let started = tokio::time::Instant::now();
                let result = link.session(&control).await;
                link.shared.session.lock().expect("not poisoned").take();
                // Requests waiting for this session's answers fail at once (their senders drop).
                link.shared.pending.lock().expect("not poisoned").clear();
                if let Err(e) = result {
                    warn!(target: "tandem_node::link", "host link to {}: {e}", link.config.address);
                }
                // A session that lasted resets the backoff: this was a loss, not a refusal loop.
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = BACKOFF_MIN;
                }
                let jitter = Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        })
    }

    async fn session(&self, control: &Arc<dyn Control>) -> Result<(), LinkSessionError> {
        let cfg = &self.config;
        let channel = transport::connect(&cfg.address, cfg.tls.as_ref(), transport::CONNECT_TIMEOUT).await?;
        let mut client = pb::host_link_client::HostLinkClient::new(channel);
        let (tx, rx) = mpsc::channel::<pb::GuestToHost>(64);
        let guest_nonce = proof::nonce();
        let hello = pb::LinkHello {
            vm_uuid: cfg.vm_uuid.clone(),
            guest_nonce: guest_nonce.to_vec(),
            guest_cluster: cfg.cluster.clone(),
            node_name: cfg.node.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        tx.send(up(Up::Hello(hello))).await.map_err(|_| LinkSessionError::Closed)?;
        let mut inbound = tokio::time::timeout(HANDSHAKE_LIMIT, client.attach(ReceiverStream::new(rx)))
            .await
            .map_err(|_| LinkSessionError::HandshakeTimeout)?
            .map_err(LinkSessionError::Refused)?
            .into_inner();
        let Some(Down::Challenge(challenge)) = next(&mut inbound).await? else {
            return Err(LinkSessionError::Protocol("expected a challenge first".into()));
        };
        let uuid = proof::canonical_uuid(&cfg.vm_uuid).unwrap_or_else(|| cfg.vm_uuid.clone());
        if challenge.host_nonce.len() != proof::NONCE_LEN
            || !proof::verify_host_proof(&cfg.key, &uuid, &guest_nonce, &challenge.host_nonce, &challenge.host_proof)
        {
            return Err(LinkSessionError::HostNotAuthenticated { host: challenge.host_name, vm_uuid: uuid });
        }
        let guest_proof = proof::guest_proof(&cfg.key, &uuid, &challenge.host_nonce, &guest_nonce);
        tx.send(up(Up::Proof(pb::LinkProof { guest_proof }))).await.map_err(|_| LinkSessionError::Closed)?;
        let Some(Down::Welcome(welcome)) = next(&mut inbound).await? else {
            return Err(LinkSessionError::Protocol("expected a welcome after the proof".into()));
        };
        let interval = match welcome.heartbeat_interval_ms {
            0 => cfg.heartbeat_interval,
            ms => cfg.heartbeat_interval.min(Duration::from_millis(u64::from(ms))),
        };
        let host = LinkedHost { host: challenge.host_name.clone(), address: cfg.address.to_string() };
        *self.shared.session.lock().expect("not poisoned") = Some((tx.clone(), host));
        info!(target: "tandem_node::link", "linked to host agent {} at {} as VM {uuid}", challenge.host_name, cfg.address);

        let mut heartbeat = tokio::time::interval(interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut summary_check = tokio::time::interval(SUMMARY_CHECK);
        let mut last_summary: Option<(pb::GuestSummary, tokio::time::Instant)> = None;
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    seq += 1;
                    tx.send(up(Up::Heartbeat(pb::GuestHeartbeat { seq }))).await.map_err(|_| LinkSessionError::Closed)?;
                }
                _ = summary_check.tick() => {
                    let Ok(status) = control.status().await else { continue };
                    let summary = summarize(&status);
                    let stale = last_summary.as_ref().is_none_or(|(s, at)| *s != summary || at.elapsed() >= SUMMARY_REFRESH);
                    if stale {
                        tx.send(up(Up::Summary(summary.clone()))).await.map_err(|_| LinkSessionError::Closed)?;
                        last_summary = Some((summary, tokio::time::Instant::now()));
                    }
                }
                m = inbound.message() => match m {
                    Err(status) => return Err(LinkSessionError::Refused(status)),
                    Ok(None) => return Err(LinkSessionError::Closed),
                    Ok(Some(pb::HostToGuest { msg: Some(Down::PrepareShutdown(p)) })) => {
                        info!(target: "tandem_node::link", "host agent {} asks for a planned shutdown (request {})", challenge.host_name, p.request_id);
                        tokio::spawn(serve_prepare_shutdown(control.clone(), tx.clone(), p.request_id));
                    }
                    Ok(Some(pb::HostToGuest { msg: Some(Down::FenceReply(r)) })) => {
                        let waiting = self.shared.pending.lock().expect("not poisoned").remove(&r.request_id);
                        if let Some(w) = waiting {
                            let answer = match r.result {
                                Some(pb::link_fence_reply::Result::Response(resp)) => Ok(resp),
                                Some(pb::link_fence_reply::Result::Error(e)) => Err(format!("{} ({})", e.message, tonic::Code::from(e.code))),
                                None => Err("the host agent answered without a result".into()),
                            };
                            let _ = w.send(answer);
                        }
                    }
                    Ok(Some(other)) => {
                        return Err(LinkSessionError::Protocol(format!("unexpected message after the handshake: {:?}", other.msg)));
                    }
                },
            }
        }
    }
}

/// The next handshake message, within the handshake limit.
async fn next(inbound: &mut tonic::Streaming<pb::HostToGuest>) -> Result<Option<Down>, LinkSessionError> {
    match tokio::time::timeout(HANDSHAKE_LIMIT, inbound.message()).await {
        Err(_) => Err(LinkSessionError::HandshakeTimeout),
        Ok(Err(status)) => Err(LinkSessionError::Refused(status)),
        Ok(Ok(None)) => Err(LinkSessionError::Closed),
        Ok(Ok(Some(m))) => Ok(m.msg),
    }
}

fn up(msg: Up) -> pb::GuestToHost {
    pb::GuestToHost { msg: Some(msg) }
}

/// The groups as the host shows them.
fn summarize(status: &pb::GuestStatus) -> pb::GuestSummary {
    pb::GuestSummary {
        groups: status
            .groups
            .iter()
            .map(|g| pb::GuestGroupSummary {
                name: g.name.clone(),
                state: g.state,
                active_here: g.location == status.node
                    && matches!(
                        g.state(),
                        pb::GroupState::Started | pb::GroupState::Starting | pb::GroupState::Stopping
                    ),
                fencing_token: g.fencing_token,
            })
            .collect(),
    }
}

/// Runs the node's planned shutdown and streams its progress to the host.
async fn serve_prepare_shutdown(control: Arc<dyn Control>, tx: mpsc::Sender<pb::GuestToHost>, request_id: u64) {
    let send = |progress: pb::ShutdownProgress| {
        tx.send(up(Up::ShutdownProgress(pb::LinkShutdownProgress { request_id, progress: Some(progress) })))
    };
    match control.prepare_shutdown().await {
        Ok(mut rx) => {
            while let Some(p) = rx.recv().await {
                if send(p).await.is_err() {
                    // The link dropped: the drain goes on regardless (it is never cancelled).
                    return;
                }
            }
        }
        Err(e) => {
            let done = pb::ShutdownDone { safe_to_power_off: false, blockers: vec![format!("the guest refused: {e}")] };
            let _ = send(pb::ShutdownProgress { progress: Some(pb::shutdown_progress::Progress::Done(done)) }).await;
        }
    }
}

/// Host-cluster fencing over the link.
#[derive(Debug)]
struct LinkFencing {
    shared: Arc<Shared>,
}

/// Removes a fence request's entry when its caller gives up (timeout).
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending.lock().expect("not poisoned").remove(&self.id);
    }
}

impl HostClusterFencing for LinkFencing {
    fn fence_vm(&self, request: pb::FenceVmRequest) -> FenceVmFuture<'_> {
        Box::pin(async move {
            let vm_uuid = request.vm_uuid.clone();
            let failed = |detail: String| HostFenceError::Request { vm_uuid: vm_uuid.clone(), detail };
            let Some((tx, host)) = self.shared.session.lock().expect("not poisoned").clone() else {
                return Err(failed("the link to this node's host agent is down; retrying".into()));
            };
            let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed) + 1;
            let (answer_tx, answer_rx) = oneshot::channel();
            self.shared.pending.lock().expect("not poisoned").insert(id, answer_tx);
            let _guard = PendingGuard { shared: &self.shared, id };
            tx.send(up(Up::FenceRequest(pb::LinkFenceRequest { request_id: id, request: Some(request) })))
                .await
                .map_err(|_| {
                    failed(format!("the link to host agent {} dropped before the request was sent", host.host))
                })?;
            match answer_rx.await {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(detail)) => Err(failed(format!("host agent {}: {detail}", host.host))),
                Err(_) => Err(failed(format!("the link to host agent {} dropped before it answered", host.host))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fencing_fails_while_the_link_is_down() {
        let link = GuestLink::new(GuestLinkConfig {
            address: LinkAddress::Unix("/nonexistent/link.sock".into()),
            vm_uuid: "4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b01".into(),
            key: Secret::new("0123456789abcdef"),
            heartbeat_interval: Duration::from_secs(1),
            cluster: "c".into(),
            node: "a".into(),
            tls: None,
        });
        assert_eq!(link.linked(), None);
        let e = link
            .fencing()
            .fence_vm(pb::FenceVmRequest { vm_uuid: "x".into(), ..Default::default() })
            .await
            .unwrap_err();
        assert!(matches!(e, HostFenceError::Request { .. }), "{e}");
        assert!(e.to_string().contains("link to this node's host agent is down"), "{e}");
        assert!(!e.is_permanent());
    }

    #[test]
    fn summaries_mark_the_groups_active_here() {
        let g = |name: &str, state: pb::GroupState, location: &str| pb::GroupStatus {
            name: name.into(),
            state: state as i32,
            location: location.into(),
            fencing_token: Some(7),
            ..Default::default()
        };
        let status = pb::GuestStatus {
            node: "a".into(),
            groups: vec![
                g("here", pb::GroupState::Started, "a"),
                g("there", pb::GroupState::Started, "b"),
                g("off", pb::GroupState::Stopped, "a"),
            ],
            ..Default::default()
        };
        let s = summarize(&status);
        let active: Vec<(&str, bool)> = s.groups.iter().map(|g| (g.name.as_str(), g.active_here)).collect();
        assert_eq!(active, [("here", true), ("there", false), ("off", false)]);
        assert_eq!(s.groups[0].fencing_token, Some(7));
    }
}
