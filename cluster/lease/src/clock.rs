//! Monotonic time in milliseconds, the only notion of time the lease
//! protocol uses.
//!
//! The protocol code never reads a clock: callers pass `now` in. The
//! blocking driver uses [`monotonic_now`], which reads CLOCK_BOOTTIME: it is
//! system-wide (so a separate guard process can compare deadlines computed
//! by the agent), never jumps with wall-clock changes, and keeps counting
//! while the machine is suspended (a suspended host must find its leases
//! expired when it wakes up).

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on one host's monotonic clock, or a span of it, in milliseconds.
/// Values from different hosts are not comparable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub u64);

impl Millis {
    /// Milliseconds from `earlier` to `self`, 0 if `earlier` is later.
    pub fn since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// This span as a `Duration`.
    pub fn as_duration(self) -> Duration {
        Duration::from_millis(self.0)
    }
}

impl Add<u64> for Millis {
    type Output = Millis;
    fn add(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
}

impl Sub<u64> for Millis {
    type Output = Millis;
    fn sub(self, ms: u64) -> Millis {
        Millis(self.0.saturating_sub(ms))
    }
}

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// Now on CLOCK_BOOTTIME, in milliseconds.
pub fn monotonic_now() -> Millis {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through the pointer, which points to a live local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) cannot fail on Linux");
    Millis(ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000)
}
