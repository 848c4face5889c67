//! Domain states, lifecycle events and why a domain stopped.
//!
//! The names follow libvirt's state and event model (the one every libvirt driver reports),
//! but nothing here depends on libvirt: another backend maps its own states onto these.
//! The piece the agent relies on most is [`StopCause`]: it tells "the guest shut itself
//! down" or "we destroyed it" from "it crashed", which decides whether a VM is restarted.

use uuid::Uuid;

/// A domain's state together with the hypervisor's reason for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    /// The hypervisor reports no state.
    NoState,
    /// Running.
    Running(RunningReason),
    /// Blocked on a resource (Xen's notion; KVM reports `Running`).
    Blocked,
    /// Paused: the vCPUs do not run, memory is kept.
    Paused(PausedReason),
    /// Being shut down: the guest was asked to power off and has not finished yet.
    ShuttingDown,
    /// Off: defined but not running.
    Shutoff(ShutoffReason),
    /// Crashed and kept in that state (the domain's `on_crash` is `preserve`).
    Crashed(CrashedReason),
    /// Suspended by guest power management (S3/S4).
    PmSuspended,
}

impl DomainState {
    /// Whether the domain is off (not running in any form).
    pub fn is_off(&self) -> bool {
        matches!(self, DomainState::Shutoff(_))
    }

    /// Whether the domain's vCPUs are running (`Running` or `Blocked`).
    pub fn is_running(&self) -> bool {
        matches!(self, DomainState::Running(_) | DomainState::Blocked)
    }

    /// Why the domain stopped, if it is off or crashed; `None` while it is active.
    pub fn stop_cause(&self) -> Option<StopCause> {
        match self {
            DomainState::Shutoff(reason) => Some(reason.stop_cause()),
            DomainState::Crashed(_) => Some(StopCause::Crashed),
            _ => None,
        }
    }
}

/// Why a domain runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunningReason {
    /// Not known.
    Unknown,
    /// Booted normally.
    Booted,
    /// Arrived by migration.
    Migrated,
    /// Restored from a saved state file.
    Restored,
    /// Reverted to a snapshot.
    FromSnapshot,
    /// Resumed after a pause.
    Unpaused,
    /// Kept running here because an outgoing migration was cancelled.
    MigrationCanceled,
    /// Kept running because a save was cancelled.
    SaveCanceled,
    /// Woken from power-management suspend.
    Wakeup,
    /// Running again after a crash (the guest's crash handler, e.g. kdump, runs).
    Crashed,
    /// Running in post-copy migration mode.
    Postcopy,
    /// Post-copy migration failed; the domain runs but its memory may be incomplete.
    PostcopyFailed,
    /// A reason this version does not know (the raw libvirt value).
    Other(i32),
}

/// Why a domain is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PausedReason {
    /// Not known.
    Unknown,
    /// Paused by a user or management request.
    User,
    /// Paused for an offline (non-live) migration.
    Migration,
    /// Paused while saving its state.
    Save,
    /// Paused while dumping its memory.
    Dump,
    /// Paused by the hypervisor on a disk I/O error.
    IoError,
    /// Paused by the guest watchdog's action.
    Watchdog,
    /// Reverted to a paused snapshot.
    FromSnapshot,
    /// Paused during shutdown.
    ShuttingDown,
    /// Paused while a snapshot is taken.
    Snapshot,
    /// Paused after the guest crashed (`on_crash` = `preserve` on some drivers).
    Crashed,
    /// Started paused, or still starting.
    StartingUp,
    /// Paused for post-copy migration.
    Postcopy,
    /// Post-copy migration failed.
    PostcopyFailed,
    /// Paused after a failed hypervisor API call.
    ApiError,
    /// A reason this version does not know (the raw libvirt value).
    Other(i32),
}

