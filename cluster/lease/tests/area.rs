//! Lease areas on real files: init/open round trips, O_DIRECT (or its
//! fallback), alignment, and refusal of corrupted, foreign, truncated or
//! mismatched areas without changing a byte.

use std::path::Path;
use std::sync::Arc;

use tandem_lease::format::{Header, RECORD_LEN};
use tandem_lease::{AreaParams, FileDisk, IoMode, LeaseDisk, Lockspace, LockspaceError, MemDisk, Timeouts};

fn params() -> AreaParams {
    AreaParams { host_slots: 4, resource_slots: 8, ..AreaParams::new("lab") }
}

fn file_crc(path: &Path) -> (u64, u32) {
    let b = std::fs::read(path).unwrap();
    (b.len() as u64, crc32c::crc32c(&b))
}

fn new_area(dir: &tempfile::TempDir) -> (std::path::PathBuf, FileDisk, Header) {
    let path = dir.path().join("lease.img");
    std::fs::File::create(&path).unwrap();
    let disk = FileDisk::open(&path).unwrap();
    let header = Lockspace::init(&disk, &params(), false).unwrap();
    (path, disk, header)
}

#[test]
fn init_open_round_trip_on_a_file_with_o_direct() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (path, disk, header) = new_area(&dir);
    // The target dir is on a regular filesystem (ext4/xfs) that supports O_DIRECT.
    assert_eq!(disk.io_mode(), IoMode::Direct, "expected O_DIRECT on {}", path.display());
    assert!(disk.alignment() == 512 || disk.alignment() == 4096);
    let opened = Lockspace::open(&FileDisk::open(&path).unwrap(), "lab").unwrap();
    assert_eq!(opened, header);
    assert_eq!(opened.timeouts, Timeouts::default());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), header.layout().area_len());
    let dump = Lockspace::dump(&disk, "lab").unwrap();
    assert_eq!(dump.hosts.len(), 4);
    assert!(dump.hosts.iter().all(|h| h.record.is_ok()));
    assert_eq!(dump.resources.len(), 8);
    assert!(dump.resources.iter().all(|r| r.leader.is_ok() && r.name().is_none() && r.bad_ballots.is_empty()));
}

#[test]
fn misaligned_io_is_refused() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (_path, disk, _) = new_area(&dir);
    let mut buf = vec![0u8; 512];
    let err = disk.read_at(100, &mut buf).unwrap_err();
    assert!(err.to_string().contains("not aligned"), "{err}");
    let err = disk.write_at(0, &[0u8; 100]).unwrap_err();
    assert!(err.to_string().contains("not aligned"), "{err}");
    let mem = MemDisk::new(8192, 4096);
    assert!(mem.read_at(512, &mut buf).is_err());
}

#[test]
fn init_refuses_an_initialised_area_without_force() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (path, disk, header) = new_area(&dir);
    let before = file_crc(&path);
    let err = Lockspace::init(&disk, &params(), false).unwrap_err();
    assert!(matches!(&err, LockspaceError::AlreadyInitialised { cluster_id } if cluster_id == "lab"), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(file_crc(&path), before);
    let again = Lockspace::init(&disk, &params(), true).unwrap();
    assert_ne!(again.area_id, header.area_id, "a forced init starts a new area");
}

#[test]
fn init_refuses_foreign_data_without_force() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("data.img");
    let mut data = vec![0u8; 64 * 1024];
    data[..16].copy_from_slice(b"SQLite format 3\0");
    std::fs::write(&path, &data).unwrap();
    let before = file_crc(&path);
    let disk = FileDisk::open(&path).unwrap();
    let err = Lockspace::init(&disk, &params(), false).unwrap_err();
    assert!(matches!(err, LockspaceError::NotEmpty { .. }), "{err}");
    assert_eq!(file_crc(&path), before);
}

