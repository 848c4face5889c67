//! Outside fencing against real things: Debian's fence-agents run unmodified (fence_ipmilan
//! powering off a host behind OpenIPMI's BMC simulator, fence_heuristics_ping,
//! fence_ack_manual), fence commands that kill every process of a network namespace, hung
//! agents and commands, and a fence race decided by `fence_delay`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_config::ClusterConfig;
use tandem_engine::NodeId;
use tandem_node::fence::{
    AgentError, Confirmation, FenceError, FenceRoute, Fencer, RetryPolicy, agent::read_metadata, fence_route,
    group_requires_fencing,
};
use tandem_testkit::{ChildGuard, free_port, require_program, run_ok};

/// A two-link-free cluster file with the given `[[node]]` tables (and anything after them).
fn config(nodes: &str) -> ClusterConfig {
    let src = format!("[cluster]\nname = \"c\"\n\n[[link]]\nname = \"lan\"\nport = 5405\n\n{nodes}");
    match tandem_config::check_str(&src, "test.toml") {
        Ok(c) => c.config,
        Err(e) => panic!("bad test config:\n{src}\n{e}"),
    }
}

fn node(name: &str, id: u32, extra: &str) -> String {
    format!("[[node]]\nname = \"{name}\"\nid = {id}\nlinks = {{ lan = \"10.0.0.{id}\" }}\n{extra}\n")
}

fn pid_alive(pid: u32) -> bool {
    // A zombie is dead: it only waits for its parent to reap it.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| !s[i + 1..].trim_start().starts_with('Z')))
        .unwrap_or(false)
}

fn pids_with_arg(arg: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        if cmd.split(|b| *b == 0).any(|a| a == arg.as_bytes()) && pid_alive(pid) {
            out.push(pid);
        }
    }
    out
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- fence-agents

/// OpenIPMI's `ipmi_sim`: a BMC on 127.0.0.1 whose chassis power is a real process
/// (`sleep` with a marker argument), started at power-on and killed at power-off.
struct SimulatedBmc {
    _dir: tempfile::TempDir,
    _sim: ChildGuard,
    port: u16,
    marker: String,
    password_file: PathBuf,
}

impl SimulatedBmc {
    fn start() -> Self {
        let sim = require_program("ipmi_sim", "openipmi", &[]);
        require_program("ipmitool", "ipmitool", &[]);
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let serial = free_port();
        // A fractional sleep length nobody else uses marks the "host" process.
        let marker = format!("{}.{}", 100000 + std::process::id() % 1000, port);
        std::fs::create_dir(dir.path().join("state")).unwrap();
        let conf = format!(
            "name \"tandem{port}\"\nset_working_mc 0x20\n  startlan 1\n    addr 127.0.0.1 {port}\n    priv_limit admin\n\
             \x20   allowed_auths_callback none md2 md5 straight\n    allowed_auths_user none md2 md5 straight\n\
             \x20   allowed_auths_operator none md2 md5 straight\n    allowed_auths_admin none md2 md5 straight\n\
             \x20   guid a123456789abcdefa123456789abcdef\n  endlan\n  serial 15 127.0.0.1 {serial} codec VM\n\
             \x20 startcmd \"sleep {marker}\"\n  startnow true\n  poweroff_wait 1\n  kill_wait 1\n\
             \x20 user 2 true \"admin\" \"bmc-pass-7\" admin 10 none md2 md5 straight\n"
        );
        std::fs::write(dir.path().join("lan.conf"), conf).unwrap();
        std::fs::write(
            dir.path().join("cmds"),
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\n\
             sel_enable 0x20 1000 0x0a\nmc_enable 0x20\n",
        )
        .unwrap();
        let password_file = dir.path().join("bmc.pw");
        std::fs::write(&password_file, "bmc-pass-7\n").unwrap();
        let log = std::fs::File::create(dir.path().join("sim.log")).unwrap();
        let mut cmd = Command::new(sim);
        cmd.arg("-c").arg(dir.path().join("lan.conf")).arg("-f").arg(dir.path().join("cmds"));
        cmd.arg("-s").arg(dir.path().join("state")).arg("-n");
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        let sim = ChildGuard::spawn("ipmi_sim", cmd);
        let me = Self { _dir: dir, _sim: sim, port, marker, password_file };
        wait_until("ipmi_sim powers its host on", Duration::from_secs(20), || !me.host_pids().is_empty());
        me
    }

