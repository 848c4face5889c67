//! The validated configuration model.
//!
//! These types are what [`crate::load`] returns once every check passed, and
//! what serialises back to an equivalent TOML file. The TOML section names are
//! singular (`[[node]]`, `[[group.resource]]`) because each table describes
//! one thing; the Rust fields are plural.
//!
//! The host agent will add its own sections (hypervisors, VMs as resources)
//! next to these; [`ResourceKind`] and [`FenceMethod`] are tagged by `kind`
//! so new kinds slot in without changing existing files.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tandem_monitors::{ProbeSpec, RunLimits, SecretSource};

use crate::duration::{self, DurationSchema};

/// A whole cluster: the guest agent's `--config` file.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Cluster-wide identity and secrets.
    pub cluster: ClusterSection,
    /// The machines that run the agent (`[[node]]`).
    #[serde(rename = "node")]
    pub nodes: Vec<Node>,
    /// The networks heartbeats travel over (`[[link]]`).
    #[serde(rename = "link")]
    pub links: Vec<Link>,
    /// The shared lease area; required when a group owns a shared disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseSettings>,
    /// Failover groups: resources that start, stop and move together (`[[group]]`).
    #[serde(rename = "group", default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<FailoverGroup>,
    /// The agent's gRPC API: where it listens and who may do what.
    #[serde(default, skip_serializing_if = "ApiSettings::is_default")]
    #[schemars(default)]
    pub api: ApiSettings,
    /// Host agents: where guest agents link to this host (`[guest_link]`). See docs/host-agent.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_link: Option<GuestLinkSettings>,
    /// Guest agents: the link to the host agent of the hypervisor this node runs on
    /// (`[host_link]`). See docs/guest-agent.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_link: Option<HostLinkSettings>,
    /// Host agents: the networks VMs attach to, watched on every host (`[[network]]`).
    /// A VM attached to a network that fails on its host moves to a host where it works.
    #[serde(rename = "network", default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<Network>,
}

impl ClusterConfig {
    /// The node with this name.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The group with this name.
    pub fn group(&self, name: &str) -> Option<&FailoverGroup> {
        self.groups.iter().find(|g| g.name == name)
    }
}

/// `[cluster]`: what every node shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Name of the cluster; also the lease lockspace name (1..=64 characters
    /// of letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// File holding the shared key that authenticates heartbeats (HMAC).
    /// Only the path is configured: the key itself never appears in this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Addresses (`"ADDRESS:PORT"`, checked with a TCP connect: an answer or a refusal both
    /// count) that tell an isolated node from dead peers: a node that hears no peer and
    /// reaches none of these considers itself the isolated one and keeps no quorum.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub ping_targets: Vec<std::net::SocketAddr>,
    /// Directory (local to each node) where a node keeps its own state across agent
    /// restarts: its standby (planned maintenance) in `<cluster>-<node>.standby`. Created
    /// when first needed. Default: `/var/lib/tandem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
}

/// `[[node]]`: one machine of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Unique node name.
    pub name: String,
    /// Unique node number, 1..=2000; also the node's host id in the lease area.
    pub id: u32,
    /// Votes this node contributes to quorum.
    #[serde(default = "default_votes")]
    #[schemars(default = "default_votes")]
    pub votes: u32,
    /// The node's address on every link, by link name (`{ lan = "10.0.0.1" }`).
    pub links: BTreeMap<String, IpAddr>,
    /// How another node powers this one off when it must be fenced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<FenceMethod>,
    /// Wait this long before fencing this node, so that in a split the node
    /// with the shorter delay wins the race.
    #[serde(default, with = "duration", skip_serializing_if = "Duration::is_zero")]
    #[schemars(with = "DurationSchema")]
    pub fence_delay: Duration,
    /// Address of this node's agent API (`10.0.0.1:7701`): where the other
    /// agents forward operator commands given to them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub api: Option<SocketAddr>,
    /// The libvirt URI of this host's hypervisor (host agents only): `qemu:///system` in
    /// production, `test:///<absolute path to a domain file>` for the test driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<String>,
    /// Where live migrations to this host are sent (host agents only): the libvirt URI the
    /// *source* host's daemon connects to, e.g. `qemu+tls://10.0.0.1/system`. Default:
    /// derived from `hypervisor` with this node's `api` address (else its first link
    /// address): `qemu:///system` becomes `qemu+tls://<address>/system`; a `hypervisor`
    /// that already names a remote host is used as it is; the test driver (`test://…`)
    /// has none (it cannot migrate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_uri: Option<String>,
    /// What this node offers to groups' `demand`s (`{ memory_mib = 65536, vcpus = 32 }`).
    /// Absent: unlimited (groups are not placed by capacity on this node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
}

