//! The exec probe against real monitoring-plugins programs, the command
//! runner's kill/clean-up guarantees, and OCF agents from resource-agents.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tandem_monitors::exec::{
    CommandSpec, Leftovers, RunError, Termination, live_group_members, parse_perfdata, parse_plugin_output, run_command,
};
use tandem_monitors::ocf::{OcfAction, OcfAgent, OcfCode, OcfError};
use tandem_monitors::{FailureClass, ProbeResult, ProbeSpec, RunLimits, Status, build_probe, run_probe};
use tandem_testkit::{free_port, require_program};

const PLUGINS: &str = "/usr/lib/nagios/plugins";

fn plugin(name: &str) -> String {
    require_program(name, "monitoring-plugins-basic", &[PLUGINS]).display().to_string()
}

fn limits(secs: f64) -> RunLimits {
    RunLimits { timeout: Duration::from_secs_f64(secs), warning: None }
}

async fn exec(args: &[&str], opts: &[(&str, &str)], timeout: f64) -> ProbeResult {
    let spec = ProbeSpec {
        target: "exec".into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        options: opts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        limits: limits(timeout),
        ..Default::default()
    };
    let probe = build_probe(&spec).expect("exec spec builds");
    run_probe(probe.as_ref(), spec.limits).await
}

/// Writes an executable script.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn read_pid(p: &Path) -> i32 {
    // The script writes it before hanging; give it a moment on a loaded machine.
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(p)
            && let Ok(pid) = s.trim().parse()
        {
            return pid;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{} never written", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True when `pid` is gone or a zombie (dead, awaiting its reaper).
fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => {
            let state = s.rsplit_once(')').map(|(_, r)| r.trim_start()).unwrap_or("");
            state.starts_with('Z') || state.starts_with('X')
        }
    }
}

fn assert_group_dead(pgid: i32, grandchild: i32) {
    assert!(live_group_members(pgid).is_empty(), "group {pgid} still has {:?}", live_group_members(pgid));
    assert!(dead(grandchild), "grandchild {grandchild} survived");
    assert!(dead(pgid), "leader {pgid} survived");
}

/// A plugin that forks a long sleep into its group, prints, and hangs.
fn hanging_script(dir: &Path, ignore_term: bool) -> PathBuf {
    let d = dir.display();
    let trap = if ignore_term { "trap '' TERM\n" } else { "" };
    script(
        dir,
        "hang.sh",
        &format!(
            "#!/bin/sh\n{trap}echo $$ > {d}/leader\nsleep 1000 &\necho $! > {d}/grandchild\necho 'STILL THINKING | t=1s'\nsleep 1000\n"
        ),
    )
}

#[tokio::test]
async fn check_dummy_statuses_and_reasons() {
    let p = plugin("check_dummy");
    let cases = [
        ("0", Status::Ok, None),
        ("1", Status::Warning, Some(FailureClass::UnexpectedAnswer)),
        ("2", Status::Critical, Some(FailureClass::UnexpectedAnswer)),
        ("3", Status::Unknown, Some(FailureClass::UnexpectedAnswer)),
    ];
    for (code, status, class) in cases {
        let r = exec(&[&p, code, "all is well | ignored"], &[], 10.0).await;
        assert_eq!(r.status, status, "{code}: {r:?}");
        assert_eq!(r.class, class, "{code}: {r:?}");
        assert_eq!(r.reason, format!("{}: all is well", status.as_str()), "{code}");
    }
}

#[tokio::test]
async fn check_tcp_ok_with_perfdata_and_refused() {
    let p = plugin("check_tcp");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let r = exec(&[&p, "-H", "127.0.0.1", "-p", &port, "-t", "5"], &[], 10.0).await;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert!(r.reason.starts_with("TCP OK"), "{}", r.reason);
    let t = r.perfdata.iter().find(|d| d.label == "time").unwrap_or_else(|| panic!("no time perfdata: {r:?}"));
    assert_eq!(t.unit, "s");
    assert!(t.value >= 0.0 && t.value < 5.0, "{t:?}");
    assert_eq!((t.min, t.max), (Some(0.0), Some(5.0)), "{t:?}");

    drop(listener);
    let closed = free_port().to_string();
    let r = exec(&[&p, "-H", "127.0.0.1", "-p", &closed], &[], 10.0).await;
    assert_eq!(r.status, Status::Critical, "{r:?}");
    assert_eq!(r.class, Some(FailureClass::UnexpectedAnswer));
    assert!(r.reason.contains("refused"), "{}", r.reason);
}

