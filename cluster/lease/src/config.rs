//! Lease timing: the timeouts every host of a lockspace shares, and the rules
//! that prove "a holder has finished killing before any observer may judge
//! it dead".
//!
//! The timeouts live in the lease area header so that every host uses the
//! same values; a holder's fence deadline and an observer's host-dead time
//! are only comparable if they come from one place.
//!
//! The ordering argument (see docs/leases.md for the long version):
//!
//! * A holder renews its delta lease every `R`. A renewal write *started* at
//!   local time `w` and completed within the I/O timeout `I` keeps its host
//!   lease (and every resource lease it holds) valid until `w + K` on its own
//!   clock: `K` is the fence deadline. At `w + K` it must begin killing, and
//!   must be done by `w + K + M` (`M`: kill margin).
//! * An observer judges a host dead only after seeing its slot unchanged for
//!   `T` on the observer's own clock, counted from a read that completed
//!   after the holder's write started, so no earlier than `w + T`.
//! * Hence `T >= K + M + I` (the extra `I` covers a last write of the holder
//!   that is still landing), stretched by the worst clock-rate error `ρ`
//!   between two hosts: `T·(1-ρ) >= (K + M + I)·(1+ρ)`.
//! * `K >= 2R + I` lets one renewal fail (or time out) and the next one,
//!   started at `w + 2R`, still complete before the deadline.
//!
//! Takeover time after a holder dies ≈ `T` + one poll interval + the I/O of
//! one acquisition (a handful of sector reads and writes).

use thiserror::Error;

/// Worst relative clock-rate difference between any two hosts that the
/// timing rules tolerate, in parts per million (10 000 ppm = 1 %).
///
/// Monotonic clocks of real machines differ by far less (tens of ppm); the
/// generous value also absorbs scheduling noise in the measurement of `T`.
pub const MAX_CLOCK_RATE_ERROR_PPM: u64 = 10_000;

/// Smallest renewal interval accepted, in milliseconds.
pub const MIN_RENEWAL_MS: u64 = 100;

/// Lease timeouts shared by every host of a lockspace (all in milliseconds
/// of each host's own monotonic clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Timeouts {
    /// `R`: interval between delta-lease renewals.
    pub renewal_ms: u64,
    /// `I`: an I/O that has not completed this long after it was issued
    /// counts as failed (its result is never used).
    pub io_timeout_ms: u64,
    /// `K`: fence deadline, measured from the start of the last successful
    /// renewal write. At this point the holder treats its leases as lost and
    /// begins killing whatever depends on them.
    pub fence_ms: u64,
    /// `M`: time the holder allows itself to finish killing after `K`
    /// (graceful stop, SIGKILL of the process group, watchdog).
    pub kill_margin_ms: u64,
    /// `T`: a host whose delta slot stays unchanged this long (on the
    /// observer's clock) is dead; its resource leases may be taken over.
    pub host_dead_ms: u64,
}

/// Why a set of timeouts was rejected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A timeout is zero or below its minimum.
    #[error("lease timeout {field} = {value_ms} ms is below its minimum of {min_ms} ms")]
    TooSmall {
        /// Which field (`renewal_ms`, ...).
        field: &'static str,
        /// The rejected value.
        value_ms: u64,
        /// The smallest accepted value.
        min_ms: u64,
    },
    /// The fence deadline does not tolerate one failed renewal.
    #[error(
        "fence deadline K = {fence_ms} ms must be at least 2*R + I = {required_ms} ms \
         (R = renewal interval, I = I/O timeout) so that one failed renewal does not fence the holder; \
         raise fence_ms or lower renewal_ms/io_timeout_ms"
    )]
    FenceTooShort {
        /// The configured `K`.
        fence_ms: u64,
        /// `2R + I`.
        required_ms: u64,
    },
    /// A joiner could not renew inside its join write's validity.
    #[error(
        "fence deadline K = {fence_ms} ms must be at least 2*I + 1 + I/4 = {required_ms} ms (I = I/O timeout): \
         a joiner waits 2*I + 1 for racing joiners and must renew before K; raise fence_ms or lower io_timeout_ms"
    )]
    FenceBelowJoinSettle {
        /// The configured `K`.
        fence_ms: u64,
        /// `2I + 1 + I/4 + 1`.
        required_ms: u64,
    },
    /// Observers could judge the holder dead before it has finished killing.
    #[error(
        "host-dead time T = {host_dead_ms} ms must be at least (K + M + I) * (1 + ρ)/(1 - ρ) = {required_ms} ms \
         (K = fence deadline, M = kill margin, I = I/O timeout, ρ = {ppm} ppm clock-rate error) so that a holder \
         has finished killing before any other host may take its leases; raise host_dead_ms or lower the others"
    )]
    HostDeadTooShort {
        /// The configured `T`.
        host_dead_ms: u64,
        /// The smallest `T` that proves the ordering.
        required_ms: u64,
        /// The clock-rate error assumed.
        ppm: u64,
    },
}

impl Default for Timeouts {
    /// Takeover at most about 7.8 s after a holder's death on local storage
    /// ([`Timeouts::takeover_estimate_ms`]: `T + R + R/4` + I/O; 5.5–6.5 s measured):
    /// `R` = 1 s, `I` = 1.5 s, `K` = 3.5 s, `M` = 1 s, `T` = 6.5 s.
    fn default() -> Self {
        Timeouts::from_renewal_ms(1000)
    }
}