/// Memory and vCPUs: a node's `capacity` or a group's `demand`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB and {} vCPUs", self.memory_mib, self.vcpus)
    }
}

fn default_votes() -> u32 {
    1
}

/// How a node is fenced (`fence = { kind = "…", … }`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FenceMethod {
    /// A fence agent from the `fence-agents` family (`fence_virsh`, `fence_ipmilan`, …).
    Agent(AgentFence),
    /// Any program: run with the node name appended, exit 0 means "fenced".
    Command(CommandFence),
    /// Ask the host cluster to power off the VM this node runs in.
    HostCluster(HostClusterFence),
    /// No external fencing: rely on the lease's self-fencing (and a hardware
    /// watchdog where one exists) alone. Chosen explicitly, never by default.
    LeaseWatchdogOnly(WatchdogOnlyFence),
}

/// `kind = "agent"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentFence {
    /// Agent program name or path (`fence_virsh`); a bare name is looked up in
    /// PATH, then `/usr/sbin` and `/sbin`.
    pub agent: String,
    /// Agent parameters (`ip`, `username`, `plug`, …), passed on its stdin as `key=value` lines.
    /// Never `password` (use `password_file` / `password_env`) nor `action` (Tandem sets it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    /// Pass the agent `password=` read from the first line of this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Pass the agent `password=` read from this environment variable of the fencing agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Bound on each run of the agent (`off`, then `status`); the agent's whole
    /// process group is killed when it passes.
    #[serde(default = "default_fence_timeout", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_fence_timeout_text")]
    pub timeout: Duration,
}

impl AgentFence {
    /// Where the agent's password comes from, if it needs one.
    pub fn password_source(&self) -> Option<SecretSource> {
        match (&self.password_file, &self.password_env) {
            (Some(f), _) => Some(SecretSource::File(f.clone())),
            (None, Some(v)) => Some(SecretSource::Env(v.clone())),
            (None, None) => None,
        }
    }
}

fn default_fence_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_fence_timeout_text() -> &'static str {
    "60s"
}

/// `kind = "command"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandFence {
    /// Program and arguments.
    pub command: Vec<String>,
    /// Bound on the command's run; its whole process group is killed when it passes.
    #[serde(default = "default_fence_timeout", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_fence_timeout_text")]
    pub timeout: Duration,
}

/// `kind = "host-cluster"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostClusterFence {
    /// UUID of this node's VM as the hypervisor knows it.
    pub vm_uuid: String,
    /// Bound on the host cluster's answer (power-off and its confirmation).
    #[serde(default = "default_fence_timeout", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_fence_timeout_text")]
    pub timeout: Duration,
}

/// `kind = "lease-watchdog-only"` (no fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WatchdogOnlyFence {}

/// The vsock port guest agents connect to when `[guest_link] vsock_port` is not set.
pub const DEFAULT_GUEST_LINK_VSOCK_PORT: u32 = 7702;

/// `[guest_link]` (host agents): where guest agents open their link to this host.
///
/// Two kinds of listener: a TCP address for every VM (`listen`), and one Unix socket per
/// VM with a `vsock_uds` (`<vsock_uds>_<vsock_port>`, where a userspace vsock backend such
/// as vhost-device-vsock hands over the guest's AF_VSOCK connections to that port). Either
/// way the guest must prove it holds its VM's `link_key_file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestLinkSettings {
    /// TCP address and port for guest links (`"10.0.0.1:7702"`). Absent: no TCP listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub listen: Option<SocketAddr>,
    /// The vsock port guests connect to (AF_VSOCK, CID 2 = the host); the host agent
    /// listens on `<vsock_uds>_<vsock_port>` for each VM with a `vsock_uds`.
    #[serde(default = "default_vsock_port")]
    #[schemars(default = "default_vsock_port")]
    pub vsock_port: u32,
    /// TLS for the TCP listener (`[guest_link.tls]`): this host's certificate and key, and
    /// with `client_ca` every guest must present a certificate that chains to it. The
    /// per-VM Unix sockets need none: only the VM's own vsock backend reaches them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ApiTls>,
}

fn default_vsock_port() -> u32 {
    DEFAULT_GUEST_LINK_VSOCK_PORT
}