/// Why a domain is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutoffReason {
    /// Not known (also: defined and never started).
    Unknown,
    /// The guest OS powered off (asked to, or on its own).
    Shutdown,
    /// Forced off (`destroy`).
    Destroyed,
    /// The guest crashed, or its emulator process died.
    Crashed,
    /// Migrated to another host.
    Migrated,
    /// Its state was saved to a file.
    Saved,
    /// It failed to start.
    Failed,
    /// Reverted to a snapshot of an off domain.
    FromSnapshot,
    /// Stopped by the libvirt daemon itself (e.g. while the host shuts down).
    Daemon,
    /// A reason this version does not know (the raw libvirt value).
    Other(i32),
}

impl ShutoffReason {
    /// The stop cause this reason stands for.
    pub fn stop_cause(&self) -> StopCause {
        match self {
            ShutoffReason::Shutdown => StopCause::Shutdown,
            ShutoffReason::Destroyed => StopCause::Destroyed,
            ShutoffReason::Crashed => StopCause::Crashed,
            ShutoffReason::Migrated => StopCause::Migrated,
            ShutoffReason::Saved => StopCause::Saved,
            ShutoffReason::Failed => StopCause::StartFailed,
            ShutoffReason::FromSnapshot => StopCause::FromSnapshot,
            ShutoffReason::Daemon => StopCause::Daemon,
            ShutoffReason::Unknown | ShutoffReason::Other(_) => StopCause::Unknown,
        }
    }
}

/// Why a domain is in the crashed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashedReason {
    /// Not known.
    Unknown,
    /// The guest kernel panicked (reported through a pvpanic device).
    Panicked,
    /// A reason this version does not know (the raw libvirt value).
    Other(i32),
}

/// Why a domain stopped: what the host agent decides on.
///
/// `Shutdown` covers both an ACPI shutdown the agent asked for and a guest that powered
/// itself off: the hypervisor cannot tell those apart, so the agent remembers what it asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// The guest OS powered off.
    Shutdown,
    /// Forced off by a management request (`destroy`).
    Destroyed,
    /// The guest crashed or panicked, or its emulator process died.
    Crashed,
    /// Moved to another host.
    Migrated,
    /// Saved to a file.
    Saved,
    /// Failed to start.
    StartFailed,
    /// Replaced by a snapshot.
    FromSnapshot,
    /// Stopped by the libvirt daemon itself.
    Daemon,
    /// The hypervisor gave no reason.
    Unknown,
}

impl StopCause {
    /// Whether this stop is a failure an HA policy should react to. A stop nobody can prove
    /// was intended (`Unknown`) counts as a failure.
    pub fn is_failure(&self) -> bool {
        matches!(self, StopCause::Crashed | StopCause::StartFailed | StopCause::Unknown)
    }
}

/// A lifecycle change of one domain, as the hypervisor reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainEvent {
    /// The domain's UUID.
    pub uuid: Uuid,
    /// The domain's name.
    pub name: String,
    /// What happened.
    pub kind: EventKind,
    /// The detail the hypervisor gave for it.
    pub reason: EventReason,
}

impl DomainEvent {
    /// Why the domain stopped, for `Stopped` and `Crashed` events; `None` for the others.
    pub fn stop_cause(&self) -> Option<StopCause> {
        match self.kind {
            EventKind::Crashed => Some(StopCause::Crashed),
            EventKind::Stopped => Some(match self.reason {
                EventReason::Shutdown => StopCause::Shutdown,
                EventReason::Destroyed => StopCause::Destroyed,
                // `Failed` is libvirt's "host emulator failed": the QEMU process died.
                EventReason::Crashed | EventReason::Failed => StopCause::Crashed,
                EventReason::Migrated => StopCause::Migrated,
                EventReason::Saved => StopCause::Saved,
                EventReason::FromSnapshot => StopCause::FromSnapshot,
                _ => StopCause::Unknown,
            }),
            _ => None,
        }
    }
}

/// The kind of a lifecycle event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A definition was added or changed.
    Defined,
    /// A definition was removed.
    Undefined,
    /// The domain started.
    Started,
    /// The domain was paused.
    Suspended,
    /// The domain was resumed.
    Resumed,
    /// The domain stopped; the reason says how.
    Stopped,
    /// The guest OS finished shutting down, or started to (the reason says who asked).
    Shutdown,
    /// The guest suspended itself (power management).
    PmSuspended,
    /// The guest crashed; the domain may be kept in the crashed state.
    Crashed,
    /// An event kind this version does not know (the raw libvirt value).
    Other(i32),
}

