//! One libvirt connection with its callbacks, and the process-wide libvirt event loop.
//!
//! Everything here blocks and runs on tokio's blocking pool (or, for the callbacks, on the
//! event loop's own OS thread). The `virt` crate does not wrap domain event registration,
//! so the callbacks are registered through `virt::sys`.

use std::ffi::CStr;
use std::os::raw::{c_int, c_uchar, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{Notify, broadcast};
use uuid::Uuid;
use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::sys;

use crate::hypervisor::{DomainEvent, EventKind, EventReason, HypervisorError};

/// Registers libvirt's default event loop implementation and runs it on its own thread,
/// once per process. libvirt requires this before the first connection is opened, or
/// that connection never delivers events.
pub(super) fn ensure_event_loop() -> Result<(), HypervisorError> {
    static EVENT_LOOP: OnceLock<Result<(), String>> = OnceLock::new();
    let started = EVENT_LOOP.get_or_init(|| {
        // libvirt's default error handler prints every error on stderr; errors are returned.
        virt::error::clear_error_callback();
        virt::event::event_register_default_impl().map_err(|e| e.to_string())?;
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::warn!(error = %e, "libvirt event loop iteration failed");
                        // Never spin on a persistent failure.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .map_err(|e| format!("cannot spawn the libvirt event thread: {e}"))?;
        Ok(())
    });
    started.clone().map_err(|msg| HypervisorError::EventLoop { source: msg.into() })
}

/// How the connection-close callback tells the reconnect task that a connection died.
#[derive(Debug, Default)]
pub(super) struct LossSignal {
    /// Highest connection generation reported lost.
    lost: AtomicU64,
    /// Wakes the reconnect task.
    pub(super) notify: Notify,
}

impl LossSignal {
    /// Reports that the connection of `generation` is dead. Safe from any thread.
    pub(super) fn report(&self, generation: u64) {
        self.lost.fetch_max(generation, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Whether the connection of `generation` was reported dead.
    pub(super) fn is_lost(&self, generation: u64) -> bool {
        self.lost.load(Ordering::SeqCst) >= generation
    }
}

/// Keep-alive settings for remote connections.
#[derive(Debug, Clone, Copy)]
pub(super) struct KeepAlive {
    pub(super) interval_secs: i32,
    pub(super) count: u32,
}

/// An open connection with its lifecycle-event and close callbacks registered. Dropping it
/// deregisters them and closes the connection; it must be dropped on a blocking thread.
pub(super) struct Session {
    pub(super) conn: Connect,
    pub(super) generation: u64,
    lifecycle_id: c_int,
    close_registered: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("generation", &self.generation).finish_non_exhaustive()
    }
}

struct LifecycleContext {
    events: broadcast::Sender<DomainEvent>,
}

struct CloseContext {
    loss: Arc<LossSignal>,
    generation: u64,
}

impl Session {
    /// Opens `uri` and registers the callbacks. Blocks.
    pub(super) fn open(
        uri: &str,
        generation: u64,
        events: broadcast::Sender<DomainEvent>,
        loss: Arc<LossSignal>,
        keepalive: KeepAlive,
    ) -> Result<Session, HypervisorError> {
        ensure_event_loop()?;
        let conn = Connect::open(Some(uri))
            .map_err(|e| HypervisorError::Connect { uri: uri.to_string(), source: Box::new(e) })?;

        // Only the remote driver (every daemon-backed URI, qemu:///system included) has
        // keep-alive and close notification; in-process drivers such as test:/// say NoSupport.
        let remote = match conn.set_keep_alive(keepalive.interval_secs, keepalive.count) {
            Ok(_) => true,
            Err(e) if e.code().is_known_and(|c| c == ErrorNumber::NoSupport) => false,
            Err(e) => {
                tracing::warn!(uri, error = %e, "cannot enable libvirt keep-alive; a dead peer is noticed late");
                true
            }
        };

        let context = Box::into_raw(Box::new(LifecycleContext { events }));
        // SAFETY: libvirt documents VIR_DOMAIN_EVENT_CALLBACK as a cast of the typed callback
        // to the generic pointer type, and calls it back with the lifecycle signature for
        // VIR_DOMAIN_EVENT_ID_LIFECYCLE; both are `extern "C"` function pointers of equal size.
        let callback = unsafe {
            std::mem::transmute::<
                unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int,
                unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
            >(on_lifecycle)
        };
        // SAFETY: `conn` is open; a null domain means "all domains"; `context` is a live
        // heap allocation that libvirt owns from here on and releases with `free_lifecycle`.
        let lifecycle_id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
                Some(callback),
                context.cast(),
                Some(free_lifecycle),
            )
        };
        if lifecycle_id < 0 {
            // On failure libvirt may or may not have called the free callback already, so
            // the small context is leaked rather than risking a double free.
            let error = virt::error::Error::last_error();
            return Err(HypervisorError::Host {
                op: "registering for lifecycle events",
                uri: uri.to_string(),
                source: Box::new(error),
            });
        }

        let mut session = Session { conn, generation, lifecycle_id, close_registered: false };
        if remote {
            let context = Box::into_raw(Box::new(CloseContext { loss, generation }));
            // SAFETY: the connection is open; `context` is a live heap allocation that
            // libvirt owns from here on and releases with `free_close` when unregistered.
            let rc = unsafe {
                sys::virConnectRegisterCloseCallback(
                    session.conn.as_ptr(),
                    Some(on_close),
                    context.cast(),
                    Some(free_close),
                )
            };
            if rc < 0 {
                let error = virt::error::Error::last_error();
                return Err(HypervisorError::Host {
                    op: "registering for connection-close notification",
                    uri: uri.to_string(),
                    source: Box::new(error),
                });
            }
            session.close_registered = true;
        }
        Ok(session)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: the connection is still open (it closes when `self.conn` drops after this
        // body) and `lifecycle_id` was returned by the registration on this connection.
        let rc = unsafe { sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), self.lifecycle_id) };
        if rc < 0 {
            tracing::debug!(error = %virt::error::Error::last_error(), "deregistering lifecycle events failed");
        }
        if self.close_registered {
            // SAFETY: the connection is open and `on_close` is the callback registered on it.
            let rc = unsafe { sys::virConnectUnregisterCloseCallback(self.conn.as_ptr(), Some(on_close)) };
            if rc < 0 {
                tracing::debug!(error = %virt::error::Error::last_error(), "unregistering the close callback failed");
            }
        }
    }
}