    fn host_pids(&self) -> Vec<u32> {
        pids_with_arg(&self.marker)
    }

    fn fence_table(&self, password_file: &Path, timeout: &str) -> String {
        format!(
            "fence = {{ kind = \"agent\", agent = \"fence_ipmilan\", password_file = \"{}\", timeout = \"{timeout}\", \
             params = {{ ip = \"127.0.0.1\", ipport = \"{}\", username = \"admin\", lanplus = \"1\", cipher = \"3\" }} }}",
            password_file.display(),
            self.port
        )
    }
}

#[tokio::test]
async fn real_agents_metadata_is_parsed() {
    let ipmilan = require_program("fence_ipmilan", "fence-agents", &[]);
    let md = read_metadata(&ipmilan, Duration::from_secs(30)).await.unwrap();
    assert_eq!(md.name, "fence_ipmilan");
    assert!(md.supports("off") && md.supports("status"), "{md:?}");
    for p in ["ip", "ipport", "username", "password", "lanplus", "plug"] {
        assert!(md.parameters.contains(p), "fence_ipmilan metadata lacks {p}: {md:?}");
    }
    let ping = require_program("fence_heuristics_ping", "fence-agents", &[]);
    let md = read_metadata(&ping, Duration::from_secs(30)).await.unwrap();
    assert!(md.supports("off") && !md.supports("status"), "{md:?}");
    // Not an agent at all: its "metadata" is not XML.
    let e = read_metadata(Path::new("/bin/echo"), Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(e, AgentError::Metadata { .. }), "{e}");
}

#[tokio::test]
async fn fence_ipmilan_powers_off_a_host_behind_a_simulated_bmc() {
    let bmc = SimulatedBmc::start();
    let host = bmc.host_pids();
    let cfg = config(&format!("{}{}", node("a", 1, ""), node("b", 2, &bmc.fence_table(&bmc.password_file, "60s"))));
    let fencer = Fencer::from_config(&cfg).unwrap();
    let report = fencer.fence(NodeId(2)).await.unwrap_or_else(|e| panic!("{}", e.chain()));
    assert_eq!(report.confirmation, Confirmation::StatusOff, "{report:?}");
    assert_eq!(report.name, "b");
    // The BMC killed the host process; status (exit 2) confirmed it.
    for pid in host {
        assert!(!pid_alive(pid), "host process {pid} survived fencing: {report:?}");
    }
    assert!(bmc.host_pids().is_empty());
    assert!(report.detail.contains("OFF"), "{report:?}");

    // Fencing a node that is already off is confirmed again (status says off).
    let again = fencer.fence(NodeId(2)).await.unwrap();
    assert_eq!(again.confirmation, Confirmation::StatusOff);
}

#[tokio::test]
async fn a_wrong_password_fails_and_is_never_shown() {
    let bmc = SimulatedBmc::start();
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.pw");
    std::fs::write(&wrong, "not-the-bmc-pw-913\n").unwrap();
    let cfg = config(&format!("{}{}", node("a", 1, ""), node("b", 2, &bmc.fence_table(&wrong, "60s"))));
    let fencer = Fencer::from_config(&cfg).unwrap();
    let e = fencer.fence(NodeId(2)).await.unwrap_err();
    let shown = format!("{} | {e:?}", e.chain());
    assert!(matches!(&e, FenceError::Agent { source: AgentError::Failed { action: "off", .. }, .. }), "{shown}");
    assert!(!shown.contains("not-the-bmc-pw-913") && !shown.contains("bmc-pass-7"), "{shown}");
    assert!(!e.is_permanent());
    assert!(!bmc.host_pids().is_empty(), "the host must still run after a failed fencing");
}

#[tokio::test]
async fn an_agent_without_status_is_confirmed_by_its_off_alone() {
    require_program("ping", "iputils-ping", &["/bin"]);
    let cfg = config(&format!(
        "{}{}",
        node("a", 1, ""),
        node(
            "b",
            2,
            "fence = { kind = \"agent\", agent = \"fence_heuristics_ping\", params = { ping_targets = \"127.0.0.1\" } }"
        )
    ));
    let report = Fencer::from_config(&cfg).unwrap().fence(NodeId(2)).await.unwrap_or_else(|e| panic!("{}", e.chain()));
    assert_eq!(report.confirmation, Confirmation::OffWithoutStatus);
}

