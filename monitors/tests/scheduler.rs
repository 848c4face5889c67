//! The monitor scheduler: timing under tokio's paused clock with fake
//! probes (pure scheduling logic), and real TCP / exec probes in real time.

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_monitors::exec::{ExecProbe, live_group_members};
use tandem_monitors::scheduler::{MonitorDef, MonitorEvent, MonitorState, Scheduler, SchedulerConfig, SchedulerError};
use tandem_monitors::{
    CheckFuture, Deadline, FailureClass, Probe, ProbeFailure, ProbeSpec, ProbeSuccess, RunLimits, Status, build_probe,
};
use tandem_testkit::free_port;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Shared across all fake probes of a test.
#[derive(Debug, Default)]
struct Stats {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    overlaps: AtomicUsize,
    cancelled: AtomicUsize,
}

/// One fake monitor's record.
#[derive(Debug, Default)]
struct Record {
    running: AtomicBool,
    starts: Mutex<Vec<Instant>>,
}

#[derive(Debug)]
struct Fake {
    duration: Duration,
    /// Replaces `duration` for the first run only.
    first_duration: Mutex<Option<Duration>>,
    script: Mutex<VecDeque<Status>>,
    stats: Arc<Stats>,
    rec: Arc<Record>,
}

/// Counts a run in flight; on drop before `finish`, the run was cancelled.
struct InFlight<'a> {
    f: &'a Fake,
    done: bool,
}

impl<'a> InFlight<'a> {
    fn enter(f: &'a Fake) -> Self {
        if f.rec.running.swap(true, Ordering::SeqCst) {
            f.stats.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        let n = f.stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        f.stats.max_in_flight.fetch_max(n, Ordering::SeqCst);
        f.rec.starts.lock().unwrap().push(Instant::now());
        Self { f, done: false }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.f.stats.cancelled.fetch_add(1, Ordering::SeqCst);
        }
        self.f.rec.running.store(false, Ordering::SeqCst);
        self.f.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Probe for Fake {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn target(&self) -> String {
        "fake".into()
    }

    fn check<'a>(&'a self, _deadline: Deadline) -> CheckFuture<'a> {
        Box::pin(async move {
            let mut g = InFlight::enter(self);
            let d = self.first_duration.lock().unwrap().take().unwrap_or(self.duration);
            tokio::time::sleep(d).await;
            g.done = true;
            drop(g);
            let status = {
                let mut s = self.script.lock().unwrap();
                if s.len() > 1 { s.pop_front().unwrap() } else { s.front().copied().unwrap_or(Status::Ok) }
            };
            match status {
                Status::Ok => Ok(ProbeSuccess::new("fine")),
                s => Err(ProbeFailure { status: s, class: FailureClass::UnexpectedAnswer, reason: "scripted".into() }),
            }
        })
    }
}

fn fake(
    id: &str,
    interval_ms: u64,
    duration_ms: u64,
    script: &[Status],
    retries: u32,
    stats: &Arc<Stats>,
) -> (MonitorDef, Arc<Record>) {
    let rec = Arc::new(Record::default());
    let probe = Fake {
        duration: Duration::from_millis(duration_ms),
        first_duration: Mutex::new(None),
        script: Mutex::new(script.iter().copied().collect()),
        stats: stats.clone(),
        rec: rec.clone(),
    };
    let def = MonitorDef {
        id: id.into(),
        probe: Box::new(probe),
        limits: RunLimits { timeout: Duration::from_secs(5), warning: None },
        interval: Duration::from_millis(interval_ms),
        retries,
    };
    (def, rec)
}

fn cfg(max_concurrent: usize) -> SchedulerConfig {
    SchedulerConfig { max_concurrent, ..Default::default() }
}

async fn collect_until(rx: &mut mpsc::Receiver<MonitorEvent>, until: Instant) -> Vec<MonitorEvent> {
    let mut out = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout_at(until, rx.recv()).await {
        out.push(ev);
    }
    out
}

fn count_by_id(evs: &[MonitorEvent]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in evs {
        *m.entry(e.id.clone()).or_insert(0) += 1;
    }
    m
}