/// Called by libvirt on the event loop thread for every lifecycle event.
unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: `opaque` is the LifecycleContext registered with this callback; libvirt keeps
    // it alive until it calls `free_lifecycle`, which never overlaps a dispatch.
    let context = unsafe { &*(opaque as *const LifecycleContext) };
    // SAFETY: libvirt passes a domain reference valid for the duration of the callback.
    let (name, uuid) = unsafe { domain_identity(dom) };
    let kind = event_kind(event);
    let event = DomainEvent { uuid, name, kind, reason: event_reason(kind, detail) };
    // No subscribers is fine: the events of that moment are simply not wanted.
    let _ = context.events.send(event);
    0
}

/// Reads a domain's name and UUID without taking a reference.
///
/// # Safety
/// `dom` must be a valid domain pointer for the duration of the call.
unsafe fn domain_identity(dom: sys::virDomainPtr) -> (String, Uuid) {
    // SAFETY: `dom` is valid (caller's contract); the returned name is owned by the domain
    // object and valid while it is.
    let name_ptr = unsafe { sys::virDomainGetName(dom) };
    let name = if name_ptr.is_null() {
        String::new()
    } else {
        // SAFETY: non-null, NUL-terminated string owned by the live domain object.
        unsafe { CStr::from_ptr(name_ptr) }.to_string_lossy().into_owned()
    };
    let mut raw = [0 as c_uchar; sys::VIR_UUID_BUFLEN as usize];
    // SAFETY: `dom` is valid and `raw` has the VIR_UUID_BUFLEN bytes libvirt writes.
    let rc = unsafe { sys::virDomainGetUUID(dom, raw.as_mut_ptr()) };
    let uuid = if rc < 0 { Uuid::nil() } else { Uuid::from_bytes(raw) };
    (name, uuid)
}