#[tokio::test]
async fn an_agent_that_cannot_power_off_is_refused() {
    // An agent whose metadata lists no `off` (as fence_kdump-like watchers or a
    // status-only agent would): refused before it runs.
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("fence_statusonly");
    std::fs::write(
        &agent,
        "#!/bin/sh\n[ \"$2\" = metadata ] || { echo \"ran an action\" > \"$0.ran\"; exit 0; }\n\
         echo '<?xml version=\"1.0\" ?><resource-agent name=\"fence_statusonly\"><actions>\
         <action name=\"status\"/><action name=\"metadata\"/></actions></resource-agent>'\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = config(&format!(
        "{}{}",
        node("a", 1, ""),
        node("b", 2, &format!("fence = {{ kind = \"agent\", agent = \"{}\" }}", agent.display()))
    ));
    let e = Fencer::from_config(&cfg).unwrap().fence(NodeId(2)).await.unwrap_err();
    assert!(matches!(&e, FenceError::Agent { source: AgentError::NoOff { .. }, .. }), "{}", e.chain());
    assert!(e.is_permanent());
    assert!(!dir.path().join("fence_statusonly.ran").exists(), "an action ran");

    // fence_ack_manual is a retired shim in Debian: its -o metadata fails, and Tandem says so.
    let cfg = config(&format!(
        "{}{}",
        node("a", 1, ""),
        node("b", 2, "fence = { kind = \"agent\", agent = \"fence_ack_manual\" }")
    ));
    let e = Fencer::from_config(&cfg).unwrap().fence(NodeId(2)).await.unwrap_err();
    assert!(matches!(&e, FenceError::Agent { source: AgentError::Metadata { .. }, .. }), "{}", e.chain());

    let cfg = config(&format!(
        "{}{}",
        node("a", 1, ""),
        node("b", 2, "fence = { kind = \"agent\", agent = \"fence_surely_not_installed\" }")
    ));
    let e = Fencer::from_config(&cfg).unwrap().fence(NodeId(2)).await.unwrap_err();
    assert!(e.chain().contains("fence-agents"), "{}", e.chain());
}

#[tokio::test]
async fn a_hung_agent_is_killed_within_its_timeout() {
    // Nothing answers IPMI on this UDP port: fence_ipmilan (and its ipmitool) keep retrying
    // far longer than the 2 s timeout.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "x\n").unwrap();
    let table = format!(
        "fence = {{ kind = \"agent\", agent = \"fence_ipmilan\", password_file = \"{}\", timeout = \"2s\", \
         params = {{ ip = \"127.0.0.1\", ipport = \"{port}\", username = \"admin\", lanplus = \"1\", login_timeout = \"60\" }} }}",
        pw.display()
    );
    let cfg = config(&format!("{}{}", node("a", 1, ""), node("b", 2, &table)));
    let fencer = Fencer::from_config(&cfg).unwrap();
    fencer.fence(NodeId(2)).await.ok(); // warm the metadata cache: time only the hung `off`
    let start = Instant::now();
    let e = fencer.fence(NodeId(2)).await.unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(&e, FenceError::Agent { source: AgentError::TimedOut { action: "off", .. }, .. }),
        "{}",
        e.chain()
    );
    assert!(took < Duration::from_secs(10), "a 2 s timeout took {took:?}");
    // No ipmitool talking to that port is left behind.
    assert!(pids_with_arg(&port.to_string()).is_empty(), "leftover agent processes");
}

// ---------------------------------------------------------------- fence commands

/// A network namespace running a `sleep` (the "node"), deleted on drop.
struct NetnsNode {
    name: String,
    _sleeper: ChildGuard,
    pid: u32,
}