/// `[host_link]` (guest agents): the link to this node's host agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostLinkSettings {
    /// Where the host agent listens: `"tcp:HOST:PORT"`, `"vsock:CID:PORT"` (CID 2 is the
    /// host) or `"unix:/path"`.
    #[schemars(with = "String")]
    pub address: LinkAddress,
    /// UUID of the VM this node runs in (`virsh domuuid`). Absent: the node's own
    /// `fence = { kind = "host-cluster", vm_uuid = "…" }`. A node with neither runs no link
    /// (a physical server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_uuid: Option<String>,
    /// File holding this VM's link key (the same as the host's `link_key_file` for the VM).
    pub key_file: PathBuf,
    /// How often the guest sends a heartbeat over the link.
    #[serde(default = "default_heartbeat_interval", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_heartbeat_interval_text")]
    pub heartbeat_interval: Duration,
    /// TLS for a `tcp:` address (`[host_link.tls]`), when the host's `[guest_link.tls]` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<HostLinkTls>,
}

/// `[host_link.tls]`: how a guest checks its host agent's certificate over TCP, and the
/// certificate it presents when the host asks for one (`[guest_link.tls] client_ca`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostLinkTls {
    /// PEM CA certificate(s) the host agent's certificate must chain to.
    pub ca: PathBuf,
    /// PEM certificate of this guest (with `key`), for hosts that verify guests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// The name the host's certificate must carry. Default: the host of the `tcp:` address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// Where a guest agent reaches its host agent (`[host_link] address`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LinkAddress {
    /// `tcp:HOST:PORT`: a host name or address and a port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// `vsock:CID:PORT`: AF_VSOCK (CID 2 is the host).
    Vsock {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
    },
    /// `unix:/path`: a Unix socket.
    Unix(PathBuf),
}

impl FromStr for LinkAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let hint = "write tcp:HOST:PORT, vsock:CID:PORT (CID 2 is the host) or unix:/ABSOLUTE/PATH";
        let (scheme, rest) = s.split_once(':').ok_or_else(|| format!("{s:?} has no transport; {hint}"))?;
        match scheme {
            "tcp" => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(|| format!("{s:?} has no port; {hint}"))?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let port = port.parse::<u16>().ok().filter(|p| *p != 0);
                match port {
                    Some(port) if !host.is_empty() => Ok(LinkAddress::Tcp { host: host.to_string(), port }),
                    _ => Err(format!("{s:?}: give a host and a port in 1..=65535; {hint}")),
                }
            }
            "vsock" => {
                let (cid, port) = rest.split_once(':').ok_or_else(|| format!("{s:?} has no port; {hint}"))?;
                match (cid.parse::<u32>(), port.parse::<u32>()) {
                    (Ok(cid), Ok(port)) => Ok(LinkAddress::Vsock { cid, port }),
                    _ => Err(format!("{s:?}: CID and port must be numbers; {hint}")),
                }
            }
            "unix" => {
                let p = PathBuf::from(rest);
                if p.is_absolute() {
                    Ok(LinkAddress::Unix(p))
                } else {
                    Err(format!("{s:?}: the path must be absolute; {hint}"))
                }
            }
            other => Err(format!("unknown transport {other:?}; {hint}")),
        }
    }
}

impl fmt::Display for LinkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkAddress::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            LinkAddress::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            LinkAddress::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            LinkAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Serialize for LinkAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LinkAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Port of the agent API when `[api] listen` is not set.
pub const DEFAULT_API_PORT: u16 = 7701;

/// `[api]`: the agent's gRPC API (status, operator commands, events,
/// planned shutdown). See docs/api.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// Address and port the API listens on. Anything but a loopback address
    /// needs `[api.tls]` or `insecure = true`.
    #[serde(default = "default_api_listen")]
    #[schemars(with = "String", default = "default_api_listen_text")]
    pub listen: SocketAddr,
    /// TLS for the API listener (and for forwarding operator commands to peers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ApiTls>,
    /// Roles of clients by the common name (CN) of their verified client
    /// certificate: `roles = { "ops-alice" = ["operator"], "node-b" = ["peer"] }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub roles: BTreeMap<String, Vec<ApiRole>>,
    /// Roles of clients without a verified certificate. Default: every role
    /// without TLS (the listener is then loopback-only unless `insecure`), none with TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_roles: Option<Vec<ApiRole>>,
    /// Allow listening on a non-loopback address without TLS: anyone who can
    /// reach the port may then stop groups and shut the node down.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            listen: default_api_listen(),
            tls: None,
            roles: BTreeMap::new(),
            anonymous_roles: None,
            insecure: false,
        }
    }
}

fn default_api_listen() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_API_PORT)
}
fn default_api_listen_text() -> &'static str {
    "127.0.0.1:7701"
}

impl ApiSettings {
    fn is_default(&self) -> bool {
        *self == ApiSettings::default()
    }

