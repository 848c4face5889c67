//! The libvirt adapter: [`LibvirtHypervisor`] implements [`Hypervisor`] with the `virt` crate.
//!
//! * Every libvirt call blocks, so each runs in `spawn_blocking`, and connections are
//!   closed there too (closing a remote connection can block).
//! * Lifecycle events come from libvirt's default event loop, run on its own OS thread,
//!   through `virConnectDomainEventRegisterAny`; they reach tokio through a broadcast
//!   channel. Nothing polls.
//! * Remote connections (every daemon-backed URI, `qemu:///system` included) get keep-alive
//!   and a close callback; when the connection drops, a background task reconnects with
//!   exponential backoff and reports progress through [`LibvirtHypervisor::connection_state`].
//!
//! The production URI is `qemu:///system`. Tests use libvirt's test driver with
//! `test:///<absolute path to an XML file>`: each connection gets a private copy of the
//! domains in that file, so every such URI is an independent simulated hypervisor (and a
//! reconnection starts from the file again).

mod session;

use std::os::raw::c_int;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::sys;

use self::session::{KeepAlive, LossSignal, Session};
use super::{
    BoxFuture, ConnectionState, CrashedReason, DomainEvent, DomainInfo, DomainState, HandoverMark, HostCapacity,
    Hypervisor, HypervisorError, MigrationMode, PausedReason, RunningReason, ShutoffReason,
};

/// The XML namespace of the [`HandoverMark`] in a domain's metadata, and its prefix.
const MARK_NS: &str = "urn:tandem:handover:1";
const MARK_PREFIX: &str = "tandem";

/// Escapes a value for an XML attribute in double quotes.
fn xml_attr(value: &str) -> String {
    value.replace('&', "&amp;").replace('<', "&lt;").replace('"', "&quot;")
}

/// The mark in the metadata element libvirt returns; `None` for anything else.
fn parse_mark(xml: &str) -> Option<HandoverMark> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let root = doc.root_element();
    if root.tag_name().name() != "handover" {
        return None;
    }
    Some(HandoverMark { from: root.attribute("from")?.to_string(), token: root.attribute("token")?.parse().ok()? })
}

/// Why a blocking operation failed, before it is classified.
enum Failure {
    /// libvirt refused or failed.
    Libvirt(virt::error::Error),
    /// The domain is in a state the operation is not valid in (checked before calling).
    State(&'static str),
}

impl From<virt::error::Error> for Failure {
    fn from(error: virt::error::Error) -> Failure {
        Failure::Libvirt(error)
    }
}

/// Tuning of a [`LibvirtHypervisor`].
#[derive(Debug, Clone)]
pub struct LibvirtOptions {
    /// Interval of libvirt keep-alive probes on remote connections.
    pub keepalive_interval: Duration,
    /// Unanswered keep-alive probes after which the connection counts as dead.
    pub keepalive_count: u32,
    /// First delay between reconnection attempts; it doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest delay between reconnection attempts.
    pub reconnect_max: Duration,
    /// Events buffered per subscriber before a slow one gets `Lagged`.
    pub event_capacity: usize,
}

impl Default for LibvirtOptions {
    fn default() -> Self {
        LibvirtOptions {
            keepalive_interval: Duration::from_secs(5),
            keepalive_count: 3,
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
            event_capacity: 1024,
        }
    }
}

/// A hypervisor reached through libvirt.
#[derive(Debug)]
pub struct LibvirtHypervisor {
    shared: Arc<Shared>,
    /// Stops the reconnect task when the hypervisor is dropped.
    _stop: DropGuard,
}

#[derive(Debug)]
struct Shared {
    uri: String,
    options: LibvirtOptions,
    session: Mutex<Option<Arc<Session>>>,
    events: broadcast::Sender<DomainEvent>,
    connection: watch::Sender<ConnectionState>,
    loss: Arc<LossSignal>,
}

impl LibvirtHypervisor {
    /// Connects to `uri` (e.g. `qemu:///system`, `qemu+tcp://host/system`,
    /// `test:///tmp/host.xml`) with default options.
    pub async fn connect(uri: &str) -> Result<LibvirtHypervisor, HypervisorError> {
        LibvirtHypervisor::connect_with(uri, LibvirtOptions::default()).await
    }

