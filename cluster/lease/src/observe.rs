//! Reading many resource leases cheaply: [`ResourceReader`].
//!
//! [`HostLease::observe_resource_with`] finds a name's slot by probing and opens the area for
//! every call: two reads and a header decode per lease, a full decode of every ballot block.
//! An observer of a thousand leases every few hundred milliseconds spends most of a core on
//! that. The reader remembers which slot each name is bound to (a binding never changes while
//! the area exists: released slots keep their name), reads adjacent slots in one large read,
//! and decodes only what an observation needs (leader record and value copies; the ballot
//! blocks are only needed by an acquisition, which reads them itself).
//!
//! It judges exactly like `observe_resource_with` (the same function builds the answer). A
//! slot whose leader no longer names the expected resource (an area re-initialised under a
//! running agent) is forgotten and found again by probing.

use std::collections::HashMap;

use crate::engine::{HostObservation, OpError, Token, read_value_copies};
use crate::format::{Header, LeaderRecord, LeaderState};
use crate::host::{HostLease, LeaseError, ObservedValue, ResourceObservation, observation_from_dump};
use crate::lockspace::Lockspace;

/// Largest single read: adjacent slots beyond it are read in the next one (bounds the
/// buffer and the time one read can block).
const MAX_READ_BYTES: u64 = 1 << 20;

/// The error of a failed read of resource `name`'s slot.
fn read_failed(name: &str, e: &crate::DiskError) -> LeaseError {
    LeaseError::Op(OpError::Io { what: format!("resource {name:?}"), detail: format!("read failed: {e}") })
}

/// Reads many resource leases in few large reads (see the module documentation).
#[derive(Debug)]
pub struct ResourceReader {
    header: Header,
    /// Slot bound to each name found so far.
    slots: HashMap<String, u32>,
    /// Bytes read by the last [`ResourceReader::observe`] (for budgets and tests).
    last_bytes: u64,
    /// Disk reads issued by the last [`ResourceReader::observe`].
    last_reads: u64,
}

impl ResourceReader {
    /// A reader for `lease`'s area (its header as the lease read it at join).
    pub fn new(lease: &HostLease) -> ResourceReader {
        ResourceReader { header: lease.header(), slots: HashMap::new(), last_bytes: 0, last_reads: 0 }
    }

    /// Bytes one resource costs to read: its whole slot (leader, ballots, value copies).
    pub fn slot_len(&self) -> u64 {
        self.header.layout().resource_len()
    }

    /// Bytes read by the last [`ResourceReader::observe`].
    pub fn last_bytes(&self) -> u64 {
        self.last_bytes
    }

    /// Disk reads issued by the last [`ResourceReader::observe`].
    pub fn last_reads(&self) -> u64 {
        self.last_reads
    }

    /// Observes every resource of `names`, judging holders by `hosts` (this round's
    /// [`HostLease::observe_hosts`]). One answer per name, in order. A name not bound to a
    /// slot yet is looked up by probing (and then remembered once bound).
    pub fn observe(
        &mut self,
        lease: &HostLease,
        names: &[&str],
        hosts: &[HostObservation],
    ) -> Vec<Result<ResourceObservation, LeaseError>> {
        self.last_bytes = 0;
        self.last_reads = 0;
        let mut out: Vec<Option<Result<ResourceObservation, LeaseError>>> = names.iter().map(|_| None).collect();
        let mut known: Vec<(u32, usize)> =
            names.iter().enumerate().filter_map(|(i, n)| self.slots.get(*n).map(|s| (*s, i))).collect();
        known.sort_unstable();
        let slot_len = self.slot_len();
        let mut k = 0;
        while k < known.len() {
            // A run of adjacent slots, read at once.
            let mut end = k + 1;
            while end < known.len()
                && known[end].0 == known[end - 1].0 + 1
                && (known[end].0 - known[k].0 + 1) as u64 * slot_len <= MAX_READ_BYTES
            {
                end += 1;
            }
            let first = known[k].0;
            let count = known[end - 1].0 - first + 1;
            let mut buf = vec![0u8; (count as u64 * slot_len) as usize];
            self.last_reads += 1;
            self.last_bytes += buf.len() as u64;
            match lease.disk().read_at(self.header.layout().leader_offset(first), &mut buf) {
                Ok(()) => {
                    for &(slot, i) in &known[k..end] {
                        let at = ((slot - first) as u64 * slot_len) as usize;
                        let bytes = &buf[at..at + slot_len as usize];
                        out[i] = self.decode(names[i], slot, bytes, hosts);
                    }
                }
                Err(e) if end - k == 1 => {
                    let i = known[k].1;
                    out[i] = Some(Err(read_failed(names[i], &e)));
                }
                Err(_) => {
                    // One bad sector must not blind the observer to every lease of the run:
                    // read them one by one (a failure then names only its own lease).
                    for &(slot, i) in &known[k..end] {
                        let mut one = vec![0u8; slot_len as usize];
                        self.last_reads += 1;
                        self.last_bytes += slot_len;
                        out[i] = match lease.disk().read_at(self.header.layout().leader_offset(slot), &mut one) {
                            Ok(()) => self.decode(names[i], slot, &one, hosts),
                            Err(e) => Some(Err(read_failed(names[i], &e))),
                        };
                    }
                }
            }
            k = end;
        }
        // Unknown names, and slots that turned out to be bound to something else: probe.
        for (i, slot) in out.iter_mut().enumerate() {
            if slot.is_none() {
                *slot = Some(self.probe(lease, names[i], hosts));
            }
        }
        out.into_iter().map(|o| o.expect("every name answered")).collect()
    }