    /// The roles of a client without a verified certificate (see `anonymous_roles`).
    pub fn effective_anonymous_roles(&self) -> Vec<ApiRole> {
        match (&self.anonymous_roles, &self.tls) {
            (Some(r), _) => r.clone(),
            (None, None) => ApiRole::ALL.to_vec(),
            (None, Some(_)) => Vec::new(),
        }
    }
}

/// `[api.tls]`: the API's certificate and the CA its clients' certificates chain to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiTls {
    /// PEM certificate chain of this agent. It also serves as the client
    /// certificate when this agent forwards commands to its peers.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA certificate(s) that client certificates must chain to. When set,
    /// clients may present a certificate and get the roles of its CN; peers'
    /// server certificates are verified against it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

/// What an API client may do. `operator` includes `viewer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ApiRole {
    /// Read status, follow events, health checks, reflection.
    Viewer,
    /// Start, stop, move and reset groups; suspend and resume monitoring.
    Operator,
    /// Another guest agent of the cluster: forwards operator commands.
    Peer,
    /// The host agent: planned shutdown of this node.
    Host,
}

impl ApiRole {
    /// Every role.
    pub const ALL: [ApiRole; 4] = [ApiRole::Viewer, ApiRole::Operator, ApiRole::Peer, ApiRole::Host];

    /// The name used in configuration files and messages.
    pub fn name(self) -> &'static str {
        match self {
            ApiRole::Viewer => "viewer",
            ApiRole::Operator => "operator",
            ApiRole::Peer => "peer",
            ApiRole::Host => "host",
        }
    }
}

impl fmt::Display for ApiRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `[[link]]`: one network heartbeats travel over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Unique link name; nodes give their address on it under `links`.
    pub name: String,
    /// UDP port heartbeats are sent to on this link.
    pub port: u16,
    /// How often each node sends a heartbeat on this link.
    #[serde(default = "default_heartbeat_interval", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_heartbeat_interval_text")]
    pub interval: Duration,
    /// A peer not heard on this link for this long is down on this link
    /// (at least twice `interval`).
    #[serde(default = "default_heartbeat_timeout", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_heartbeat_timeout_text")]
    pub timeout: Duration,
}

fn default_heartbeat_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_heartbeat_interval_text() -> &'static str {
    "1s"
}
fn default_heartbeat_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_heartbeat_timeout_text() -> &'static str {
    "5s"
}

/// `[[network]]` (host agents): a network VMs attach to, watched on every host. VMs are
/// matched to it by their domain XML's `<interface>`s: `<source bridge=…>` equal to
/// `bridge`, or `<source network=…>` equal to `libvirt_network`.
///
/// The network is healthy on a host while at least one of `interfaces` is up with a
/// carrier and, when `ping_targets` are given, at least one of them answers. A change
/// counts only once it has lasted `hold` (a flapping link is damped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Unique network name (shown in status and events).
    pub name: String,
    /// The host bridge VMs attach to (`<interface type='bridge'><source bridge='br0'/>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// The libvirt network VMs attach to (`<interface type='network'><source network='lan'/>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_network: Option<String>,
    /// The host interfaces that carry the network (NICs, bonds, the bridge itself), with the
    /// same names on every host. Absent: the bridge alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
    /// Addresses (`"ADDRESS:PORT"`, checked with a TCP connect: an answer or a refusal both
    /// count) that must be reachable for the network to count as working, e.g. its gateway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub ping_targets: Vec<std::net::SocketAddr>,
    /// How long a change of the network's state must last before it counts.
    #[serde(default = "default_network_hold", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_network_hold_text")]
    pub hold: Duration,
}

impl Network {
    /// The interfaces whose link state counts: `interfaces`, or the bridge alone.
    pub fn watched_interfaces(&self) -> Vec<String> {
        if self.interfaces.is_empty() { self.bridge.iter().cloned().collect() } else { self.interfaces.clone() }
    }
}

fn default_network_hold() -> Duration {
    Duration::from_secs(2)
}
fn default_network_hold_text() -> &'static str {
    "2s"
}