#[tokio::test]
async fn check_procs_perfdata_and_critical() {
    let p = plugin("check_procs");
    let r = exec(&[&p, "-w", "100000", "-c", "200000"], &[], 10.0).await;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    let d = &r.perfdata[0];
    assert_eq!(d.label, "procs");
    assert!(d.value >= 1.0, "{d:?}");
    assert_eq!((d.warn, d.crit, d.min, d.max), (Some(100000.0), Some(200000.0), Some(0.0), None));

    let r = exec(&[&p, "-w", "0", "-c", "0"], &[], 10.0).await;
    assert_eq!(r.status, Status::Critical, "{r:?}");
    assert!(r.reason.starts_with("PROCS CRITICAL"), "{}", r.reason);
}

#[tokio::test]
async fn missing_or_unexecutable_program_is_unknown_config() {
    let r = exec(&["/nonexistent/check_nothing"], &[], 5.0).await;
    assert_eq!((r.status, r.class), (Status::Unknown, Some(FailureClass::Config)), "{r:?}");
    assert!(r.reason.contains("/nonexistent/check_nothing"), "{}", r.reason);

    let r = exec(&["check_definitely_not_installed"], &[], 5.0).await;
    assert_eq!((r.status, r.class), (Status::Unknown, Some(FailureClass::Config)), "{r:?}");

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("noexec.sh");
    std::fs::write(&p, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = exec(&[p.to_str().unwrap()], &[], 5.0).await;
    assert_eq!((r.status, r.class), (Status::Unknown, Some(FailureClass::Config)), "{r:?}");
    assert!(r.reason.contains("permission denied"), "{}", r.reason);
}

#[tokio::test]
async fn odd_exits_signals_multiline_perfdata_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let odd = script(dir.path(), "odd.sh", "#!/bin/sh\necho 'weird'\nexit 42\n");
    let r = exec(&[odd.to_str().unwrap()], &[], 5.0).await;
    assert_eq!((r.status, r.class), (Status::Unknown, Some(FailureClass::Protocol)), "{r:?}");
    assert!(r.reason.contains("42") && r.reason.contains("weird"), "{}", r.reason);

    let seg = script(dir.path(), "seg.sh", "#!/bin/sh\nkill -SEGV $$\n");
    let r = exec(&[seg.to_str().unwrap()], &[], 5.0).await;
    assert_eq!((r.status, r.class), (Status::Unknown, Some(FailureClass::Protocol)), "{r:?}");
    assert!(r.reason.contains("signal 11"), "{}", r.reason);

    let silent = script(dir.path(), "silent.sh", "#!/bin/sh\necho 'oops on stderr' >&2\nexit 2\n");
    let r = exec(&[silent.to_str().unwrap()], &[], 5.0).await;
    assert_eq!(r.status, Status::Critical);
    assert!(r.reason.contains("without output") && r.reason.contains("oops on stderr"), "{}", r.reason);

    let multi = script(
        dir.path(),
        "multi.sh",
        "#!/bin/sh\nprintf \"DISK OK $FOO | '/ root'=10MB;80;90;0;100\\nlong text\\nmore | /boot=5MB\\n/home=7MB;;;0\\n\"\n",
    );
    let r = exec(&[multi.to_str().unwrap()], &[("env.FOO", "bar")], 5.0).await;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.reason, "DISK OK bar");
    let labels: Vec<&str> = r.perfdata.iter().map(|d| d.label.as_str()).collect();
    assert_eq!(labels, ["/ root", "/boot", "/home"]);
    assert_eq!(r.perfdata[0].max, Some(100.0));
}

#[tokio::test]
async fn hanging_plugin_is_killed_at_the_timeout_with_no_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let hang = hanging_script(dir.path(), false);
    let start = Instant::now();
    let r = exec(&[hang.to_str().unwrap()], &[("kill_grace", "0.5")], 1.0).await;
    let took = start.elapsed();
    assert_eq!((r.status, r.class), (Status::Critical, Some(FailureClass::Timeout)), "{r:?}");
    assert!(r.reason.contains("STILL THINKING"), "{}", r.reason);
    assert!(took < Duration::from_millis(1000 + 500 + 1000), "took {took:?}");
    assert_group_dead(read_pid(&dir.path().join("leader")), read_pid(&dir.path().join("grandchild")));
}

