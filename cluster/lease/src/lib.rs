//! Disk-fencing leases for Tandem: delta leases (which host ids are alive)
//! and Disk Paxos resource leases (which host owns a named resource, with a
//! fencing token), modelled on sanlock and on Gafni & Lamport's Disk Paxos.
//!
//! * [`format`]: the on-disk lease area (docs/lease-format.md).
//! * [`disk`]: the [`LeaseDisk`] trait, [`FileDisk`] (O_DIRECT) and [`MemDisk`].
//! * [`config`]: the timeouts and the rules that prove self-fencing
//!   finishes before takeover.
//! * [`engine`]: the protocol as sans-I/O state machines (no clock, no I/O).
//! * [`lockspace`]: init / open / dump / inspect of an area.
//! * [`host`]: the blocking API, [`HostLease`]; [`observe`]: reading many resource
//!   leases in few large reads.
//! * [`fence`], [`guard`], [`cgroup`]: self-fencing (escalation plan, the
//!   guard process, cgroup v2 helpers).
//!
//! Algorithms, timing and limits are described in docs/leases.md.

pub mod cgroup;
pub mod clock;
pub mod config;
pub mod disk;
pub mod engine;
pub mod fence;
pub mod format;
pub mod guard;
pub mod host;
pub mod lockspace;
pub mod observe;
#[cfg(test)]
mod sim;
pub mod watchdog;

pub use clock::{Millis, monotonic_now};
pub use config::{ConfigError, Timeouts};
pub use disk::{DiskError, FileDisk, IoMode, LeaseDisk, MemDisk};
pub use engine::{Acquired, HostObservation, Liveness, OpError, Token};
pub use format::{FormatError, Header, HostId, MAX_VALUE_LEN};
pub use host::{AcquireError, HolderObservation, HostLease, LeaseError, ObservedValue, ResourceObservation};
pub use lockspace::{AreaDump, AreaParams, HostSlotDump, Lockspace, LockspaceError, ResourceDump};
