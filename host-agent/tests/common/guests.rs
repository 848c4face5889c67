//! Guests for the host cluster's end-to-end tests: each HA VM that "runs" a guest gets a
//! stand-in, a real `tandem-guest` process in a network namespace of its own plugged into
//! the hosts' switch, linked over TCP to the host agent of whichever host runs the VM.
//!
//! The test driver's VMs run no code, so a supervisor thread makes the stand-ins follow
//! their VMs as a real guest follows its VM, from each host's own `ListDomains`: the VM
//! starts on a host → a fresh stand-in boots there (its link to that host); the VM pauses
//! → every process of the stand-in freezes (cgroup freezer); it resumes → they thaw; it
//! stops or disappears → every process of the stand-in is killed (cgroup.kill).
//!
//! The guest cluster runs a writer that stamps each line with its fencing token, node and
//! wall-clock nanoseconds: the evidence for "never two writers" and for the length of the
//! switch-over window.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_lease::{AreaParams, FileDisk, Lockspace, Timeouts};
use tandem_proto::v1 as pb;
use tandem_proto::v1::guest_agent_client::GuestAgentClient;
use tandem_proto::v1::host_agent_client::HostAgentClient;
use tandem_testkit::ChildGuard;
use tandem_testkit::netns;

use super::{Cluster, RENEWAL_MS, enter, open_ns};

/// Where host agents listen for guest links in these tests.
pub const LINK_PORT: u16 = 7702;
const GUEST_API_PORT: u16 = 7701;

/// The `tandem-guest` binary of this build, built on first use (`cargo build -p
/// tandem-guest`, a no-op when it is fresh): Cargo gives a test only its own package's
/// binaries.
pub fn guest_binary() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        // `scripts/test.sh` runs `cargo test --workspace`, which builds this binary with the
        // tests' feature set; building it again alone would rebuild its dependencies.
        if let Some(bin) = std::env::var_os("TANDEM_GUEST_BIN").map(PathBuf::from)
            && bin.is_file()
        {
            return bin;
        }
        // <target>/<profile>/deps/<this test or bench> → <target>/<profile>/tandem-guest
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "tandem-guest", "--bin", "tandem-guest"]);
        if release {
            build.arg("--release");
        }
        let status = build.current_dir(env!("CARGO_MANIFEST_DIR")).status().expect("cargo runs");
        assert!(status.success(), "cargo build -p tandem-guest failed");
        let bin = profile_dir.join("tandem-guest");
        assert!(bin.is_file(), "{} not found after building it", bin.display());
        bin
    })
}

/// The host configuration that goes with [`Guests`]: a TCP guest-link listener.
pub fn host_extra() -> String {
    format!("[guest_link]\nlisten = \"0.0.0.0:{LINK_PORT}\"\n")
}

/// The VM resource lines of a VM that runs guest node `node` of guest cluster `cluster`.
pub fn vm_resource_extra(cluster: &str, node: &str) -> String {
    format!("link_key_file = \"{{dir}}/linkkey-{node}\"\nguest_cluster = \"{cluster}\"\n")
}

/// Writes the link key of guest node `node` where [`vm_resource_extra`] points the host
/// configuration: before the hosts start, which read it.
pub fn write_link_key(c: &Cluster, node: &str) {
    std::fs::write(c.path(&format!("linkkey-{node}")), format!("link-key-of-{node}-0123456789abcdef\n")).unwrap();
}

/// One guest node: its name in the guest cluster, its VM (group name and UUID), address.
#[derive(Debug, Clone)]
pub struct GuestNode {
    pub name: String,
    pub vm: String,
    pub uuid: String,
    pub addr: String,
    ns: String,
}

struct Running {
    host: String,
    frozen: bool,
    child: ChildGuard,
}

