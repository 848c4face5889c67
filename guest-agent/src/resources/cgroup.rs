//! The little of cgroup v2 the resources need: create a cgroup, put a child
//! process into it before `exec`, list and kill everything in it.
//!
//! A process group is not enough to contain a service: a daemon that calls
//! `setsid()` leaves its group, but never its cgroup. Every process a
//! resource starts is therefore written into a cgroup between `fork` and
//! `exec` (so even its first instruction runs inside), and stopping a
//! resource ends with `cgroup.kill`, which the kernel applies to the whole
//! subtree atomically with respect to forks.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_monitors::exec::ChildSetup;
use tokio::time::Instant;

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 file system is mounted.
    #[error("no cgroup v2 file system is mounted (see /proc/self/mountinfo); mount one, e.g. on /sys/fs/cgroup")]
    NoV2Mount,
    /// Reading /proc/self/mountinfo failed.
    #[error("cannot read /proc/self/mountinfo")]
    MountInfo(#[source] io::Error),
    /// The cgroup directory could not be created.
    #[error("cannot create cgroup {path} (is it inside a cgroup v2 mount, and is the name free?)")]
    Create {
        /// The cgroup directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A cgroup interface file could not be read or written.
    #[error("cannot use {path}")]
    Io {
        /// The interface file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Processes were still in the cgroup after it was killed.
    #[error("processes {pids:?} are still in cgroup {path} {waited_ms} ms after it was killed (uninterruptible I/O?)")]
    Survivors {
        /// The cgroup directory.
        path: PathBuf,
        /// What is left.
        pids: Vec<i32>,
        /// How long we waited.
        waited_ms: u64,
    },
}

/// Where the cgroup v2 hierarchy is mounted, from /proc/self/mountinfo (the lease crate's
/// discovery, which the guard uses too: both must agree on the hierarchy).
pub fn v2_mount() -> Result<PathBuf, CgroupError> {
    tandem_lease::cgroup::cgroup2_mount().map_err(|e| match e {
        tandem_lease::cgroup::CgroupError::NoCgroup2 => CgroupError::NoV2Mount,
        other => CgroupError::MountInfo(io::Error::other(other.to_string())),
    })
}

/// One cgroup v2 directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// The cgroup at `path` (a directory inside a cgroup v2 mount); nothing is created yet.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The child cgroup `name`.
    pub fn child(&self, name: &str) -> Cgroup {
        Cgroup { path: self.path.join(name) }
    }

    /// Creates the cgroup and missing parents; an existing one is fine.
    pub fn create(&self) -> Result<(), CgroupError> {
        std::fs::create_dir_all(&self.path).map_err(|e| CgroupError::Create { path: self.path.clone(), source: e })
    }

    /// Whether the directory exists.
    pub fn exists(&self) -> bool {
        self.path.join("cgroup.procs").is_file()
    }

    /// Whether any process is in this cgroup or below (`cgroup.events`); a
    /// cgroup that does not exist is empty.
    pub fn is_populated(&self) -> Result<bool, CgroupError> {
        let p = self.path.join("cgroup.events");
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(t.lines().any(|l| l.trim() == "populated 1")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(CgroupError::Io { path: p, source: e }),
        }
    }

    /// Pids of every process in this cgroup and its descendants.
    pub fn procs(&self) -> Result<Vec<i32>, CgroupError> {
        let mut out = Vec::new();
        collect_procs(&self.path, &mut out)?;
        Ok(out)
    }

    /// Kills everything in the cgroup and below (`cgroup.kill`, or SIGKILL to
    /// each process on kernels without it) and waits up to `timeout` for it
    /// to empty. Returns how many processes were there.
    pub async fn kill(&self, timeout: Duration) -> Result<usize, CgroupError> {
        let n = self.procs()?.len();
        if n == 0 {
            return Ok(0);
        }
        let until = Instant::now() + timeout;
        loop {
            // The guard's kill (cgroup.kill, or freeze + SIGKILL of every pid on kernels
            // before 5.14), repeated until the cgroup is empty or the time is up.
            if let Err(e) = tandem_lease::cgroup::kill_path(&self.path) {
                return Err(CgroupError::Io {
                    path: self.path.join("cgroup.kill"),
                    source: io::Error::other(e.to_string()),
                });
            }
            let step = Instant::now() + Duration::from_millis(200);
            while Instant::now() < step.min(until) {
                if !self.is_populated()? {
                    return Ok(n);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if Instant::now() >= until {
                let pids = self.procs()?;
                if pids.is_empty() {
                    return Ok(n);
                }
                return Err(CgroupError::Survivors {
                    path: self.path.clone(),
                    pids,
                    waited_ms: timeout.as_millis() as u64,
                });
            }
        }
    }

    /// SIGTERM to every process, up to `grace` for them to exit, then
    /// [`Cgroup::kill`]. Returns how many processes were there.
    pub async fn terminate(&self, grace: Duration, kill_timeout: Duration) -> Result<usize, CgroupError> {
        let pids = self.procs()?;
        if pids.is_empty() {
            return Ok(0);
        }
        for pid in &pids {
            // SAFETY: kill(2) only delivers a signal.
            unsafe { libc::kill(*pid, libc::SIGTERM) };
        }
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if !self.is_populated()? {
                return Ok(pids.len());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.kill(kill_timeout).await.map(|n| n.max(pids.len()))
    }

    /// Removes the cgroup and its (empty) descendants; a missing one is fine.
    /// Fails with EBUSY while processes remain.
    pub fn remove(&self) -> Result<(), CgroupError> {
        remove_tree(&self.path)
    }

    /// A [`ChildSetup`] that moves the child into this cgroup before `exec`.
    pub fn placement(&self) -> ChildSetup {
        let procs = self.procs_file();
        // SAFETY: the closure only calls open/write/close on a path prepared here.
        unsafe { ChildSetup::new(move || enter(&procs)) }
    }

    /// `cgroup.procs` as a C string, for [`enter`].
    pub(crate) fn procs_file(&self) -> CString {
        // A path from the configuration never contains NUL (TOML strings cannot
        // carry it through our checks); fall back to one that fails to open.
        CString::new(self.path.join("cgroup.procs").as_os_str().as_bytes()).unwrap_or_default()
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs`
/// (writing "0" means "the writer"). Async-signal-safe: for use between fork and exec.
pub(crate) fn enter(procs: &CString) -> io::Result<()> {
    // SAFETY: open/write/close are async-signal-safe syscalls on a valid C string and a
    // static buffer; the fd is ours alone.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if n != 1 {
            return Err(err);
        }
    }
    Ok(())
}

fn collect_procs(dir: &Path, out: &mut Vec<i32>) -> Result<(), CgroupError> {
    let p = dir.join("cgroup.procs");
    match std::fs::read_to_string(&p) {
        Ok(t) => out.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CgroupError::Io { path: p, source: e }),
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_procs(&e.path(), out)?;
        }
    }
    Ok(())
}

fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CgroupError::Io { path: dir.to_path_buf(), source: e }),
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path())?;
        }
    }
    // A cgroup's interface files vanish with it: rmdir, not remove_dir_all.
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CgroupError::Io { path: dir.to_path_buf(), source: e }),
    }
}