#[tokio::test]
async fn check_tcp_against_a_silent_listener_is_killed_at_our_timeout() {
    let p = plugin("check_tcp");
    // The kernel completes the handshake; nobody ever answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let start = Instant::now();
    let r = exec(&[&p, "-H", "127.0.0.1", "-p", &port, "-s", "PING\n", "-e", "PONG", "-t", "120"], &[], 1.5).await;
    let took = start.elapsed();
    assert_eq!((r.status, r.class), (Status::Critical, Some(FailureClass::Timeout)), "{r:?}");
    assert!(took < Duration::from_millis(1500 + 1500 + 1000), "took {took:?}");
    assert!(took >= Duration::from_millis(1000), "killed too early: {took:?}");
    drop(listener);
}

#[tokio::test]
async fn runner_escalates_to_sigkill_when_term_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let hang = hanging_script(dir.path(), true);
    let spec = CommandSpec::new(&hang).timeout(Duration::from_millis(500)).kill_grace(Duration::from_millis(500));
    let start = Instant::now();
    let out = run_command(&spec).await.unwrap();
    let took = start.elapsed();
    assert!(out.timed_out);
    assert_eq!(out.termination, Termination::Signaled(libc::SIGKILL), "{out:?}");
    assert!(took >= Duration::from_millis(1000), "SIGKILL before the grace: {took:?}");
    assert!(took < Duration::from_millis(500 + 500 + 1000), "took {took:?}");
    let leader = read_pid(&dir.path().join("leader"));
    assert_eq!(out.pgid, leader, "the program leads its own group");
    assert_ne!(out.pgid, nix::unistd::getpgrp().as_raw(), "not our group");
    assert_group_dead(leader, read_pid(&dir.path().join("grandchild")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("STILL THINKING"));
}

#[tokio::test]
async fn dropping_the_run_future_kills_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let hang = hanging_script(dir.path(), true);
    let spec = CommandSpec::new(&hang).timeout(Duration::from_secs(600));
    tokio::select! {
        r = run_command(&spec) => panic!("a 1000 s sleeper finished: {r:?}"),
        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
    }
    let (leader, gc) = (read_pid(&dir.path().join("leader")), read_pid(&dir.path().join("grandchild")));
    // SIGKILL was sent synchronously on drop; allow the kernel a moment to tear down.
    let start = Instant::now();
    while !(live_group_members(leader).is_empty() && dead(gc)) {
        assert!(start.elapsed() < Duration::from_secs(3), "group {leader} survived the drop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn leftovers_after_a_normal_exit_are_killed_or_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let s =
        script(dir.path(), "bg.sh", &format!("#!/bin/sh\nsleep 1000 &\necho $! > {d}/grandchild\necho done\nexit 0\n"));
    let start = Instant::now();
    let out = run_command(&CommandSpec::new(&s).kill_grace(Duration::from_millis(300))).await.unwrap();
    assert_eq!(out.termination, Termination::Exited(0));
    assert!(!out.timed_out);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
    assert_group_dead(out.pgid, read_pid(&dir.path().join("grandchild")));

    std::fs::remove_file(dir.path().join("grandchild")).unwrap();
    let out = run_command(&CommandSpec::new(&s).leftovers(Leftovers::Keep)).await.unwrap();
    assert_eq!(out.termination, Termination::Exited(0));
    let gc = read_pid(&dir.path().join("grandchild"));
    assert!(!dead(gc), "Keep must leave the started process running");
    assert_eq!(live_group_members(out.pgid), vec![gc]);
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(out.pgid), nix::sys::signal::Signal::SIGKILL).unwrap();
}

