//! On-disk format of a lease area (documented in docs/lease-format.md).
//!
//! Every record is a 512-byte block at the start of its own sector (the rest
//! of a 4096-byte sector is zero and ignored). Every block starts with an
//! 8-byte magic naming the record type, a crc32c of the whole 512-byte block
//! (computed with the crc field zeroed) and the format version, followed by
//! little-endian fields. A zeroed, torn or foreign block therefore never
//! decodes: it is refused, never mistaken for an empty record.
//!
//! Version 2 added two value-block records (sanlock's LVB) at the end of
//! every resource slot; version-1 areas are refused (re-initialise them).

use crate::config::Timeouts;
use thiserror::Error;

/// Size of every encoded record; records are padded to the sector size.
pub const RECORD_LEN: usize = 512;
/// Format version written by this code and the only one it reads.
pub const FORMAT_VERSION: u32 = 2;
/// Magic of the area header (sector 0).
pub const HEADER_MAGIC: [u8; 8] = *b"TNDMLEAS";
/// Magic of a delta-lease (host) slot.
pub const DELTA_MAGIC: [u8; 8] = *b"TNDMDLTA";
/// Magic of a resource leader record (the committed owner of a resource slot).
pub const LEADER_MAGIC: [u8; 8] = *b"TNDMLEAD";
/// Magic of a Disk Paxos ballot block (one per host per resource slot).
pub const BALLOT_MAGIC: [u8; 8] = *b"TNDMBALT";
/// Magic of a value-block record (two copies per resource slot).
pub const VALUE_MAGIC: [u8; 8] = *b"TNDMLVBK";
/// Largest value block, in bytes: what fits in a record after its fields.
pub const MAX_VALUE_LEN: usize = 400;
/// Value-block records per resource slot: writes alternate between them so
/// that a torn write never destroys the last value written successfully.
pub const VALUE_COPIES: u32 = 2;
/// Longest cluster id, in bytes of UTF-8.
pub const MAX_CLUSTER_ID_LEN: usize = 64;
/// Longest resource name, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 64;
/// Largest number of host slots an area may have.
pub const MAX_HOSTS: u32 = 255;
/// Largest number of resource slots an area may have.
pub const MAX_RESOURCES: u32 = 4096;

/// A host id: 1 ..= `host_slots`.
pub type HostId = u32;

/// Why bytes could not be decoded as a record, or parameters are not encodable.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// The buffer is shorter than one record.
    #[error("{what}: got {len} bytes, a record needs {RECORD_LEN}; the lease area is truncated")]
    Short {
        /// Which record.
        what: &'static str,
        /// Bytes available.
        len: usize,
    },
    /// The magic does not name the expected record type.
    #[error(
        "{what}: magic {found:?} is not {expected:?}; this is not a Tandem lease area (or not this part of one). \
         Check the path, or initialise the area with `tandemctl lease init` (add --force only if you are sure)"
    )]
    WrongMagic {
        /// Which record.
        what: &'static str,
        /// The magic found (lossy UTF-8).
        found: String,
        /// The magic expected.
        expected: String,
    },
    /// The checksum does not match: the record is torn, corrupted or zeroed.
    #[error(
        "{what}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}); the record is torn or corrupted"
    )]
    Checksum {
        /// Which record.
        what: &'static str,
        /// The crc stored in the record.
        stored: u32,
        /// The crc of the bytes read.
        computed: u32,
    },
    /// The format version is not the one this code reads.
    #[error(
        "{what}: format version {found} is not supported (this build reads version {FORMAT_VERSION} only); \
         stop every host using the area and re-initialise it with `tandemctl lease init --force`"
    )]
    Version {
        /// Which record.
        what: &'static str,
        /// The version found.
        found: u32,
    },
    /// A field has a value no valid record can have.
    #[error("{what}: field {field} has invalid value {value}")]
    Field {
        /// Which record.
        what: &'static str,
        /// Which field.
        field: &'static str,
        /// The value found or requested.
        value: String,
    },
}