/// `[lease]`: the shared lease area that guards shared disks.
///
/// Unset timeouts are derived from `renewal_interval` in the proportions of
/// the lease library's defaults (I = 1.5R, K = 3.5R, M = R, T = 6.5R).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseSettings {
    /// Block device or file on shared storage holding the lease area.
    pub device: PathBuf,
    /// R: how often each node renews its host lease.
    #[serde(with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_renewal_text")]
    pub renewal_interval: Duration,
    /// I: a lease I/O not completed within this time counts as failed.
    #[serde(with = "duration")]
    #[schemars(with = "Option<DurationSchema>")]
    pub io_timeout: Duration,
    /// K: counted from the start of the last successful renewal; past it a
    /// node that could not renew treats its leases as lost and starts killing.
    #[serde(with = "duration")]
    #[schemars(with = "Option<DurationSchema>")]
    pub fence_deadline: Duration,
    /// M: time a node allows itself after K to finish killing what the lease guards.
    #[serde(with = "duration")]
    #[schemars(with = "Option<DurationSchema>")]
    pub kill_margin: Duration,
    /// T: a node whose host lease stays unchanged this long is dead and its
    /// groups may be taken over.
    #[serde(with = "duration")]
    #[schemars(with = "Option<DurationSchema>")]
    pub host_dead_timeout: Duration,
    /// A hardware watchdog device (`/dev/watchdog`) that the fencing guard keeps alive while
    /// the lease is renewed: it resets the machine by `K + M` when something survives the
    /// guard's SIGKILL or the guard cannot run. Needs `kill_margin` ≥ 2 s. Off by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog: Option<PathBuf>,
}

fn default_renewal_text() -> &'static str {
    "1s"
}

impl LeaseSettings {
    /// The timeouts in the lease library's form (validation guarantees
    /// whole milliseconds that pass [`tandem_lease::Timeouts::validate`]).
    pub fn timeouts(&self) -> tandem_lease::Timeouts {
        let ms = |d: Duration| d.as_millis() as u64;
        tandem_lease::Timeouts {
            renewal_ms: ms(self.renewal_interval),
            io_timeout_ms: ms(self.io_timeout),
            fence_ms: ms(self.fence_deadline),
            kill_margin_ms: ms(self.kill_margin),
            host_dead_ms: ms(self.host_dead_timeout),
        }
    }

    /// The self-fencing plan: the default graceful-stop period, and the watchdog if set.
    pub fn fence_plan(&self) -> Result<tandem_lease::fence::FencePlan, tandem_lease::fence::FenceError> {
        let timeouts = self.timeouts();
        let watchdog = self.watchdog.clone().map(|device| tandem_lease::fence::WatchdogConfig { device });
        tandem_lease::fence::FencePlan::new(
            timeouts,
            tandem_lease::fence::FencePlan::default_grace_ms(&timeouts),
            watchdog,
        )
    }
}

/// `[[group]]`: resources that start, stop, fail and move together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverGroup {
    /// Unique group name; also the name of its resource lease.
    pub name: String,
    /// Nodes the group may run on, most preferred first.
    pub nodes: Vec<String>,
    /// Whether the group moves back to a more preferred node when that node returns.
    #[serde(default)]
    pub failback: Failback,
    /// Start the group when the cluster forms.
    #[serde(default = "yes")]
    #[schemars(default = "yes")]
    pub autostart: bool,
    /// Restarts in place allowed within `restart_window` before the group fails over.
    #[serde(default = "default_restart_limit")]
    #[schemars(default = "default_restart_limit")]
    pub restart_limit: u32,
    /// Window over which restarts are counted.
    #[serde(default = "default_restart_window", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_restart_window_text")]
    pub restart_window: Duration,
    /// Failovers allowed within `failover_window` before `final_action`.
    #[serde(default = "default_failover_limit")]
    #[schemars(default = "default_failover_limit")]
    pub failover_limit: u32,
    /// Window over which failovers are counted.
    #[serde(default = "default_failover_window", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_failover_window_text")]
    pub failover_window: Duration,
    /// What to do when failovers are exhausted.
    #[serde(default)]
    pub final_action: FinalAction,
    /// Higher first: when groups compete for a node's capacity (after a host failure), the
    /// higher priority claims it first. Never stops a running group for another.
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub priority: i32,
    /// Affinity sets (`[a-z0-9-_]` names): the group prefers to start on a node running
    /// another group of one of these sets. A preference, never a reason to move.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinity: Vec<String>,
    /// Anti-affinity sets: the group never runs on a node where another group of one of
    /// these sets runs. A hard rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anti_affinity: Vec<String>,
    /// What the group takes of a node's `capacity` while it runs there. Absent: none for
    /// the guest agent; the host agent derives a VM group's demand from the VM's domain
    /// definition (memory, vCPUs) when this is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demand: Option<Capacity>,
    /// The group's resources (`[[group.resource]]`), started in dependency order.
    #[serde(rename = "resource", default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<Resource>,
    /// The group's monitors (`[[group.monitor]]`).
    #[serde(rename = "monitor", default, skip_serializing_if = "Vec::is_empty")]
    pub monitors: Vec<Monitor>,
}

