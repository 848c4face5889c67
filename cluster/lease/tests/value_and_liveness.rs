//! Value blocks and liveness observation through the blocking `HostLease`
//! API, several hosts sharing one area (R = 100 ms, so K = 350 ms and
//! T = 650 ms): values round-trip and survive a holder's crash, a stale
//! holder cannot overwrite a newer holder's value, corrupted copies are
//! refused; a host that stops renewing turns dead only after T.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tandem_lease::engine::OpError;
use tandem_lease::format::{FormatError, MAX_VALUE_LEN};
use tandem_lease::{
    AreaParams, FileDisk, HostLease, LeaseDisk, LeaseError, Liveness, Lockspace, MemDisk, Timeouts, monotonic_now,
};

const CLUSTER: &str = "test";

fn params() -> AreaParams {
    AreaParams {
        host_slots: 3,
        resource_slots: 4,
        timeouts: Timeouts::from_renewal_ms(100),
        ..AreaParams::new(CLUSTER)
    }
}

fn file_area() -> (tempfile::TempDir, Arc<dyn LeaseDisk>) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("lease.img");
    std::fs::File::create(&path).unwrap();
    let disk = FileDisk::open(&path).unwrap();
    Lockspace::init(&disk, &params(), false).unwrap();
    (dir, Arc::new(disk))
}

fn mem_area() -> (Arc<MemDisk>, Arc<dyn LeaseDisk>) {
    let disk = Arc::new(MemDisk::new(0, 512));
    Lockspace::init(&*disk, &params(), false).unwrap();
    (disk.clone(), disk)
}

