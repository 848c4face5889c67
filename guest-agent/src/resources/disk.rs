//! `kind = "disk"`: shared storage, exclusive to the node holding the
//! group's lease.
//!
//! * Directory mode (already-mounted shared storage: NFS, a cluster file
//!   system): `start` checks the directory and writes `.tandem-owner`
//!   (node, group, fencing token); `check` reads it back; `stop` syncs the
//!   file system and removes nothing. Every file system call runs on a
//!   blocking thread under `disk_io_timeout`: a hung NFS server makes the
//!   operation fail, never the agent hang. While a call is still stuck,
//!   later operations fail at once instead of piling up more stuck threads.
//! * Device mode: `start` runs `fsck -p` (optional) and `mount`; `check`
//!   looks the mount up in /proc/self/mountinfo; `stop` runs `umount`, and
//!   when the file system is busy reports who uses it. A lazy unmount is
//!   never done: it would hide the users, not stop them, and the next node
//!   would mount a disk this one still writes.

use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tandem_config::DiskResource as DiskConfig;
use tandem_monitors::exec::{CommandSpec, run_command};

use super::mountinfo;
use super::process::{Placement, describe_exit, run_failed};
use super::{BoxFuture, Health, Resource, ResourceEnv, ResourceError, StartContext};

/// The owner file written into a directory-mode disk.
pub const OWNER_FILE: &str = ".tandem-owner";

/// A `disk` resource.
#[derive(Debug)]
pub struct DiskResource {
    id: String,
    node: String,
    group: String,
    mode: Mode,
    io_timeout: Duration,
    mount_timeout: Duration,
    place: Placement,
    /// The token of our start; 0 when not started by us.
    token: AtomicU64,
    /// A blocking file system call that timed out is still running.
    hung: Arc<AtomicBool>,
}

#[derive(Debug, Clone)]
enum Mode {
    Directory(PathBuf),
    Device { device: PathBuf, mountpoint: PathBuf, fstype: Option<String>, fsck: bool },
}

/// Why a bounded file system call failed.
enum IoFail {
    TimedOut,
    StillHung,
    Err(io::Error),
}