fn yes() -> bool {
    true
}
fn is_zero_i32(n: &i32) -> bool {
    *n == 0
}
fn is_true(b: &bool) -> bool {
    *b
}
fn default_restart_limit() -> u32 {
    3
}
fn default_restart_window() -> Duration {
    Duration::from_secs(600)
}
fn default_restart_window_text() -> &'static str {
    "10m"
}
fn default_failover_limit() -> u32 {
    3
}
fn default_failover_window() -> Duration {
    Duration::from_secs(3600)
}
fn default_failover_window_text() -> &'static str {
    "1h"
}

impl FailoverGroup {
    /// Whether the group owns a lease-guarded shared disk.
    pub fn has_shared_disk(&self) -> bool {
        self.resources.iter().any(|r| matches!(r.kind, ResourceKind::Disk(_)))
    }

    /// The resource with this name.
    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.name == name)
    }
}

/// Whether a group returns to a more preferred node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Failback {
    /// Move back as soon as the more preferred node is up again.
    Auto,
    /// Stay until an operator moves the group (avoids moving twice per failure).
    #[default]
    Manual,
}

/// What happens to a group that exhausted its failovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FinalAction {
    /// Stop the group everywhere and leave it stopped for an operator.
    #[default]
    Stop,
    /// Leave the group where it is, failed, and only report.
    None,
}

/// `[[group.resource]]`: one thing a group starts and stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Resource {
    /// Name, unique within the group.
    pub name: String,
    /// Resources this one needs started first (and stopped after it). When
    /// the key is absent, the previous resource in the list; `[]` for none.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// What the resource is.
    #[serde(flatten)]
    pub kind: ResourceKind,
}

/// The kinds of resource (`kind = "…"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ResourceKind {
    /// A shared disk (or a directory on shared storage), exclusive to one node
    /// at a time under the group's resource lease.
    Disk(DiskResource),
    /// A floating IP address.
    Ip(IpResource),
    /// Programs that start, stop and check the application.
    Exec(ExecResource),
    /// An OCF resource agent (`resource-agents`).
    Ocf(OcfResource),
    /// A systemd unit.
    Systemd(SystemdResource),
    /// A virtual machine, run by tandem-host through its hypervisor.
    Vm(VmResource),
}

impl ResourceKind {
    /// The `kind` string.
    pub fn name(&self) -> &'static str {
        match self {
            ResourceKind::Disk(_) => "disk",
            ResourceKind::Ip(_) => "ip",
            ResourceKind::Exec(_) => "exec",
            ResourceKind::Ocf(_) => "ocf",
            ResourceKind::Systemd(_) => "systemd",
            ResourceKind::Vm(_) => "vm",
        }
    }
}

/// `kind = "disk"`: either `device` + `mountpoint` (mounted by the agent) or
/// `directory` (already mounted shared storage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskResource {
    /// Block device to mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<PathBuf>,
    /// Where to mount `device`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<PathBuf>,
    /// File system type of `device` (`mount -t`); detected when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fstype: Option<String>,
    /// Check `device` with `fsck -p` before mounting it.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    #[schemars(default = "yes")]
    pub fsck: bool,
    /// A directory on already-mounted shared storage, used instead of `device`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<PathBuf>,
}

/// `kind = "ip"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IpResource {
    /// Address and prefix length (`10.0.0.50/24`, `fd00::50/64`).
    #[schemars(with = "String")]
    pub address: IpPrefix,
    /// Network interface to add the address to.
    pub interface: String,
}

/// `kind = "exec"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecResource {
    /// How `start` relates to the running application.
    #[serde(default, skip_serializing_if = "ExecMode::is_default")]
    pub mode: ExecMode,
    /// Program and arguments that start the application.
    pub start: Vec<String>,
    /// Program and arguments that stop it. Required in `forking` mode; in
    /// `simple` mode, absent means "send SIGTERM to the service process".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Program and arguments that check it (exit 0 = running, 7 = stopped, as OCF).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub monitor: Vec<String>,
    /// Limit for `start`.
    #[serde(default = "default_start_timeout", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_op_timeout_text")]
    pub start_timeout: Duration,
    /// Limit for `stop`; after it the process group is killed.
    #[serde(default = "default_stop_timeout", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_op_timeout_text")]
    pub stop_timeout: Duration,
    /// Limit for `monitor`.
    #[serde(default = "default_monitor_timeout", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_monitor_timeout_text")]
    pub monitor_timeout: Duration,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// User to run as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// How an exec resource's `start` program relates to the application (like
