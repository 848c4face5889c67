//! End-to-end failover of a host cluster: real `tandem-host` processes on loopback
//! addresses (127.0.0.21, .22, …), each on its own libvirt test-driver hypervisor
//! (`test:///<file>`: the domains live inside the agent process, so killing the agent is
//! a host crash), a shared lease file.
//!
//! The evidence comes from each hypervisor's own view, sampled continuously through every
//! agent's `ListDomains` (the test driver's state is private to the agent's connection):
//! in no sampling round may two hosts report the same VM running.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_lease::{AreaParams, FileDisk, Lockspace, Timeouts};
use tandem_proto::v1 as pb;
use tandem_proto::v1::host_agent_client::HostAgentClient;
use tandem_testkit::{ChildGuard, free_port};

const RENEWAL_MS: u64 = 300;
/// How long after a host's death its VMs may take to run elsewhere: the lease takeover
/// time at this renewal interval is about 2 s; the rest is slack for a loaded machine.
const TAKEOVER_LIMIT: Duration = Duration::from_secs(40);

/// One HA VM: name, memory (MiB), vCPUs, preferred hosts in order.
struct VmSpec {
    name: String,
    memory_mib: u64,
    vcpus: u32,
    hosts: Vec<String>,
}

struct Cluster {
    dir: tempfile::TempDir,
    cg_root: PathBuf,
    hosts: Vec<String>,
    api_port: u16,
    vms: Vec<String>,
}

struct Host {
    agent: ChildGuard,
}

/// Which host reports each running VM, per sampling round; and any VM seen twice.
#[derive(Default)]
struct Evidence {
    rounds: u64,
    duplicates: Vec<String>,
    last: BTreeMap<String, Vec<String>>,
}

