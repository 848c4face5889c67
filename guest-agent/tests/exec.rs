//! The exec resource against real programs: daemons that setsid() and are
//! still contained by the cgroup, timeouts, monitor codes, simple services,
//! user switching, forced and repeated stops.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{TestCgroup, alive, ctx, read_pid, script, wait_until};
use tandem_config::{ExecMode, ExecResource as ExecConfig, ResourceKind};
use tandem_guest::resources::{Health, Resource, ResourceEnv, ResourceError, build};

fn cfg(start: &[&str], stop: &[&str]) -> ExecConfig {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    ExecConfig {
        mode: ExecMode::Forking,
        start: v(start),
        stop: v(stop),
        monitor: Vec::new(),
        start_timeout: Duration::from_secs(20),
        stop_timeout: Duration::from_secs(20),
        monitor_timeout: Duration::from_secs(10),
        env: BTreeMap::new(),
        cwd: None,
        user: None,
    }
}

fn make(name: &str, c: ExecConfig, cg: Option<&TestCgroup>) -> Result<Box<dyn Resource>, ResourceError> {
    let mut env = ResourceEnv::new("node-a");
    env.kill_grace = Duration::from_millis(300);
    if let Some(cg) = cg {
        env = env.with_cgroup(&cg.path);
    }
    let spec = tandem_config::Resource { name: name.into(), depends_on: Vec::new(), kind: ResourceKind::Exec(c) };
    build("g1", &spec, &env)
}

/// A forking start: a daemon that leaves its process group with setsid and
/// records its pid and environment in `dir`.
fn daemon_start(dir: &Path) -> String {
    script(
        dir,
        "start.sh",
        r#"setsid sh -c 'echo $$ > "$0/daemon.pid"; echo "$TANDEM_FENCING_TOKEN $TANDEM_GROUP $TANDEM_RESOURCE $FOO $(pwd)" > "$0/env"; exec sleep 300' "$1" </dev/null >/dev/null 2>&1 &
echo started"#,
    )
}

#[tokio::test]
async fn forking_daemon_that_setsids_is_contained_and_killed_by_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let cg = TestCgroup::new("exec-fork");
    let d = tmp.path().display().to_string();
    let start = daemon_start(tmp.path());
    let mut c = cfg(&[&start, &d], &["/bin/true"]);
    c.env.insert("FOO".into(), "bar".into());
    c.cwd = Some(tmp.path().to_path_buf());
    let r = make("app", c, Some(&cg)).unwrap();

    assert_eq!(r.check().await, Health::Stopped, "nothing started yet");
    r.start(&ctx("g1", "app", 42)).await.unwrap();
    let pid = read_pid(&tmp.path().join("daemon.pid"));
    assert!(alive(pid));
    // It left our process group, but not the cgroup.
    let procs = std::fs::read_to_string(cg.path.join("app/service/cgroup.procs")).unwrap();
    assert!(procs.lines().any(|l| l.trim() == pid.to_string()), "daemon {pid} not in cgroup: {procs}");
    assert!(wait_until(Duration::from_secs(5), || tmp.path().join("env").exists()));
    let env = std::fs::read_to_string(tmp.path().join("env")).unwrap();
    assert_eq!(env.trim(), format!("42 g1 app bar {}", tmp.path().display()));
    assert_eq!(r.check().await, Health::Running, "checked through the non-empty cgroup");

    // `stop` does nothing here: the leftovers in the cgroup are killed.
    r.stop(false).await.unwrap();
    assert!(wait_until(Duration::from_secs(5), || !alive(pid)), "daemon {pid} survived stop");
    assert_eq!(r.check().await, Health::Stopped);
    assert!(!cg.path.join("app").exists(), "resource cgroup removed after stop");
    // Stopping a stopped resource succeeds.
    r.stop(false).await.unwrap();
    r.stop(true).await.unwrap();
}

