//! The ocf resource with Debian's real resource agents: Dummy (also its
//! meta-data), anything (a daemon that leaves its process group, contained by
//! the cgroup) and, in a network namespace, IPaddr2.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{NetnsPair, TestCgroup, alive, ctx, read_pid, reaped, wait_until};
use tandem_config::{OcfResource as OcfConfig, ResourceKind};
use tandem_guest::resources::ocf::OcfResource;
use tandem_guest::resources::{Health, Resource, ResourceEnv, ResourceError, build};

fn cfg(agent: &str, params: &[(&str, &str)]) -> OcfConfig {
    tandem_testkit::require_program(agent, "resource-agents", &["/usr/lib/ocf/resource.d/heartbeat"]);
    OcfConfig {
        provider: "heartbeat".into(),
        agent: agent.into(),
        params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        start_timeout: Some(Duration::from_secs(30)),
        stop_timeout: Some(Duration::from_secs(30)),
        monitor_timeout: Some(Duration::from_secs(20)),
    }
}

fn make(name: &str, c: OcfConfig, cg: Option<&TestCgroup>) -> Result<Box<dyn Resource>, ResourceError> {
    let mut env = ResourceEnv::new("node-a");
    if let Some(cg) = cg {
        env = env.with_cgroup(&cg.path);
    }
    let spec = tandem_config::Resource { name: name.into(), depends_on: Vec::new(), kind: ResourceKind::Ocf(c) };
    build("g1", &spec, &env)
}

#[tokio::test]
async fn dummy_start_monitor_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let cg = TestCgroup::new("ocf-dummy");
    let state = tmp.path().join("dummy.state");
    let r = make("d", cfg("Dummy", &[("state", state.to_str().unwrap())]), Some(&cg)).unwrap();
    assert_eq!(r.kind(), "ocf");
    assert_eq!(r.check().await, Health::Stopped);
    r.start(&ctx("g1", "d", 5)).await.unwrap();
    assert!(state.exists(), "Dummy start creates its state file");
    assert_eq!(r.check().await, Health::Running);
    r.stop(false).await.unwrap();
    assert!(!state.exists());
    assert_eq!(r.check().await, Health::Stopped);
    // Stopping a stopped resource succeeds (the agent's stop is idempotent).
    r.stop(false).await.unwrap();
}

#[tokio::test]
async fn validate_all_failure_refuses_the_start() {
    let cg = TestCgroup::new("ocf-validate");
    let r = make("bad", cfg("anything", &[("binfile", "/nonexistent/daemon")]), Some(&cg)).unwrap();
    let err = r.start(&ctx("g1", "bad", 1)).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ResourceError::Config { .. }), "{msg}");
    assert!(msg.contains("validate-all") && msg.contains("OCF_ERR_INSTALLED"), "{msg}");
}

/// The timeout the installed agent's own meta-data advertises for `action`, read here
/// without the resource's parser (`<action name="start" timeout="20s" />` → 20 s).
fn advertised(agent: &str, action: &str) -> Duration {
    let out = std::process::Command::new(format!("/usr/lib/ocf/resource.d/heartbeat/{agent}"))
        .arg("meta-data")
        .env("OCF_ROOT", "/usr/lib/ocf")
        .output()
        .unwrap();
    let xml = String::from_utf8(out.stdout).unwrap();
    let line = xml
        .lines()
        .find(|l| l.contains("<action") && l.contains(&format!("name=\"{action}\"")))
        .unwrap_or_else(|| panic!("{agent} advertises no {action}:\n{xml}"));
    let t = line.split("timeout=\"").nth(1).unwrap().split('"').next().unwrap();
    Duration::from_secs(t.strip_suffix('s').unwrap_or(t).parse().unwrap())
}

#[test]
fn meta_data_gives_the_timeouts_the_configuration_leaves_out() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("dummy.state");
    let mut c = cfg("Dummy", &[("state", state.to_str().unwrap())]);
    c.start_timeout = None;
    c.monitor_timeout = None;
    let r = OcfResource::build("g1", "d", &c, &ResourceEnv::new("node-a")).unwrap();
    let [start, stop, monitor] = r.timeouts();
    assert_eq!(start, advertised("Dummy", "start"));
    assert_eq!(monitor, advertised("Dummy", "monitor"));
    // Given in the configuration: kept, even when it differs from the advice.
    assert_eq!(stop, Duration::from_secs(30));
    assert_ne!(start, OcfConfig::DEFAULT_TIMEOUTS[0], "the test needs an advice that differs from the default");
}

