//! The host–guest link, host side (`tandem.v1.HostLink`; docs/host-agent.md, "Guest link").
//!
//! Guest agents open the link to the host agent of the hypervisor their VM runs on and
//! keep it open; the host's requests travel down the same stream, so the host never needs
//! a guest's address. [`serve`] opens the listeners (`[guest_link] listen` over TCP, and one
//! Unix socket per VM with a `vsock_uds`, where a userspace vsock backend hands over the
//! guest's AF_VSOCK connections). Every link starts with a mutual proof of the VM's link
//! key (`tandem_node::link::proof`): a guest may only speak for its own VM, and only this
//! host agent can give it orders.
//!
//! The [`LinkRegistry`] is what the rest of the host agent uses: which guests are linked,
//! their heartbeats and group summaries, planned shutdown of a guest
//! ([`LinkRegistry::prepare_shutdown`]), and the guests' fence requests, which it hands to
//! a [`GuestFenceHandler`] once they are authorized.
//!
//! A lost link is only reported (an event and a log line): it is never a guest failure by
//! itself. The guest-heartbeat policy (`guest_heartbeat_timeout`, see [`heartbeat_expired`])
//! decides when silence resets a VM.

mod listen;
mod service;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tandem_config::{ClusterConfig, ResourceKind};
use tandem_monitors::Secret;
use tandem_node::api::pb;
use tandem_node::link::proof;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::{info, warn};

pub use listen::{LinkListeners, LinkServeError, serve};

/// One HA VM as the guest link knows it.
#[derive(Clone)]
pub struct LinkedVm {
    /// The VM's name (its failover group).
    pub name: String,
    /// The domain UUID, canonical (lowercase 8-4-4-4-12).
    pub uuid: String,
    /// The VM's link key; `None`: the VM has no guest link and every guest claiming it is refused.
    pub key: Option<Secret>,
    /// The guest cluster its guest belongs to (fencing is allowed only within one).
    pub guest_cluster: Option<String>,
    /// Reset the VM when its linked guest is silent this long (see [`heartbeat_expired`]).
    pub heartbeat_timeout: Option<Duration>,
    /// The base path of its userspace vsock socket (`vsock_uds`).
    pub vsock_uds: Option<PathBuf>,
}

impl std::fmt::Debug for LinkedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkedVm")
            .field("name", &self.name)
            .field("uuid", &self.uuid)
            .field("key", &self.key.as_ref().map(|_| "***"))
            .field("guest_cluster", &self.guest_cluster)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("vsock_uds", &self.vsock_uds)
            .finish()
    }
}

/// Why the link settings of a VM cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LinkConfigError {
    /// The VM's key file cannot be read or is too weak.
    #[error("VM {vm}: link_key_file {}", path.display())]
    Key {
        /// The VM.
        vm: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: proof::KeyError,
    },
}