unsafe extern "C" fn free_lifecycle(opaque: *mut c_void) {
    // SAFETY: `opaque` came from Box::into_raw of a LifecycleContext and libvirt calls the
    // free callback exactly once, after the last dispatch.
    drop(unsafe { Box::from_raw(opaque as *mut LifecycleContext) });
}

/// Called by libvirt on the event loop thread when a remote connection closes.
unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    // SAFETY: `opaque` is the CloseContext registered with this callback; libvirt keeps it
    // alive until it calls `free_close`.
    let context = unsafe { &*(opaque as *const CloseContext) };
    tracing::warn!(reason, generation = context.generation, "libvirt connection closed");
    context.loss.report(context.generation);
}

unsafe extern "C" fn free_close(opaque: *mut c_void) {
    // SAFETY: `opaque` came from Box::into_raw of a CloseContext and libvirt frees it once.
    drop(unsafe { Box::from_raw(opaque as *mut CloseContext) });
}

fn event_kind(event: c_int) -> EventKind {
    match event as u32 {
        sys::VIR_DOMAIN_EVENT_DEFINED => EventKind::Defined,
        sys::VIR_DOMAIN_EVENT_UNDEFINED => EventKind::Undefined,
        sys::VIR_DOMAIN_EVENT_STARTED => EventKind::Started,
        sys::VIR_DOMAIN_EVENT_SUSPENDED => EventKind::Suspended,
        sys::VIR_DOMAIN_EVENT_RESUMED => EventKind::Resumed,
        sys::VIR_DOMAIN_EVENT_STOPPED => EventKind::Stopped,
        sys::VIR_DOMAIN_EVENT_SHUTDOWN => EventKind::Shutdown,
        sys::VIR_DOMAIN_EVENT_PMSUSPENDED => EventKind::PmSuspended,
        sys::VIR_DOMAIN_EVENT_CRASHED => EventKind::Crashed,
        _ => EventKind::Other(event),
    }
}