fn field_err(what: &'static str, field: &'static str, value: impl ToString) -> FormatError {
    FormatError::Field { what, field, value: value.to_string() }
}

/// Little-endian writer into a record block.
struct Put<'a> {
    buf: &'a mut [u8; RECORD_LEN],
    pos: usize,
}

impl Put<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn text(&mut self, s: &str, max: usize) {
        self.u16(s.len() as u16);
        let mut field = vec![0u8; max];
        field[..s.len()].copy_from_slice(s.as_bytes());
        self.bytes(&field);
    }
}

/// Little-endian reader from a record block.
struct Get<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl Get<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes(2).try_into().expect("2 bytes"))
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes(4).try_into().expect("4 bytes"))
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes(8).try_into().expect("8 bytes"))
    }
    fn text(&mut self, field: &'static str, max: usize) -> Result<String, FormatError> {
        let len = self.u16() as usize;
        let what = self.what;
        let raw = self.bytes(max);
        if len > max {
            return Err(field_err(what, field, format!("length {len} > {max}")));
        }
        String::from_utf8(raw[..len].to_vec()).map_err(|_| field_err(what, field, "not UTF-8"))
    }
}

fn crc_of(block: &[u8]) -> u32 {
    // The crc field (bytes 8..12) counts as zero.
    let c = crc32c::crc32c(&block[..8]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &block[12..RECORD_LEN])
}

fn encode_with(magic: [u8; 8], body: impl FnOnce(&mut Put<'_>)) -> [u8; RECORD_LEN] {
    let mut buf = [0u8; RECORD_LEN];
    let mut put = Put { buf: &mut buf, pos: 0 };
    put.bytes(&magic);
    put.u32(0); // crc, filled below
    put.u32(FORMAT_VERSION);
    body(&mut put);
    let crc = crc_of(&buf);
    buf[8..12].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// Checks length, magic, crc and version; returns a reader positioned at the body.
fn open_record<'a>(bytes: &'a [u8], magic: [u8; 8], what: &'static str) -> Result<Get<'a>, FormatError> {
    if bytes.len() < RECORD_LEN {
        return Err(FormatError::Short { what, len: bytes.len() });
    }
    let block = &bytes[..RECORD_LEN];
    if block[..8] != magic {
        return Err(FormatError::WrongMagic {
            what,
            found: String::from_utf8_lossy(&block[..8]).into_owned(),
            expected: String::from_utf8_lossy(&magic).into_owned(),
        });
    }
    let stored = u32::from_le_bytes(block[8..12].try_into().expect("4 bytes"));
    let computed = crc_of(block);
    if stored != computed {
        return Err(FormatError::Checksum { what, stored, computed });
    }
    let version = u32::from_le_bytes(block[12..16].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { what, found: version });
    }
    Ok(Get { buf: block, pos: 16, what })
}

/// Sector 0: what the area is and how it is laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Sector size of the area: 512 or 4096. Every record sits at a multiple.
    pub sector_size: u32,
    /// Number of delta-lease slots = highest host id.
    pub host_slots: u32,
    /// Number of resource-lease slots.
    pub resource_slots: u32,
    /// Timeouts every host of the lockspace uses.
    pub timeouts: Timeouts,
    /// Random id chosen at initialisation; every other record carries it, so
    /// records left over from an earlier initialisation are recognised.
    pub area_id: u64,
    /// Name of the cluster this area belongs to; `open` refuses other names.
    pub cluster_id: String,
}

