//! The blocking API: a host's lease on a lockspace ([`HostLease`]), driving
//! the sans-I/O operations of [`crate::engine`] against a [`LeaseDisk`] and
//! the system's monotonic clock.
//!
//! Methods take `&self` and may be called from several threads: typically
//! one thread calls [`HostLease::renewal_loop`] (or `renew` every `R`)
//! while others acquire and release. The internal lock is never held across
//! disk I/O or sleeps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;

use crate::clock::{Millis, monotonic_now};
use crate::config::Timeouts;
use crate::disk::LeaseDisk;
use crate::engine::{
    AcquireOp, HostState, Input, IoCompletion, IoRequest, JoinOp, LeaveOp, OpError, Operation, ReleaseOp, RenewOp,
    Step, Token,
};
use crate::format::{Header, HostId};
use crate::lockspace::{Lockspace, LockspaceError};

/// Errors of a host's lease operations.
#[derive(Debug, Error)]
pub enum LeaseError {
    /// The lease area could not be opened.
    #[error("cannot open the lease area")]
    Lockspace(#[from] LockspaceError),
    /// A lease operation failed (see [`OpError`]; `Busy` and `Lost` are the
    /// ones callers act on).
    #[error(transparent)]
    Op(#[from] OpError),
    /// `acquire` with a wait gave up.
    #[error("gave up acquiring resource {name:?} after waiting {waited_ms} ms")]
    WaitTimeout {
        /// Resource name.
        name: String,
        /// How long we waited.
        waited_ms: u64,
        /// The last reason it was not acquired.
        #[source]
        last: OpError,
    },
}

/// Errors of `acquire`: [`LeaseError::Op`] with [`OpError::Busy`] when
/// tried once and held by a possibly live host, [`LeaseError::WaitTimeout`]
/// when a wait ran out.
pub type AcquireError = LeaseError;

impl LeaseError {
    /// The resource is held by a host that may be alive (tried once).
    pub fn is_busy(&self) -> bool {
        matches!(self, LeaseError::Op(OpError::Busy { .. }))
    }

    /// A wait for the resource ran out.
    pub fn is_wait_timeout(&self) -> bool {
        matches!(self, LeaseError::WaitTimeout { .. })
    }

    /// The host lease is lost: everything depending on it must stop; join
    /// again to continue.
    pub fn is_lost(&self) -> bool {
        matches!(self, LeaseError::Op(OpError::Lost { .. }))
    }
}

/// Performs one request on the disk (blocking).
fn perform(disk: &dyn LeaseDisk, req: IoRequest) -> IoCompletion {
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut src = e.source();
        while let Some(inner) = src {
            s.push_str(": ");
            s.push_str(&inner.to_string());
            src = inner.source();
        }
        s
    }
    match req {
        IoRequest::Read { offset, len } => {
            let mut buf = vec![0u8; len as usize];
            match disk.read_at(offset, &mut buf) {
                Ok(()) => IoCompletion::Read(buf),
                Err(e) => IoCompletion::Failed(chain(&e)),
            }
        }
        IoRequest::Write { offset, data } => match disk.write_at(offset, &data) {
            Ok(()) => IoCompletion::Written,
            Err(e) => IoCompletion::Failed(chain(&e)),
        },
    }
}

/// Runs an operation to completion: I/O blocks this thread, sleeps sleep it.
fn drive<O: Operation>(disk: &dyn LeaseDisk, state: &Mutex<HostState>, op: &mut O) -> O::Output {
    let mut input = Input::Start;
    loop {
        let step = {
            let mut st = lock(state);
            op.resume(&mut st, input, monotonic_now())
        };
        input = match step {
            Step::Io(req) => Input::Io(perform(disk, req)),
            Step::SleepUntil(t) => {
                let now = monotonic_now();
                if t > now {
                    std::thread::sleep(Millis(t.since(now)).as_duration());
                }
                Input::Wake
            }
            Step::Done(out) => return out,
        };
    }
}

fn lock(state: &Mutex<HostState>) -> MutexGuard<'_, HostState> {
    // A panic while holding the lock cannot leave HostState half-updated in a way that
    // matters for safety (validity is re-derived from the clock), so poisoning is ignored.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// A host's membership of a lockspace (its delta lease) and the resource
/// leases it holds.
///
/// Validity: every lease is valid until [`HostLease::valid_until`] (start
/// of the last successful renewal + the fence deadline `K`, on
/// CLOCK_BOOTTIME). After that the host must already be killing whatever
/// depends on its leases; a process that resumes from a pause must check
/// [`HostLease::is_valid`] with a fresh clock reading before acting.
#[derive(Debug)]
pub struct HostLease {
    disk: Arc<dyn LeaseDisk>,
    state: Mutex<HostState>,
    renewing: Mutex<()>,
    /// Serialises acquisition and release attempts (each a few I/Os, never a
    /// sleep): two of them on one name must not interleave.
    resource_op: Mutex<()>,
}

impl HostLease {
    /// Opens the area (checking the cluster id) and joins as `host_id`.
    /// Blocks: if the slot is not free it watches it for the host-dead time
    /// `T` (failing if another host renews it), then writes and waits `2I`
    /// to detect racing joiners. Renew right after joining, then every `R`.
    pub fn join(disk: Arc<dyn LeaseDisk>, cluster_id: &str, host_id: HostId) -> Result<HostLease, LeaseError> {
        let header = Lockspace::open(&*disk, cluster_id)?;
        let state = Mutex::new(HostState::new(header, host_id)?);
        let mut op = JoinOp::new(rand::random::<u64>());
        drive(&*disk, &state, &mut op)?;
        Ok(HostLease { disk, state, renewing: Mutex::new(()), resource_op: Mutex::new(()) })
    }