fn event_reason(kind: EventKind, detail: c_int) -> EventReason {
    use EventReason as R;
    let d = detail as u32;
    let reason = match kind {
        EventKind::Defined => match d {
            sys::VIR_DOMAIN_EVENT_DEFINED_ADDED => Some(R::Added),
            sys::VIR_DOMAIN_EVENT_DEFINED_UPDATED => Some(R::Updated),
            sys::VIR_DOMAIN_EVENT_DEFINED_RENAMED => Some(R::Renamed),
            sys::VIR_DOMAIN_EVENT_DEFINED_FROM_SNAPSHOT => Some(R::FromSnapshot),
            _ => None,
        },
        EventKind::Undefined => match d {
            sys::VIR_DOMAIN_EVENT_UNDEFINED_REMOVED => Some(R::Removed),
            sys::VIR_DOMAIN_EVENT_UNDEFINED_RENAMED => Some(R::Renamed),
            _ => None,
        },
        EventKind::Started => match d {
            sys::VIR_DOMAIN_EVENT_STARTED_BOOTED => Some(R::Booted),
            sys::VIR_DOMAIN_EVENT_STARTED_MIGRATED => Some(R::Migrated),
            sys::VIR_DOMAIN_EVENT_STARTED_RESTORED => Some(R::Restored),
            sys::VIR_DOMAIN_EVENT_STARTED_FROM_SNAPSHOT => Some(R::FromSnapshot),
            sys::VIR_DOMAIN_EVENT_STARTED_WAKEUP => Some(R::Wakeup),
            sys::VIR_DOMAIN_EVENT_STARTED_RECREATED => Some(R::Recreated),
            _ => None,
        },
        EventKind::Suspended => match d {
            sys::VIR_DOMAIN_EVENT_SUSPENDED_PAUSED => Some(R::Paused),
            sys::VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED => Some(R::Migrated),
            sys::VIR_DOMAIN_EVENT_SUSPENDED_IOERROR => Some(R::IoError),
            sys::VIR_DOMAIN_EVENT_SUSPENDED_WATCHDOG => Some(R::Watchdog),
            sys::VIR_DOMAIN_EVENT_SUSPENDED_RESTORED => Some(R::Restored),
            sys::VIR_DOMAIN_EVENT_SUSPENDED_FROM_SNAPSHOT => Some(R::FromSnapshot),
            sys::VIR_DOMAIN_EVENT_SUSPENDED_API_ERROR => Some(R::ApiError),
            sys::VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY => Some(R::Postcopy),
            sys::VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY_FAILED => Some(R::PostcopyFailed),
            _ => None,
        },
        EventKind::Resumed => match d {
            sys::VIR_DOMAIN_EVENT_RESUMED_UNPAUSED => Some(R::Unpaused),
            sys::VIR_DOMAIN_EVENT_RESUMED_MIGRATED => Some(R::Migrated),
            sys::VIR_DOMAIN_EVENT_RESUMED_FROM_SNAPSHOT => Some(R::FromSnapshot),
            sys::VIR_DOMAIN_EVENT_RESUMED_POSTCOPY => Some(R::Postcopy),
            sys::VIR_DOMAIN_EVENT_RESUMED_POSTCOPY_FAILED => Some(R::PostcopyFailed),
            _ => None,
        },
        EventKind::Stopped => match d {
            sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN => Some(R::Shutdown),
            sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED => Some(R::Destroyed),
            sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED => Some(R::Crashed),
            sys::VIR_DOMAIN_EVENT_STOPPED_MIGRATED => Some(R::Migrated),
            sys::VIR_DOMAIN_EVENT_STOPPED_SAVED => Some(R::Saved),
            sys::VIR_DOMAIN_EVENT_STOPPED_FAILED => Some(R::Failed),
            sys::VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT => Some(R::FromSnapshot),
            sys::VIR_DOMAIN_EVENT_STOPPED_RECREATED => Some(R::Recreated),
            _ => None,
        },
        EventKind::Shutdown => match d {
            sys::VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED => Some(R::ShutdownFinished),
            sys::VIR_DOMAIN_EVENT_SHUTDOWN_GUEST => Some(R::ShutdownByGuest),
            sys::VIR_DOMAIN_EVENT_SHUTDOWN_HOST => Some(R::ShutdownByHost),
            _ => None,
        },
        EventKind::PmSuspended => match d {
            sys::VIR_DOMAIN_EVENT_PMSUSPENDED_MEMORY => Some(R::Memory),
            sys::VIR_DOMAIN_EVENT_PMSUSPENDED_DISK => Some(R::Disk),
            _ => None,
        },
        EventKind::Crashed => match d {
            sys::VIR_DOMAIN_EVENT_CRASHED_PANICKED => Some(R::Panicked),
            sys::VIR_DOMAIN_EVENT_CRASHED_CRASHLOADED => Some(R::CrashLoaded),
            _ => None,
        },
        EventKind::Other(_) => None,
    };
    reason.unwrap_or(R::Other(detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_events_map_to_kinds_and_reasons() {
        let stopped = event_kind(sys::VIR_DOMAIN_EVENT_STOPPED as c_int);
        assert_eq!(stopped, EventKind::Stopped);
        assert_eq!(event_reason(stopped, sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED as c_int), EventReason::Destroyed);
        assert_eq!(event_reason(stopped, sys::VIR_DOMAIN_EVENT_STOPPED_FAILED as c_int), EventReason::Failed);
        // The same raw detail means different things under different kinds.
        let started = event_kind(sys::VIR_DOMAIN_EVENT_STARTED as c_int);
        assert_eq!(event_reason(started, 1), EventReason::Migrated);
        assert_eq!(event_reason(stopped, 1), EventReason::Destroyed);
        assert_eq!(event_reason(stopped, 99), EventReason::Other(99));
        assert_eq!(event_kind(77), EventKind::Other(77));
    }
}
