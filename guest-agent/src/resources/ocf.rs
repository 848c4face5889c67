//! `kind = "ocf"`: an OCF resource agent (Debian's `resource-agents`),
//! run unmodified through [`tandem_monitors::ocf::OcfAgent`].
//!
//! `validate-all` runs before the first start; `start` runs in the
//! resource's service cgroup (daemons the agent launches stay there),
//! `monitor`, `stop` and `validate-all` in its operations cgroup. The
//! instance name (`OCF_RESOURCE_INSTANCE`) is `<group>-<resource>`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tandem_config::OcfResource as OcfConfig;
use tandem_monitors::ocf::{OcfAction, OcfAgent, OcfCode, OcfResult};

use super::process::{Placement, error_chain};
use super::{BoxFuture, Health, Resource, ResourceEnv, ResourceError, StartContext};

/// An `ocf` resource.
#[derive(Debug)]
pub struct OcfResource {
    id: String,
    agent: OcfAgent,
    cfg: OcfConfig,
    place: Placement,
    validated: AtomicBool,
}

impl OcfResource {
    /// Checks that the agent is installed and the parameter names are usable.
    pub fn build(group: &str, name: &str, cfg: &OcfConfig, env: &ResourceEnv) -> Result<Self, ResourceError> {
        let id = format!("{group}/{name}");
        let mut agent = OcfAgent::parse(&format!("{}:{}", cfg.provider, cfg.agent))
            .map_err(|e| ResourceError::config(&id, e.to_string()))?;
        agent.root = env.ocf_root.clone();
        agent.instance = format!("{group}-{name}");
        agent.kill_grace = env.kill_grace;
        if let Some(bad) =
            cfg.params.keys().find(|k| k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            return Err(ResourceError::config(
                &id,
                format!("OCF parameter {bad:?}: names are letters, digits and '_' (they become OCF_RESKEY_<name>)"),
            ));
        }
        agent.params = cfg.params.clone();
        if !agent.path().is_file() {
            return Err(ResourceError::config(
                &id,
                format!(
                    "OCF agent {} is not installed at {} (install the Debian package resource-agents, or check \
                     provider and agent)",
                    agent.name(),
                    agent.path().display()
                ),
            ));
        }
        Ok(Self {
            id,
            agent,
            cfg: cfg.clone(),
            place: Placement::new(env.cgroup.as_deref(), name, None),
            validated: AtomicBool::new(false),
        })
    }

    async fn run(
        &self,
        op: &'static str,
        action: OcfAction,
        timeout: Duration,
        service: bool,
    ) -> Result<OcfResult, ResourceError> {
        let mut agent = self.agent.clone();
        agent.child_setup = if service { self.place.service_setup() } else { self.place.ops_setup() };
        let res = agent.run(&action, timeout).await.map_err(|e| ResourceError::failed(op, &self.id, error_chain(&e)));
        if !service {
            self.place.kill_ops(&self.id).await;
        }
        res
    }

    fn describe(&self, action: &str, r: &OcfResult) -> String {
        let why = r.reason.as_deref().map(|s| format!(": {s}")).unwrap_or_default();
        match r.code {
            Some(c) => format!("{} {action}: {} {}{why}", self.agent.name(), c.code(), c.meaning()),
            None => format!("{} {action}: {}{why}", self.agent.name(), r.output.termination),
        }
    }

    async fn validate(&self) -> Result<(), ResourceError> {
        if self.validated.load(Ordering::Relaxed) {
            return Ok(());
        }
        let r = self.run("start", OcfAction::ValidateAll, self.cfg.start_timeout, false).await?;
        if r.output.timed_out {
            return Err(ResourceError::timeout("start", &self.id, self.cfg.start_timeout));
        }
        match r.code {
            Some(OcfCode::Success) => {}
            // Agents without validate-all are validated by their start.
            Some(OcfCode::ErrUnimplemented) => {
                tracing::debug!(resource = %self.id, "agent has no validate-all");
            }
            _ => return Err(ResourceError::config(&self.id, self.describe("validate-all", &r))),
        }
        self.validated.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl Resource for OcfResource {
    fn kind(&self) -> &'static str {
        "ocf"
    }

    fn start<'a>(&'a self, _ctx: &'a StartContext) -> BoxFuture<'a, Result<(), ResourceError>> {
        Box::pin(async move {
            self.place.create(&self.id, "start")?;
            self.validate().await?;
            let r = self.run("start", OcfAction::Start, self.cfg.start_timeout, true).await?;
            if r.output.timed_out {
                self.place.kill_service(&self.id, "start", "start timed out").await?;
                return Err(ResourceError::timeout("start", &self.id, self.cfg.start_timeout));
            }
            match r.code {
                Some(OcfCode::Success) => Ok(()),
                _ => Err(ResourceError::failed("start", &self.id, self.describe("start", &r))),
            }
        })
    }

    fn stop(&self, force: bool) -> BoxFuture<'_, Result<(), ResourceError>> {
        Box::pin(async move {
            if force {
                // Kill first; the agent's stop still runs after, because an agent may
                // hold state that is not a process (IPaddr2's address).
                self.place.kill_service(&self.id, "stop", "forced stop").await?;
            }
            self.place.create(&self.id, "stop")?;
            let r = self.run("stop", OcfAction::Stop, self.cfg.stop_timeout, false).await?;
            // Whatever the agent said, no process of the service may remain.
            self.place.kill_service(&self.id, "stop", "after the agent's stop").await?;
            if r.output.timed_out {
                return Err(ResourceError::timeout("stop", &self.id, self.cfg.stop_timeout));
            }
            match r.code {
                Some(OcfCode::Success) => {
                    self.place.remove(&self.id);
                    Ok(())
                }
                _ => Err(ResourceError::failed("stop", &self.id, self.describe("stop", &r))),
            }
        })
    }

    fn check(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            if let Err(e) = self.place.create(&self.id, "check") {
                return Health::Failed(e.to_string());
            }
            let r = match self.run("check", OcfAction::Monitor, self.cfg.monitor_timeout, false).await {
                Ok(r) => r,
                Err(e) => return Health::Failed(e.to_string()),
            };
            if r.output.timed_out {
                return Health::Failed(format!(
                    "{} monitor did not finish within {} ms; it was killed",
                    self.agent.name(),
                    self.cfg.monitor_timeout.as_millis()
                ));
            }
            match r.code {
                Some(OcfCode::Success | OcfCode::RunningPromoted) => Health::Running,
                Some(OcfCode::Degraded | OcfCode::DegradedPromoted) => {
                    tracing::warn!(resource = %self.id, "{}", self.describe("monitor", &r));
                    Health::Running
                }
                Some(OcfCode::NotRunning) => Health::Stopped,
                _ => Health::Failed(self.describe("monitor", &r)),
            }
        })
    }
}
