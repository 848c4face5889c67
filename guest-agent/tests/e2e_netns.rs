//! End-to-end tests of a guest cluster whose nodes live in network namespaces: real
//! `tandem-guest` processes, heartbeats on two networks, partitions made with iptables
//! inside a node's namespace, and a real PostgreSQL behind a floating IP.
//!
//! Topology (names unique per test, everything removed on drop even when a test fails):
//!
//! ```text
//!            ns sw: bridge br0 ("lan", 10.77.1.0/24)
//!          /            |              \
//!   ns n1: eth0 .1   ns n2: eth0 .2    ns cl: eth0 .100 (a client)
//!   ns n1: hb0 10.77.2.1  <— veth ("hb") —>  ns n2: hb0 10.77.2.2
//! ```
//!
//! Each node's agent runs in its own network namespace *and* in a cgroup of its own (agent,
//! guard, application), so the test can kill a whole node. The lease area is a shared file
//! and the group's data a shared directory: storage stays reachable while the network is cut.
//!
//! The agents are started with `nsenter --net`, not `ip netns exec`: the latter also
//! remounts /sys for the namespace, which hides the cgroup2 mount the agent needs to
//! contain what it starts (a VM has its own /sys with its own cgroup mount; here the host's
//! is the only one). The network namespace is exactly the same either way.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::NetnsPair;
use tandem_lease::{AreaParams, FileDisk, Lockspace, Timeouts};
use tandem_proto::v1 as pb;
use tandem_proto::v1::guest_agent_client::GuestAgentClient;
use tandem_testkit::netns::{self, ip, iptables};
use tandem_testkit::{ChildGuard, report, require_program, run_ok};

const RENEWAL_MS: u64 = 300;
const API_PORT: u16 = 7701;
/// The floating IP of the PostgreSQL test, on the bridge network.
const VIP: &str = "10.77.1.50";

/// The namespaces of one test. Deleting a namespace removes its interfaces; the node
/// processes are killed by [`Lab`] before this is dropped.
struct Net {
    sw: String,
    n1: String,
    n2: String,
    cl: String,
}

