//! The disk resource: directory mode (owner file, takeover detection, a hung
//! file system call bounded by the timeout) and device mode on a real loop
//! device with ext4 (fsck, mount, busy umount refused without lazy unmount).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{TestCgroup, ctx};
use tandem_config::{DiskResource as DiskConfig, ResourceKind};
use tandem_guest::resources::disk::OWNER_FILE;
use tandem_guest::resources::{Health, Resource, ResourceEnv, ResourceError, build};
use tandem_testkit::{ChildGuard, require_program, run_ok};

fn make(name: &str, c: DiskConfig, env: &ResourceEnv) -> Result<Box<dyn Resource>, ResourceError> {
    let spec = tandem_config::Resource { name: name.into(), depends_on: Vec::new(), kind: ResourceKind::Disk(c) };
    build("g1", &spec, env)
}

fn dir_cfg(dir: &Path) -> DiskConfig {
    DiskConfig { device: None, mountpoint: None, fstype: None, fsck: true, directory: Some(dir.to_path_buf()) }
}

#[tokio::test]
async fn directory_mode_writes_and_checks_the_owner_file() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("data"), "keep me").unwrap();
    let r = make("shared", dir_cfg(tmp.path()), &ResourceEnv::new("node-a")).unwrap();
    assert_eq!(r.check().await, Health::Stopped);
    r.start(&ctx("g1", "shared", 17)).await.unwrap();
    let owner = tmp.path().join(OWNER_FILE);
    assert_eq!(std::fs::read_to_string(&owner).unwrap(), "node=node-a\ngroup=g1\ntoken=17\n");
    assert_eq!(r.check().await, Health::Running);

    // Another node takes the directory over: our check notices.
    std::fs::write(&owner, "node=node-b\ngroup=g1\ntoken=18\n").unwrap();
    match r.check().await {
        Health::Failed(why) => assert!(why.contains("node-b") && why.contains("another node"), "{why}"),
        h => panic!("expected failed, got {h:?}"),
    }
    r.stop(false).await.unwrap();
    assert_eq!(r.check().await, Health::Stopped);
    // Stop removes nothing.
    assert_eq!(std::fs::read_to_string(tmp.path().join("data")).unwrap(), "keep me");
    assert!(owner.exists());
    r.stop(false).await.unwrap();

    // A directory that is not there fails the start, clearly.
    let gone = tmp.path().join("missing");
    let r = make("gone", dir_cfg(&gone), &ResourceEnv::new("node-a")).unwrap();
    let msg = r.start(&ctx("g1", "gone", 1)).await.unwrap_err().to_string();
    assert!(msg.contains("missing") && msg.contains("No such file"), "{msg}");
}

