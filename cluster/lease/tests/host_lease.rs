//! The blocking `HostLease` API on a real file (O_DIRECT) with fast
//! timeouts (R = 100 ms, so T = 650 ms): acquire/busy/release, takeover
//! after a holder stops renewing, a stopped holder learning it lost its
//! lease, host-id protection, name-to-slot mapping.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tandem_lease::engine::OpError;
use tandem_lease::{AreaParams, FileDisk, HostLease, LeaseDisk, LeaseError, Lockspace, Timeouts, Token, monotonic_now};

const CLUSTER: &str = "test";

fn area(resource_slots: u32) -> (tempfile::TempDir, Arc<dyn LeaseDisk>) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("lease.img");
    std::fs::File::create(&path).unwrap();
    let disk = FileDisk::open(&path).unwrap();
    let params = AreaParams {
        host_slots: 4,
        resource_slots,
        timeouts: Timeouts::from_renewal_ms(100),
        ..AreaParams::new(CLUSTER)
    };
    Lockspace::init(&disk, &params, false).unwrap();
    (dir, Arc::new(disk))
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

    /// Stops renewing, as if the agent died or froze.
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

#[test]
fn acquire_busy_release_and_tokens_increase() {
    let (_dir, disk) = area(8);
    let a = Running::join(&disk, 1);
    let b = Running::join(&disk, 2);
    let t1 = a.lease.acquire("db", None).unwrap();
    assert_eq!(a.lease.holds("db"), Some(t1));
    let err = b.lease.acquire("db", None).unwrap_err();
    assert!(err.is_busy(), "{err}");
    assert!(matches!(a.lease.acquire("db", None), Err(LeaseError::Op(OpError::AlreadyHeld { .. }))));
    a.lease.release("db").unwrap();
    assert_eq!(a.lease.holds("db"), None);
    let t2 = b.lease.acquire("db", None).unwrap();
    assert!(t2 > t1, "{t2} > {t1}");
    b.lease.release("db").unwrap();
    let t3 = a.lease.acquire("db", Some(Duration::from_secs(2))).unwrap();
    assert!(t3 > t2);
    let found = Lockspace::inspect(&*disk, CLUSTER, "db").unwrap().expect("bound slot");
    assert_eq!(found.holder(), Some((1, t3)));
    assert_eq!(found.name(), Some("db"));
    assert!(Lockspace::inspect(&*disk, CLUSTER, "nothing").unwrap().is_none());
}

#[test]
fn takeover_after_the_holder_stops_renewing_and_the_holder_learns_it_first() {
    let (_dir, disk) = area(8);
    let mut a = Running::join(&disk, 1);
    let b = Running::join(&disk, 2);
    let t1 = a.lease.acquire("vm", None).unwrap();
    let timeouts = a.lease.timeouts();
    a.stop_renewing();
    let stopped = Instant::now();
    let t2 = b.lease.acquire("vm", Some(Duration::from_secs(10))).unwrap();
    let took = stopped.elapsed();
    assert!(t2 > t1);
    // Not before host-dead time T (minus the renewal interval already elapsed), generous upper bound.
    assert!(took >= Duration::from_millis(timeouts.host_dead_ms - timeouts.renewal_ms), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The stopped holder, "resuming", learns from its own clock that it lost everything.
    let now = monotonic_now();
    assert!(!a.lease.is_valid(now));
    assert!(a.lease.valid_until().is_none_or(|u| u <= now));
    assert_eq!(a.lease.holds("vm"), None);
    let err = a.lease.renew().unwrap_err();
    assert!(err.is_lost(), "{err}");
    assert!(a.lease.acquire("other", None).unwrap_err().is_lost());
}

#[test]
fn wait_timeout_is_distinguished_from_busy() {
    let (_dir, disk) = area(8);
    let a = Running::join(&disk, 1);
    let b = Running::join(&disk, 2);
    a.lease.acquire("db", None).unwrap();
    let start = Instant::now();
    let err = b.lease.acquire("db", Some(Duration::from_millis(300))).unwrap_err();
    assert!(err.is_wait_timeout(), "{err}");
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn a_live_host_id_cannot_be_joined_twice() {
    let (_dir, disk) = area(8);
    let _a = Running::join(&disk, 3);
    let err = HostLease::join(disk.clone(), CLUSTER, 3).unwrap_err();
    assert!(matches!(err, LeaseError::Op(OpError::HostIdInUse { host_id: 3 })), "{err}");
    let err = HostLease::join(disk.clone(), CLUSTER, 9).unwrap_err();
    assert!(matches!(err, LeaseError::Op(OpError::BadHostId { .. })), "{err}");
}

#[test]
fn dead_host_id_is_rejoined_with_a_new_generation_and_its_leases_freed() {
    let (_dir, disk) = area(8);
    let mut a = Running::join(&disk, 1);
    let gen1 = a.lease.generation().unwrap();
    let t1 = a.lease.acquire("db", None).unwrap();
    a.stop_renewing();
    // The same host id rejoins (watching the slot for T first).
    let a2 = Running::join(&disk, 1);
    assert!(a2.lease.generation().unwrap() > gen1);
    // The old generation's lease is free to the new incarnation at once.
    let t2 = a2.lease.acquire("db", None).unwrap();
    assert!(t2 > t1);
}

#[test]
fn leave_frees_the_host_id_and_its_leases() {
    let (_dir, disk) = area(8);
    let b = Running::join(&disk, 2);
    // Joined without a renewal thread: acquire and leave well inside the fence deadline.
    let a = HostLease::join(disk.clone(), CLUSTER, 1).unwrap();
    a.acquire("db", None).unwrap();
    a.leave().unwrap();
    // No wait for host-dead time: the slot says the owner left.
    let start = Instant::now();
    b.lease.acquire("db", None).unwrap();
    let _again = HostLease::join(disk.clone(), CLUSTER, 1).unwrap();
    assert!(start.elapsed() < Duration::from_millis(650), "{:?}", start.elapsed());
}

#[test]
fn names_map_to_distinct_slots_until_the_area_is_full() {
    let (_dir, disk) = area(3);
    let a = Running::join(&disk, 1);
    let tokens: Vec<Token> = ["a", "b", "c"].iter().map(|n| a.lease.acquire(n, None).unwrap()).collect();
    assert!(tokens.iter().all(|t| t.0 == 1));
    let mut slots: Vec<u32> =
        ["a", "b", "c"].iter().map(|n| Lockspace::inspect(&*disk, CLUSTER, n).unwrap().unwrap().slot).collect();
    slots.sort();
    assert_eq!(slots, vec![0, 1, 2]);
    let err = a.lease.acquire("d", None).unwrap_err();
    assert!(matches!(err, LeaseError::Op(OpError::NoFreeSlot { .. })), "{err}");
    let dump = Lockspace::dump(&*disk, CLUSTER).unwrap();
    let mut names: Vec<_> = dump.resources.iter().filter_map(|r| r.name().map(str::to_string)).collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);
}