impl Header {
    /// Checks the values an area may have (sizes, timeouts, cluster id).
    pub fn check(&self) -> Result<(), FormatError> {
        const W: &str = "header";
        if self.sector_size != 512 && self.sector_size != 4096 {
            return Err(field_err(W, "sector_size", self.sector_size));
        }
        if self.host_slots == 0 || self.host_slots > MAX_HOSTS {
            return Err(field_err(W, "host_slots", self.host_slots));
        }
        if self.resource_slots == 0 || self.resource_slots > MAX_RESOURCES {
            return Err(field_err(W, "resource_slots", self.resource_slots));
        }
        if self.cluster_id.is_empty() || self.cluster_id.len() > MAX_CLUSTER_ID_LEN {
            return Err(field_err(W, "cluster_id", format!("{:?} (1..={MAX_CLUSTER_ID_LEN} bytes)", self.cluster_id)));
        }
        self.timeouts.validate().map_err(|e| field_err(W, "timeouts", e))?;
        Ok(())
    }

    /// Encodes the header block.
    pub fn encode(&self) -> Result<[u8; RECORD_LEN], FormatError> {
        self.check()?;
        Ok(encode_with(HEADER_MAGIC, |p| {
            p.u32(self.sector_size);
            p.u32(self.host_slots);
            p.u32(self.resource_slots);
            p.u32(0);
            p.u64(self.timeouts.renewal_ms);
            p.u64(self.timeouts.io_timeout_ms);
            p.u64(self.timeouts.fence_ms);
            p.u64(self.timeouts.kill_margin_ms);
            p.u64(self.timeouts.host_dead_ms);
            p.u64(self.area_id);
            p.text(&self.cluster_id, MAX_CLUSTER_ID_LEN);
        }))
    }

    /// Decodes and checks a header block.
    pub fn decode(bytes: &[u8]) -> Result<Header, FormatError> {
        let mut g = open_record(bytes, HEADER_MAGIC, "header")?;
        let sector_size = g.u32();
        let host_slots = g.u32();
        let resource_slots = g.u32();
        let _reserved = g.u32();
        let timeouts = Timeouts {
            renewal_ms: g.u64(),
            io_timeout_ms: g.u64(),
            fence_ms: g.u64(),
            kill_margin_ms: g.u64(),
            host_dead_ms: g.u64(),
        };
        let area_id = g.u64();
        let cluster_id = g.text("cluster_id", MAX_CLUSTER_ID_LEN)?;
        let h = Header { sector_size, host_slots, resource_slots, timeouts, area_id, cluster_id };
        h.check()?;
        Ok(h)
    }

    /// Where everything is, derived from this header.
    pub fn layout(&self) -> Layout {
        Layout { sector_size: self.sector_size, host_slots: self.host_slots, resource_slots: self.resource_slots }
    }
}

/// Byte offsets of the records of an area.
///
/// Sector 0: header. Sectors 1..=H: delta slot of host id h at sector h.
/// Then `resource_slots` resource areas of `3 + H` sectors each: the leader
/// record, then the ballot block of host id h at leader + h, then the two
/// value-block copies at leader + H + 1 and leader + H + 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    /// Sector size in bytes.
    pub sector_size: u32,
    /// Number of host slots (H).
    pub host_slots: u32,
    /// Number of resource slots.
    pub resource_slots: u32,
}

impl Layout {
    /// Offset of the delta slot of `host_id` (1-based).
    pub fn delta_offset(&self, host_id: HostId) -> u64 {
        host_id as u64 * self.sector_size as u64
    }
    /// Offset of the leader record of resource slot `slot` (0-based).
    pub fn leader_offset(&self, slot: u32) -> u64 {
        let per = 1 + self.host_slots as u64 + VALUE_COPIES as u64;
        (1 + self.host_slots as u64 + slot as u64 * per) * self.sector_size as u64
    }
    /// Offset of the ballot block of `host_id` in resource slot `slot`.
    pub fn ballot_offset(&self, slot: u32, host_id: HostId) -> u64 {
        self.leader_offset(slot) + host_id as u64 * self.sector_size as u64
    }
    /// Offset of value-block copy `copy` (0 or 1) of resource slot `slot`.
    pub fn value_offset(&self, slot: u32, copy: u32) -> u64 {
        self.leader_offset(slot) + (1 + self.host_slots as u64 + copy as u64) * self.sector_size as u64
    }
    /// Bytes of one resource slot (leader, all ballot blocks, both value copies).
    pub fn resource_len(&self) -> u64 {
        (1 + self.host_slots as u64 + VALUE_COPIES as u64) * self.sector_size as u64
    }
    /// Total size of the area in bytes.
    pub fn area_len(&self) -> u64 {
        self.leader_offset(self.resource_slots)
    }
    /// The resource slot a name probes first: crc32c(name) mod slots.
    pub fn home_slot(&self, name: &str) -> u32 {
        crc32c::crc32c(name.as_bytes()) % self.resource_slots
    }
}

