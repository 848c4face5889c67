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
    AcquireOp, Acquired, HostObservation, HostState, Input, IoCompletion, IoRequest, JoinOp, LeaveOp, Liveness,
    ObserveHostsOp, OpError, Operation, ReleaseOp, RenewOp, SetValueOp, Step, Token,
};
use crate::format::{Header, HostId, LeaderRecord, LeaderState};
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

/// A resource as seen by [`HostLease::observe_resource`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceObservation {
    /// Resource name.
    pub name: String,
    /// Latest committed fencing token (held or released); `None` if the
    /// resource was never acquired.
    pub last_token: Option<Token>,
    /// The holder, if the leader record says the resource is held.
    pub holder: Option<HolderObservation>,
    /// The value block (`Ok(None)`: never written), or why no copy is readable.
    pub value: Result<Option<ObservedValue>, String>,
}

impl ResourceObservation {
    /// The value block's bytes, if written and readable.
    pub fn value_bytes(&self) -> Option<&[u8]> {
        self.value.as_ref().ok()?.as_ref().map(|v| v.data.as_slice())
    }
}

/// The holder of a resource and how this observer judges its host lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderObservation {
    /// The holder's host id.
    pub host_id: HostId,
    /// Its fencing token.
    pub token: Token,
    /// Generation of its host lease when it acquired.
    pub generation: u64,
    /// `Dead` if its host lease is dead by this observer's rule (slot
    /// unchanged for `T`, or a new generation / a free slot there): the
    /// holder has fenced itself and the resource may be taken over.
    pub liveness: Liveness,
    /// Last observed change of its slot (this host's clock).
    pub last_change: Millis,
    /// When it is judged dead if its slot stays unchanged.
    pub dead_at: Millis,
}

impl HolderObservation {
    /// Whether the holder's host lease is judged dead (the resource may be taken over).
    pub fn is_dead(&self) -> bool {
        self.liveness != Liveness::Alive
    }
}