#[tokio::test]
async fn start_timeout_kills_the_process_group_and_the_cgroup() {
    let tmp = tempfile::tempdir().unwrap();
    let cg = TestCgroup::new("exec-timeout");
    let start = script(
        tmp.path(),
        "start.sh",
        &format!(
            "setsid sh -c 'echo $$ > {0}/escaped.pid; exec sleep 300' </dev/null >/dev/null 2>&1 &\necho $$ > {0}/start.pid\nexec sleep 300",
            tmp.path().display()
        ),
    );
    let mut c = cfg(&[&start], &["/bin/true"]);
    c.start_timeout = Duration::from_secs(1);
    let r = make("slow", c, Some(&cg)).unwrap();
    let t0 = Instant::now();
    let err = r.start(&ctx("g1", "slow", 1)).await.unwrap_err();
    assert!(matches!(err, ResourceError::Timeout { op: "start", .. }), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    let escaped = read_pid(&tmp.path().join("escaped.pid"));
    let leader = read_pid(&tmp.path().join("start.pid"));
    assert!(
        wait_until(Duration::from_secs(5), || !alive(escaped) && !alive(leader)),
        "start's processes survived the timeout"
    );
    assert!(!cg.cgroup().is_populated().unwrap());
}

#[tokio::test]
async fn monitor_exit_codes_map_to_health() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let monitor = script(
        tmp.path(),
        "monitor.sh",
        &format!(
            "case $(cat {0} 2>/dev/null) in up) exit 0;; broken) echo 'database is corrupt'; echo second; exit 1;; hang) sleep 300;; *) exit 7;; esac",
            state.display()
        ),
    );
    let start = script(tmp.path(), "start.sh", &format!("echo up > {}", state.display()));
    let stop = script(tmp.path(), "stop.sh", &format!("echo down > {}", state.display()));
    let mut c = cfg(&[&start], &[&stop]);
    c.monitor = vec![monitor];
    c.monitor_timeout = Duration::from_secs(1);
    // A monitor makes a cgroup unnecessary.
    let r = make("m", c, None).unwrap();
    assert_eq!(r.check().await, Health::Stopped);
    r.start(&ctx("g1", "m", 7)).await.unwrap();
    assert_eq!(r.check().await, Health::Running);
    std::fs::write(&state, "broken").unwrap();
    match r.check().await {
        Health::Failed(why) => assert!(why.contains("exit code 1") && why.contains("database is corrupt"), "{why}"),
        h => panic!("expected failed, got {h:?}"),
    }
    std::fs::write(&state, "hang").unwrap();
    let t0 = Instant::now();
    match r.check().await {
        Health::Failed(why) => assert!(why.contains("did not finish"), "{why}"),
        h => panic!("expected failed, got {h:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(8));
    std::fs::write(&state, "up").unwrap();
    r.stop(false).await.unwrap();
    assert_eq!(std::fs::read_to_string(&state).unwrap().trim(), "down");
    assert_eq!(r.check().await, Health::Stopped);
    // Already stopped (monitor says 7): stop is not run again, and succeeds.
    std::fs::write(&state, "stopped-elsewhere").unwrap();
    r.stop(false).await.unwrap();
    assert_eq!(std::fs::read_to_string(&state).unwrap().trim(), "stopped-elsewhere");
}

#[test]
fn forking_without_monitor_or_cgroup_is_refused_at_build() {
    let err = make("x", cfg(&["/bin/true"], &["/bin/true"]), None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ResourceError::Config { .. }), "{msg}");
    assert!(msg.contains("g1/x") && msg.contains("monitor") && msg.contains("cgroup"), "{msg}");
    let mut c = cfg(&["/bin/true"], &["/bin/true"]);
    c.user = Some("no-such-user-tandem".into());
    c.monitor = vec!["/bin/true".into()];
    let msg = make("x", c, None).unwrap_err().to_string();
    assert!(msg.contains("no-such-user-tandem") && msg.contains("does not exist"), "{msg}");
}

#[tokio::test]
async fn force_stop_kills_without_running_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let cg = TestCgroup::new("exec-force");
    let d = tmp.path().display().to_string();
    let start = daemon_start(tmp.path());
    let stop = script(tmp.path(), "stop.sh", &format!("touch {d}/stop-ran"));
    let r = make("app", cfg(&[&start, &d], &[&stop]), Some(&cg)).unwrap();
    r.start(&ctx("g1", "app", 3)).await.unwrap();
    let pid = read_pid(&tmp.path().join("daemon.pid"));
    r.stop(true).await.unwrap();
    assert!(wait_until(Duration::from_secs(5), || !alive(pid)));
    assert!(!tmp.path().join("stop-ran").exists(), "force stop ran `stop`");
    assert_eq!(r.check().await, Health::Stopped);
}