/// systemd's `Type=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExecMode {
    /// `start` launches the application in the background and exits 0 once it
    /// runs (`pg_ctl -w start`); the application keeps running in the
    /// resource's cgroup.
    #[default]
    Forking,
    /// `start` is the application itself: the agent keeps it as a child, and
    /// its exit is a failure.
    Simple,
}

impl ExecMode {
    fn is_default(&self) -> bool {
        *self == ExecMode::Forking
    }
}

fn default_start_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_stop_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_op_timeout_text() -> &'static str {
    "60s"
}
fn default_monitor_timeout() -> Duration {
    Duration::from_secs(20)
}
fn default_monitor_timeout_text() -> &'static str {
    "20s"
}

/// `kind = "ocf"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OcfResource {
    /// Agent provider (`heartbeat`).
    pub provider: String,
    /// Agent name (`pgsql`, `IPaddr2`).
    pub agent: String,
    /// Parameters, passed as `OCF_RESKEY_<name>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    /// Limit for `start`; absent: the timeout the agent advertises in its meta-data, else
    /// 60 s.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<DurationSchema>")]
    pub start_timeout: Option<Duration>,
    /// Limit for `stop`; absent: the agent's advertised timeout, else 60 s.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<DurationSchema>")]
    pub stop_timeout: Option<Duration>,
    /// Limit for `monitor`; absent: the agent's advertised timeout, else 20 s.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<DurationSchema>")]
    pub monitor_timeout: Option<Duration>,
}

impl OcfResource {
    /// The limits used when neither the configuration nor the agent's meta-data gives one:
    /// start, stop, monitor.
    pub const DEFAULT_TIMEOUTS: [Duration; 3] =
        [Duration::from_secs(60), Duration::from_secs(60), Duration::from_secs(20)];
}

/// `kind = "vm"`: an HA virtual machine. The cluster keeps its domain XML so that any
/// eligible host can define and start it; the host agent defines it where it starts and
/// undefines it where it stops, so a VM is defined only where it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmResource {
    /// The libvirt domain XML file (absolute path; the same content on every host). It must
    /// carry a `<uuid>`: the UUID identifies the VM on every host.
    pub domain: PathBuf,
    /// Limit for starting the domain (define + start until it runs).
    #[serde(default = "default_vm_start_timeout", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_vm_start_timeout_text")]
    pub start_timeout: Duration,
    /// How long a clean ACPI shutdown may take before the domain is destroyed (and the
    /// agent says so).
    #[serde(default = "default_vm_shutdown_timeout", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_vm_shutdown_timeout_text")]
    pub shutdown_timeout: Duration,
    /// Before a planned stop (operator stop or move, host maintenance), how long the VM's
    /// linked guest agent may take to stop or move its application groups; the VM is shut
    /// down when it reports ready or when this has passed (and the agent says which).
    #[serde(default = "default_vm_prepare_timeout", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_vm_prepare_timeout_text")]
    pub prepare_timeout: Duration,
    /// File holding the key the VM's guest agent proves itself with over the host–guest
    /// link (at least 16 characters; the same file content as the guest's `[host_link]
    /// key_file`). Absent: the VM has no guest link and any guest claiming it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_key_file: Option<PathBuf>,
    /// The guest cluster the VM's guest agent belongs to: VMs of the same guest cluster may
    /// ask the host cluster to fence one another. Absent: the guest may fence no VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cluster: Option<String>,
    /// Base path of the VM's userspace vsock Unix socket (vhost-device-vsock `uds-path`,
    /// Firecracker `uds_path`): the host agent listens on `<vsock_uds>_<[guest_link]
    /// vsock_port>` for this VM's guest, and a link there may only claim this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_uds: Option<PathBuf>,
    /// Reset the VM (report its resource failed, so the group's recovery policy restarts
    /// it) when its linked guest's heartbeats stop this long while it runs. Absent:
    /// heartbeats are only reported. A guest that never linked since the VM started does
    /// not trigger it.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<DurationSchema>")]
    pub guest_heartbeat_timeout: Option<Duration>,
}

fn default_vm_prepare_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_vm_prepare_timeout_text() -> &'static str {
    "120s"
}

fn default_vm_start_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_vm_start_timeout_text() -> &'static str {
    "60s"
}
fn default_vm_shutdown_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_vm_shutdown_timeout_text() -> &'static str {
    "120s"
}

/// `kind = "systemd"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SystemdResource {
    /// Unit name (`postgresql@15-main.service`).
    pub unit: String,
    /// Limit for starting the unit.
    #[serde(default = "default_start_timeout", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_op_timeout_text")]
    pub start_timeout: Duration,
    /// Limit for stopping the unit.
    #[serde(default = "default_stop_timeout", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_op_timeout_text")]
    pub stop_timeout: Duration,
}