#[test]
fn meta_data_refuses_what_is_not_an_ocf_agent_and_missing_required_parameters() {
    // A real program that is not an OCF agent: `true` prints no meta-data.
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("resource.d/local");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink("/bin/true", dir.join("notanagent")).unwrap();
    let mut c = cfg("Dummy", &[]);
    c.provider = "local".into();
    c.agent = "notanagent".into();
    let mut env = ResourceEnv::new("node-a");
    env.ocf_root = root.path().to_path_buf();
    let spec = tandem_config::Resource { name: "x".into(), depends_on: Vec::new(), kind: ResourceKind::Ocf(c) };
    let err = build("g1", &spec, &env).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ResourceError::Config { .. }), "{msg}");
    assert!(msg.contains("local:notanagent") && msg.contains("not a usable OCF resource agent"), "{msg}");
    assert!(msg.contains("not XML"), "{msg}");

    // IPaddr2 requires `ip`.
    let err = make("vip", cfg("IPaddr2", &[("nic", "eth0")]), None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ResourceError::Config { .. }), "{msg}");
    assert!(msg.contains("requires the parameter(s) ip"), "{msg}");
}

#[test]
fn missing_agent_is_refused_at_build() {
    let mut c = cfg("Dummy", &[]);
    c.agent = "NoSuchAgentTandem".into();
    let msg = make("x", c, None).unwrap_err().to_string();
    assert!(msg.contains("NoSuchAgentTandem") && msg.contains("resource-agents"), "{msg}");
}

#[tokio::test]
async fn anything_daemon_runs_in_the_cgroup_and_is_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let cg = TestCgroup::new("ocf-anything");
    let pidfile = tmp.path().join("a.pid");
    let params = [("binfile", "/bin/sleep"), ("cmdline_options", "300"), ("pidfile", pidfile.to_str().unwrap())];
    let r = make("sleeper", cfg("anything", &params), Some(&cg)).unwrap();
    r.start(&ctx("g1", "sleeper", 2)).await.unwrap();
    let pid = read_pid(&pidfile);
    assert!(alive(pid));
    let procs = cg.cgroup().child("sleeper").child("service").procs().unwrap();
    assert!(procs.contains(&pid), "daemon {pid} not in the service cgroup: {procs:?}");
    assert_eq!(r.check().await, Health::Running);

    // The daemon dies: its pid file remains, which the agent reports as a failure.
    // SAFETY: kill(2) on the daemon's pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(20), || reaped(pid)), "pid {pid} not reaped");
    match r.check().await {
        Health::Failed(why) => assert!(why.contains("OCF_ERR_GENERIC"), "{why}"),
        h => panic!("expected failed, got {h:?}"),
    }

    r.start(&ctx("g1", "sleeper", 3)).await.unwrap();
    let pid = read_pid(&pidfile);
    assert!(alive(pid));
    r.stop(false).await.unwrap();
    assert!(wait_until(Duration::from_secs(5), || !alive(pid)));
    assert_eq!(r.check().await, Health::Stopped);

    // A forced stop kills the daemon through the cgroup first.
    r.start(&ctx("g1", "sleeper", 4)).await.unwrap();
    let pid = read_pid(&pidfile);
    r.stop(true).await.unwrap();
    assert!(wait_until(Duration::from_secs(5), || !alive(pid)));
    assert!(!cg.cgroup().is_populated().unwrap());
}

#[test]
fn ipaddr2_in_a_network_namespace() {
    tandem_testkit::require_program("ip", "iproute2", &[]);
    let net = NetnsPair::new("ocf", "10.81.7");
    let cg = TestCgroup::new("ocf-ipaddr2");
    let cg_path = cg.path.clone();
    let dev = net.veth_a.clone();
    let b = net.b.clone();
    let shown = NetnsPair::run_in(&net.a, move || {
        Box::pin(async move {
            let params = [("ip", "10.81.7.50"), ("cidr_netmask", "24"), ("nic", dev.as_str())];
            let env = ResourceEnv::new("node-a").with_cgroup(&cg_path);
            let spec = tandem_config::Resource {
                name: "vip".into(),
                depends_on: Vec::new(),
                kind: ResourceKind::Ocf(cfg("IPaddr2", &params)),
            };
            let r = build("g1", &spec, &env).unwrap();
            assert_eq!(r.check().await, Health::Stopped);
            r.start(&ctx("g1", "vip", 1)).await.unwrap();
            assert_eq!(r.check().await, Health::Running);
            let up = String::from_utf8(
                std::process::Command::new("ip").args(["-o", "addr", "show", "dev", &dev]).output().unwrap().stdout,
            )
            .unwrap();
            // Reachable from the other namespace.
            let ping = std::process::Command::new("ip")
                .args(["netns", "exec", &b, "ping", "-c", "1", "-W", "2", "10.81.7.50"])
                .output()
                .unwrap();
            r.stop(false).await.unwrap();
            assert_eq!(r.check().await, Health::Stopped);
            let down = String::from_utf8(
                std::process::Command::new("ip").args(["-o", "addr", "show", "dev", &dev]).output().unwrap().stdout,
            )
            .unwrap();
            (up, ping.status.success(), down)
        })
    });
    assert!(shown.0.contains("10.81.7.50/24"), "after start: {}", shown.0);
    assert!(shown.1, "10.81.7.50 did not answer ping from the other namespace");
    assert!(!shown.2.contains("10.81.7.50"), "after stop: {}", shown.2);
}