    /// Renews the host lease (and with it every resource lease held).
    /// Returns the new fence deadline. `Lost` means the deadline had passed
    /// or the host id was taken: nothing may be done under any lease of this
    /// `HostLease` any more.
    pub fn renew(&self) -> Result<Millis, LeaseError> {
        let _one_at_a_time = self.renewing.lock().unwrap_or_else(|p| p.into_inner());
        Ok(drive(&*self.disk, &self.state, &mut RenewOp::new())?)
    }

    /// Renews every `R` until `stop` is set or the lease is lost; calls
    /// `on_renewal` after each attempt. Failed attempts are retried at the
    /// next interval (the timing rules tolerate one). Returns the error that
    /// ended it (`Lost`), or `Ok` when stopped.
    pub fn renewal_loop(
        &self,
        stop: &AtomicBool,
        mut on_renewal: impl FnMut(&Result<Millis, LeaseError>),
    ) -> Result<(), LeaseError> {
        let r = self.timeouts().renewal_ms;
        let mut next = monotonic_now();
        while !stop.load(Ordering::Relaxed) {
            let now = monotonic_now();
            if next > now {
                // Sleep in short steps so that `stop` is noticed promptly.
                std::thread::sleep(Duration::from_millis(next.since(now).min(50)));
                continue;
            }
            next = now + r;
            let res = self.renew();
            on_renewal(&res);
            if let Err(e) = res
                && (e.is_lost() || matches!(e, LeaseError::Op(OpError::NotJoined)))
            {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Acquires resource `name` and returns its fencing token.
    ///
    /// `wait: None` tries once: [`OpError::Busy`] if a possibly live host
    /// holds it (a holder that died is only recognised after its slot was
    /// observed unchanged for `T`; observations persist between calls).
    /// `wait: Some(d)` retries until acquired or `d` has passed
    /// ([`LeaseError::WaitTimeout`]).
    pub fn acquire(&self, name: &str, wait: Option<Duration>) -> Result<Token, AcquireError> {
        let start = monotonic_now();
        let deadline = wait.map(|d| start + d.as_millis() as u64);
        let poll = self.timeouts().poll_interval_ms();
        let mut contended = 0u32;
        loop {
            let res = {
                let _one_at_a_time = self.resource_op.lock().unwrap_or_else(|p| p.into_inner());
                drive(&*self.disk, &self.state, &mut AcquireOp::new(name))
            };
            let err = match res {
                Ok(token) => return Ok(token),
                Err(e) => e,
            };
            let now = monotonic_now();
            let retry_at = match &err {
                OpError::Contended { .. } => {
                    contended += 1;
                    if deadline.is_none() && contended > 3 {
                        return Err(err.into());
                    }
                    now + rand::random_range(5..50)
                }
                OpError::Busy { dead_no_earlier_than, .. } => (now + poll).min(*dead_no_earlier_than),
                OpError::Io { .. } | OpError::TimedOut { .. } | OpError::Corrupt { .. } => now + poll,
                _ => return Err(err.into()),
            };
            match deadline {
                None if !matches!(err, OpError::Contended { .. }) => return Err(err.into()),
                Some(d) if now >= d => {
                    return Err(LeaseError::WaitTimeout {
                        name: name.to_string(),
                        waited_ms: now.since(start),
                        last: err,
                    });
                }
                _ => {}
            }
            let until = deadline.map_or(retry_at, |d| retry_at.min(d));
            std::thread::sleep(Duration::from_millis(until.since(now)));
        }
    }

    /// Releases resource `name`. It is forgotten at once; the release is
    /// recorded on disk if the host lease is still valid (otherwise others
    /// take it over once this host's lease is dead).
    pub fn release(&self, name: &str) -> Result<(), LeaseError> {
        let _one_at_a_time = self.resource_op.lock().unwrap_or_else(|p| p.into_inner());
        Ok(drive(&*self.disk, &self.state, &mut ReleaseOp::new(name))?)
    }

    /// Leaves the lockspace: forgets all resource leases and frees the host
    /// slot so that the next joiner of this id need not wait. Stop any
    /// renewal loop first.
    pub fn leave(self) -> Result<(), LeaseError> {
        let _one_at_a_time = self.renewing.lock().unwrap_or_else(|p| p.into_inner());
        Ok(drive(&*self.disk, &self.state, &mut LeaveOp::new())?)
    }

    /// The fence deadline on CLOCK_BOOTTIME ([`monotonic_now`]): start of
    /// the last successful renewal + `K`. `None` once lost.
    pub fn valid_until(&self) -> Option<Millis> {
        lock(&self.state).valid_until()
    }

    /// Whether the leases are valid at `now` (a [`monotonic_now`] reading).
    pub fn is_valid(&self, now: Millis) -> bool {
        lock(&self.state).is_valid(now)
    }

    /// The token of `name` if held and valid right now.
    pub fn holds(&self, name: &str) -> Option<Token> {
        lock(&self.state).holds(name, monotonic_now())
    }

    /// Resources held (whether still valid: see [`HostLease::is_valid`]).
    pub fn held(&self) -> Vec<(String, Token)> {
        lock(&self.state).held().iter().map(|(n, h)| (n.clone(), h.token)).collect()
    }

    /// This host's id.
    pub fn host_id(&self) -> HostId {
        lock(&self.state).host_id()
    }

    /// Generation of this host lease.
    pub fn generation(&self) -> Option<u64> {
        lock(&self.state).generation()
    }

    /// The lockspace timeouts (from the area header).
    pub fn timeouts(&self) -> Timeouts {
        lock(&self.state).timeouts()
    }

    /// The area header.
    pub fn header(&self) -> Header {
        lock(&self.state).header().clone()
    }

    /// Why the lease was lost, if it was.
    pub fn lost_reason(&self) -> Option<String> {
        lock(&self.state).lost_reason().map(str::to_string)
    }
}