/// An IP address with a prefix length (`10.0.0.50/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length (0..=32 for IPv4, 0..=128 for IPv6).
    pub prefix_len: u8,
}

impl FromStr for IpPrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').ok_or_else(|| {
            format!("{s:?} has no prefix length; write ADDRESS/PREFIX such as 10.0.0.50/24 or fd00::50/64")
        })?;
        let addr: IpAddr = a.parse().map_err(|_| format!("{a:?} is not an IPv4 or IPv6 address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = p
            .parse::<u8>()
            .ok()
            .filter(|n| *n <= max && !p.starts_with('+'))
            .ok_or_else(|| format!("prefix length {p:?} is not a number in 0..={max}"))?;
        Ok(IpPrefix { addr, prefix_len })
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Serialize for IpPrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpPrefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `[[group.monitor]]`: a probe run periodically against the group's application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Monitor {
    /// Name, unique within the group.
    pub name: String,
    /// What to probe, exactly as `tandemctl probe` takes it: a URL
    /// (`postgresql://…`, `http://…`, `tcp://…`), `exec` or `ocf:PROVIDER:AGENT`.
    pub target: String,
    /// Program and arguments, for `target = "exec"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// OCF parameters (without `OCF_RESKEY_`), for `ocf:` targets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    /// Probe options (see docs/monitors.md); numbers and booleans are accepted
    /// and passed on as text.
    #[serde(default, deserialize_with = "option_values", skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(with = "BTreeMap<String, OptionValueSchema>")]
    pub options: BTreeMap<String, String>,
    /// Time between probes.
    #[serde(default = "default_monitor_interval", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_monitor_interval_text")]
    pub interval: Duration,
    /// Hard deadline of one probe.
    #[serde(default = "default_probe_timeout", with = "duration")]
    #[schemars(with = "DurationSchema", default = "default_probe_timeout_text")]
    pub timeout: Duration,
    /// A success slower than this is reported as a warning.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<DurationSchema>")]
    pub warning: Option<Duration>,
    /// Consecutive failed probes tolerated before the failure counts.
    #[serde(default = "default_retries")]
    #[schemars(default = "default_retries")]
    pub retries: u32,
    /// Restarts in place allowed for the failures this monitor confirms, within
    /// `restart_window`, counted apart from the group's; one more fails the group over.
    /// Absent (and `restart_window` absent): this monitor's failures count against the
    /// group's `restart_limit`. With only `restart_window` given: the group's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_limit: Option<u32>,
    /// Window for this monitor's `restart_limit`; absent: the group's `restart_window`.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<DurationSchema>")]
    pub restart_window: Option<Duration>,
    /// Read the probe's password from the first line of this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Read the probe's password from this environment variable of the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// The resource this monitor watches; a failure restarts it (and what
    /// depends on it). Absent: the monitor watches the whole group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
}

fn default_monitor_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_monitor_interval_text() -> &'static str {
    "10s"
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_probe_timeout_text() -> &'static str {
    "5s"
}
fn default_retries() -> u32 {
    2
}

impl Monitor {
    /// Where the password comes from, if the monitor logs in.
    pub fn password_source(&self) -> Option<SecretSource> {
        match (&self.password_file, &self.password_env) {
            (Some(f), _) => Some(SecretSource::File(f.clone())),
            (None, Some(v)) => Some(SecretSource::Env(v.clone())),
            (None, None) => None,
        }
    }

    /// The probe this monitor runs, in the form `tandem_monitors::build_probe` takes.
    pub fn probe_spec(&self) -> ProbeSpec {
        ProbeSpec {
            target: self.target.clone(),
            args: self.command.clone(),
            params: self.params.clone(),
            options: self.options.clone(),
            limits: RunLimits { timeout: self.timeout, warning: self.warning },
            password: self.password_source(),
        }
    }
}

/// A probe option value: text, number or boolean (all passed on as text).
#[derive(Debug)]
pub struct OptionValueSchema;

impl JsonSchema for OptionValueSchema {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ProbeOptionValue".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": ["string", "number", "boolean"] })
    }
}

fn option_values<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Int(i64),
        Float(f64),
        Bool(bool),
    }
    let raw = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                Scalar::Text(s) => s,
                Scalar::Int(i) => i.to_string(),
                Scalar::Float(f) => f.to_string(),
                Scalar::Bool(b) => b.to_string(),
            };
            (k, text)
        })
        .collect())
}