/// Applies `damage` to an initialised area and checks that `open` fails
/// with `check`, leaving every byte as it was.
fn refused(damage: impl FnOnce(&Path), cluster: &str, check: impl FnOnce(&LockspaceError)) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (path, disk, _) = new_area(&dir);
    drop(disk);
    damage(&path);
    let before = file_crc(&path);
    let disk = FileDisk::open(&path).unwrap();
    let err = Lockspace::open(&disk, cluster).unwrap_err();
    check(&err);
    // Neither open nor a join attempt may repair or reinitialise anything.
    let join = tandem_lease::HostLease::join(Arc::new(disk), cluster, 1).unwrap_err();
    assert!(matches!(join, tandem_lease::LeaseError::Lockspace(_)), "{join}");
    assert_eq!(file_crc(&path), before, "the area was modified");
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, offset).unwrap();
}

#[test]
fn corrupted_header_is_refused_unchanged() {
    refused(
        |p| patch(p, 40, &[0xff]),
        "lab",
        |e| {
            assert!(matches!(e, LockspaceError::BadHeader(tandem_lease::FormatError::Checksum { .. })), "{e}");
            assert!(e.to_string().contains("nothing was changed"), "{e}");
        },
    );
}

#[test]
fn foreign_magic_is_refused_unchanged() {
    refused(
        |p| patch(p, 0, b"XFSB\0\0\0\0"),
        "lab",
        |e| assert!(matches!(e, LockspaceError::BadHeader(tandem_lease::FormatError::WrongMagic { .. })), "{e}"),
    );
}

#[test]
fn zeroed_header_is_refused_unchanged() {
    refused(|p| patch(p, 0, &[0u8; RECORD_LEN]), "lab", |e| assert!(matches!(e, LockspaceError::BadHeader(_)), "{e}"));
}

#[test]
fn wrong_cluster_id_is_refused_unchanged() {
    refused(
        |_| {},
        "other",
        |e| {
            assert!(
                matches!(e, LockspaceError::WrongCluster { found, expected } if found == "lab" && expected == "other"),
                "{e}"
            )
        },
    );
}

#[test]
fn truncated_file_is_refused_unchanged() {
    refused(
        |p| {
            let len = std::fs::metadata(p).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(len - 512).unwrap();
        },
        "lab",
        |e| assert!(matches!(e, LockspaceError::Truncated { .. }), "{e}"),
    );
}

#[test]
fn sector_size_not_matching_the_disk_is_refused() {
    // An area with 512-byte sectors on a medium with 4096-byte logical blocks.
    let small = MemDisk::new(0, 512);
    Lockspace::init(&small, &params(), false).unwrap();
    let big = MemDisk::new(0, 4096);
    big.poke(0, &small.snapshot());
    let before = big.snapshot();
    let err = Lockspace::open(&big, "lab").unwrap_err();
    assert!(matches!(err, LockspaceError::SectorSize { sector_size: 512, alignment: 4096 }), "{err}");
    assert_eq!(big.snapshot(), before);
    // init itself refuses a sector size the disk cannot address.
    let err = Lockspace::init(&MemDisk::new(0, 4096), &params(), false).unwrap_err();
    assert!(matches!(err, LockspaceError::SectorSize { .. }), "{err}");
    // 4096-byte sectors work there.
    let p4k = AreaParams { sector_size: 4096, ..params() };
    let fresh = MemDisk::new(0, 4096);
    let h = Lockspace::init(&fresh, &p4k, false).unwrap();
    assert_eq!(Lockspace::open(&fresh, "lab").unwrap(), h);
}

#[test]
fn invalid_params_are_refused() {
    let mem = MemDisk::new(0, 512);
    for bad in [
        AreaParams { sector_size: 1024, ..params() },
        AreaParams { host_slots: 0, ..params() },
        AreaParams { cluster_id: String::new(), ..params() },
        AreaParams { timeouts: Timeouts { host_dead_ms: 1000, ..Timeouts::default() }, ..params() },
    ] {
        let err = Lockspace::init(&mem, &bad, false).unwrap_err();
        assert!(matches!(err, LockspaceError::BadParams(_)), "{bad:?}: {err}");
    }
    assert_eq!(mem.snapshot().len(), 0, "nothing written for invalid parameters");
}
