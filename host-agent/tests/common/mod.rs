//! The host clusters of the end-to-end tests: real `tandem-host` processes, each on its own
//! libvirt test-driver hypervisor (`test:///<file>`: the domains live inside the agent
//! process, so killing the agent is a host crash), a shared lease file, HA VMs from domain
//! XML files; and the evidence sampler, which reads every host's own hypervisor view
//! through its `ListDomains`.
//!
//! Two topologies: every host on a loopback address (127.0.0.21, .22, …), or every host in
//! a network namespace of its own on a bridge ([`Cluster::in_netns`]), so that one host can
//! be cut off with iptables while the lease file stays reachable.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_lease::{AreaParams, FileDisk, Lockspace, Timeouts};
use tandem_proto::v1 as pb;
use tandem_proto::v1::host_agent_client::HostAgentClient;
use tandem_testkit::netns::{self, ip, iptables};
use tandem_testkit::{ChildGuard, free_port, require_program};

pub mod guests;

pub const RENEWAL_MS: u64 = 300;

/// One HA VM: name, memory (MiB), vCPUs, preferred hosts in order, and extra `[[group]]`
/// settings (TOML lines such as `restart_limit = 2`).
pub struct VmSpec {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub hosts: Vec<String>,
    pub group_extra: String,
    /// XML inside the domain's `<devices>` (e.g. `<interface>`s).
    pub devices: String,
    /// Extra lines of the VM resource (e.g. `link_key_file = "…"`).
    pub resource_extra: String,
}

pub fn vm(name: &str, memory_mib: u64, vcpus: u32, hosts: &[&str]) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_mib,
        vcpus,
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        group_extra: String::new(),
        devices: String::new(),
        resource_extra: String::new(),
    }
}

/// The namespaces of a cluster in network namespaces: a switch (`sw`, bridge `br0`) and
/// one per host, each host with `eth0` = 10.78.1.<n>/24 on the bridge. Removed on drop.
pub struct HostNet {
    sw: String,
    hosts: Vec<String>,
}

/// The heartbeat and API network of [`HostNet`].
const NET: &str = "10.78.1";

