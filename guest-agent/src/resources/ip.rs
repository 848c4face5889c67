//! `kind = "ip"`: a floating IP address on an interface.
//!
//! Start refuses an address that already answers on the network:
//! * IPv4: duplicate address detection with `arping -D` (RFC 5227 probes
//!   from 0.0.0.0) before the address is added; after adding it, unsolicited
//!   ARP (`arping -U`) so that neighbours and switches update their caches.
//! * IPv6: the kernel's own duplicate address detection (RFC 4862): the
//!   address is added, start waits until it is no longer tentative, and a
//!   `dadfailed` address is removed again and the start refused. Neighbours
//!   learn the address through the kernel's neighbour discovery; set
//!   `net.ipv6.conf.<if>.ndisc_notify = 1` for unsolicited advertisements.
//!
//! `check` is "the address is on the interface" (`ip -j addr show`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use tandem_config::IpResource as IpConfig;
use tandem_monitors::exec::{CommandSpec, RunOutput, resolve_program, run_command};
use tokio::time::Instant;

use super::process::{Placement, describe_exit, run_failed};
use super::{BoxFuture, Health, Resource, ResourceEnv, ResourceError, StartContext};

const SBIN: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// An `ip` resource.
#[derive(Debug)]
pub struct IpResource {
    id: String,
    cfg: IpConfig,
    ip: PathBuf,
    arping: Option<PathBuf>,
    timeout: Duration,
    place: Placement,
}

/// The address as the interface has it.
#[derive(Debug, PartialEq, Eq)]
enum Present {
    No,
    Yes { prefix_len: u8, tentative: bool, dadfailed: bool },
}

impl IpResource {
    /// Finds `ip` (and `arping` for IPv4).
    pub fn build(group: &str, name: &str, cfg: &IpConfig, env: &ResourceEnv) -> Result<Self, ResourceError> {
        let id = format!("{group}/{name}");
        let iface = &cfg.interface;
        if iface.is_empty() || iface.len() > 15 || iface.contains(['/', ' ', '\0']) {
            return Err(ResourceError::config(&id, format!("{iface:?} is not an interface name")));
        }
        let ip = resolve_program("ip", SBIN)
            .filter(|p| p.is_file())
            .ok_or_else(|| ResourceError::config(&id, "`ip` not found: install the Debian package iproute2"))?;
        let arping = match cfg.address.addr {
            IpAddr::V4(_) => Some(resolve_program("arping", SBIN).filter(|p| p.is_file()).ok_or_else(|| {
                ResourceError::config(
                    &id,
                    "`arping` not found (needed for duplicate detection and gratuitous ARP): install the Debian \
                     package iputils-arping",
                )
            })?),
            IpAddr::V6(_) => None,
        };
        Ok(Self {
            id,
            cfg: cfg.clone(),
            ip,
            arping,
            timeout: env.ip_timeout,
            place: Placement::new(env.cgroup.as_deref(), name, None),
        })
    }

    async fn run(&self, op: &'static str, program: &PathBuf, args: &[&str]) -> Result<RunOutput, ResourceError> {
        self.place.create(&self.id, op)?;
        let mut spec = CommandSpec::new(program).args(args.iter().copied()).timeout(self.timeout);
        spec.child_setup = self.place.ops_setup();
        let out = run_command(&spec).await.map_err(|e| run_failed(op, &self.id, &e));
        self.place.kill_ops(&self.id).await;
        let out = out?;
        if out.timed_out {
            return Err(ResourceError::failed(
                op,
                &self.id,
                format!(
                    "{} {} did not finish within {} ms",
                    program.display(),
                    args.join(" "),
                    self.timeout.as_millis()
                ),
            ));
        }
        Ok(out)
    }

    /// Looks the address up on the interface.
    async fn present(&self, op: &'static str) -> Result<Present, ResourceError> {
        let out = self.run(op, &self.ip, &["-j", "addr", "show", "dev", &self.cfg.interface]).await?;
        if out.exit_code() != Some(0) {
            return Err(ResourceError::failed(
                op,
                &self.id,
                format!("interface {}: {}", self.cfg.interface, describe_exit(&out)),
            ));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| ResourceError::failed(op, &self.id, format!("cannot parse `ip -j addr show` output: {e}")))?;
        let want = self.cfg.address.addr;
        for a in v.as_array().into_iter().flatten().filter_map(|l| l["addr_info"].as_array()).flatten() {
            let local = a["local"].as_str().and_then(|s| s.parse::<IpAddr>().ok());
            if local == Some(want) {
                return Ok(Present::Yes {
                    prefix_len: a["prefixlen"].as_u64().unwrap_or(0) as u8,
                    tentative: a["tentative"].as_bool().unwrap_or(false),
                    dadfailed: a["dadfailed"].as_bool().unwrap_or(false),
                });
            }
        }
        Ok(Present::No)
    }

    fn addr(&self) -> String {
        self.cfg.address.addr.to_string()
    }