impl DiskResource {
    /// Checks the configuration's shape (device with mountpoint, or directory).
    pub fn build(group: &str, name: &str, cfg: &DiskConfig, env: &ResourceEnv) -> Result<Self, ResourceError> {
        let id = format!("{group}/{name}");
        let mode = match (&cfg.device, &cfg.mountpoint, &cfg.directory) {
            (Some(d), Some(m), None) => {
                Mode::Device { device: d.clone(), mountpoint: m.clone(), fstype: cfg.fstype.clone(), fsck: cfg.fsck }
            }
            (None, None, Some(dir)) => Mode::Directory(dir.clone()),
            _ => {
                return Err(ResourceError::config(
                    &id,
                    "a disk needs either `device` + `mountpoint`, or `directory` (already-mounted shared storage)",
                ));
            }
        };
        Ok(Self {
            id,
            node: env.node.clone(),
            group: group.to_string(),
            mode,
            io_timeout: env.disk_io_timeout,
            mount_timeout: env.mount_timeout,
            place: Placement::new(env.cgroup.as_deref(), name, None),
            token: AtomicU64::new(0),
            hung: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Runs `f` on a blocking thread, bounded by the I/O timeout.
    async fn bounded<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<T, IoFail> {
        if self.hung.swap(true, Ordering::AcqRel) {
            return Err(IoFail::StillHung);
        }
        let hung = Arc::clone(&self.hung);
        let task = tokio::task::spawn_blocking(move || {
            let r = f();
            hung.store(false, Ordering::Release);
            r
        });
        match tokio::time::timeout(self.io_timeout, task).await {
            Ok(Ok(r)) => r.map_err(IoFail::Err),
            Ok(Err(join)) => Err(IoFail::Err(io::Error::other(join.to_string()))),
            // The thread stays blocked in the kernel; `hung` stays set until it returns.
            Err(_) => Err(IoFail::TimedOut),
        }
    }

    fn io_error(&self, op: &'static str, what: &str, f: IoFail) -> ResourceError {
        match f {
            IoFail::TimedOut => {
                tracing::error!(resource = %self.id, "{what} did not return within {} ms", self.io_timeout.as_millis());
                ResourceError::timeout(op, &self.id, self.io_timeout)
            }
            IoFail::StillHung => ResourceError::failed(
                op,
                &self.id,
                format!("{what}: an earlier file system call on this disk is still hung (unreachable storage?)"),
            ),
            IoFail::Err(e) => ResourceError::failed(op, &self.id, format!("{what}: {e}")),
        }
    }

    fn owner_text(&self, token: u64) -> String {
        format!("node={}\ngroup={}\ntoken={}\n", self.node, self.group, token)
    }

    async fn start_directory(&self, dir: &Path, token: u64) -> Result<(), ResourceError> {
        let dir = dir.to_path_buf();
        let text = self.owner_text(token);
        let d = dir.clone();
        self.bounded(move || {
            if !std::fs::metadata(&d)?.is_dir() {
                return Err(io::Error::other("not a directory"));
            }
            write_owner(&d, &text)
        })
        .await
        .map_err(|f| self.io_error("start", &format!("directory {}", dir.display()), f))
    }

    async fn check_directory(&self, dir: &Path) -> Health {
        let token = self.token.load(Ordering::Relaxed);
        if token == 0 {
            return Health::Stopped;
        }
        let expected = self.owner_text(token);
        let d = dir.to_path_buf();
        let res = self
            .bounded(move || {
                if !std::fs::metadata(&d)?.is_dir() {
                    return Err(io::Error::other("not a directory"));
                }
                std::fs::read_to_string(d.join(OWNER_FILE))
            })
            .await;
        match res {
            Ok(text) if text == expected => Health::Running,
            Ok(text) => Health::Failed(format!(
                "{} in {} no longer names this node and token ({}): another node took the directory over",
                OWNER_FILE,
                dir.display(),
                text.trim().replace('\n', ", ")
            )),
            Err(IoFail::TimedOut) => Health::Failed(format!(
                "directory {} did not answer within {} ms",
                dir.display(),
                self.io_timeout.as_millis()
            )),
            Err(IoFail::StillHung) => {
                Health::Failed(format!("directory {}: an earlier call is still hung", dir.display()))
            }
            Err(IoFail::Err(e)) => Health::Failed(format!("directory {}: {e}", dir.display())),
        }
    }

    /// Runs a helper program (fsck, mount, umount, fuser) in the operations cgroup.
    async fn run(
        &self,
        op: &'static str,
        program: &str,
        args: &[&str],
    ) -> Result<tandem_monitors::exec::RunOutput, ResourceError> {
        self.place.create(&self.id, op)?;
        let mut spec = CommandSpec::new(program).args(args.iter().copied()).timeout(self.mount_timeout);
        spec.child_setup = self.place.ops_setup();
        let out = run_command(&spec).await.map_err(|e| run_failed(op, &self.id, &e));
        self.place.kill_ops(&self.id).await;
        let out = out?;
        if out.timed_out {
            return Err(ResourceError::failed(
                op,
                &self.id,
                format!("{program} did not finish within {} ms; it was killed", self.mount_timeout.as_millis()),
            ));
        }
        Ok(out)
    }

    async fn start_device(
        &self,
        device: &Path,
        mountpoint: &Path,
        fstype: Option<&str>,
        fsck: bool,
    ) -> Result<(), ResourceError> {
        match mount_state(device, mountpoint) {
            MountState::Ours => return Ok(()),
            MountState::Other(what) => {
                return Err(ResourceError::failed(
                    "start",
                    &self.id,
                    format!("{} already has {what} mounted", mountpoint.display()),
                ));
            }
            MountState::None => {}
        }
        if let Some(elsewhere) = device_mounted_at(device) {
            return Err(ResourceError::failed(
                "start",
                &self.id,
                format!("{} is already mounted at {}", device.display(), elsewhere.display()),
            ));
        }
        let dev = device.to_string_lossy().to_string();
        if fsck {
            let mut args = vec!["-p", "-T"];
            if let Some(t) = fstype {
                args.extend(["-t", t]);
            }
            args.push(&dev);
            let out = self.run("start", "fsck", &args).await?;
            match out.exit_code() {
                // 0: clean; 1: errors corrected.
                Some(0) => {}
                Some(1) => tracing::warn!(resource = %self.id, device = %dev, "fsck corrected file system errors"),
                _ => {
                    return Err(ResourceError::failed(
                        "start",
                        &self.id,
                        format!("fsck -p {dev} {} (repair it by hand: fsck {dev})", describe_exit(&out)),
                    ));
                }
            }
        }
        std::fs::create_dir_all(mountpoint).map_err(|e| {
            ResourceError::failed("start", &self.id, format!("cannot create mountpoint {}: {e}", mountpoint.display()))
        })?;
        let mp = mountpoint.to_string_lossy().to_string();
        let mut args = Vec::new();
        if let Some(t) = fstype {
            args.extend(["-t", t]);
        }
        args.extend([dev.as_str(), mp.as_str()]);
        let out = self.run("start", "mount", &args).await?;
        if out.exit_code() != Some(0) {
            return Err(ResourceError::failed("start", &self.id, format!("mount {dev} {mp}: {}", describe_exit(&out))));
        }
        match mount_state(device, mountpoint) {
            MountState::Ours => Ok(()),
            _ => Err(ResourceError::failed(
                "start",
                &self.id,
                format!("mount {dev} {mp} exited 0 but the mount is not there"),
            )),
        }
    }

    async fn stop_device(&self, device: &Path, mountpoint: &Path) -> Result<(), ResourceError> {
        match mount_state(device, mountpoint) {
            MountState::None => return Ok(()),
            MountState::Other(what) => {
                tracing::warn!(resource = %self.id, "{} has {what} mounted, not our device: leaving it", mountpoint.display());
                return Ok(());
            }
            MountState::Ours => {}
        }
        let mp = mountpoint.to_string_lossy().to_string();
        let out = self.run("stop", "umount", &[&mp]).await?;
        if out.exit_code() == Some(0) && !matches!(mount_state(device, mountpoint), MountState::Ours) {
            return Ok(());
        }
        // Busy: say who holds it, so that the operator (or the engine's escalation) can act.
        let users = match rdev(device) {
            Some(dev) => match self.bounded(move || Ok(users_of(dev))).await {
                Ok(u) if u.is_empty() => "no process found (a bind mount or a kernel user?)".to_string(),
                Ok(u) => u.iter().take(10).map(|(pid, comm)| format!("{pid} ({comm})")).collect::<Vec<_>>().join(", "),
                Err(_) => "could not list them in time".to_string(),
            },
            None => format!("unknown ({} is not a block device)", device.display()),
        };
        Err(ResourceError::failed(
            "stop",
            &self.id,
            format!("umount {mp}: {}; in use by: {users} (no lazy unmount: stop those processes)", describe_exit(&out)),
        ))
    }
}

/// Writes the owner file atomically and durably (temp file, fsync, rename, fsync dir).
fn write_owner(dir: &Path, text: &str) -> io::Result<()> {
    let tmp = dir.join(format!("{OWNER_FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(OWNER_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Processes that use the file system on device `dev`: their working or root
/// directory, executable, an open file or a mapped file is on it.
fn users_of(dev: (u32, u32)) -> Vec<(i32, String)> {
    let on_dev = |p: &Path| std::fs::metadata(p).is_ok_and(|m| (libc::major(m.dev()), libc::minor(m.dev())) == dev);
    let maps_dev = format!("{:02x}:{:02x}", dev.0, dev.1);
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let base = e.path();
        let uses = ["cwd", "root", "exe"].iter().any(|l| on_dev(&base.join(l)))
            || std::fs::read_dir(base.join("fd")).is_ok_and(|fds| fds.flatten().any(|fd| on_dev(&fd.path())))
            || std::fs::read_to_string(base.join("maps"))
                .is_ok_and(|m| m.lines().any(|l| l.split_whitespace().nth(3) == Some(maps_dev.as_str())));
        if uses {
            let comm = std::fs::read_to_string(base.join("comm")).unwrap_or_default().trim().to_string();
            out.push((pid, comm));
        }
    }
    out
}

/// Flushes the file system holding `dir` (syncfs(2)).
fn sync_fs(dir: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir)?;
    // SAFETY: syncfs(2) on a valid fd we own.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

enum MountState {
    /// `device` is mounted on the mountpoint.
    Ours,
    /// Something else is.
    Other(String),
    /// Nothing is.
    None,
}

/// The device number of a block device, if it is one.
fn rdev(device: &Path) -> Option<(u32, u32)> {
    let m = std::fs::metadata(device).ok()?;
    if !m.file_type().is_block_device() {
        return None;
    }
    let r = m.rdev();
    Some((libc::major(r), libc::minor(r)))
}

fn same_device(e: &mountinfo::MountEntry, device: &Path, rdev: Option<(u32, u32)>) -> bool {
    if rdev == Some(e.dev) {
        return true;
    }
    // File systems with anonymous device numbers (btrfs): compare the source.
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canon(Path::new(&e.source)) == canon(device)
}

fn mount_state(device: &Path, mountpoint: &Path) -> MountState {
    let Ok(mounts) = mountinfo::read() else { return MountState::Other("an unreadable mount table".into()) };
    let mp = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    // The last mount on a path is the one visible there.
    match mounts.iter().rev().find(|m| m.mount_point == mp) {
        None => MountState::None,
        Some(e) if same_device(e, device, rdev(device)) => MountState::Ours,
        Some(e) => MountState::Other(format!("{} ({})", e.source, e.fstype)),
    }
}

/// Where `device` is mounted, if anywhere.
fn device_mounted_at(device: &Path) -> Option<PathBuf> {
    let r = rdev(device)?;
    mountinfo::read().ok()?.into_iter().find(|m| m.dev == r).map(|m| m.mount_point)
}

impl Resource for DiskResource {
    fn kind(&self) -> &'static str {
        "disk"
    }

    fn start<'a>(&'a self, ctx: &'a StartContext) -> BoxFuture<'a, Result<(), ResourceError>> {
        Box::pin(async move {
            match &self.mode {
                Mode::Directory(dir) => self.start_directory(dir, ctx.token).await?,
                Mode::Device { device, mountpoint, fstype, fsck } => {
                    self.start_device(device, mountpoint, fstype.as_deref(), *fsck).await?
                }
            }
            self.token.store(ctx.token.max(1), Ordering::Relaxed);
            Ok(())
        })
    }

    fn stop(&self, force: bool) -> BoxFuture<'_, Result<(), ResourceError>> {
        Box::pin(async move {
            let res = match &self.mode {
                // Nothing runs in a directory; with the lease gone, a flush is moot and may hang.
                Mode::Directory(_) if force => Ok(()),
                Mode::Directory(dir) => {
                    let d = dir.clone();
                    self.bounded(move || sync_fs(&d))
                        .await
                        .map_err(|f| self.io_error("stop", &format!("syncfs {}", dir.display()), f))
                }
                Mode::Device { device, mountpoint, .. } => self.stop_device(device, mountpoint).await,
            };
            if res.is_ok() {
                self.token.store(0, Ordering::Relaxed);
                self.place.remove(&self.id);
            }
            res
        })
    }

    fn check(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            match &self.mode {
                Mode::Directory(dir) => self.check_directory(dir).await,
                Mode::Device { device, mountpoint, .. } => match mount_state(device, mountpoint) {
                    MountState::Ours => Health::Running,
                    MountState::None => Health::Stopped,
                    MountState::Other(what) => Health::Failed(format!(
                        "{} has {what} mounted instead of {}",
                        mountpoint.display(),
                        device.display()
                    )),
                },
            }
        })
    }
}
