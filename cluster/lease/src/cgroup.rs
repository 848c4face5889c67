//! cgroup v2 helpers for self-fencing: find the cgroup2 mount, create a
//! child cgroup, put processes into it, list and kill everything in it, and
//! remove it.
//!
//! A process group does not contain a daemon that calls `setsid()`; a
//! cgroup does: every descendant stays in it whatever it does with sessions
//! and process groups. Resources put every process they start into a cgroup
//! of their own ([`Cgroup::enter_in_child`]) and register it with the
//! fencing guard ([`crate::guard::GuardHandle::register_cgroup`]).
//!
//! Killing writes `1` to `cgroup.kill` (Linux 5.14 and later: the kernel
//! SIGKILLs the whole subtree at once, forks included). Without it the
//! cgroup is frozen (`cgroup.freeze`, so nothing forks meanwhile) and every
//! pid in `cgroup.procs` of it and its descendants is SIGKILLed, repeatedly
//! until they are empty or a bound is reached.

use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Longest cgroup path accepted: it travels on the guard pipe as one line,
/// which must stay below `PIPE_BUF` (4096) to be written atomically.
pub const MAX_PATH_LEN: usize = 3000;

/// How many signal rounds the fallback kill makes before giving up.
const KILL_ROUNDS: u32 = 100;
/// Pause between fallback rounds (processes need a moment to exit).
const KILL_ROUND_PAUSE: Duration = Duration::from_millis(10);

/// Errors of the cgroup helpers.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 filesystem is mounted.
    #[error(
        "no cgroup2 filesystem is mounted (none listed in /proc/self/mountinfo); mount one, e.g. \
         `mount -t cgroup2 none /sys/fs/cgroup/unified`, or use process groups only"
    )]
    NoCgroup2,
    /// A file of the cgroup filesystem could not be read or written.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The path cannot name a cgroup to guard.
    #[error("{path:?} is not a usable cgroup: {why}")]
    BadPath {
        /// The path given.
        path: PathBuf,
        /// Why it is refused.
        why: String,
    },
    /// Processes survived every kill round of the fallback.
    #[error(
        "cgroup {path} still holds processes {pids:?} after {rounds} SIGKILL rounds; they may be in \
         uninterruptible sleep (only a watchdog reset ends those)"
    )]
    Survivors {
        /// The cgroup.
        path: PathBuf,
        /// Pids still listed.
        pids: Vec<i32>,
        /// Rounds made.
        rounds: u32,
    },
    /// `remove` found processes still in the cgroup.
    #[error("cgroup {path} is not empty after {waited_ms} ms (pids {pids:?}); kill them first")]
    Busy {
        /// The cgroup.
        path: PathBuf,
        /// Pids still listed.
        pids: Vec<i32>,
        /// How long `remove` waited.
        waited_ms: u64,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { action, path: path.to_path_buf(), source }
}

/// Undoes the octal escapes of /proc/self/mountinfo (`\040` is a space).
fn unescape_mount_path(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// The mount points of every cgroup2 filesystem in a mountinfo text, in order.
pub fn parse_mountinfo(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            // Fields: id parent major:minor root mount-point options [optional...] - fstype source super-options
            let (pre, post) = line.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let mount_point = pre.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| unescape_mount_path(mount_point))
        })
        .collect()
}

/// Every cgroup2 mount point of this process's mount namespace.
pub fn cgroup2_mounts() -> Result<Vec<PathBuf>, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(io_err("read", path))?;
    Ok(parse_mountinfo(&text))
}

/// The cgroup2 mount point: `/sys/fs/cgroup` on a unified layout,
/// `/sys/fs/cgroup/unified` on a hybrid one.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    cgroup2_mounts()?.into_iter().next().ok_or(CgroupError::NoCgroup2)
}