impl Cluster {
    /// `capacity` (memory MiB, vCPUs) applies to every host when given.
    fn new(hosts: usize, vms: &[VmSpec], capacity: Option<(u64, u32)>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let cg_root = tandem_lease::cgroup::cgroup2_mount()
            .expect("a cgroup2 mount (the e2e tests put each host in a cgroup)")
            .join(format!("tandem-e2e-hosts-{}", std::process::id()))
            .join(dir.path().file_name().unwrap());
        std::fs::create_dir_all(&cg_root).unwrap();
        std::fs::write(dir.path().join("key"), "0123456789abcdef0123456789abcdef\n").unwrap();
        let lease = dir.path().join("lease");
        std::fs::File::create(&lease).unwrap().set_len(4 << 20).unwrap();
        let disk = FileDisk::open(&lease).unwrap();
        Lockspace::init(
            &disk,
            &AreaParams {
                host_slots: 8,
                resource_slots: 64,
                timeouts: Timeouts::from_renewal_ms(RENEWAL_MS),
                ..AreaParams::new("hosts")
            },
            false,
        )
        .unwrap();
        let port = free_port();
        let api_port = free_port();
        let names: Vec<String> = (1..=hosts).map(|i| format!("h{i}")).collect();
        let mut toml = format!(
            "[cluster]\nname = \"hosts\"\nkey_file = \"{key}\"\n\n[[link]]\nname = \"lo\"\nport = {port}\ninterval = \"100ms\"\ntimeout = \"1s\"\n\n\
             [lease]\ndevice = \"{lease}\"\nrenewal_interval = \"{RENEWAL_MS}ms\"\n\n",
            key = dir.path().join("key").display(),
            lease = lease.display(),
        );
        for (i, name) in names.iter().enumerate() {
            // A host with no domains: HA VMs are defined where they start.
            let file = dir.path().join(format!("{name}.xml"));
            std::fs::write(
                &file,
                "<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>8</cores><threads>1</threads>\
                 <active>8</active><mhz>2400</mhz><model>i686</model></cpu><memory>16777216</memory></node>\n",
            )
            .unwrap();
            toml += &format!(
                "[[node]]\nname = \"{name}\"\nid = {id}\nlinks = {{ lo = \"127.0.0.{addr}\" }}\napi = \"127.0.0.{addr}:{api_port}\"\n\
                 hypervisor = \"test://{file}\"\nfence = {{ kind = \"lease-watchdog-only\" }}\n{capacity}\n",
                id = i + 1,
                addr = 21 + i,
                file = file.display(),
                capacity = capacity
                    .map(|(m, c)| format!("capacity = {{ memory_mib = {m}, vcpus = {c} }}\n"))
                    .unwrap_or_default(),
            );
        }
        for (i, vm) in vms.iter().enumerate() {
            let xml = dir.path().join(format!("{}.xml", vm.name));
            std::fs::write(
                &xml,
                format!(
                    "<domain type='test'>\n  <name>{name}</name>\n  <uuid>00000000-0000-4000-8000-{n:012}</uuid>\n  <memory unit='MiB'>{mem}</memory>\n  \
                     <vcpu>{vcpus}</vcpu>\n  <os><type arch='i686'>hvm</type></os>\n</domain>\n",
                    name = vm.name,
                    n = i + 1,
                    mem = vm.memory_mib,
                    vcpus = vm.vcpus,
                ),
            )
            .unwrap();
            toml += &format!(
                "[[group]]\nname = \"{name}\"\nnodes = [{list}]\n\n[[group.resource]]\nname = \"vm\"\nkind = \"vm\"\ndomain = \"{xml}\"\n\n",
                name = vm.name,
                list = vm.hosts.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", "),
                xml = xml.display(),
            );
        }
        std::fs::write(dir.path().join("host.toml"), toml).unwrap();
        Cluster { dir, cg_root, hosts: names, api_port, vms: vms.iter().map(|v| v.name.clone()).collect() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn addr(&self, host: &str) -> String {
        let i: usize = host[1..].parse().unwrap();
        format!("http://127.0.0.{}:{}", 20 + i, self.api_port)
    }

    fn start(&self, name: &str) -> Host {
        let cgroup = self.cg_root.join(name);
        std::fs::create_dir_all(&cgroup).unwrap();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.path(&format!("{name}.log"))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem-host"));
        cmd.arg("--config")
            .arg(self.path("host.toml"))
            .arg("--cgroup-root")
            .arg(cgroup.join("groups"))
            .env("TANDEM_NODE", name)
            .env("TANDEM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        let procs = cgroup.join("cgroup.procs");
        // SAFETY: only async-signal-safe work between fork and exec: open/write/close.
        unsafe {
            cmd.pre_exec(move || {
                std::fs::write(&procs, b"0\n")?;
                Ok(())
            });
        }
        Host { agent: ChildGuard::spawn(&format!("tandem-host {name}"), cmd) }
    }

    fn logs(&self) -> String {
        self.hosts
            .iter()
            .map(|n| {
                format!("--- {n}\n{}", std::fs::read_to_string(self.path(&format!("{n}.log"))).unwrap_or_default())
            })
            .collect()
    }

    /// Samples every host's own hypervisor view until dropped.
    fn watch(&self) -> Watcher {
        let evidence = Arc::new(Mutex::new(Evidence::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let hosts: Vec<(String, String)> = self.hosts.iter().map(|h| (h.clone(), self.addr(h))).collect();
        let (e, s) = (evidence.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            while !s.load(Ordering::SeqCst) {
                let mut round: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (host, url) in &hosts {
                    if let Some(running) = rt.block_on(running_on(url)) {
                        for vm in running {
                            round.entry(vm).or_default().push(host.clone());
                        }
                    }
                }
                let mut ev = e.lock().unwrap();
                ev.rounds += 1;
                for (vm, on) in &round {
                    if on.len() > 1 {
                        let round = ev.rounds;
                        ev.duplicates.push(format!("round {round}: {vm} running on {on:?}"));
                    }
                }
                ev.last = round;
                drop(ev);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Watcher { evidence, stop, thread: Some(thread) }
    }

    /// Waits until every VM runs on exactly one host, `where_ok` accepts the placement, and
    /// returns it (VM → host).
    fn wait_all_running(
        &self,
        w: &Watcher,
        limit: Duration,
        where_ok: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> BTreeMap<String, String> {
        let start = Instant::now();
        loop {
            let placed: BTreeMap<String, String> = {
                let ev = w.evidence.lock().unwrap();
                ev.last.iter().filter(|(_, on)| on.len() == 1).map(|(vm, on)| (vm.clone(), on[0].clone())).collect()
            };
            if self.vms.iter().all(|v| placed.contains_key(v)) && where_ok(&placed) {
                return placed;
            }
            assert!(start.elapsed() < limit, "not every VM ran within {limit:?}: {placed:?}; logs:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn status(&self, host: &str) -> pb::HostClusterStatus {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut c = HostAgentClient::connect(self.addr(host)).await.unwrap();
            c.get_cluster_status(pb::GetClusterStatusRequest {}).await.unwrap().into_inner()
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for h in &self.hosts {
            let cg = self.cg_root.join(h);
            let _ = std::fs::write(cg.join("cgroup.kill"), "1");
        }
        std::thread::sleep(Duration::from_millis(300));
        for h in &self.hosts {
            let cg = self.cg_root.join(h);
            let _ = std::fs::remove_dir(cg.join("groups"));
            if let Ok(rd) = std::fs::read_dir(cg.join("groups")) {
                for e in rd.flatten() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            let _ = std::fs::remove_dir(cg.join("groups"));
            let _ = std::fs::remove_dir(&cg);
        }
        let _ = std::fs::remove_dir(&self.cg_root);
    }
}

/// The VMs running on the host at `url`, per its hypervisor; `None` if it does not answer
/// within 500 ms (dead, stopped, or refusing because its lease expired).
async fn running_on(url: &str) -> Option<Vec<String>> {
    let call = async {
        let mut c = HostAgentClient::connect(url.to_string()).await.ok()?;
        let r = c.list_domains(pb::ListDomainsRequest {}).await.ok()?.into_inner();
        Some(r.domains.into_iter().filter(|d| d.state == pb::DomainState::Running as i32).map(|d| d.name).collect())
    };
    tokio::time::timeout(Duration::from_millis(500), call).await.ok().flatten()
}

struct Watcher {
    evidence: Arc<Mutex<Evidence>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn assert_never_two(&self, c: &Cluster) {
        let ev = self.evidence.lock().unwrap();
        assert!(ev.rounds > 10, "the sampler ran only {} rounds", ev.rounds);
        assert!(ev.duplicates.is_empty(), "a VM ran on two hosts: {:?}; logs:\n{}", ev.duplicates, c.logs());
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn vm(name: &str, memory_mib: u64, vcpus: u32, hosts: &[&str]) -> VmSpec {
    VmSpec { name: name.into(), memory_mib, vcpus, hosts: hosts.iter().map(|h| h.to_string()).collect() }
}

/// Ten VMs over three hosts, each preferring one host and then the next.
fn ten_vms() -> Vec<VmSpec> {
    let order = [["h1", "h2", "h3"], ["h2", "h3", "h1"], ["h3", "h1", "h2"]];
    (1..=10).map(|i| vm(&format!("vm{i:02}"), 256, 1, &order[(i - 1) % 3])).collect()
}

#[test]
fn a_killed_host_s_vms_restart_on_the_survivors_by_preference() {
    let c = Cluster::new(3, &ten_vms(), None);
    let w = c.watch();
    let mut hosts: Vec<Host> = c.hosts.iter().map(|h| c.start(h)).collect();
    let placed = c.wait_all_running(&w, Duration::from_secs(60), |p| {
        // Each VM on its first preference once all hosts are up.
        ten_vms().iter().all(|v| p.get(&v.name) == Some(&v.hosts[0]))
    });
    assert_eq!(placed.values().filter(|h| *h == "h1").count(), 4);

    // h1 crashes: its test-driver VMs vanish with the process.
    let killed = Instant::now();
    hosts[0].agent.kill();
    let after = c.wait_all_running(&w, TAKEOVER_LIMIT, |p| p.values().all(|h| h != "h1"));
    eprintln!("h1's VMs ran elsewhere {:?} after the kill", killed.elapsed());
    for v in ten_vms() {
        // The VMs h1 ran go to their second preference; the others stay.
        let expect = if v.hosts[0] == "h1" { &v.hosts[1] } else { &v.hosts[0] };
        assert_eq!(after.get(&v.name), Some(expect), "{} placed by preference; logs:\n{}", v.name, c.logs());
    }
    std::thread::sleep(Duration::from_secs(2));
    w.assert_never_two(&c);
    // The status shows each VM's fencing token: 1 where it first started, 2 where it moved.
    let s = c.status("h2");
    for v in &s.vms {
        let moved = ten_vms().iter().any(|t| t.name == v.name && t.hosts[0] == "h1");
        assert_eq!(v.fencing_token, Some(if moved { 2 } else { 1 }), "{}: {v:?}", v.name);
    }
    drop(hosts);
}

#[test]
fn a_paused_host_destroys_its_vms_on_resume_before_anything_else() {
    let c = Cluster::new(3, &ten_vms(), None);
    let w = c.watch();
    let hosts: Vec<Host> = c.hosts.iter().map(|h| c.start(h)).collect();
    c.wait_all_running(&w, Duration::from_secs(60), |p| ten_vms().iter().all(|v| p.get(&v.name) == Some(&v.hosts[0])));

    // SIGSTOP h1's agent (its VMs freeze with it) well past the takeover time.
    let pid = nix::unistd::Pid::from_raw(hosts[0].agent.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    c.wait_all_running(&w, TAKEOVER_LIMIT, |p| p.values().all(|h| h != "h1"));
    std::thread::sleep(Duration::from_secs(2));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();

    // The resumed agent learns its lease is gone, destroys its VMs and exits (76); it never
    // reports them running again.
    let start = Instant::now();
    let mut agent = hosts.into_iter().next().unwrap().agent;
    let status = loop {
        if let Some(s) = agent.try_wait() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "h1 did not exit after resuming; logs:\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(76), "h1 exits with 'host lease lost'; logs:\n{}", c.logs());
    let log = std::fs::read_to_string(c.path("h1.log")).unwrap();
    assert!(log.contains("lease"), "h1 says why it stopped:\n{log}");
    std::thread::sleep(Duration::from_secs(1));
    w.assert_never_two(&c);
}

#[test]
fn vms_that_fit_nowhere_are_reported_and_start_when_a_host_returns() {
    // Each host holds two 1 GiB VMs; six VMs fill the cluster.
    let order = [["h1", "h2", "h3"], ["h2", "h3", "h1"], ["h3", "h1", "h2"]];
    let vms: Vec<VmSpec> = (1..=6).map(|i| vm(&format!("big{i}"), 1024, 1, &order[(i - 1) % 3])).collect();
    let c = Cluster::new(3, &vms, Some((2 * 1024, 8)));
    let w = c.watch();
    let mut hosts: Vec<Host> = c.hosts.iter().map(|h| c.start(h)).collect();
    let placed = c.wait_all_running(&w, Duration::from_secs(60), |_| true);
    for h in &c.hosts {
        assert_eq!(placed.values().filter(|p| *p == h).count(), 2, "two VMs per host: {placed:?}");
    }
    let on_h1: BTreeSet<String> = placed.iter().filter(|(_, h)| *h == "h1").map(|(v, _)| v.clone()).collect();

    // h1 dies: its two VMs have nowhere to go (h2 and h3 are full).
    hosts[0].agent.kill();
    let start = Instant::now();
    loop {
        let s = c.status("h2");
        let blocked: BTreeSet<String> = s.problems.iter().map(|p| p.vm.clone()).collect();
        if blocked == on_h1 {
            assert!(
                s.problems.iter().all(|p| p.reason.contains("h2") && p.reason.contains("h3")),
                "the problem names why each host cannot take it: {:?}",
                s.problems
            );
            break;
        }
        assert!(start.elapsed() < TAKEOVER_LIMIT, "no placement problem reported: {s:?}; logs:\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    // Nothing was squeezed in: the survivors still run two VMs each.
    std::thread::sleep(Duration::from_secs(2));
    {
        let ev = w.evidence.lock().unwrap();
        let running: Vec<&String> = ev.last.keys().collect();
        assert_eq!(running.len(), 4, "only the survivors' VMs run: {:?}", ev.last);
    }

    // h1 comes back: they start there.
    hosts[0] = c.start("h1");
    let after = c.wait_all_running(&w, TAKEOVER_LIMIT, |_| true);
    for v in &on_h1 {
        assert_eq!(after.get(v).map(String::as_str), Some("h1"), "{v}; logs:\n{}", c.logs());
    }
    w.assert_never_two(&c);
}