/// State of a delta-lease slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeltaState {
    /// Never used, or left cleanly by its last owner (a joiner need not wait).
    Free,
    /// Owned by a host that renews it.
    Live,
}

/// A delta-lease slot: says that host id `host_id` is alive as long as it keeps changing.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeltaRecord {
    /// Area id from the header.
    pub area_id: u64,
    /// Host id this slot belongs to.
    pub host_id: HostId,
    /// Free or live.
    pub state: DeltaState,
    /// Incremented by every join; identifies an incarnation of the host id
    /// (resource leases record it).
    pub generation: u64,
    /// Random per join, so that two racing joiners that picked the same
    /// generation still write different records.
    pub incarnation: u64,
    /// Incremented by every renewal, so every renewal changes the slot.
    pub renew_seq: u64,
    /// Writer's monotonic clock in ms at the write: informational only
    /// (clocks of different hosts are not comparable).
    pub timestamp_ms: u64,
}

impl DeltaRecord {
    /// A free slot as written by initialisation.
    pub fn free(area_id: u64, host_id: HostId) -> Self {
        DeltaRecord {
            area_id,
            host_id,
            state: DeltaState::Free,
            generation: 0,
            incarnation: 0,
            renew_seq: 0,
            timestamp_ms: 0,
        }
    }

    /// Encodes the block.
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        encode_with(DELTA_MAGIC, |p| {
            p.u64(self.area_id);
            p.u32(self.host_id);
            p.u32(match self.state {
                DeltaState::Free => 0,
                DeltaState::Live => 1,
            });
            p.u64(self.generation);
            p.u64(self.incarnation);
            p.u64(self.renew_seq);
            p.u64(self.timestamp_ms);
        })
    }

    /// Decodes a block.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut g = open_record(bytes, DELTA_MAGIC, "delta slot")?;
        let area_id = g.u64();
        let host_id = g.u32();
        let state = match g.u32() {
            0 => DeltaState::Free,
            1 => DeltaState::Live,
            v => return Err(field_err("delta slot", "state", v)),
        };
        Ok(DeltaRecord {
            area_id,
            host_id,
            state,
            generation: g.u64(),
            incarnation: g.u64(),
            renew_seq: g.u64(),
            timestamp_ms: g.u64(),
        })
    }
}

/// The value Disk Paxos chooses for one lease version of a resource slot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct LeaseValue {
    /// Host id of the owner (0 in an empty ballot block).
    pub owner: HostId,
    /// Generation of the owner's delta lease when it acquired.
    pub generation: u64,
    /// Unique per acquisition attempt (random base per join + counter): a
    /// value left behind by an earlier, abandoned attempt of the same host
    /// is never mistaken for the current attempt's.
    pub acquisition: u64,
    /// Name of the resource: part of the chosen value, so a slot is bound
    /// to one name by the first chosen value.
    pub name: String,
}

/// State of a resource slot's leader record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeaderState {
    /// No lease version has been committed for this slot.
    Unclaimed,
    /// Version `lver` is owned by `owner`.
    Held,
    /// Version `lver`'s owner released it.
    Released,
}