impl Net {
    fn new() -> Net {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let net = Net {
            sw: format!("tdn{id}-sw"),
            n1: format!("tdn{id}-n1"),
            n2: format!("tdn{id}-n2"),
            cl: format!("tdn{id}-cl"),
        };
        require_program("iptables", "iptables", &[]);
        require_program("nsenter", "util-linux", &[]);
        for ns in [&net.sw, &net.n1, &net.n2, &net.cl] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &net.sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &net.sw, "link", "set", "br0", "up"]);
        for (host, ns) in [(1, &net.n1), (2, &net.n2), (100, &net.cl)] {
            let port = format!("p{host}");
            ip(&["-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &net.sw]);
            ip(&["-n", &net.sw, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &net.sw, "link", "set", &port, "up"]);
            ip(&["-n", ns, "addr", "add", &format!("10.77.1.{host}/24"), "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        // The second heartbeat network: a direct cable between the two nodes.
        ip(&["-n", &net.n1, "link", "add", "hb0", "type", "veth", "peer", "name", "hb0", "netns", &net.n2]);
        for (host, ns) in [(1, &net.n1), (2, &net.n2)] {
            ip(&["-n", ns, "addr", "add", &format!("10.77.2.{host}/24"), "dev", "hb0"]);
            ip(&["-n", ns, "link", "set", "hb0", "up"]);
        }
        net
    }

    fn of(&self, node: &str) -> &str {
        match node {
            "n1" => &self.n1,
            "n2" => &self.n2,
            other => panic!("no node {other}"),
        }
    }

    /// Drops every packet in and out of `ifaces` inside `node`'s namespace.
    fn cut(&self, node: &str, ifaces: &[&str]) {
        for dev in ifaces {
            iptables(self.of(node), &["-A", "INPUT", "-i", dev, "-j", "DROP"]);
            iptables(self.of(node), &["-A", "OUTPUT", "-o", dev, "-j", "DROP"]);
        }
    }

    /// Drops the heartbeats (UDP to the two heartbeat ports) in and out of `node`'s
    /// namespace on every network, and nothing else: clients still reach it.
    fn cut_heartbeats(&self, node: &str) {
        for port in ["5405", "5406"] {
            iptables(self.of(node), &["-A", "INPUT", "-p", "udp", "--dport", port, "-j", "DROP"]);
            iptables(self.of(node), &["-A", "OUTPUT", "-p", "udp", "--dport", port, "-j", "DROP"]);
        }
    }

    /// Removes every rule [`Net::cut`] or [`Net::cut_heartbeats`] added in `node`'s namespace.
    fn heal(&self, node: &str) {
        iptables(self.of(node), &["-F", "INPUT"]);
        iptables(self.of(node), &["-F", "OUTPUT"]);
    }

    /// The `ip -o addr` listing of `node`'s bridge interface.
    fn addrs(&self, node: &str) -> String {
        ip(&["-n", self.of(node), "-o", "addr", "show", "dev", "eth0"])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.sw, &self.n1, &self.n2, &self.cl] {
            netns::delete(ns);
        }
    }
}

/// A two-node cluster in namespaces: configuration, lease area, node cgroups.
struct Lab {
    // Field order matters on drop: `Lab::drop` kills the nodes, then the namespaces go,
    // then the directory.
    net: Net,
    dir: tempfile::TempDir,
    cg_root: PathBuf,
}

/// How the lab's nodes are fenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fence {
    /// `lease-watchdog-only`: the lease is the fence (groups do not require outside fencing).
    LeaseOnly,
    /// A fence command that powers the node off: it kills every process in the node's
    /// network namespace, waits until they are gone, takes its interfaces down and logs
    /// `<node> <start ns> <end ns>` (wall clock) to `fenced.log`.
    KillNamespace,
}

/// The fence command of [`Fence::KillNamespace`]; `$1` is the namespace, `$2` the node name
/// (appended by the agent). It waits until the killed processes are reaped, not only dead: a
/// killed postmaster's zombie keeps its pid "running" (all nodes share this machine's pid
/// space), and PostgreSQL on the peer refuses to start over its lock file. So it kills
/// everything but the node's init (`tini`, the process whose parent is outside the
/// namespace) first, then resumes the init, which reaps them all and exits: orphans never go
/// to this machine's PID 1, which reaps only every few seconds here.
const FENCE_SCRIPT: &str = "ns=\"$1\"; node=\"$2\"\n\
    start=$(date +%s%N)\n\
    all=$(echo $(ip netns pids \"$ns\"))\n\
    init=\"\"\n\
    for p in $all; do\n\
      pp=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$p/status 2>/dev/null)\n\
      case \" $all \" in *\" $pp \"*) ;; *) init=\"$init $p\";; esac\n\
    done\n\
    seen=\"\"; rest=\"\"\n\
    for i in $(seq 1 100); do\n\
      rest=\"\"\n\
      for p in $(ip netns pids \"$ns\"); do case \" $init \" in *\" $p \"*) ;; *) rest=\"$rest $p\";; esac; done\n\
      [ -z \"$rest\" ] && break\n\
      seen=\"$seen $rest\"\n\
      kill -9 $rest 2>/dev/null\n\
      sleep 0.05\n\
    done\n\
    [ -z \"$rest\" ] || { echo \"processes survive in $ns:$rest\" >&2; exit 1; }\n\
    # The init (stalled too) reaps what was killed, then exits with its main child.\n\
    [ -n \"$init\" ] && kill -CONT $init 2>/dev/null\n\
    for i in $(seq 1 40); do [ -z \"$(ip netns pids \"$ns\")\" ] && break; sleep 0.05; done\n\
    left=$(ip netns pids \"$ns\"); [ -n \"$left\" ] && kill -9 $left 2>/dev/null\n\
    for i in $(seq 1 100); do\n\
      left=\"\"; for p in $seen; do [ -e /proc/$p ] && left=\"$left $p\"; done\n\
      [ -z \"$left\" ] && [ -z \"$(ip netns pids \"$ns\")\" ] && break\n\
      sleep 0.05\n\
    done\n\
    [ -z \"$left\" ] || { echo \"not reaped:$left\" >&2; exit 1; }\n\
    # Powered off: the node no longer answers on the network either (its floating IP).\n\
    ip -n \"$ns\" link set eth0 down && ip -n \"$ns\" link set hb0 down || exit 1\n\
    echo \"$node $start $(date +%s%N)\" >> \"$(dirname \"$0\")/fenced.log\"";

impl Lab {
    /// `groups` is the TOML of the `[[group]]`s; `{dir}` in it is replaced by the test's
    /// directory. Both nodes are `lease-watchdog-only`: the lease is the fence.
    fn new(groups: &str) -> Lab {
        Lab::with_fence(groups, Fence::LeaseOnly)
    }

    /// Like [`Lab::new`], with the nodes fenced as `fence` says.
    fn with_fence(groups: &str, fence: Fence) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let cg_root = tandem_lease::cgroup::cgroup2_mount()
            .expect("a cgroup2 mount (the e2e tests put each node in a cgroup)")
            .join(format!("tandem-e2e-netns-{}", std::process::id()))
            .join(dir.path().file_name().unwrap());
        std::fs::create_dir_all(&cg_root).unwrap();
        let lab = Lab { net: Net::new(), dir, cg_root };
        let d = lab.dir.path();
        std::fs::create_dir(d.join("shared")).unwrap();
        std::fs::write(d.join("key"), "0123456789abcdef0123456789abcdef\n").unwrap();
        let lease = d.join("lease");
        std::fs::File::create(&lease).unwrap().set_len(1 << 20).unwrap();
        Lockspace::init(
            &FileDisk::open(&lease).unwrap(),
            &AreaParams {
                host_slots: 8,
                resource_slots: 16,
                timeouts: Timeouts::from_renewal_ms(RENEWAL_MS),
                ..AreaParams::new("e2e")
            },
            false,
        )
        .unwrap();
        let mut toml = format!(
            "[cluster]\nname = \"e2e\"\nkey_file = \"{key}\"\n\n\
             [[link]]\nname = \"lan\"\nport = 5405\ninterval = \"100ms\"\ntimeout = \"1s\"\n\n\
             [[link]]\nname = \"hb\"\nport = 5406\ninterval = \"100ms\"\ntimeout = \"1s\"\n\n\
             [lease]\ndevice = \"{lease}\"\nrenewal_interval = \"{RENEWAL_MS}ms\"\n\n\
             # A private test network: no TLS.\n[api]\ninsecure = true\n\n",
            key = d.join("key").display(),
            lease = lease.display(),
        );
        if fence == Fence::KillNamespace {
            script(d, "fence-node", FENCE_SCRIPT);
        }
        for i in 1..=2 {
            let fence = match fence {
                Fence::LeaseOnly => "{ kind = \"lease-watchdog-only\" }".to_string(),
                Fence::KillNamespace => format!(
                    "{{ kind = \"command\", command = [\"{}\", \"{}\"], timeout = \"20s\" }}",
                    d.join("fence-node").display(),
                    lab.net.of(&format!("n{i}"))
                ),
            };
            toml += &format!(
                "[[node]]\nname = \"n{i}\"\nid = {i}\nlinks = {{ lan = \"10.77.1.{i}\", hb = \"10.77.2.{i}\" }}\n\
                 api = \"10.77.1.{i}:{API_PORT}\"\nfence = {fence}\n\n"
            );
        }
        toml += &groups.replace("{dir}", &d.display().to_string());
        std::fs::write(d.join("tandem.toml"), toml).unwrap();
        lab
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts `node`'s agent inside its namespace and its cgroup.
    fn start(&self, node: &str) -> ChildGuard {
        let cgroup = self.cg_root.join(node);
        std::fs::create_dir_all(&cgroup).unwrap();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.path(&format!("{node}.log"))).unwrap();
        // Under `tini -s` (see netns::node_command): the postmaster `pg_ctl` leaves behind
        // must be reaped at once, or PostgreSQL refuses to start over its pid file
        // (docs/guest-agent.md, "End-to-end tests in network namespaces").
        let mut cmd = netns::node_command(self.net.of(node), env!("CARGO_BIN_EXE_tandem-guest"));
        cmd.arg("--config")
            .arg(self.path("tandem.toml"))
            .arg("--cgroup-root")
            .arg(cgroup.join("groups"))
            .env("TANDEM_NODE", node)
            .env("TANDEM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        tandem_testkit::in_cgroup(&mut cmd, &cgroup);
        ChildGuard::spawn(&format!("tandem-guest {node}"), cmd)
    }

    fn logs(&self) -> String {
        ["n1", "n2"]
            .iter()
            .map(|n| {
                format!("--- {n}\n{}", std::fs::read_to_string(self.path(&format!("{n}.log"))).unwrap_or_default())
            })
            .collect()
    }

    fn log_of(&self, node: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{node}.log"))).unwrap_or_default()
    }

    /// `node`'s status, asked over its API from inside its namespace.
    fn status(&self, node: &str) -> pb::GuestStatus {
        self.try_status(node).unwrap_or_else(|e| panic!("{e}; logs:\n{}", self.logs()))
    }

    /// Like [`Lab::status`], for an agent that may not listen yet.
    fn try_status(&self, node: &str) -> Result<pb::GuestStatus, String> {
        let url = format!("http://10.77.1.{}:{API_PORT}", &node[1..]);
        NetnsPair::run_in(self.net.of(node), move || {
            Box::pin(async move {
                let mut c =
                    GuestAgentClient::connect(url.clone()).await.map_err(|e| format!("cannot reach {url}: {e}"))?;
                Ok(c.get_status(pb::GetStatusRequest {})
                    .await
                    .map_err(|e| format!("status of {url}: {e}"))?
                    .into_inner())
            })
        })
    }

    /// Asks `node` to move `group` to `to`.
    fn move_group(&self, node: &str, group: &str, to: &str) {
        let url = format!("http://10.77.1.{}:{API_PORT}", &node[1..]);
        let (group, to) = (group.to_string(), to.to_string());
        NetnsPair::run_in(self.net.of(node), move || {
            Box::pin(async move {
                let mut c = GuestAgentClient::connect(url).await.unwrap();
                c.move_group(pb::MoveGroupRequest { group, to }).await.unwrap();
            })
        })
    }

    /// Polls `f` every 100 ms until it returns `Some`, or panics after `limit` with `what`
    /// and the agents' logs.
    fn wait<T>(&self, what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(start.elapsed() < limit, "{what}: not within {limit:?}; logs:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until both nodes see each other up on both links and agree that `group` runs
    /// on one node; returns that node.
    fn converged(&self, group: &str, limit: Duration) -> String {
        self.wait(&format!("both nodes agree where {group} runs"), limit, || {
            let (Ok(s1), Ok(s2)) = (self.try_status("n1"), self.try_status("n2")) else { return None };
            let all_up = [&s1, &s2].iter().all(|s| {
                s.quorum
                    && s.nodes.iter().filter(|n| !n.local).all(|n| {
                        n.state == pb::NodeState::Up as i32
                            && n.links.len() == 2
                            && n.links.iter().all(|l| l.state == pb::LinkState::Up as i32)
                    })
            });
            let loc = |s: &pb::GuestStatus| {
                s.groups
                    .iter()
                    .find(|g| g.name == group && g.state == pb::GroupState::Started as i32)
                    .map(|g| g.location.clone())
            };
            match (loc(&s1), loc(&s2)) {
                (Some(a), Some(b)) if all_up && a == b && !a.is_empty() => Some(a),
                _ => None,
            }
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        common::remove_node_cgroups(&self.cg_root, &["n1", "n2"]);
    }
}

// ------------------------------------------------------------------ partitions

/// A writer that appends `<token> <node>` to a file in the group's shared directory. No
/// `stop`: the agent stops it with SIGTERM to its process group.
const WRITER_GROUP: &str = "[[group]]\nname = \"app\"\nnodes = [\"n1\", \"n2\"]\n\n\
    [[group.resource]]\nname = \"data\"\nkind = \"disk\"\ndirectory = \"{dir}/shared\"\n\n\
    [[group.resource]]\nname = \"writer\"\nkind = \"exec\"\nmode = \"simple\"\n\
    start = [\"/bin/sh\", \"-c\", \"while :; do echo \\\"$TANDEM_FENCING_TOKEN $TANDEM_NODE\\\" >> {dir}/shared/writer.log; sleep 0.02; done\"]\n\
    stop_timeout = \"5s\"\n";

impl Lab {
    /// The writer log: (token, node) per line.
    fn writes(&self) -> Vec<(u64, String)> {
        common::read_writes(&self.path("shared/writer.log"))
    }

    /// Waits until `node` writes with a token above `above`; returns that token.
    fn wait_writer(&self, node: &str, above: u64, limit: Duration) -> u64 {
        self.wait(&format!("{node} writes with a token above {above}"), limit, || {
            self.writes().iter().rev().find(|(t, n)| n == node && *t > above).map(|(t, _)| *t)
        })
    }

    /// The safety invariant: tokens never go backwards, and each token belongs to one node.
    fn assert_never_two_writers(&self) {
        if let Some(broken) = common::two_writers(&self.writes()) {
            panic!("{broken}; logs:\n{}", self.logs());
        }
    }

    /// Number of lines `node` wrote with `token` so far.
    fn lines_of(&self, node: &str, token: u64) -> usize {
        self.writes().iter().filter(|(t, n)| *t == token && n == node).count()
    }
}

/// Status of `peer` as `node` hears it: (node up, [(link, up)]).
fn peer_view(s: &pb::GuestStatus, peer: &str) -> (bool, Vec<(String, bool)>) {
    let n = s.nodes.iter().find(|n| n.name == peer).unwrap_or_else(|| panic!("{peer} missing from {s:?}"));
    (
        n.state == pb::NodeState::Up as i32,
        n.links.iter().map(|l| (l.name.clone(), l.state == pb::LinkState::Up as i32)).collect(),
    )
}

#[test]
fn one_link_cut_changes_nothing_and_a_full_partition_of_the_active_node_keeps_one_writer() {
    let lab = Lab::new(WRITER_GROUP);
    let _n1 = lab.start("n1");
    let t1 = lab.wait_writer("n1", 0, Duration::from_secs(30));
    let _n2 = lab.start("n2");
    assert_eq!(lab.converged("app", Duration::from_secs(20)), "n1");

    // One network down (the direct heartbeat cable): the other still carries heartbeats.
    let logged: Vec<usize> = ["n1", "n2"].iter().map(|n| lab.log_of(n).len()).collect();
    lab.net.cut("n1", &["hb0"]);
    let s2 = lab.wait("n2 sees n1's hb link down", Duration::from_secs(10), || {
        let s = lab.status("n2");
        let (up, links) = peer_view(&s, "n1");
        (up && links.iter().any(|(l, u)| l == "hb" && !u) && links.iter().any(|(l, u)| l == "lan" && *u)).then_some(s)
    });
    assert!(s2.quorum);
    // Well past the link timeout and the host-dead time: nothing moved, nothing restarted.
    let before = lab.lines_of("n1", t1);
    std::thread::sleep(Duration::from_secs(3));
    assert!(lab.lines_of("n1", t1) > before + 30, "the writer must keep running on n1:\n{}", lab.logs());
    assert!(lab.writes().iter().all(|(t, n)| *t == t1 && n == "n1"), "one link down moved the group:\n{}", lab.logs());
    for (n, from) in ["n1", "n2"].iter().zip(logged) {
        let log = lab.log_of(n);
        let since = &log[from..];
        assert!(!since.contains(" lost") && !since.contains("stopping app/"), "one link down disturbed {n}:\n{since}");
    }

    // Both networks down: n1 is alone with the tie-break lease it took first, n2 is alone
    // without it. n1 keeps its group (same token); n2 loses quorum and starts nothing, since
    // n1's host lease on the shared disk stays alive.
    let cut = Instant::now();
    lab.net.cut("n1", &["eth0"]);
    lab.wait("n2 loses n1 and quorum", Duration::from_secs(15), || {
        let s = lab.status("n2");
        (!peer_view(&s, "n1").0 && !s.quorum).then_some(())
    });
    eprintln!("full partition: n2 lost quorum after {:?}", cut.elapsed());
    // Each side times the other out on its own clock: n1 may notice a moment later.
    lab.wait("n1 alone with quorum", Duration::from_secs(10), || {
        let s = lab.status("n1");
        (s.quorum && !peer_view(&s, "n2").0).then_some(())
    });
    let before = lab.lines_of("n1", t1);
    // Past the link timeout and the host-dead time (1.95 s) twice over.
    std::thread::sleep(Duration::from_secs(5));
    assert!(lab.lines_of("n1", t1) > before + 50, "the writer must keep running on n1:\n{}", lab.logs());
    assert!(lab.writes().iter().all(|(t, n)| *t == t1 && n == "n1"), "the partition moved the group:\n{}", lab.logs());

    // Healed: the nodes see each other again, agree the group is on n1, and it never moved.
    let healed = Instant::now();
    lab.net.heal("n1");
    assert_eq!(lab.converged("app", Duration::from_secs(20)), "n1");
    eprintln!("partition healed: converged after {:?}", healed.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    lab.assert_never_two_writers();
    assert!(lab.writes().iter().all(|(t, n)| *t == t1 && n == "n1"), "the group moved:\n{}", lab.logs());
}

#[test]
fn full_partition_of_the_active_node_without_the_tie_break_moves_the_group_once() {
    let lab = Lab::new(WRITER_GROUP);
    let _n1 = lab.start("n1");
    let t1 = lab.wait_writer("n1", 0, Duration::from_secs(30));
    let _n2 = lab.start("n2");
    assert_eq!(lab.converged("app", Duration::from_secs(20)), "n1");
    // n1 holds the tie-break lease (it came first); put the group on n2.
    lab.move_group("n1", "app", "n2");
    let t2 = lab.wait_writer("n2", t1, Duration::from_secs(30));
    assert_eq!(lab.converged("app", Duration::from_secs(20)), "n2");

    // n2 is cut off from every heartbeat network: it is the minority (no tie-break), stops
    // the group and releases its lease; n1 keeps quorum and takes the group over.
    let cut = Instant::now();
    lab.net.cut("n2", &["eth0", "hb0"]);
    let t3 = lab.wait_writer("n1", t2, Duration::from_secs(30));
    report::failover(
        "full_partition_of_the_active_node_without_the_tie_break_moves_the_group_once",
        cut.elapsed(),
        &format!("both links of the active n2 cut until n1 writes (token {t2} -> {t3})"),
    );
    let s2 = lab.status("n2");
    assert!(!s2.quorum, "n2 must be without quorum: {s2:?}");
    // The cut-off node writes nothing more, however long the partition lasts.
    std::thread::sleep(Duration::from_secs(3));
    let last_n2 = lab.writes().iter().rposition(|(_, n)| n == "n2").unwrap();
    let first_t3 = lab.writes().iter().position(|(t, _)| *t == t3).unwrap();
    assert!(last_n2 < first_t3, "n2 wrote after n1 took over:\n{}", lab.logs());

    let healed = Instant::now();
    lab.net.heal("n2");
    // failback = manual: the group stays where it is.
    assert_eq!(lab.converged("app", Duration::from_secs(20)), "n1");
    eprintln!("partition healed: converged after {:?}", healed.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    lab.assert_never_two_writers();
    let w = lab.writes();
    assert!(w.iter().skip(first_t3).all(|(t, n)| *t == t3 && n == "n1"), "the group moved again:\n{}", lab.logs());
}

// ------------------------------------------------------------------ PostgreSQL

/// PostgreSQL as the application: its data directory on the shared storage, a floating IP on
/// the bridge, the server started by `pg_ctl` as the `postgres` user, and a write-level SQL
/// monitor through the floating IP.
///
/// How rows get the fencing token: a client cannot know the token, so the server stamps
/// every row. The start script writes the token (and the node) into a one-row table `epoch`
/// in *single-user mode*, before the postmaster is started: no client can connect to a
/// server of the new epoch before the epoch is recorded, so a row can never carry an older
/// epoch's token than the server that accepted it. Each row's `token` column defaults to
/// `epoch.token`, read in the inserting transaction. Rows are ordered by a sequence, so
/// "no row carries a stale token after a newer one" is: tokens never decrease in id order.
const PG_GROUP: &str = "[[group]]\nname = \"pg\"\nnodes = [\"n1\", \"n2\"]\nrestart_limit = 1\nrestart_window = \"10m\"\n\n\
    [[group.resource]]\nname = \"data\"\nkind = \"disk\"\ndirectory = \"{dir}/shared\"\n\n\
    [[group.resource]]\nname = \"vip\"\nkind = \"ip\"\naddress = \"10.77.1.50/24\"\ninterface = \"eth0\"\ndepends_on = [\"data\"]\n\n\
    [[group.resource]]\nname = \"postgres\"\nkind = \"exec\"\nmode = \"forking\"\nuser = \"postgres\"\ndepends_on = [\"data\", \"vip\"]\n\
    start = [\"{dir}/pg-start\"]\nstop = [\"{dir}/pg-stop\"]\nstart_timeout = \"60s\"\nstop_timeout = \"30s\"\n\n\
    [[group.monitor]]\nname = \"sql\"\ntarget = \"postgresql://tandem@10.77.1.50:5432/postgres\"\noptions = { level = \"write\" }\n\
    interval = \"1s\"\ntimeout = \"2s\"\nretries = 1\npassword_file = \"{dir}/pgpass\"\nresource = \"postgres\"\n";

const PG_BIN: &str = tandem_testkit::postgres::PG_BIN;

/// Creates the cluster's database in the shared directory: initdb, settings, schema.
fn setup_postgres(lab: &Lab) -> String {
    use std::os::unix::fs::PermissionsExt;
    let pg = nix::unistd::User::from_name("postgres")
        .expect("look up the postgres user")
        .unwrap_or_else(|| panic!("no `postgres` system user: install the Debian package postgresql"));
    let (uid, gid) = (pg.uid.as_raw(), pg.gid.as_raw());
    let as_pg = |cmd: &mut Command| {
        cmd.uid(uid).gid(gid).current_dir("/").env("LC_ALL", "C.UTF-8");
    };
    let d = lab.dir.path();
    // The postgres user must reach the data directory through the test's directories.
    for p in [d, &d.join("shared")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let password = format!("pw-{}-{}", std::process::id(), d.file_name().unwrap().to_string_lossy());
    std::fs::write(d.join("pgpass"), format!("{password}\n")).unwrap();
    let pwfile = d.join("pgpass-initdb");
    std::fs::write(&pwfile, format!("{password}\n")).unwrap();
    std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).unwrap();
    let data = d.join("shared/pgdata");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut initdb = Command::new(require_program("initdb", "postgresql", &[PG_BIN]));
    as_pg(&mut initdb);
    initdb.arg("-D").arg(&data).args(["-U", "tandem", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"]);
    initdb.arg(format!("--pwfile={}", pwfile.display()));
    run_ok("initdb", &mut initdb);
    // fsync = off is safe here: the failures are process deaths, not machine crashes, and
    // synchronous_commit = on writes the WAL to the kernel before a commit is acknowledged.
    append(
        &data.join("postgresql.conf"),
        "\n# tandem e2e\nlisten_addresses = '10.77.1.50'\nport = 5432\nunix_socket_directories = ''\n\
         fsync = off\nsynchronous_commit = on\nfull_page_writes = off\nshared_buffers = 16MB\nmax_connections = 20\n",
    );
    append(&data.join("pg_hba.conf"), "host all all 10.77.1.0/24 scram-sha-256\n");
    let schema = "CREATE TABLE epoch (token bigint NOT NULL, node text NOT NULL);\n\
        INSERT INTO epoch VALUES (0, 'none');\n\
        CREATE FUNCTION epoch_token() RETURNS bigint LANGUAGE sql STABLE AS 'SELECT token FROM epoch';\n\
        CREATE FUNCTION epoch_node() RETURNS text LANGUAGE sql STABLE AS 'SELECT node FROM epoch';\n\
        CREATE TABLE w (id bigserial PRIMARY KEY, token bigint NOT NULL DEFAULT epoch_token(), node text NOT NULL DEFAULT epoch_node(), \
        at timestamptz NOT NULL DEFAULT clock_timestamp());\n";
    let mut single = Command::new(format!("{PG_BIN}/postgres"));
    as_pg(&mut single);
    single
        .arg("--single")
        .arg("-D")
        .arg(&data)
        .arg("postgres")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = single.spawn().expect("postgres --single");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), schema.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("ERROR"),
        "schema: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let log = d.join("pg.log");
    script(
        d,
        "pg-start",
        &format!(
            "set -e\n\
             # Every start, for the tests' count of starts: node, token, wall clock (ns).\n\
             echo \"$TANDEM_NODE $TANDEM_FENCING_TOKEN $(date +%s%N)\" >> {starts}\n\
             # Record the epoch before any client can connect (single-user mode also runs crash recovery).\n\
             if ! out=$(echo \"UPDATE epoch SET token = $TANDEM_FENCING_TOKEN, node = '$TANDEM_NODE';\" | {PG_BIN}/postgres --single -D {data} postgres 2>&1); then echo \"$out\" >&2; exit 1; fi\n\
             case \"$out\" in *ERROR*|*FATAL*) echo \"$out\" >&2; exit 1;; esac\n\
             exec {PG_BIN}/pg_ctl -w -t 30 -D {data} -l {log} start",
            data = data.display(),
            log = log.display(),
            starts = d.join("starts.log").display(),
        ),
    );
    script(d, "pg-stop", &format!("exec {PG_BIN}/pg_ctl -w -t 20 -D {} -m fast stop", data.display()));
    // The logs are written by the postgres user.
    for f in [log, d.join("starts.log")] {
        std::fs::write(&f, "").unwrap();
        std::os::unix::fs::chown(&f, Some(uid), Some(gid)).unwrap();
    }
    password
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn script(dir: &Path, name: &str, body: &str) {
    common::script(dir, name, body);
}

/// One acknowledged insert: what the server stamped on it, and when the client saw it.
#[derive(Debug, Clone)]
struct Row {
    id: i64,
    token: i64,
    node: String,
    /// The postmaster's start time: which server run accepted the row.
    server: String,
    /// When the client saw the acknowledgement.
    at: Instant,
    /// When the server inserted the row (`clock_timestamp()`), in µs since the Unix epoch:
    /// the same clock as the fence log's and the test's wall-clock readings.
    inserted_us: i64,
}

/// A client in the `cl` namespace that inserts a row every 20 ms through the floating IP,
/// reconnecting whenever the server goes away, and records every acknowledged insert.
struct SqlWriter {
    rows: std::sync::Arc<std::sync::Mutex<Vec<Row>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn pg_config(password: &str) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.user("tandem").password(password).dbname("postgres");
    c
}

/// Connects from the current thread's namespace to the floating IP (the socket is opened
/// here, not on a resolver thread that would live in another namespace).
async fn pg_connect(password: &str) -> Result<tokio_postgres::Client, String> {
    let fut = async {
        let tcp = tokio::net::TcpStream::connect((VIP, 5432)).await.map_err(|e| e.to_string())?;
        let (client, conn) =
            pg_config(password).connect_raw(tcp, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok::<_, String>(client)
    };
    tokio::time::timeout(Duration::from_secs(2), fut).await.map_err(|_| "connect timed out".to_string())?
}

impl SqlWriter {
    fn start(ns: &str, password: &str) -> SqlWriter {
        let rows = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ns, pw, r, s) = (ns.to_string(), password.to_string(), rows.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            NetnsPair::run_in(&ns, move || {
                Box::pin(async move {
                    let mut client = None;
                    while !s.load(Ordering::Relaxed) {
                        if client.is_none() {
                            client = pg_connect(&pw).await.ok();
                        }
                        if let Some(c) = &client {
                            let insert = c.query_one(
                                "INSERT INTO w DEFAULT VALUES RETURNING id, token, node, pg_postmaster_start_time()::text, \
                                 (extract(epoch FROM at) * 1000000)::bigint",
                                &[],
                            );
                            match tokio::time::timeout(Duration::from_secs(2), insert).await {
                                Ok(Ok(row)) => r.lock().unwrap().push(Row {
                                    id: row.get(0),
                                    token: row.get(1),
                                    node: row.get(2),
                                    server: row.get(3),
                                    at: Instant::now(),
                                    inserted_us: row.get(4),
                                }),
                                _ => client = None,
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            })
        });
        SqlWriter { rows, stop, thread: Some(thread) }
    }

    fn rows(&self) -> Vec<Row> {
        self.rows.lock().unwrap().clone()
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the SQL writer panicked");
        }
    }
}

impl Drop for SqlWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The postmaster's pid, from the first line of `postmaster.pid`.
fn postmaster_pid(lab: &Lab) -> i32 {
    let text = std::fs::read_to_string(lab.path("shared/pgdata/postmaster.pid")).unwrap_or_default();
    text.lines().next().and_then(|l| l.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn postgresql_behind_a_floating_ip_restarts_in_place_then_fails_over_with_its_data() {
    let lab = Lab::new(PG_GROUP);
    let password = setup_postgres(&lab);
    let _n1 = lab.start("n1");
    let mut writer = SqlWriter::start(&lab.net.cl, &password);
    let first =
        lab.wait("rows inserted through the floating IP", Duration::from_secs(60), || writer.rows().first().cloned());
    assert_eq!(first.node, "n1");
    let t1 = first.token;
    assert!(t1 > 0, "the epoch was not stamped: {first:?}");
    let _n2 = lab.start("n2");
    assert_eq!(lab.converged("pg", Duration::from_secs(30)), "n1");
    assert!(lab.net.addrs("n1").contains(VIP) && !lab.net.addrs("n2").contains(VIP));

    // 1. SIGKILL of the postmaster: the monitor sees it, the agent restarts it here (same token).
    let pid1 = postmaster_pid(&lab);
    assert!(pid1 > 0);
    // A backend may still commit for a moment after its postmaster died: "resumed" means a
    // row accepted by a new server run.
    let killed = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid1), nix::sys::signal::Signal::SIGKILL).unwrap();
    let after = lab.wait("inserts resume after the first kill", Duration::from_secs(60), || {
        writer.rows().into_iter().find(|r| r.server != first.server)
    });
    report::failover(
        "postgresql_behind_a_floating_ip_restarts_in_place_then_fails_over_with_its_data",
        after.at - killed,
        "postmaster SIGKILL #1 until inserts resumed, restarted in place on n1",
    );
    assert_eq!(
        (after.token, after.node.as_str()),
        (t1, "n1"),
        "a restart in place keeps node and token; logs:\n{}",
        lab.logs()
    );
    let pid2 = postmaster_pid(&lab);
    assert!(pid2 > 0 && pid2 != pid1, "the postmaster was not restarted");
    assert!(lab.net.addrs("n1").contains(VIP) && !lab.net.addrs("n2").contains(VIP));
    let g = lab.status("n1").groups.into_iter().find(|g| g.name == "pg").unwrap();
    assert_eq!((g.location.as_str(), g.restarts), ("n1", 1), "{g:?}");

    // 2. Killed again: past restart_limit = 1, the group moves to n2 under a new token.
    let killed = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid2), nix::sys::signal::Signal::SIGKILL).unwrap();
    let moved = lab.wait("inserts resume on n2", Duration::from_secs(60), || {
        writer.rows().into_iter().find(|r| r.server != first.server && r.server != after.server)
    });
    report::failover(
        "postgresql_behind_a_floating_ip_restarts_in_place_then_fails_over_with_its_data",
        moved.at - killed,
        "postmaster SIGKILL #2 past restart_limit until the first insert on the peer",
    );
    assert_eq!(moved.node, "n2", "{moved:?}\n{}", lab.logs());
    assert!(moved.token > t1, "a new holder must have a newer token: {moved:?}");
    assert!(lab.net.addrs("n2").contains(VIP) && !lab.net.addrs("n1").contains(VIP));
    assert_eq!(lab.converged("pg", Duration::from_secs(30)), "n2");
    std::thread::sleep(Duration::from_millis(500));
    writer.finish();

    let owner = check_table(&lab, &password, &writer.rows());
    assert_eq!(owner.len(), 2, "one epoch per holder: {owner:?}");
}

// ------------------------------------------------------------------ PostgreSQL under faults

/// Every acknowledged insert is in the table; in insertion (id) order tokens never go
/// backwards (a row with a stale token after a newer one means two servers accepted writes);
/// each token belongs to one node. Returns the node of each token.
fn check_table(lab: &Lab, password: &str, acked: &[Row]) -> std::collections::BTreeMap<i64, String> {
    let pw = password.to_string();
    let table: Vec<(i64, i64, String)> = NetnsPair::run_in(&lab.net.cl, move || {
        Box::pin(async move {
            let c = pg_connect(&pw).await.expect("connect to check the table");
            c.query("SELECT id, token, node FROM w ORDER BY id", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect()
        })
    });
    let ids: std::collections::BTreeSet<i64> = table.iter().map(|r| r.0).collect();
    let lost: Vec<i64> = acked.iter().map(|r| r.id).filter(|id| !ids.contains(id)).collect();
    assert!(lost.is_empty(), "{} acknowledged rows are missing: {lost:?}", lost.len());
    for pair in table.windows(2) {
        assert!(pair[1].1 >= pair[0].1, "row {:?} carries an older token than row {:?}", pair[1], pair[0]);
    }
    let mut owner = std::collections::BTreeMap::new();
    for (_, t, n) in &table {
        assert_eq!(owner.entry(*t).or_insert_with(|| n.clone()), n, "token {t} on two nodes");
    }
    eprintln!("{} rows acknowledged, {} in the table, tokens {owner:?}", acked.len(), table.len());
    owner
}

/// One start of PostgreSQL, as its start script logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Start {
    node: String,
    token: u64,
    /// Wall clock, ns since the Unix epoch.
    at_ns: u128,
}

/// A process seen in a node's namespace.
#[derive(Debug, Clone)]
struct Proc {
    pid: i32,
    comm: String,
    cmdline: String,
    /// The state letter of /proc/PID/stat (`T`: stopped).
    state: char,
}

/// Live processes whose network namespace has inode `ino` (zombies have none, so they are
/// not listed).
fn procs_in(ino: u64) -> Vec<Proc> {
    let want = format!("net:[{ino}]");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if std::fs::read_link(e.path().join("ns/net")).ok().and_then(|l| l.to_str().map(|l| l == want)) != Some(true) {
            continue;
        }
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default().trim().to_string();
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let state = stat.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()).unwrap_or('?');
        out.push(Proc { pid, comm, cmdline, state });
    }
    out
}

/// Whether the floating IP is on `ns`'s bridge interface while that interface is up (a node
/// whose interface is down, e.g. after a fence, does not answer for it).
fn vip_up_in(ns: &str) -> bool {
    let out = Command::new("ip").args(["-n", ns, "-o", "addr", "show", "dev", "eth0", "up"]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("{VIP}/"))).unwrap_or(false)
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).is_ok()
}

fn unix_ns(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos()
}

impl Lab {
    fn ns_inode(&self, node: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{}", self.net.of(node))).expect("the node's namespace").ino()
    }

    fn procs(&self, node: &str) -> Vec<Proc> {
        procs_in(self.ns_inode(node))
    }

    /// The pid of `node`'s agent (not its guard, which runs the same binary).
    fn agent_pid(&self, node: &str) -> i32 {
        let p = self.procs(node);
        p.iter()
            .find(|p| p.comm == "tandem-guest" && !p.cmdline.trim_end().ends_with(" guard"))
            .unwrap_or_else(|| panic!("no agent runs on {node}: {p:?}"))
            .pid
    }

    /// Starts `node`'s agent like [`Lab::start`], under a shell that restarts it at once
    /// whenever it exits (a supervisor's `Restart=always`). The node's init (`tini -s`)
    /// outlives the agent, so it still reaps the orphans of what the agent ran.
    fn start_restarting(&self, node: &str) -> ChildGuard {
        let cgroup = self.cg_root.join(node);
        std::fs::create_dir_all(&cgroup).unwrap();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.path(&format!("{node}.log"))).unwrap();
        let mut cmd = netns::node_command(self.net.of(node), "/bin/sh");
        cmd.arg("-c")
            .arg("while :; do \"$@\"; echo \"tandem-guest exited with status $?; restarting it\" >&2; sleep 0.1; done")
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_tandem-guest"))
            .arg("--config")
            .arg(self.path("tandem.toml"))
            .arg("--cgroup-root")
            .arg(cgroup.join("groups"))
            .env("TANDEM_NODE", node)
            .env("TANDEM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        tandem_testkit::in_cgroup(&mut cmd, &cgroup);
        ChildGuard::spawn(&format!("tandem-guest {node} (restarted on exit)"), cmd)
    }

    /// SIGSTOPs every process in `node`'s namespace (agent, guard, init, PostgreSQL): the
    /// whole node stalls, as a paused VM does. Repeats until every process is stopped (one
    /// may have forked meanwhile). Returns the stopped pids.
    fn stall(&self, node: &str) -> Vec<i32> {
        use nix::sys::signal::Signal;
        let mut stopped = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let running: Vec<Proc> = self.procs(node).into_iter().filter(|p| !matches!(p.state, 'T' | 't')).collect();
            if running.is_empty() && !stopped.is_empty() {
                return stopped.into_iter().collect();
            }
            for p in running {
                signal(p.pid, Signal::SIGSTOP);
                stopped.insert(p.pid);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("could not stop every process of {node}: {:?}", self.procs(node));
    }

    /// The starts of PostgreSQL so far, from its start script's log.
    fn starts(&self) -> Vec<Start> {
        std::fs::read_to_string(self.path("starts.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some(Start { node: f.next()?.into(), token: f.next()?.parse().ok()?, at_ns: f.next()?.parse().ok()? })
            })
            .collect()
    }

    /// The fences logged by the fence command: (node, start ns, end ns).
    fn fences(&self) -> Vec<(String, u128, u128)> {
        std::fs::read_to_string(self.path("fenced.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.next()?.into(), f.next()?.parse().ok()?, f.next()?.parse().ok()?))
            })
            .collect()
    }
}

/// What a [`Watch`] saw at one instant: per node (n1, n2), whether PostgreSQL processes run
/// there and whether the floating IP is up there.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: SystemTime,
    pg: [bool; 2],
    vip: [bool; 2],
}

/// Samples every 50 ms which node runs PostgreSQL and which holds the floating IP: evidence
/// from outside the agents, in wall-clock time (the clock of the fence log and of the rows'
/// insertion times).
struct Watch {
    samples: std::sync::Arc<std::sync::Mutex<Vec<Sample>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    fn start(lab: &Lab) -> Watch {
        let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ns = [lab.net.n1.clone(), lab.net.n2.clone()];
        let ino = [lab.ns_inode("n1"), lab.ns_inode("n2")];
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let at = SystemTime::now();
                let pg = ino.map(|i| procs_in(i).iter().any(|p| p.comm == "postgres"));
                let vip = [vip_up_in(&ns[0]), vip_up_in(&ns[1])];
                s.lock().unwrap().push(Sample { at, pg, vip });
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Watch { samples, stop, thread: Some(thread) }
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    /// The first sample after `after` for which `f` holds.
    fn first_after(&self, after: SystemTime, f: impl Fn(&Sample) -> bool) -> Option<SystemTime> {
        self.samples().into_iter().find(|s| s.at > after && f(s)).map(|s| s.at)
    }

    /// The safety invariant as seen from outside: never PostgreSQL on both nodes, never the
    /// floating IP up on both.
    fn finish_and_check(&mut self, lab: &Lab) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let samples = self.samples();
        assert!(samples.len() > 20, "the watch took too few samples: {}", samples.len());
        for s in &samples {
            assert!(!(s.pg[0] && s.pg[1]), "PostgreSQL ran on both nodes at {:?}; logs:\n{}", s.at, lab.logs());
            assert!(
                !(s.vip[0] && s.vip[1]),
                "the floating IP was up on both nodes at {:?}; logs:\n{}",
                s.at,
                lab.logs()
            );
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts n1 with PostgreSQL, the SQL writer in the client namespace and n2 as the standby;
/// returns n1's agent, n2's agent, the writer and n1's first row.
fn pg_cluster(lab: &Lab, password: &str, n1_restarting: bool) -> (ChildGuard, ChildGuard, SqlWriter, Row) {
    let n1 = if n1_restarting { lab.start_restarting("n1") } else { lab.start("n1") };
    let writer = SqlWriter::start(&lab.net.cl, password);
    let first =
        lab.wait("rows inserted through the floating IP", Duration::from_secs(60), || writer.rows().first().cloned());
    assert_eq!(first.node, "n1");
    assert!(first.token > 0, "the epoch was not stamped: {first:?}");
    let n2 = lab.start("n2");
    assert_eq!(lab.converged("pg", Duration::from_secs(30)), "n1");
    (n1, n2, writer, first)
}

#[test]
fn postgresql_moves_when_the_agent_and_its_processes_are_killed_and_the_guard_stops_it_when_the_agent_stalls() {
    use nix::sys::signal::Signal;
    const TEST: &str =
        "postgresql_moves_when_the_agent_and_its_processes_are_killed_and_the_guard_stops_it_when_the_agent_stalls";
    let lab = Lab::new(PG_GROUP);
    let password = setup_postgres(&lab);
    let (n1, mut n2, mut writer, first) = pg_cluster(&lab, &password, false);
    let t1 = first.token;
    let mut watch = Watch::start(&lab);

    // 1. SIGKILL of n1's agent and of every PostgreSQL process. The guard is a process of
    //    its own and survives: it sees the agent gone and removes the floating IP; n2 takes
    //    over once n1's host lease is dead. PostgreSQL goes first so that the node's init,
    //    which exits with the agent, still reaps it (else its zombie's pid would hold the
    //    data directory's lock file until this machine's PID 1 reaps it).
    let pg: Vec<i32> = lab.procs("n1").iter().filter(|p| p.comm == "postgres").map(|p| p.pid).collect();
    let agent = lab.agent_pid("n1");
    let killed = Instant::now();
    for p in &pg {
        signal(*p, Signal::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(signal(agent, Signal::SIGKILL));
    let moved =
        lab.wait("inserts resume on n2", Duration::from_secs(60), || writer.rows().into_iter().find(|r| r.token > t1));
    report::failover(TEST, moved.at - killed, "SIGKILL of n1's agent and postgres until the first insert on n2");
    assert_eq!(moved.node, "n2", "{moved:?}\n{}", lab.logs());
    let t2 = moved.token;
    assert!(!lab.net.addrs("n1").contains(VIP), "the guard left the floating IP on n1:\n{}", lab.logs());
    drop(n1);

    // n1's agent comes back (its supervisor would restart it): it joins as the standby.
    let _n1 = lab.start("n1");
    assert_eq!(lab.converged("pg", Duration::from_secs(30)), "n2");

    // 2. SIGSTOP of n2's agent alone: its guard kills PostgreSQL and removes the floating IP
    //    at the kill deadline, n1 takes over once n2's host lease is dead (no outside fence
    //    exists here), and n2's agent, resumed, finds its lease lost and exits 76.
    let agent = lab.agent_pid("n2");
    let stalled_at = SystemTime::now();
    let stalled = Instant::now();
    assert!(signal(agent, Signal::SIGSTOP));
    let back =
        lab.wait("inserts resume on n1", Duration::from_secs(60), || writer.rows().into_iter().find(|r| r.token > t2));
    report::failover(TEST, back.at - stalled, "SIGSTOP of n2's agent alone until the first insert on n1");
    assert_eq!(back.node, "n1", "{back:?}\n{}", lab.logs());
    let pg_gone = watch.first_after(stalled_at, |s| !s.pg[1]).expect("PostgreSQL on n2 was never stopped");
    let vip_gone = watch.first_after(stalled_at, |s| !s.vip[1]).expect("the floating IP stayed on n2");
    let n1_vip = watch.first_after(stalled_at, |s| s.vip[0]).expect("n1 never brought the floating IP up");
    let first_write_us = back.inserted_us as u128;
    eprintln!(
        "agent SIGSTOP: the guard killed PostgreSQL after {:?} and removed the address after {:?}; n1 had the \
         address after {:?} and inserted its first row after {} ms",
        pg_gone.duration_since(stalled_at).unwrap(),
        vip_gone.duration_since(stalled_at).unwrap(),
        n1_vip.duration_since(stalled_at).unwrap(),
        (first_write_us - unix_ns(stalled_at) / 1000) / 1000,
    );
    assert!(unix_ns(pg_gone) / 1000 < first_write_us, "n1 wrote before n2's PostgreSQL was stopped");
    assert!(vip_gone <= n1_vip, "n1 brought the floating IP up before n2's guard removed it");
    assert!(lab.fences().is_empty());
    assert!(signal(agent, Signal::SIGCONT));
    let mut exit = None;
    assert!(
        common::wait_until(Duration::from_secs(20), || {
            exit = n2.try_wait();
            exit.is_some()
        }),
        "n2's agent did not exit after resuming:\n{}",
        lab.logs()
    );
    assert_eq!(exit.unwrap().code(), Some(76), "exit status of an agent that lost its host lease:\n{}", lab.logs());
    assert!(lab.procs("n2").iter().all(|p| p.comm != "tandem-guest" || p.cmdline.contains(" guard")));

    std::thread::sleep(Duration::from_secs(1));
    writer.finish();
    let owner = check_table(&lab, &password, &writer.rows());
    let nodes: Vec<&str> = owner.values().map(String::as_str).collect();
    assert_eq!(nodes, ["n1", "n2", "n1"], "one epoch per holder: {owner:?}");
    watch.finish_and_check(&lab);
    let log2 = lab.log_of("n2");
    assert!(log2.contains("kill deadline passed"), "the guard did not act on n2:\n{log2}");
}

#[test]
fn whole_node_stall_with_postgresql_is_fenced_before_the_peer_takes_over() {
    use nix::sys::signal::Signal;
    let lab = Lab::with_fence(PG_GROUP, Fence::KillNamespace);
    let password = setup_postgres(&lab);
    let (_n1, _n2, mut writer, first) = pg_cluster(&lab, &password, false);
    let t1 = first.token;
    let mut watch = Watch::start(&lab);

    // Every process of n1 stops at once (agent, guard, init, PostgreSQL): nothing on n1 can
    // fence itself. n2 must power n1 off (the fence command) before it takes over.
    let stalled_at = SystemTime::now();
    let stalled = Instant::now();
    let frozen = lab.stall("n1");
    assert!(frozen.len() >= 4, "{frozen:?}");
    let moved =
        lab.wait("inserts resume on n2", Duration::from_secs(60), || writer.rows().into_iter().find(|r| r.token > t1));
    report::failover(
        "whole_node_stall_with_postgresql_is_fenced_before_the_peer_takes_over",
        moved.at - stalled,
        "SIGSTOP of every process of n1 until the first insert on n2, n1 fenced first",
    );
    assert_eq!(moved.node, "n2", "{moved:?}\n{}", lab.logs());

    // The stalled node resumes: nothing of it is left to resume.
    for p in &frozen {
        signal(*p, Signal::SIGCONT);
    }
    assert!(lab.procs("n1").is_empty(), "n1 survived its fence: {:?}", lab.procs("n1"));

    // The fence ran once, after the stall, and had completed before n2 started PostgreSQL
    // and before n2's first row.
    let fences = lab.fences();
    assert_eq!(fences.len(), 1, "{fences:?}\n{}", lab.logs());
    let (node, start_ns, end_ns) = fences[0].clone();
    assert_eq!(node, "n1");
    assert!(start_ns > unix_ns(stalled_at));
    let start2 = lab.starts().into_iter().find(|s| s.node == "n2").expect("n2 started PostgreSQL");
    assert!(end_ns < start2.at_ns, "n2 started PostgreSQL before the fence completed: {start2:?}, fence {fences:?}");
    assert!(end_ns < moved.inserted_us as u128 * 1000, "n2 wrote before the fence completed");
    eprintln!(
        "whole-node stall: fence started after {} ms, completed after {} ms; n2 started PostgreSQL after {} ms",
        (start_ns - unix_ns(stalled_at)) / 1_000_000,
        (end_ns - unix_ns(stalled_at)) / 1_000_000,
        (start2.at_ns - unix_ns(stalled_at)) / 1_000_000,
    );

    std::thread::sleep(Duration::from_secs(1));
    writer.finish();
    // No write with a stale token: in insertion order the tokens never go back.
    let owner = check_table(&lab, &password, &writer.rows());
    let nodes: Vec<&str> = owner.values().map(String::as_str).collect();
    assert_eq!(nodes, ["n1", "n2"], "{owner:?}");
    watch.finish_and_check(&lab);
}

#[test]
fn operator_move_then_a_heartbeat_partition_leave_postgresql_running_on_one_side_only() {
    const TEST: &str = "operator_move_then_a_heartbeat_partition_leave_postgresql_running_on_one_side_only";
    let lab = Lab::new(PG_GROUP);
    let password = setup_postgres(&lab);
    let (_n1, _n2, mut writer, first) = pg_cluster(&lab, &password, false);
    let t1 = first.token;
    let mut watch = Watch::start(&lab);

    // Operator move, asked on n1: a clean handover, PostgreSQL started once on n2.
    let asked = Instant::now();
    lab.move_group("n1", "pg", "n2");
    let moved =
        lab.wait("inserts resume on n2", Duration::from_secs(60), || writer.rows().into_iter().find(|r| r.token > t1));
    report::failover(TEST, moved.at - asked, "operator move n1 -> n2 until the first insert on n2");
    assert_eq!(moved.node, "n2");
    let t2 = moved.token;
    assert_eq!(lab.converged("pg", Duration::from_secs(30)), "n2");

    // Every heartbeat of n2 cut (both networks), storage and clients still reachable. n1
    // took the quorum tie-break first, so n2 is the minority: it stops PostgreSQL and
    // releases the lease, and n1 takes over.
    let cut = Instant::now();
    lab.net.cut_heartbeats("n2");
    let back =
        lab.wait("inserts resume on n1", Duration::from_secs(60), || writer.rows().into_iter().find(|r| r.token > t2));
    report::failover(TEST, back.at - cut, "heartbeats of the active n2 cut until the first insert on n1");
    assert_eq!(back.node, "n1");
    assert!(!lab.status("n2").quorum);
    // However long the partition lasts, n2 runs nothing and writes nothing.
    std::thread::sleep(Duration::from_secs(3));
    assert!(lab.procs("n2").iter().all(|p| p.comm != "postgres"), "{:?}", lab.procs("n2"));
    assert!(writer.rows().iter().skip_while(|r| r.id != back.id).all(|r| r.node == "n1"));

    lab.net.heal("n2");
    // failback = manual: the group stays on n1.
    assert_eq!(lab.converged("pg", Duration::from_secs(30)), "n1");
    std::thread::sleep(Duration::from_secs(1));
    writer.finish();

    // Nothing was started twice: one start per holder, in order.
    let starts: Vec<(String, u64)> = lab.starts().into_iter().map(|s| (s.node, s.token)).collect();
    let want = [("n1", t1), ("n2", t2), ("n1", back.token)];
    assert_eq!(
        starts,
        want.map(|(n, t)| (n.to_string(), t as u64)),
        "PostgreSQL starts (node, token):\n{}",
        lab.logs()
    );
    let owner = check_table(&lab, &password, &writer.rows());
    assert_eq!(owner.len(), 3, "{owner:?}");
    watch.finish_and_check(&lab);
}

#[test]
fn agent_restart_during_a_postgresql_failover_starts_it_exactly_once() {
    use nix::sys::signal::Signal;
    let lab = Lab::new(PG_GROUP);
    let password = setup_postgres(&lab);
    // n1's agent runs under a supervisor loop that restarts it at once.
    let (_n1, _n2, mut writer, first) = pg_cluster(&lab, &password, true);
    let t1 = first.token;
    let mut watch = Watch::start(&lab);

    // n1's agent dies (its guard kills PostgreSQL and removes the floating IP) and comes
    // back at once, while n2 waits for n1's host lease to die. Two outcomes are correct and
    // race on the lease disk: n2 takes over, or the restarted n1 reclaims the group first.
    // Either way exactly one node starts PostgreSQL, once, under a new token.
    let agent = lab.agent_pid("n1");
    let killed = Instant::now();
    assert!(signal(agent, Signal::SIGKILL));
    let moved = lab.wait("inserts resume under a new token", Duration::from_secs(60), || {
        writer.rows().into_iter().find(|r| r.token > t1)
    });
    report::failover(
        "agent_restart_during_a_postgresql_failover_starts_it_exactly_once",
        moved.at - killed,
        &format!(
            "SIGKILL of n1's agent, restarted at once, until the first insert under a new token on {}",
            moved.node
        ),
    );
    assert!(
        common::wait_until(Duration::from_secs(30), || lab
            .procs("n1")
            .iter()
            .any(|p| p.comm == "tandem-guest" && p.pid != agent && !p.cmdline.contains(" guard"))),
        "n1's agent was not restarted:\n{}",
        lab.logs()
    );
    // Past another host-dead time: whoever lost the race has given up, nothing else starts.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(lab.converged("pg", Duration::from_secs(30)), moved.node);
    writer.finish();

    let starts: Vec<(String, u64)> = lab.starts().into_iter().map(|s| (s.node, s.token)).collect();
    assert_eq!(
        starts,
        [("n1".to_string(), t1 as u64), (moved.node.clone(), moved.token as u64)],
        "PostgreSQL starts (node, token):\n{}",
        lab.logs()
    );
    let owner = check_table(&lab, &password, &writer.rows());
    assert_eq!(owner.len(), 2, "{owner:?}");
    watch.finish_and_check(&lab);
    eprintln!("the group went to {} (token {t1} -> {})", moved.node, moved.token);
}
