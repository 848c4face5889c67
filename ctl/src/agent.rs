//! The verbs that talk to an agent over its gRPC API: `status`, `group`,
//! `monitor`, `events`, `shutdown-prepare` (docs/api.md), which both agents
//! serve, and the host agent's `hosts`, `vms`, `vm`, `domains`
//! (docs/host-agent.md).
//!
//! Exit status: 0 ok, 1 rejected by the agent (or not safe to power off),
//! 64 usage error, 69 agent unreachable (or stopped answering).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use tandem_proto::v1 as pb;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use pb::guest_agent_client::GuestAgentClient;
use pb::host_agent_client::HostAgentClient;

use crate::render;

/// Success.
pub const EXIT_OK: u8 = 0;
/// The agent answered with an error (not found, not permitted, not possible now).
pub const EXIT_REJECTED: u8 = 1;
/// Bad arguments (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// The agent could not be reached or stopped answering (EX_UNAVAILABLE).
pub const EXIT_UNREACHABLE: u8 = 69;

/// The default API endpoint (the agent's default `[api] listen`).
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7701";

/// How to reach the agent; global options of every API verb.
#[derive(Debug, Args)]
pub struct Connection {
    /// The agent's API: http://HOST:PORT, or https://HOST:PORT with --ca.
    #[arg(long, global = true, env = "TANDEM_ENDPOINT", default_value = DEFAULT_ENDPOINT, value_name = "URL")]
    endpoint: String,
    /// CA certificate (PEM) that signed the agent's certificate (https endpoints).
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; its CN gives the roles.
    #[arg(long, global = true, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, global = true, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Give up connecting after this many seconds.
    #[arg(long, global = true, default_value_t = 5.0, value_name = "SECONDS")]
    connect_timeout: f64,
    /// Give up on a call (or the start of a stream) after this many seconds.
    #[arg(long, global = true, default_value_t = 30.0, value_name = "SECONDS")]
    timeout: f64,
}

/// `tandemctl group …`.
#[derive(Debug, Subcommand)]
pub enum GroupVerb {
    /// Run the group on its best node (clears a move pin).
    Start {
        /// The group.
        group: String,
    },
    /// Stop the group everywhere.
    Stop {
        /// The group.
        group: String,
    },
    /// Run the group on another node and pin it there.
    Move {
        /// The group.
        group: String,
        /// The target node. Without it, the agent picks the best other eligible node by the
        /// group's placement (up, not in standby, room for it, nodes that failed it last, then
        /// the group's node order), and refuses, saying why, when there is none.
        #[arg(long, value_name = "NODE")]
        to: Option<String>,
    },
    /// Clear the group's restart and failover counters and failure marks.
    Reset {
        /// The group.
        group: String,
    },
}

/// A standby mode on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StandbyModeArg {
    /// Stop the node's groups and let the other nodes take them over.
    Move,
    /// Stop the node's groups and keep them stopped until the node is online again.
    Park,
}

