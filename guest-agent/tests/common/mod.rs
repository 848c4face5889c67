//! Shared fixtures of the resource tests: a throw-away cgroup, process
//! liveness, polling.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tandem_guest::resources::StartContext;
use tandem_guest::resources::cgroup::{self, Cgroup};

/// A cgroup created for one test under the cgroup v2 mount; everything in it
/// is killed and the directory removed on drop, even when the test fails.
#[derive(Debug)]
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let root = cgroup::v2_mount().expect("these tests need a cgroup v2 mount");
        let path = root.join(format!("tandem-test-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Self { path }
    }

    pub fn cgroup(&self) -> Cgroup {
        Cgroup::new(&self.path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let cg = Cgroup::new(&self.path);
        // No runtime here: kill and wait synchronously.
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        let until = Instant::now() + Duration::from_secs(5);
        while cg.is_populated().unwrap_or(false) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = cg.remove();
    }
}

pub fn ctx(group: &str, resource: &str, token: u64) -> StartContext {
    StartContext { group: group.into(), resource: resource.into(), token }
}

/// Whether `pid` is a live (non-zombie) process.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// Polls `f` until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a pid written to `file` by a test service, waiting for it to appear.
pub fn read_pid(file: &Path) -> i32 {
    let mut pid = 0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            pid = std::fs::read_to_string(file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
            pid > 0
        }),
        "no pid in {}",
        file.display()
    );
    pid
}

/// Writes an executable shell script.
pub fn script(dir: &Path, name: &str, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p.display().to_string()
}