/// This process's own cgroup v2 (from /proc/self/cgroup), as a path under `mount`.
pub fn own_cgroup(mount: &Path) -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text = std::fs::read_to_string(path).map_err(io_err("read", path))?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/");
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// Checks that `path` can name a cgroup in a guard message: absolute, no
/// `.`/`..` components, no newline, not too long, strictly below a cgroup2
/// mount (the root cgroup holds the whole machine). Does not touch it.
pub fn check_path(path: &Path) -> Result<PathBuf, CgroupError> {
    let bad = |why: &str| CgroupError::BadPath { path: path.to_path_buf(), why: why.to_string() };
    if !path.is_absolute() {
        return Err(bad("the path must be absolute"));
    }
    if path.components().any(|c| matches!(c, Component::CurDir | Component::ParentDir)) {
        return Err(bad("the path must not contain `.` or `..`"));
    }
    let bytes = path.as_os_str().as_bytes();
    if bytes.contains(&b'\n') || std::str::from_utf8(bytes).is_err() {
        return Err(bad("the path must be UTF-8 without newlines"));
    }
    if bytes.len() > MAX_PATH_LEN {
        return Err(bad(&format!("the path is longer than {MAX_PATH_LEN} bytes")));
    }
    let mounts = cgroup2_mounts()?;
    if mounts.is_empty() {
        return Err(CgroupError::NoCgroup2);
    }
    // Normalise trailing slashes etc. through components.
    let clean: PathBuf = path.components().collect();
    match mounts.iter().find(|m| clean.starts_with(m)) {
        Some(m) if clean == *m => Err(bad("it is the root cgroup of the machine; use a child cgroup")),
        Some(_) => Ok(clean),
        None => Err(bad(&format!(
            "it is not under a cgroup2 mount (mounted at {})",
            mounts.iter().map(|m| m.display().to_string()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Checks a cgroup for the guard to kill: [`check_path`], it exists, and
/// it is neither this process's own cgroup nor one of its ancestors
/// (fencing would kill the guard itself).
pub fn check_registrable(path: &Path) -> Result<PathBuf, CgroupError> {
    let clean = check_path(path)?;
    if !clean.join("cgroup.procs").exists() {
        return Err(CgroupError::BadPath {
            path: path.to_path_buf(),
            why: "it does not exist (no cgroup.procs in it); create it first".into(),
        });
    }
    for m in cgroup2_mounts()? {
        if clean.starts_with(&m) && own_cgroup(&m)?.starts_with(&clean) {
            return Err(CgroupError::BadPath {
                path: path.to_path_buf(),
                why: "it contains this process itself; put the guarded processes in a cgroup of their own".into(),
            });
        }
    }
    Ok(clean)
}

/// How [`Cgroup::kill`] killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillMethod {
    /// `cgroup.kill` was written: the kernel kills the whole subtree.
    CgroupKill,
    /// `cgroup.kill` does not exist: SIGKILL of every listed pid, in this
    /// many rounds, until the cgroup and its descendants were empty.
    Signals {
        /// Rounds needed.
        rounds: u32,
    },
    /// The cgroup no longer exists: nothing left to kill.
    Gone,
}

/// A cgroup v2 directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates (or reuses) cgroup `name` below `parent` (a cgroup directory,
    /// e.g. [`cgroup2_mount`] or a delegated subtree).
    pub fn create(parent: &Path, name: &str) -> Result<Cgroup, CgroupError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(CgroupError::BadPath { path: parent.join(name), why: "invalid cgroup name".into() });
        }
        let path = check_path(&parent.join(name))?;
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create cgroup", &path)(e)),
        }
        Ok(Cgroup { path })
    }

    /// An existing cgroup (checked with [`check_path`]).
    pub fn open(path: &Path) -> Result<Cgroup, CgroupError> {
        let path = check_path(path)?;
        if !path.join("cgroup.procs").exists() {
            return Err(CgroupError::BadPath { path, why: "it does not exist (no cgroup.procs in it)".into() });
        }
        Ok(Cgroup { path })
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves process `pid` (and, from then on, everything it starts) into this cgroup.
    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        let procs = self.path.join("cgroup.procs");
        let mut f = std::fs::OpenOptions::new().write(true).open(&procs).map_err(io_err("open", &procs))?;
        f.write_all(format!("{pid}\n").as_bytes()).map_err(io_err("write", &procs))
    }

    /// Makes `cmd`'s child move itself into this cgroup before it execs,
    /// so the program and everything it forks never run outside it.
    pub fn enter_in_child(&self, cmd: &mut Command) {
        let mut procs = self.path.join("cgroup.procs").into_os_string().into_vec();
        procs.push(0);
        let hook = move || -> io::Result<()> {
            // Only async-signal-safe calls between fork and exec: open, write, close.
            // SAFETY: `procs` is NUL-terminated and lives as long as the closure.
            let fd = unsafe { libc::open(procs.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // "0" means the writing process itself.
            // SAFETY: `fd` is open; the buffer is a valid 2-byte slice.
            let w = unsafe { libc::write(fd, b"0\n".as_ptr().cast(), 2) };
            let err = io::Error::last_os_error();
            // SAFETY: closing the fd we opened.
            unsafe { libc::close(fd) };
            if w != 2 {
                return Err(err);
            }
            Ok(())
        };
        // SAFETY: the hook only calls async-signal-safe functions and does not allocate.
        unsafe { std::os::unix::process::CommandExt::pre_exec(cmd, hook) };
    }

    /// Every pid in this cgroup and its descendants.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut out = Vec::new();
        collect_pids(&self.path, &mut out)?;
        Ok(out)
    }

    /// Kills everything in the cgroup and its descendants: `cgroup.kill`
    /// where the kernel has it, else [`Cgroup::kill_by_signals`].
    pub fn kill(&self) -> Result<KillMethod, CgroupError> {
        kill_path(&self.path)
    }

    /// The fallback kill: freeze, SIGKILL every listed pid, repeat until
    /// empty (bounded), thaw.
    pub fn kill_by_signals(&self) -> Result<KillMethod, CgroupError> {
        kill_by_signals(&self.path)
    }

    /// Removes the cgroup and its descendants once they are empty, waiting
    /// up to `wait` for killed processes to leave.
    pub fn remove(self, wait: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        loop {
            let pids = match self.pids() {
                Ok(p) => p,
                Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            if pids.is_empty() {
                break;
            }
            if start.elapsed() >= wait {
                return Err(CgroupError::Busy { path: self.path, pids, waited_ms: start.elapsed().as_millis() as u64 });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        remove_tree(&self.path)
    }
}

fn collect_pids(dir: &Path, out: &mut Vec<i32>) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    let text = std::fs::read_to_string(&procs).map_err(io_err("read", &procs))?;
    out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    for child in child_cgroups(dir)? {
        match collect_pids(&child, out) {
            // A child removed meanwhile has nothing left in it.
            Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            r => r?,
        }
    }
    Ok(())
}

fn child_cgroups(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let entries = std::fs::read_dir(dir).map_err(io_err("list", dir))?;
    Ok(entries.filter_map(Result::ok).filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect())
}

fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    for child in child_cgroups(dir)? {
        remove_tree(&child)?;
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove cgroup", dir)(e)),
    }
}

/// Writes `value` to control file `name` of `dir`.
fn write_control(dir: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(dir.join(name))?;
    f.write_all(value)
}

/// Kills everything in cgroup `dir` (see [`Cgroup::kill`]). Used by the guard.
pub fn kill_path(dir: &Path) -> Result<KillMethod, CgroupError> {
    if !dir.join("cgroup.procs").exists() {
        return Ok(KillMethod::Gone);
    }
    match write_control(dir, "cgroup.kill", b"1") {
        Ok(()) => Ok(KillMethod::CgroupKill),
        Err(e) if e.kind() == io::ErrorKind::NotFound && dir.join("cgroup.procs").exists() => kill_by_signals(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(KillMethod::Gone),
        Err(e) => {
            // cgroup.kill exists but refused: still try the signals, they may work.
            let _ = e;
            kill_by_signals(dir)
        }
    }
}

/// The fallback: freeze (if the kernel can), SIGKILL every pid until the
/// subtree is empty (at most [`KILL_ROUNDS`] rounds), thaw.
fn kill_by_signals(dir: &Path) -> Result<KillMethod, CgroupError> {
    // Frozen processes cannot fork while we collect pids; SIGKILL still ends them.
    let frozen = write_control(dir, "cgroup.freeze", b"1").is_ok();
    let result = (|| {
        for round in 1..=KILL_ROUNDS {
            let mut pids = Vec::new();
            match collect_pids(dir, &mut pids) {
                Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    return Ok(KillMethod::Gone);
                }
                r => r?,
            }
            if pids.is_empty() {
                return Ok(KillMethod::Signals { rounds: round - 1 });
            }
            for pid in &pids {
                // ESRCH: it exited meanwhile; anything else shows up again in the next round.
                let _: Result<(), Errno> = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            std::thread::sleep(KILL_ROUND_PAUSE);
        }
        let mut pids = Vec::new();
        collect_pids(dir, &mut pids)?;
        if pids.is_empty() {
            return Ok(KillMethod::Signals { rounds: KILL_ROUNDS });
        }
        Err(CgroupError::Survivors { path: dir.to_path_buf(), pids, rounds: KILL_ROUNDS })
    })();
    if frozen {
        // Thaw, so that the cgroup can be reused; whatever was in it is dead.
        let _ = write_control(dir, "cgroup.freeze", b"0");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const UNIFIED: &str = "\
25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
90 25 0:50 / /mnt/my\\040cg rw,relatime - cgroup2 none rw
";

    #[test]
    fn mountinfo_finds_cgroup2_in_hybrid_and_unified_layouts() {
        assert_eq!(parse_mountinfo(HYBRID), vec![PathBuf::from("/sys/fs/cgroup/unified")]);
        assert_eq!(parse_mountinfo(UNIFIED), vec![PathBuf::from("/sys/fs/cgroup"), PathBuf::from("/mnt/my cg")]);
        assert!(parse_mountinfo("garbage\n\n1 2 3\n").is_empty());
    }

    #[test]
    fn paths_outside_or_at_the_root_of_cgroup2_are_refused() {
        let mount = cgroup2_mount().expect("the test machines mount cgroup2");
        for bad in [
            PathBuf::from("relative/cg"),
            mount.join("a/../b"),
            PathBuf::from("/tmp/not-a-cgroup"),
            mount.clone(),
            mount.join("x\ny"),
        ] {
            let e = check_path(&bad).unwrap_err();
            assert!(matches!(e, CgroupError::BadPath { .. }), "{bad:?}: {e}");
        }
        assert_eq!(check_path(&mount.join("a/b/")).unwrap(), mount.join("a/b"));
        // A missing cgroup, or the one containing this process, cannot be registered.
        let e = check_registrable(&mount.join("tandem-no-such-cgroup")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let own = own_cgroup(&mount).unwrap();
        if own != mount {
            let e = check_registrable(&own).unwrap_err();
            assert!(e.to_string().contains("this process"), "{e}");
        }
    }
}