/// A value block as observed: the bytes, and which holder wrote them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedValue {
    /// The value.
    pub data: Vec<u8>,
    /// Token under which it was written.
    pub token: Token,
    /// Host id of the writer.
    pub writer: HostId,
    /// Write sequence of the slot.
    pub seq: u64,
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

    /// Acquires resource `name` and returns its fencing token (see
    /// [`HostLease::acquire_with_value`], which also returns the value block).
    pub fn acquire(&self, name: &str, wait: Option<Duration>) -> Result<Token, AcquireError> {
        self.acquire_with_value(name, wait).map(|a| a.token)
    }

    /// Acquires resource `name` and returns its fencing token and the value
    /// block found in the lease: the last value any holder set (also one
    /// that crashed without releasing), `None` if none ever did.
    ///
    /// `wait: None` tries once: [`OpError::Busy`] if a possibly live host
    /// holds it (a holder that died is only recognised after its slot was
    /// observed unchanged for `T`; observations persist between calls).
    /// `wait: Some(d)` retries until acquired or `d` has passed
    /// ([`LeaseError::WaitTimeout`]).
    pub fn acquire_with_value(&self, name: &str, wait: Option<Duration>) -> Result<Acquired, AcquireError> {
        let start = monotonic_now();
        // Clock readings are whole milliseconds (truncated): one more keeps the promise that
        // a wait timeout comes no earlier than `wait` after the call.
        let deadline = wait.map(|d| start + d.as_millis() as u64 + 1);
        let poll = self.timeouts().poll_interval_ms();
        let mut contended = 0u32;
        loop {
            let res = {
                let _one_at_a_time = self.resource_op.lock().unwrap_or_else(|p| p.into_inner());
                drive(&*self.disk, &self.state, &mut AcquireOp::new(name))
            };
            let err = match res {
                Ok(acquired) => return Ok(acquired),
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

    /// Sets the value block of held resource `name` (at most
    /// [`crate::format::MAX_VALUE_LEN`] bytes). Only a valid holder writes:
    /// `NotHeld`, `Lost`, or `Superseded` (a later holder's records found in
    /// the slot; the host lease is then dropped) otherwise, and nothing is
    /// written. On `Ok` the value is on disk and every later acquirer and
    /// observer sees it until the next successful `set_value`. On an I/O
    /// error either the old or the new value is there.
    pub fn set_value(&self, name: &str, value: &[u8]) -> Result<(), LeaseError> {
        let _one_at_a_time = self.resource_op.lock().unwrap_or_else(|p| p.into_inner());
        Ok(drive(&*self.disk, &self.state, &mut SetValueOp::new(name, value))?)
    }

    /// Sets the value block of `name`, then releases it (the value is on
    /// disk before the release). If setting the value fails the lease is
    /// kept (unless it was lost): retry, or [`HostLease::release`] without it.
    pub fn release_with_value(&self, name: &str, value: &[u8]) -> Result<(), LeaseError> {
        let _one_at_a_time = self.resource_op.lock().unwrap_or_else(|p| p.into_inner());
        Ok(drive(&*self.disk, &self.state, &mut SetValueOp::new(name, value).then_release())?)
    }

    /// Reads every host slot and judges each host id Free, Alive or Dead on
    /// this host's clock, with the same rule and the same observation
    /// memory that acquisition uses: a host is dead once its slot stayed
    /// unchanged for `T` since this host first read its current content.
    /// Call it regularly (e.g. every `R`): a host is never judged dead
    /// sooner than `T` after the first call that saw its slot.
    pub fn observe_hosts(&self) -> Result<Vec<HostObservation>, LeaseError> {
        Ok(drive(&*self.disk, &self.state, &mut ObserveHostsOp::new())?)
    }

    /// Who holds resource `name`, whether that holder's host lease is dead
    /// by this host's observations (updated by this call, see
    /// [`HostLease::observe_hosts`]), and the resource's value block.
    /// Reading takes nothing: any member may observe a resource it does not hold.
    pub fn observe_resource(&self, name: &str) -> Result<ResourceObservation, LeaseError> {
        let hosts = self.observe_hosts()?;
        self.observe_resource_with(name, &hosts)
    }

    /// [`HostLease::observe_resource`] with host observations already made this round
    /// (an observer of many resources reads the host slots once, not once per resource).
    pub fn observe_resource_with(
        &self,
        name: &str,
        hosts: &[HostObservation],
    ) -> Result<ResourceObservation, LeaseError> {
        let cluster_id = self.header().cluster_id;
        let dump = Lockspace::inspect(&*self.disk, &cluster_id, name)?;
        observation_from_dump(name, dump.as_ref(), hosts)
    }

    /// The lease disk (for the batched reader of [`crate::observe`]).
    pub(crate) fn disk(&self) -> &dyn LeaseDisk {
        &*self.disk
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

/// [`HostLease::observe_resource_with`]'s answer for the slot `Lockspace::inspect` found
/// bound to `name` (`None`: never acquired).
pub(crate) fn observation_from_dump(
    name: &str,
    dump: Option<&crate::lockspace::ResourceDump>,
    hosts: &[HostObservation],
) -> Result<ResourceObservation, LeaseError> {
    let Some(dump) = dump else {
        return Ok(ResourceObservation { name: name.to_string(), last_token: None, holder: None, value: Ok(None) });
    };
    let value = dump
        .value
        .clone()
        .map(|v| v.map(|r| ObservedValue { data: r.data, token: Token(r.lver), writer: r.owner, seq: r.seq }));
    let leader = match &dump.leader {
        Ok(l) => l,
        Err(e) => {
            return Err(LeaseError::Op(OpError::Io {
                what: format!("leader record of resource {name:?}"),
                detail: format!("unreadable ({e}); an acquisition in progress repairs it, observe again"),
            }));
        }
    };
    Ok(resource_observation(name, leader, value, hosts))
}

/// What a leader record and value block say about resource `name`, with the holder's
/// liveness judged from this round's host observations (shared by the single-lease read and
/// the batched [`crate::observe::ResourceReader`], so both judge exactly alike).
pub(crate) fn resource_observation(
    name: &str,
    leader: &LeaderRecord,
    value: Result<Option<ObservedValue>, String>,
    hosts: &[HostObservation],
) -> ResourceObservation {
    let last_token = (leader.lver > 0).then_some(Token(leader.lver));
    let holder = (leader.state == LeaderState::Held).then(|| {
        let owner = leader.value.owner;
        let seen = hosts.iter().find(|o| o.host_id == owner);
        // A new generation or a cleanly left slot means the holder's incarnation is gone.
        let gone = seen.is_some_and(|o| o.liveness == Liveness::Free || o.generation != Some(leader.value.generation));
        let liveness = match seen {
            _ if gone => Liveness::Dead,
            Some(o) => o.liveness,
            None => Liveness::Alive,
        };
        HolderObservation {
            host_id: owner,
            token: Token(leader.lver),
            generation: leader.value.generation,
            liveness,
            last_change: seen.map_or(Millis(0), |o| o.last_change),
            dead_at: seen.map_or(Millis(0), |o| o.dead_at),
        }
    });
    ResourceObservation { name: name.to_string(), last_token, holder, value }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MemDisk;
    use crate::lockspace::AreaParams;

    /// A holder that (against the timing rules, via a test-only switch) still believes its
    /// lease valid after another host took the resource over is stopped by the read before
    /// the value write: it gets `Superseded`, drops its host lease, and the newer value stays.
    #[test]
    fn superseded_holder_is_refused_by_the_read_before_the_write() {
        let disk: Arc<dyn LeaseDisk> = Arc::new(MemDisk::new(0, 512));
        let params = AreaParams {
            host_slots: 2,
            resource_slots: 2,
            timeouts: Timeouts::from_renewal_ms(100),
            ..AreaParams::new("t")
        };
        Lockspace::init(&*disk, &params, false).unwrap();
        let a = HostLease::join(disk.clone(), "t", 1).unwrap();
        let old = a.acquire("db", None).unwrap();
        a.set_value("db", b"old").unwrap();
        lock(&a.state).unsafe_ignore_fence_deadline = true;
        // b renews while waiting for a to be judged dead (a never renews).
        let b = Arc::new(HostLease::join(disk.clone(), "t", 2).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let renewer = {
            let (b, stop) = (b.clone(), stop.clone());
            std::thread::spawn(move || b.renewal_loop(&stop, |_| {}))
        };
        let got = b.acquire_with_value("db", Some(Duration::from_secs(10))).unwrap();
        assert!(got.token > old);
        assert_eq!(got.value.as_deref(), Some(&b"old"[..]));
        b.set_value("db", b"new").unwrap();
        assert!(a.holds("db").is_some(), "the test switch keeps a's stale belief");
        let err = a.set_value("db", b"stale").unwrap_err();
        assert!(matches!(&err, LeaseError::Op(OpError::Superseded { token, .. }) if *token == old), "{err}");
        assert!(a.lost_reason().is_some() && a.holds("db").is_none(), "the host lease is dropped");
        let dump = Lockspace::inspect(&*disk, "t", "db").unwrap().unwrap();
        assert_eq!(dump.value_bytes(), Some(&b"new"[..]));
        stop.store(true, Ordering::Relaxed);
        renewer.join().unwrap().unwrap();
    }
}
