//! Creating, opening and inspecting a lease area (blocking; no lease is
//! taken by anything here).

use thiserror::Error;

use crate::config::Timeouts;
use crate::disk::{DiskError, LeaseDisk};
use crate::engine::{Token, read_value_copies};
use crate::format::{
    BallotRecord, DeltaRecord, FormatError, HEADER_MAGIC, Header, HostId, Layout, LeaderRecord, LeaderState,
    RECORD_LEN, VALUE_COPIES, ValueRecord, check_name, to_sector,
};

/// Errors of initialising, opening and inspecting a lease area.
#[derive(Debug, Error)]
pub enum LockspaceError {
    /// Disk I/O failed.
    #[error("lease area I/O failed")]
    Disk(#[from] DiskError),
    /// The parameters given to `init` are not valid.
    #[error("invalid lease area parameters")]
    BadParams(#[source] FormatError),
    /// `init` found an initialised area and `force` was not given.
    #[error(
        "the lease area is already initialised for cluster {cluster_id:?}; refusing to overwrite it. \
         Stop every host using it and pass --force to re-initialise"
    )]
    AlreadyInitialised {
        /// Cluster id found in the header.
        cluster_id: String,
    },
    /// `init` found data that is not an empty area and `force` was not given.
    #[error(
        "the target is not empty ({what}); refusing to overwrite it. Check the path (this may be someone \
         else's data), or pass --force"
    )]
    NotEmpty {
        /// What was found.
        what: String,
    },
    /// The header is not a Tandem lease header or cannot be decoded.
    #[error("lease area header is not valid; nothing was changed. Check the path, or re-initialise with --force")]
    BadHeader(#[source] FormatError),
    /// The area belongs to another cluster.
    #[error(
        "lease area belongs to cluster {found:?}, not {expected:?}; check the path and the cluster id \
         (nothing was changed)"
    )]
    WrongCluster {
        /// Cluster id in the header.
        found: String,
        /// Cluster id expected.
        expected: String,
    },
    /// The area's sector size cannot be used on this disk.
    #[error(
        "lease area sector size {sector_size} is not a multiple of the disk's logical block size {alignment}; \
         re-initialise with --sector-size {alignment} or use another disk"
    )]
    SectorSize {
        /// Sector size of the area.
        sector_size: u32,
        /// Required alignment of the disk.
        alignment: usize,
    },
    /// The disk is smaller than the area its header describes.
    #[error(
        "lease area is truncated: the header describes {needed} bytes but the disk has {size}; \
         restore it or re-initialise with --force"
    )]
    Truncated {
        /// Bytes on the disk.
        size: u64,
        /// Bytes the area needs.
        needed: u64,
    },
}

/// What `init` writes into a new area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AreaParams {
    /// Cluster id recorded in the header (1..=64 bytes).
    pub cluster_id: String,
    /// 512 or 4096; must be a multiple of the disk's logical block size.
    pub sector_size: u32,
    /// Number of host ids (1..=255).
    pub host_slots: u32,
    /// Number of resource slots (1..=4096); names are hashed into them.
    pub resource_slots: u32,
    /// Timeouts every host will use.
    pub timeouts: Timeouts,
}

impl AreaParams {
    /// Defaults for a cluster: 512-byte sectors, 16 hosts, 64 resources, default timeouts.
    pub fn new(cluster_id: &str) -> AreaParams {
        AreaParams {
            cluster_id: cluster_id.to_string(),
            sector_size: 512,
            host_slots: 16,
            resource_slots: 64,
            timeouts: Timeouts::default(),
        }
    }
}

/// One host slot as found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSlotDump {
    /// Host id.
    pub host_id: HostId,
    /// The record, or why it could not be decoded.
    pub record: Result<DeltaRecord, String>,
}

/// One resource slot as found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceDump {
    /// Slot index.
    pub slot: u32,
    /// The leader record, or why it could not be decoded.
    pub leader: Result<LeaderRecord, String>,
    /// Highest lease version any ballot block of the slot mentions (a value
    /// above the leader's means an acquisition is in progress or its commit
    /// was lost).
    pub max_ballot_lver: u64,
    /// Ballot blocks that could not be decoded, by host id.
    pub bad_ballots: Vec<(HostId, String)>,
    /// The newest value block (`Ok(None)`: never written), or why no copy
    /// could be read.
    pub value: Result<Option<ValueRecord>, String>,
    /// Value copies that could not be decoded, by copy index (one bad copy
    /// is normal after a torn write; the other holds the value).
    pub bad_values: Vec<(u32, String)>,
}

impl ResourceDump {
    /// Resource name, if the slot is bound to one.
    pub fn name(&self) -> Option<&str> {
        match &self.leader {
            Ok(l) if l.state != LeaderState::Unclaimed => Some(&l.value.name),
            _ => None,
        }
    }

