//! The self-fencing escalation policy: what a lease holder does, and when, once it can no longer
//! prove that its leases are valid.
//!
//! Times are offsets from `w`, the start of the last successful renewal write (the same origin as
//! [`crate::HostLease::valid_until`] = `w + K`):
//!
//! 1. `w + K` (fence deadline): the leases are lost. The agent runs the graceful stop (by default
//!    SIGTERM to each guarded process group) if it is scheduled at all.
//! 2. `w + K + grace`: the guard process SIGKILLs the groups. This is the guard's pet deadline, so
//!    it happens even when the agent is stopped or hung.
//! 3. `w + K + M` (M = kill margin): everything must be dead. Where a hardware watchdog is
//!    configured (off by default; none exists on the test machines) it resets the machine by then,
//!    covering processes that SIGKILL cannot end in time (uninterruptible I/O).
//!
//! Observers only judge the host dead at `T >= (K + M + I)·(1+ρ)/(1-ρ)` ([`Timeouts::validate`]),
//! so all three steps finish before any other host can take a lease over. [`FencePlan::new`] runs
//! that validation and adds the rules of the steps themselves.

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::clock::Millis;
use crate::config::{ConfigError, Timeouts};

/// Errors of building a fence plan.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The lease timeouts themselves are inconsistent.
    #[error("the lease timeouts cannot prove self-fencing")]
    Timeouts(#[source] ConfigError),
    /// The graceful-stop period leaves too little of the kill margin for SIGKILL to take effect.
    #[error(
        "graceful stop period {grace_ms} ms is more than half the kill margin M = {kill_margin_ms} ms; SIGKILL \
         needs the other half to take effect before other hosts may take over. Lower the grace period or \
         initialise the lease area with a larger kill margin"
    )]
    GraceTooLong {
        /// The requested grace period.
        grace_ms: u64,
        /// The lockspace's kill margin `M`.
        kill_margin_ms: u64,
    },
    /// The watchdog cannot be set to fire after the SIGKILL and before `K + M`.
    #[error(
        "a hardware watchdog needs kill margin M = {kill_margin_ms} ms >= grace {grace_ms} ms + 1000 ms (watchdog \
         timeouts have whole-second granularity, and the reset must come after the SIGKILL); initialise the \
         lease area with a larger renewal interval, or run without a watchdog"
    )]
    WatchdogMargin {
        /// The lockspace's kill margin `M`.
        kill_margin_ms: u64,
        /// The grace period.
        grace_ms: u64,
    },
}

/// Optional hardware watchdog (e.g. `/dev/watchdog`). Off by default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchdogConfig {
    /// The watchdog device.
    pub device: std::path::PathBuf,
}

/// When each escalation step happens, derived from the lockspace timeouts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FencePlan {
    timeouts: Timeouts,
    grace_ms: u64,
    watchdog: Option<WatchdogConfig>,
}

impl FencePlan {
    /// The default graceful-stop period: half the kill margin.
    pub fn default_grace_ms(timeouts: &Timeouts) -> u64 {
        timeouts.kill_margin_ms / 2
    }

    /// Builds a plan, validating the timeouts ([`Timeouts::validate`]) and the escalation timing:
    /// `grace <= M/2`, and with a watchdog `M >= grace + 1 s`.
    pub fn new(timeouts: Timeouts, grace_ms: u64, watchdog: Option<WatchdogConfig>) -> Result<FencePlan, FenceError> {
        timeouts.validate().map_err(FenceError::Timeouts)?;
        if grace_ms * 2 > timeouts.kill_margin_ms {
            return Err(FenceError::GraceTooLong { grace_ms, kill_margin_ms: timeouts.kill_margin_ms });
        }
        if watchdog.is_some() && timeouts.kill_margin_ms < grace_ms + 1000 {
            return Err(FenceError::WatchdogMargin { kill_margin_ms: timeouts.kill_margin_ms, grace_ms });
        }
        Ok(FencePlan { timeouts, grace_ms, watchdog })
    }

    /// The plan with the default grace period and no watchdog.
    pub fn with_defaults(timeouts: Timeouts) -> Result<FencePlan, FenceError> {
        Self::new(timeouts, Self::default_grace_ms(&timeouts), None)
    }