    /// Decodes one slot read in a batch; `None` when it is not (or no longer) bound to
    /// `name`, so that it is probed instead.
    fn decode(
        &mut self,
        name: &str,
        slot: u32,
        bytes: &[u8],
        hosts: &[HostObservation],
    ) -> Option<Result<ResourceObservation, LeaseError>> {
        let s = self.header.sector_size as usize;
        let leader = match LeaderRecord::decode(&bytes[..s]) {
            Ok(l) if l.area_id == self.header.area_id && l.slot == slot => l,
            Ok(_) => {
                // Another area's record: the area was re-initialised. Find the name again.
                self.slots.remove(name);
                return None;
            }
            Err(e) => {
                // A torn leader record (an acquisition in progress repairs it): like
                // `observe_resource_with`, an error this round, the binding kept.
                return Some(Err(LeaseError::Op(OpError::Io {
                    what: format!("leader record of resource {name:?}"),
                    detail: format!("unreadable ({e}); an acquisition in progress repairs it, observe again"),
                })));
            }
        };
        if leader.state == LeaderState::Unclaimed || leader.value.name != name {
            self.slots.remove(name);
            return None;
        }
        let values = &bytes[(1 + self.header.host_slots as usize) * s..];
        let value = match read_value_copies(&self.header, slot, values) {
            Ok(c) => {
                Ok(c.newest.map(|r| ObservedValue { data: r.data, token: Token(r.lver), writer: r.owner, seq: r.seq }))
            }
            Err(e) => Err(format!("no readable copy: {e}")),
        };
        Some(Ok(crate::host::resource_observation(name, &leader, value, hosts)))
    }