    /// Owner host id and fencing token, if held (as recorded; whether the
    /// owner is alive needs its delta slot observed over time).
    pub fn holder(&self) -> Option<(HostId, Token)> {
        match &self.leader {
            Ok(l) if l.state == LeaderState::Held => Some((l.value.owner, Token(l.lver))),
            _ => None,
        }
    }

    /// The value block's bytes, if one was written and is readable.
    pub fn value_bytes(&self) -> Option<&[u8]> {
        self.value.as_ref().ok()?.as_ref().map(|v| v.data.as_slice())
    }
}

/// Everything in an area, for `tandemctl lease dump`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AreaDump {
    /// The header.
    pub header: Header,
    /// Every host slot.
    pub hosts: Vec<HostSlotDump>,
    /// Every resource slot.
    pub resources: Vec<ResourceDump>,
}

/// Operations on a lease area as a whole.
#[derive(Debug)]
pub struct Lockspace;

/// Bytes to read for the header: one record, rounded up to the disk's alignment.
fn header_read_len(disk: &dyn LeaseDisk) -> usize {
    RECORD_LEN.div_ceil(disk.alignment()) * disk.alignment()
}

impl Lockspace {
    /// Writes a new, empty area: every host slot free, every resource slot
    /// unclaimed, the header last (so a half-written area never opens).
    /// Refuses an initialised area, or any non-zero content at its start,
    /// unless `force`. Returns the header written (with a fresh area id).
    pub fn init(disk: &dyn LeaseDisk, params: &AreaParams, force: bool) -> Result<Header, LockspaceError> {
        let header = Header {
            sector_size: params.sector_size,
            host_slots: params.host_slots,
            resource_slots: params.resource_slots,
            timeouts: params.timeouts,
            area_id: rand::random::<u64>() | 1,
            cluster_id: params.cluster_id.clone(),
        };
        header.check().map_err(LockspaceError::BadParams)?;
        let alignment = disk.alignment();
        if header.sector_size as usize % alignment != 0 {
            return Err(LockspaceError::SectorSize { sector_size: header.sector_size, alignment });
        }
        if !force {
            Self::refuse_existing(disk)?;
        }
        let layout = header.layout();
        let s = header.sector_size;
        let mut hosts = Vec::with_capacity(layout.host_slots as usize * s as usize);
        for h in 1..=layout.host_slots {
            hosts.extend(to_sector(&DeltaRecord::free(header.area_id, h).encode(), s));
        }
        disk.write_at(layout.delta_offset(1), &hosts)?;
        for slot in 0..layout.resource_slots {
            let mut area = to_sector(&LeaderRecord::unclaimed(header.area_id, slot).encode(), s);
            for h in 1..=layout.host_slots {
                area.extend(to_sector(&BallotRecord::empty(header.area_id, slot, h).encode(), s));
            }
            for copy in 0..VALUE_COPIES {
                let v =
                    ValueRecord::unwritten(header.area_id, slot, copy).encode().map_err(LockspaceError::BadParams)?;
                area.extend(to_sector(&v, s));
            }
            disk.write_at(layout.leader_offset(slot), &area)?;
        }
        let encoded = header.encode().map_err(LockspaceError::BadParams)?;
        disk.write_at(0, &to_sector(&encoded, s))?;
        Ok(header)
    }

    fn refuse_existing(disk: &dyn LeaseDisk) -> Result<(), LockspaceError> {
        let size = disk.size()?;
        let len = header_read_len(disk);
        if size == 0 {
            return Ok(());
        }
        if size < len as u64 {
            return Err(LockspaceError::NotEmpty { what: format!("{size} bytes that are not a lease area") });
        }
        let mut buf = vec![0u8; len];
        disk.read_at(0, &mut buf)?;
        if buf.iter().all(|&b| b == 0) {
            return Ok(());
        }
        if buf[..8] == HEADER_MAGIC {
            return match Header::decode(&buf) {
                Ok(h) => Err(LockspaceError::AlreadyInitialised { cluster_id: h.cluster_id }),
                Err(e) => Err(LockspaceError::NotEmpty { what: format!("a damaged lease area header: {e}") }),
            };
        }
        Err(LockspaceError::NotEmpty { what: format!("non-zero data starting with {:02x?}", &buf[..8]) })
    }

    /// Reads and checks the header: magic, checksum, version, cluster id,
    /// sector size against the disk, and that the disk holds the whole
    /// area. Never writes.
    pub fn open(disk: &dyn LeaseDisk, cluster_id: &str) -> Result<Header, LockspaceError> {
        let size = disk.size()?;
        let len = header_read_len(disk);
        if size < len as u64 {
            return Err(LockspaceError::Truncated { size, needed: len as u64 });
        }
        let mut buf = vec![0u8; len];
        disk.read_at(0, &mut buf)?;
        let header = Header::decode(&buf).map_err(LockspaceError::BadHeader)?;
        if header.cluster_id != cluster_id {
            return Err(LockspaceError::WrongCluster { found: header.cluster_id, expected: cluster_id.to_string() });
        }
        if header.sector_size as usize % disk.alignment() != 0 {
            return Err(LockspaceError::SectorSize { sector_size: header.sector_size, alignment: disk.alignment() });
        }
        let needed = header.layout().area_len();
        if size < needed {
            return Err(LockspaceError::Truncated { size, needed });
        }
        Ok(header)
    }

