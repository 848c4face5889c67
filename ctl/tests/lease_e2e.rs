//! End-to-end tests of `tandemctl lease`: real tandemctl processes (and their guards) sharing one
//! lease file, each running a writer that appends "<token> <pid> <ns>" lines to a shared log. The
//! log is the evidence from outside: `check_log` verifies that writers never overlap and that no
//! stale token writes after a newer one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const EXIT_USAGE: i32 = 64;
const EXIT_TIMEOUT: i32 = 75;
const EXIT_LOST: i32 = 76;

fn tandemctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandemctl"))
}

/// A temp dir with an initialised lease file (R = 300 ms: takeover in about 3 s) and a log path.
struct Area {
    dir: tempfile::TempDir,
}

impl Area {
    fn new() -> Area {
        let dir = tempfile::tempdir().unwrap();
        let area = Area { dir };
        let st = tandemctl()
            .args(["lease", "init", "--hosts", "8", "--resources", "8", "--renewal-ms", "300", "--device"])
            .arg(area.device())
            .status()
            .unwrap();
        assert!(st.success(), "lease init failed: {st}");
        area
    }
    fn device(&self) -> PathBuf {
        self.dir.path().join("area.lease")
    }
    fn log(&self) -> PathBuf {
        self.dir.path().join("writer.log")
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `tandemctl lease run` as `host` on resource "db"; the writer appends `lines` lines (0 = forever).
    fn contender(&self, host: u32, lines: u32, extra_env: &[(&str, &str)]) -> Contender {
        let script = format!(
            "i=0; while [ {lines} -eq 0 ] || [ $i -lt {lines} ]; do \
             echo \"$TANDEM_FENCING_TOKEN $$ $(date +%s%N)\" >> '{}'; i=$((i+1)); sleep 0.05; done",
            self.log().display()
        );
        let mut cmd = tandemctl();
        cmd.args(["lease", "run", "--resource", "db", "--host-id", &host.to_string(), "--device"])
            .arg(self.device())
            .args(["--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        Contender { child: Some(cmd.spawn().unwrap()) }
    }
}

/// A running `tandemctl lease run`; killed on drop.
struct Contender {
    child: Option<Child>,
}

impl Contender {
    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }
    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill with a pid we own.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }
    fn wait_within(&mut self, d: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(start.elapsed() < d, "tandemctl (pid {}) did not exit within {d:?}", self.pid());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Contender {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Line {
    token: u64,
    pid: i32,
    ns: u128,
}

fn read_log(path: &Path) -> Vec<Line> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "malformed log line {l:?}");
            Line { token: f[0].parse().unwrap(), pid: f[1].parse().unwrap(), ns: f[2].parse().unwrap() }
        })
        .collect()
}

/// The invariants every case must hold: in log order tokens never decrease (a stale token never
/// writes after a newer one, and intervals of different tokens never interleave), each token is
/// used by exactly one writer process, and the time stamps of different tokens do not overlap.
/// Returns the tokens in order of appearance.
fn check_log(lines: &[Line]) -> Vec<u64> {
    let mut order: Vec<u64> = Vec::new();
    let mut writer: HashMap<u64, i32> = HashMap::new();
    for (i, l) in lines.iter().enumerate() {
        if let Some(&last) = order.last() {
            assert!(l.token >= last, "line {i}: token {} writes after newer token {last}: {lines:#?}", l.token);
        }
        if order.last() != Some(&l.token) {
            order.push(l.token);
        }
        let w = *writer.entry(l.token).or_insert(l.pid);
        assert_eq!(w, l.pid, "line {i}: token {} used by two writers", l.token);
        if i > 0 && lines[i - 1].token != l.token {
            assert!(
                lines[i - 1].ns < l.ns,
                "line {i}: first write of token {} is not after the last of {}",
                l.token,
                lines[i - 1].token
            );
        }
    }
    order
}