/// The link settings of every HA VM of `cluster`, with their keys read.
pub fn linked_vms(
    config: &ClusterConfig,
    cluster: &crate::cluster::HostCluster,
) -> Result<Vec<LinkedVm>, LinkConfigError> {
    let mut out = Vec::new();
    for vm in &cluster.vms {
        let spec = config
            .group(&vm.group)
            .and_then(|g| g.resource(&vm.resource))
            .and_then(|r| if let ResourceKind::Vm(v) = &r.kind { Some(v) } else { None });
        let Some(spec) = spec else { continue };
        let key = match &spec.link_key_file {
            Some(path) => Some(proof::read_key(path).map_err(|source| LinkConfigError::Key {
                vm: vm.group.clone(),
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        out.push(LinkedVm {
            name: vm.group.clone(),
            uuid: vm.definition.uuid.to_string(),
            key,
            guest_cluster: spec.guest_cluster.clone(),
            heartbeat_timeout: spec.guest_heartbeat_timeout,
            vsock_uds: spec.vsock_uds.clone(),
        });
    }
    Ok(out)
}

/// Why a request over the link could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// No HA VM with that UUID.
    #[error("no HA VM with UUID {0}")]
    UnknownVm(String),
    /// The VM's guest is not linked to this host now.
    #[error("the guest agent of VM {vm} is not linked to host {host}")]
    NotLinked {
        /// The VM.
        vm: String,
        /// This host.
        host: String,
    },
    /// The link dropped before the guest finished.
    #[error("the link to the guest agent of VM {vm} was lost before it finished: {detail}")]
    Lost {
        /// The VM.
        vm: String,
        /// What ended the link.
        detail: String,
    },
}

/// Serves the guests' host-cluster fence requests (the host-side fencer). The registry
/// calls it only for requests it authorized: the asker is authenticated as the VM
/// `asker_uuid`, and the asker and the target VM belong to the same configured
/// `guest_cluster`.
#[tonic::async_trait]
pub trait GuestFenceHandler: Send + Sync + 'static {
    /// Powers `req.vm_uuid` off and confirms it; answers only once it is off, or with an error.
    async fn fence_vm(&self, asker_uuid: &str, req: pb::FenceVmRequest) -> Result<pb::FenceVmResponse, Status>;
}

/// Where link events go (the host agent's event feed).
pub type EventSink = Arc<dyn Fn(pb::event::Kind) + Send + Sync>;

/// The shutdown progress a guest streams back, or why it stopped.
pub type ShutdownReceiver = mpsc::Receiver<Result<pb::ShutdownProgress, LinkError>>;

struct Session {
    id: u64,
    tx: mpsc::Sender<Result<pb::HostToGuest, Status>>,
    shutdowns: HashMap<u64, mpsc::Sender<Result<pb::ShutdownProgress, LinkError>>>,
}

#[derive(Default)]
struct VmLinkState {
    session: Option<Session>,
    transport: String,
    peer: String,
    node_name: String,
    guest_cluster: String,
    /// Connected since (while connected) or lost at (while not).
    since: Option<Instant>,
    last_heartbeat: Option<Instant>,
    groups: Vec<pb::GuestGroupSummary>,
}

/// Everything this host agent knows about its guests' links (see the module documentation).
pub struct LinkRegistry {
    host: String,
    vms: BTreeMap<String, LinkedVm>,
    state: Mutex<BTreeMap<String, VmLinkState>>,
    fence: RwLock<Option<Arc<dyn GuestFenceHandler>>>,
    events: RwLock<Option<EventSink>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for LinkRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkRegistry").field("host", &self.host).field("vms", &self.vms.len()).finish_non_exhaustive()
    }
}

/// Details of an authenticated session, as the service reports them.
pub(crate) struct Attached {
    pub uuid: String,
    pub transport: &'static str,
    pub peer: String,
    pub node_name: String,
    pub guest_cluster: String,
}

impl LinkRegistry {
    /// A registry for host `host` and these VMs.
    pub fn new(host: impl Into<String>, vms: Vec<LinkedVm>) -> Arc<LinkRegistry> {
        Arc::new(LinkRegistry {
            host: host.into(),
            vms: vms.into_iter().map(|v| (v.uuid.to_ascii_lowercase(), v)).collect(),
            state: Mutex::default(),
            fence: RwLock::default(),
            events: RwLock::default(),
            next_id: AtomicU64::new(0),
        })
    }

    /// This host's name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The VM with this UUID (any case).
    pub fn vm(&self, uuid: &str) -> Option<&LinkedVm> {
        self.vms.get(&uuid.to_ascii_lowercase())
    }

    /// Every VM the registry knows.
    pub fn vms(&self) -> impl Iterator<Item = &LinkedVm> {
        self.vms.values()
    }

    /// Sets the handler of the guests' fence requests. Without one every request is
    /// answered FAILED_PRECONDITION, never success.
    pub fn set_fence_handler(&self, handler: Arc<dyn GuestFenceHandler>) {
        *self.fence.write().expect("not poisoned") = Some(handler);
    }

    /// Sets where link up/down events are published.
    pub fn set_event_sink(&self, sink: EventSink) {
        *self.events.write().expect("not poisoned") = Some(sink);
    }

    /// Whether the VM's guest is linked to this host now.
    pub fn is_linked(&self, uuid: &str) -> bool {
        self.state.lock().expect("not poisoned").get(&uuid.to_ascii_lowercase()).is_some_and(|s| s.session.is_some())
    }

    /// When this host last heard a heartbeat from the VM's guest, if ever.
    pub fn last_heartbeat(&self, uuid: &str) -> Option<Instant> {
        self.state.lock().expect("not poisoned").get(&uuid.to_ascii_lowercase()).and_then(|s| s.last_heartbeat)
    }

    /// The link of the VM as `GetClusterStatus` shows it; `None` when the VM has no link
    /// key (no guest link) or is unknown.
    pub fn view(&self, uuid: &str) -> Option<pb::GuestLink> {
        let uuid = uuid.to_ascii_lowercase();
        self.vms.get(&uuid)?.key.as_ref()?;
        let now = Instant::now();
        let ms = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t).as_millis() as u64).unwrap_or(0);
        let state = self.state.lock().expect("not poisoned");
        let Some(s) = state.get(&uuid) else { return Some(pb::GuestLink::default()) };
        let connected = s.session.is_some();
        Some(pb::GuestLink {
            connected,
            transport: s.transport.clone(),
            peer: s.peer.clone(),
            node_name: s.node_name.clone(),
            guest_cluster: s.guest_cluster.clone(),
            heartbeat_age_ms: if connected { ms(s.last_heartbeat.or(s.since)) } else { ms(s.since) },
            since_ms: ms(s.since),
            groups: s.groups.clone(),
            ever_linked: s.since.is_some(),
        })
    }

    /// Asks the VM's guest agent to prepare for shutdown (stop or move every group). The
    /// receiver yields its progress and ends with its `ShutdownDone`; if the link drops
    /// first, the last item is [`LinkError::Lost`] (a dropped link never looks like a
    /// finished drain). Dropping the receiver does not cancel the guest's drain.
    pub async fn prepare_shutdown(&self, uuid: &str) -> Result<ShutdownReceiver, LinkError> {
        let uuid = uuid.to_ascii_lowercase();
        let vm = self.vms.get(&uuid).ok_or_else(|| LinkError::UnknownVm(uuid.clone()))?;
        let not_linked = || LinkError::NotLinked { vm: vm.name.clone(), host: self.host.clone() };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(64);
        let down = {
            let mut state = self.state.lock().expect("not poisoned");
            let session = state.get_mut(&uuid).and_then(|s| s.session.as_mut()).ok_or_else(not_linked)?;
            session.shutdowns.insert(id, tx);
            session.tx.clone()
        };
        let msg = pb::HostToGuest {
            msg: Some(pb::host_to_guest::Msg::PrepareShutdown(pb::LinkPrepareShutdown { request_id: id })),
        };
        down.send(Ok(msg)).await.map_err(|_| not_linked())?;
        info!(target: "tandem_host::link", vm = %vm.name, request = id, "asked the guest agent to prepare for shutdown");
        Ok(rx)
    }

    fn publish(&self, text: String) {
        let sink = self.events.read().expect("not poisoned").clone();
        if let Some(sink) = sink {
            sink(pb::event::Kind::Notice(pb::Notice { notice: Some(pb::notice::Notice::Text(text)) }));
        }
    }

    /// Records an authenticated session; a session the VM had before is ended (the guest
    /// reconnected).
    pub(crate) fn attach(&self, a: &Attached, tx: mpsc::Sender<Result<pb::HostToGuest, Status>>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let old = {
            let mut state = self.state.lock().expect("not poisoned");
            let s = state.entry(a.uuid.clone()).or_default();
            let old = s.session.replace(Session { id, tx, shutdowns: HashMap::new() });
            s.transport = a.transport.to_string();
            s.peer = a.peer.clone();
            s.node_name = a.node_name.clone();
            s.guest_cluster = a.guest_cluster.clone();
            s.since = Some(Instant::now());
            s.last_heartbeat = Some(Instant::now());
            old
        };
        if let Some(old) = old {
            fail_shutdowns(old.shutdowns, self.name_of(&a.uuid), "the guest opened a new link");
            let _ = old.tx.try_send(Err(Status::aborted("replaced by a newer link from the same guest")));
        }
        let vm = self.name_of(&a.uuid);
        let text = format!(
            "guest link up: VM {vm}: guest {} of cluster {} linked over {} from {}",
            a.node_name, a.guest_cluster, a.transport, a.peer
        );
        info!(target: "tandem_host::link", "{text}");
        self.publish(text);
        id
    }

    /// Ends session `id` of the VM (if it is still the current one), reporting why.
    pub(crate) fn detach(&self, uuid: &str, id: u64, why: &str) {
        let ended = {
            let mut state = self.state.lock().expect("not poisoned");
            let Some(s) = state.get_mut(uuid) else { return };
            if s.session.as_ref().is_none_or(|cur| cur.id != id) {
                return;
            }
            s.since = Some(Instant::now());
            s.session.take()
        };
        if let Some(session) = ended {
            let vm = self.name_of(uuid);
            fail_shutdowns(session.shutdowns, vm.clone(), why);
            let text = format!(
                "guest link lost: VM {vm}: {why}; the VM is not treated as failed for this (see its heartbeats)"
            );
            warn!(target: "tandem_host::link", "{text}");
            self.publish(text);
        }
    }

    pub(crate) fn heartbeat(&self, uuid: &str, id: u64) {
        let mut state = self.state.lock().expect("not poisoned");
        if let Some(s) = state.get_mut(uuid).filter(|s| s.session.as_ref().is_some_and(|c| c.id == id)) {
            s.last_heartbeat = Some(Instant::now());
        }
    }

    pub(crate) fn summary(&self, uuid: &str, id: u64, groups: Vec<pb::GuestGroupSummary>) {
        let mut state = self.state.lock().expect("not poisoned");
        if let Some(s) = state.get_mut(uuid).filter(|s| s.session.as_ref().is_some_and(|c| c.id == id)) {
            s.groups = groups;
        }
    }

    /// Forwards one progress message of a planned shutdown to whoever asked for it.
    pub(crate) async fn shutdown_progress(&self, uuid: &str, id: u64, request: u64, progress: pb::ShutdownProgress) {
        let done = matches!(progress.progress, Some(pb::shutdown_progress::Progress::Done(_)));
        let to = {
            let mut state = self.state.lock().expect("not poisoned");
            let Some(session) = state.get_mut(uuid).and_then(|s| s.session.as_mut()).filter(|c| c.id == id) else {
                return;
            };
            if done { session.shutdowns.remove(&request) } else { session.shutdowns.get(&request).cloned() }
        };
        if let Some(to) = to {
            // The asker may have dropped its receiver: the guest's drain goes on regardless.
            let _ = to.send(Ok(progress)).await;
        }
    }

    /// Authorizes and serves a guest's fence request.
    pub(crate) async fn fence(&self, asker_uuid: &str, req: pb::FenceVmRequest) -> Result<pb::FenceVmResponse, Status> {
        let asker = self.vms.get(asker_uuid).ok_or_else(|| Status::permission_denied("unknown asker"))?;
        let target_uuid = proof::canonical_uuid(&req.vm_uuid).ok_or_else(|| {
            Status::invalid_argument(format!("{:?} is not a VM UUID (8-4-4-4-12 hex digits)", req.vm_uuid))
        })?;
        let target = self.vms.get(&target_uuid).ok_or_else(|| {
            Status::not_found(format!("no HA VM with UUID {target_uuid} in host cluster of {}", self.host))
        })?;
        if target_uuid == asker_uuid {
            return Err(Status::invalid_argument("a guest cannot ask to fence its own VM"));
        }
        match (&asker.guest_cluster, &target.guest_cluster) {
            (Some(a), Some(t)) if a == t => {}
            _ => {
                warn!(target: "tandem_host::link", asker = %asker.name, target = %target.name,
                    "refused a fence request: the VMs are not of one guest cluster");
                return Err(Status::permission_denied(format!(
                    "VM {} may not fence VM {}: both need the same guest_cluster in the host configuration",
                    asker.name, target.name
                )));
            }
        }
        let handler = self.fence.read().expect("not poisoned").clone();
        let Some(handler) = handler else {
            return Err(Status::failed_precondition(format!(
                "host-cluster fencing is not enabled on host {}",
                self.host
            )));
        };
        info!(target: "tandem_host::link", asker = %asker.name, target = %target.name, "guest asks to fence a VM");
        handler.fence_vm(asker_uuid, req).await
    }

    fn name_of(&self, uuid: &str) -> String {
        self.vms.get(uuid).map(|v| v.name.clone()).unwrap_or_else(|| uuid.to_string())
    }
}

