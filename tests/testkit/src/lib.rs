//! Fixtures for Tandem's tests: real servers from Debian's packages,
//! started on loopback in temporary directories and stopped on drop, plus
//! hostile peers and throw-away certificates.
//!
//! Every fixture binds an ephemeral port (see [`free_port`]) so tests may
//! run in parallel.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub mod certs;
pub mod dovecot;
pub mod hostile;
pub mod netns;
pub mod nginx;
pub mod postgres;
pub mod qemu;
pub mod report;
pub mod smtpd;
pub mod vsftpd;

/// Makes `cmd`'s process join `cgroup` (a cgroup v2 directory) before it executes, so that
/// one write to `cgroup.kill` ends it and everything it starts: the tests' way to crash a
/// whole node.
pub fn in_cgroup(cmd: &mut Command, cgroup: &Path) {
    use std::os::unix::process::CommandExt;
    let procs = cgroup.join("cgroup.procs");
    // SAFETY: only async-signal-safe work between fork and exec: open/write/close.
    unsafe {
        cmd.pre_exec(move || {
            std::fs::write(&procs, b"0\n")?;
            Ok(())
        });
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

/// Waits until something accepts on `127.0.0.1:port`, or panics after
/// `timeout` with `what` and the log file's tail, if any.
pub fn wait_for_port(port: u16, timeout: Duration, what: &str, log: Option<&Path>) {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let tail = log.and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
    panic!("{what} did not listen on port {port} within {timeout:?}; log:\n{tail}");
}

/// Finds a program in PATH or the usual sbin/lib directories.
pub fn find_program(name: &str, extra_dirs: &[&str]) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"])
        .chain(extra_dirs.iter().copied())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Like [`find_program`] but panics with an install hint, so a missing
/// package fails a test loudly instead of skipping it.
pub fn require_program(name: &str, package: &str, extra_dirs: &[&str]) -> PathBuf {
    find_program(name, extra_dirs)
        .unwrap_or_else(|| panic!("{name} not found: install the Debian package {package} (see .ci/install-deps)"))
}

/// A child process killed (SIGKILL to its process group) when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    name: String,
}

impl ChildGuard {
    /// Spawns `cmd` in its own process group.
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self { child: Some(child), name: name.to_string() }
    }

    /// The child's pid (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Stops the process group now (SIGKILL) and reaps the child.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pgid = c.id() as libc::pid_t;
            // SAFETY: kill(2) with a negative pid signals a process group we created; no memory is touched.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `sig` to the whole process group.
    pub fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: as in `kill`: a signal to our own process group.
            unsafe { libc::kill(-(c.id() as libc::pid_t), sig) };
        }
    }

    /// The exit status if the child has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command to completion and panics with its output on failure.
pub fn run_ok(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}