/// `tandemctl node …`. Only the named node's own agent accepts the change: point
/// --endpoint at it.
#[derive(Debug, Subcommand)]
pub enum NodeVerb {
    /// Planned maintenance: stop every group on NODE and move (or park) it, start none
    /// there. Not a failure; persisted across agent restarts.
    Standby {
        /// The node (the one --endpoint reaches).
        node: String,
        /// What happens to its groups.
        #[arg(long, value_enum)]
        mode: StandbyModeArg,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// End the maintenance of NODE: it takes groups again (groups return per their failback
    /// policy; parked groups start again).
    Online {
        /// The node (the one --endpoint reaches).
        node: String,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// `tandemctl monitor …`.
#[derive(Debug, Subcommand)]
pub enum MonitorVerb {
    /// Ignore the group's monitor failures on this node (application maintenance).
    Suspend {
        /// The group.
        group: String,
    },
    /// Act on the group's monitor failures again.
    Resume {
        /// The group.
        group: String,
    },
}

/// `tandemctl vm …` (host agent).
#[derive(Debug, Subcommand)]
pub enum VmVerb {
    /// Run the VM on its best host (clears a move pin).
    Start {
        /// The VM (its name in the cluster, or its domain name).
        vm: String,
    },
    /// Stop the VM everywhere.
    Stop {
        /// The VM (its name in the cluster, or its domain name).
        vm: String,
    },
    /// Run the VM on another host and pin it there.
    Move {
        /// The VM (its name in the cluster, or its domain name).
        vm: String,
        /// The target host.
        #[arg(long, value_name = "HOST")]
        to: String,
    },
    /// Write the guest's memory to FILE on the host and stop it as crashed, for diagnosing
    /// a hung guest; the cluster then recovers it like any crash. Ask the agent of the host
    /// that runs the VM; raise --timeout for a large guest (the host keeps writing).
    Dump {
        /// The VM (its name in the cluster, or its domain name).
        vm: String,
        /// Absolute path of the dump file on the host that runs the VM.
        #[arg(long, value_name = "FILE")]
        path: String,
    },
    /// Pause the VM's vCPUs (its memory is kept). A paused VM is not treated as failed and
    /// is started nowhere else. Ask the agent of the host that runs the VM.
    Suspend {
        /// The VM (its name in the cluster, or its domain name).
        vm: String,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Let a paused VM run again. Ask the agent of the host that runs the VM.
    Resume {
        /// The VM (its name in the cluster, or its domain name).
        vm: String,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `tandemctl maintenance …`.
#[derive(Debug, clap::Subcommand)]
pub enum MaintenanceVerb {
    /// Put HOST in maintenance: it takes no VM any more; its VMs' guest agents move or stop
    /// their groups, then the VMs shut down and, per policy, start on other hosts.
    Enter {
        /// The host (its node name).
        host: String,
        /// failover: move every VM to another host; shutdown: keep them stopped until
        /// maintenance ends; migrate: live-migrate each VM to the host that takes it
        /// (where the hypervisor cannot, it moves like failover, and says so).
        #[arg(long, default_value = "failover", value_parser = ["failover", "shutdown", "migrate"])]
        policy: String,
        /// How many VMs leave at once (default 4).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
        parallel: u32,
        /// Follow the progress until the host holds no HA VM (else return once accepted).
        #[arg(long)]
        wait: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// End HOST's maintenance: it takes VMs again; VMs it parked start again, VMs moved
    /// away return per their failback policy.
    Exit {
        /// The host (its node name).
        host: String,
        /// Follow the progress until every parked VM runs again.
        #[arg(long)]
        wait: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

/// An API verb with its options.
#[derive(Debug)]
pub enum Verb {
    /// `status [--json]`.
    Status {
        /// JSON instead of tables.
        json: bool,
    },
    /// `group …`.
    Group(GroupVerb),
    /// `monitor …`.
    Monitor(MonitorVerb),
    /// `node …`.
    Node(NodeVerb),
    /// `events [--json]`.
    Events {
        /// One JSON object per line.
        json: bool,
    },
    /// `shutdown-prepare [--json]`.
    ShutdownPrepare {
        /// One JSON object per line.
        json: bool,
    },
    /// `hosts [--json]` (host agent).
    Hosts {
        /// JSON instead of a table.
        json: bool,
    },
    /// `vms [--json]` (host agent).
    Vms {
        /// JSON instead of a table.
        json: bool,
    },
    /// `vm …` (host agent).
    Vm(VmVerb),
    /// `domains [--json]` (host agent).
    Domains {
        /// JSON instead of a table.
        json: bool,
    },
    /// `maintenance …` (host agent).
    Maintenance(MaintenanceVerb),
}

/// A failure with its exit code; the message goes to stderr.
struct Failure {
    code: u8,
    message: String,
}

fn usage(message: impl Into<String>) -> Failure {
    Failure { code: EXIT_USAGE, message: message.into() }
}

fn secs(name: &str, v: f64) -> Result<Duration, Failure> {
    if v.is_finite() && v > 0.0 && v <= 86_400.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(usage(format!("--{name} must be a number of seconds in (0, 86400], got {v}")))
    }
}

/// The innermost cause of an error: for a transport failure, what the OS or TLS said.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let text = cur.to_string();
    // "Connection refused (os error 111)" -> "connection refused"
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

struct Agent {
    client: GuestAgentClient<Channel>,
    host: HostAgentClient<Channel>,
    channel: Channel,
    url: String,
    timeout: Duration,
    plaintext: bool,
}

impl Agent {
    async fn connect(conn: &Connection) -> Result<Agent, Failure> {
        let connect_timeout = secs("connect-timeout", conn.connect_timeout)?;
        let timeout = secs("timeout", conn.timeout)?;
        let url = conn.endpoint.trim_end_matches('/').to_string();
        let https = match url.split_once("://").map(|(s, _)| s) {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(usage(format!("--endpoint {url:?}: write http://HOST:PORT or https://HOST:PORT"))),
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| usage(format!("--endpoint {url:?} is not a valid URL: {}", root_cause(&e))))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true);
        if https {
            let ca = conn.ca.as_ref().ok_or_else(|| {
                usage(format!("{url} uses TLS: give the CA certificate that signed the agent's certificate with --ca"))
            })?;
            let read = |p: &PathBuf, what: &str| {
                std::fs::read(p).map_err(|e| usage(format!("cannot read {what} {}: {e}", p.display())))
            };
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "the CA certificate")?));
            if let (Some(cert), Some(key)) = (&conn.cert, &conn.key) {
                tls = tls
                    .identity(Identity::from_pem(read(cert, "the client certificate")?, read(key, "the client key")?));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| usage(format!("unusable TLS files for {url}: {}", root_cause(&e))))?;
        } else if conn.ca.is_some() || conn.cert.is_some() {
            return Err(usage(format!("--ca/--cert/--key need an https:// endpoint, not {url}")));
        }
        // `connect_timeout` bounds the TCP connect; the outer bound also covers the TLS handshake.
        let channel = match tokio::time::timeout(connect_timeout + Duration::from_millis(500), endpoint.connect()).await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(Failure {
                    code: EXIT_UNREACHABLE,
                    message: format!("cannot reach the agent at {url}: {}", root_cause(&e)),
                });
            }
            Err(_) => {
                return Err(Failure {
                    code: EXIT_UNREACHABLE,
                    message: format!(
                        "cannot reach the agent at {url}: no connection within {:.1} s",
                        connect_timeout.as_secs_f64()
                    ),
                });
            }
        };
        Ok(Agent {
            client: GuestAgentClient::new(channel.clone()),
            host: HostAgentClient::new(channel.clone()),
            channel,
            url,
            timeout,
            plaintext: !https,
        })
    }

    /// What a failed call means for the user, and its exit code.
    fn failure(&self, status: tonic::Status) -> Failure {
        let transport = std::error::Error::source(&status).map(root_cause);
        if status.message().contains("grpc-status header missing") {
            // An HTTP server answered, but not a gRPC one.
            return Failure {
                code: EXIT_UNREACHABLE,
                message: format!("{} answered, but it is not a Tandem agent ({})", self.url, status.message()),
            };
        }
        match (status.code(), transport) {
            (_, Some(cause)) => {
                let hint =
                    if self.plaintext { " (if the agent uses TLS, use an https:// endpoint with --ca)" } else { "" };
                Failure { code: EXIT_UNREACHABLE, message: format!("lost the agent at {}: {cause}{hint}", self.url) }
            }
            (Code::Unavailable, None) => Failure {
                code: EXIT_UNREACHABLE,
                message: format!("the agent at {} is unavailable: {}", self.url, status.message()),
            },
            (code, None) => Failure {
                code: EXIT_REJECTED,
                message: format!("the agent refused ({}): {}", code_name(code), status.message()),
            },
        }
    }

    /// Runs one call under the call timeout.
    async fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(self.failure(status)),
            Err(_) => Err(Failure {
                code: EXIT_UNREACHABLE,
                message: format!("the agent at {} did not answer within {:.1} s", self.url, self.timeout.as_secs_f64()),
            }),
        }
    }
}