#[tokio::test]
async fn output_is_bounded_without_blocking_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let s =
        script(dir.path(), "flood.sh", "#!/bin/sh\nhead -c 1000000 /dev/zero | tr '\\0' a\necho tail >&2\nexit 0\n");
    let out = run_command(&CommandSpec::new(&s).timeout(Duration::from_secs(20))).await.unwrap();
    assert_eq!(out.termination, Termination::Exited(0));
    assert!(!out.timed_out);
    assert_eq!(out.stdout.len(), 64 * 1024);
    assert!(out.stdout_truncated && !out.stderr_truncated);
    assert_eq!(out.stderr, b"tail\n");
}

#[tokio::test]
async fn runner_reports_missing_and_env_cwd() {
    let e = run_command(&CommandSpec::new("/nonexistent/prog")).await.unwrap_err();
    assert!(matches!(e, RunError::NotFound { .. }), "{e:?}");
    let dir = tempfile::tempdir().unwrap();
    let out =
        run_command(&CommandSpec::new("/bin/sh").args(["-c", "echo \"$X $(pwd)\""]).env("X", "ex").cwd(dir.path()))
            .await
            .unwrap();
    let want = format!("ex {}\n", dir.path().canonicalize().unwrap().display());
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
}

// ---------------------------------------------------------------- OCF

fn ocf(target: &str, params: &[(&str, &str)], opts: &[(&str, &str)], timeout: f64) -> ProbeSpec {
    ProbeSpec {
        target: target.into(),
        params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        options: opts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        limits: limits(timeout),
        ..Default::default()
    }
}

async fn probe(spec: &ProbeSpec) -> ProbeResult {
    let p = build_probe(spec).expect("spec builds");
    run_probe(p.as_ref(), spec.limits).await
}

fn require_agent(name: &str) {
    let path = Path::new("/usr/lib/ocf/resource.d/heartbeat").join(name);
    assert!(
        path.is_file(),
        "{} missing: install the Debian package resource-agents (.ci/install-deps)",
        path.display()
    );
}

#[tokio::test]
async fn ocf_dummy_lifecycle() {
    require_agent("Dummy");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("dummy.state").display().to_string();
    let spec = ocf("ocf:heartbeat:Dummy", &[("state", &state)], &[("instance", "dummy-1")], 20.0);

    let r = probe(&spec).await;
    assert_eq!((r.status, r.class), (Status::Critical, Some(FailureClass::NotRunning)), "{r:?}");
    assert!(r.reason.contains("7 OCF_NOT_RUNNING") && r.reason.contains("dummy-1"), "{}", r.reason);

    let agent = OcfAgent::parse("heartbeat:Dummy").unwrap().param("state", &state);
    let t = Duration::from_secs(20);
    let started = agent.run(&OcfAction::Start, t).await.unwrap();
    assert_eq!(started.code, Some(OcfCode::Success), "{started:?}");
    assert!(Path::new(&state).exists());

    let r = probe(&spec).await;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert!(r.reason.contains("0 OCF_SUCCESS"), "{}", r.reason);

    let stopped = agent.run(&OcfAction::Stop, t).await.unwrap();
    assert_eq!(stopped.code, Some(OcfCode::Success), "{stopped:?}");
    let r = probe(&spec).await;
    assert_eq!(r.class, Some(FailureClass::NotRunning), "{r:?}");

    let md = agent.run(&OcfAction::MetaData, t).await.unwrap();
    assert_eq!(md.code, Some(OcfCode::Success));
    assert!(String::from_utf8_lossy(&md.output.stdout).contains("<resource-agent name=\"Dummy\""));

    let bad = OcfAgent::parse("heartbeat:Dummy").unwrap().param("state", "/nonexistent/dir/state");
    let v = bad.run(&OcfAction::ValidateAll, t).await.unwrap();
    assert_eq!(v.code, Some(OcfCode::ErrArgs), "{v:?}");
    assert!(v.reason.as_deref().unwrap_or("").contains("not writable"), "{v:?}");

    let u = agent.run(&OcfAction::Other("frobnicate".into()), t).await.unwrap();
    assert_eq!(u.code, Some(OcfCode::ErrUnimplemented), "{u:?}");
}

