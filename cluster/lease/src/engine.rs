//! The lease protocol as sans-I/O state machines.
//!
//! Nothing here sleeps, reads a clock or touches a disk. Each operation
//! ([`JoinOp`], [`RenewOp`], [`AcquireOp`], [`ReleaseOp`]) is driven through
//! [`Operation::resume`]: it is given an [`Input`] and the caller's current
//! monotonic time, and answers with a [`Step`]: an I/O request to perform,
//! a time to be woken at, or its result. The blocking driver in
//! [`crate::host`] runs them against a [`crate::LeaseDisk`]; the
//! deterministic simulation runs them against a simulated disk and clocks.
//!
//! Operations of one host share a [`HostState`]. A renewal may run
//! concurrently with an acquisition or release (they touch different
//! sectors); two renewals, or two resource operations on the same name,
//! must not overlap.
//!
//! Every I/O result that arrives later than the I/O timeout after the
//! request was issued is treated as failed: decisions are only ever taken on
//! results known to be fresh, which is what the timing rules in
//! [`crate::config`] rely on.

use std::collections::{BTreeMap, HashMap};

use thiserror::Error;

use crate::clock::Millis;
use crate::config::Timeouts;
use crate::format::{
    BallotRecord, DeltaRecord, DeltaState, FormatError, Header, HostId, LeaderRecord, LeaderState, LeaseValue,
    RECORD_LEN, VALUE_COPIES, ValueRecord, ValueState, check_name, check_value, to_sector,
};

/// A fencing token: the lease version under which a resource was acquired.
/// Strictly increasing per resource and never handed out twice; pass it to
/// whatever the resource protects so that it can refuse older holders.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(pub u64);

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A sector-aligned disk request emitted by an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoRequest {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset (sector aligned).
        offset: u64,
        /// Length in bytes (whole sectors).
        len: u64,
    },
    /// Write `data` at `offset`.
    Write {
        /// Byte offset (sector aligned).
        offset: u64,
        /// Whole sectors.
        data: Vec<u8>,
    },
}

/// The outcome of an [`IoRequest`], fed back with [`Input::Io`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoCompletion {
    /// A read returned these bytes.
    Read(Vec<u8>),
    /// A write completed.
    Written,
    /// The I/O failed; the text says why (for error messages).
    Failed(String),
}

/// What an operation is resumed with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// First call.
    Start,
    /// The I/O it asked for completed.
    Io(IoCompletion),
    /// The time it asked to be woken at has come.
    Wake,
}

/// What an operation wants next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step<T> {
    /// Perform this I/O and resume with its completion.
    Io(IoRequest),
    /// Resume with [`Input::Wake`] once the clock reads at least this.
    SleepUntil(Millis),
    /// Finished.
    Done(T),
}

/// Errors of lease operations.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OpError {
    /// The host id is outside the area's host slots.
    #[error("host id {host_id} is outside this lease area's host slots 1..={host_slots}")]
    BadHostId {
        /// The requested id.
        host_id: HostId,
        /// Slots in the area.
        host_slots: u32,
    },
    /// The operation needs a joined host lease.
    #[error("this host has not joined the lockspace (or has left it); join first")]
    NotJoined,
    /// The host lease is no longer valid: its fence deadline passed, or
    /// another joiner took the host id. Resource leases are gone with it;
    /// join again (with a new generation) before acquiring anything.
    #[error("host lease lost: {reason}; everything depending on its leases must already be stopped")]
    Lost {
        /// Why.
        reason: String,
    },
    /// A disk I/O failed.
    #[error("lease disk {what} failed: {detail}")]
    Io {
        /// What was being read or written.
        what: String,
        /// The failure.
        detail: String,
    },
    /// A disk I/O took longer than the I/O timeout; its result was discarded.
    #[error("lease disk {what} took {elapsed_ms} ms, more than the I/O timeout of {timeout_ms} ms")]
    TimedOut {
        /// What was being read or written.
        what: String,
        /// How long it took.
        elapsed_ms: u64,
        /// The I/O timeout.
        timeout_ms: u64,
    },
    /// A record could not be decoded (torn, corrupted, or from another area).
    #[error("{what} is unreadable")]
    Corrupt {
        /// Which record.
        what: String,
        /// The decoding error.
        #[source]
        source: FormatError,
    },
    /// Another live host renewed the host id while we watched it.
    #[error(
        "host id {host_id} is in use: its delta slot changed while we watched it, so another host renews it; \
         pick another host id, or stop the other host"
    )]
    HostIdInUse {
        /// The host id.
        host_id: HostId,
    },
    /// Another joiner wrote the host id's slot after us.
    #[error("another host joined with host id {host_id} at the same time; pick a unique host id per host")]
    JoinRace {
        /// The host id.
        host_id: HostId,
    },
    /// The resource is held by a host whose host lease may still be alive.
    #[error(
        "resource {name:?} is held by host {owner} (token {token}); it can be taken over no earlier than \
         {dead_no_earlier_than} on this host's clock if that host stops renewing"
    )]
    Busy {
        /// Resource name.
        name: String,
        /// Owner host id.
        owner: HostId,
        /// The owner's fencing token.
        token: Token,
        /// Earliest time (our clock) at which the owner can be judged dead.
        dead_no_earlier_than: Millis,
    },
    /// Another host ran a ballot for the same resource at the same time;
    /// retry after a short random back-off.
    #[error("resource {name:?}: another host is acquiring it at the same time; retry")]
    Contended {
        /// Resource name.
        name: String,
    },
    /// Every resource slot is bound to another name.
    #[error(
        "no free resource slot for {name:?}: all {slots} slots are bound to other names; \
         initialise a larger lease area"
    )]
    NoFreeSlot {
        /// Resource name.
        name: String,
        /// Number of slots.
        slots: u32,
    },
    /// The name is not a valid resource name.
    #[error("invalid resource name")]
    BadName(#[source] FormatError),
    /// This host already holds the resource.
    #[error("this host already holds resource {name:?} with token {token}")]
    AlreadyHeld {
        /// Resource name.
        name: String,
        /// The token held.
        token: Token,
    },
    /// This host does not hold the resource.
    #[error("this host does not hold resource {name:?}")]
    NotHeld {
        /// Resource name.
        name: String,
    },
    /// The value does not fit a value block.
    #[error("invalid value block")]
    BadValue(#[source] FormatError),
    /// Another host has started or completed a later lease version of a
    /// resource this host believed it held while its host lease was valid.
    /// That can only happen if the timing assumptions were broken (a stopped
    /// clock, storage that delays writes past the I/O timeout), so the whole
    /// host lease is treated as lost.
    #[error(
        "resource {name:?} was taken over while this host believed it held token {token} ({detail}); \
         the lease timing assumptions were violated, so the host lease is dropped: stop everything and rejoin"
    )]
    Superseded {
        /// Resource name.
        name: String,
        /// The token this host held.
        token: Token,
        /// What showed the takeover.
        detail: String,
    },
}

impl OpError {
    /// Whether retrying the same operation later may succeed without any
    /// operator action (I/O trouble, contention, busy owner).
    pub fn is_transient(&self) -> bool {
        matches!(self, OpError::Io { .. } | OpError::TimedOut { .. } | OpError::Busy { .. } | OpError::Contended { .. })
    }
}

/// The result of an acquisition: the fencing token and the value block
/// found in the lease (written by this or an earlier holder).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acquired {
    /// The fencing token.
    pub token: Token,
    /// The newest value block set by any holder of the resource, `None` if
    /// no holder ever set one. Read after this acquisition's value was
    /// chosen, so it includes every value a previous holder wrote.
    pub value: Option<Vec<u8>>,
    /// The token under which `value` was written.
    pub value_token: Option<Token>,
}

/// The two value-block copies of a resource slot, decoded.
#[derive(Clone, Debug)]
pub struct ValueCopies {
    /// The newest decodable written copy (highest `(lver, seq)`), if any.
    pub newest: Option<ValueRecord>,
    /// The copy the next write goes to: never the one holding the newest
    /// value, so a torn write cannot destroy it.
    pub write_copy: u32,
    /// Sequence for the next write: highest seen + 1.
    pub next_seq: u64,
    /// Copies that could not be decoded, with the reason.
    pub bad: Vec<(u32, FormatError)>,
}