impl Agent {
    /// Runs one call of the host API under the call timeout; an agent without it (a guest
    /// agent) is told apart from other refusals.
    async fn host_call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Err(status)) if status.code() == Code::Unimplemented => Err(Failure {
                code: EXIT_REJECTED,
                message: format!(
                    "the agent at {} does not serve the host API (tandem.v1.HostAgent): is it a guest agent? \
                     `tandemctl status` works with both",
                    self.url
                ),
            }),
            Ok(r) => self.call(async { r }).await,
            Err(_) => Err(Failure {
                code: EXIT_UNREACHABLE,
                message: format!("the agent at {} did not answer within {:.1} s", self.url, self.timeout.as_secs_f64()),
            }),
        }
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::NotFound => "not found",
        Code::InvalidArgument => "invalid argument",
        Code::PermissionDenied => "permission denied",
        Code::FailedPrecondition => "not possible now",
        Code::Unauthenticated => "unauthenticated",
        Code::Unimplemented => "not supported by this agent",
        Code::Internal => "internal error",
        _ => "error",
    }
}

/// Runs an API verb and returns its exit code.
pub fn run(conn: Connection, verb: Verb) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tandemctl: cannot start the async runtime: {e}");
            return ExitCode::from(70);
        }
    };
    match rt.block_on(run_async(&conn, verb)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("tandemctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn run_async(conn: &Connection, verb: Verb) -> Result<u8, Failure> {
    let mut agent = Agent::connect(conn).await?;
    match verb {
        Verb::Status { json } => {
            let mut c = agent.client.clone();
            let status = agent.call(c.get_status(pb::GetStatusRequest {})).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&render::status_json(&status)).expect("JSON"));
            } else {
                print!("{}", render::status_text(&status));
            }
            Ok(EXIT_OK)
        }
        Verb::Group(g) => {
            let mut c = agent.client.clone();
            let (what, ack) = match g {
                GroupVerb::Start { group } => {
                    (format!("start of group {group}"), agent.call(c.start_group(pb::GroupRequest { group })).await?)
                }
                GroupVerb::Stop { group } => {
                    (format!("stop of group {group}"), agent.call(c.stop_group(pb::GroupRequest { group })).await?)
                }
                GroupVerb::Move { group, to } => (
                    match &to {
                        Some(to) => format!("move of group {group} to {to}"),
                        None => format!("move of group {group} to its best other node"),
                    },
                    agent.call(c.move_group(pb::MoveGroupRequest { group, to: to.unwrap_or_default() })).await?,
                ),
                GroupVerb::Reset { group } => (
                    format!("reset of group {group}'s counters"),
                    agent.call(c.reset_group(pb::GroupRequest { group })).await?,
                ),
            };
            println!("accepted: {what} (command #{}); `tandemctl events` shows it happen", ack.seq);
            Ok(EXIT_OK)
        }
        Verb::Monitor(m) => {
            let mut c = agent.client.clone();
            let (what, ack) = match m {
                MonitorVerb::Suspend { group } => (
                    format!("monitoring of group {group} suspended"),
                    agent.call(c.suspend_monitoring(pb::GroupRequest { group })).await?,
                ),
                MonitorVerb::Resume { group } => (
                    format!("monitoring of group {group} resumed"),
                    agent.call(c.resume_monitoring(pb::GroupRequest { group })).await?,
                ),
            };
            println!("accepted: {what} (command #{})", ack.seq);
            Ok(EXIT_OK)
        }
        Verb::Node(n) => {
            let mut c = agent.client.clone();
            let (node, standby, mode, json) = match n {
                NodeVerb::Standby { node, mode, json } => {
                    let mode = match mode {
                        StandbyModeArg::Move => pb::StandbyMode::Move,
                        StandbyModeArg::Park => pb::StandbyMode::Park,
                    };
                    (node, true, mode, json)
                }
                NodeVerb::Online { node, json } => (node, false, pb::StandbyMode::Unspecified, json),
            };
            let req = pb::SetStandbyRequest { node, standby, mode: mode as i32 };
            let done = agent.call(c.set_standby(req)).await?;
            if json {
                let mode = standby.then(|| render::standby_mode(mode as i32));
                println!("{}", serde_json::json!({ "node": done.node, "standby": standby, "mode": mode }));
            } else if standby {
                println!(
                    "{} is in standby ({}): its groups are stopping; `tandemctl status` shows where they go",
                    done.node,
                    render::standby_mode(mode as i32)
                );
            } else {
                println!("{} is online: it takes groups again", done.node);
            }
            Ok(EXIT_OK)
        }
        Verb::Events { json } => {
            let mut c = agent.client.clone();
            // Registered before anything is printed, so a Ctrl-C is never the default (killing) one.
            let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .map_err(|e| Failure { code: 70, message: format!("cannot handle Ctrl-C: {e}") })?;
            let mut stream = agent.call(c.watch_events(pb::WatchEventsRequest {})).await?;
            loop {
                let next = tokio::select! {
                    m = stream.message() => m,
                    _ = interrupt.recv() => return Ok(EXIT_OK),
                };
                match next {
                    Ok(Some(event)) => {
                        if json {
                            println!("{}", render::event_json(&event));
                        } else {
                            println!("{}", render::event_text(&event));
                        }
                    }
                    Ok(None) => {
                        return Err(Failure {
                            code: EXIT_UNREACHABLE,
                            message: format!("the agent at {} ended the event stream", agent.url),
                        });
                    }
                    Err(status) => return Err(agent.failure(status)),
                }
            }
        }
        Verb::Hosts { json } | Verb::Vms { json } => {
            let hosts = matches!(verb, Verb::Hosts { .. });
            let mut c = agent.host.clone();
            let status = agent.host_call(c.get_cluster_status(pb::GetClusterStatusRequest {})).await?;
            let text = match (hosts, json) {
                (true, true) => {
                    format!("{}\n", serde_json::to_string_pretty(&render::hosts_json(&status)).expect("JSON"))
                }
                (true, false) => render::hosts_text(&status),
                (false, true) => {
                    format!("{}\n", serde_json::to_string_pretty(&render::vms_json(&status)).expect("JSON"))
                }
                (false, false) => render::vms_text(&status),
            };
            print!("{text}");
            Ok(EXIT_OK)
        }
        Verb::Vm(v) => {
            let mut c = agent.host.clone();
            let (what, ack) = match v {
                VmVerb::Dump { vm, path } => {
                    let done = agent.host_call(c.dump_vm(pb::DumpVmRequest { vm: vm.clone(), path })).await?;
                    println!(
                        "dumped: VM {vm} (domain {}) on {} to {}; it stopped as crashed and the cluster recovers \
                         it (`tandemctl vms` shows where)",
                        done.domain, done.host, done.path
                    );
                    return Ok(EXIT_OK);
                }
                VmVerb::Suspend { vm, json } => {
                    let done = agent.host_call(c.suspend_vm(pb::VmRequest { vm: vm.clone() })).await?;
                    println!("{}", render::vm_pause(&vm, true, &done, json));
                    return Ok(EXIT_OK);
                }
                VmVerb::Resume { vm, json } => {
                    let done = agent.host_call(c.resume_vm(pb::VmRequest { vm: vm.clone() })).await?;
                    println!("{}", render::vm_pause(&vm, false, &done, json));
                    return Ok(EXIT_OK);
                }
                VmVerb::Start { vm } => {
                    (format!("start of VM {vm}"), agent.host_call(c.start_vm(pb::VmRequest { vm })).await?)
                }
                VmVerb::Stop { vm } => {
                    (format!("stop of VM {vm}"), agent.host_call(c.stop_vm(pb::VmRequest { vm })).await?)
                }
                VmVerb::Move { vm, to } => (
                    format!("move of VM {vm} to {to}"),
                    agent.host_call(c.move_vm(pb::MoveVmRequest { vm, to_host: to })).await?,
                ),
            };
            println!("accepted: {what} (command #{}); `tandemctl events` shows it happen", ack.seq);
            Ok(EXIT_OK)
        }
        Verb::Domains { json } => {
            let mut c = agent.host.clone();
            let list = agent.host_call(c.list_domains(pb::ListDomainsRequest {})).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&render::domains_json(&list)).expect("JSON"));
            } else {
                print!("{}", render::domains_text(&list));
            }
            Ok(EXIT_OK)
        }
        Verb::Maintenance(m) => {
            let (req, enter, wait, json) = match m {
                MaintenanceVerb::Enter { host, policy, parallel, wait, json } => {
                    let policy = match policy.as_str() {
                        "shutdown" => pb::MaintenancePolicy::Shutdown,
                        "migrate" => pb::MaintenancePolicy::Migrate,
                        _ => pb::MaintenancePolicy::Failover,
                    };
                    (pb::MaintenanceRequest { host, policy: policy as i32, parallel }, true, wait, json)
                }
                MaintenanceVerb::Exit { host, wait, json } => {
                    (pb::MaintenanceRequest { host, policy: 0, parallel: 0 }, false, wait, json)
                }
            };
            let host = req.host.clone();
            let mut c = pb::host_maintenance_client::HostMaintenanceClient::new(agent.channel.clone());
            let mut stream = if enter {
                agent.host_call(c.enter_maintenance(req)).await?
            } else {
                agent.host_call(c.exit_maintenance(req)).await?
            };
            if !wait {
                let what = if enter { "entered maintenance" } else { "left maintenance" };
                if json {
                    println!("{}", serde_json::json!({ "host": host, "accepted": what }));
                } else {
                    println!(
                        "accepted: host {host} {what}; `tandemctl maintenance {} {host} --wait` follows the progress",
                        if enter { "enter" } else { "exit" }
                    );
                }
                return Ok(EXIT_OK);
            }
            loop {
                match stream.message().await {
                    Ok(Some(p)) => {
                        if json {
                            println!("{}", render::maintenance_json(&p));
                        } else {
                            println!("{}", render::maintenance_text(&p));
                        }
                        if let Some(pb::maintenance_progress::Progress::Done(d)) = p.progress {
                            return Ok(if d.complete { EXIT_OK } else { EXIT_REJECTED });
                        }
                    }
                    Ok(None) => {
                        return Err(Failure {
                            code: EXIT_UNREACHABLE,
                            message: format!(
                                "the agent at {} ended the maintenance stream without a verdict; `tandemctl vms` \
                                 shows where the VMs are (the maintenance itself goes on)",
                                agent.url
                            ),
                        });
                    }
                    Err(status) => return Err(agent.failure(status)),
                }
            }
        }
        Verb::ShutdownPrepare { json } => {
            let c = &mut agent.client;
            let fut = c.prepare_shutdown(pb::PrepareShutdownRequest {});
            let started = tokio::time::timeout(agent.timeout, fut).await;
            let mut stream = match started {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(status)) => return Err(agent.failure(status)),
                Err(_) => {
                    return Err(Failure {
                        code: EXIT_UNREACHABLE,
                        message: format!("the agent at {} did not start the shutdown in time", agent.url),
                    });
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(p)) => {
                        if json {
                            println!("{}", render::progress_json(&p));
                        } else {
                            println!("{}", render::progress_text(&p));
                        }
                        if let Some(pb::shutdown_progress::Progress::Done(d)) = p.progress {
                            return Ok(if d.safe_to_power_off { EXIT_OK } else { EXIT_REJECTED });
                        }
                    }
                    Ok(None) => {
                        return Err(Failure {
                            code: EXIT_UNREACHABLE,
                            message: format!(
                                "the agent at {} ended the shutdown stream without saying whether the node is safe \
                                 to power off; do not power it off before `tandemctl status` shows no group here",
                                agent.url
                            ),
                        });
                    }
                    Err(status) => return Err(agent.failure(status)),
                }
            }
        }
    }
}