fn fail_shutdowns(
    shutdowns: HashMap<u64, mpsc::Sender<Result<pb::ShutdownProgress, LinkError>>>,
    vm: String,
    why: &str,
) {
    for (_, tx) in shutdowns {
        let _ = tx.try_send(Err(LinkError::Lost { vm: vm.clone(), detail: why.to_string() }));
    }
}

/// The guest-heartbeat policy: how long the VM's guest has been silent, when that counts.
///
/// Only heartbeats heard since the VM last started count: a guest that never linked since
/// then (it is booting, has no agent, or the link cannot come up) never triggers a reset,
/// and neither do heartbeats from before a restart. Returns the silence when it reached
/// `timeout`, `None` otherwise.
pub fn heartbeat_expired(
    timeout: Duration,
    vm_started: Instant,
    last_heartbeat: Option<Instant>,
    now: Instant,
) -> Option<Duration> {
    let last = last_heartbeat.filter(|t| *t >= vm_started)?;
    let silent = now.saturating_duration_since(last);
    (silent >= timeout).then_some(silent)
}

/// A VM's planned stop asks its guest through the link: `PrepareShutdown`, then its
/// progress until `ShutdownDone` (see [`crate::vm::GuestShutdown`]).
impl crate::vm::GuestShutdown for LinkRegistry {
    fn prepare(
        &self,
        uuid: &str,
        limit: std::time::Duration,
    ) -> tandem_node::resources::BoxFuture<'_, crate::vm::GuestPrepared> {
        use crate::vm::GuestPrepared;
        let uuid = uuid.to_string();
        Box::pin(async move {
            let mut rx = match self.prepare_shutdown(&uuid).await {
                Ok(rx) => rx,
                Err(LinkError::NotLinked { .. } | LinkError::UnknownVm(_)) => return GuestPrepared::NoGuest,
                Err(e) => return GuestPrepared::NotReady(e.to_string()),
            };
            let mut moved = Vec::new();
            let wait = async {
                while let Some(item) = rx.recv().await {
                    match item {
                        Ok(pb::ShutdownProgress { progress: Some(pb::shutdown_progress::Progress::Group(g)) })
                            if g.step() == pb::ShutdownStep::Done =>
                        {
                            moved.push(if g.to.is_empty() {
                                format!("{} stopped", g.group)
                            } else {
                                format!("{} to {}", g.group, g.to)
                            });
                        }
                        Ok(pb::ShutdownProgress { progress: Some(pb::shutdown_progress::Progress::Done(d)) }) => {
                            return if d.safe_to_power_off {
                                GuestPrepared::Ready(if moved.is_empty() {
                                    "nothing of its cluster ran in it".to_string()
                                } else {
                                    format!("moved its groups: {}", moved.join(", "))
                                })
                            } else {
                                GuestPrepared::NotReady(format!("the guest reports: {}", d.blockers.join("; ")))
                            };
                        }
                        Ok(_) => {}
                        Err(e) => return GuestPrepared::NotReady(e.to_string()),
                    }
                }
                GuestPrepared::NotReady("the guest's progress ended without a verdict".into())
            };
            match tokio::time::timeout(limit, wait).await {
                Ok(answer) => answer,
                Err(_) => GuestPrepared::NotReady(format!(
                    "the guest did not report ready within {:.0} s (prepare_timeout)",
                    limit.as_secs_f64()
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_policy_counts_only_heartbeats_since_the_vm_started() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let timeout = s(30);
        // Never linked since the start: never a reset, however long.
        assert_eq!(heartbeat_expired(timeout, t0, None, t0 + s(3600)), None);
        // A heartbeat from before a restart does not count either.
        assert_eq!(heartbeat_expired(timeout, t0 + s(10), Some(t0 + s(5)), t0 + s(3600)), None);
        // Linked, then silent: not yet, then exactly at the timeout.
        assert_eq!(heartbeat_expired(timeout, t0, Some(t0 + s(10)), t0 + s(39)), None);
        assert_eq!(heartbeat_expired(timeout, t0, Some(t0 + s(10)), t0 + s(40)), Some(s(30)));
        assert_eq!(heartbeat_expired(timeout, t0, Some(t0 + s(10)), t0 + s(100)), Some(s(90)));
    }
}

#[cfg(test)]
mod handshake_tests;