impl HostNet {
    fn new(hosts: usize) -> HostNet {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        require_program("iptables", "iptables", &[]);
        require_program("nsenter", "util-linux", &[]);
        require_program("tini", "tini", &[]);
        let net = HostNet { sw: format!("thn{id}-sw"), hosts: (1..=hosts).map(|i| format!("thn{id}-h{i}")).collect() };
        for ns in std::iter::once(&net.sw).chain(&net.hosts) {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &net.sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &net.sw, "link", "set", "br0", "up"]);
        for (i, ns) in net.hosts.iter().enumerate() {
            let port = format!("p{}", i + 1);
            ip(&["-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &net.sw]);
            ip(&["-n", &net.sw, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &net.sw, "link", "set", &port, "up"]);
            ip(&["-n", ns, "addr", "add", &format!("{NET}.{}/24", i + 1), "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        net
    }

    /// The switch's namespace (bridge `br0`).
    pub fn switch(&self) -> &str {
        &self.sw
    }

    /// Plugs namespace `ns` into the switch as `eth0` with address `addr` (/24).
    pub fn plug(&self, ns: &str, port: &str, addr: &str) {
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&["-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", &self.sw]);
        ip(&["-n", &self.sw, "link", "set", port, "master", "br0"]);
        ip(&["-n", &self.sw, "link", "set", port, "up"]);
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
    }

    /// Gives every host a bridge `br` for VMs, with one port whose far end (`<br>-sw`, the
    /// "switch") stays in the host's namespace: taking the far end down is a pulled cable.
    pub fn vm_bridge(&self, br: &str) {
        let far = format!("{br}-sw");
        let port = format!("{br}-p");
        for ns in &self.hosts {
            ip(&["-n", ns, "link", "add", br, "type", "bridge"]);
            ip(&["-n", ns, "link", "add", &port, "type", "veth", "peer", "name", &far]);
            ip(&["-n", ns, "link", "set", &port, "master", br]);
            for dev in [far.as_str(), port.as_str(), br] {
                ip(&["-n", ns, "link", "set", dev, "up"]);
            }
        }
    }

    /// The namespace of host `hN`.
    pub fn of(&self, host: &str) -> &str {
        &self.hosts[host_index(host)]
    }

    /// Drops every packet in and out of `host`'s `eth0` inside its namespace: the host is
    /// cut off from every peer. Its own loopback (where the test samples its API) stays.
    pub fn cut(&self, host: &str) {
        iptables(self.of(host), &["-A", "INPUT", "-i", "eth0", "-j", "DROP"]);
        iptables(self.of(host), &["-A", "OUTPUT", "-o", "eth0", "-j", "DROP"]);
    }

    /// Removes every rule [`HostNet::cut`] added.
    pub fn heal(&self, host: &str) {
        iptables(self.of(host), &["-F", "INPUT"]);
        iptables(self.of(host), &["-F", "OUTPUT"]);
    }
}

impl Drop for HostNet {
    fn drop(&mut self) {
        for ns in std::iter::once(&self.sw).chain(&self.hosts) {
            netns::delete(ns);
        }
    }
}

/// Makes `cmd`'s process join `cgroup` before it executes (see [`tandem_testkit::in_cgroup`]).
pub use tandem_testkit::in_cgroup;

/// The UUID of the `i`-th VM (from 0) of a [`Cluster`].
pub fn vm_uuid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{:012}", i + 1)
}

/// `h3` -> 2.
fn host_index(host: &str) -> usize {
    host[1..].parse::<usize>().unwrap_or_else(|_| panic!("not a host name: {host}")) - 1
}

/// Moves the calling thread into the network namespace whose file is `ns`.
pub fn enter(ns: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: setns(2) on a file we own; it changes only this thread's network namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

pub fn open_ns(ns: &str) -> std::fs::File {
    let path = format!("/run/netns/{ns}");
    std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"))
}

/// Which hypervisor the hosts of a [`Cluster`] run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hv {
    /// libvirt's test driver, inside each agent (`test:///<file>`).
    TestDriver,
    /// A private libvirt daemon with QEMU per host, in the host's namespace.
    Qemu,
}

pub struct Cluster {
    // Dropped after `Cluster::drop` has killed the hosts, and before the namespaces.
    /// Each host's libvirt daemon with QEMU ([`Cluster::in_netns_qemu`]), in host order.
    pub qemu: Vec<tandem_testkit::qemu::QemuDaemon>,
    pub net: Option<HostNet>,
    pub dir: tempfile::TempDir,
    cg_root: PathBuf,
    pub hosts: Vec<String>,
    api_port: u16,
    pub vms: Vec<String>,
}

pub struct Host {
    pub agent: ChildGuard,
}

/// One answer (or silence) of one host's `ListDomains`.
#[derive(Debug, Clone)]
pub struct Sample {
    pub round: u64,
    pub host: String,
    /// When the request was sent and when the answer came (or the sampler gave up).
    pub sent: Instant,
    pub answered: Instant,
    /// The VMs running there per its hypervisor; `None` when it did not answer.
    pub running: Option<Vec<String>>,
}

/// Which host reports each running VM, per sampling round; any VM seen twice; and every
/// sample, for ordering checks.
#[derive(Default)]
pub struct Evidence {
    pub rounds: u64,
    pub duplicates: Vec<String>,
    pub last: BTreeMap<String, Vec<String>>,
    pub samples: Vec<Sample>,
}

/// How `vm` left `from`, as the samples since `since` show it.
#[derive(Debug)]
pub struct Move {
    /// The answer of the last sample showing it running on `from`.
    pub last_on_from: Instant,
    /// When the first sample showing it running elsewhere was sent, and where.
    pub first_elsewhere: Instant,
    pub to: String,
    /// Whether `from` answered without it in between (a sample strictly between the two).
    pub seen_gone_in_between: bool,
}

impl Evidence {
    /// Where `vm` went after `since`, and the proof that it ran on `from` no more when it
    /// first ran elsewhere: the last sample showing it on `from` was answered before the
    /// first sample showing it elsewhere was sent. `Err` says what broke that, or that it
    /// did not move.
    pub fn moved(&self, vm: &str, from: &str, since: Instant) -> Result<Move, String> {
        let shows = |s: &&Sample| s.sent >= since && s.running.as_ref().is_some_and(|r| r.iter().any(|v| v == vm));
        let last_on_from = self.samples.iter().filter(shows).rfind(|s| s.host == from);
        let Some(first) = self.samples.iter().filter(shows).find(|s| s.host != from) else {
            return Err(format!("{vm} never ran anywhere but {from} after the cut"));
        };
        let Some(last) = last_on_from else {
            return Ok(Move {
                last_on_from: since,
                first_elsewhere: first.sent,
                to: first.host.clone(),
                seen_gone_in_between: true,
            });
        };
        if last.answered > first.sent {
            return Err(format!(
                "{vm} was still reported on {from} (round {}) after {} reported it running (round {})",
                last.round, first.host, first.round
            ));
        }
        let seen_gone_in_between = self.samples.iter().any(|s| {
            s.host == from
                && s.sent > last.answered
                && s.answered < first.sent
                && s.running.as_ref().is_some_and(|r| !r.iter().any(|v| v == vm))
        });
        Ok(Move {
            last_on_from: last.answered,
            first_elsewhere: first.sent,
            to: first.host.clone(),
            seen_gone_in_between,
        })
    }
}

impl Cluster {
    /// Every host on a loopback address. `capacity` (memory MiB, vCPUs) applies to every
    /// host when given.
    pub fn new(hosts: usize, vms: &[VmSpec], capacity: Option<(u64, u32)>) -> Cluster {
        Cluster::build(hosts, vms, capacity, None, "", Hv::TestDriver)
    }

    /// Every host in a network namespace of its own, on one bridge (see [`HostNet`]).
    pub fn in_netns(hosts: usize, vms: &[VmSpec]) -> Cluster {
        Cluster::build(hosts, vms, None, Some(HostNet::new(hosts)), "", Hv::TestDriver)
    }

    /// [`Cluster::in_netns`] with `extra` appended to the configuration (top-level tables
    /// such as `[guest_link]` or `[[network]]`; `{dir}` is replaced by the test directory).
    pub fn in_netns_with(hosts: usize, vms: &[VmSpec], extra: &str) -> Cluster {
        Cluster::build(hosts, vms, None, Some(HostNet::new(hosts)), extra, Hv::TestDriver)
    }

    /// [`Cluster::in_netns`] with real hypervisors: a private libvirt daemon with QEMU (TCG)
    /// in each host's namespace, the hosts' `migration_uri`s pointing at them over the
    /// bridge, and the VMs as real QEMU guests without an OS
    /// ([`tandem_testkit::qemu::idle_domain_xml`]; their `memory_mib` should be small).
    pub fn in_netns_qemu(hosts: usize, vms: &[VmSpec]) -> Cluster {
        Cluster::build(hosts, vms, None, Some(HostNet::new(hosts)), "", Hv::Qemu)
    }

    fn build(
        hosts: usize,
        vms: &[VmSpec],
        capacity: Option<(u64, u32)>,
        net: Option<HostNet>,
        extra: &str,
        hv: Hv,
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let cg_root = tandem_lease::cgroup::cgroup2_mount()
            .expect("a cgroup2 mount (the e2e tests put each host in a cgroup)")
            .join(format!("tandem-e2e-hosts-{}", std::process::id()))
            .join(dir.path().file_name().unwrap());
        std::fs::create_dir_all(&cg_root).unwrap();
        std::fs::write(dir.path().join("key"), "0123456789abcdef0123456789abcdef\n").unwrap();
        let lease = dir.path().join("lease");
        std::fs::File::create(&lease).unwrap().set_len(((vms.len() as u64 + 64) * 64) << 10).unwrap();
        let disk = FileDisk::open(&lease).unwrap();
        Lockspace::init(
            &disk,
            &AreaParams {
                // One host id per host (the 10-host benchmark needs more than 8).
                host_slots: (hosts as u32).max(8),
                // Every VM's lease plus the quorum tie-break, with room to spare.
                resource_slots: (vms.len() as u32 + 1).max(64),
                timeouts: Timeouts::from_renewal_ms(RENEWAL_MS),
                ..AreaParams::new("hosts")
            },
            false,
        )
        .unwrap();
        // In namespaces each host has an address of its own: fixed ports do not collide.
        let (port, api_port) = if net.is_some() { (5405, 7711) } else { (free_port(), free_port()) };
        let names: Vec<String> = (1..=hosts).map(|i| format!("h{i}")).collect();
        let mut toml = format!(
            "[cluster]\nname = \"hosts\"\nkey_file = \"{key}\"\nstate_dir = \"{state}\"\n\n[[link]]\nname = \"lan\"\nport = {port}\ninterval = \"100ms\"\ntimeout = \"1s\"\n\n\
             [lease]\ndevice = \"{lease}\"\nrenewal_interval = \"{RENEWAL_MS}ms\"\n\n",
            key = dir.path().join("key").display(),
            lease = lease.display(),
            state = dir.path().display(),
        );
        if net.is_some() {
            toml += "# A private test network: no TLS.\n[api]\ninsecure = true\n\n";
        }
        let qemu = match (&net, hv) {
            (Some(net), Hv::Qemu) => {
                // In parallel: each daemon probes QEMU once when it starts.
                let starts: Vec<_> = (1..=hosts)
                    .map(|i| {
                        let (ns, addr) = (net.of(&format!("h{i}")).to_string(), format!("{NET}.{i}"));
                        let lv = dir.path().join(format!("lv{i}"));
                        std::thread::spawn(move || {
                            tandem_testkit::qemu::QemuDaemon::start(
                                &lv,
                                &ns,
                                &addr,
                                &format!("5a1c0000-0000-4000-8000-{i:012}"),
                            )
                        })
                    })
                    .collect();
                starts.into_iter().map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
            }
            _ => Vec::new(),
        };
        let cluster = Cluster {
            qemu,
            net,
            dir,
            cg_root,
            hosts: names.clone(),
            api_port,
            vms: vms.iter().map(|v| v.name.clone()).collect(),
        };
        for (i, name) in names.iter().enumerate() {
            // A host with no domains: HA VMs are defined where they start.
            let file = cluster.path(&format!("{name}.xml"));
            std::fs::write(
                &file,
                "<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>8</cores><threads>1</threads>\
                 <active>8</active><mhz>2400</mhz><model>i686</model></cpu><memory>16777216</memory></node>\n",
            )
            .unwrap();
            let hypervisor = match cluster.qemu.get(i) {
                Some(d) => format!("hypervisor = \"{}\"\nmigration_uri = \"{}\"", d.uri(), d.migration_uri()),
                None => format!("hypervisor = \"test://{}\"", file.display()),
            };
            toml += &format!(
                "[[node]]\nname = \"{name}\"\nid = {id}\nlinks = {{ lan = \"{addr}\" }}\napi = \"{addr}:{api_port}\"\n\
                 {hypervisor}\nfence = {{ kind = \"lease-watchdog-only\" }}\n{capacity}\n",
                id = i + 1,
                addr = cluster.addr(name),
                capacity = capacity
                    .map(|(m, c)| format!("capacity = {{ memory_mib = {m}, vcpus = {c} }}\n"))
                    .unwrap_or_default(),
            );
        }
        for (i, vm) in vms.iter().enumerate() {
            let xml = cluster.path(&format!("{}.xml", vm.name));
            if hv == Hv::Qemu {
                std::fs::write(&xml, tandem_testkit::qemu::idle_domain_xml(&vm.name, &vm_uuid(i), vm.memory_mib))
                    .unwrap();
            } else {
                std::fs::write(
                &xml,
                format!(
                    "<domain type='test'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n  <memory unit='MiB'>{mem}</memory>\n  \
                     <vcpu>{vcpus}</vcpu>\n  <os><type arch='i686'>hvm</type></os>\n  <devices>{devices}</devices>\n</domain>\n",
                    name = vm.name,
                    uuid = vm_uuid(i),
                    mem = vm.memory_mib,
                    vcpus = vm.vcpus,
                    devices = vm.devices,
                ),
            )
            .unwrap();
            }
            toml += &format!(
                "[[group]]\nname = \"{name}\"\nnodes = [{list}]\n{extra}\n[[group.resource]]\nname = \"vm\"\nkind = \"vm\"\ndomain = \"{xml}\"\n{res}\n\n",
                name = vm.name,
                list = vm.hosts.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", "),
                extra = vm.group_extra,
                xml = xml.display(),
                res = vm.resource_extra.replace("{dir}", &cluster.dir.path().display().to_string()),
            );
        }
        toml += &extra.replace("{dir}", &cluster.dir.path().display().to_string());
        std::fs::write(cluster.path("host.toml"), toml).unwrap();
        cluster
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The host's address: on loopback, or on the bridge in its namespace.
    pub fn addr(&self, host: &str) -> String {
        let i = host_index(host) + 1;
        if self.net.is_some() { format!("{NET}.{i}") } else { format!("127.0.0.{}", 20 + i) }
    }

    pub fn url(&self, host: &str) -> String {
        format!("http://{}:{}", self.addr(host), self.api_port)
    }

    /// Starts `name`'s agent in its cgroup (and, in namespaces, in its namespace under
    /// `tini -s`, which reaps at once what the agent leaves behind: this machine's PID 1
    /// reaps orphans only every few seconds).
    pub fn start(&self, name: &str) -> Host {
        let cgroup = self.cg_root.join(name);
        std::fs::create_dir_all(&cgroup).unwrap();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.path(&format!("{name}.log"))).unwrap();
        let mut cmd = match &self.net {
            Some(net) => netns::node_command(net.of(name), env!("CARGO_BIN_EXE_tandem-host")),
            None => Command::new(env!("CARGO_BIN_EXE_tandem-host")),
        };
        cmd.arg("--config")
            .arg(self.path("host.toml"))
            .arg("--cgroup-root")
            .arg(cgroup.join("groups"))
            .env("TANDEM_NODE", name)
            .env("TANDEM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        in_cgroup(&mut cmd, &cgroup);
        Host { agent: ChildGuard::spawn(&format!("tandem-host {name}"), cmd) }
    }

    pub fn logs(&self) -> String {
        self.hosts
            .iter()
            .map(|n| {
                format!("--- {n}\n{}", std::fs::read_to_string(self.path(&format!("{n}.log"))).unwrap_or_default())
            })
            .collect()
    }

    pub fn log_of(&self, host: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{host}.log"))).unwrap_or_default()
    }

    /// Runs `f` with `host`'s API URL on a thread that is in `host`'s namespace (in
    /// namespaces: its API is reached over its own loopback, which no cut touches).
    pub fn on_host<T: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce(String) -> Pin<Box<dyn Future<Output = T>>> + Send + 'static,
    ) -> T {
        let ns = self.net.as_ref().map(|n| open_ns(n.of(host)));
        let url = self.url(host);
        std::thread::spawn(move || {
            if let Some(ns) = &ns {
                enter(ns);
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(f(url))
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// `host`'s view of the cluster, or why it could not be had within 5 s.
    pub fn try_status(&self, host: &str) -> Result<pb::HostClusterStatus, String> {
        self.on_host(host, |url| {
            Box::pin(async move {
                let call = async {
                    let mut c = HostAgentClient::connect(url.clone()).await.map_err(|e| format!("{url}: {e}"))?;
                    c.get_cluster_status(pb::GetClusterStatusRequest {})
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|e| format!("{url}: {e}"))
                };
                tokio::time::timeout(Duration::from_secs(5), call).await.map_err(|_| format!("{url}: no answer"))?
            })
        })
    }

    pub fn status(&self, host: &str) -> pb::HostClusterStatus {
        self.try_status(host).unwrap_or_else(|e| panic!("{e}; logs:\n{}", self.logs()))
    }

    /// `EnterMaintenance` (or `ExitMaintenance`) of `target`, sent to `host`: every progress
    /// message, until the final one, until `stop_after` accepts one, or until `limit`.
    pub fn maintenance(
        &self,
        host: &str,
        target: &str,
        enter: Option<pb::MaintenancePolicy>,
        limit: Duration,
        stop_after: fn(&pb::MaintenanceProgress) -> bool,
    ) -> Result<Vec<pb::MaintenanceProgress>, String> {
        let target = target.to_string();
        self.on_host(host, move |url| {
            Box::pin(async move {
                let mut got = Vec::new();
                let run = async {
                    let mut c = pb::host_maintenance_client::HostMaintenanceClient::connect(url.clone())
                        .await
                        .map_err(|e| format!("{url}: {e}"))?;
                    let req =
                        pb::MaintenanceRequest { host: target, policy: enter.map_or(0, |p| p as i32), parallel: 0 };
                    let call =
                        if enter.is_some() { c.enter_maintenance(req).await } else { c.exit_maintenance(req).await };
                    let mut stream = call.map_err(|e| format!("{url}: {e}"))?.into_inner();
                    while let Some(m) = stream.message().await.map_err(|e| format!("{url}: stream: {e}"))? {
                        eprintln!("maintenance: {m:?}");
                        let last = matches!(m.progress, Some(pb::maintenance_progress::Progress::Done(_)));
                        let stop = stop_after(&m);
                        got.push(m);
                        if last || stop {
                            return Ok::<(), String>(());
                        }
                    }
                    Err("the stream ended without a final message".to_string())
                };
                match tokio::time::timeout(limit, run).await {
                    Ok(Ok(())) => Ok(got),
                    Ok(Err(e)) => Err(format!("{e}; got {got:?}")),
                    Err(_) => Err(format!("no final message within {limit:?}; got {got:?}")),
                }
            })
        })
    }

    /// `DumpVm` sent to `host`.
    pub fn dump(&self, host: &str, vm: &str, path: &str) -> Result<pb::DumpVmReply, tonic::Status> {
        let (vm, path) = (vm.to_string(), path.to_string());
        self.on_host(host, move |url| {
            Box::pin(async move {
                let mut c =
                    HostAgentClient::connect(url).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                c.dump_vm(pb::DumpVmRequest { vm, path }).await.map(|r| r.into_inner())
            })
        })
    }

    /// The UUID of the domain of `vm` (the `n`-th VM has `00000000-0000-4000-8000-<n>`).
    pub fn uuid_of(&self, vm: &str) -> String {
        let i = self.vms.iter().position(|v| v == vm).unwrap_or_else(|| panic!("no VM {vm}")) + 1;
        format!("00000000-0000-4000-8000-{i:012}")
    }

    /// `FenceVm` sent to `host` as a first hop for the guest whose VM is `asker` (the way
    /// a host agent passes on what its guest link received): power `target` off.
    pub fn fence(&self, host: &str, asker: &str, target: &str) -> Result<pb::FenceVmResponse, tonic::Status> {
        let (asker, target) = (self.uuid_of(asker), self.uuid_of(target));
        self.on_host(host, move |url| {
            Box::pin(async move {
                let mut c =
                    HostAgentClient::connect(url).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                let mut req = tonic::Request::new(pb::FenceVmRequest {
                    vm_uuid: target,
                    cluster: "pg".into(),
                    node_name: "test".into(),
                    node_id: 0,
                    timeout_ms: 20_000,
                });
                req.metadata_mut().insert(tandem_host::fence::ASKER_METADATA, asker.parse().unwrap());
                c.fence_vm(req).await.map(|r| r.into_inner())
            })
        })
    }

    /// `SuspendVm` (`suspend`) or `ResumeVm` sent to `host`.
    pub fn pause(&self, host: &str, vm: &str, suspend: bool) -> Result<pb::VmStateReply, tonic::Status> {
        let vm = vm.to_string();
        self.on_host(host, move |url| {
            Box::pin(async move {
                let mut c =
                    HostAgentClient::connect(url).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                let req = pb::VmRequest { vm };
                if suspend { c.suspend_vm(req).await } else { c.resume_vm(req).await }.map(|r| r.into_inner())
            })
        })
    }

    /// `host`'s hypervisor's own view (`ListDomains`).
    pub fn domains(&self, host: &str) -> pb::DomainList {
        self.on_host(host, |url| {
            Box::pin(async move {
                let mut c = HostAgentClient::connect(url.clone()).await.unwrap_or_else(|e| panic!("{url}: {e}"));
                c.list_domains(pb::ListDomainsRequest {}).await.unwrap_or_else(|e| panic!("{url}: {e}")).into_inner()
            })
        })
    }

    /// Samples every host's own hypervisor view until dropped.
    pub fn watch(&self) -> Watcher {
        let evidence = Arc::new(Mutex::new(Evidence::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let hosts: Vec<(String, String, Option<std::fs::File>)> =
            self.hosts.iter().map(|h| (h.clone(), self.url(h), self.net.as_ref().map(|n| open_ns(n.of(h))))).collect();
        let (e, s) = (evidence.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            while !s.load(Ordering::SeqCst) {
                let mut round: BTreeMap<String, Vec<String>> = BTreeMap::new();
                let mut samples = Vec::new();
                for (host, url, ns) in &hosts {
                    // Each connection is made after entering the host's namespace, so its
                    // socket lives there.
                    if let Some(ns) = ns {
                        enter(ns);
                    }
                    let sent = Instant::now();
                    let running = rt.block_on(running_on(url));
                    samples.push((host.clone(), sent, Instant::now(), running.clone()));
                    for vm in running.into_iter().flatten() {
                        round.entry(vm).or_default().push(host.clone());
                    }
                }
                let mut ev = e.lock().unwrap();
                ev.rounds += 1;
                let n = ev.rounds;
                for (vm, on) in &round {
                    if on.len() > 1 {
                        ev.duplicates.push(format!("round {n}: {vm} running on {on:?}"));
                    }
                }
                for (host, sent, answered, running) in samples {
                    ev.samples.push(Sample { round: n, host, sent, answered, running });
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
    pub fn wait_all_running(
        &self,
        w: &Watcher,
        limit: Duration,
        where_ok: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> BTreeMap<String, String> {
        let start = Instant::now();
        loop {
            let placed = w.placed();
            if self.vms.iter().all(|v| placed.contains_key(v)) && where_ok(&placed) {
                return placed;
            }
            assert!(start.elapsed() < limit, "not every VM ran within {limit:?}: {placed:?}; logs:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls `f` every 100 ms until it returns `Some`, or panics after `limit` with `what`
    /// and the agents' logs.
    pub fn wait<T>(&self, what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(start.elapsed() < limit, "{what}: not within {limit:?}; logs:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
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
            if let Ok(rd) = std::fs::read_dir(cg.join("groups")) {
                for e in rd.flatten() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            let _ = std::fs::remove_dir(cg.join("groups"));
            let _ = std::fs::remove_dir(&cg);
        }
        let _ = std::fs::remove_dir(&self.cg_root);
        if let Some(parent) = self.cg_root.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// The VMs active (running, paused, …: not off) on the host at `url`, per its hypervisor; `None` if it does not answer
/// within 500 ms (dead, stopped, or refusing because its lease expired).
async fn running_on(url: &str) -> Option<Vec<String>> {
    let call = async {
        let mut c = HostAgentClient::connect(url.to_string()).await.ok()?;
        let r = c.list_domains(pb::ListDomainsRequest {}).await.ok()?.into_inner();
        // Active is anything but off: a paused VM still holds its memory and resumes where
        // it was, so it counts as running there for "never on two hosts".
        let off = [pb::DomainState::Shutoff as i32, pb::DomainState::Crashed as i32, pb::DomainState::NoState as i32];
        Some(r.domains.into_iter().filter(|d| !off.contains(&d.state)).map(|d| d.name).collect())
    };
    tokio::time::timeout(Duration::from_millis(500), call).await.ok().flatten()
}

pub struct Watcher {
    pub evidence: Arc<Mutex<Evidence>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    /// The latest round's placement of the VMs that run on exactly one host.
    pub fn placed(&self) -> BTreeMap<String, String> {
        let ev = self.evidence.lock().unwrap();
        ev.last.iter().filter(|(_, on)| on.len() == 1).map(|(vm, on)| (vm.clone(), on[0].clone())).collect()
    }

    pub fn assert_never_two(&self, c: &Cluster) {
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

/// The processes (pids in this namespace) with `-uuid UUID` on their command line.
pub fn qemu_pids(uuid: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.windows(2).any(|w| w[0] == b"-uuid" && w[1] == uuid.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// `text` without terminal colour sequences (the agents log in colour).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits until `host`'s log says its guard holds QEMU `pid`.
pub fn wait_registered(c: &Cluster, host: &str, pid: i32) {
    c.wait(&format!("{host} to register QEMU {pid}"), Duration::from_secs(60), || {
        let log = strip_ansi(&c.log_of(host));
        log.lines()
            .any(|l| l.contains("QEMU registered with the fencing guard") && l.contains(&format!("pid={pid} ")))
            .then_some(())
    });
}