    /// Reads the whole area (after `open`'s checks). Undecodable records are
    /// reported in the dump rather than failing it.
    pub fn dump(disk: &dyn LeaseDisk, cluster_id: &str) -> Result<AreaDump, LockspaceError> {
        let header = Self::open(disk, cluster_id)?;
        let layout = header.layout();
        let s = header.sector_size as usize;
        let mut hosts_buf = vec![0u8; layout.host_slots as usize * s];
        disk.read_at(layout.delta_offset(1), &mut hosts_buf)?;
        let hosts = (1..=layout.host_slots)
            .map(|h| {
                let b = &hosts_buf[(h as usize - 1) * s..h as usize * s];
                let record = DeltaRecord::decode(b).map_err(|e| e.to_string()).and_then(|r| {
                    if r.area_id != header.area_id || r.host_id != h {
                        Err(format!("record of area {:#x} host {} (stale or misplaced)", r.area_id, r.host_id))
                    } else {
                        Ok(r)
                    }
                });
                HostSlotDump { host_id: h, record }
            })
            .collect();
        let resources =
            (0..layout.resource_slots).map(|slot| read_resource(disk, &header, slot)).collect::<Result<_, _>>()?;
        Ok(AreaDump { header, hosts, resources })
    }

    /// Finds the slot bound to `name` (home slot, then linear probing until
    /// an unclaimed slot). `None` if no slot is bound to it yet.
    pub fn inspect(disk: &dyn LeaseDisk, cluster_id: &str, name: &str) -> Result<Option<ResourceDump>, LockspaceError> {
        check_name(name).map_err(LockspaceError::BadParams)?;
        let header = Self::open(disk, cluster_id)?;
        let layout: Layout = header.layout();
        let home = layout.home_slot(name);
        for i in 0..layout.resource_slots {
            let slot = (home + i) % layout.resource_slots;
            let r = read_resource(disk, &header, slot)?;
            match &r.leader {
                Ok(l) if l.state == LeaderState::Unclaimed && r.max_ballot_lver == 0 => return Ok(None),
                Ok(l) if l.state != LeaderState::Unclaimed && l.value.name != name => continue,
                Ok(l) if l.state == LeaderState::Unclaimed => continue,
                _ => return Ok(Some(r)),
            }
        }
        Ok(None)
    }
}

fn read_resource(disk: &dyn LeaseDisk, header: &Header, slot: u32) -> Result<ResourceDump, LockspaceError> {
    let layout = header.layout();
    let s = header.sector_size as usize;
    let mut buf = vec![0u8; layout.resource_len() as usize];
    disk.read_at(layout.leader_offset(slot), &mut buf)?;
    let leader = LeaderRecord::decode(&buf[..s]).map_err(|e| e.to_string()).and_then(|l| {
        if l.area_id != header.area_id || l.slot != slot {
            Err(format!("record of area {:#x} slot {} (stale or misplaced)", l.area_id, l.slot))
        } else {
            Ok(l)
        }
    });
    let mut max_ballot_lver = 0;
    let mut bad_ballots = Vec::new();
    for h in 1..=layout.host_slots {
        match BallotRecord::decode(&buf[h as usize * s..(h as usize + 1) * s]) {
            Ok(b) if b.area_id == header.area_id && b.slot == slot && b.host_id == h => {
                max_ballot_lver = max_ballot_lver.max(b.lver)
            }
            Ok(b) => {
                bad_ballots.push((h, format!("record of area {:#x} slot {} host {}", b.area_id, b.slot, b.host_id)))
            }
            Err(e) => bad_ballots.push((h, e.to_string())),
        }
    }
    let values = &buf[(1 + layout.host_slots as usize) * s..];
    let (value, bad_values) = match read_value_copies(header, slot, values) {
        Ok(c) => (Ok(c.newest), c.bad.into_iter().map(|(i, e)| (i, e.to_string())).collect()),
        Err(e) => (
            Err(format!("no readable copy: {e}")),
            (0..VALUE_COPIES)
                .filter_map(|i| {
                    let b = &values[i as usize * s..(i as usize + 1) * s];
                    ValueRecord::decode(b).err().map(|e| (i, e.to_string()))
                })
                .collect(),
        ),
    };
    Ok(ResourceDump { slot, leader, max_ballot_lver, bad_ballots, value, bad_values })
}