#[tokio::test]
async fn hung_stop_is_bounded_and_leftovers_are_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let cg = TestCgroup::new("exec-hungstop");
    let d = tmp.path().display().to_string();
    let start = daemon_start(tmp.path());
    let stop = script(tmp.path(), "stop.sh", &format!("echo $$ > {d}/stop.pid; exec sleep 300"));
    let mut c = cfg(&[&start, &d], &[&stop]);
    c.stop_timeout = Duration::from_secs(1);
    let r = make("app", c, Some(&cg)).unwrap();
    r.start(&ctx("g1", "app", 3)).await.unwrap();
    let pid = read_pid(&tmp.path().join("daemon.pid"));
    let t0 = Instant::now();
    r.stop(false).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    let stop_pid = read_pid(&tmp.path().join("stop.pid"));
    assert!(wait_until(Duration::from_secs(5), || !alive(pid) && !alive(stop_pid)));
    assert!(!cg.cgroup().is_populated().unwrap());
}

#[tokio::test]
async fn simple_service_exit_is_a_failure_and_sigterm_stops_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cg = TestCgroup::new("exec-simple");
    let svc = script(
        tmp.path(),
        "svc.sh",
        &format!(
            "echo $$ > {}/svc.pid\necho 'service says hello'\ntrap 'echo got TERM; exit 0' TERM\nwhile :; do sleep 0.1; done",
            tmp.path().display()
        ),
    );
    let mut c = cfg(&[&svc], &[]);
    c.mode = ExecMode::Simple;
    let r = make("svc", c, Some(&cg)).unwrap();
    r.start(&ctx("g1", "svc", 9)).await.unwrap();
    let pid = read_pid(&tmp.path().join("svc.pid"));
    assert_eq!(r.check().await, Health::Running);
    // Killed behind our back: check reports the exit and the last output.
    // SAFETY: kill(2) on the service's pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let mut health = Health::Running;
    for _ in 0..100 {
        health = r.check().await;
        if health != Health::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match &health {
        Health::Failed(why) => assert!(why.contains("signal 9") && why.contains("service says hello"), "{why}"),
        h => panic!("expected failed, got {h:?}"),
    }
    r.stop(false).await.unwrap();
    assert_eq!(r.check().await, Health::Stopped);

    // Restart, then a graceful stop without a stop command: SIGTERM.
    std::fs::remove_file(tmp.path().join("svc.pid")).unwrap();
    r.start(&ctx("g1", "svc", 10)).await.unwrap();
    let pid = read_pid(&tmp.path().join("svc.pid"));
    r.stop(false).await.unwrap();
    assert!(!alive(pid));
    assert_eq!(r.check().await, Health::Stopped);
}

#[tokio::test]
async fn simple_service_with_monitor_starts_once_ready() {
    let tmp = tempfile::tempdir().unwrap();
    let cg = TestCgroup::new("exec-ready");
    let ready = tmp.path().join("ready");
    let svc = script(tmp.path(), "svc.sh", &format!("sleep 0.7; touch {}; exec sleep 300", ready.display()));
    let monitor = script(tmp.path(), "mon.sh", &format!("test -e {} || exit 7", ready.display()));
    let mut c = cfg(&[&svc], &[]);
    c.mode = ExecMode::Simple;
    c.monitor = vec![monitor];
    let r = make("svc", c, Some(&cg)).unwrap();
    r.start(&ctx("g1", "svc", 1)).await.unwrap();
    assert!(ready.exists(), "start returned before the service was ready");
    assert_eq!(r.check().await, Health::Running);
    r.stop(true).await.unwrap();
    assert!(!cg.cgroup().is_populated().unwrap());

    // Never ready: the start times out and the service is killed.
    let svc = script(tmp.path(), "never.sh", "exec sleep 300");
    let mut c = cfg(&[&svc], &[]);
    c.mode = ExecMode::Simple;
    c.monitor = vec!["/bin/false".into()];
    c.start_timeout = Duration::from_secs(1);
    let r = make("never", c, Some(&cg)).unwrap();
    let err = r.start(&ctx("g1", "never", 1)).await.unwrap_err();
    assert!(matches!(err, ResourceError::Timeout { .. }), "{err}");
    assert!(!cg.cgroup().is_populated().unwrap());
}

#[tokio::test]
async fn runs_as_the_configured_user() {
    let tmp = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let cg = TestCgroup::new("exec-user");
    let out = tmp.path().join("ids");
    let start = script(tmp.path(), "start.sh", &format!("echo \"$(id -u) $(id -g) $USER\" > {}", out.display()));
    let mut c = cfg(&[&start], &["/bin/true"]);
    c.user = Some("nobody".into());
    let r = make("u", c, Some(&cg)).unwrap();
    r.start(&ctx("g1", "u", 1)).await.unwrap();
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "65534 65534 nobody");
    r.stop(false).await.unwrap();
}