fn wait_for(what: &str, d: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < d, "timed out after {d:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

const LONG: Duration = Duration::from_secs(60);

#[test]
fn contenders_serialize_with_increasing_tokens() {
    let area = Area::new();
    let mut cs: Vec<Contender> = (1..=3).map(|h| area.contender(h, 6, &[])).collect();
    for c in &mut cs {
        let st = c.wait_within(LONG);
        assert_eq!(st.code(), Some(0), "contender failed: {st}");
    }
    let lines = read_log(&area.log());
    assert_eq!(lines.len(), 18);
    let tokens = check_log(&lines);
    assert_eq!(tokens.len(), 3, "each contender holds the lease once: {tokens:?}");
}

#[test]
fn sigkill_of_holder_fences_its_command_and_another_takes_over() {
    let area = Area::new();
    let mut holder = area.contender(1, 0, &[]);
    wait_for("the holder's first write", LONG, || !read_log(&area.log()).is_empty());
    let old = read_log(&area.log())[0].clone();
    let mut next = area.contender(2, 5, &[]);
    std::thread::sleep(Duration::from_millis(500));
    holder.signal(libc::SIGKILL);
    holder.wait_within(LONG);
    // The guard sees the pipe close and kills the writer at once.
    wait_for("the old writer to be killed", Duration::from_secs(10), || process_gone(old.pid));
    assert_eq!(next.wait_within(LONG).code(), Some(0));
    let tokens = check_log(&read_log(&area.log()));
    assert_eq!(tokens.len(), 2);
    assert!(tokens[1] > tokens[0]);
}

#[test]
fn sigstopped_holder_is_fenced_before_takeover_and_exits_lost_on_resume() {
    let area = Area::new();
    let mut holder = area.contender(1, 0, &[]);
    wait_for("the holder's first write", LONG, || !read_log(&area.log()).is_empty());
    let old = read_log(&area.log())[0].clone();
    let mut next = area.contender(2, 5, &[]);
    std::thread::sleep(Duration::from_millis(500));
    holder.signal(libc::SIGSTOP);
    assert_eq!(next.wait_within(LONG).code(), Some(0));
    assert!(process_gone(old.pid), "the stopped holder's writer still runs after takeover");
    let lines = read_log(&area.log());
    let tokens = check_log(&lines);
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    assert!(tokens[1] > old.token);
    holder.signal(libc::SIGCONT);
    let st = holder.wait_within(Duration::from_secs(20));
    assert_eq!(st.code(), Some(EXIT_LOST), "resumed holder must report the lease as lost: {st}");
    // Nothing was written by the old token after the resume.
    assert_eq!(check_log(&read_log(&area.log())), tokens);
}

#[test]
fn io_errors_on_the_holder_fence_it_before_takeover() {
    let area = Area::new();
    let fault = area.path("fault");
    let spec = format!("fail-if-exists={}", fault.display());
    let mut holder = area.contender(1, 0, &[("TANDEM_LEASE_FAULTS", &spec)]);
    wait_for("the holder's first write", LONG, || !read_log(&area.log()).is_empty());
    let old = read_log(&area.log())[0].clone();
    let mut next = area.contender(2, 5, &[]);
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&fault, b"").unwrap();
    let st = holder.wait_within(LONG);
    assert_eq!(st.code(), Some(EXIT_LOST), "{st}");
    assert!(process_gone(old.pid));
    assert_eq!(next.wait_within(LONG).code(), Some(0));
    let tokens = check_log(&read_log(&area.log()));
    assert_eq!(tokens.len(), 2, "{tokens:?}");
}

#[test]
fn acquire_timeout_has_its_own_status_and_runs_nothing() {
    let area = Area::new();
    let _holder = area.contender(1, 0, &[]);
    wait_for("the holder's first write", LONG, || !read_log(&area.log()).is_empty());
    let marker = area.path("ran");
    let st = tandemctl()
        .args(["lease", "run", "--resource", "db", "--host-id", "2", "--timeout", "1", "--device"])
        .arg(area.device())
        .args(["--", "touch"])
        .arg(&marker)
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(EXIT_TIMEOUT));
    assert!(!marker.exists());
    check_log(&read_log(&area.log()));
}

/// Runs `lease run` and `lease dump` against a damaged area: both fail with the usage/area status,
/// say what is wrong, and leave the file byte-for-byte unchanged.
fn assert_rejected(area: &Area, cluster: &str, expect: &str) {
    let before = std::fs::read(area.device()).unwrap();
    let device = area.device();
    let dev = device.to_str().unwrap();
    let run =
        ["lease", "run", "--host-id", "1", "--resource", "db", "--cluster-id", cluster, "--device", dev, "--", "true"];
    let dump = ["lease", "dump", "--cluster-id", cluster, "--device", dev];
    for args in [&run[..], &dump[..]] {
        let out = tandemctl().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_USAGE), "{args:?}: {err}");
        assert!(err.to_lowercase().contains(expect), "{args:?}: expected {expect:?} in {err}");
    }
    assert!(std::fs::read(area.device()).unwrap() == before, "the area was modified");
}

#[test]
fn damaged_or_foreign_areas_are_rejected_unchanged() {
    let area = Area::new();
    assert_rejected(&area, "other-cluster", "belongs to cluster");

    let mut bytes = std::fs::read(area.device()).unwrap();
    bytes[40] ^= 0xff;
    std::fs::write(area.device(), &bytes).unwrap();
    assert_rejected(&area, "tandem", "header is not valid");

    let area = Area::new();
    let len = std::fs::metadata(area.device()).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(area.device()).unwrap().set_len(len / 2).unwrap();
    assert_rejected(&area, "tandem", "truncated");

    // An unsupported sector size is refused before anything is written.
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("x.lease");
    let st = tandemctl().args(["lease", "init", "--sector-size", "1024", "--device"]).arg(&dev).status().unwrap();
    assert_eq!(st.code(), Some(EXIT_USAGE));
    assert!(!dev.exists());

    // Re-initialising needs --force.
    let area = Area::new();
    let before = std::fs::read(area.device()).unwrap();
    let out = tandemctl().args(["lease", "init", "--device"]).arg(area.device()).output().unwrap();
    assert_eq!(out.status.code(), Some(EXIT_USAGE));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert!(std::fs::read(area.device()).unwrap() == before, "init without --force modified the area");
}