/// The detail of a lifecycle event. Which values occur depends on the [`EventKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventReason {
    /// `Defined`: a new definition.
    Added,
    /// `Defined`: a changed definition.
    Updated,
    /// `Defined`/`Undefined`: renamed.
    Renamed,
    /// `Undefined`: removed.
    Removed,
    /// `Started`: a normal boot.
    Booted,
    /// `Started`/`Suspended`/`Resumed`/`Stopped`: a migration's step.
    Migrated,
    /// `Started`/`Suspended`: restored from a saved state.
    Restored,
    /// `Defined`/`Started`/`Suspended`/`Resumed`/`Stopped`: a snapshot operation.
    FromSnapshot,
    /// `Started`: woken from power-management suspend.
    Wakeup,
    /// `Started`: libvirt re-created the domain (e.g. after a crash with `on_crash` = restart).
    Recreated,
    /// `Suspended`: paused by request.
    Paused,
    /// `Suspended`: paused on a disk I/O error.
    IoError,
    /// `Suspended`: paused by the watchdog action.
    Watchdog,
    /// `Suspended`: paused after a failed API call.
    ApiError,
    /// `Suspended`/`Resumed`: post-copy migration.
    Postcopy,
    /// `Suspended`/`Resumed`: post-copy migration failed.
    PostcopyFailed,
    /// `Resumed`: unpaused by request.
    Unpaused,
    /// `Stopped`: the guest OS powered off.
    Shutdown,
    /// `Stopped`: forced off.
    Destroyed,
    /// `Stopped`: the guest crashed.
    Crashed,
    /// `Stopped`: saved to a file.
    Saved,
    /// `Stopped`: the emulator process failed (died).
    Failed,
    /// `Shutdown`: the guest finished shutting down.
    ShutdownFinished,
    /// `Shutdown`: the guest itself started the shutdown.
    ShutdownByGuest,
    /// `Shutdown`: the host (a management request) started the shutdown.
    ShutdownByHost,
    /// `PmSuspended`: suspended to memory.
    Memory,
    /// `PmSuspended`: suspended to disk.
    Disk,
    /// `Crashed`: the guest kernel panicked.
    Panicked,
    /// `Crashed`: a crash kernel was loaded and runs.
    CrashLoaded,
    /// A detail this version does not know (the raw libvirt value).
    Other(i32),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, reason: EventReason) -> DomainEvent {
        DomainEvent { uuid: Uuid::nil(), name: "vm".into(), kind, reason }
    }

    #[test]
    fn stop_causes_tell_crashes_from_requests() {
        assert_eq!(DomainState::Shutoff(ShutoffReason::Destroyed).stop_cause(), Some(StopCause::Destroyed));
        assert_eq!(DomainState::Shutoff(ShutoffReason::Shutdown).stop_cause(), Some(StopCause::Shutdown));
        assert_eq!(DomainState::Crashed(CrashedReason::Panicked).stop_cause(), Some(StopCause::Crashed));
        assert_eq!(DomainState::Running(RunningReason::Booted).stop_cause(), None);
        assert!(StopCause::Crashed.is_failure());
        assert!(StopCause::Unknown.is_failure());
        assert!(!StopCause::Shutdown.is_failure());
        assert!(!StopCause::Destroyed.is_failure());
        assert!(!StopCause::Migrated.is_failure());

        assert_eq!(event(EventKind::Stopped, EventReason::Failed).stop_cause(), Some(StopCause::Crashed));
        assert_eq!(event(EventKind::Stopped, EventReason::Migrated).stop_cause(), Some(StopCause::Migrated));
        assert_eq!(event(EventKind::Crashed, EventReason::Panicked).stop_cause(), Some(StopCause::Crashed));
        assert_eq!(event(EventKind::Shutdown, EventReason::ShutdownByGuest).stop_cause(), None);
        assert_eq!(event(EventKind::Started, EventReason::Booted).stop_cause(), None);
    }
}