/// A guest cluster whose nodes run in the cluster's VMs.
pub struct Guests {
    pub dir: PathBuf,
    pub nodes: Vec<GuestNode>,
    cg_root: PathBuf,
    running: Arc<Mutex<BTreeMap<String, Running>>>,
    /// Every stand-in start and stop, in order: (when, node, "start on h1" / "kill" / "freeze"…).
    pub history: Arc<Mutex<Vec<(Instant, String, String)>>>,
    /// Every time a guest's VM was seen active on two hosts in one round.
    pub duplicates: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Guests {
    /// Guest cluster `app` with one node per `(node name, VM name)`; the VMs must be in
    /// `c` (built with [`host_extra`] and [`vm_resource_extra`]). `groups` is the TOML of
    /// the guest cluster's groups; `{writer}` in it is replaced by the writer command's
    /// argv and `{dir}` by the guests' directory. `host_fencing`: the nodes fence each other
    /// through the host cluster (`kind = "host-cluster"`), else by lease expiry alone.
    pub fn new(c: &Cluster, nodes: &[(&str, &str)], groups: &str, host_fencing: bool) -> Guests {
        Guests::cluster(c, "app", 0, nodes, groups, host_fencing)
    }

    /// [`Guests::new`] for guest cluster `name`, whose nodes get the guest slots from
    /// `first` on (addresses 10.78.1.101+slot; several guest clusters of one host cluster
    /// take disjoint slots and unique node names).
    pub fn cluster(
        c: &Cluster,
        name: &str,
        first: usize,
        nodes: &[(&str, &str)],
        groups: &str,
        host_fencing: bool,
    ) -> Guests {
        let net = c.net.as_ref().expect("guests need a cluster in namespaces");
        let dir = c.dir.path().join(format!("guests-{name}"));
        std::fs::create_dir_all(dir.join("shared")).unwrap();
        std::fs::write(dir.join("key"), "fedcba9876543210fedcba9876543210\n").unwrap();
        let lease = dir.join("lease");
        std::fs::File::create(&lease).unwrap().set_len(1 << 20).unwrap();
        Lockspace::init(
            &FileDisk::open(&lease).unwrap(),
            &AreaParams {
                host_slots: 8,
                resource_slots: 16,
                timeouts: Timeouts::from_renewal_ms(RENEWAL_MS),
                ..AreaParams::new(name)
            },
            false,
        )
        .unwrap();
        let id = net.switch().trim_end_matches("-sw").to_string();
        let mut list = Vec::new();
        for (i, (node, vm)) in nodes.iter().enumerate() {
            let slot = first + i;
            // An empty VM name: a physical server, no VM and no link.
            let uuid = if vm.is_empty() {
                String::new()
            } else {
                super::vm_uuid(c.vms.iter().position(|v| v == vm).unwrap_or_else(|| panic!("no VM {vm}")))
            };
            let ns = format!("{id}-g{}", slot + 1);
            let addr = format!("10.78.1.{}", 101 + slot);
            netns::delete(&ns);
            ip(&["netns", "add", &ns]);
            net.plug(&ns, &format!("g{}", slot + 1), &addr);
            std::fs::write(c.path(&format!("linkkey-{node}")), format!("link-key-of-{node}-0123456789abcdef\n"))
                .unwrap();
            list.push(GuestNode { name: node.to_string(), vm: vm.to_string(), uuid, addr, ns });
        }
        let writer = format!(
            "[\"/bin/sh\", \"-c\", \"while :; do echo \\\"$TANDEM_FENCING_TOKEN $TANDEM_NODE $(date +%s%N)\\\" >> {}; sleep 0.02; done\"]",
            dir.join("shared/writer.log").display()
        );
        let mut toml = format!(
            "[cluster]\nname = \"{name}\"\nkey_file = \"{key}\"\nstate_dir = \"{state}\"\n\n\
             [[link]]\nname = \"lan\"\nport = 5415\ninterval = \"100ms\"\ntimeout = \"1s\"\n\n\
             [lease]\ndevice = \"{lease}\"\nrenewal_interval = \"{RENEWAL_MS}ms\"\n\n\
             # A private test network: no TLS.\n[api]\ninsecure = true\n\n\
             [host_link]\naddress = \"@HOSTLINK@\"\nkey_file = \"@KEYFILE@\"\nvm_uuid = \"@VMUUID@\"\n\
             heartbeat_interval = \"200ms\"\n\n",
            key = dir.join("key").display(),
            lease = lease.display(),
            state = dir.display(),
        );
        for (i, n) in list.iter().enumerate() {
            toml += &format!(
                "[[node]]\nname = \"{name}\"\nid = {id}\nlinks = {{ lan = \"{addr}\" }}\napi = \"{addr}:{GUEST_API_PORT}\"\n\
                 fence = {fence}\n\n",
                name = n.name,
                id = i + 1,
                addr = n.addr,
                fence = if host_fencing && !n.uuid.is_empty() {
                    format!("{{ kind = \"host-cluster\", vm_uuid = \"{}\", timeout = \"10s\" }}", n.uuid)
                } else {
                    "{ kind = \"lease-watchdog-only\" }".to_string()
                },
            );
        }
        toml += &groups.replace("{writer}", &writer).replace("{dir}", &dir.display().to_string());
        std::fs::write(dir.join("base.toml"), toml).unwrap();
        let cg_root = tandem_lease::cgroup::cgroup2_mount()
            .expect("a cgroup2 mount")
            .join(format!("tandem-e2e-guests-{}", std::process::id()))
            .join(format!("{}-{name}", c.dir.path().file_name().unwrap().to_string_lossy()));
        std::fs::create_dir_all(&cg_root).unwrap();
        let mut g = Guests {
            dir,
            nodes: list,
            cg_root,
            running: Default::default(),
            history: Default::default(),
            duplicates: Default::default(),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        g.thread = Some(g.supervise(c));
        // Physical servers run from the start, whatever the hosts do.
        let bin = guest_binary();
        for n in g.nodes.iter().filter(|n| n.uuid.is_empty()) {
            let child = boot(bin, &g.dir, &g.cg_root, n, "127.0.0.1", &c.path(&format!("linkkey-{}", n.name)));
            g.running.lock().unwrap().insert(n.name.clone(), Running { host: String::new(), frozen: false, child });
        }
        g
    }

    /// The supervisor: every 100 ms, each host's hypervisor view decides what each
    /// stand-in in a VM should be doing.
    fn supervise(&self, c: &Cluster) -> std::thread::JoinHandle<()> {
        let net = c.net.as_ref().unwrap();
        let hosts: Vec<(String, String, std::fs::File, String)> =
            c.hosts.iter().map(|h| (h.clone(), c.url(h), open_ns(net.of(h)), c.addr(h))).collect();
        let nodes: Vec<GuestNode> = self.nodes.iter().filter(|n| !n.uuid.is_empty()).cloned().collect();
        let (running, history, stop) = (self.running.clone(), self.history.clone(), self.stop.clone());
        let duplicates = self.duplicates.clone();
        let (dir, cg_root) = (self.dir.clone(), self.cg_root.clone());
        let keys: BTreeMap<String, PathBuf> =
            nodes.iter().map(|n| (n.name.clone(), c.path(&format!("linkkey-{}", n.name)))).collect();
        let bin = guest_binary().to_path_buf();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            while !stop.load(Ordering::SeqCst) {
                // uuid -> (host, state), from every host that answers.
                let mut seen: BTreeMap<String, (String, i32)> = BTreeMap::new();
                let mut addr_of: BTreeMap<String, String> = BTreeMap::new();
                let mut silent = Vec::new();
                for (host, url, ns, addr) in &hosts {
                    enter(ns);
                    addr_of.insert(host.clone(), addr.clone());
                    match rt.block_on(domains_on(url)) {
                        Some(ds) => {
                            for d in ds {
                                let active = d.state == pb::DomainState::Running as i32
                                    || d.state == pb::DomainState::Paused as i32;
                                if active && let Some((other, _)) = seen.insert(d.uuid.clone(), (host.clone(), d.state))
                                {
                                    duplicates
                                        .lock()
                                        .unwrap()
                                        .push(format!("VM {} active on {other} and {host}", d.uuid));
                                }
                            }
                        }
                        None => silent.push(host.clone()),
                    }
                }
                let mut run = running.lock().unwrap();
                for n in &nodes {
                    let now = seen.get(&n.uuid).cloned();
                    let cur = run.get(&n.name).map(|r| (r.host.clone(), r.frozen));
                    let note = |what: String| history.lock().unwrap().push((Instant::now(), n.name.clone(), what));
                    match (now, cur) {
                        (Some((host, state)), Some((on, frozen))) if host == on => {
                            let paused = state == pb::DomainState::Paused as i32;
                            if paused != frozen {
                                freeze(&cg_root.join(&n.name), paused);
                                run.get_mut(&n.name).unwrap().frozen = paused;
                                note(if paused { "freeze".into() } else { "thaw".into() });
                            }
                        }
                        // A host that does not answer (killed, cut off) keeps its stand-ins as
                        // they are: the VM may well still run there, as far as anyone knows.
                        (None, Some((on, _))) if silent.contains(&on) => {}
                        (now, cur) => {
                            if cur.is_some() {
                                kill(&cg_root.join(&n.name));
                                run.remove(&n.name);
                                note("kill".into());
                            }
                            if let Some((host, state)) = now
                                && state == pb::DomainState::Running as i32
                            {
                                let child = boot(&bin, &dir, &cg_root, n, &addr_of[&host], &keys[&n.name]);
                                run.insert(n.name.clone(), Running { host: host.clone(), frozen: false, child });
                                note(format!("start on {host}"));
                            }
                        }
                    }
                }
                drop(run);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    }

    /// Freezes (or thaws) every process of `node`'s stand-in behind the supervisor's back:
    /// a guest whose agent hangs while its VM runs.
    pub fn freeze_node(&self, node: &str, on: bool) {
        freeze(&self.cg_root.join(node), on);
    }

    /// Kills every process of `node` at once: a physical server losing power.
    pub fn crash_node(&self, node: &str) {
        kill(&self.cg_root.join(node));
    }

    /// The host whose VM the stand-in of `node` runs in now, if any.
    pub fn host_of(&self, node: &str) -> Option<String> {
        self.running.lock().unwrap().get(node).map(|r| r.host.clone())
    }

    /// The guest writer log: (token, node, unix nanoseconds) per line.
    pub fn writes(&self) -> Vec<(u64, String, u128)> {
        let text = std::fs::read_to_string(self.dir.join("shared/writer.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut it = l.split(' ');
                Some((it.next()?.parse().ok()?, it.next()?.to_string(), it.next()?.parse().ok()?))
            })
            .collect()
    }

    /// What breaks "one writer at a time" in the writer log (a token going backwards, or
    /// one token used by two nodes), or a guest's VM seen active on two hosts at once.
    pub fn two_writers(&self) -> Option<String> {
        if let Some(d) = self.duplicates.lock().unwrap().first() {
            return Some(format!("a guest's VM ran on two hosts: {d}"));
        }
        let w = self.writes();
        for (i, pair) in w.windows(2).enumerate() {
            if pair[1].0 < pair[0].0 {
                return Some(format!("line {}: token {} after token {}", i + 2, pair[1].0, pair[0].0));
            }
        }
        let mut owner = BTreeMap::new();
        for (t, n, _) in &w {
            let o = owner.entry(*t).or_insert_with(|| n.clone());
            if o != n {
                return Some(format!("token {t} used by both {o} and {n}"));
            }
        }
        None
    }

    /// The longest pause between two writer lines from the last line before `since_ns` (unix
    /// nanoseconds) on.
    pub fn longest_gap_after(&self, since_ns: u128) -> Duration {
        let w = self.writes();
        // From the last line before the event: a writer killed by the event writes nothing
        // after it, so the outage starts at its last line, not at the survivor's first.
        let last_before = w.iter().map(|x| x.2).filter(|t| *t < since_ns).max();
        let mut times: Vec<u128> =
            last_before.into_iter().chain(w.iter().map(|x| x.2).filter(|t| *t >= since_ns)).collect();
        times.sort_unstable();
        let gap = times.windows(2).map(|p| p[1].saturating_sub(p[0])).max().unwrap_or(0);
        Duration::from_nanos(gap as u64)
    }

    /// Waits until `node` (or any node, with `None`) writes with a token above `above`.
    pub fn wait_writer(&self, node: Option<&str>, above: u64, limit: Duration, c: &Cluster) -> (u64, String) {
        let start = Instant::now();
        loop {
            if let Some((t, n, _)) =
                self.writes().into_iter().rev().find(|(t, n, _)| *t > above && node.is_none_or(|x| x == n))
            {
                return (t, n);
            }
            assert!(
                start.elapsed() < limit,
                "no write by {node:?} with a token above {above} within {limit:?}; guest logs:\n{}\nhost logs:\n{}",
                self.logs(),
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let log = std::fs::read_to_string(self.dir.join(format!("{}.log", n.name))).unwrap_or_default();
                format!("--- guest {}\n{log}", n.name)
            })
            .collect()
    }

    /// `node`'s status over its API, asked from inside its namespace.
    pub fn status(&self, node: &str) -> Result<pb::GuestStatus, String> {
        let n = self.nodes.iter().find(|n| n.name == node).expect("a guest node").clone();
        let ns = open_ns(&n.ns);
        let url = format!("http://{}:{GUEST_API_PORT}", n.addr);
        std::thread::spawn(move || {
            enter(&ns);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let call = async {
                    let mut c = GuestAgentClient::connect(url.clone()).await.map_err(|e| format!("{url}: {e}"))?;
                    c.get_status(pb::GetStatusRequest {})
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|e| format!("{url}: {e}"))
                };
                tokio::time::timeout(Duration::from_secs(5), call).await.map_err(|_| format!("{url}: no answer"))?
            })
        })
        .join()
        .unwrap()
    }
}