    /// Finds `name`'s slot by probing (as `observe_resource_with` does), remembering it once bound.
    fn probe(
        &mut self,
        lease: &HostLease,
        name: &str,
        hosts: &[HostObservation],
    ) -> Result<ResourceObservation, LeaseError> {
        let dump = Lockspace::inspect(lease.disk(), &self.header.cluster_id, name)?;
        self.last_reads += 1;
        self.last_bytes += self.slot_len();
        if let Some(d) = &dump
            && let Ok(l) = &d.leader
            && l.state != LeaderState::Unclaimed
            && l.value.name == name
        {
            self.slots.insert(name.to_string(), d.slot);
        }
        observation_from_dump(name, dump.as_ref(), hosts)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::disk::MemDisk;
    use crate::lockspace::AreaParams;
    use crate::{LeaseDisk, Timeouts};

    fn area(slots: u32) -> Arc<dyn LeaseDisk> {
        let mut p = AreaParams::new("c");
        p.resource_slots = slots;
        p.host_slots = 4;
        p.timeouts = Timeouts::from_renewal_ms(100);
        let disk: Arc<dyn LeaseDisk> = Arc::new(MemDisk::new(0, 512));
        Lockspace::init(&*disk, &p, false).unwrap();
        disk
    }

    /// The batched reader answers exactly what one `observe_resource_with` per name answers,
    /// for held, released, valued and never-acquired leases, in few reads once bound.
    #[test]
    fn batched_answers_equal_single_reads() {
        let disk = area(64);
        let a = HostLease::join(disk.clone(), "c", 1).unwrap();
        let b = HostLease::join(disk.clone(), "c", 2).unwrap();
        let names: Vec<String> = (0..40).map(|i| format!("g{i}")).collect();
        for (i, n) in names.iter().enumerate() {
            match i % 4 {
                0 => {
                    a.acquire(n, None).unwrap();
                }
                1 => {
                    b.acquire(n, None).unwrap();
                    b.set_value(n, format!("note {i}").as_bytes()).unwrap();
                }
                2 => {
                    a.acquire(n, None).unwrap();
                    a.set_value(n, b"x").unwrap();
                    a.release(n).unwrap();
                }
                _ => {} // never acquired
            }
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let hosts = a.observe_hosts().unwrap();
        let mut reader = ResourceReader::new(&a);
        for round in 0..2 {
            let batch = reader.observe(&a, &refs, &hosts);
            for (n, got) in refs.iter().zip(&batch) {
                let single = a.observe_resource_with(n, &hosts).unwrap();
                assert_eq!(got.as_ref().unwrap(), &single, "{n} in round {round}");
            }
            if round == 1 {
                // 30 bound slots: a few runs of adjacent slots, not one read each; the 10
                // never-acquired names are probed every round.
                assert!(reader.last_reads() < 30, "{} reads", reader.last_reads());
            }
        }
        // A change is seen by the next batch.
        b.release("g1").unwrap();
        let again = reader.observe(&a, &["g1"], &a.observe_hosts().unwrap());
        assert!(again[0].as_ref().unwrap().holder.is_none());
    }

    /// A disk that fails every read covering one offset (a bad sector), once armed.
    #[derive(Debug)]
    struct BadSector {
        inner: MemDisk,
        bad: std::sync::atomic::AtomicU64,
    }

    impl LeaseDisk for BadSector {
        fn alignment(&self) -> usize {
            self.inner.alignment()
        }
        fn size(&self) -> Result<u64, crate::DiskError> {
            self.inner.size()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), crate::DiskError> {
            let bad = self.bad.load(std::sync::atomic::Ordering::SeqCst);
            if bad != 0 && (offset..offset + buf.len() as u64).contains(&bad) {
                return Err(crate::DiskError::Io {
                    op: "read",
                    offset,
                    len: buf.len(),
                    source: std::io::Error::from_raw_os_error(5),
                });
            }
            self.inner.read_at(offset, buf)
        }
        fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), crate::DiskError> {
            self.inner.write_at(offset, data)
        }
        fn io_mode(&self) -> crate::IoMode {
            self.inner.io_mode()
        }
    }

    /// A bad sector in one lease fails only that lease, not every lease read with it.
    #[test]
    fn a_bad_sector_fails_only_its_own_lease() {
        let mut p = AreaParams::new("c");
        p.resource_slots = 16;
        p.host_slots = 4;
        p.timeouts = Timeouts::from_renewal_ms(100);
        let disk = Arc::new(BadSector { inner: MemDisk::new(0, 512), bad: 0.into() });
        Lockspace::init(&*disk, &p, false).unwrap();
        let a = HostLease::join(disk.clone(), "c", 1).unwrap();
        let names: Vec<String> = (0..8).map(|i| format!("r{i}")).collect();
        for n in &names {
            a.acquire(n, None).unwrap();
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let hosts = a.observe_hosts().unwrap();
        let mut reader = ResourceReader::new(&a);
        assert!(reader.observe(&a, &refs, &hosts).iter().all(Result::is_ok));
        let victim = reader.slots["r3"];
        disk.bad.store(reader.header.layout().value_offset(victim, 0), std::sync::atomic::Ordering::SeqCst);
        let seen = reader.observe(&a, &refs, &hosts);
        for (n, r) in refs.iter().zip(&seen) {
            assert_eq!(r.is_err(), *n == "r3", "{n}: {r:?}");
        }
    }

    /// A binding that no longer holds (the area was re-initialised with other names) is
    /// dropped and the name found again by probing, never answered from the wrong slot.
    #[test]
    fn a_rebound_slot_is_probed_again() {
        let disk = area(8);
        let a = HostLease::join(disk.clone(), "c", 1).unwrap();
        a.acquire("r", None).unwrap();
        let hosts = a.observe_hosts().unwrap();
        let mut reader = ResourceReader::new(&a);
        assert!(reader.observe(&a, &["r"], &hosts)[0].as_ref().unwrap().holder.is_some());
        let slot = reader.slots["r"];
        // Overwrite r's leader with another name's, as a re-init plus acquisition would.
        let mut leader = LeaderRecord::decode(&{
            let mut b = vec![0u8; 512];
            disk.read_at(reader.header.layout().leader_offset(slot), &mut b).unwrap();
            b
        })
        .unwrap();
        leader.value.name = "other".into();
        disk.write_at(reader.header.layout().leader_offset(slot), &crate::format::to_sector(&leader.encode(), 512))
            .unwrap();
        let seen = reader.observe(&a, &["r"], &hosts);
        assert!(!reader.slots.contains_key("r") || reader.slots["r"] != slot);
        // Probing finds no slot bound to r any more (its home slot now names "other").
        assert_eq!(seen[0].as_ref().unwrap().holder, None);
    }
}