    /// Connects to `uri` with `options`. Must be called within a tokio runtime; the
    /// reconnect task runs on it.
    pub async fn connect_with(uri: &str, options: LibvirtOptions) -> Result<LibvirtHypervisor, HypervisorError> {
        let (events, _) = broadcast::channel(options.event_capacity.max(1));
        let (connection, _) = watch::channel(ConnectionState::Reconnecting { attempts: 0, last_error: None });
        let shared = Arc::new(Shared {
            uri: uri.to_string(),
            options,
            session: Mutex::new(None),
            events,
            connection,
            loss: Arc::new(LossSignal::default()),
        });
        let session = shared.open(1).await?;
        shared.install(session);
        let stop = CancellationToken::new();
        tokio::spawn(reconnect_task(Arc::downgrade(&shared), shared.loss.clone(), stop.clone()));
        Ok(LibvirtHypervisor { shared, _stop: stop.drop_guard() })
    }

    /// The connection's state; it changes when the connection drops and comes back. After
    /// a reconnection, re-read the domains: events of the gap are lost.
    pub fn connection_state(&self) -> watch::Receiver<ConnectionState> {
        self.shared.connection.subscribe()
    }

    /// Closes the connection and waits until it is closed. Dropping the hypervisor does
    /// the same in the background.
    pub async fn close(self) {
        let session = self.shared.session.lock().expect("session lock poisoned").take();
        self.shared.connection.send_replace(ConnectionState::Closed);
        if let Some(session) = session {
            // Closing can block on a remote connection.
            let _ = tokio::task::spawn_blocking(move || drop(session)).await;
        }
    }

    fn current(&self, op: &'static str) -> Result<Arc<Session>, HypervisorError> {
        self.shared
            .session
            .lock()
            .expect("session lock poisoned")
            .clone()
            .ok_or_else(|| HypervisorError::Disconnected { uri: self.shared.uri.clone(), op })
    }

    /// Runs `f` with the connection on the blocking pool; classifies libvirt's errors.
    async fn on_connection<T, F>(&self, op: &'static str, domain: Option<&str>, f: F) -> Result<T, HypervisorError>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T, Failure> + Send + 'static,
    {
        let session = self.current(op)?;
        let shared = self.shared.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let result = f(&session.conn);
            // A failure may be the connection dying; find out here, where blocking is fine.
            let alive = matches!(result, Ok(_) | Err(Failure::State(_))) || session.conn.is_alive().unwrap_or(false);
            if !alive {
                shared.loss.report(session.generation);
            }
            // The session (possibly the last reference to the connection) drops here.
            drop(session);
            (result, alive)
        })
        .await;
        match outcome {
            Ok((Ok(value), _)) => Ok(value),
            Ok((Err(_), false)) => Err(HypervisorError::Disconnected { uri: self.shared.uri.clone(), op }),
            Ok((Err(error), true)) => Err(self.classify(op, domain, error)),
            Err(_) => Err(HypervisorError::Worker { op, uri: self.shared.uri.clone() }),
        }
    }