/// The leader record of a resource slot: the committed outcome of the
/// latest Disk Paxos instance (a cache: the ballot blocks are the truth).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaderRecord {
    /// Area id from the header.
    pub area_id: u64,
    /// Index of this resource slot.
    pub slot: u32,
    /// Unclaimed, held or released.
    pub state: LeaderState,
    /// Lease version = fencing token of the current owner (0 if unclaimed).
    pub lver: u64,
    /// The chosen value for `lver`.
    pub value: LeaseValue,
    /// Writer's monotonic clock in ms (informational only).
    pub timestamp_ms: u64,
}

fn put_value(p: &mut Put<'_>, v: &LeaseValue) {
    p.u32(v.owner);
    p.u32(0);
    p.u64(v.generation);
    p.u64(v.acquisition);
    p.text(&v.name, MAX_NAME_LEN);
}

fn get_value(g: &mut Get<'_>) -> Result<LeaseValue, FormatError> {
    let owner = g.u32();
    let _pad = g.u32();
    let generation = g.u64();
    let acquisition = g.u64();
    let name = g.text("name", MAX_NAME_LEN)?;
    Ok(LeaseValue { owner, generation, acquisition, name })
}

impl LeaderRecord {
    /// An unclaimed slot as written by initialisation.
    pub fn unclaimed(area_id: u64, slot: u32) -> Self {
        LeaderRecord {
            area_id,
            slot,
            state: LeaderState::Unclaimed,
            lver: 0,
            value: LeaseValue::default(),
            timestamp_ms: 0,
        }
    }

    /// Encodes the block.
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        encode_with(LEADER_MAGIC, |p| {
            p.u64(self.area_id);
            p.u32(self.slot);
            p.u32(match self.state {
                LeaderState::Unclaimed => 0,
                LeaderState::Held => 1,
                LeaderState::Released => 2,
            });
            p.u64(self.lver);
            p.u64(self.timestamp_ms);
            put_value(p, &self.value);
        })
    }

    /// Decodes a block.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut g = open_record(bytes, LEADER_MAGIC, "resource leader")?;
        let area_id = g.u64();
        let slot = g.u32();
        let state = match g.u32() {
            0 => LeaderState::Unclaimed,
            1 => LeaderState::Held,
            2 => LeaderState::Released,
            v => return Err(field_err("resource leader", "state", v)),
        };
        let lver = g.u64();
        let timestamp_ms = g.u64();
        let value = get_value(&mut g)?;
        Ok(LeaderRecord { area_id, slot, state, lver, value, timestamp_ms })
    }
}

/// A Disk Paxos block: host `host_id`'s part of the ballot for lease
/// version `lver` of a resource slot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BallotRecord {
    /// Area id from the header.
    pub area_id: u64,
    /// Resource slot.
    pub slot: u32,
    /// The host whose block this is.
    pub host_id: HostId,
    /// Lease version this block is about (blocks with a lower version are
    /// stale for a ballot on a higher one).
    pub lver: u64,
    /// Highest ballot number this host has started (`mbal` in Disk Paxos).
    pub mbal: u64,
    /// Ballot number in which `value` was accepted (0: none).
    pub bal: u64,
    /// Accepted value (`inp`).
    pub value: LeaseValue,
}

impl BallotRecord {
    /// An empty block as written by initialisation.
    pub fn empty(area_id: u64, slot: u32, host_id: HostId) -> Self {
        BallotRecord { area_id, slot, host_id, lver: 0, mbal: 0, bal: 0, value: LeaseValue::default() }
    }

    /// Encodes the block.
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        encode_with(BALLOT_MAGIC, |p| {
            p.u64(self.area_id);
            p.u32(self.slot);
            p.u32(self.host_id);
            p.u64(self.lver);
            p.u64(self.mbal);
            p.u64(self.bal);
            put_value(p, &self.value);
        })
    }

    /// Decodes a block.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut g = open_record(bytes, BALLOT_MAGIC, "ballot block")?;
        let area_id = g.u64();
        let slot = g.u32();
        let host_id = g.u32();
        let lver = g.u64();
        let mbal = g.u64();
        let bal = g.u64();
        let value = get_value(&mut g)?;
        Ok(BallotRecord { area_id, slot, host_id, lver, mbal, bal, value })
    }
}