#[tokio::test(start_paused = true)]
async fn intervals_are_kept_and_first_runs_spread() {
    let stats = Arc::new(Stats::default());
    let (sched, mut rx) = Scheduler::new(cfg(16));
    let t0 = Instant::now();
    let mut recs = Vec::new();
    for i in 0..5 {
        let (def, rec) = fake(&format!("m{i}"), 1000, 100, &[Status::Ok], 1, &stats);
        sched.add(def).unwrap();
        recs.push(rec);
    }
    let evs = collect_until(&mut rx, t0 + Duration::from_millis(10_500)).await;
    for (id, n) in count_by_id(&evs) {
        assert!((9..=11).contains(&n), "{id} ran {n} times in 10.5 s at a 1 s interval");
    }
    let firsts: Vec<Duration> = recs.iter().map(|r| r.starts.lock().unwrap()[0] - t0).collect();
    assert!(firsts.iter().all(|d| *d < Duration::from_secs(1)), "first runs within one interval: {firsts:?}");
    assert!(firsts.iter().any(|d| *d != firsts[0]), "jittered start spreads first runs: {firsts:?}");
    for r in &recs {
        let s = r.starts.lock().unwrap();
        for w in s.windows(2) {
            let gap = w[1] - w[0];
            // Grid interval ± the per-run jitter (capped at interval/10).
            assert!(gap >= Duration::from_millis(900) && gap <= Duration::from_millis(1100), "gap {gap:?}");
        }
    }
    assert_eq!(stats.overlaps.load(Ordering::SeqCst), 0);
    sched.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn global_concurrency_bound_is_never_exceeded() {
    let stats = Arc::new(Stats::default());
    let (sched, mut rx) = Scheduler::new(cfg(3));
    for i in 0..12 {
        let (def, _) = fake(&format!("m{i}"), 1000, 400, &[Status::Ok], 1, &stats);
        sched.add(def).unwrap();
    }
    let evs = collect_until(&mut rx, Instant::now() + Duration::from_secs(10)).await;
    assert_eq!(
        stats.max_in_flight.load(Ordering::SeqCst),
        3,
        "demand exceeds the bound, so it is reached but never passed"
    );
    assert_eq!(stats.overlaps.load(Ordering::SeqCst), 0);
    // 3 slots of 0.4 s runs for 10 s: at most 75 runs, plus the runs in flight at the end.
    assert!(evs.len() <= 78 && evs.len() >= 50, "{} runs", evs.len());
    assert_eq!(count_by_id(&evs).len(), 12, "every monitor gets its turn");
    sched.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_overrunning_monitor_skips_slots_instead_of_stacking() {
    let stats = Arc::new(Stats::default());
    let (sched, mut rx) = Scheduler::new(cfg(16));
    let (def, rec) = fake("slow", 100, 350, &[Status::Ok], 1, &stats);
    sched.add(def).unwrap();
    let evs = collect_until(&mut rx, Instant::now() + Duration::from_millis(3050)).await;
    assert_eq!(stats.overlaps.load(Ordering::SeqCst), 0, "two runs of one monitor at once");
    assert!((6..=9).contains(&evs.len()), "{} runs of 350 ms in 3 s", evs.len());
    let s = rec.starts.lock().unwrap().clone();
    for w in s.windows(2) {
        let gap = w[1] - w[0];
        // The next free grid slot after a 350 ms run is 400 ms later (+ up to 10 ms jitter).
        assert!(gap >= Duration::from_millis(350) && gap <= Duration::from_millis(420), "gap {gap:?}");
    }
    sched.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn missed_slots_are_not_caught_up_in_a_burst() {
    let stats = Arc::new(Stats::default());
    let mut c = cfg(4);
    c.start_jitter = false;
    let (sched, mut rx) = Scheduler::new(c);
    let (mut def, rec) = fake("m", 1000, 10, &[Status::Ok], 1, &stats);
    // The first run overruns 2.5 intervals.
    let probe = Fake {
        duration: Duration::from_millis(10),
        first_duration: Mutex::new(Some(Duration::from_millis(2500))),
        script: Mutex::new([Status::Ok].into_iter().collect()),
        stats: stats.clone(),
        rec: rec.clone(),
    };
    def.probe = Box::new(probe);
    sched.add(def).unwrap();
    let t0 = Instant::now();
    let _ = collect_until(&mut rx, t0 + Duration::from_millis(5_500)).await;
    let starts: Vec<Duration> = rec.starts.lock().unwrap().iter().map(|s| *s - t0).collect();
    // Slots 1 s and 2 s were missed; the next run is at the 3 s slot, then 4 s and 5 s.
    assert_eq!(starts.len(), 4, "{starts:?}");
    for (s, want) in starts.iter().zip([0u64, 3000, 4000, 5000]) {
        let want = Duration::from_millis(want);
        assert!(*s >= want && *s <= want + Duration::from_millis(100), "start {s:?}, expected ~{want:?}: {starts:?}");
    }
    sched.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn failures_are_confirmed_after_retries_and_recovery_is_immediate() {
    use Status::*;
    let stats = Arc::new(Stats::default());
    let (sched, mut rx) = Scheduler::new(cfg(4));
    let script = [Ok, Critical, Critical, Ok, Critical, Critical, Critical, Warning, Ok];
    let (def, _) = fake("app", 1000, 10, &script, 3, &stats);
    sched.add(def).unwrap();
    let evs = collect_until(&mut rx, Instant::now() + Duration::from_millis(9_500)).await;
    assert!(evs.len() >= script.len(), "{evs:?}");
    let raw: Vec<Status> = evs.iter().take(9).map(|e| e.result.status).collect();
    assert_eq!(raw, script, "every raw result is reported");
    let states: Vec<(MonitorState, bool, u32)> =
        evs.iter().take(9).map(|e| (e.state, e.changed, e.consecutive_failures)).collect();
    let ok = MonitorState::Ok;
    assert_eq!(
        states,
        vec![
            (ok, true, 0),
            (ok, false, 1),
            (ok, false, 2),
            (ok, false, 0),
            (ok, false, 1),
            (ok, false, 2),
            (MonitorState::Failed(Critical), true, 3),
            (MonitorState::Failed(Warning), true, 4),
            (ok, true, 0),
        ]
    );
    sched.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn pending_until_first_confirmation() {
    let stats = Arc::new(Stats::default());
    let mut c = cfg(4);
    c.start_jitter = false;
    let (sched, mut rx) = Scheduler::new(c);
    let (def, _) = fake("down", 1000, 10, &[Status::Critical], 2, &stats);
    sched.add(def).unwrap();
    // Runs at about 0 and 1 s.
    let evs = collect_until(&mut rx, Instant::now() + Duration::from_millis(1_500)).await;
    assert_eq!(evs.len(), 2, "{evs:?}");
    assert_eq!((evs[0].state, evs[0].changed), (MonitorState::Pending, false));
    assert_eq!((evs[1].state, evs[1].changed), (MonitorState::Failed(Status::Critical), true));
    sched.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn suspend_cancels_the_run_in_flight_and_resume_runs_soon() {
    let stats = Arc::new(Stats::default());
    let mut c = cfg(4);
    c.start_jitter = false;
    let (sched, mut rx) = Scheduler::new(c);
    let (def, rec) = fake("m", 1000, 500, &[Status::Ok], 1, &stats);
    sched.add(def).unwrap();
    let t0 = Instant::now();
    // Runs start at about 0, 1, 2 s and last 0.5 s; at 2.2 s one is in flight.
    let evs = collect_until(&mut rx, t0 + Duration::from_millis(2_200)).await;
    assert_eq!(evs.len(), 2);
    assert_eq!(stats.in_flight.load(Ordering::SeqCst), 1, "a run is in flight");
    sched.suspend("m").unwrap();
    let during = collect_until(&mut rx, t0 + Duration::from_millis(8_000)).await;
    assert!(during.is_empty(), "events while suspended: {during:?}");
    assert_eq!(stats.cancelled.load(Ordering::SeqCst), 1, "the in-flight run was cancelled");
    assert_eq!(stats.in_flight.load(Ordering::SeqCst), 0);
    assert_eq!(rec.starts.lock().unwrap().len(), 3);

    let resumed_at = Instant::now();
    sched.resume("m").unwrap();
    let ev = tokio::time::timeout(Duration::from_millis(700), rx.recv()).await.expect("an event soon after resume");
    assert_eq!(ev.unwrap().result.status, Status::Ok);
    let starts = rec.starts.lock().unwrap().clone();
    assert!(starts[3] - resumed_at <= Duration::from_millis(100), "resumed run started late");
    sched.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn add_remove_and_errors() {
    let stats = Arc::new(Stats::default());
    let (sched, mut rx) = Scheduler::new(cfg(4));
    sched.add(fake("a", 500, 10, &[Status::Ok], 1, &stats).0).unwrap();
    sched.add(fake("b", 500, 10, &[Status::Ok], 1, &stats).0).unwrap();
    let e = sched.add(fake("a", 500, 10, &[Status::Ok], 1, &stats).0).unwrap_err();
    assert!(matches!(e, SchedulerError::Duplicate(ref id) if id == "a"), "{e}");
    let e = sched.add(fake("z", 0, 10, &[Status::Ok], 1, &stats).0).unwrap_err();
    assert!(matches!(e, SchedulerError::ZeroInterval(_)), "{e}");
    assert_eq!(sched.ids(), ["a", "b"]);

    let before = collect_until(&mut rx, Instant::now() + Duration::from_secs(2)).await;
    assert_eq!(count_by_id(&before).len(), 2);
    sched.remove("a").await.unwrap();
    // Events already queued before the removal may still be in the channel.
    let after: Vec<_> = collect_until(&mut rx, Instant::now() + Duration::from_secs(3)).await;
    let queued_a = after.iter().take_while(|e| e.id == "a").count();
    assert!(after[queued_a..].iter().all(|e| e.id == "b"), "events for a removed monitor: {after:?}");
    assert!(after.len() - queued_a >= 5, "b keeps running: {after:?}");
    assert_eq!(sched.ids(), ["b"]);
    assert!(matches!(sched.remove("a").await, Err(SchedulerError::NotFound(_))));
    assert!(matches!(sched.suspend("nope"), Err(SchedulerError::NotFound(_))));

    // Re-adding a removed id works.
    sched.add(fake("a", 500, 10, &[Status::Ok], 1, &stats).0).unwrap();
    let again = collect_until(&mut rx, Instant::now() + Duration::from_secs(2)).await;
    assert!(again.iter().any(|e| e.id == "a"));

    sched.shutdown().await;
    assert!(sched.ids().is_empty());
    assert!(matches!(sched.add(fake("c", 500, 10, &[Status::Ok], 1, &stats).0), Err(SchedulerError::ShutDown)));
    assert_eq!(stats.in_flight.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn real_tcp_probes_ok_and_refused_with_retries() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            drop(s);
        }
    });
    let closed = free_port();
    let (sched, mut rx) = Scheduler::new(cfg(4));
    for (id, p) in [("up", port), ("down", closed)] {
        let spec = ProbeSpec { target: format!("tcp://127.0.0.1:{p}"), ..Default::default() };
        sched
            .add(MonitorDef {
                id: id.into(),
                probe: build_probe(&spec).unwrap(),
                limits: RunLimits { timeout: Duration::from_secs(2), warning: None },
                interval: Duration::from_millis(200),
                retries: 2,
            })
            .unwrap();
    }
    let evs = collect_until(&mut rx, Instant::now() + Duration::from_millis(2_500)).await;
    sched.shutdown().await;
    server.abort();
    let up: Vec<_> = evs.iter().filter(|e| e.id == "up").collect();
    let down: Vec<_> = evs.iter().filter(|e| e.id == "down").collect();
    assert!((5..=14).contains(&up.len()), "{} runs of `up` in 2.5 s at 200 ms", up.len());
    assert!((5..=14).contains(&down.len()), "{} runs of `down`", down.len());
    assert!(up.iter().all(|e| e.result.status == Status::Ok && e.state == MonitorState::Ok), "{up:?}");
    assert!(down.iter().all(|e| e.result.class == Some(FailureClass::Refused)), "{down:?}");
    assert_eq!((down[0].state, down[0].changed), (MonitorState::Pending, false));
    assert_eq!((down[1].state, down[1].changed), (MonitorState::Failed(Status::Critical), true));
    assert!(down[2..].iter().all(|e| !e.changed));
}

fn read_pid(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

async fn wait_file_pid(p: &Path) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(pid) = read_pid(p) {
            return pid;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{} never written", p.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn assert_group_gone(pgid: i32) {
    let start = Instant::now();
    while !live_group_members(pgid).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(3), "group {pgid} survived: {:?}", live_group_members(pgid));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn remove_and_shutdown_kill_a_running_plugin_group() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(4);
    c.start_jitter = false;
    let (sched, _rx) = Scheduler::new(c);
    for id in ["one", "two"] {
        let d = dir.path().join(id);
        std::fs::create_dir(&d).unwrap();
        let script = d.join("hang.sh");
        std::fs::write(&script, format!("#!/bin/sh\necho $$ > {0}/leader\nsleep 1000 &\nsleep 1000\n", d.display()))
            .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        sched
            .add(MonitorDef {
                id: id.into(),
                probe: Box::new(ExecProbe::new(script.display().to_string(), vec![])),
                limits: RunLimits { timeout: Duration::from_secs(600), warning: None },
                interval: Duration::from_secs(1000),
                retries: 1,
            })
            .unwrap();
    }
    let one = wait_file_pid(&dir.path().join("one/leader")).await;
    let two = wait_file_pid(&dir.path().join("two/leader")).await;
    // Both groups hold two live processes (the script and its sleeper), give or take a fork.
    assert!(!live_group_members(one).is_empty() && !live_group_members(two).is_empty());
    sched.remove("one").await.unwrap();
    assert_group_gone(one).await;
    assert!(!live_group_members(two).is_empty(), "removing one monitor must not touch another");
    sched.shutdown().await;
    assert_group_gone(two).await;
}
