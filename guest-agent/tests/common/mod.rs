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
    StartContext::new(group, resource, token)
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

/// Two network namespaces joined by a veth pair, removed on drop:
/// `a` has `veth_a` with `addr_a`, `b` has `veth_b` with `addr_b` (a /24).
#[derive(Debug)]
pub struct NetnsPair {
    pub a: String,
    pub b: String,
    pub veth_a: String,
    pub veth_b: String,
}

impl NetnsPair {
    /// `net` is the first three octets, e.g. "10.77.1".
    pub fn new(tag: &str, net: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{}", std::process::id() % 100000, n);
        let p = Self {
            a: format!("td-{tag}-a-{id}"),
            b: format!("td-{tag}-b-{id}"),
            veth_a: format!("tva{id}"),
            veth_b: format!("tvb{id}"),
        };
        let ip = |args: &[&str]| {
            tandem_testkit::run_ok(&format!("ip {}", args.join(" ")), std::process::Command::new("ip").args(args))
        };
        ip(&["netns", "add", &p.a]);
        ip(&["netns", "add", &p.b]);
        ip(&["-n", &p.a, "link", "add", &p.veth_a, "type", "veth", "peer", "name", &p.veth_b, "netns", &p.b]);
        ip(&["-n", &p.a, "addr", "add", &format!("{net}.1/24"), "dev", &p.veth_a]);
        ip(&["-n", &p.b, "addr", "add", &format!("{net}.2/24"), "dev", &p.veth_b]);
        for (ns, dev) in [(&p.a, &p.veth_a), (&p.b, &p.veth_b)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        p
    }

    /// Runs `ip -n NS ARGS` and returns stdout, panicking on failure.
    pub fn ip(&self, ns: &str, args: &[&str]) -> String {
        let mut cmd = std::process::Command::new("ip");
        cmd.arg("-n").arg(ns).args(args);
        tandem_testkit::run_ok(&format!("ip -n {ns} {}", args.join(" ")), &mut cmd)
    }

    /// Runs `f` on a thread that lives in namespace `ns`, with a current-thread
    /// runtime: every program the resources spawn inherits the namespace.
    pub fn run_in<T: Send + 'static>(
        ns: &str,
        f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
    ) -> T {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let f_ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns(2) on an fd we own; it changes only this thread's namespace.
            let rc = unsafe { libc::setns(f_ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Whether `pid` is gone entirely (reaped, not even a zombie). Orphans are
/// reaped by PID 1, which is slow on some machines; OCF agents that test a
/// pid with `kill -0` see a zombie as running.
pub fn reaped(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// The end-to-end writer log: `(fencing token, node)` per line (unparsable lines skipped).
pub fn read_writes(log: &Path) -> Vec<(u64, String)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (t, n) = l.split_once(' ')?;
            Some((t.parse().ok()?, n.to_string()))
        })
        .collect()
}

/// The safety invariant on a writer log: tokens never go backwards, and each token belongs
/// to one node. Returns what broke it.
pub fn two_writers(w: &[(u64, String)]) -> Option<String> {
    for (i, pair) in w.windows(2).enumerate() {
        if pair[1].0 < pair[0].0 {
            return Some(format!(
                "line {}: token {} written after token {}: two writers at once",
                i + 2,
                pair[1].0,
                pair[0].0
            ));
        }
    }
    let mut owner = std::collections::BTreeMap::new();
    for (t, n) in w {
        let o = owner.entry(*t).or_insert_with(|| n.clone());
        if o != n {
            return Some(format!("token {t} used by both {o} and {n}"));
        }
    }
    None
}

/// Kills every process of the nodes' cgroups under `root` and removes the whole tree
/// (and `root`'s parent if it is left empty): the end-to-end tests' clean-up.
pub fn remove_node_cgroups(root: &Path, nodes: &[&str]) {
    for n in nodes {
        let _ = std::fs::write(root.join(n).join("cgroup.kill"), "1");
    }
    std::thread::sleep(Duration::from_millis(200));
    remove_tree(root);
    if let Some(parent) = root.parent() {
        let _ = std::fs::remove_dir(parent);
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
