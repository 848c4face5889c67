//! End-to-end failover of a guest cluster: real `tandem-guest` processes, a shared lease
//! file, a writer application that stamps every line with its fencing token.
//!
//! Each node runs in a cgroup of its own (agent, guard and application), so a test can stop
//! or kill a whole "node" at once, and a fence command can kill it. Nodes talk over loopback
//! addresses (127.0.0.11, .12, …). The evidence is gathered outside the agents: the writer
//! log (tokens must never go backwards: a line with an older token after a newer one means
//! two nodes wrote at once) and the lease area itself.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem_lease::{AreaParams, FileDisk, Lockspace, Timeouts};
use tandem_proto::v1 as pb;
use tandem_proto::v1::guest_agent_client::GuestAgentClient;
use tandem_testkit::{ChildGuard, free_port, report};

mod common;

const RENEWAL_MS: u64 = 300;

struct Cluster {
    dir: tempfile::TempDir,
    cg_root: PathBuf,
    nodes: Vec<String>,
    api_port: u16,
}

struct Node {
    agent: ChildGuard,
    cgroup: PathBuf,
}

impl Cluster {
    /// Writes the configuration of `n` nodes with one group `app`: a shared directory and a
    /// writer. `fence` is the TOML of every node's fence method (`{name}` is replaced).
    fn new(n: usize, fence: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let cg_root = tandem_lease::cgroup::cgroup2_mount()
            .expect("a cgroup2 mount (the e2e tests put each node in a cgroup)")
            .join(format!("tandem-e2e-{}", std::process::id()))
            .join(dir.path().file_name().unwrap());
        std::fs::create_dir_all(&cg_root).unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(dir.path().join("key"), "0123456789abcdef0123456789abcdef\n").unwrap();
        let lease = dir.path().join("lease");
        std::fs::File::create(&lease).unwrap().set_len(1 << 20).unwrap();
        let timeouts = Timeouts::from_renewal_ms(RENEWAL_MS);
        let disk = FileDisk::open(&lease).unwrap();
        Lockspace::init(
            &disk,
            &AreaParams { host_slots: 8, resource_slots: 16, timeouts, ..AreaParams::new("e2e") },
            false,
        )
        .unwrap();

        let port = free_port();
        let api_port = free_port();
        let nodes: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
        let mut toml = format!(
            "[cluster]\nname = \"e2e\"\nkey_file = \"{key}\"\nstate_dir = \"{state}\"\n\n[[link]]\nname = \"lo\"\nport = {port}\ninterval = \"100ms\"\ntimeout = \"1s\"\n\n\
             [lease]\ndevice = \"{lease}\"\nrenewal_interval = \"{RENEWAL_MS}ms\"\n\n",
            key = dir.path().join("key").display(),
            state = dir.path().join("state").display(),
            lease = lease.display(),
        );
        for (i, name) in nodes.iter().enumerate() {
            toml += &format!(
                "[[node]]\nname = \"{name}\"\nid = {id}\nlinks = {{ lo = \"127.0.0.{addr}\" }}\napi = \"127.0.0.{addr}:{api_port}\"\nfence = {fence}\n\n",
                id = i + 1,
                addr = 11 + i,
                fence = fence
                    .replace("{name}", name)
                    .replace("{cgroup}", &cg_root.join(name).display().to_string())
                    .replace("{fencelog}", &dir.path().join("fenced.log").display().to_string()),
            );
        }
        let log = shared.join("writer.log");
        toml += &format!(
            "[[group]]\nname = \"app\"\nnodes = [{list}]\nrestart_limit = 1\n\n\
             [[group.resource]]\nname = \"data\"\nkind = \"disk\"\ndirectory = \"{shared}\"\n\n\
             [[group.resource]]\nname = \"writer\"\nkind = \"exec\"\nmode = \"simple\"\n\
             start = [\"/bin/sh\", \"-c\", \"while :; do echo \\\"$TANDEM_FENCING_TOKEN $TANDEM_NODE\\\" >> {log}; sleep 0.02; done\"]\n\
             stop = [\"/bin/true\"]\nstop_timeout = \"5s\"\n",
            list = nodes.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", "),
            shared = shared.display(),
            log = log.display(),
        );
        std::fs::write(dir.path().join("tandem.toml"), toml).unwrap();
        Cluster { dir, cg_root, nodes, api_port }
    }

    /// Starts n1, waits until it runs the writer, then starts n2 as the standby and lets
    /// membership settle. Returns both nodes and n1's fencing token.
    fn active_and_standby(&self) -> (Node, Node, u64) {
        let n1 = self.start("n1");
        let t1 = self.wait_writer("n1", 0, Duration::from_secs(30));
        let n2 = self.start("n2");
        std::thread::sleep(Duration::from_secs(2));
        (n1, n2, t1)
    }

    /// A gRPC client of `node`'s API.
    fn client(&self, rt: &tokio::runtime::Runtime, node: &str) -> GuestAgentClient<tonic::transport::Channel> {
        let i: usize = node[1..].parse().unwrap();
        let url = format!("http://127.0.0.{}:{}", 10 + i, self.api_port);
        rt.block_on(GuestAgentClient::connect(url.clone())).unwrap_or_else(|e| panic!("cannot reach {url}: {e}"))
    }

    /// A gRPC client of `node`'s API, if it answers.
    fn client_opt(
        &self,
        rt: &tokio::runtime::Runtime,
        node: &str,
    ) -> Option<GuestAgentClient<tonic::transport::Channel>> {
        let i: usize = node[1..].parse().unwrap();
        rt.block_on(GuestAgentClient::connect(format!("http://127.0.0.{}:{}", 10 + i, self.api_port))).ok()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start(&self, name: &str) -> Node {
        let cgroup = self.cg_root.join(name);
        std::fs::create_dir_all(&cgroup).unwrap();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.path(&format!("{name}.log"))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem-guest"));
        cmd.arg("--config")
            .arg(self.path("tandem.toml"))
            .arg("--cgroup-root")
            .arg(cgroup.join("groups"))
            .env("TANDEM_NODE", name)
            .env("TANDEM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        tandem_testkit::in_cgroup(&mut cmd, &cgroup);
        Node { agent: ChildGuard::spawn(&format!("tandem-guest {name}"), cmd), cgroup }
    }

    /// The writer log: (token, node) per line.
    fn writes(&self) -> Vec<(u64, String)> {
        common::read_writes(&self.path("shared/writer.log"))
    }

    /// Waits until `node` writes with a token above `above`; returns that token.
    fn wait_writer(&self, node: &str, above: u64, limit: Duration) -> u64 {
        let start = Instant::now();
        loop {
            if let Some((t, _)) = self.writes().iter().rev().find(|(t, n)| n == node && *t > above) {
                return *t;
            }
            assert!(
                start.elapsed() < limit,
                "{node} did not write with a token above {above} within {limit:?}; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until any node writes with a token above `above`; returns the token and node.
    fn wait_any_writer(&self, above: u64, limit: Duration) -> (u64, String) {
        let start = Instant::now();
        loop {
            if let Some((t, n)) = self.writes().into_iter().find(|(t, _)| *t > above) {
                return (t, n);
            }
            assert!(
                start.elapsed() < limit,
                "nobody wrote with a token above {above} within {limit:?}; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!("--- {n}\n{}", std::fs::read_to_string(self.path(&format!("{n}.log"))).unwrap_or_default())
            })
            .collect()
    }

    /// The safety invariant, from the writer log: tokens never go backwards, and each token
    /// belongs to one node.
    fn assert_never_two_writers(&self) {
        if let Some(broken) = common::two_writers(&self.writes()) {
            panic!("{broken}; logs:\n{}", self.logs());
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let nodes: Vec<&str> = self.nodes.iter().map(String::as_str).collect();
        common::remove_node_cgroups(&self.cg_root, &nodes);
    }
}

impl Node {
    /// Freezes (`true`) or thaws every process of the node at once: agent, guard and
    /// application stop together, like a paused VM.
    fn freeze(&self, frozen: bool) {
        std::fs::write(self.cgroup.join("cgroup.freeze"), if frozen { "1" } else { "0" }).unwrap();
    }

    /// Kills every process of the node at once, like a crashed machine.
    fn crash(&self) {
        std::fs::write(self.cgroup.join("cgroup.kill"), "1").unwrap();
    }
}

#[test]
fn sigkill_of_the_active_agent_moves_the_group_and_never_two_writers() {
    let c = Cluster::new(2, "{ kind = \"lease-watchdog-only\" }");
    let (mut n1, _n2, t1) = c.active_and_standby();
    assert!(c.writes().iter().all(|(_, n)| n == "n1"), "the standby must not write:\n{}", c.logs());

    // The agent dies: its guard kills the writer at once; n2 takes over once n1's host lease is dead.
    let killed = Instant::now();
    n1.agent.kill();
    let t2 = c.wait_writer("n2", t1, Duration::from_secs(30));
    report::failover(
        "sigkill_of_the_active_agent_moves_the_group_and_never_two_writers",
        killed.elapsed(),
        &format!("SIGKILL of n1's agent until n2 writes (token {t1} -> {t2})"),
    );
    std::thread::sleep(Duration::from_millis(500));
    c.assert_never_two_writers();
}

#[test]
fn crash_of_the_whole_active_node_moves_the_group() {
    let c = Cluster::new(2, "{ kind = \"lease-watchdog-only\" }");
    let (n1, _n2, t1) = c.active_and_standby();
    let killed = Instant::now();
    n1.crash();
    let t2 = c.wait_writer("n2", t1, Duration::from_secs(30));
    report::failover(
        "crash_of_the_whole_active_node_moves_the_group",
        killed.elapsed(),
        &format!("cgroup.kill of the whole n1 until n2 writes (token {t1} -> {t2})"),
    );
    c.assert_never_two_writers();
}

#[test]
fn sigstop_of_the_agent_alone_is_fenced_by_its_guard_and_learns_it_lost_on_resume() {
    let c = Cluster::new(2, "{ kind = \"lease-watchdog-only\" }");
    let (mut n1, _n2, t1) = c.active_and_standby();

    let stopped = Instant::now();
    n1.agent.signal(libc::SIGSTOP);
    let t2 = c.wait_writer("n2", t1, Duration::from_secs(30));
    report::failover(
        "sigstop_of_the_agent_alone_is_fenced_by_its_guard_and_learns_it_lost_on_resume",
        stopped.elapsed(),
        &format!("SIGSTOP of n1's agent until n2 writes (token {t1} -> {t2})"),
    );
    n1.agent.signal(libc::SIGCONT);
    // The resumed agent finds its lease gone: it stops everything and exits; it never writes again.
    let start = Instant::now();
    let status = loop {
        if let Some(s) = n1.agent.try_wait() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "n1 did not exit after resuming:\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(76), "exit status of an agent that lost its host lease:\n{}", c.logs());
    std::thread::sleep(Duration::from_secs(1));
    c.assert_never_two_writers();
    assert!(c.writes().iter().filter(|(t, _)| *t == t2).all(|(_, n)| n == "n2"));
}

#[test]
fn whole_node_stall_is_fenced_from_outside_before_takeover() {
    // The fence command kills every process of the target node's cgroup, like powering it off.
    let c = Cluster::new(
        2,
        "{ kind = \"command\", command = [\"/bin/sh\", \"-c\", \"echo 1 > {cgroup}/cgroup.kill && echo {name} >> {fencelog}\"] }",
    );
    let (n1, _n2, t1) = c.active_and_standby();

    // Agent, guard and writer all frozen: nothing on n1 can fence itself.
    let frozen = Instant::now();
    n1.freeze(true);
    let t2 = c.wait_writer("n2", t1, Duration::from_secs(30));
    report::failover(
        "whole_node_stall_is_fenced_from_outside_before_takeover",
        frozen.elapsed(),
        &format!("cgroup.freeze of the whole n1 until n2 writes, n1 fenced first (token {t1} -> {t2})"),
    );
    // n1 was fenced (killed) before n2 started: resuming it changes nothing.
    n1.freeze(false);
    std::thread::sleep(Duration::from_secs(1));
    let populated = std::fs::read_to_string(n1.cgroup.join("cgroup.events")).unwrap_or_default();
    assert!(populated.contains("populated 0"), "n1's processes survived the fence: {populated}");
    c.assert_never_two_writers();
    assert!(t2 > t1);
    let fenced = std::fs::read_to_string(c.path("fenced.log")).unwrap_or_default();
    assert_eq!(fenced.lines().collect::<Vec<_>>(), ["n1"], "n2 must have fenced n1 exactly once:\n{}", c.logs());
}

#[test]
fn operator_move_hands_the_group_over_and_every_node_agrees() {
    let c = Cluster::new(2, "{ kind = \"lease-watchdog-only\" }");
    let (n1, _n2, t1) = c.active_and_standby();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // n1's event feed, watched from before the move.
    let mut api1 = c.client(&rt, "n1");
    let mut feed = rt.block_on(api1.watch_events(pb::WatchEventsRequest {})).unwrap().into_inner();
    let events = rt.spawn(async move {
        let mut seen = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(8), async {
            while let Ok(Some(ev)) = feed.message().await {
                seen.push(ev);
            }
        })
        .await;
        seen
    });

    // Asked on n2 (not the holder), without a target: n2 picks the best node other than n1
    // (itself, the only one) and forwards the move, naming it, to n1, which hands over cleanly.
    let mut api2 = c.client(&rt, "n2");
    let moved = Instant::now();
    rt.block_on(api2.move_group(pb::MoveGroupRequest { group: "app".into(), to: String::new() })).unwrap();
    let t2 = c.wait_writer("n2", t1, Duration::from_secs(30));
    report::failover(
        "operator_move_hands_the_group_over_and_every_node_agrees",
        moved.elapsed(),
        &format!("operator move (no target) until n2 writes (token {t1} -> {t2})"),
    );
    std::thread::sleep(Duration::from_secs(1));
    c.assert_never_two_writers();

    // Both nodes report the group on n2.
    for node in ["n1", "n2"] {
        let mut api = c.client(&rt, node);
        let st = rt.block_on(api.get_status(pb::GetStatusRequest {})).unwrap().into_inner();
        let g = st.groups.iter().find(|g| g.name == "app").unwrap();
        assert_eq!(g.location, "n2", "{node} sees {g:?}");
    }
    // n1 published the handover as structured events: the writer stopped cleanly (not
    // forced), and the group's new location.
    let seen = rt.block_on(events).unwrap();
    let kinds: Vec<_> = seen.iter().filter_map(|e| e.kind.clone()).collect();
    assert!(
        kinds.iter().any(|k| matches!(k, pb::event::Kind::ResourceOp(op)
            if op.resource == "writer" && op.op == pb::ResourceOp::Stop as i32 && op.outcome == pb::OpOutcome::Succeeded as i32)),
        "{kinds:#?}"
    );
    assert!(
        kinds.iter().any(|k| matches!(k, pb::event::Kind::GroupState(g) if g.group == "app" && g.location == "n2")),
        "{kinds:#?}"
    );
    assert!(
        !kinds
            .iter()
            .any(|k| matches!(k, pb::event::Kind::ResourceOp(op) if op.op == pb::ResourceOp::ForceStop as i32))
    );

    // Unknown groups are NotFound.
    let err = rt.block_on(api2.stop_group(pb::GroupRequest { group: "nope".into() })).unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // With n1 gone, no node but the one running it can take it: a move without a target is
    // refused, saying why, and nothing moves.
    n1.agent.signal(libc::SIGTERM);
    assert!(
        common::wait_until(Duration::from_secs(30), || {
            let st = rt.block_on(api2.get_status(pb::GetStatusRequest {})).unwrap().into_inner();
            st.nodes.iter().any(|n| n.name == "n1" && n.state == pb::NodeState::Down as i32)
        }),
        "n2 never saw n1 leave:\n{}",
        c.logs()
    );
    let err =
        rt.block_on(api2.move_group(pb::MoveGroupRequest { group: "app".into(), to: String::new() })).unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("no other eligible node can take it now (n1 is down or cannot act; n2 runs it now)"),
        "{err:?}"
    );
    let st = rt.block_on(api2.get_status(pb::GetStatusRequest {})).unwrap().into_inner();
    assert_eq!(st.groups.iter().find(|g| g.name == "app").unwrap().location, "n2");
}

#[test]
fn prepare_shutdown_moves_the_group_away_and_reports_safe() {
    let c = Cluster::new(2, "{ kind = \"lease-watchdog-only\" }");
    let (_n1, _n2, t1) = c.active_and_standby();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut api1 = c.client(&rt, "n1");
    let done = rt.block_on(async {
        let mut stream = api1.prepare_shutdown(pb::PrepareShutdownRequest {}).await.unwrap().into_inner();
        let mut last = None;
        while let Some(p) = stream.message().await.unwrap() {
            last = Some(p);
        }
        last
    });
    match done.and_then(|p| p.progress) {
        Some(pb::shutdown_progress::Progress::Done(d)) => assert!(d.safe_to_power_off, "{d:?}\n{}", c.logs()),
        other => panic!("no final message: {other:?}"),
    }
    c.wait_writer("n2", t1, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    c.assert_never_two_writers();
}

#[test]
fn losing_the_standby_does_not_disturb_the_active_group() {
    let c = Cluster::new(2, "{ kind = \"lease-watchdog-only\" }");
    let (_n1, n2, t1) = c.active_and_standby();
    let before = c.writes().len();
    n2.crash();
    // Past the link timeout and the host-dead time: n1 is now alone with half the votes and
    // keeps quorum through the tie-break lease it already holds.
    std::thread::sleep(Duration::from_secs(5));
    let w = c.writes();
    assert!(w.len() > before + 50, "the writer must keep running on n1:\n{}", c.logs());
    assert!(w.iter().all(|(t, n)| *t == t1 && n == "n1"), "the group moved or restarted:\n{}", c.logs());
    let log = std::fs::read_to_string(c.path("n1.log")).unwrap();
    assert!(!log.contains("quorum lost") && !log.contains("stopping app/writer"), "n1 bounced its group:\n{log}");
}

/// Kills the writer process of `node` (the service process in its resource cgroup).
fn kill_writer(c: &Cluster, node: &str) {
    let cg = c.cg_root.join(node).join("groups/app/writer/service/cgroup.procs");
    let pids = std::fs::read_to_string(&cg).unwrap_or_else(|e| panic!("{}: {e}", cg.display()));
    assert!(!pids.trim().is_empty(), "no writer process on {node}");
    // The writer's short-lived `sleep` children may exit between the read and the kill: a
    // vanished pid is fine, as long as something (the writer's shell) was killed.
    let killed = pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        // SAFETY: kill(2) only sends a signal to a pid read from the test's own cgroup.
        .filter(|pid| unsafe { libc::kill(*pid, libc::SIGKILL) } == 0)
        .count();
    assert!(killed > 0, "nothing of the writer on {node} could be killed ({pids})");
}

#[test]
fn a_crashed_application_restarts_in_place_then_moves_past_the_restart_limit() {
    let c = Cluster::new(2, "{ kind = \"lease-watchdog-only\" }");
    let (_n1, _n2, t1) = c.active_and_standby();

    // First crash: restart_limit = 1 allows one restart here, under the same lease.
    let before = c.writes().len();
    kill_writer(&c, "n1");
    let start = Instant::now();
    loop {
        let w = c.writes();
        if w.len() > before + 20 && w[before..].iter().any(|(t, n)| *t == t1 && n == "n1") {
            // Written again by n1 after the crash: restarted in place.
            let restarted = std::fs::read_to_string(c.path("n1.log")).unwrap();
            if restarted.matches("starting app/writer").count() >= 2 {
                break;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(40), "the writer was not restarted on n1:\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    report::failover(
        "a_crashed_application_restarts_in_place_then_moves_past_the_restart_limit",
        start.elapsed(),
        "writer SIGKILL #1 until n1 restarted it in place",
    );
    assert!(c.writes().iter().all(|(_, n)| n == "n1"), "the group must not move on the first crash");

    // Second crash: past the limit, the group fails over to n2 under a new token.
    std::thread::sleep(Duration::from_secs(1));
    kill_writer(&c, "n1");
    let moved = Instant::now();
    let t2 = c.wait_writer("n2", t1, Duration::from_secs(40));
    report::failover(
        "a_crashed_application_restarts_in_place_then_moves_past_the_restart_limit",
        moved.elapsed(),
        &format!("writer SIGKILL #2 past restart_limit until n2 writes (token {t1} -> {t2})"),
    );
    std::thread::sleep(Duration::from_millis(500));
    c.assert_never_two_writers();
}

#[test]
fn agent_restart_during_a_failover_starts_nothing_twice() {
    let c = Cluster::new(2, "{ kind = \"lease-watchdog-only\" }");
    let (mut n1, _n2, t1) = c.active_and_standby();

    // n1's agent dies (its guard kills the writer) and comes back at once. Two outcomes are
    // correct and race on the lease disk: n2 judges n1's old host lease dead and takes over,
    // or the restarted n1 (first in the node order) gets its host id back first and restarts
    // the group itself. Either way exactly one node starts it, once, with a new token.
    let killed = Instant::now();
    n1.agent.kill();
    let n1b = c.start("n1");
    let (t2, winner) = c.wait_any_writer(t1, Duration::from_secs(40));
    report::failover(
        "agent_restart_during_a_failover_starts_nothing_twice",
        killed.elapsed(),
        &format!("SIGKILL of n1's agent, restarted at once, until {winner} writes (token {t1} -> {t2})"),
    );
    std::thread::sleep(Duration::from_secs(4));
    c.assert_never_two_writers();
    let w = c.writes();
    let first_t2 = w.iter().position(|(t, _)| *t == t2).unwrap();
    assert!(
        w[first_t2..].iter().all(|(t, n)| *t == t2 && *n == winner),
        "after the takeover by {winner} only {winner} may write, with token {t2}:\n{}",
        c.logs()
    );
    let starts = |node: &str| {
        std::fs::read_to_string(c.path(&format!("{node}.log"))).unwrap().matches("starting app/writer").count()
    };
    // n1.log holds both n1 processes: the first start, plus the restart if n1 won.
    let (n1_starts, n2_starts) = if winner == "n2" { (1, 1) } else { (2, 0) };
    assert_eq!(
        (starts("n1"), starts("n2")),
        (n1_starts, n2_starts),
        "writer starts per node after {winner} took over:\n{}",
        c.logs()
    );
    eprintln!("the group went to {winner} (token {t1} -> {t2})");
    drop(n1b);
}

/// A loop device with an ext4 file system, detached on drop.
struct LoopDisk {
    dev: String,
    _dir: tempfile::TempDir,
}

impl LoopDisk {
    fn new() -> LoopDisk {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
        let out = Command::new("losetup").args(["-f", "--show"]).arg(&img).output().expect("losetup (package mount)");
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let st = Command::new("mkfs.ext4").args(["-q", "-F", &dev]).status().expect("mkfs.ext4 (package e2fsprogs)");
        assert!(st.success());
        LoopDisk { dev, _dir: dir }
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

#[test]
fn a_resource_that_will_not_stop_makes_the_node_fence_itself() {
    let c = Cluster::new(1, "{ kind = \"lease-watchdog-only\" }");
    let disk = LoopDisk::new();
    let mp = c.path("mnt");
    std::fs::create_dir(&mp).unwrap();
    // The group's data lives on a real mounted file system instead of a directory.
    let cfg = std::fs::read_to_string(c.path("tandem.toml")).unwrap();
    let shared = c.path("shared");
    let cfg = cfg.replace(
        &format!("kind = \"disk\"\ndirectory = \"{}\"", shared.display()),
        &format!("kind = \"disk\"\ndevice = \"{}\"\nmountpoint = \"{}\"\nfstype = \"ext4\"", disk.dev, mp.display()),
    );
    assert!(cfg.contains("mountpoint"), "{cfg}");
    std::fs::write(c.path("tandem.toml"), cfg).unwrap();

    let mut n1 = c.start("n1");
    c.wait_writer("n1", 0, Duration::from_secs(30));
    // Something outside the agent's reach keeps the file system busy: unmounting fails.
    std::fs::write(mp.join("held"), "x").unwrap();
    let held = std::fs::File::open(mp.join("held")).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut api = c.client(&rt, "n1");
    rt.block_on(api.stop_group(pb::GroupRequest { group: "app".into() })).unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = n1.agent.try_wait() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "n1 did not fence itself:\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(75), "exit status after self-fencing:\n{}", c.logs());
    let log = std::fs::read_to_string(c.path("n1.log")).unwrap();
    assert!(log.contains("would not stop"), "{log}");
    assert!(log.matches("failed to stop").count() >= 3, "three stop attempts first:\n{log}");
    // Nothing of the node's group survives; the writer is gone.
    let events = std::fs::read_to_string(c.cg_root.join("n1/groups/app/cgroup.events")).unwrap_or_default();
    assert!(events.is_empty() || events.contains("populated 0"), "{events}");
    let n = c.writes().len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.writes().len(), n, "the writer still writes after self-fencing");
    drop(held);
    let _ = Command::new("umount").arg(&mp).status();
}

#[test]
fn sigterm_stops_the_agent_cleanly_and_the_peer_takes_over_without_waiting_for_the_lease() {
    let c = Cluster::new(2, "{ kind = \"lease-watchdog-only\" }");
    let (mut n1, _n2, t1) = c.active_and_standby();
    n1.agent.signal(libc::SIGTERM);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = n1.agent.try_wait() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "n1 did not stop:\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "an orderly stop exits 0:\n{}", c.logs());
    let t2 = c.wait_writer("n2", t1, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    c.assert_never_two_writers();
    // n1 released the group's lease before it left, so n2 took it over at once instead of
    // waiting for n1's host lease to expire.
    let log2 = std::fs::read_to_string(c.path("n2.log")).unwrap();
    let acquired = log2.find(&format!("acquired the lease of app (token {t2})")).expect("n2 acquired the lease");
    assert!(
        log2.find("host lease of n1 is dead").is_none_or(|dead| acquired < dead),
        "n2 waited for n1's host lease:\n{log2}"
    );
}

/// The cluster's status as `node` answers it.
fn status_of(c: &Cluster, rt: &tokio::runtime::Runtime, node: &str) -> pb::GuestStatus {
    let mut api = c.client(rt, node);
    rt.block_on(api.get_status(pb::GetStatusRequest {})).unwrap().into_inner()
}

fn set_standby(c: &Cluster, rt: &tokio::runtime::Runtime, node: &str, mode: Option<pb::StandbyMode>) {
    let mut api = c.client(rt, node);
    let req = pb::SetStandbyRequest {
        node: node.into(),
        standby: mode.is_some(),
        mode: mode.unwrap_or(pb::StandbyMode::Unspecified) as i32,
    };
    let done = rt.block_on(api.set_standby(req)).unwrap_or_else(|e| panic!("SetStandby on {node}: {e}"));
    assert_eq!(done.into_inner().node, node);
}

#[test]
fn standby_moves_or_parks_the_group_without_a_failover_and_survives_an_agent_restart() {
    let c = Cluster::new(2, "{ kind = \"lease-watchdog-only\" }");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (_n1, mut n2, t1) = c.active_and_standby();
    let app = |st: &pb::GuestStatus| st.groups.iter().find(|g| g.name == "app").unwrap().clone();
    let node = |st: &pb::GuestStatus, n: &str| st.nodes.iter().find(|x| x.name == n).unwrap().clone();

    // n1 enters standby (move): the writer stops cleanly there and n2 takes over, no failover.
    let asked = Instant::now();
    set_standby(&c, &rt, "n1", Some(pb::StandbyMode::Move));
    let t2 = c.wait_writer("n2", t1, Duration::from_secs(30));
    report::failover(
        "standby_moves_or_parks_the_group_without_a_failover_and_survives_an_agent_restart",
        asked.elapsed(),
        &format!("standby (move) of n1 until n2 writes (token {t1} -> {t2})"),
    );
    let st1 = status_of(&c, &rt, "n1");
    assert!(node(&st1, "n1").standby && node(&st1, "n1").standby_mode() == pb::StandbyMode::Move, "{st1:?}");
    assert!(common::wait_until(Duration::from_secs(10), || node(&status_of(&c, &rt, "n2"), "n1").standby));
    for n in ["n1", "n2"] {
        // Lease reads lag a little behind the handover.
        assert!(common::wait_until(Duration::from_secs(10), || app(&status_of(&c, &rt, n)).location == "n2"));
        let g = app(&status_of(&c, &rt, n));
        assert_eq!((g.location.as_str(), g.failovers, g.failed_on.len()), ("n2", 0, 0), "{n} sees {g:?}");
    }
    // n1 starts nothing while in standby, and n2's run is not interrupted.
    std::thread::sleep(Duration::from_secs(3));
    assert!(c.writes().iter().all(|(t, n)| *t <= t1 || n == "n2"), "n1 wrote while in standby:\n{}", c.logs());
    let log1 = std::fs::read_to_string(c.path("n1.log")).unwrap();
    assert!(log1.contains("app stopped for this node's standby"), "{log1}");
    assert!(!log1.contains("Failover"), "the standby release must not be a failover:\n{log1}");

    // n1 back online: the group stays on n2 (manual failback).
    set_standby(&c, &rt, "n1", None);
    assert!(common::wait_until(Duration::from_secs(10), || !node(&status_of(&c, &rt, "n2"), "n1").standby));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(app(&status_of(&c, &rt, "n1")).location, "n2");

    // n2 enters standby (park): the group stops and stays stopped everywhere, parked by n2.
    set_standby(&c, &rt, "n2", Some(pb::StandbyMode::Park));
    let parked = |st: &pb::GuestStatus| {
        app(st).not_running.is_some_and(|n| n.reason() == pb::NotRunningReason::Parked && n.node == "n2")
    };
    assert!(
        common::wait_until(Duration::from_secs(30), || parked(&status_of(&c, &rt, "n1"))),
        "{:?}\n{}",
        status_of(&c, &rt, "n1"),
        c.logs()
    );
    let writes_parked = c.writes().len();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.writes().len(), writes_parked, "a parked group ran:\n{}", c.logs());

    // n2's agent restarts while in standby: it comes back in standby and the group stays parked.
    n2.agent.signal(libc::SIGTERM);
    assert!(common::wait_until(Duration::from_secs(30), || n2.agent.try_wait().is_some()), "{}", c.logs());
    let _n2 = c.start("n2");
    assert!(
        common::wait_until(Duration::from_secs(30), || {
            c.client_opt(&rt, "n2").is_some_and(|mut api| {
                rt.block_on(api.get_status(pb::GetStatusRequest {})).is_ok_and(|st| {
                    let st = st.into_inner();
                    node(&st, "n2").standby_mode() == pb::StandbyMode::Park && parked(&st)
                })
            })
        }),
        "n2 did not come back in standby:\n{}",
        c.logs()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.writes().len(), writes_parked, "a parked group ran after the restart:\n{}", c.logs());
    assert!(parked(&status_of(&c, &rt, "n1")));

    // n2 online: it unparks the group, which runs on its best node again, still no failover.
    set_standby(&c, &rt, "n2", None);
    let (t3, on) = c.wait_any_writer(t2, Duration::from_secs(30));
    eprintln!("unparked: token {t3} on {on}");
    std::thread::sleep(Duration::from_secs(1));
    let g = app(&status_of(&c, &rt, "n1"));
    assert_eq!(g.failovers, 0, "{g:?}");
    c.assert_never_two_writers();
}

/// The group's application as a forking daemon: `app-start` records each start in
/// `starts.log` and launches the writer in the background (its pid in `app.pid`),
/// `app-monitor` says whether that pid runs (OCF codes: 0 running, 7 stopped), `app-stop`
/// kills it.
fn forking_writer(c: &Cluster) {
    let d = c.dir.path();
    let log = c.path("shared/writer.log");
    common::script(
        d,
        "app-start",
        &format!(
            "echo \"$TANDEM_NODE $TANDEM_FENCING_TOKEN\" >> {starts}\n\
             sh -c 'while :; do echo \"$TANDEM_FENCING_TOKEN $TANDEM_NODE\" >> {log}; sleep 0.05; done' </dev/null >/dev/null 2>&1 &\n\
             echo $! > {pid}",
            starts = c.path("starts.log").display(),
            log = log.display(),
            pid = c.path("app.pid").display(),
        ),
    );
    common::script(
        d,
        "app-monitor",
        &format!(
            "pid=$(cat {} 2>/dev/null) || exit 7\nkill -0 \"$pid\" 2>/dev/null || exit 7",
            c.path("app.pid").display()
        ),
    );
    common::script(
        d,
        "app-stop",
        &format!(
            "pid=$(cat {p} 2>/dev/null) || exit 0\nkill \"$pid\" 2>/dev/null\n\
             while kill -0 \"$pid\" 2>/dev/null; do sleep 0.05; done\nrm -f {p}",
            p = c.path("app.pid").display()
        ),
    );
    let cfg = std::fs::read_to_string(c.path("tandem.toml")).unwrap();
    let (head, writer) = cfg.split_once("[[group.resource]]\nname = \"writer\"").unwrap();
    assert!(writer.contains("stop_timeout"), "{writer}");
    let cfg = format!(
        "{head}[[group.resource]]\nname = \"writer\"\nkind = \"exec\"\nmode = \"forking\"\n\
         start = [\"{d}/app-start\"]\nstop = [\"{d}/app-stop\"]\nmonitor = [\"{d}/app-monitor\"]\n\
         stop_timeout = \"5s\"\n",
        d = d.display()
    );
    std::fs::write(c.path("tandem.toml"), cfg).unwrap();
}

#[test]
fn a_resource_already_running_when_the_agent_starts_is_adopted_not_started_again() {
    let c = Cluster::new(1, "{ kind = \"lease-watchdog-only\" }");
    forking_writer(&c);
    // The application runs before the agent does (started by hand, or left by an earlier run).
    let st =
        Command::new(c.path("app-start")).env("TANDEM_NODE", "n1").env("TANDEM_FENCING_TOKEN", "0").status().unwrap();
    assert!(st.success());
    let pid: i32 = common::read_pid(&c.path("app.pid"));
    assert!(common::wait_until(Duration::from_secs(5), || !c.writes().is_empty()));

    let _n1 = c.start("n1");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let started = |st: &pb::GuestStatus| {
        st.groups.iter().any(|g| g.name == "app" && g.state == pb::GroupState::Started as i32 && g.location == "n1")
    };
    assert!(
        common::wait_until(Duration::from_secs(30), || c.client_opt(&rt, "n1").is_some_and(|mut api| rt
            .block_on(api.get_status(pb::GetStatusRequest {}))
            .is_ok_and(|s| started(&s.into_inner())))),
        "the group did not come up:\n{}",
        c.logs()
    );
    // Adopted, not started again: the start script ran once (by hand), the same daemon runs.
    std::thread::sleep(Duration::from_secs(2));
    let starts = std::fs::read_to_string(c.path("starts.log")).unwrap();
    assert_eq!(starts.lines().collect::<Vec<_>>(), ["n1 0"], "the application was started again:\n{}", c.logs());
    assert!(common::alive(pid), "the adopted daemon {pid} died");
    assert_eq!(common::read_pid(&c.path("app.pid")), pid);
    let log = std::fs::read_to_string(c.path("n1.log")).unwrap();
    assert!(log.contains("adopted running app/writer under token"), "{log}");
    assert!(!log.contains("starting app/writer"), "{log}");

    // It is the agent's now: an operator stop runs its stop command; a start then really
    // starts it, under the group's token.
    let mut api = c.client(&rt, "n1");
    rt.block_on(api.stop_group(pb::GroupRequest { group: "app".into() })).unwrap();
    assert!(common::wait_until(Duration::from_secs(30), || !common::alive(pid)), "not stopped:\n{}", c.logs());
    rt.block_on(api.start_group(pb::GroupRequest { group: "app".into() })).unwrap();
    let t = c.wait_writer("n1", 0, Duration::from_secs(30));
    let starts = std::fs::read_to_string(c.path("starts.log")).unwrap();
    assert_eq!(starts.lines().collect::<Vec<_>>(), ["n1 0".to_string(), format!("n1 {t}")], "{}", c.logs());
    c.assert_never_two_writers();
    let _ = Command::new(c.path("app-stop")).status();
}

#[test]
fn a_monitor_with_its_own_restart_limit_restarts_in_place_then_fails_the_group_over() {
    let c = Cluster::new(2, "{ kind = \"lease-watchdog-only\" }");
    // The group allows no restart; its `flag` monitor allows two of its own. The writer
    // creates the flag when it starts; the test removes it to fail the monitor.
    let flag = c.path("shared/flag");
    let cfg = std::fs::read_to_string(c.path("tandem.toml")).unwrap();
    let cfg = cfg.replace("restart_limit = 1\n", "restart_limit = 0\n").replacen(
        "start = [\"/bin/sh\", \"-c\", \"while :;",
        &format!("start = [\"/bin/sh\", \"-c\", \"touch {}; while :;", flag.display()),
        1,
    );
    assert!(cfg.contains("restart_limit = 0") && cfg.contains("touch "), "{cfg}");
    let cfg = format!(
        "{cfg}\n[[group.monitor]]\nname = \"flag\"\ntarget = \"exec\"\n\
         command = [\"/bin/sh\", \"-c\", \"test -e {} || exit 2\"]\n\
         interval = \"200ms\"\ntimeout = \"2s\"\nretries = 1\nrestart_limit = 2\nrestart_window = \"10m\"\nresource = \"writer\"\n",
        flag.display()
    );
    std::fs::write(c.path("tandem.toml"), cfg).unwrap();
    let (_n1, _n2, t1) = c.active_and_standby();
    let writer_starts = |node: &str| {
        std::fs::read_to_string(c.path(&format!("{node}.log")))
            .unwrap_or_default()
            .matches("starting app/writer")
            .count()
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let group = |node: &str| {
        let mut api = c.client(&rt, node);
        let st = rt.block_on(api.get_status(pb::GetStatusRequest {})).unwrap().into_inner();
        st.groups.into_iter().find(|g| g.name == "app").unwrap()
    };

    // Two failures of `flag`: restarted in place each time (same node, same token), though
    // the group's own limit is zero.
    for n in 1..=2 {
        assert!(common::wait_until(Duration::from_secs(10), || flag.exists()));
        std::fs::remove_file(&flag).unwrap();
        let removed = Instant::now();
        assert!(
            common::wait_until(Duration::from_secs(30), || writer_starts("n1") == n + 1 && flag.exists()),
            "restart #{n} in place did not happen:\n{}",
            c.logs()
        );
        report::failover(
            "a_monitor_with_its_own_restart_limit_restarts_in_place_then_fails_the_group_over",
            removed.elapsed(),
            &format!("monitor `flag` failure #{n} until the writer was restarted in place on n1"),
        );
        let g = group("n1");
        assert_eq!((g.location.as_str(), g.restarts), ("n1", n as u32), "{g:?}");
        let m = g.monitors.iter().find(|m| m.name == "flag").unwrap();
        assert_eq!(m.restarts, n as u32, "{m:?}");
        assert!(c.writes().iter().all(|(t, node)| *t == t1 && node == "n1"), "{}", c.logs());
    }

    // The third: past the monitor's limit, the group fails over to n2 under a new token.
    std::thread::sleep(Duration::from_millis(500));
    std::fs::remove_file(&flag).unwrap();
    let removed = Instant::now();
    let t2 = c.wait_writer("n2", t1, Duration::from_secs(30));
    report::failover(
        "a_monitor_with_its_own_restart_limit_restarts_in_place_then_fails_the_group_over",
        removed.elapsed(),
        &format!("monitor `flag` failure #3, past its restart_limit, until n2 writes (token {t1} -> {t2})"),
    );
    std::thread::sleep(Duration::from_millis(500));
    c.assert_never_two_writers();
    assert_eq!(writer_starts("n1"), 3);
    let g = group("n2");
    assert_eq!((g.location.as_str(), g.failovers), ("n2", 1), "{g:?}");
}