#[tokio::test]
async fn ocf_promoted_is_ok() {
    require_agent("Stateful");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("stateful.state").display().to_string();
    let agent = OcfAgent::parse("heartbeat:Stateful").unwrap().param("state", &state);
    let t = Duration::from_secs(20);
    assert_eq!(agent.run(&OcfAction::Start, t).await.unwrap().code, Some(OcfCode::Success));
    assert_eq!(agent.run(&OcfAction::Promote, t).await.unwrap().code, Some(OcfCode::Success));
    let r = probe(&ocf("ocf:heartbeat:Stateful", &[("state", &state)], &[], 20.0)).await;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert!(r.reason.contains("8 OCF_RUNNING_PROMOTED"), "{}", r.reason);
}

#[tokio::test]
async fn ocf_misconfiguration_is_classified() {
    require_agent("symlink");
    // symlink's mandatory `link` is missing: OCF_ERR_CONFIGURED with an exit reason.
    let r = probe(&ocf("ocf:heartbeat:symlink", &[("target", "/etc/hostname")], &[], 20.0)).await;
    assert_eq!((r.status, r.class), (Status::Critical, Some(FailureClass::Config)), "{r:?}");
    assert!(r.reason.contains("6 OCF_ERR_CONFIGURED") && r.reason.contains("link"), "{}", r.reason);

    let r = probe(&ocf("ocf:heartbeat:NoSuchAgent", &[], &[], 5.0)).await;
    assert_eq!((r.status, r.class), (Status::Unknown, Some(FailureClass::Config)), "{r:?}");
    assert!(r.reason.contains("NoSuchAgent") && r.reason.contains("resource-agents"), "{}", r.reason);

    let e = OcfAgent::parse("heartbeat:NoSuchAgent").unwrap().run(&OcfAction::Start, Duration::from_secs(1)).await;
    assert!(matches!(e, Err(OcfError::NotInstalled { .. })), "{e:?}");

    for bad in ["ocf:Dummy", "ocf:../x:y", "ocf:a:b/c"] {
        assert!(build_probe(&ocf(bad, &[], &[], 1.0)).is_err(), "{bad}");
    }
    let e = build_probe(&ocf("ocf:heartbeat:Dummy", &[("bad=name", "x")], &[], 1.0)).unwrap_err();
    assert!(e.to_string().contains("bad=name"), "{e}");
}

fn custom_root(body: &str) -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("resource.d/test");
    std::fs::create_dir_all(&dir).unwrap();
    let agent = script(&dir, "Agent", body);
    (root, agent)
}