    /// Looks `domain` up and runs `f` on it, on the blocking pool.
    async fn on_domain<T, F>(&self, op: &'static str, domain: &str, f: F) -> Result<T, HypervisorError>
    where
        T: Send + 'static,
        F: FnOnce(&Domain) -> Result<T, Failure> + Send + 'static,
    {
        let key = domain.to_string();
        self.on_connection(op, Some(domain), move |conn| f(&lookup(conn, &key)?)).await
    }

    fn classify(&self, op: &'static str, domain: Option<&str>, failure: Failure) -> HypervisorError {
        let uri = self.shared.uri.clone();
        let error = match failure {
            Failure::Libvirt(error) => error,
            Failure::State(why) => {
                let domain = domain.unwrap_or_default().to_string();
                return HypervisorError::InvalidState { op, domain, uri, source: why.into() };
            }
        };
        let code = error.code();
        let is = |c: ErrorNumber| code.is_known_and(|k| k == c);
        let xml_error = [ErrorNumber::XmlError, ErrorNumber::XmlDetail, ErrorNumber::XmlInvalidSchema];
        // While defining, these mean an element the XML lacks or that this driver refuses.
        let define_error = [
            ErrorNumber::NoName,
            ErrorNumber::NoOs,
            ErrorNumber::OsType,
            ErrorNumber::NoKernel,
            ErrorNumber::NoSource,
            ErrorNumber::NoTarget,
            ErrorNumber::NoDevice,
            ErrorNumber::InvalidArg,
            ErrorNumber::ConfigUnsupported,
        ];
        let xml = xml_error.into_iter().any(is) || (op == "define" && define_error.into_iter().any(is));
        if is(ErrorNumber::NoDomain) {
            HypervisorError::NoSuchDomain { uri, domain: domain.unwrap_or_default().to_string() }
        } else if is(ErrorNumber::NoSupport)
            || is(ErrorNumber::ArgumentUnsupported)
            || is(ErrorNumber::OperationUnsupported)
        {
            HypervisorError::Unsupported { op, uri, source: Box::new(error) }
        } else if xml {
            HypervisorError::InvalidXml { uri, source: Box::new(error) }
        } else if let Some(domain) = domain {
            let domain = domain.to_string();
            if is(ErrorNumber::OperationInvalid) {
                HypervisorError::InvalidState { op, domain, uri, source: Box::new(error) }
            } else {
                HypervisorError::Domain { op, domain, uri, source: Box::new(error) }
            }
        } else {
            HypervisorError::Host { op, uri, source: Box::new(error) }
        }
    }
}

impl Hypervisor for LibvirtHypervisor {
    fn uri(&self) -> &str {
        &self.shared.uri
    }

    fn list_domains(&self) -> BoxFuture<'_, Result<Vec<DomainInfo>, HypervisorError>> {
        Box::pin(self.on_connection("listing domains", None, |conn| {
            let mut infos = Vec::new();
            for dom in conn.list_all_domains(0)? {
                match domain_info(&dom) {
                    Ok(info) => infos.push(info),
                    // A transient domain that stopped after the listing is simply gone.
                    Err(e) if e.code().is_known_and(|c| c == ErrorNumber::NoDomain) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            infos.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(infos)
        }))
    }

    fn domain_info<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<DomainInfo, HypervisorError>> {
        Box::pin(self.on_domain("reading domain info", domain, |dom| Ok(domain_info(dom)?)))
    }

    fn define<'a>(&'a self, xml: &'a str) -> BoxFuture<'a, Result<DomainInfo, HypervisorError>> {
        let xml = xml.to_string();
        Box::pin(self.on_connection("define", None, move |conn| Ok(domain_info(&conn.define_domain_xml(&xml)?)?)))
    }

    fn undefine<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(self.on_domain("undefine", domain, |dom| Ok(dom.undefine()?)))
    }

    fn start<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(self.on_domain("start", domain, |dom| {
            // Checked here because drivers differ in how (and whether) they refuse.
            if dom.is_active()? {
                return Err(Failure::State("the domain is already running"));
            }
            dom.create()?;
            Ok(())
        }))
    }