/// Decodes the value copies of resource slot `slot` (`bytes` starts at copy
/// 0). Fails only when no copy is decodable: the value may then have been
/// lost, and an empty answer could be mistaken for "never written".
pub fn read_value_copies(header: &Header, slot: u32, bytes: &[u8]) -> Result<ValueCopies, FormatError> {
    let s = header.sector_size as usize;
    let mut good: Vec<ValueRecord> = Vec::new();
    let mut bad = Vec::new();
    for copy in 0..VALUE_COPIES {
        let start = copy as usize * s;
        let rec = bytes
            .get(start..start + s)
            .ok_or(FormatError::Short { what: "value block", len: bytes.len().saturating_sub(start) })
            .and_then(ValueRecord::decode)
            .and_then(|r| {
                if r.area_id != header.area_id || r.slot != slot || r.copy != copy {
                    Err(FormatError::Field {
                        what: "value block",
                        field: "area_id/slot/copy",
                        value: format!("{:#x}/{}/{} (stale or misplaced)", r.area_id, r.slot, r.copy),
                    })
                } else {
                    Ok(r)
                }
            });
        match rec {
            Ok(r) => good.push(r),
            Err(e) => bad.push((copy, e)),
        }
    }
    let Some(keep) = good.iter().max_by_key(|r| (r.rank(), std::cmp::Reverse(r.copy))) else {
        let (_, first) = bad.swap_remove(0);
        return Err(first);
    };
    let next_seq = good.iter().map(|r| r.seq).max().unwrap_or(0) + 1;
    let write_copy = (keep.copy + 1) % VALUE_COPIES;
    let newest = (keep.state == ValueState::Written).then(|| keep.clone());
    Ok(ValueCopies { newest, write_copy, next_seq, bad })
}

/// A resource lease this host believes it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldLease {
    /// Resource slot index.
    pub slot: u32,
    /// Fencing token.
    pub token: Token,
    /// Acquisition id in the chosen value.
    pub acquisition: u64,
}

#[derive(Clone, Debug)]
struct Joined {
    record: DeltaRecord,
    /// Start of the last successful renewal (or of the join write).
    renewed_at: Millis,
}

#[derive(Clone, Copy, Debug)]
struct Watch {
    digest: u32,
    first_seen: Millis,
}

/// Everything one host remembers about the lockspace: its own host lease,
/// the resource leases it holds, and what it has observed of other hosts'
/// delta slots. Lost on a crash, by design.
#[derive(Debug)]
pub struct HostState {
    header: Header,
    host_id: HostId,
    joined: Option<Joined>,
    lost: Option<String>,
    held: BTreeMap<String, HeldLease>,
    watches: HashMap<HostId, Watch>,
    acquisitions: u64,
    #[cfg(test)]
    pub(crate) unsafe_skip_dead_wait: bool,
    #[cfg(test)]
    pub(crate) unsafe_ignore_fence_deadline: bool,
}

impl HostState {
    /// State of a host that has not joined yet. The header must come from
    /// the area (validated by `Lockspace::open`).
    pub fn new(header: Header, host_id: HostId) -> Result<HostState, OpError> {
        if host_id == 0 || host_id > header.host_slots {
            return Err(OpError::BadHostId { host_id, host_slots: header.host_slots });
        }
        Ok(HostState {
            header,
            host_id,
            joined: None,
            lost: None,
            held: BTreeMap::new(),
            watches: HashMap::new(),
            acquisitions: 0,
            #[cfg(test)]
            unsafe_skip_dead_wait: false,
            #[cfg(test)]
            unsafe_ignore_fence_deadline: false,
        })
    }

    /// The area header this host works with.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The lockspace timeouts.
    pub fn timeouts(&self) -> Timeouts {
        self.header.timeouts
    }

    /// This host's id.
    pub fn host_id(&self) -> HostId {
        self.host_id
    }

    /// Generation of the current host lease, if joined.
    pub fn generation(&self) -> Option<u64> {
        self.joined.as_ref().map(|j| j.record.generation)
    }

    /// The fence deadline: start of the last successful renewal + `K`. At
    /// this time (on this host's clock) every lease of this host is lost and
    /// whatever depends on them must be being killed. `None` if not joined
    /// or already lost.
    pub fn valid_until(&self) -> Option<Millis> {
        if self.lost.is_some() {
            return None;
        }
        self.joined.as_ref().map(|j| j.renewed_at + self.header.timeouts.fence_ms)
    }

    /// Whether the host lease (and with it every resource lease held) is
    /// valid at `now`. A process that was paused must call this with a
    /// fresh `now` before acting on a lease: false means the lease may
    /// already belong to someone else.
    pub fn is_valid(&self, now: Millis) -> bool {
        #[cfg(test)]
        if self.unsafe_ignore_fence_deadline && self.lost.is_none() && self.joined.is_some() {
            return true;
        }
        self.valid_until().is_some_and(|until| now < until)
    }

    /// Why the host lease was lost, if it was.
    pub fn lost_reason(&self) -> Option<&str> {
        self.lost.as_deref()
    }

    /// The token of `name` if this host holds it and its lease is valid at `now`.
    pub fn holds(&self, name: &str, now: Millis) -> Option<Token> {
        if !self.is_valid(now) {
            return None;
        }
        self.held.get(name).map(|h| h.token)
    }

    /// Resource leases this host believes it holds (valid only while
    /// [`HostState::is_valid`]).
    pub fn held(&self) -> &BTreeMap<String, HeldLease> {
        &self.held
    }

    fn mark_lost(&mut self, reason: String) -> OpError {
        self.held.clear();
        if self.lost.is_none() {
            self.lost = Some(reason.clone());
        }
        OpError::Lost { reason: self.lost.clone().unwrap_or(reason) }
    }

    /// Fails with `Lost` (and forgets resource leases) unless valid at `now`.
    fn require_valid(&mut self, now: Millis) -> Result<&Joined, OpError> {
        if self.joined.is_none() {
            return Err(OpError::NotJoined);
        }
        if let Some(reason) = &self.lost {
            return Err(OpError::Lost { reason: reason.clone() });
        }
        if !self.is_valid(now) {
            let until = self.valid_until().unwrap_or_default();
            return Err(self.mark_lost(format!("fence deadline {until} passed (now {now}) without a renewal")));
        }
        Ok(self.joined.as_ref().expect("checked"))
    }

    /// Records an observation of `host`'s delta slot; returns when it was
    /// first seen with this content.
    fn observe(&mut self, host: HostId, digest: u32, now: Millis) -> Millis {
        let w = self.watches.entry(host).or_insert(Watch { digest, first_seen: now });
        if w.digest != digest {
            *w = Watch { digest, first_seen: now };
        }
        w.first_seen
    }

    fn sector(&self) -> u64 {
        self.header.sector_size as u64
    }

    /// A fresh acquisition id: random base (the join's incarnation) + counter.
    fn next_acquisition(&mut self) -> u64 {
        self.acquisitions += 1;
        self.joined.as_ref().map_or(0, |j| j.record.incarnation).wrapping_add(self.acquisitions)
    }
}

/// A lease operation, driven by [`Operation::resume`].
pub trait Operation {
    /// The operation's result.
    type Output;
    /// Advances the operation with `input` at time `now` (the caller's
    /// monotonic clock).
    fn resume(&mut self, host: &mut HostState, input: Input, now: Millis) -> Step<Self::Output>;
}

fn digest(bytes: &[u8]) -> u32 {
    crc32c::crc32c(&bytes[..RECORD_LEN.min(bytes.len())])
}

/// Checks a completion against the I/O timeout and turns failures into errors.
fn completed(
    host: &HostState,
    input: Input,
    issued: Millis,
    now: Millis,
    what: impl Fn() -> String,
) -> Result<Option<Vec<u8>>, OpError> {
    let timeout_ms = host.header.timeouts.io_timeout_ms;
    match input {
        Input::Io(c) => {
            let elapsed_ms = now.since(issued);
            if elapsed_ms > timeout_ms {
                return Err(OpError::TimedOut { what: what(), elapsed_ms, timeout_ms });
            }
            match c {
                IoCompletion::Read(b) => Ok(Some(b)),
                IoCompletion::Written => Ok(None),
                IoCompletion::Failed(detail) => Err(OpError::Io { what: what(), detail }),
            }
        }
        other => Err(OpError::Io {
            what: what(),
            detail: format!("protocol driver bug: expected an I/O completion, got {other:?}"),
        }),
    }
}