#[tokio::test]
async fn a_hung_file_system_call_times_out_instead_of_hanging() {
    let tmp = tempfile::tempdir().unwrap();
    // Opening a FIFO for writing blocks until a reader comes: a stand-in for a
    // file system call stuck on an unreachable NFS server.
    let fifo = tmp.path().join(format!("{OWNER_FILE}.tmp"));
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut env = ResourceEnv::new("node-a");
    env.disk_io_timeout = Duration::from_millis(500);
    let r = make("nfs", dir_cfg(tmp.path()), &env).unwrap();

    let t0 = Instant::now();
    let err = r.start(&ctx("g1", "nfs", 2)).await.unwrap_err();
    assert!(matches!(err, ResourceError::Timeout { op: "start", .. }), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    // The stuck call has not returned: the next operation fails at once.
    let t0 = Instant::now();
    let msg = r.start(&ctx("g1", "nfs", 2)).await.unwrap_err().to_string();
    assert!(msg.contains("still hung"), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(1));

    // The storage "comes back": a reader releases the stuck open.
    let reader = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
    let mut ok = false;
    for _ in 0..100 {
        std::fs::remove_file(&fifo).ok();
        match r.start(&ctx("g1", "nfs", 3)).await {
            Ok(()) => {
                ok = true;
                break;
            }
            Err(e) if e.to_string().contains("still hung") => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("{e}"),
        }
    }
    drop(reader);
    assert!(ok, "the disk never recovered");
    assert_eq!(r.check().await, Health::Running);
}

use std::os::unix::fs::OpenOptionsExt;

/// A loop device over a sparse image, with every mount on it and the device
/// itself released on drop.
struct LoopDisk {
    dev: String,
    mounts: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl LoopDisk {
    fn new(mkfs: bool) -> Self {
        require_program("losetup", "mount", &[]);
        require_program("mkfs.ext4", "e2fsprogs", &[]);
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
        let dev = run_ok("losetup", Command::new("losetup").args(["-f", "--show"]).arg(&img)).trim().to_string();
        let d = Self { dev, mounts: Vec::new(), _dir: dir };
        if mkfs {
            run_ok("mkfs.ext4", Command::new("mkfs.ext4").args(["-q", "-F", &d.dev]));
        }
        d
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        for m in self.mounts.iter().filter(|m| mounted(m)) {
            if Command::new("umount").arg(m).status().map(|s| !s.success()).unwrap_or(true) {
                // Test clean-up only: never done by the resource itself.
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn mounted(mp: &Path) -> bool {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mi.lines().any(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap()))
}

#[tokio::test]
async fn device_mode_fsck_mount_busy_umount() {
    let mut disk = LoopDisk::new(true);
    let tmp = tempfile::tempdir().unwrap();
    let mp = tmp.path().join("mnt");
    disk.mounts.push(mp.clone());
    let cg = TestCgroup::new("disk");
    let env = ResourceEnv::new("node-a").with_cgroup(&cg.path);
    let c = DiskConfig {
        device: Some(PathBuf::from(&disk.dev)),
        mountpoint: Some(mp.clone()),
        fstype: Some("ext4".into()),
        fsck: true,
        directory: None,
    };
    let r = make("data", c, &env).unwrap();
    assert_eq!(r.check().await, Health::Stopped);
    r.start(&ctx("g1", "data", 4)).await.unwrap();
    assert!(mounted(&mp));
    assert_eq!(r.check().await, Health::Running);
    std::fs::write(mp.join("hello"), "world").unwrap();
    // Starting again is a no-op.
    r.start(&ctx("g1", "data", 4)).await.unwrap();

    // A process keeps the file system busy: umount fails, names it, and
    // nothing is lazily unmounted.
    let mut cmd = Command::new("sleep");
    cmd.arg("300").current_dir(&mp);
    let mut user = ChildGuard::spawn("sleep in mountpoint", cmd);
    let err = r.stop(true).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("busy") && msg.contains(&user.pid().to_string()), "{msg}");
    assert!(msg.contains("no lazy unmount"), "{msg}");
    assert!(mounted(&mp), "still mounted, not lazily detached");
    assert_eq!(r.check().await, Health::Running);
    user.kill();

    r.stop(false).await.unwrap();
    assert!(!mounted(&mp));
    assert_eq!(r.check().await, Health::Stopped);
    r.stop(false).await.unwrap();

    // The data is on the device: mount it again.
    r.start(&ctx("g1", "data", 5)).await.unwrap();
    assert_eq!(std::fs::read_to_string(mp.join("hello")).unwrap(), "world");
    r.stop(false).await.unwrap();
}

#[tokio::test]
async fn device_mode_fsck_failure_refuses_to_mount() {
    let disk = LoopDisk::new(false); // no file system: fsck.ext4 finds no superblock
    let tmp = tempfile::tempdir().unwrap();
    let mp = tmp.path().join("mnt");
    let c = DiskConfig {
        device: Some(PathBuf::from(&disk.dev)),
        mountpoint: Some(mp.clone()),
        fstype: Some("ext4".into()),
        fsck: true,
        directory: None,
    };
    let r = make("data", c, &ResourceEnv::new("node-a")).unwrap();
    let msg = r.start(&ctx("g1", "data", 1)).await.unwrap_err().to_string();
    assert!(msg.contains("fsck -p") && msg.contains("exit code 8"), "{msg}");
    assert!(!mounted(&mp));
    assert_eq!(r.check().await, Health::Stopped);
}
