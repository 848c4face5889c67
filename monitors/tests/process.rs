//! The process probe against real processes started by the tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_monitors::process::proc_info;
use tandem_monitors::{FailureClass, ProbeResult, ProbeSpec, RunLimits, Status, build_probe, run_probe};
use tandem_testkit::{ChildGuard, require_program};

fn sleep_bin() -> PathBuf {
    require_program("sleep", "coreutils", &["/bin", "/usr/bin"])
}

fn spawn_sleep(program: &Path) -> ChildGuard {
    let mut c = Command::new(program);
    c.arg("600");
    ChildGuard::spawn("sleep", c)
}

fn spec(target: &str, opts: &[(&str, &str)]) -> ProbeSpec {
    ProbeSpec {
        target: target.into(),
        options: opts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

async fn probe(target: &str, opts: &[(&str, &str)]) -> ProbeResult {
    let p = build_probe(&spec(target, opts)).expect("spec builds");
    run_probe(p.as_ref(), RunLimits { timeout: Duration::from_secs(5), warning: None }).await
}

fn pid_url(path: &Path) -> String {
    format!("process://{}", path.display())
}

fn assert_class(r: &ProbeResult, status: Status, class: Option<FailureClass>) {
    assert_eq!((r.status, r.class), (status, class), "{r:?}");
}

/// Waits until `pid` is a zombie (it exited and nobody reaped it).
fn wait_zombie(pid: i32) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if proc_info(pid).unwrap().is_some_and(|i| i.state == 'Z') {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("process {pid} did not become a zombie");
}

#[tokio::test]
async fn pid_file_of_a_running_process() {
    let dir = tempfile::tempdir().unwrap();
    let child = spawn_sleep(&sleep_bin());
    let pidfile = dir.path().join("sleep.pid");
    std::fs::write(&pidfile, format!("{}\n", child.pid())).unwrap();
    let url = pid_url(&pidfile);

    let r = probe(&url, &[]).await;
    assert_class(&r, Status::Ok, None);
    assert!(r.reason.contains(&child.pid().to_string()) && r.reason.contains("sleep"), "{}", r.reason);

    assert_class(&probe(&url, &[("name", "sleep")]).await, Status::Ok, None);

    // Same pid, other expected command: the pid was reused.
    let r = probe(&url, &[("name", "postgres")]).await;
    assert_class(&r, Status::Critical, Some(FailureClass::NotRunning));
    assert!(r.reason.contains("stale pid file") && r.reason.contains("reused"), "{}", r.reason);
}

#[tokio::test]
async fn postmaster_pid_format_uses_the_first_line() {
    let dir = tempfile::tempdir().unwrap();
    let child = spawn_sleep(&sleep_bin());
    let pidfile = dir.path().join("postmaster.pid");
    std::fs::write(&pidfile, format!("{}\n/var/lib/postgresql/15/main\n1700000000\n5432\n", child.pid())).unwrap();
    assert_class(&probe(&pid_url(&pidfile), &[("name", "sleep")]).await, Status::Ok, None);
}

#[tokio::test]
async fn stale_pid_file_after_the_process_exited() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_sleep(&sleep_bin());
    let pidfile = dir.path().join("gone.pid");
    std::fs::write(&pidfile, child.pid().to_string()).unwrap();
    assert_class(&probe(&pid_url(&pidfile), &[]).await, Status::Ok, None);
    child.kill(); // SIGKILL and reap: the pid no longer exists
    let r = probe(&pid_url(&pidfile), &[]).await;
    assert_class(&r, Status::Critical, Some(FailureClass::NotRunning));
    assert!(r.reason.contains("stale pid file") && r.reason.contains("does not exist"), "{}", r.reason);
}

#[tokio::test]
async fn zombie_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(sleep_bin()).arg("0").spawn().unwrap();
    let pid = child.id() as i32;
    wait_zombie(pid);
    let pidfile = dir.path().join("zombie.pid");
    std::fs::write(&pidfile, pid.to_string()).unwrap();
    let r = probe(&pid_url(&pidfile), &[]).await;
    child.wait().unwrap();
    assert_class(&r, Status::Critical, Some(FailureClass::NotRunning));
    assert!(r.reason.contains("zombie"), "{}", r.reason);
}

#[tokio::test]
async fn broken_pid_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);

    let r = probe(&pid_url(&p("missing.pid")), &[]).await;
    assert_class(&r, Status::Critical, Some(FailureClass::NotRunning));
    assert!(r.reason.contains("does not exist"), "{}", r.reason);

    for (name, content, words) in [
        ("empty.pid", "", "empty"),
        ("blank.pid", " \n\n", "empty"),
        ("garbage.pid", "hello\n", "hello"),
        ("zero.pid", "0\n", "\"0\""),
        ("negative.pid", "-5\n", "-5"),
        ("overflow.pid", "99999999999\n", "99999999999"),
    ] {
        std::fs::write(p(name), content).unwrap();
        let r = probe(&pid_url(&p(name)), &[]).await;
        assert_class(&r, Status::Critical, Some(FailureClass::Protocol));
        assert!(r.reason.contains(words), "{name}: {}", r.reason);
    }

    std::fs::write(p("huge.pid"), "1".repeat(10_000)).unwrap();
    let r = probe(&pid_url(&p("huge.pid")), &[]).await;
    assert_class(&r, Status::Critical, Some(FailureClass::Protocol));

    // A directory cannot be read as a file: the probe is misconfigured.
    std::fs::create_dir(p("dir.pid")).unwrap();
    let r = probe(&pid_url(&p("dir.pid")), &[]).await;
    assert_class(&r, Status::Unknown, Some(FailureClass::Config));
    assert!(r.reason.contains("cannot read pid file"), "{}", r.reason);
}