    fn start_paused<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(self.on_domain("start paused", domain, |dom| {
            if dom.is_active()? {
                return Err(Failure::State("the domain is already running"));
            }
            dom.create_with_flags(sys::VIR_DOMAIN_START_PAUSED)?;
            Ok(())
        }))
    }

    fn shutdown<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(self.on_domain("shutdown", domain, |dom| {
            if !dom.is_active()? {
                return Err(Failure::State("the domain is not running"));
            }
            dom.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_DEFAULT)?;
            Ok(())
        }))
    }

    fn destroy<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(self.on_domain("destroy", domain, |dom| {
            if !dom.is_active()? {
                return Err(Failure::State("the domain is not running"));
            }
            dom.destroy()?;
            Ok(())
        }))
    }

    fn state<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<DomainState, HypervisorError>> {
        Box::pin(self.on_domain("reading domain state", domain, |dom| Ok(domain_state(dom)?)))
    }

    fn domain_xml<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<String, HypervisorError>> {
        Box::pin(self.on_domain("reading domain XML", domain, |dom| Ok(dom.xml_desc(0)?)))
    }

    fn migrate<'a>(
        &'a self,
        domain: &'a str,
        dest_uri: &'a str,
        mode: MigrationMode,
    ) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let dest = dest_uri.to_string();
        // Peer to peer: the source daemon talks to the destination itself, so the agent
        // needs no connection there, and the domain ends up defined there, not here.
        let base = sys::VIR_MIGRATE_PEER2PEER | sys::VIR_MIGRATE_PERSIST_DEST | sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        let flags = match mode {
            MigrationMode::Live => base | sys::VIR_MIGRATE_LIVE,
            MigrationMode::LivePaused => base | sys::VIR_MIGRATE_LIVE | sys::VIR_MIGRATE_PAUSED,
            MigrationMode::Offline => base | sys::VIR_MIGRATE_OFFLINE,
        };
        Box::pin(self.on_domain(mode.as_str(), domain, move |dom| Ok(dom.migrate_to_uri(&dest, flags, None, 0)?)))
    }

    fn abort_migration<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(self.on_domain("abort migration", domain, |dom| {
            // SAFETY: `dom` holds a valid domain pointer for the duration of the call, and
            // virDomainAbortJob only reads it; `virt` 0.5 has no wrapper for it.
            let rc = unsafe { sys::virDomainAbortJob(dom.as_ptr()) };
            if rc < 0 {
                return Err(Failure::Libvirt(virt::error::Error::last_error()));
            }
            Ok(())
        }))
    }

    fn set_handover_mark<'a>(
        &'a self,
        domain: &'a str,
        mark: Option<&'a HandoverMark>,
    ) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let element = mark.map(|m| format!("<handover from=\"{}\" token=\"{}\"/>", xml_attr(&m.from), m.token));
        Box::pin(self.on_domain("set handover mark", domain, move |dom| {
            dom.set_metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                element.as_deref(),
                element.as_ref().map(|_| MARK_PREFIX),
                Some(MARK_NS),
                sys::VIR_DOMAIN_AFFECT_LIVE,
            )?;
            Ok(())
        }))
    }

    fn handover_mark<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<Option<HandoverMark>, HypervisorError>> {
        Box::pin(self.on_domain("read handover mark", domain, |dom| {
            match dom.metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(MARK_NS), sys::VIR_DOMAIN_AFFECT_LIVE) {
                Ok(xml) => Ok(parse_mark(&xml)),
                Err(e) if e.code().is_known_and(|c| c == ErrorNumber::NoDomainMetadata) => Ok(None),
                Err(e) => Err(e.into()),
            }
        }))
    }

    fn capacity(&self) -> BoxFuture<'_, Result<HostCapacity, HypervisorError>> {
        Box::pin(self.on_connection("reading host capacity", None, |conn| {
            let node = conn.node_info()?;
            // Drivers without NUMA cell data (the test driver with a custom file) cannot
            // report free memory; libvirt then fails the call with a generic error.
            let free = match conn.free_memory() {
                Ok(bytes) => Some(bytes / 1024),
                Err(e) => {
                    tracing::debug!(error = %e, "the hypervisor does not report free memory");
                    None
                }
            };
            Ok(HostCapacity {
                total_memory_kib: node.memory,
                free_memory_kib: free,
                cpus: node.cpus,
                cpu_mhz: node.mhz,
            })
        }))
    }

    fn subscribe(&self) -> broadcast::Receiver<DomainEvent> {
        self.shared.events.subscribe()
    }

    fn crash_dump<'a>(&'a self, domain: &'a str, path: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let path = path.to_string();
        Box::pin(self.on_domain("crash dump", domain, move |dom| {
            dom.core_dump(&path, sys::VIR_DUMP_CRASH)?;
            Ok(())
        }))
    }

    fn suspend<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(self.on_domain("suspend", domain, |dom| {
            match domain_state(dom)? {
                s if s.is_running() => {}
                DomainState::Paused(_) => return Err(Failure::State("the domain is already paused")),
                _ => return Err(Failure::State("the domain is not running")),
            }
            dom.suspend()?;
            Ok(())
        }))
    }

    fn resume<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(self.on_domain("resume", domain, |dom| {
            if !matches!(domain_state(dom)?, DomainState::Paused(_)) {
                return Err(Failure::State("the domain is not paused"));
            }
            dom.resume()?;
            Ok(())
        }))
    }

    fn self_fence_stops_vms(&self) -> bool {
        super::self_fence_stops_vms(&self.shared.uri)
    }
}