/// Whether a value-block copy has ever been written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueState {
    /// Written by initialisation: no holder has set a value in this copy.
    Unwritten,
    /// Holds a value set by the holder of lease version `lver`.
    Written,
}

/// One copy of a resource slot's value block: an opaque byte string set by
/// the lease holder and carried over to the next holders (sanlock's LVB).
///
/// Readers take the decodable copy with the highest `(lver, seq)`; writers
/// overwrite the other one, so a torn write leaves the previous value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ValueRecord {
    /// Area id from the header.
    pub area_id: u64,
    /// Resource slot.
    pub slot: u32,
    /// Which copy this is (0 or 1): guards against misplaced records.
    pub copy: u32,
    /// Unwritten or written.
    pub state: ValueState,
    /// Host id of the writer.
    pub owner: HostId,
    /// Lease version (fencing token) under which the writer held the resource.
    pub lver: u64,
    /// Write sequence of the slot: every write uses the highest seen + 1.
    pub seq: u64,
    /// Generation of the writer's host lease.
    pub generation: u64,
    /// Acquisition id of the writer's lease (as in [`LeaseValue`]).
    pub acquisition: u64,
    /// Writer's monotonic clock in ms (informational only).
    pub timestamp_ms: u64,
    /// The value: at most [`MAX_VALUE_LEN`] bytes.
    pub data: Vec<u8>,
}

impl ValueRecord {
    /// An unwritten copy as written by initialisation.
    pub fn unwritten(area_id: u64, slot: u32, copy: u32) -> Self {
        ValueRecord {
            area_id,
            slot,
            copy,
            state: ValueState::Unwritten,
            owner: 0,
            lver: 0,
            seq: 0,
            generation: 0,
            acquisition: 0,
            timestamp_ms: 0,
            data: Vec::new(),
        }
    }

    /// Ordering of copies: the higher `(lver, seq)` is the newer value; an
    /// unwritten copy ranks below every written one.
    pub fn rank(&self) -> (u64, u64) {
        match self.state {
            ValueState::Unwritten => (0, 0),
            ValueState::Written => (self.lver, self.seq),
        }
    }

    /// Encodes the block; fails if `data` is longer than [`MAX_VALUE_LEN`].
    pub fn encode(&self) -> Result<[u8; RECORD_LEN], FormatError> {
        check_value(&self.data)?;
        Ok(encode_with(VALUE_MAGIC, |p| {
            p.u64(self.area_id);
            p.u32(self.slot);
            p.u32(self.copy);
            p.u32(match self.state {
                ValueState::Unwritten => 0,
                ValueState::Written => 1,
            });
            p.u32(self.owner);
            p.u64(self.lver);
            p.u64(self.seq);
            p.u64(self.generation);
            p.u64(self.acquisition);
            p.u64(self.timestamp_ms);
            p.u16(self.data.len() as u16);
            p.bytes(&self.data);
        }))
    }

    /// Decodes a block.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        const W: &str = "value block";
        let mut g = open_record(bytes, VALUE_MAGIC, W)?;
        let area_id = g.u64();
        let slot = g.u32();
        let copy = g.u32();
        let state = match g.u32() {
            0 => ValueState::Unwritten,
            1 => ValueState::Written,
            v => return Err(field_err(W, "state", v)),
        };
        let owner = g.u32();
        let lver = g.u64();
        let seq = g.u64();
        let generation = g.u64();
        let acquisition = g.u64();
        let timestamp_ms = g.u64();
        let len = g.u16() as usize;
        if len > MAX_VALUE_LEN {
            return Err(field_err(W, "length", format!("{len} > {MAX_VALUE_LEN}")));
        }
        if copy >= VALUE_COPIES {
            return Err(field_err(W, "copy", copy));
        }
        let data = g.bytes(len).to_vec();
        Ok(ValueRecord { area_id, slot, copy, state, owner, lver, seq, generation, acquisition, timestamp_ms, data })
    }
}