/// A joined host with a renewal thread (stopped on drop).
struct Running {
    lease: Arc<HostLease>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Running {
    fn join(disk: &Arc<dyn LeaseDisk>, id: u32) -> Running {
        let lease = Arc::new(HostLease::join(disk.clone(), CLUSTER, id).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (lease.clone(), stop.clone());
        let thread = Some(thread::spawn(move || {
            let _ = l.renewal_loop(&s, |_| {});
        }));
        Running { lease, stop, thread }
    }

    /// Stops renewing, as if the host crashed or froze.
    fn stop_renewing(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_renewing();
    }
}

fn inspect_value(disk: &Arc<dyn LeaseDisk>, name: &str) -> Option<Vec<u8>> {
    let dump = Lockspace::inspect(&**disk, CLUSTER, name).unwrap().expect("bound slot");
    dump.value.expect("readable value").map(|v| v.data)
}

#[test]
fn value_round_trips_through_set_release_and_acquire() {
    let (_dir, disk) = file_area();
    let a = Running::join(&disk, 1);
    let b = Running::join(&disk, 2);
    let first = a.lease.acquire_with_value("db", None).unwrap();
    assert_eq!((first.value.clone(), first.value_token), (None, None), "never written");
    a.lease.set_value("db", b"one").unwrap();
    assert_eq!(inspect_value(&disk, "db").as_deref(), Some(&b"one"[..]), "a non-holder reads it");
    let big = vec![0x5a; MAX_VALUE_LEN];
    a.lease.set_value("db", &big).unwrap();
    let err = a.lease.set_value("db", &vec![0; MAX_VALUE_LEN + 1]).unwrap_err();
    assert!(matches!(err, LeaseError::Op(OpError::BadValue(_))), "{err}");
    assert_eq!(inspect_value(&disk, "db"), Some(big), "a refused value changes nothing");
    a.lease.release_with_value("db", b"two").unwrap();
    assert_eq!(a.lease.holds("db"), None);
    // Only a holder writes.
    let err = a.lease.set_value("db", b"x").unwrap_err();
    assert!(matches!(err, LeaseError::Op(OpError::NotHeld { .. })), "{err}");
    let second = b.lease.acquire_with_value("db", None).unwrap();
    assert!(second.token > first.token);
    assert_eq!(second.value.as_deref(), Some(&b"two"[..]));
    assert_eq!(second.value_token, Some(first.token), "written under the first holder's token");
    // An empty value is a value, not "never written"; a plain release keeps it.
    b.lease.set_value("db", b"").unwrap();
    b.lease.release("db").unwrap();
    let third = a.lease.acquire_with_value("db", None).unwrap();
    assert_eq!(third.value, Some(Vec::new()));
    // Values belong to their resource.
    assert_eq!(a.lease.acquire_with_value("other", None).unwrap().value, None);
}

#[test]
fn value_of_a_crashed_holder_is_carried_over() {
    let (_dir, disk) = file_area();
    let mut a = Running::join(&disk, 1);
    let b = Running::join(&disk, 2);
    let t1 = a.lease.acquire("vm", None).unwrap();
    a.lease.set_value("vm", b"state-1").unwrap();
    a.lease.set_value("vm", b"state-2").unwrap();
    a.stop_renewing(); // crash: never releases
    let got = b.lease.acquire_with_value("vm", Some(Duration::from_secs(10))).unwrap();
    assert!(got.token > t1);
    assert_eq!(got.value.as_deref(), Some(&b"state-2"[..]), "the last value the crashed holder wrote");
    assert_eq!(got.value_token, Some(t1));
}

#[test]
fn stale_holder_cannot_overwrite_a_newer_holders_value() {
    let (_dir, disk) = file_area();
    let mut a = Running::join(&disk, 1);
    let b = Running::join(&disk, 2);
    a.lease.acquire("db", None).unwrap();
    a.lease.set_value("db", b"old").unwrap();
    a.stop_renewing(); // a stalls; b takes over after T
    let got = b.lease.acquire_with_value("db", Some(Duration::from_secs(10))).unwrap();
    assert_eq!(got.value.as_deref(), Some(&b"old"[..]));
    b.lease.set_value("db", b"new").unwrap();
    // a "resumes" and tries to write under its old lease.
    let err = a.lease.set_value("db", b"stale").unwrap_err();
    assert!(err.is_lost(), "{err}");
    let err = a.lease.release_with_value("db", b"stale").unwrap_err();
    assert!(err.is_lost() || matches!(err, LeaseError::Op(OpError::NotHeld { .. })), "{err}");
    assert_eq!(inspect_value(&disk, "db").as_deref(), Some(&b"new"[..]));
    let seen = b.lease.observe_resource("db").unwrap();
    assert_eq!(seen.value_bytes(), Some(&b"new"[..]));
    assert_eq!(seen.holder.as_ref().map(|h| (h.host_id, h.token)), Some((2, got.token)));
}

#[test]
fn corrupted_value_copies_are_refused() {
    let (mem, disk) = mem_area();
    let a = HostLease::join(disk.clone(), CLUSTER, 1).unwrap();
    a.acquire("db", None).unwrap();
    a.set_value("db", b"v1").unwrap();
    a.set_value("db", b"v2").unwrap();
    let header = Lockspace::open(&*disk, CLUSTER).unwrap();
    let layout = header.layout();
    let slot = Lockspace::inspect(&*disk, CLUSTER, "db").unwrap().unwrap().slot;
    // Writes alternate copies: v1 went to copy 1, v2 to copy 0. Flip one bit of v2's copy.
    let flip = |copy: u32| {
        let off = layout.value_offset(slot, copy) + 100;
        let b = mem.snapshot()[off as usize];
        mem.poke(off, &[b ^ 0x04]);
    };
    flip(0);
    let dump = Lockspace::inspect(&*disk, CLUSTER, "db").unwrap().unwrap();
    assert_eq!(dump.value_bytes(), Some(&b"v1"[..]), "the damaged copy is refused, the other one read");
    assert_eq!(dump.bad_values.len(), 1);
    assert!(dump.bad_values[0].1.contains("checksum"), "{:?}", dump.bad_values);
    // The holder's next write replaces the damaged copy and keeps the good one.
    a.set_value("db", b"v3").unwrap();
    let dump = Lockspace::inspect(&*disk, CLUSTER, "db").unwrap().unwrap();
    assert_eq!((dump.value_bytes(), dump.bad_values.len()), (Some(&b"v3"[..]), 0));
    // Both copies damaged: nothing is mistaken for a value or for "never written".
    flip(0);
    flip(1);
    let dump = Lockspace::inspect(&*disk, CLUSTER, "db").unwrap().unwrap();
    let err = dump.value.unwrap_err();
    assert!(err.contains("checksum"), "{err}");
    a.release("db").unwrap();
    let b = HostLease::join(disk.clone(), CLUSTER, 2).unwrap();
    let err = b.acquire_with_value("db", None).unwrap_err();
    match &err {
        LeaseError::Op(OpError::Corrupt { what, source: FormatError::Checksum { .. } }) => {
            assert!(what.contains("value block"), "{err}")
        }
        other => panic!("expected a corrupt value block, got {other}"),
    }
}

#[test]
fn a_host_that_stops_renewing_turns_dead_only_after_t() {
    let (_mem, disk) = mem_area();
    let mut a = Running::join(&disk, 1);
    let b = Running::join(&disk, 2);
    let c = Running::join(&disk, 3);
    let t = b.lease.timeouts().host_dead_ms;
    a.lease.acquire("db", None).unwrap();
    // Everyone alive while renewing; watched for well over T.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(t + 300) {
        for o in b.lease.observe_hosts().unwrap() {
            assert_eq!(o.liveness, Liveness::Alive, "{o:?}");
        }
        thread::sleep(Duration::from_millis(25));
    }
    let held = b.lease.observe_resource("db").unwrap().holder.unwrap();
    assert_eq!((held.host_id, held.liveness, held.is_dead()), (1, Liveness::Alive, false));

    a.stop_renewing();
    let stopped = monotonic_now();
    // Start of a's last renewal write: valid_until = w + K.
    let w = a.lease.valid_until().expect("not yet lost") - a.lease.timeouts().fence_ms;
    // b polls; c looks only once late (its own observation starts then).
    let dead_seen = loop {
        let now = monotonic_now();
        let obs = b.lease.observe_hosts().unwrap();
        let o1 = obs.iter().find(|o| o.host_id == 1).unwrap();
        assert!(obs.iter().filter(|o| o.host_id != 1).all(|o| o.liveness == Liveness::Alive), "{obs:?}");
        if o1.liveness == Liveness::Dead {
            break now;
        }
        // Never dead before T after the last change could have happened.
        assert!(o1.dead_at >= o1.last_change + t);
        assert!(now.since(stopped) < 5_000, "not dead after 5 s: {o1:?}");
        thread::sleep(Duration::from_millis(20));
    };
    // b counts T from its first read of a's final content, which landed after w.
    assert!(dead_seen.since(w) >= t, "dead {} ms after a's last renewal, T = {t}", dead_seen.since(w));
    let held = b.lease.observe_resource("db").unwrap().holder.unwrap();
    assert_eq!((held.host_id, held.liveness, held.is_dead()), (1, Liveness::Dead, true));
    // c starts watching now: a has not changed since, but c has not seen it unchanged for T.
    let first = c.lease.observe_hosts().unwrap();
    assert_eq!(first[0].liveness, Liveness::Alive, "{first:?}");
    let c_start = monotonic_now();
    let c_dead = loop {
        let o = c.lease.observe_hosts().unwrap().remove(0);
        if o.liveness == Liveness::Dead {
            break monotonic_now();
        }
        assert!(monotonic_now().since(c_start) < 5_000);
        thread::sleep(Duration::from_millis(20));
    };
    assert!(c_dead.since(c_start) >= t, "c judged a dead after {} ms < T", c_dead.since(c_start));
    // Acquisition shares b's observations: no second wait of T.
    let taken = Instant::now();
    b.lease.acquire("db", None).unwrap();
    assert!(taken.elapsed() < Duration::from_millis(t), "{:?}", taken.elapsed());
}

#[test]
fn left_host_is_free_and_unbound_resources_have_no_holder() {
    let (_mem, disk) = mem_area();
    let b = Running::join(&disk, 2);
    let a = HostLease::join(disk.clone(), CLUSTER, 1).unwrap();
    a.acquire("db", None).unwrap();
    a.leave().unwrap();
    let obs = b.lease.observe_hosts().unwrap();
    assert_eq!(obs.iter().map(|o| o.liveness).collect::<Vec<_>>(), [Liveness::Free, Liveness::Alive, Liveness::Free]);
    // The holder left without releasing: its lease is over at once.
    let seen = b.lease.observe_resource("db").unwrap();
    assert!(seen.holder.unwrap().is_dead());
    let none = b.lease.observe_resource("nothing").unwrap();
    assert!(none.holder.is_none() && none.last_token.is_none() && none.value_bytes().is_none());
}

#[test]
fn a_version_1_area_is_refused_naming_both_versions() {
    let (mem, disk) = mem_area();
    let mut block = mem.snapshot()[..512].to_vec();
    block[12..16].copy_from_slice(&1u32.to_le_bytes());
    let mut crc_input = block.clone();
    crc_input[8..12].fill(0);
    let crc = crc32c::crc32c(&crc_input);
    block[8..12].copy_from_slice(&crc.to_le_bytes());
    mem.poke(0, &block);
    let err = Lockspace::open(&*disk, CLUSTER).unwrap_err();
    let mut text = err.to_string();
    let mut src = std::error::Error::source(&err);
    while let Some(e) = src {
        text.push_str(&format!(": {e}"));
        src = e.source();
    }
    assert!(text.contains("version 1") && text.contains("version 2"), "{text}");
    assert!(HostLease::join(disk.clone(), CLUSTER, 1).is_err());
}