    /// IPv4 duplicate address detection: does anyone answer ARP for the address?
    async fn ipv4_duplicate(&self, arping: &PathBuf) -> Result<(), ResourceError> {
        let addr = self.addr();
        let out = self.run("start", arping, &["-D", "-c", "2", "-w", "3", "-I", &self.cfg.interface, &addr]).await?;
        match out.exit_code() {
            Some(0) => Ok(()),
            Some(1) => {
                let text = String::from_utf8_lossy(&out.stdout);
                let who = text
                    .lines()
                    .find(|l| l.contains("reply from"))
                    .and_then(|l| l.split('[').nth(1))
                    .and_then(|s| s.split(']').next())
                    .unwrap_or("an unknown MAC address");
                Err(ResourceError::failed(
                    "start",
                    &self.id,
                    format!(
                        "{addr} already answers on {} from {who}: another host uses it (is the group still running \
                         elsewhere?); not adding it",
                        self.cfg.interface
                    ),
                ))
            }
            _ => Err(ResourceError::failed(
                "start",
                &self.id,
                format!("duplicate address detection (arping -D) failed: {}", describe_exit(&out)),
            )),
        }
    }

    async fn ipv6_wait_dad(&self) -> Result<(), ResourceError> {
        let until = Instant::now() + self.timeout;
        loop {
            match self.present("start").await? {
                Present::Yes { dadfailed: true, .. } => {
                    let _ = self.del("start").await;
                    return Err(ResourceError::failed(
                        "start",
                        &self.id,
                        format!(
                            "{} already answers on {} (IPv6 duplicate address detection failed): another host uses \
                             it; address removed again",
                            self.addr(),
                            self.cfg.interface
                        ),
                    ));
                }
                Present::Yes { tentative: false, .. } => return Ok(()),
                Present::No => {
                    return Err(ResourceError::failed("start", &self.id, "the address vanished during DAD"));
                }
                Present::Yes { .. } if Instant::now() >= until => {
                    let _ = self.del("start").await;
                    return Err(ResourceError::timeout("start", &self.id, self.timeout));
                }
                Present::Yes { .. } => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn del(&self, op: &'static str) -> Result<(), ResourceError> {
        let prefix = self.cfg.address.to_string();
        let out = self.run(op, &self.ip, &["addr", "del", &prefix, "dev", &self.cfg.interface]).await?;
        if out.exit_code() != Some(0) {
            return Err(ResourceError::failed(op, &self.id, format!("ip addr del {prefix}: {}", describe_exit(&out))));
        }
        Ok(())
    }
}

impl Resource for IpResource {
    fn kind(&self) -> &'static str {
        "ip"
    }

    fn start<'a>(&'a self, _ctx: &'a StartContext) -> BoxFuture<'a, Result<(), ResourceError>> {
        Box::pin(async move {
            match self.present("start").await? {
                Present::Yes { prefix_len, dadfailed: false, .. } if prefix_len == self.cfg.address.prefix_len => {
                    return Ok(());
                }
                // A wrong prefix, or left over from a failed DAD: start afresh.
                Present::Yes { .. } => self.del("start").await?,
                Present::No => {}
            }
            if let Some(arping) = &self.arping {
                self.ipv4_duplicate(arping).await?;
            }
            let prefix = self.cfg.address.to_string();
            let out = self.run("start", &self.ip, &["addr", "add", &prefix, "dev", &self.cfg.interface]).await?;
            if out.exit_code() != Some(0) {
                return Err(ResourceError::failed(
                    "start",
                    &self.id,
                    format!("ip addr add {prefix} dev {}: {}", self.cfg.interface, describe_exit(&out)),
                ));
            }
            match &self.arping {
                Some(arping) => {
                    let addr = self.addr();
                    // Unsolicited ARP: neighbours that cached the old owner's MAC switch to ours.
                    match self
                        .run("start", arping, &["-U", "-c", "2", "-w", "3", "-I", &self.cfg.interface, &addr])
                        .await
                    {
                        Ok(o) if o.exit_code() == Some(0) => {}
                        Ok(o) => tracing::warn!(resource = %self.id, "gratuitous ARP failed: {}", describe_exit(&o)),
                        Err(e) => tracing::warn!(resource = %self.id, "gratuitous ARP failed: {e}"),
                    }
                    Ok(())
                }
                None => self.ipv6_wait_dad().await,
            }
        })
    }

    fn stop(&self, _force: bool) -> BoxFuture<'_, Result<(), ResourceError>> {
        Box::pin(async move {
            // Forced or not, removing the address is the whole stop, and it is quick.
            if self.present("stop").await? != Present::No {
                self.del("stop").await?;
            }
            self.place.remove(&self.id);
            Ok(())
        })
    }

    fn check(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            match self.present("check").await {
                Err(e) => Health::Failed(e.to_string()),
                Ok(Present::No) => Health::Stopped,
                Ok(Present::Yes { dadfailed: true, .. }) => {
                    Health::Failed(format!("{} is marked dadfailed: another host uses it", self.addr()))
                }
                Ok(Present::Yes { prefix_len, .. }) if prefix_len != self.cfg.address.prefix_len => {
                    Health::Failed(format!(
                        "{} is on {} with prefix /{prefix_len}, not /{}",
                        self.addr(),
                        self.cfg.interface,
                        self.cfg.address.prefix_len
                    ))
                }
                Ok(Present::Yes { .. }) => Health::Running,
            }
        })
    }
}