impl NetnsNode {
    fn start(tag: &str) -> Self {
        require_program("ip", "iproute2", &[]);
        let name = format!("tf{}{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run_ok("ip netns add", Command::new("ip").args(["netns", "add", &name]));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &name, "sleep", "1000"]);
        let sleeper = ChildGuard::spawn(&name, cmd);
        let pid = sleeper.pid();
        let ns = name.clone();
        wait_until("sleep runs in the namespace", Duration::from_secs(10), || {
            run_ok("ip netns pids", Command::new("ip").args(["netns", "pids", &ns])).split_whitespace().count() > 0
        });
        Self { name, _sleeper: sleeper, pid }
    }

    fn alive(&self) -> bool {
        pid_alive(self.pid)
    }
}

impl Drop for NetnsNode {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// The fence command: kills every process of the namespace named like the node, records
/// its environment, and exits 0 only when the namespace is empty.
fn fence_script(dir: &Path) -> PathBuf {
    let p = dir.join("fence-netns");
    std::fs::write(
        &p,
        "#!/bin/sh\n[ \"$TANDEM_FENCE_ACTION\" = off ] || exit 3\n\
         echo \"$TANDEM_FENCE_NODE $TANDEM_FENCE_NODE_ID $1\" >> \"$(dirname \"$0\")/calls\"\n\
         ip netns pids \"$1\" | xargs -r kill -9\n\
         for i in 1 2 3 4 5 6 7 8 9 10; do [ -z \"$(ip netns pids \"$1\")\" ] && exit 0; sleep 0.2; done\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn command_table(script: &Path, timeout: &str) -> String {
    format!("fence = {{ kind = \"command\", command = [\"{}\"], timeout = \"{timeout}\" }}", script.display())
}

#[tokio::test]
async fn a_fence_command_kills_every_process_of_a_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let script = fence_script(dir.path());
    let victim = NetnsNode::start("v");
    let bystander = NetnsNode::start("w");
    let cfg = config(&format!(
        "{}{}",
        node(&bystander.name, 1, &command_table(&script, "30s")),
        node(&victim.name, 7, &command_table(&script, "30s"))
    ));
    let report = Fencer::from_config(&cfg).unwrap().fence(NodeId(7)).await.unwrap_or_else(|e| panic!("{}", e.chain()));
    assert_eq!(report.confirmation, Confirmation::CommandSucceeded);
    wait_until("the fenced namespace's sleep is gone", Duration::from_secs(5), || !victim.alive());
    assert!(bystander.alive(), "fencing one node killed another");
    let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
    assert_eq!(calls.trim(), format!("{0} 7 {0}", victim.name));
}

#[tokio::test]
async fn a_hung_fence_command_and_its_children_are_killed_within_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("hang");
    let child_pid = dir.path().join("child.pid");
    std::fs::write(&script, format!("#!/bin/sh\nsleep 1000 &\necho $! > {}\nsleep 1000\n", child_pid.display()))
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = config(&format!("{}{}", node("a", 1, ""), node("b", 2, &command_table(&script, "1s"))));
    let start = Instant::now();
    let e = Fencer::from_config(&cfg).unwrap().fence(NodeId(2)).await.unwrap_err();
    let took = start.elapsed();
    assert!(e.chain().contains("did not finish within 1.0 s"), "{}", e.chain());
    assert!(took < Duration::from_secs(8), "a 1 s timeout took {took:?}");
    let pid: u32 = std::fs::read_to_string(&child_pid).unwrap().trim().parse().unwrap();
    assert!(!pid_alive(pid), "the command's background child {pid} survived");
}

#[tokio::test]
async fn in_a_fence_race_the_delayed_node_survives() {
    let dir = tempfile::tempdir().unwrap();
    let script = fence_script(dir.path());
    let fast = NetnsNode::start("f");
    let delayed = NetnsNode::start("d");
    let cfg = config(&format!(
        "{}{}",
        node(&fast.name, 1, &command_table(&script, "30s")),
        node(&delayed.name, 2, &format!("{}\nfence_delay = \"3s\"", command_table(&script, "30s")))
    ));
    // Each node's agent has its own fencer; both lost sight of each other at once.
    let on_fast = Fencer::from_config(&cfg).unwrap();
    let on_delayed = Fencer::from_config(&cfg).unwrap();
    let fast_cancel = on_fast.cancel_token();
    let start = Instant::now();
    let (fast_fences_delayed, delayed_fences_fast) = tokio::join!(on_fast.fence(NodeId(2)), async {
        let r = on_delayed.fence(NodeId(1)).await;
        // The fast node is off now: its agent, and so its pending attempt, are gone.
        fast_cancel.cancel();
        r
    });
    let report = delayed_fences_fast.unwrap_or_else(|e| panic!("{}", e.chain()));
    assert_eq!(report.delayed, Duration::ZERO);
    assert!(matches!(fast_fences_delayed, Err(FenceError::Cancelled { .. })), "{fast_fences_delayed:?}");
    assert!(start.elapsed() < Duration::from_secs(3), "the cancelled delay was waited out");
    wait_until("the fast node is fenced", Duration::from_secs(5), || !fast.alive());
    assert!(delayed.alive(), "the node with fence_delay must survive the race");
    let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
    assert_eq!(calls.lines().count(), 1, "the delayed attempt ran its method: {calls}");
}

#[tokio::test]
async fn the_delay_is_waited_before_the_method_runs() {
    let dir = tempfile::tempdir().unwrap();
    let script = fence_script(dir.path());
    let target = NetnsNode::start("t");
    let cfg = config(&format!(
        "{}{}",
        node("a", 1, ""),
        node(&target.name, 2, &format!("{}\nfence_delay = \"700ms\"", command_table(&script, "30s")))
    ));
    let report = Fencer::from_config(&cfg).unwrap().fence(NodeId(2)).await.unwrap();
    assert_eq!(report.delayed, Duration::from_millis(700));
    assert!(report.elapsed >= Duration::from_millis(700), "{report:?}");
    wait_until("fenced", Duration::from_secs(5), || !target.alive());
}

// ---------------------------------------------------------------- retries, routes

#[tokio::test]
async fn the_retry_driver_reports_every_failure_until_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("flaky");
    let count = dir.path().join("count");
    // Fails twice, then succeeds.
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nn=$(cat {0} 2>/dev/null || echo 0)\nn=$((n+1))\necho $n > {0}\n[ $n -ge 3 ] || {{ echo \"PDU busy ($n)\" >&2; exit 1; }}\n",
            count.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = config(&format!("{}{}", node("a", 1, ""), node("b", 2, &command_table(&script, "10s"))));
    let fencer = Fencer::from_config(&cfg).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let policy = RetryPolicy { initial: Duration::from_millis(50), max: Duration::from_millis(80) };
    let s = seen.clone();
    let report = fencer
        .fence_until_confirmed(NodeId(2), policy, move |f| {
            s.lock().unwrap().push((f.attempt, f.retry_in, f.error.chain()));
        })
        .await
        .unwrap();
    assert_eq!(report.confirmation, Confirmation::CommandSucceeded);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!((seen[0].0, seen[0].1), (1, Some(Duration::from_millis(50))));
    assert_eq!((seen[1].0, seen[1].1), (2, Some(Duration::from_millis(80))));
    assert!(seen[0].2.contains("PDU busy (1)") && seen[1].2.contains("PDU busy (2)"), "{seen:?}");
}

#[tokio::test]
async fn host_cluster_and_lease_only_never_report_success() {
    let cfg = config(&format!(
        "{}{}{}\n[host_link]\naddress = \"vsock:2:7702\"\nkey_file = \"/etc/tandem/link.key\"\n",
        node("a", 1, "fence = { kind = \"lease-watchdog-only\" }"),
        node("b", 2, "fence = { kind = \"host-cluster\", vm_uuid = \"4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b01\" }"),
        node("c", 3, ""),
    ));
    let fencer = Fencer::from_config(&cfg).unwrap();
    let mut seen = Vec::new();
    let e = fencer
        .fence_until_confirmed(NodeId(2), RetryPolicy::default(), |f| seen.push((f.attempt, f.retry_in)))
        .await
        .unwrap_err();
    assert!(e.chain().contains("needs the host–guest link, and this node runs none"), "{}", e.chain());
    assert_eq!(seen, [(1, None)], "a permanent failure is still reported once");
    assert!(matches!(fencer.fence(NodeId(1)).await, Err(FenceError::LeaseWatchdogOnly { .. })));
    assert!(matches!(fencer.fence(NodeId(3)).await, Err(FenceError::NoMethod { .. })));
    assert!(matches!(fencer.fence(NodeId(9)).await, Err(FenceError::UnknownNode(NodeId(9)))));
}

#[test]
fn require_fencing_follows_the_eligible_nodes_methods() {
    let cfg = config(&format!(
        "{}{}{}\n[[group]]\nname = \"lease-only\"\nnodes = [\"w1\", \"w2\"]\n\n\
         [[group]]\nname = \"mixed\"\nnodes = [\"w1\", \"p\"]\n",
        node("w1", 1, "fence = { kind = \"lease-watchdog-only\" }"),
        node("w2", 2, "fence = { kind = \"lease-watchdog-only\" }"),
        node("p", 3, "fence = { kind = \"command\", command = [\"/bin/true\"] }")
    ));
    assert!(!group_requires_fencing(&cfg, cfg.group("lease-only").unwrap()));
    assert!(group_requires_fencing(&cfg, cfg.group("mixed").unwrap()));
    assert_eq!(fence_route(cfg.node("w1").unwrap()), FenceRoute::LeaseExpiry);
    assert_eq!(fence_route(cfg.node("p").unwrap()), FenceRoute::Outside);
}