    /// The graceful-stop period between SIGTERM and SIGKILL.
    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }

    /// The configured watchdog, if any.
    pub fn watchdog(&self) -> Option<&WatchdogConfig> {
        self.watchdog.as_ref()
    }

    /// The guard's kill deadline for a lease valid until `valid_until` (= `w + K`): `w + K + grace`.
    /// Pet the guard with this after every successful renewal.
    pub fn kill_deadline(&self, valid_until: Millis) -> Millis {
        valid_until + self.grace_ms
    }

    /// `M − grace`: from the guard's kill deadline to [`FencePlan::dead_by`], the time the
    /// guard gives the watchdog after a missed pet.
    pub fn watchdog_extra_ms(&self) -> u64 {
        self.timeouts.kill_margin_ms - self.grace_ms
    }

    /// When everything must be dead: `w + K + M`. A watchdog must reset the machine by then.
    pub fn dead_by(&self, valid_until: Millis) -> Millis {
        valid_until + self.timeouts.kill_margin_ms
    }

    /// The watchdog timeout to program when petting it at `now`, in whole seconds, so that the
    /// reset happens after the guard's SIGKILL and no later than [`FencePlan::dead_by`]. `None` if
    /// no watchdog is configured or the remaining time is under one second (the watchdog should
    /// then be left to fire on its previous setting).
    pub fn watchdog_timeout_s(&self, valid_until: Millis, now: Millis) -> Option<u64> {
        self.watchdog.as_ref()?;
        let secs = self.dead_by(valid_until).since(now) / 1000;
        (secs >= 1).then_some(secs)
    }

    /// What the holder should be doing at `now` for a lease valid until `valid_until`.
    pub fn step_at(&self, valid_until: Millis, now: Millis) -> FenceStep {
        if now < valid_until {
            FenceStep::Valid
        } else if now < self.kill_deadline(valid_until) {
            FenceStep::GracefulStop
        } else if now < self.dead_by(valid_until) {
            FenceStep::Kill
        } else {
            FenceStep::Watchdog
        }
    }
}

/// Where the escalation stands at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceStep {
    /// The leases are valid: nothing to do.
    Valid,
    /// Lost: graceful stop (SIGTERM) now; SIGKILL follows at the kill deadline.
    GracefulStop,
    /// Past the kill deadline: SIGKILL (the guard does it even if the agent does not).
    Kill,
    /// Past `K + M`: only a watchdog reset is left (if one is configured).
    Watchdog,
}

/// Sends `signal` to process group `pgid`. Returns `false` if the group no longer exists.
pub fn signal_group(pgid: i32, signal: Signal) -> Result<bool, Errno> {
    if pgid <= 1 {
        return Err(Errno::EINVAL);
    }
    match kill(Pid::from_raw(-pgid), signal) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_plan_orders_steps_before_takeover() {
        let t = Timeouts::default();
        let plan = FencePlan::with_defaults(t).unwrap();
        let valid_until = Millis(10_000 + t.fence_ms);
        assert_eq!(plan.step_at(valid_until, valid_until - 1), FenceStep::Valid);
        assert_eq!(plan.step_at(valid_until, valid_until), FenceStep::GracefulStop);
        assert_eq!(plan.step_at(valid_until, plan.kill_deadline(valid_until)), FenceStep::Kill);
        assert_eq!(plan.step_at(valid_until, plan.dead_by(valid_until)), FenceStep::Watchdog);
        // Kill and dead-by both come before the earliest takeover (w + T).
        let w = Millis(10_000);
        assert!(plan.kill_deadline(valid_until) < plan.dead_by(valid_until));
        assert!(plan.dead_by(valid_until) < w + t.host_dead_ms);
        assert_eq!(plan.grace(), Duration::from_millis(t.kill_margin_ms / 2));
    }

    #[test]
    fn rejects_grace_longer_than_half_the_margin_and_invalid_timeouts() {
        let t = Timeouts::default();
        assert!(matches!(FencePlan::new(t, t.kill_margin_ms / 2 + 1, None), Err(FenceError::GraceTooLong { .. })));
        let bad = Timeouts { host_dead_ms: 100, ..t };
        assert!(matches!(FencePlan::with_defaults(bad), Err(FenceError::Timeouts(_))));
    }

    #[test]
    fn watchdog_needs_a_second_of_margin_and_fires_by_dead_by() {
        let wd = Some(WatchdogConfig { device: "/dev/watchdog".into() });
        let t = Timeouts::default();
        assert!(matches!(FencePlan::new(t, 250, wd.clone()), Err(FenceError::WatchdogMargin { .. })));
        let big = Timeouts::from_renewal_ms(3000);
        let plan = FencePlan::new(big, 1000, wd).unwrap();
        let w = Millis(50_000);
        let valid_until = w + big.fence_ms;
        let now = w + 200;
        let s = plan.watchdog_timeout_s(valid_until, now).unwrap();
        // Resets after the SIGKILL and no later than K + M.
        assert!(now + s * 1000 >= plan.kill_deadline(valid_until));
        assert!(now + s * 1000 <= plan.dead_by(valid_until));
        assert_eq!(FencePlan::with_defaults(t).unwrap().watchdog_timeout_s(valid_until, now), None);
    }

    #[test]
    fn signal_group_refuses_dangerous_ids_and_reports_missing_groups() {
        assert_eq!(signal_group(0, Signal::SIGKILL), Err(Errno::EINVAL));
        assert_eq!(signal_group(1, Signal::SIGKILL), Err(Errno::EINVAL));
        // A pid far above pid_max cannot exist.
        assert_eq!(signal_group(i32::MAX, Signal::SIGTERM), Ok(false));
    }
}