impl Timeouts {
    /// Derives a consistent set from the renewal interval `R`, in the
    /// proportions of the defaults: `I = 1.5R`, `K = 3.5R`, `M = R`,
    /// `T = 6.5R`. `R = 300` gives a takeover under 2.5 s; `R = 1000` the
    /// default. The result still has to pass [`Timeouts::validate`] (`R`
    /// must be at least [`MIN_RENEWAL_MS`]).
    pub fn from_renewal_ms(renewal_ms: u64) -> Self {
        Timeouts {
            renewal_ms,
            io_timeout_ms: renewal_ms * 3 / 2,
            fence_ms: renewal_ms * 7 / 2,
            kill_margin_ms: renewal_ms,
            host_dead_ms: renewal_ms * 13 / 2,
        }
    }

    /// Checks that these timeouts prove the self-fencing ordering (see the
    /// module documentation for the formula).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let min = |field: &'static str, value_ms: u64, min_ms: u64| {
            if value_ms < min_ms { Err(ConfigError::TooSmall { field, value_ms, min_ms }) } else { Ok(()) }
        };
        min("renewal_ms", self.renewal_ms, MIN_RENEWAL_MS)?;
        min("io_timeout_ms", self.io_timeout_ms, 10)?;
        min("kill_margin_ms", self.kill_margin_ms, 10)?;
        min("fence_ms", self.fence_ms, 1)?;
        min("host_dead_ms", self.host_dead_ms, 1)?;
        let required_fence = 2 * self.renewal_ms + self.io_timeout_ms;
        if self.fence_ms < required_fence {
            return Err(ConfigError::FenceTooShort { fence_ms: self.fence_ms, required_ms: required_fence });
        }
        // A joiner renews right after its 2I settle wait, inside the join write's validity.
        if self.fence_ms <= self.join_settle_ms() + self.io_timeout_ms / 4 {
            return Err(ConfigError::FenceBelowJoinSettle {
                fence_ms: self.fence_ms,
                required_ms: self.join_settle_ms() + self.io_timeout_ms / 4 + 1,
            });
        }
        let required_dead = Self::required_host_dead_ms(self.fence_ms, self.kill_margin_ms, self.io_timeout_ms);
        if self.host_dead_ms < required_dead {
            return Err(ConfigError::HostDeadTooShort {
                host_dead_ms: self.host_dead_ms,
                required_ms: required_dead,
                ppm: MAX_CLOCK_RATE_ERROR_PPM,
            });
        }
        Ok(())
    }

    /// The smallest host-dead time `T` that proves the ordering for the
    /// given `K`, `M` and `I`: `ceil((K + M + I) · (1+ρ)/(1-ρ))`.
    pub fn required_host_dead_ms(fence_ms: u64, kill_margin_ms: u64, io_timeout_ms: u64) -> u64 {
        let base = (fence_ms + kill_margin_ms + io_timeout_ms) as u128;
        let num = base * (1_000_000 + MAX_CLOCK_RATE_ERROR_PPM) as u128;
        let den = (1_000_000 - MAX_CLOCK_RATE_ERROR_PPM) as u128;
        num.div_ceil(den) as u64
    }

    /// How long a joiner waits after writing its delta slot before reading
    /// it back to detect a racing joiner: `2I + 1` ms (a racer's read and
    /// write that started before ours landed both finish within `2I`).
    pub fn join_settle_ms(&self) -> u64 {
        2 * self.io_timeout_ms + 1
    }

    /// How often a waiting acquirer or joiner re-reads a slot it watches:
    /// `R/4` (at least 10 ms).
    pub fn poll_interval_ms(&self) -> u64 {
        (self.renewal_ms / 4).max(10)
    }

    /// Rough takeover time after a holder dies, for a contender that is
    /// already waiting: `T` + one poll interval + `R` (the last renewal may
    /// have landed just before the death) + `io_ms` for the acquisition I/O
    /// (pass a measured value; about six sequential sector I/Os).
    pub fn takeover_estimate_ms(&self, io_ms: u64) -> u64 {
        self.host_dead_ms + self.poll_interval_ms() + self.renewal_ms + io_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_take_over_within_eight_seconds() {
        let t = Timeouts::default();
        t.validate().unwrap();
        assert!(t.takeover_estimate_ms(50) <= 8000, "{}", t.takeover_estimate_ms(50));
    }

    #[test]
    fn fast_profile_down_to_three_seconds_is_valid() {
        let t = Timeouts::from_renewal_ms(300);
        t.validate().unwrap();
        assert!(t.takeover_estimate_ms(50) <= 3000, "{}", t.takeover_estimate_ms(50));
    }

    #[test]
    fn rejects_fence_that_cannot_survive_one_failed_renewal() {
        let t = Timeouts { fence_ms: 2999, ..Timeouts::from_renewal_ms(1000) };
        // 2R + I = 2000 + 1500
        assert_eq!(t.validate(), Err(ConfigError::FenceTooShort { fence_ms: 2999, required_ms: 3500 }));
    }

    #[test]
    fn rejects_host_dead_shorter_than_kill_ordering() {
        let t = Timeouts { host_dead_ms: 6000, ..Timeouts::default() };
        match t.validate() {
            Err(ConfigError::HostDeadTooShort { required_ms, .. }) => {
                // (3500 + 1000 + 1500) * 1.01 / 0.99 = 6121.2
                assert_eq!(required_ms, 6122);
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = t.validate().unwrap_err().to_string();
        assert!(msg.contains("host_dead_ms"), "{msg}");
    }

    #[test]
    fn rejects_tiny_renewal() {
        assert!(matches!(
            Timeouts::from_renewal_ms(50).validate(),
            Err(ConfigError::TooSmall { field: "renewal_ms", .. })
        ));
    }
}