#[tokio::test]
async fn ocf_environment_is_passed() {
    let out = tempfile::tempdir().unwrap();
    let o = out.path().display();
    let (root, _) =
        custom_root(&format!("#!/bin/sh\nenv | grep ^OCF_ | sort > {o}/env\n[ \"$1\" = monitor ] && exit 8\nexit 3\n"));
    let spec = ocf(
        "ocf:test:Agent",
        &[("foo", "bar baz"), ("n", "1")],
        &[("ocf_root", root.path().to_str().unwrap()), ("instance", "inst-7")],
        8.0,
    );
    let r = probe(&spec).await;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    let env: BTreeMap<String, String> = std::fs::read_to_string(out.path().join("env"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    assert_eq!(env["OCF_ROOT"], root.path().display().to_string());
    assert_eq!(env["OCF_RESKEY_foo"], "bar baz");
    assert_eq!(env["OCF_RESKEY_n"], "1");
    assert_eq!(env["OCF_RESOURCE_INSTANCE"], "inst-7");
    assert_eq!(env["OCF_RESOURCE_TYPE"], "Agent");
    assert_eq!(env["OCF_RESOURCE_PROVIDER"], "test");
    let ms: u64 = env["OCF_RESKEY_CRM_meta_timeout"].parse().unwrap();
    assert!((7000..=8000).contains(&ms), "meta timeout {ms} ms for an 8 s deadline");
}

#[tokio::test]
async fn hanging_ocf_agent_is_killed_with_no_orphan() {
    let pids = tempfile::tempdir().unwrap();
    let d = pids.path().display();
    let (root, _) =
        custom_root(&format!("#!/bin/sh\necho $$ > {d}/leader\nsleep 1000 &\necho $! > {d}/grandchild\nsleep 1000\n"));
    let spec = ocf("ocf:test:Agent", &[], &[("ocf_root", root.path().to_str().unwrap()), ("kill_grace", "0.5")], 1.0);
    let start = Instant::now();
    let r = probe(&spec).await;
    let took = start.elapsed();
    assert_eq!((r.status, r.class), (Status::Critical, Some(FailureClass::Timeout)), "{r:?}");
    assert!(took < Duration::from_millis(1000 + 500 + 1000), "took {took:?}");
    assert_group_dead(read_pid(&pids.path().join("leader")), read_pid(&pids.path().join("grandchild")));
}

// ---------------------------------------------------------------- parser properties

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn parser_never_panics_on_garbage(s in "\\PC*") {
        let o = parse_plugin_output(&s);
        prop_assert!(!o.text.contains('\n'));
        let _ = parse_perfdata(&s);
    }

    #[test]
    fn parser_never_panics_on_perf_like_garbage(s in "[ a-z'=;:.,0-9%|@~U\\-\n]{0,80}") {
        for d in parse_plugin_output(&s).perfdata {
            prop_assert!(!d.label.is_empty());
            prop_assert!(d.warn.is_none_or(f64::is_finite) && d.crit.is_none_or(f64::is_finite));
        }
    }

    #[test]
    fn well_formed_items_round_trip(
        label in "[a-zA-Z_/][a-zA-Z0-9_/ ']{0,12}",
        value in -1e6f64..1e6,
        unit in prop::sample::select(vec!["", "s", "ms", "%", "B", "KB", "MB", "c"]),
        warn in prop::option::of(0f64..1e6),
        crit in prop::option::of(0f64..1e6),
        min in prop::option::of(-1e3f64..0.0),
        max in prop::option::of(1e6f64..1e7),
        text in "[A-Za-z :-]{0,30}",
    ) {
        let f = |o: Option<f64>| o.map(|v| v.to_string()).unwrap_or_default();
        let quoted = format!("'{}'", label.replace('\'', "''"));
        let item = format!("{quoted}={value}{unit};{};{};{};{}", f(warn), f(crit), f(min), f(max));
        let out = format!("{text}| other=1 {item}\nlong\n");
        let o = parse_plugin_output(&out);
        prop_assert_eq!(o.text, text.trim());
        prop_assert_eq!(o.perfdata.len(), 2);
        let d = &o.perfdata[1];
        prop_assert_eq!(&d.label, &label);
        prop_assert_eq!(d.value, value);
        prop_assert_eq!(&d.unit, unit);
        prop_assert_eq!((d.warn, d.crit, d.min, d.max), (warn, crit, min, max));
    }
}

#[tokio::test]
async fn a_process_that_left_the_group_cannot_hold_the_run_open() {
    // A daemon that setsid()s away keeps our stdout pipe open; the runner
    // must still return once the program exits, not when the daemon does.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let s = script(
        dir.path(),
        "escape.sh",
        &format!("#!/bin/sh\nsetsid sleep 30 &\necho $! > {d}/escaped\necho out\nexit 0\n"),
    );
    let start = Instant::now();
    let out = run_command(&CommandSpec::new(&s).timeout(Duration::from_secs(5))).await.unwrap();
    let took = start.elapsed();
    let escaped = read_pid(&dir.path().join("escaped"));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(escaped), nix::sys::signal::Signal::SIGKILL).unwrap();
    assert_eq!(out.termination, Termination::Exited(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn exec_spec_errors_are_reported() {
    let spec = |args: &[&str], opts: &[(&str, &str)]| ProbeSpec {
        target: "exec".into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        options: opts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    let e = build_probe(&spec(&[], &[])).unwrap_err().to_string();
    assert!(e.contains("no program"), "{e}");
    let e = build_probe(&spec(&["check_dummy", "0"], &[("colour", "red")])).unwrap_err().to_string();
    assert!(e.contains("colour") && e.contains("kill_grace"), "{e}");
    let e = build_probe(&spec(&["check_dummy", "0"], &[("kill_grace", "soon")])).unwrap_err().to_string();
    assert!(e.contains("kill_grace"), "{e}");
    let e = build_probe(&spec(&["check_dummy", "0"], &[("env.", "x")])).unwrap_err().to_string();
    assert!(e.contains("env."), "{e}");
    let p = build_probe(&spec(&["check_dummy", "0", "a b"], &[("cwd", "/")])).unwrap();
    assert_eq!((p.kind(), p.target()), ("exec", "check_dummy 0 a b".to_string()));
}