impl Shared {
    /// Opens a new session of `generation` on the blocking pool.
    async fn open(&self, generation: u64) -> Result<Session, HypervisorError> {
        let uri = self.uri.clone();
        let events = self.events.clone();
        let loss = self.loss.clone();
        let keepalive = KeepAlive {
            interval_secs: i32::try_from(self.options.keepalive_interval.as_secs().max(1)).unwrap_or(i32::MAX),
            count: self.options.keepalive_count,
        };
        tokio::task::spawn_blocking(move || Session::open(&uri, generation, events, loss, keepalive))
            .await
            .map_err(|_| HypervisorError::Worker { op: "connect", uri: self.uri.clone() })?
    }

    fn install(&self, session: Session) {
        let generation = session.generation;
        let old = self.session.lock().expect("session lock poisoned").replace(Arc::new(session));
        drop_on_blocking_pool(old);
        self.connection.send_replace(ConnectionState::Connected { generation });
    }

    fn generation(&self) -> u64 {
        self.session.lock().expect("session lock poisoned").as_ref().map_or(0, |s| s.generation)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let session = self.session.get_mut().map(Option::take).unwrap_or(None);
        drop_on_blocking_pool(session);
        self.connection.send_replace(ConnectionState::Closed);
    }
}

/// Drops a session where blocking is allowed: on tokio's blocking pool when a runtime is
/// around, otherwise right here (the caller is then not an async task).
fn drop_on_blocking_pool(session: Option<Arc<Session>>) {
    let Some(session) = session else { return };
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn_blocking(move || drop(session));
        }
        Err(_) => drop(session),
    }
}

/// Waits for connection-loss reports and reconnects with exponential backoff.
async fn reconnect_task(shared: Weak<Shared>, loss: Arc<LossSignal>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = loss.notify.notified() => {}
        }
        let Some(shared) = shared.upgrade() else { return };
        let broken = shared.generation();
        if broken == 0 || !loss.is_lost(broken) {
            continue; // a stale report about an older connection
        }
        let old = shared.session.lock().expect("session lock poisoned").take();
        drop_on_blocking_pool(old);
        tracing::warn!(uri = %shared.uri, generation = broken, "libvirt connection lost; reconnecting");

        let mut delay = shared.options.reconnect_min;
        let mut attempts = 0u32;
        let mut last_error = None;
        loop {
            shared.connection.send_replace(ConnectionState::Reconnecting { attempts, last_error: last_error.clone() });
            match shared.open(broken + 1).await {
                Ok(session) => {
                    tracing::info!(uri = %shared.uri, attempts, "libvirt connection re-established");
                    shared.install(session);
                    break;
                }
                Err(e) => {
                    attempts += 1;
                    last_error = Some(crate::error_chain(&e));
                    tracing::warn!(uri = %shared.uri, attempts, error = %e, "reconnecting to libvirt failed");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(shared.options.reconnect_max);
        }
    }
}

