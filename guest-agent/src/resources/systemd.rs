//! `kind = "systemd"`: a systemd unit, driven with `systemctl`.
//!
//! The unit's processes live in systemd's cgroups, not the group's: systemd
//! contains and kills them. The agent bounds every `systemctl` call with the
//! resource's timeouts. On a node where systemd is not the init system
//! (`/run/systemd/system` absent, as in most containers), the resource is
//! refused when it is built.

use std::path::PathBuf;
use std::time::Duration;

use tandem_config::SystemdResource as SystemdConfig;
use tandem_monitors::exec::{CommandSpec, RunOutput, resolve_program, run_command};

use super::process::{Placement, describe_exit, first_output_line, run_failed};
use super::{BoxFuture, Health, Resource, ResourceEnv, ResourceError, StartContext};

/// Limit for `systemctl is-active` (the configuration has no monitor timeout for units).
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// A `systemd` resource.
#[derive(Debug)]
pub struct SystemdResource {
    id: String,
    cfg: SystemdConfig,
    systemctl: PathBuf,
    place: Placement,
}

impl SystemdResource {
    /// Refuses to build where systemd is not the init system or `systemctl` is missing.
    pub fn build(group: &str, name: &str, cfg: &SystemdConfig, env: &ResourceEnv) -> Result<Self, ResourceError> {
        let id = format!("{group}/{name}");
        if !env.systemd_marker.is_dir() {
            let init = std::fs::read_to_string("/proc/1/comm").map(|s| s.trim().to_string()).unwrap_or_default();
            return Err(ResourceError::config(
                &id,
                format!(
                    "systemd is not running on this node ({} is absent; PID 1 is {init:?}), so unit {} cannot be \
                     managed: use kind = \"exec\" or \"ocf\" for this application here",
                    env.systemd_marker.display(),
                    cfg.unit
                ),
            ));
        }
        let systemctl = resolve_program("systemctl", &["/usr/bin", "/bin"])
            .filter(|p| p.is_file())
            .ok_or_else(|| ResourceError::config(&id, "`systemctl` not found: install the Debian package systemd"))?;
        Ok(Self { id, cfg: cfg.clone(), systemctl, place: Placement::new(env.cgroup.as_deref(), name, None) })
    }

    async fn systemctl(&self, op: &'static str, args: &[&str], timeout: Duration) -> Result<RunOutput, ResourceError> {
        self.place.create(&self.id, op)?;
        let mut spec = CommandSpec::new(&self.systemctl).args(args.iter().copied()).timeout(timeout);
        spec.child_setup = self.place.ops_setup();
        let out = run_command(&spec).await.map_err(|e| run_failed(op, &self.id, &e));
        self.place.kill_ops(&self.id).await;
        let out = out?;
        if out.timed_out {
            return Err(ResourceError::timeout(op, &self.id, timeout));
        }
        Ok(out)
    }

    async fn simple_op(&self, op: &'static str, args: &[&str], timeout: Duration) -> Result<(), ResourceError> {
        let out = self.systemctl(op, args, timeout).await?;
        match out.exit_code() {
            Some(0) => Ok(()),
            _ => Err(ResourceError::failed(
                op,
                &self.id,
                format!("systemctl {}: {}", args.join(" "), describe_exit(&out)),
            )),
        }
    }
}

impl Resource for SystemdResource {
    fn kind(&self) -> &'static str {
        "systemd"
    }

    fn start<'a>(&'a self, _ctx: &'a StartContext) -> BoxFuture<'a, Result<(), ResourceError>> {
        Box::pin(async move {
            let r = self.simple_op("start", &["start", &self.cfg.unit], self.cfg.start_timeout).await;
            if matches!(r, Err(ResourceError::Timeout { .. })) {
                // systemctl was killed, but the start job may still run in systemd: cancel it.
                let _ = self.simple_op("start", &["stop", &self.cfg.unit], self.cfg.stop_timeout).await;
            }
            r
        })
    }

    fn stop(&self, force: bool) -> BoxFuture<'_, Result<(), ResourceError>> {
        Box::pin(async move {
            if force {
                // SIGKILL every process of the unit at once; the stop below then finds nothing to wait for.
                let _ =
                    self.simple_op("stop", &["kill", "--signal=SIGKILL", &self.cfg.unit], self.cfg.stop_timeout).await;
            }
            self.simple_op("stop", &["stop", &self.cfg.unit], self.cfg.stop_timeout).await?;
            self.place.remove(&self.id);
            Ok(())
        })
    }

    fn check(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            match self.systemctl("check", &["is-active", &self.cfg.unit], CHECK_TIMEOUT).await {
                Err(e) => Health::Failed(e.to_string()),
                Ok(out) => match first_output_line(&out).as_str() {
                    "active" | "reloading" => Health::Running,
                    "inactive" => Health::Stopped,
                    state => Health::Failed(format!("unit {} is {state}", self.cfg.unit)),
                },
            }
        })
    }
}
