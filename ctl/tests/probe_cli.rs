//! `tandemctl probe` as a user runs it: exit codes, human and JSON output,
//! argument errors as UNKNOWN.

use std::net::TcpListener;
use std::process::Command;

fn tandemctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandemctl"))
}

#[test]
fn tcp_ok_human_and_json() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let out = tandemctl().args(["probe", &format!("tcp://127.0.0.1:{port}")]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.starts_with("OK - tcp tcp://127.0.0.1:"), "{stdout}");
    assert_eq!(stdout.lines().count(), 1);

    let out = tandemctl().args(["probe", "--json", &format!("tcp://127.0.0.1:{port}")]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "OK");
    assert_eq!(v["failure_class"], serde_json::Value::Null);
    assert!(v["latency_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(v["kind"], "tcp");
}

#[test]
fn refused_is_critical_with_class() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = tandemctl().args(["probe", "--json", &format!("tcp://127.0.0.1:{port}")]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "CRITICAL");
    assert_eq!(v["failure_class"], "refused");
}

#[test]
fn bad_arguments_are_unknown() {
    for args in [
        vec!["probe"],
        vec!["probe", "gopher://x"],
        vec!["probe", "tcp://127.0.0.1:1", "--timeout", "-1"],
        vec!["probe", "tcp://127.0.0.1:1", "-o", "nonsense"],
        vec!["probe", "tcp://127.0.0.1:1", "-o", "bogus=1"],
        vec!["probe", "--bogus-flag", "tcp://127.0.0.1:1"],
    ] {
        let out = tandemctl().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn inline_password_refused_without_echo() {
    let out = tandemctl().args(["probe", "tcp://u:hunter2@127.0.0.1:1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!all.contains("hunter2"), "{all}");
}

#[test]
fn exec_runs_a_real_nagios_plugin_and_keeps_its_status() {
    let plugin = "/usr/lib/nagios/plugins/check_dummy";
    assert!(std::path::Path::new(plugin).exists(), "install monitoring-plugins-basic (.ci/install-deps)");
    for (code, status) in [(0, "OK"), (1, "WARNING"), (2, "CRITICAL"), (3, "UNKNOWN")] {
        let out = tandemctl()
            .args(["probe", "--json", "exec", "--", plugin, &code.to_string(), "from the cli"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{}", String::from_utf8_lossy(&out.stdout));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["status"], status);
        assert!(v["reason"].as_str().unwrap().contains("from the cli"), "{v}");
    }
}

#[test]
fn ocf_dummy_agent_reports_not_running_then_running() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("dummy.state");
    let param = format!("state={}", state.display());
    let out = tandemctl().args(["probe", "--json", "ocf:heartbeat:Dummy", "--param", &param]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["failure_class"], "not_running");
    // The Dummy agent's "running" is its state file existing.
    std::fs::write(&state, "").unwrap();
    let out = tandemctl().args(["probe", "ocf:heartbeat:Dummy", "--param", &param]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn exec_timeout_bounds_the_run() {
    let start = std::time::Instant::now();
    let out =
        tandemctl().args(["probe", "--json", "--timeout", "1", "exec", "--", "/bin/sleep", "30"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["failure_class"], "timeout");
    assert!(start.elapsed() < std::time::Duration::from_secs(5), "{:?}", start.elapsed());
}