/// Looks a domain up by UUID when `key` is one, by name otherwise (as `virsh` does).
fn lookup(conn: &Connect, key: &str) -> Result<Domain, virt::error::Error> {
    match Uuid::parse_str(key) {
        Ok(uuid) => conn.lookup_domain_by_uuid(uuid),
        Err(_) => conn.lookup_domain_by_name(key),
    }
}

fn domain_info(dom: &Domain) -> Result<DomainInfo, virt::error::Error> {
    let info = dom.info()?;
    Ok(DomainInfo {
        name: dom.name()?,
        uuid: dom.uuid()?,
        state: domain_state(dom)?,
        memory_kib: info.memory,
        max_memory_kib: info.max_mem,
        vcpus: info.nr_virt_cpu,
        persistent: dom.is_persistent()?,
    })
}

/// The state with its reason. `virt`'s `Domain::state` drops errors, so call libvirt directly.
fn domain_state(dom: &Domain) -> Result<DomainState, virt::error::Error> {
    let mut state: c_int = -1;
    let mut reason: c_int = -1;
    // SAFETY: `dom` holds a valid domain reference for the call; both out-pointers point to
    // live c_ints.
    let rc = unsafe { sys::virDomainGetState(dom.as_ptr(), &mut state, &mut reason, 0) };
    if rc < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(map_state(state, reason))
}