#[test]
fn dump_shows_the_holder_and_observes_liveness() {
    let area = Area::new();
    let mut holder = area.contender(1, 0, &[]);
    wait_for("the holder's first write", LONG, || !read_log(&area.log()).is_empty());
    let token = read_log(&area.log())[0].token;
    let out = tandemctl().args(["lease", "dump", "--json", "--device"]).arg(area.device()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let res = &v["resources"][0];
    assert_eq!(res["name"], "db");
    assert_eq!(res["owner"], 1);
    assert_eq!(res["token"], token);
    assert!(v["hosts"][0]["liveness"].as_str().unwrap().starts_with("unknown"), "{v}");
    // Observing for T tells a renewing holder apart from a dead one.
    let out = tandemctl().args(["lease", "dump", "--observe", "--device"]).arg(area.device()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("host   1:") && text.contains("alive"), "{text}");
    assert!(text.contains(&format!("held by host 1, token {token}")), "{text}");
    holder.signal(libc::SIGKILL);
    holder.wait_within(LONG);
    let out = tandemctl().args(["lease", "dump", "--observe", "--device"]).arg(area.device()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("dead"), "{text}");
    check_log(&read_log(&area.log()));
}

#[test]
fn hung_lease_disk_on_the_holder_fences_it_before_takeover() {
    let area = Area::new();
    let stall = area.path("stall");
    let spec = format!("stall-if-exists={}", stall.display());
    let mut holder = area.contender(1, 0, &[("TANDEM_LEASE_FAULTS", &spec)]);
    wait_for("the holder's first write", LONG, || !read_log(&area.log()).is_empty());
    let old = read_log(&area.log())[0].clone();
    let mut next = area.contender(2, 5, &[]);
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&stall, b"").unwrap();
    // The renewal blocks in I/O; the holder still sees its deadline pass and fences COMMAND.
    let st = holder.wait_within(LONG);
    assert_eq!(st.code(), Some(EXIT_LOST), "{st}");
    assert!(process_gone(old.pid));
    assert_eq!(next.wait_within(LONG).code(), Some(0));
    let tokens = check_log(&read_log(&area.log()));
    assert_eq!(tokens.len(), 2, "{tokens:?}");
}

#[test]
fn commands_exit_status_is_passed_through_and_a_watchdog_is_kept_alive_then_disarmed() {
    // A watchdog needs M >= grace + 1 s: R = 2 s gives M = 2 s with the default grace of 1 s.
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("area.lease");
    let st = tandemctl()
        .args(["lease", "init", "--hosts", "4", "--resources", "4", "--renewal-ms", "2000", "--device"])
        .arg(&device)
        .status()
        .unwrap();
    assert!(st.success());
    // A FIFO stands in for /dev/watchdog (it takes keepalive writes and refuses the timeout
    // ioctl, which the guard reports and survives).
    let fifo = dir.path().join("watchdog");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let reader = std::thread::spawn({
        let fifo = fifo.clone();
        move || std::fs::read(&fifo).unwrap()
    });
    let out = tandemctl()
        .args(["lease", "run", "--resource", "db", "--host-id", "1", "--watchdog"])
        .arg(&fifo)
        .arg("--device")
        .arg(&device)
        // Long enough for a renewal or two to pet the watchdog, then a distinctive status.
        .args(["--", "sh", "-c", "sleep 4; exit 3"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "COMMAND's own status: {stderr}");
    let bytes = reader.join().unwrap();
    assert!(bytes.len() >= 2 && bytes.ends_with(b"V"), "keepalives then the magic close: {bytes:?}");
    assert!(bytes[..bytes.len() - 1].iter().all(|&b| b == b'k'), "{bytes:?}");
    assert!(stderr.contains("cannot set its timeout"), "{stderr}");

    // Timeouts that leave the watchdog no second after the SIGKILL are refused up front.
    let fast = Area::new();
    let out = tandemctl()
        .args(["lease", "run", "--resource", "db", "--host-id", "1", "--watchdog"])
        .arg(&fifo)
        .arg("--device")
        .arg(fast.device())
        .args(["--", "true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_USAGE), "{stderr}");
    assert!(stderr.contains("hardware watchdog needs kill margin"), "{stderr}");
    // A device that cannot be opened: the guard never becomes ready, nothing runs.
    let marker = dir.path().join("ran");
    let out = tandemctl()
        .args(["lease", "run", "--resource", "db", "--host-id", "1", "--watchdog", "/nonexistent/watchdog", "--device"])
        .arg(&device)
        .args(["--", "touch"])
        .arg(&marker)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(70), "{stderr}");
    assert!(stderr.contains("/nonexistent/watchdog") && stderr.contains("did not become ready"), "{stderr}");
    assert!(!marker.exists());
}