/// A symlink to `sleep` with a unique name: the kernel takes the command
/// name from the executed path, so its processes are ours alone.
fn unique_sleep(dir: &Path, tag: char) -> (PathBuf, String) {
    let name = format!("tdm{tag}{}", std::process::id());
    assert!(name.len() <= 15);
    let link = dir.join(&name);
    std::os::unix::fs::symlink(sleep_bin(), &link).unwrap();
    (link, name)
}

#[tokio::test]
async fn by_name_counts_live_processes_and_ignores_zombies() {
    let dir = tempfile::tempdir().unwrap();
    let (prog, name) = unique_sleep(dir.path(), 'a');
    let url = format!("process://name/{name}");

    let r = probe(&url, &[]).await;
    assert_class(&r, Status::Critical, Some(FailureClass::NotRunning));
    assert!(r.reason.contains("no process named"), "{}", r.reason);

    let a = spawn_sleep(&prog);
    let b = spawn_sleep(&prog);
    let r = probe(&url, &[]).await;
    assert_class(&r, Status::Ok, None);
    assert!(r.reason.contains(&a.pid().to_string()) && r.reason.contains(&b.pid().to_string()), "{}", r.reason);
    assert_eq!(r.perfdata[0].value, 2.0);

    let r = probe(&url, &[("max", "1")]).await;
    assert_class(&r, Status::Critical, Some(FailureClass::UnexpectedAnswer));
    let r = probe(&url, &[("min", "3")]).await;
    assert_class(&r, Status::Critical, Some(FailureClass::NotRunning));
    assert!(r.reason.contains("at least 3"), "{}", r.reason);

    // A third one that exits and stays a zombie does not count.
    let mut z = Command::new(&prog).arg("0").spawn().unwrap();
    wait_zombie(z.id() as i32);
    let r = probe(&url, &[("min", "2"), ("max", "2")]).await;
    z.wait().unwrap();
    assert_class(&r, Status::Ok, None);

    // A prefix is not a match.
    let r = probe(&format!("process://name/{}", &name[..name.len() - 1]), &[]).await;
    assert_class(&r, Status::Critical, Some(FailureClass::NotRunning));
    drop((a, b));
}

#[test]
fn bad_specs_are_rejected_with_reasons() {
    for (target, opts, words) in [
        ("process://name/", &[][..], "empty"),
        ("process://name/a_very_long_command_name", &[][..], "15 bytes"),
        ("process://host/x", &[][..], "unknown host"),
        ("process://u:secret@name/x", &[][..], "passwords in URLs are refused"),
        ("process://u@name/x", &[][..], "no user"),
        ("process:///", &[][..], "no pid file"),
        ("process:///run/x.pid?name=y", &[][..], "query"),
        ("process://name/postgres", &[("min", "3"), ("max", "2")][..], "at least min"),
        ("process://name/postgres", &[("min", "x")][..], "min"),
        ("process://name/postgres", &[("name", "x")][..], "unknown option"),
        ("process:///run/x.pid", &[("min", "1")][..], "unknown option"),
        ("process:///run/x.pid", &[("name", "usr/bin/x")][..], "'/'"),
    ] {
        let e = build_probe(&spec(target, opts)).unwrap_err().to_string();
        assert!(e.contains(words) && !e.contains("secret"), "{target} {opts:?}: {e}");
    }
    let p = build_probe(&spec("process:///run/postgresql/15-main.pid", &[("name", "postgres")])).unwrap();
    assert_eq!(p.target(), "process:///run/postgresql/15-main.pid");
    let p = build_probe(&spec("process://name/my%20daemon", &[])).unwrap();
    assert_eq!(p.target(), "process://name/my daemon");
}

#[tokio::test]
async fn hung_pid_file_read_times_out_and_does_not_pile_up_threads() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("hung.pid");
    // Opening a FIFO with no writer blocks, like a pid file on a hung NFS mount.
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let p = build_probe(&spec(&pid_url(&fifo), &[])).unwrap();
    let limits = RunLimits { timeout: Duration::from_millis(300), warning: None };

    let start = Instant::now();
    let r = run_probe(p.as_ref(), limits).await;
    assert_class(&r, Status::Critical, Some(FailureClass::Timeout));
    assert!(start.elapsed() < Duration::from_millis(1300), "{:?}", start.elapsed());

    // The first reader is still stuck: the next check fails at once.
    let start = Instant::now();
    let r = run_probe(p.as_ref(), limits).await;
    assert_class(&r, Status::Critical, Some(FailureClass::Timeout));
    assert!(r.reason.contains("still blocked"), "{}", r.reason);
    assert!(start.elapsed() < Duration::from_millis(250), "{:?}", start.elapsed());

    // Unblock the stuck reader, then put a real pid file in place.
    let child = spawn_sleep(&sleep_bin());
    std::fs::write(&fifo, format!("{}\n", child.pid())).unwrap();
    std::fs::remove_file(&fifo).unwrap();
    std::fs::write(&fifo, format!("{}\n", child.pid())).unwrap();
    let start = Instant::now();
    loop {
        let r = run_probe(p.as_ref(), limits).await;
        if r.reason.contains("still blocked") && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        assert_class(&r, Status::Ok, None);
        break;
    }
}