fn map_state(state: c_int, reason: c_int) -> DomainState {
    let r = reason as u32;
    match state as u32 {
        sys::VIR_DOMAIN_RUNNING => DomainState::Running(match r {
            sys::VIR_DOMAIN_RUNNING_UNKNOWN => RunningReason::Unknown,
            sys::VIR_DOMAIN_RUNNING_BOOTED => RunningReason::Booted,
            sys::VIR_DOMAIN_RUNNING_MIGRATED => RunningReason::Migrated,
            sys::VIR_DOMAIN_RUNNING_RESTORED => RunningReason::Restored,
            sys::VIR_DOMAIN_RUNNING_FROM_SNAPSHOT => RunningReason::FromSnapshot,
            sys::VIR_DOMAIN_RUNNING_UNPAUSED => RunningReason::Unpaused,
            sys::VIR_DOMAIN_RUNNING_MIGRATION_CANCELED => RunningReason::MigrationCanceled,
            sys::VIR_DOMAIN_RUNNING_SAVE_CANCELED => RunningReason::SaveCanceled,
            sys::VIR_DOMAIN_RUNNING_WAKEUP => RunningReason::Wakeup,
            sys::VIR_DOMAIN_RUNNING_CRASHED => RunningReason::Crashed,
            sys::VIR_DOMAIN_RUNNING_POSTCOPY => RunningReason::Postcopy,
            sys::VIR_DOMAIN_RUNNING_POSTCOPY_FAILED => RunningReason::PostcopyFailed,
            _ => RunningReason::Other(reason),
        }),
        sys::VIR_DOMAIN_BLOCKED => DomainState::Blocked,
        sys::VIR_DOMAIN_PAUSED => DomainState::Paused(match r {
            sys::VIR_DOMAIN_PAUSED_UNKNOWN => PausedReason::Unknown,
            sys::VIR_DOMAIN_PAUSED_USER => PausedReason::User,
            sys::VIR_DOMAIN_PAUSED_MIGRATION => PausedReason::Migration,
            sys::VIR_DOMAIN_PAUSED_SAVE => PausedReason::Save,
            sys::VIR_DOMAIN_PAUSED_DUMP => PausedReason::Dump,
            sys::VIR_DOMAIN_PAUSED_IOERROR => PausedReason::IoError,
            sys::VIR_DOMAIN_PAUSED_WATCHDOG => PausedReason::Watchdog,
            sys::VIR_DOMAIN_PAUSED_FROM_SNAPSHOT => PausedReason::FromSnapshot,
            sys::VIR_DOMAIN_PAUSED_SHUTTING_DOWN => PausedReason::ShuttingDown,
            sys::VIR_DOMAIN_PAUSED_SNAPSHOT => PausedReason::Snapshot,
            sys::VIR_DOMAIN_PAUSED_CRASHED => PausedReason::Crashed,
            sys::VIR_DOMAIN_PAUSED_STARTING_UP => PausedReason::StartingUp,
            sys::VIR_DOMAIN_PAUSED_POSTCOPY => PausedReason::Postcopy,
            sys::VIR_DOMAIN_PAUSED_POSTCOPY_FAILED => PausedReason::PostcopyFailed,
            sys::VIR_DOMAIN_PAUSED_API_ERROR => PausedReason::ApiError,
            _ => PausedReason::Other(reason),
        }),
        sys::VIR_DOMAIN_SHUTDOWN => DomainState::ShuttingDown,
        sys::VIR_DOMAIN_SHUTOFF => DomainState::Shutoff(match r {
            sys::VIR_DOMAIN_SHUTOFF_UNKNOWN => ShutoffReason::Unknown,
            sys::VIR_DOMAIN_SHUTOFF_SHUTDOWN => ShutoffReason::Shutdown,
            sys::VIR_DOMAIN_SHUTOFF_DESTROYED => ShutoffReason::Destroyed,
            sys::VIR_DOMAIN_SHUTOFF_CRASHED => ShutoffReason::Crashed,
            sys::VIR_DOMAIN_SHUTOFF_MIGRATED => ShutoffReason::Migrated,
            sys::VIR_DOMAIN_SHUTOFF_SAVED => ShutoffReason::Saved,
            sys::VIR_DOMAIN_SHUTOFF_FAILED => ShutoffReason::Failed,
            sys::VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT => ShutoffReason::FromSnapshot,
            sys::VIR_DOMAIN_SHUTOFF_DAEMON => ShutoffReason::Daemon,
            _ => ShutoffReason::Other(reason),
        }),
        sys::VIR_DOMAIN_CRASHED => DomainState::Crashed(match r {
            sys::VIR_DOMAIN_CRASHED_UNKNOWN => CrashedReason::Unknown,
            sys::VIR_DOMAIN_CRASHED_PANICKED => CrashedReason::Panicked,
            _ => CrashedReason::Other(reason),
        }),
        sys::VIR_DOMAIN_PMSUSPENDED => DomainState::PmSuspended,
        _ => DomainState::NoState,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_states_map_with_their_reasons() {
        let off = |r| map_state(sys::VIR_DOMAIN_SHUTOFF as c_int, r as c_int);
        assert_eq!(off(sys::VIR_DOMAIN_SHUTOFF_DESTROYED), DomainState::Shutoff(ShutoffReason::Destroyed));
        assert_eq!(off(sys::VIR_DOMAIN_SHUTOFF_CRASHED), DomainState::Shutoff(ShutoffReason::Crashed));
        assert_eq!(off(sys::VIR_DOMAIN_SHUTOFF_MIGRATED), DomainState::Shutoff(ShutoffReason::Migrated));
        assert_eq!(off(42), DomainState::Shutoff(ShutoffReason::Other(42)));
        assert_eq!(
            map_state(sys::VIR_DOMAIN_PAUSED as c_int, sys::VIR_DOMAIN_PAUSED_IOERROR as c_int),
            DomainState::Paused(PausedReason::IoError)
        );
        assert_eq!(
            map_state(sys::VIR_DOMAIN_CRASHED as c_int, sys::VIR_DOMAIN_CRASHED_PANICKED as c_int),
            DomainState::Crashed(CrashedReason::Panicked)
        );
        assert_eq!(map_state(99, 0), DomainState::NoState);
    }
}