impl Drop for Guests {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for n in &self.nodes {
            let cg = self.cg_root.join(&n.name);
            freeze(&cg, false);
            kill(&cg);
        }
        self.running.lock().unwrap().clear();
        std::thread::sleep(Duration::from_millis(300));
        for n in &self.nodes {
            let cg = self.cg_root.join(&n.name);
            if let Ok(rd) = std::fs::read_dir(cg.join("groups")) {
                for e in rd.flatten() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            let _ = std::fs::remove_dir(cg.join("groups"));
            let _ = std::fs::remove_dir(&cg);
            netns::delete(&n.ns);
        }
        let _ = std::fs::remove_dir(&self.cg_root);
        if let Some(parent) = self.cg_root.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

fn ip(args: &[&str]) {
    netns::ip(args);
}

/// Every domain the host at `url` reports, or `None` if it does not answer within 500 ms.
async fn domains_on(url: &str) -> Option<Vec<pb::Domain>> {
    let call = async {
        let mut c = HostAgentClient::connect(url.to_string()).await.ok()?;
        Some(c.list_domains(pb::ListDomainsRequest {}).await.ok()?.into_inner().domains)
    };
    tokio::time::timeout(Duration::from_millis(500), call).await.ok().flatten()
}

fn freeze(cg: &Path, on: bool) {
    let _ = std::fs::write(cg.join("cgroup.freeze"), if on { "1" } else { "0" });
}

fn kill(cg: &Path) {
    let _ = std::fs::write(cg.join("cgroup.kill"), "1");
}

/// Boots a stand-in: a fresh `tandem-guest` for `n`, linked to the host at `host_addr`.
fn boot(bin: &Path, dir: &Path, cg_root: &Path, n: &GuestNode, host_addr: &str, key: &Path) -> ChildGuard {
    let mut base = std::fs::read_to_string(dir.join("base.toml")).unwrap();
    if n.uuid.is_empty() {
        // A physical server: no VM, so no link (the [host_link] section stays for the others).
        base = base.replace("vm_uuid = \"@VMUUID@\"\n", "");
    }
    let config = dir.join(format!("{}.toml", n.name));
    std::fs::write(
        &config,
        base.replace("@HOSTLINK@", &format!("tcp:{host_addr}:{LINK_PORT}"))
            .replace("@KEYFILE@", &key.display().to_string())
            .replace("@VMUUID@", &n.uuid),
    )
    .unwrap();
    let cgroup = cg_root.join(&n.name);
    std::fs::create_dir_all(&cgroup).unwrap();
    freeze(&cgroup, false);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{}.log", n.name))).unwrap();
    let mut cmd: Command = netns::node_command(&n.ns, bin);
    cmd.arg("--config")
        .arg(&config)
        .arg("--cgroup-root")
        .arg(cgroup.join("groups"))
        .env("TANDEM_NODE", &n.name)
        .env("TANDEM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log);
    super::in_cgroup(&mut cmd, &cgroup);
    ChildGuard::spawn(&format!("tandem-guest {}", n.name), cmd)
}