/// Checks that a value fits a value block ([`MAX_VALUE_LEN`] bytes).
pub fn check_value(data: &[u8]) -> Result<(), FormatError> {
    if data.len() > MAX_VALUE_LEN {
        return Err(field_err("value block", "value", format!("{} bytes (at most {MAX_VALUE_LEN})", data.len())));
    }
    Ok(())
}

/// Pads a record block to a full sector.
pub fn to_sector(block: &[u8; RECORD_LEN], sector_size: u32) -> Vec<u8> {
    let mut v = vec![0u8; sector_size as usize];
    v[..RECORD_LEN].copy_from_slice(block);
    v
}

/// Checks that a resource name is usable: 1..=64 bytes of UTF-8 without
/// control characters.
pub fn check_name(name: &str) -> Result<(), FormatError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(field_err(
            "resource",
            "name",
            format!("{name:?} (1..={MAX_NAME_LEN} bytes, no control characters)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            sector_size: 512,
            host_slots: 4,
            resource_slots: 8,
            timeouts: Timeouts::default(),
            area_id: 42,
            cluster_id: "lab".into(),
        }
    }

    #[test]
    fn header_round_trip_and_bit_flip_detected() {
        let h = header();
        let mut b = h.encode().unwrap();
        assert_eq!(Header::decode(&b).unwrap(), h);
        b[100] ^= 1;
        assert!(matches!(Header::decode(&b), Err(FormatError::Checksum { .. })));
    }

    #[test]
    fn zeroed_block_is_refused() {
        let z = [0u8; RECORD_LEN];
        assert!(matches!(DeltaRecord::decode(&z), Err(FormatError::WrongMagic { .. })));
    }

    #[test]
    fn layout_offsets_do_not_overlap() {
        let l = header().layout();
        assert_eq!(l.delta_offset(1), 512);
        assert_eq!(l.leader_offset(0), 5 * 512);
        assert_eq!(l.ballot_offset(0, 4), 9 * 512);
        assert_eq!(l.value_offset(0, 0), 10 * 512);
        assert_eq!(l.value_offset(0, 1), 11 * 512);
        assert_eq!(l.leader_offset(1), 12 * 512);
        assert_eq!(l.area_len(), (1 + 4 + 8 * 7) * 512);
        assert_eq!(l.resource_len(), 7 * 512);
    }

    #[test]
    fn value_record_round_trip_limits_and_bit_flip() {
        let r = ValueRecord {
            state: ValueState::Written,
            owner: 3,
            lver: 7,
            seq: 12,
            generation: 2,
            acquisition: 99,
            timestamp_ms: 5,
            data: vec![0xab; MAX_VALUE_LEN],
            ..ValueRecord::unwritten(42, 1, 1)
        };
        let mut b = r.encode().unwrap();
        assert_eq!(ValueRecord::decode(&b).unwrap(), r);
        b[300] ^= 0x10;
        assert!(matches!(ValueRecord::decode(&b), Err(FormatError::Checksum { .. })));
        let long = ValueRecord { data: vec![0; MAX_VALUE_LEN + 1], ..r };
        assert!(matches!(long.encode(), Err(FormatError::Field { field: "value", .. })));
        assert!(ValueRecord::unwritten(1, 0, 0).rank() < ValueRecord { lver: 1, seq: 1, ..long.clone() }.rank());
    }

    #[test]
    fn version_1_records_are_refused_naming_both_versions() {
        let mut b = header().encode().unwrap();
        b[12..16].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc_of(&b);
        b[8..12].copy_from_slice(&crc.to_le_bytes());
        let e = Header::decode(&b).unwrap_err();
        assert_eq!(e, FormatError::Version { what: "header", found: 1 });
        let text = e.to_string();
        assert!(text.contains("version 1") && text.contains("version 2"), "{text}");
    }
}