fn need_len(bytes: &[u8], len: u64, what: &str) -> Result<(), OpError> {
    if (bytes.len() as u64) < len {
        return Err(OpError::Io {
            what: what.to_string(),
            detail: format!("short read: {} of {len} bytes", bytes.len()),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Join

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JoinPhase {
    Start,
    Reading,
    Watching,
    Writing,
    Settling,
    Verifying,
    FirstRenewal,
}

/// Joins the lockspace under the host's id (delta-lease acquisition).
///
/// Reads the slot; unless it is free, watches it for `T` and fails with
/// [`OpError::HostIdInUse`] if it changes; writes a live record with the
/// next generation and a random incarnation; waits `2I` for racing joiners'
/// writes to land; re-reads and fails with [`OpError::JoinRace`] unless the
/// slot still holds our record; then renews once at once (the settle wait
/// used most of the join write's validity, `K > 2I` is required). On
/// success the host lease is valid from the start of that renewal write.
/// Output: the new generation.
#[derive(Debug)]
pub struct JoinOp {
    incarnation: u64,
    phase: JoinPhase,
    issued: Millis,
    watch: Option<Watch>,
    prev_generation: u64,
    record: Option<DeltaRecord>,
}

impl JoinOp {
    /// A join with this random incarnation (must differ between joins; the
    /// caller supplies it so that simulations stay deterministic).
    pub fn new(incarnation: u64) -> JoinOp {
        JoinOp {
            incarnation,
            phase: JoinPhase::Start,
            issued: Millis(0),
            watch: None,
            prev_generation: 0,
            record: None,
        }
    }

    fn read(&mut self, host: &HostState, now: Millis, phase: JoinPhase) -> Step<Result<u64, OpError>> {
        self.phase = phase;
        self.issued = now;
        Step::Io(IoRequest::Read { offset: host.header.layout().delta_offset(host.host_id), len: host.sector() })
    }

    fn write(&mut self, host: &HostState, now: Millis) -> Step<Result<u64, OpError>> {
        let rec = DeltaRecord {
            area_id: host.header.area_id,
            host_id: host.host_id,
            state: DeltaState::Live,
            generation: self.prev_generation + 1,
            incarnation: self.incarnation,
            renew_seq: 0,
            timestamp_ms: now.0,
        };
        let data = to_sector(&rec.encode(), host.header.sector_size);
        self.record = Some(rec);
        self.phase = JoinPhase::Writing;
        self.issued = now;
        Step::Io(IoRequest::Write { offset: host.header.layout().delta_offset(host.host_id), data })
    }

    fn step(&mut self, host: &mut HostState, input: Input, now: Millis) -> Result<Step<Result<u64, OpError>>, OpError> {
        let what = || format!("delta slot of host {}", host.host_id);
        match self.phase {
            JoinPhase::Start => {
                // A new join forgets everything the previous incarnation believed.
                host.joined = None;
                host.lost = None;
                host.held.clear();
                Ok(self.read(host, now, JoinPhase::Reading))
            }
            JoinPhase::Reading => {
                let bytes = completed(host, input, self.issued, now, what)?.unwrap_or_default();
                need_len(&bytes, RECORD_LEN as u64, &what())?;
                let d = digest(&bytes);
                let ours = DeltaRecord::decode(&bytes)
                    .ok()
                    .filter(|r| r.area_id == host.header.area_id && r.host_id == host.host_id);
                if let Some(r) = &ours {
                    self.prev_generation = self.prev_generation.max(r.generation);
                }
                if ours.as_ref().is_some_and(|r| r.state == DeltaState::Free) {
                    return Ok(self.write(host, now));
                }
                // Live, torn or foreign content: the previous owner may be alive until it stays
                // unchanged for T on our clock.
                let t = host.header.timeouts.host_dead_ms;
                let poll = host.header.timeouts.poll_interval_ms();
                match self.watch {
                    None => {
                        self.watch = Some(Watch { digest: d, first_seen: now });
                    }
                    Some(w) if w.digest != d => return Err(OpError::HostIdInUse { host_id: host.host_id }),
                    Some(w) => {
                        #[cfg(test)]
                        let skip = host.unsafe_skip_dead_wait;
                        #[cfg(not(test))]
                        let skip = false;
                        if now.since(w.first_seen) >= t || skip {
                            return Ok(self.write(host, now));
                        }
                    }
                }
                let w = self.watch.expect("set above");
                self.phase = JoinPhase::Watching;
                Ok(Step::SleepUntil((now + poll).min(w.first_seen + t)))
            }
            JoinPhase::Watching => Ok(self.read(host, now, JoinPhase::Reading)),
            JoinPhase::Writing => {
                completed(host, input, self.issued, now, what)?;
                self.phase = JoinPhase::Settling;
                // Keep `issued` = start of our write: the lease is valid from there.
                Ok(Step::SleepUntil(now + host.header.timeouts.join_settle_ms()))
            }
            JoinPhase::Settling => {
                let write_start = self.issued;
                let step = self.read(host, now, JoinPhase::Verifying);
                // Remember the write start across the verification read.
                self.watch = Some(Watch { digest: 0, first_seen: write_start });
                Ok(step)
            }
            JoinPhase::Verifying => {
                let bytes = completed(host, input, self.issued, now, what)?.unwrap_or_default();
                need_len(&bytes, RECORD_LEN as u64, &what())?;
                let rec = self.record.clone().expect("written before verifying");
                if DeltaRecord::decode(&bytes).ok().as_ref() != Some(&rec) {
                    return Err(OpError::JoinRace { host_id: host.host_id });
                }
                // The settle wait used most of the validity the join write gave us: renew at once,
                // and only if that write is still inside it (so observers cannot have judged the
                // new incarnation dead in between).
                let write_start = self.watch.expect("set when settling").first_seen;
                if now.since(write_start) >= host.header.timeouts.fence_ms {
                    return Err(OpError::Io {
                        what: what(),
                        detail: format!(
                            "join took {} ms, past the fence deadline; retry (the disk is too slow for these timeouts)",
                            now.since(write_start)
                        ),
                    });
                }
                let renewed = DeltaRecord { renew_seq: rec.renew_seq + 1, timestamp_ms: now.0, ..rec };
                let data = to_sector(&renewed.encode(), host.header.sector_size);
                self.record = Some(renewed);
                self.phase = JoinPhase::FirstRenewal;
                self.issued = now;
                Ok(Step::Io(IoRequest::Write { offset: host.header.layout().delta_offset(host.host_id), data }))
            }
            JoinPhase::FirstRenewal => {
                completed(host, input, self.issued, now, what)?;
                let rec = self.record.clone().expect("written");
                let generation = rec.generation;
                host.joined = Some(Joined { record: rec, renewed_at: self.issued });
                host.require_valid(now)?;
                Ok(Step::Done(Ok(generation)))
            }
        }
    }
}

impl Operation for JoinOp {
    type Output = Result<u64, OpError>;
    fn resume(&mut self, host: &mut HostState, input: Input, now: Millis) -> Step<Self::Output> {
        self.step(host, input, now).unwrap_or_else(|e| Step::Done(Err(e)))
    }
}

// ---------------------------------------------------------------------------
// Renew

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RenewPhase {
    Start,
    Reading,
    Writing,
}

/// Renews the host lease: checks the fence deadline has not passed, reads
/// the slot (someone else's record there means the host id was taken: the
/// lease is lost), writes the record with the next renewal sequence. On
/// success the lease is valid until the start of this write + `K`.
/// Output: the new fence deadline.
#[derive(Debug)]
pub struct RenewOp {
    phase: RenewPhase,
    issued: Millis,
}

impl Default for RenewOp {
    fn default() -> Self {
        Self::new()
    }
}

impl RenewOp {
    /// A renewal.
    pub fn new() -> RenewOp {
        RenewOp { phase: RenewPhase::Start, issued: Millis(0) }
    }

    fn step(
        &mut self,
        host: &mut HostState,
        input: Input,
        now: Millis,
    ) -> Result<Step<Result<Millis, OpError>>, OpError> {
        let what = || format!("delta slot of host {}", host.host_id);
        let offset = host.header.layout().delta_offset(host.host_id);
        match self.phase {
            RenewPhase::Start => {
                host.require_valid(now)?;
                self.phase = RenewPhase::Reading;
                self.issued = now;
                Ok(Step::Io(IoRequest::Read { offset, len: host.sector() }))
            }
            RenewPhase::Reading => {
                let bytes = completed(host, input, self.issued, now, what)?.unwrap_or_default();
                need_len(&bytes, RECORD_LEN as u64, &what())?;
                let mine = host.require_valid(now)?.record.clone();
                match DeltaRecord::decode(&bytes) {
                    Ok(r) if r.generation == mine.generation && r.incarnation == mine.incarnation => {}
                    Ok(r) => {
                        return Err(host.mark_lost(format!(
                            "delta slot of host {} now holds generation {} incarnation {:#x}, not ours ({} {:#x}): \
                             another host joined with this id",
                            host.host_id, r.generation, r.incarnation, mine.generation, mine.incarnation
                        )));
                    }
                    // Torn by our own failed write (a racing joiner's torn write means that
                    // joiner failed): overwrite it.
                    Err(_) => {}
                }
                let rec = DeltaRecord { renew_seq: mine.renew_seq + 1, timestamp_ms: now.0, ..mine };
                self.phase = RenewPhase::Writing;
                self.issued = now;
                Ok(Step::Io(IoRequest::Write { offset, data: to_sector(&rec.encode(), host.header.sector_size) }))
            }
            RenewPhase::Writing => {
                completed(host, input, self.issued, now, what)?;
                host.require_valid(now)?;
                let j = host.joined.as_mut().expect("valid implies joined");
                j.record.renew_seq += 1;
                j.record.timestamp_ms = self.issued.0;
                j.renewed_at = j.renewed_at.max(self.issued);
                Ok(Step::Done(Ok(host.valid_until().expect("valid"))))
            }
        }
    }
}

impl Operation for RenewOp {
    type Output = Result<Millis, OpError>;
    fn resume(&mut self, host: &mut HostState, input: Input, now: Millis) -> Step<Self::Output> {
        self.step(host, input, now).unwrap_or_else(|e| Step::Done(Err(e)))
    }
}

// ---------------------------------------------------------------------------
// Acquire

#[derive(Debug, Clone, PartialEq, Eq)]
enum AcquirePhase {
    Start,
    ReadSlot,
    RepairOwnBallot,
    ReadOwner { owner: HostId, generation: u64, token: Token },
    Phase1Write,
    Phase1Read,
    Phase2Write,
    Phase2Read,
    Commit,
}

/// Acquires a named resource lease with Disk Paxos.
///
/// Finds the name's slot (crc32c(name) mod slots, then linear probing; a
/// slot is bound to the name of the first value Paxos chooses in it), reads
/// its leader record and ballot blocks, and proposes itself as owner of the
/// next lease version only if the current owner released, or its host lease
/// is dead (its delta slot unchanged for `T` on our clock, or a different
/// generation there). Output: [`Acquired`], the fencing token and the value
/// block found in the slot. Fails with
/// [`OpError::Busy`] when the owner may be alive (retry after
/// `dead_no_earlier_than`; observations persist in [`HostState`]), and with
/// [`OpError::Contended`] when another host's ballot interfered (retry
/// after a random back-off).
#[derive(Debug)]
pub struct AcquireOp {
    name: String,
    phase: AcquirePhase,
    issued: Millis,
    slot: u32,
    probes: u32,
    restarts: u32,
    lver: u64,
    mbal: u64,
    proposal: Option<LeaseValue>,
    chosen: Option<LeaseValue>,
    own_ballot: Option<BallotRecord>,
    stash: Option<Vec<BallotRecord>>,
    acquisition: u64,
    /// The value block read after phase 2 (the newest copy).
    found_value: Option<ValueRecord>,
}

/// How many times one acquisition re-evaluates a slot after learning a
/// value chosen by someone else before giving up with `Contended`.
const MAX_RESTARTS: u32 = 4;

impl AcquireOp {
    /// An acquisition of `name`.
    pub fn new(name: &str) -> AcquireOp {
        AcquireOp {
            name: name.to_string(),
            phase: AcquirePhase::Start,
            issued: Millis(0),
            slot: 0,
            probes: 0,
            restarts: 0,
            lver: 0,
            mbal: 0,
            proposal: None,
            chosen: None,
            own_ballot: None,
            stash: None,
            acquisition: 0,
            found_value: None,
        }
    }

    fn our_value(&self, host: &HostState) -> LeaseValue {
        LeaseValue {
            owner: host.host_id,
            generation: host.generation().unwrap_or(0),
            acquisition: self.acquisition,
            name: self.name.clone(),
        }
    }

    fn read_slot(&mut self, host: &HostState, now: Millis) -> Step<Result<Acquired, OpError>> {
        self.phase = AcquirePhase::ReadSlot;
        self.issued = now;
        let layout = host.header.layout();
        Step::Io(IoRequest::Read { offset: layout.leader_offset(self.slot), len: layout.resource_len() })
    }

    /// Reads the ballot blocks and, right behind them, the value copies (one I/O).
    fn read_ballots(&mut self, host: &HostState, now: Millis, phase: AcquirePhase) -> Step<Result<Acquired, OpError>> {
        self.phase = phase;
        self.issued = now;
        let layout = host.header.layout();
        Step::Io(IoRequest::Read {
            offset: layout.ballot_offset(self.slot, 1),
            len: (layout.host_slots + VALUE_COPIES) as u64 * host.sector(),
        })
    }

    fn value_copies(&self, host: &HostState, bytes: &[u8]) -> Result<ValueCopies, OpError> {
        read_value_copies(&host.header, self.slot, bytes).map_err(|source| OpError::Corrupt {
            what: format!("value block of resource slot {} (no readable copy)", self.slot),
            source,
        })
    }

    fn write_ballot(
        &mut self,
        host: &mut HostState,
        now: Millis,
        rec: BallotRecord,
        phase: AcquirePhase,
    ) -> Result<Step<Result<Acquired, OpError>>, OpError> {
        host.require_valid(now)?;
        self.phase = phase;
        self.issued = now;
        let offset = host.header.layout().ballot_offset(self.slot, host.host_id);
        let data = to_sector(&rec.encode(), host.header.sector_size);
        self.own_ballot = Some(rec);
        Ok(Step::Io(IoRequest::Write { offset, data }))
    }

    fn next_probe(&mut self, host: &HostState, now: Millis) -> Result<Step<Result<Acquired, OpError>>, OpError> {
        self.probes += 1;
        let slots = host.header.resource_slots;
        if self.probes >= slots {
            return Err(OpError::NoFreeSlot { name: self.name.clone(), slots });
        }
        self.slot = (self.slot + 1) % slots;
        self.restarts = 0;
        Ok(self.read_slot(host, now))
    }

    /// Decodes the ballot blocks of the current slot (`bytes` starts at host 1's block).
    fn decode_ballots(&self, host: &HostState, bytes: &[u8]) -> Vec<Result<BallotRecord, OpError>> {
        let s = host.sector() as usize;
        (1..=host.header.host_slots)
            .map(|h| {
                let start = (h as usize - 1) * s;
                let what = || format!("ballot block of host {h} in resource slot {}", self.slot);
                let rec = BallotRecord::decode(&bytes[start..start + s])
                    .map_err(|source| OpError::Corrupt { what: what(), source })?;
                if rec.area_id != host.header.area_id || rec.slot != self.slot || rec.host_id != h {
                    return Err(OpError::Corrupt {
                        what: what(),
                        source: FormatError::Field {
                            what: "ballot block",
                            field: "area_id/slot/host_id",
                            value: format!("{:#x}/{}/{}", rec.area_id, rec.slot, rec.host_id),
                        },
                    });
                }
                Ok(rec)
            })
            .collect()
    }

    /// Starts a ballot for `lver` proposing `proposal` (None: only learn an accepted value).
    fn start_ballot(
        &mut self,
        host: &mut HostState,
        now: Millis,
        ballots: &[BallotRecord],
        lver: u64,
        proposal: Option<LeaseValue>,
    ) -> Result<Step<Result<Acquired, OpError>>, OpError> {
        let n = host.header.host_slots as u64 + 1;
        let max_round = ballots.iter().filter(|b| b.lver == lver).map(|b| b.mbal / n).max().unwrap_or(0);
        self.lver = lver;
        self.mbal = (max_round + 1) * n + host.host_id as u64;
        self.proposal = proposal;
        let own = ballots.iter().find(|b| b.host_id == host.host_id).filter(|b| b.lver == lver);
        let rec = BallotRecord {
            area_id: host.header.area_id,
            slot: self.slot,
            host_id: host.host_id,
            lver,
            mbal: self.mbal,
            bal: own.map_or(0, |b| b.bal),
            value: own.map_or_else(LeaseValue::default, |b| b.value.clone()),
        };
        self.write_ballot(host, now, rec, AcquirePhase::Phase1Write)
    }

    /// Phase-1/2 read check: abort if anyone started a higher ballot or a later version.
    fn check_ballots(&self, host: &HostState, bytes: &[u8]) -> Result<Vec<BallotRecord>, OpError> {
        let mut out = Vec::new();
        for r in self.decode_ballots(host, bytes) {
            let b = r?;
            if b.lver > self.lver || (b.lver == self.lver && b.mbal > self.mbal) {
                return Err(OpError::Contended { name: self.name.clone() });
            }
            out.push(b);
        }
        Ok(out)
    }

    fn evaluate_slot(
        &mut self,
        host: &mut HostState,
        bytes: &[u8],
        now: Millis,
    ) -> Result<Step<Result<Acquired, OpError>>, OpError> {
        let layout = host.header.layout();
        need_len(bytes, layout.resource_len(), "resource slot")?;
        let s = host.sector() as usize;
        let leader =
            LeaderRecord::decode(&bytes[..s]).ok().filter(|l| l.area_id == host.header.area_id && l.slot == self.slot);
        let mut ballots = Vec::new();
        for (i, r) in self.decode_ballots(host, &bytes[s..]).into_iter().enumerate() {
            match r {
                Ok(b) => ballots.push(b),
                Err(e) if i as u32 + 1 == host.host_id => {
                    // Our own block is torn (our failed write): only we write it, so we may
                    // reset it. Anything it held was never the basis of a lease we hold.
                    let _ = e;
                    let rec = BallotRecord::empty(host.header.area_id, self.slot, host.host_id);
                    return self.write_ballot(host, now, rec, AcquirePhase::RepairOwnBallot);
                }
                Err(e) => return Err(e),
            }
        }
        // A slot whose value block has no readable copy is refused before any ballot: taking it
        // would hand out a lease whose value may have been lost.
        if leader.as_ref().is_some_and(|l| l.state != LeaderState::Unclaimed && l.value.name == self.name) {
            self.value_copies(host, &bytes[s * (1 + host.header.host_slots as usize)..])?;
        }
        let max_lver = ballots.iter().map(|b| b.lver).max().unwrap_or(0);
        let ours = self.our_value(host);
        let Some(leader) = leader else {
            // Leader torn: the ballots are the truth.
            if max_lver == 0 {
                return self.start_ballot(host, now, &ballots, 1, Some(ours));
            }
            return self.start_ballot(host, now, &ballots, max_lver, None);
        };
        if leader.state == LeaderState::Unclaimed || leader.lver == 0 {
            if max_lver <= 1 {
                return self.start_ballot(host, now, &ballots, 1, Some(ours));
            }
            return self.start_ballot(host, now, &ballots, max_lver, None);
        }
        if leader.value.name != self.name {
            // Names are fixed by the first chosen value: this slot is someone else's.
            return self.next_probe(host, now);
        }
        if max_lver > leader.lver + 1 {
            // The leader record is behind the ballots (a lost commit): learn the latest version first.
            return self.start_ballot(host, now, &ballots, max_lver, None);
        }
        let next = leader.lver + 1;
        match leader.state {
            LeaderState::Released => self.start_ballot(host, now, &ballots, next, Some(ours)),
            _ if leader.value.owner == host.host_id => {
                // Either an earlier incarnation of this host id (dead: we joined after it), or this
                // incarnation lost track of an acquisition that completed: free for us either way.
                self.start_ballot(host, now, &ballots, next, Some(ours))
            }
            _ => {
                self.phase = AcquirePhase::ReadOwner {
                    owner: leader.value.owner,
                    generation: leader.value.generation,
                    token: Token(leader.lver),
                };
                self.issued = now;
                // Keep the snapshot of the ballots for the mbal choice.
                self.chosen = None;
                self.own_ballot = ballots.iter().find(|b| b.host_id == host.host_id).cloned();
                self.stash = Some(ballots);
                Ok(Step::Io(IoRequest::Read { offset: layout.delta_offset(leader.value.owner), len: host.sector() }))
            }
        }
    }
}

impl AcquireOp {
    fn step(
        &mut self,
        host: &mut HostState,
        input: Input,
        now: Millis,
    ) -> Result<Step<Result<Acquired, OpError>>, OpError> {
        let slot = self.slot;
        match self.phase.clone() {
            AcquirePhase::Start => {
                check_name(&self.name).map_err(OpError::BadName)?;
                host.require_valid(now)?;
                if let Some(h) = host.held.get(&self.name) {
                    return Err(OpError::AlreadyHeld { name: self.name.clone(), token: h.token });
                }
                self.slot = host.header.layout().home_slot(&self.name);
                self.acquisition = host.next_acquisition();
                Ok(self.read_slot(host, now))
            }
            AcquirePhase::ReadSlot => {
                let bytes = completed(host, input, self.issued, now, || format!("read of resource slot {slot}"))?
                    .unwrap_or_default();
                host.require_valid(now)?;
                self.evaluate_slot(host, &bytes, now)
            }
            AcquirePhase::RepairOwnBallot => {
                completed(host, input, self.issued, now, || format!("repair of our ballot block in slot {slot}"))?;
                Ok(self.read_slot(host, now))
            }
            AcquirePhase::ReadOwner { owner, generation, token } => {
                let bytes = completed(host, input, self.issued, now, || format!("delta slot of host {owner}"))?
                    .unwrap_or_default();
                need_len(&bytes, RECORD_LEN as u64, "delta slot")?;
                let ballots = self.stash.take().unwrap_or_default();
                let current =
                    DeltaRecord::decode(&bytes).ok().filter(|r| r.area_id == host.header.area_id && r.host_id == owner);
                // A different generation (or a cleanly left slot) means the owner's incarnation is
                // gone: joining again required its slot to stay unchanged for T.
                let gone = current.as_ref().is_some_and(|r| r.state == DeltaState::Free || r.generation != generation);
                let first_seen = host.observe(owner, digest(&bytes), now);
                let t = host.header.timeouts.host_dead_ms;
                #[cfg(test)]
                let skip = host.unsafe_skip_dead_wait;
                #[cfg(not(test))]
                let skip = false;
                if gone || now.since(first_seen) >= t || skip {
                    let ours = self.our_value(host);
                    return self.start_ballot(host, now, &ballots, token.0 + 1, Some(ours));
                }
                Err(OpError::Busy { name: self.name.clone(), owner, token, dead_no_earlier_than: first_seen + t })
            }
            AcquirePhase::Phase1Write => {
                completed(host, input, self.issued, now, || format!("phase-1 ballot write in slot {slot}"))?;
                Ok(self.read_ballots(host, now, AcquirePhase::Phase1Read))
            }
            AcquirePhase::Phase1Read => {
                let bytes = completed(host, input, self.issued, now, || format!("phase-1 ballot read in slot {slot}"))?
                    .unwrap_or_default();
                need_len(&bytes, host.header.host_slots as u64 * host.sector(), "ballot blocks")?;
                let ballots = self.check_ballots(host, &bytes)?;
                // Disk Paxos: adopt the value accepted in the highest ballot for this version.
                let accepted = ballots.iter().filter(|b| b.lver == self.lver && b.bal > 0).max_by_key(|b| b.bal);
                let value = match (accepted, &self.proposal) {
                    (Some(b), _) => b.value.clone(),
                    (None, Some(v)) => v.clone(),
                    (None, None) => {
                        return Err(OpError::Corrupt {
                            what: format!("resource slot {slot}"),
                            source: FormatError::Field {
                                what: "resource leader",
                                field: "lver",
                                value: format!(
                                    "behind ballot version {} and no accepted value to learn it from; \
                                     retry later (the proposer may still finish)",
                                    self.lver
                                ),
                            },
                        });
                    }
                };
                let rec = BallotRecord {
                    area_id: host.header.area_id,
                    slot,
                    host_id: host.host_id,
                    lver: self.lver,
                    mbal: self.mbal,
                    bal: self.mbal,
                    value: value.clone(),
                };
                self.chosen = Some(value);
                self.write_ballot(host, now, rec, AcquirePhase::Phase2Write)
            }
            AcquirePhase::Phase2Write => {
                completed(host, input, self.issued, now, || format!("phase-2 ballot write in slot {slot}"))?;
                Ok(self.read_ballots(host, now, AcquirePhase::Phase2Read))
            }
            AcquirePhase::Phase2Read => {
                let bytes = completed(host, input, self.issued, now, || format!("phase-2 ballot read in slot {slot}"))?
                    .unwrap_or_default();
                need_len(&bytes, (host.header.host_slots + VALUE_COPIES) as u64 * host.sector(), "ballot blocks")?;
                self.check_ballots(host, &bytes)?;
                // The value block is read here, after the previous owner was judged dead (or had
                // released) and after our value was accepted: every write of the previous owner
                // has landed by now (the same timing argument as for the takeover itself).
                let s = host.sector() as usize;
                let copies = self.value_copies(host, &bytes[s * host.header.host_slots as usize..])?;
                self.found_value = copies.newest;
                // The value is chosen for this version; record it in the leader.
                host.require_valid(now)?;
                let value = self.chosen.clone().expect("set in phase 1");
                let leader = LeaderRecord {
                    area_id: host.header.area_id,
                    slot,
                    state: LeaderState::Held,
                    lver: self.lver,
                    value,
                    timestamp_ms: now.0,
                };
                self.phase = AcquirePhase::Commit;
                self.issued = now;
                Ok(Step::Io(IoRequest::Write {
                    offset: host.header.layout().leader_offset(slot),
                    data: to_sector(&leader.encode(), host.header.sector_size),
                }))
            }
            AcquirePhase::Commit => {
                completed(host, input, self.issued, now, || format!("leader write in slot {slot}"))?;
                let value = self.chosen.clone().expect("set in phase 1");
                if value.name != self.name {
                    return self.next_probe(host, now);
                }
                // Ours only if it is this attempt's value (not an older attempt's, nor a value we
                // merely learned for a version that was decided before).
                if self.proposal.is_some() && value == self.our_value(host) {
                    // Only believe it if the host lease is still valid now: a pause during the
                    // ballot may have let others judge us dead.
                    host.require_valid(now)?;
                    let token = Token(self.lver);
                    host.held.insert(self.name.clone(), HeldLease { slot, token, acquisition: self.acquisition });
                    let found = self.found_value.take();
                    return Ok(Step::Done(Ok(Acquired {
                        token,
                        value_token: found.as_ref().map(|v| Token(v.lver)),
                        value: found.map(|v| v.data),
                    })));
                }
                // Someone else's value was chosen (we completed their ballot): look again.
                self.restarts += 1;
                if self.restarts > MAX_RESTARTS {
                    return Err(OpError::Contended { name: self.name.clone() });
                }
                Ok(self.read_slot(host, now))
            }
        }
    }
}

impl Operation for AcquireOp {
    type Output = Result<Acquired, OpError>;
    fn resume(&mut self, host: &mut HostState, input: Input, now: Millis) -> Step<Self::Output> {
        self.step(host, input, now).unwrap_or_else(|e| Step::Done(Err(e)))
    }
}

// ---------------------------------------------------------------------------
// Release

/// Releases a resource lease: forgets it at once (so nothing more is done
/// under it), then, if the host lease is still valid, marks the leader
/// record released so that others may acquire without waiting for our
/// host lease to die. While our host lease is valid nobody else can have
/// taken the resource, so the write needs no read first.
#[derive(Debug)]
pub struct ReleaseOp {
    name: String,
    issued: Option<Millis>,
}

impl ReleaseOp {
    /// A release of `name`.
    pub fn new(name: &str) -> ReleaseOp {
        ReleaseOp { name: name.to_string(), issued: None }
    }

    fn step(&mut self, host: &mut HostState, input: Input, now: Millis) -> Result<Step<Result<(), OpError>>, OpError> {
        match self.issued {
            None => {
                let held = host.held.remove(&self.name).ok_or_else(|| OpError::NotHeld { name: self.name.clone() })?;
                host.require_valid(now)?;
                let value = LeaseValue {
                    owner: host.host_id,
                    generation: host.generation().unwrap_or(0),
                    acquisition: held.acquisition,
                    name: self.name.clone(),
                };
                let leader = LeaderRecord {
                    area_id: host.header.area_id,
                    slot: held.slot,
                    state: LeaderState::Released,
                    lver: held.token.0,
                    value,
                    timestamp_ms: now.0,
                };
                self.issued = Some(now);
                Ok(Step::Io(IoRequest::Write {
                    offset: host.header.layout().leader_offset(held.slot),
                    data: to_sector(&leader.encode(), host.header.sector_size),
                }))
            }
            Some(issued) => {
                completed(host, input, issued, now, || format!("release of {:?}", self.name))?;
                Ok(Step::Done(Ok(())))
            }
        }
    }
}

impl Operation for ReleaseOp {
    type Output = Result<(), OpError>;
    fn resume(&mut self, host: &mut HostState, input: Input, now: Millis) -> Step<Self::Output> {
        self.step(host, input, now).unwrap_or_else(|e| Step::Done(Err(e)))
    }
}

// ---------------------------------------------------------------------------
// Set value

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetValuePhase {
    Start,
    Reading,
    WritingValue,
    Releasing,
}

/// Writes the value block of a held resource, optionally releasing it
/// right after (`release_with_value`).
///
/// 1. Refuses unless the resource is held and the host lease is valid on a
///    fresh clock reading.
/// 2. Reads the whole resource slot and refuses ([`OpError::Superseded`],
///    dropping the host lease) if any record shows a later lease version or
///    another owner of ours: a second line of defence, since while our
///    host lease is valid nobody can have started one.
/// 3. Checks validity again and writes the copy that does not hold the
///    newest value, with our token as `lver` and the next sequence. The
///    write is issued before the fence deadline, so (timing rules) it lands
///    before any other host may judge this host dead and run a ballot: it
///    can never land on top of a later holder's value. Readers rank copies
///    by `(lver, seq)`, so even a write that broke that rule would rank
///    below every value of a later holder.
/// 4. With release: forgets the lease and marks the leader released, as
///    [`ReleaseOp`] does; the value is on disk before the release.
#[derive(Debug)]
pub struct SetValueOp {
    name: String,
    data: Vec<u8>,
    release: bool,
    phase: SetValuePhase,
    issued: Millis,
    held: Option<HeldLease>,
}

impl SetValueOp {
    /// Sets the value of `name` to `data` (at most [`crate::format::MAX_VALUE_LEN`] bytes).
    pub fn new(name: &str, data: &[u8]) -> SetValueOp {
        SetValueOp {
            name: name.to_string(),
            data: data.to_vec(),
            release: false,
            phase: SetValuePhase::Start,
            issued: Millis(0),
            held: None,
        }
    }

    /// Sets the value, then releases the resource.
    pub fn then_release(mut self) -> SetValueOp {
        self.release = true;
        self
    }

    fn superseded(&self, host: &mut HostState, token: Token, detail: String) -> OpError {
        let reason = format!("resource {:?} (token {token}) was taken over: {detail}", self.name);
        host.mark_lost(reason);
        OpError::Superseded { name: self.name.clone(), token, detail }
    }

    /// Step 2: anything showing a later version, or another owner of ours, in the slot.
    fn check_still_ours(&self, host: &mut HostState, held: &HeldLease, bytes: &[u8]) -> Result<(), OpError> {
        let s = host.sector() as usize;
        let hs = host.header.host_slots as usize;
        let token = held.token;
        if let Ok(l) = LeaderRecord::decode(&bytes[..s])
            && l.area_id == host.header.area_id
            && l.slot == held.slot
        {
            let ours = l.value.owner == host.host_id && l.value.acquisition == held.acquisition;
            if l.lver > token.0 || (l.lver == token.0 && (!ours || l.state != LeaderState::Held)) {
                let detail =
                    format!("leader record says version {} {:?} owned by host {}", l.lver, l.state, l.value.owner);
                return Err(self.superseded(host, token, detail));
            }
        }
        for h in 1..=hs {
            if let Ok(b) = BallotRecord::decode(&bytes[h * s..(h + 1) * s])
                && b.area_id == host.header.area_id
                && b.slot == held.slot
                && b.lver > token.0
            {
                let detail = format!("host {} runs a ballot for version {}", b.host_id, b.lver);
                return Err(self.superseded(host, token, detail));
            }
        }
        if let Ok(c) = read_value_copies(&host.header, held.slot, &bytes[(1 + hs) * s..])
            && let Some(v) = c.newest
            && v.lver > token.0
        {
            let detail = format!("host {} wrote the value under version {}", v.owner, v.lver);
            return Err(self.superseded(host, token, detail));
        }
        Ok(())
    }

    fn step(&mut self, host: &mut HostState, input: Input, now: Millis) -> Result<Step<Result<(), OpError>>, OpError> {
        let name = self.name.clone();
        match self.phase {
            SetValuePhase::Start => {
                check_value(&self.data).map_err(OpError::BadValue)?;
                let held = host.held.get(&name).cloned().ok_or_else(|| OpError::NotHeld { name: name.clone() })?;
                host.require_valid(now)?;
                let layout = host.header.layout();
                self.phase = SetValuePhase::Reading;
                self.issued = now;
                let offset = layout.leader_offset(held.slot);
                self.held = Some(held);
                Ok(Step::Io(IoRequest::Read { offset, len: layout.resource_len() }))
            }
            SetValuePhase::Reading => {
                let held = self.held.clone().expect("set at start");
                let what = || format!("read of resource slot {} for the value of {name:?}", held.slot);
                let bytes = completed(host, input, self.issued, now, what)?.unwrap_or_default();
                need_len(&bytes, host.header.layout().resource_len(), "resource slot")?;
                // Fresh validity, and still the same lease (a renewal may have lost it meanwhile).
                host.require_valid(now)?;
                if host.held.get(&name) != Some(&held) {
                    return Err(OpError::NotHeld { name });
                }
                self.check_still_ours(host, &held, &bytes)?;
                let s = host.sector() as usize;
                let value_bytes = &bytes[(1 + host.header.host_slots as usize) * s..];
                // One unreadable copy is fine (we overwrite it); none readable cannot happen while
                // we hold the lease unless the disk was damaged: write copy 0 then.
                let (copy, seq) = match read_value_copies(&host.header, held.slot, value_bytes) {
                    Ok(c) => (c.write_copy, c.next_seq),
                    Err(_) => (0, 1),
                };
                let rec = ValueRecord {
                    area_id: host.header.area_id,
                    slot: held.slot,
                    copy,
                    state: ValueState::Written,
                    owner: host.host_id,
                    lver: held.token.0,
                    seq,
                    generation: host.generation().unwrap_or(0),
                    acquisition: held.acquisition,
                    timestamp_ms: now.0,
                    data: std::mem::take(&mut self.data),
                };
                let block = rec.encode().map_err(OpError::BadValue)?;
                self.phase = SetValuePhase::WritingValue;
                self.issued = now;
                Ok(Step::Io(IoRequest::Write {
                    offset: host.header.layout().value_offset(held.slot, copy),
                    data: to_sector(&block, host.header.sector_size),
                }))
            }
            SetValuePhase::WritingValue => {
                completed(host, input, self.issued, now, || format!("value write of {name:?}"))?;
                if !self.release {
                    return Ok(Step::Done(Ok(())));
                }
                let held = self.held.clone().expect("set at start");
                // As in ReleaseOp: forget first, then record the release only while valid.
                if host.held.get(&name) == Some(&held) {
                    host.held.remove(&name);
                } else {
                    return Err(OpError::NotHeld { name });
                }
                host.require_valid(now)?;
                let leader = LeaderRecord {
                    area_id: host.header.area_id,
                    slot: held.slot,
                    state: LeaderState::Released,
                    lver: held.token.0,
                    value: LeaseValue {
                        owner: host.host_id,
                        generation: host.generation().unwrap_or(0),
                        acquisition: held.acquisition,
                        name: name.clone(),
                    },
                    timestamp_ms: now.0,
                };
                self.phase = SetValuePhase::Releasing;
                self.issued = now;
                Ok(Step::Io(IoRequest::Write {
                    offset: host.header.layout().leader_offset(held.slot),
                    data: to_sector(&leader.encode(), host.header.sector_size),
                }))
            }
            SetValuePhase::Releasing => {
                completed(host, input, self.issued, now, || format!("release of {name:?}"))?;
                Ok(Step::Done(Ok(())))
            }
        }
    }
}

impl Operation for SetValueOp {
    type Output = Result<(), OpError>;
    fn resume(&mut self, host: &mut HostState, input: Input, now: Millis) -> Step<Self::Output> {
        self.step(host, input, now).unwrap_or_else(|e| Step::Done(Err(e)))
    }
}

// ---------------------------------------------------------------------------
// Observe hosts

/// How an observer judges another host id's delta lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Liveness {
    /// The slot is free: never used, or left cleanly. Nothing it held is
    /// protected any more.
    Free,
    /// Not judged dead: the slot changed less than `T` ago on the
    /// observer's clock, or has not been watched for `T` yet.
    Alive,
    /// The slot stayed unchanged for `T` on the observer's clock: the host
    /// lease has expired and the host has fenced itself (timing rules).
    Dead,
}

/// One host slot as judged by an observer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostObservation {
    /// Host id.
    pub host_id: HostId,
    /// Free, alive or dead.
    pub liveness: Liveness,
    /// Generation in the slot (`None` if the slot is unreadable: torn or
    /// foreign content is watched like a live slot).
    pub generation: Option<u64>,
    /// When this observer first saw the slot's current content (its own
    /// monotonic clock): the last observed change.
    pub last_change: Millis,
    /// When the host is judged dead if the slot stays unchanged:
    /// `last_change + T`.
    pub dead_at: Millis,
}

/// Reads every delta slot and judges each host by the same rule and the
/// same observation memory as acquisition ([`HostState`]): a slot is dead
/// once its content stayed unchanged for `T` counted from the completion of
/// the read that first returned it. The result of a read that took longer
/// than the I/O timeout is discarded. Needs no valid host lease.
#[derive(Debug, Default)]
pub struct ObserveHostsOp {
    issued: Option<Millis>,
}

impl ObserveHostsOp {
    /// An observation of every host slot.
    pub fn new() -> ObserveHostsOp {
        ObserveHostsOp { issued: None }
    }

    fn step(
        &mut self,
        host: &mut HostState,
        input: Input,
        now: Millis,
    ) -> Result<Step<Result<Vec<HostObservation>, OpError>>, OpError> {
        let layout = host.header.layout();
        let Some(issued) = self.issued else {
            self.issued = Some(now);
            return Ok(Step::Io(IoRequest::Read {
                offset: layout.delta_offset(1),
                len: layout.host_slots as u64 * host.sector(),
            }));
        };
        let bytes = completed(host, input, issued, now, || "read of the delta slots".to_string())?.unwrap_or_default();
        need_len(&bytes, layout.host_slots as u64 * host.sector(), "delta slots")?;
        let s = host.sector() as usize;
        let t = host.header.timeouts.host_dead_ms;
        let mut out = Vec::with_capacity(layout.host_slots as usize);
        for h in 1..=layout.host_slots {
            let b = &bytes[(h as usize - 1) * s..h as usize * s];
            let first_seen = host.observe(h, digest(b), now);
            let rec = DeltaRecord::decode(b).ok().filter(|r| r.area_id == host.header.area_id && r.host_id == h);
            let liveness = match &rec {
                Some(r) if r.state == DeltaState::Free => Liveness::Free,
                _ if now.since(first_seen) >= t => Liveness::Dead,
                _ => Liveness::Alive,
            };
            out.push(HostObservation {
                host_id: h,
                liveness,
                generation: rec.map(|r| r.generation),
                last_change: first_seen,
                dead_at: first_seen + t,
            });
        }
        Ok(Step::Done(Ok(out)))
    }
}

impl Operation for ObserveHostsOp {
    type Output = Result<Vec<HostObservation>, OpError>;
    fn resume(&mut self, host: &mut HostState, input: Input, now: Millis) -> Step<Self::Output> {
        self.step(host, input, now).unwrap_or_else(|e| Step::Done(Err(e)))
    }
}

// ---------------------------------------------------------------------------
// Leave

/// Leaves the lockspace cleanly: forgets every resource lease, then writes
/// the delta slot as free (only while the host lease is valid), so that the
/// next joiner of this host id need not wait `T`. Resource leases still
/// recorded as held by this host become free at once for others (its slot
/// says it left). Output: nothing.
#[derive(Debug, Default)]
pub struct LeaveOp {
    issued: Option<Millis>,
}

impl LeaveOp {
    /// A leave.
    pub fn new() -> LeaveOp {
        LeaveOp { issued: None }
    }

    fn step(&mut self, host: &mut HostState, input: Input, now: Millis) -> Result<Step<Result<(), OpError>>, OpError> {
        match self.issued {
            None => {
                host.held.clear();
                let mine = host.require_valid(now)?.record.clone();
                let rec =
                    DeltaRecord { state: DeltaState::Free, renew_seq: mine.renew_seq + 1, timestamp_ms: now.0, ..mine };
                host.lost = Some("left the lockspace".into());
                self.issued = Some(now);
                Ok(Step::Io(IoRequest::Write {
                    offset: host.header.layout().delta_offset(host.host_id),
                    data: to_sector(&rec.encode(), host.header.sector_size),
                }))
            }
            Some(issued) => {
                completed(host, input, issued, now, || format!("delta slot of host {}", host.host_id))?;
                Ok(Step::Done(Ok(())))
            }
        }
    }
}

impl Operation for LeaveOp {
    type Output = Result<(), OpError>;
    fn resume(&mut self, host: &mut HostState, input: Input, now: Millis) -> Step<Self::Output> {
        self.step(host, input, now).unwrap_or_else(|e| Step::Done(Err(e)))
    }
}

#[cfg(test)]
mod tests {
    //! Operations tested by the requests they emit, without any disk or clock.
    use super::*;

    fn header() -> Header {
        Header {
            sector_size: 512,
            host_slots: 3,
            resource_slots: 2,
            timeouts: Timeouts::from_renewal_ms(100), // I 150, K 350, T 650
            area_id: 9,
            cluster_id: "t".into(),
        }
    }

    fn sector(rec: [u8; RECORD_LEN]) -> Vec<u8> {
        to_sector(&rec, 512)
    }

    /// A host joined at local time `at` (drives a JoinOp over a free slot).
    fn joined(at: u64) -> HostState {
        let mut h = HostState::new(header(), 2).unwrap();
        let mut op = JoinOp::new(0xabc);
        let t = Millis(at);
        assert_eq!(
            op.resume(&mut h, Input::Start, t),
            Step::Io(IoRequest::Read { offset: 1024, len: 512 }),
            "reads its own slot (host 2 = sector 2)"
        );
        let free = sector(DeltaRecord::free(9, 2).encode());
        let Step::Io(IoRequest::Write { offset: 1024, data }) =
            op.resume(&mut h, Input::Io(IoCompletion::Read(free)), t)
        else {
            panic!("a free slot is written at once")
        };
        let written = DeltaRecord::decode(&data).unwrap();
        assert_eq!((written.generation, written.incarnation, written.state), (1, 0xabc, DeltaState::Live));
        // Settle 2I + 1 = 301 ms, then verify.
        assert_eq!(op.resume(&mut h, Input::Io(IoCompletion::Written), t + 5), Step::SleepUntil(t + 306));
        assert!(matches!(op.resume(&mut h, Input::Wake, t + 306), Step::Io(IoRequest::Read { offset: 1024, .. })));
        let Step::Io(IoRequest::Write { data: renewed, .. }) =
            op.resume(&mut h, Input::Io(IoCompletion::Read(data)), t + 307)
        else {
            panic!("renews after verifying")
        };
        assert_eq!(DeltaRecord::decode(&renewed).unwrap().renew_seq, 1);
        assert_eq!(op.resume(&mut h, Input::Io(IoCompletion::Written), t + 308), Step::Done(Ok(1)));
        assert_eq!(h.valid_until(), Some(t + 307 + 350), "valid from the start of the renewal write");
        h
    }

    #[test]
    fn join_then_renew_extends_validity_from_the_write_start() {
        let mut h = joined(1000);
        let mut op = RenewOp::new();
        assert!(matches!(op.resume(&mut h, Input::Start, Millis(1400)), Step::Io(IoRequest::Read { .. })));
        let mine = h.joined.as_ref().unwrap().record.encode();
        let Step::Io(IoRequest::Write { .. }) =
            op.resume(&mut h, Input::Io(IoCompletion::Read(sector(mine))), Millis(1410))
        else {
            panic!("writes")
        };
        assert_eq!(op.resume(&mut h, Input::Io(IoCompletion::Written), Millis(1500)), Step::Done(Ok(Millis(1760))));
    }

    #[test]
    fn renewal_after_the_fence_deadline_is_refused_without_io() {
        let mut h = joined(1000);
        h.held.insert("db".into(), HeldLease { slot: 0, token: Token(4), acquisition: 1 });
        assert_eq!(h.holds("db", Millis(1656)), Some(Token(4)));
        // Deadline 1657: a host that was paused until then must not write.
        let step = RenewOp::new().resume(&mut h, Input::Start, Millis(1657));
        assert!(matches!(step, Step::Done(Err(OpError::Lost { .. }))), "{step:?}");
        assert_eq!(h.holds("db", Millis(1500)), None, "a lost lease is never valid again");
        assert!(h.held().is_empty());
    }

    #[test]
    fn late_completions_are_discarded() {
        let mut h = joined(1000);
        let mut op = RenewOp::new();
        op.resume(&mut h, Input::Start, Millis(1400));
        let mine = sector(h.joined.as_ref().unwrap().record.encode());
        // 151 ms > I = 150 ms: the read result is not used.
        let step = op.resume(&mut h, Input::Io(IoCompletion::Read(mine)), Millis(1551));
        assert!(matches!(step, Step::Done(Err(OpError::TimedOut { elapsed_ms: 151, .. }))), "{step:?}");
        assert_eq!(h.valid_until(), Some(Millis(1657)), "validity unchanged");
    }

    #[test]
    fn a_foreign_record_in_our_slot_loses_the_lease() {
        let mut h = joined(1000);
        let mut op = RenewOp::new();
        op.resume(&mut h, Input::Start, Millis(1400));
        let other = DeltaRecord { incarnation: 0x999, ..h.joined.as_ref().unwrap().record.clone() };
        let step = op.resume(&mut h, Input::Io(IoCompletion::Read(sector(other.encode()))), Millis(1401));
        assert!(matches!(step, Step::Done(Err(OpError::Lost { .. }))), "{step:?}");
        assert!(!h.is_valid(Millis(1402)));
    }

    #[test]
    fn acquire_waits_for_a_live_owner_to_stay_unchanged_for_t() {
        let mut h = joined(1000);
        let layout = h.header.layout();
        let owner = LeaseValue { owner: 1, generation: 5, acquisition: 1, name: "db".into() };
        let slot = layout.home_slot("db");
        let mut area = sector(
            LeaderRecord { area_id: 9, slot, state: LeaderState::Held, lver: 7, value: owner, timestamp_ms: 0 }
                .encode(),
        );
        for host in 1..=3 {
            area.extend(sector(BallotRecord { lver: 7, ..BallotRecord::empty(9, slot, host) }.encode()));
        }
        for copy in 0..VALUE_COPIES {
            area.extend(sector(ValueRecord::unwritten(9, slot, copy).encode().unwrap()));
        }
        let owner_slot = sector(
            DeltaRecord { state: DeltaState::Live, generation: 5, incarnation: 1, ..DeltaRecord::free(9, 1) }.encode(),
        );
        let attempt = |h: &mut HostState, t: u64| {
            let mut op = AcquireOp::new("db");
            assert_eq!(
                op.resume(h, Input::Start, Millis(t)),
                Step::Io(IoRequest::Read { offset: layout.leader_offset(slot), len: layout.resource_len() })
            );
            assert_eq!(
                op.resume(h, Input::Io(IoCompletion::Read(area.clone())), Millis(t)),
                Step::Io(IoRequest::Read { offset: layout.delta_offset(1), len: 512 })
            );
            op.resume(h, Input::Io(IoCompletion::Read(owner_slot.clone())), Millis(t + 1))
        };
        // First sight at 1400: busy until 1401 + 650.
        match attempt(&mut h, 1400) {
            Step::Done(Err(OpError::Busy { owner: 1, token: Token(7), dead_no_earlier_than, .. })) => {
                assert_eq!(dead_no_earlier_than, Millis(2051))
            }
            other => panic!("{other:?}"),
        }
        // Keep our own lease valid, then look again after T: unchanged, so a ballot for version 8 starts.
        h.joined.as_mut().unwrap().renewed_at = Millis(2000);
        match attempt(&mut h, 2050) {
            Step::Io(IoRequest::Write { offset, data }) => {
                assert_eq!(offset, layout.ballot_offset(slot, 2));
                let b = BallotRecord::decode(&data).unwrap();
                assert_eq!((b.lver, b.bal, b.mbal % 4), (8, 0, 2), "phase 1 for version 8, our ballot number");
            }
            other => panic!("{other:?}"),
        }
    }
}
