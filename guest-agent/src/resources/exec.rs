//! `kind = "exec"`: any program as a resource.
//!
//! * `forking` mode (default, like systemd `Type=forking`): `start` must exit
//!   0 within `start_timeout`, leaving the application running in the
//!   resource's cgroup (`pg_ctl -w start`).
//! * `simple` mode: `start` *is* the application. The agent keeps it as a
//!   child; its stdout and stderr go to the agent's log, and its exit is a
//!   failure that [`Resource::check`] reports.
//!
//! Every program gets the configured `env` plus `TANDEM_GROUP`,
//! `TANDEM_RESOURCE` and (from the last start) `TANDEM_FENCING_TOKEN`, runs in
//! `cwd` as `user`, in its own process group and in the resource's cgroup.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_config::{ExecMode, ExecResource as ExecConfig};
use tandem_monitors::exec::{CommandSpec, Leftovers, Termination, run_command};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;
use tokio::time::Instant;

use super::process::{self, Placement, RunAs, describe_exit, error_chain, run_failed};
use super::{BoxFuture, Health, Resource, ResourceEnv, ResourceError, StartContext};

/// How long a `simple` start waits between two `monitor` runs for readiness.
const READY_POLL: Duration = Duration::from_millis(200);

/// Lines of a `simple` service's output kept for the failure message.
const KEPT_LINES: usize = 5;

/// An `exec` resource.
#[derive(Debug)]
pub struct ExecResource {
    id: String,
    group: String,
    name: String,
    cfg: ExecConfig,
    place: Placement,
    kill_grace: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The token of the last start, passed to `stop` and `monitor` too.
    token: Option<u64>,
    /// The process group of the last forking `start` (for force stops without a cgroup).
    start_pgid: Option<i32>,
    /// The `simple` service we started.
    child: Option<ServiceChild>,
}

/// A `simple` service process and what we learn about it.
#[derive(Debug, Clone)]
struct ServiceChild {
    pid: i32,
    exit: watch::Receiver<Option<Termination>>,
    last_lines: Arc<Mutex<VecDeque<String>>>,
}

impl ServiceChild {
    fn exited(&self) -> Option<Termination> {
        *self.exit.borrow()
    }

    fn why_exited(&self, t: Termination) -> String {
        let lines =
            self.last_lines.lock().map(|l| l.iter().cloned().collect::<Vec<_>>().join(" / ")).unwrap_or_default();
        if lines.is_empty() {
            format!("the service process (pid {}) ended: {t}", self.pid)
        } else {
            format!("the service process (pid {}) ended: {t}; last output: {lines}", self.pid)
        }
    }

    async fn wait_exit(&self, until: Instant) -> Option<Termination> {
        let mut rx = self.exit.clone();
        let _ = tokio::time::timeout_at(until, rx.wait_for(Option::is_some)).await;
        *rx.borrow()
    }
}

impl ExecResource {
    /// Checks the configuration against this node: the user exists, and a
    /// `forking` resource can be checked (a `monitor`, or a cgroup to watch).
    pub fn build(group: &str, name: &str, cfg: &ExecConfig, env: &ResourceEnv) -> Result<Self, ResourceError> {
        let id = format!("{group}/{name}");
        if cfg.start.first().is_none_or(|p| p.trim().is_empty()) {
            return Err(ResourceError::config(&id, "`start` has no program"));
        }
        if cfg.mode == ExecMode::Forking && cfg.stop.is_empty() {
            return Err(ResourceError::config(&id, "a forking exec resource needs `stop`"));
        }
        if cfg.mode == ExecMode::Forking && cfg.monitor.is_empty() && env.cgroup.is_none() {
            return Err(ResourceError::config(
                &id,
                "a forking exec resource without `monitor` is checked through its cgroup, and this node runs \
                 resources without one: add a `monitor` command (exit 0 running, 7 stopped), or run the agent \
                 with a cgroup v2 directory for its groups",
            ));
        }
        let run_as = match &cfg.user {
            Some(u) => Some(RunAs::lookup(u).map_err(|e| ResourceError::config(&id, e))?),
            None => None,
        };
        // `cwd` is not checked here: it may be on a disk that an earlier resource mounts.
        Ok(Self {
            id,
            group: group.to_string(),
            name: name.to_string(),
            cfg: cfg.clone(),
            place: Placement::new(env.cgroup.as_deref(), name, run_as),
            kill_grace: env.kill_grace,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding it cannot leave the plain data inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A command for `argv` with the resource's environment, cwd and user.
    fn command(&self, argv: &[String], timeout: Duration) -> CommandSpec {
        let mut spec = CommandSpec::new(&argv[0])
            .args(&argv[1..])
            .timeout(timeout)
            .kill_grace(self.kill_grace.min(timeout / 2))
            .env("TANDEM_GROUP", &self.group)
            .env("TANDEM_RESOURCE", &self.name);
        if let Some(t) = self.state().token {
            spec = spec.env("TANDEM_FENCING_TOKEN", t.to_string());
        }
        for (k, v) in &self.cfg.env {
            spec = spec.env(k, v);
        }
        spec.cwd = self.cfg.cwd.clone();
        process::with_user_env(spec, self.place.run_as.as_ref())
    }

    /// Runs `monitor`: exit 0 running, 7 stopped, anything else failed.
    async fn run_monitor(&self) -> Health {
        if let Err(e) = self.place.create(&self.id, "check") {
            return Health::Failed(e.to_string());
        }
        let mut spec = self.command(&self.cfg.monitor, self.cfg.monitor_timeout);
        spec.child_setup = self.place.ops_setup();
        let res = run_command(&spec).await;
        self.place.kill_ops(&self.id).await;
        match res {
            Err(e) => Health::Failed(format!("monitor cannot run: {}", error_chain(&e))),
            Ok(o) if o.timed_out => Health::Failed(format!(
                "monitor did not finish within {} ms; it was killed",
                self.cfg.monitor_timeout.as_millis()
            )),
            Ok(o) => match o.exit_code() {
                Some(0) => Health::Running,
                Some(7) => Health::Stopped,
                _ => Health::Failed(format!("monitor: {}", describe_exit(&o))),
            },
        }
    }

    async fn start_forking(&self) -> Result<(), ResourceError> {
        let mut spec = self.command(&self.cfg.start, self.cfg.start_timeout).leftovers(Leftovers::Keep);
        spec.child_setup = self.place.service_setup();
        let out = run_command(&spec).await.map_err(|e| run_failed("start", &self.id, &e))?;
        self.state().start_pgid = Some(out.pgid);
        if out.timed_out {
            self.place.kill_service(&self.id, "start", "start timed out").await?;
            return Err(ResourceError::timeout("start", &self.id, self.cfg.start_timeout));
        }
        match out.exit_code() {
            Some(0) => Ok(()),
            _ => Err(ResourceError::failed("start", &self.id, describe_exit(&out))),
        }
    }

    async fn start_simple(&self) -> Result<(), ResourceError> {
        if let Some(c) = &self.state().child {
            if c.exited().is_none() {
                return Ok(());
            }
        }
        let deadline = Instant::now() + self.cfg.start_timeout;
        let spec = self.command(&self.cfg.start, self.cfg.start_timeout);
        let mut cmd = tokio::process::Command::new(&spec.program);
        cmd.args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        if let Some(d) = &spec.cwd {
            cmd.current_dir(d);
        }
        if let Some(s) = self.place.service_setup() {
            s.install(&mut cmd);
        }
        let mut child = cmd.spawn().map_err(|e| {
            ResourceError::failed("start", &self.id, format!("cannot run {}: {e}", spec.program.display()))
        })?;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        tracing::info!(resource = %self.id, pid, "started the service process");
        let (tx, rx) = watch::channel(None);
        let last_lines = Arc::new(Mutex::new(VecDeque::new()));
        let (out, err) = (child.stdout.take(), child.stderr.take());
        let id = self.id.clone();
        let lines = Arc::clone(&last_lines);
        // The task owns the child: it forwards output to the log and reports the exit.
        tokio::spawn(async move {
            let logging = async {
                tokio::join!(forward(out, &id, &lines), forward(err, &id, &lines));
            };
            let (status, ()) = tokio::join!(child.wait(), logging);
            let t = match status {
                Ok(s) => Termination::from(s),
                Err(_) => Termination::Signaled(0),
            };
            tracing::info!(resource = %id, pid, "the service process ended: {t}");
            let _ = tx.send(Some(t));
        });
        let svc = ServiceChild { pid, exit: rx, last_lines };
        self.state().child = Some(svc.clone());
        if self.cfg.monitor.is_empty() {
            return Ok(());
        }
        // With a monitor, the start is done once it says "running".
        loop {
            if let Some(t) = svc.exited() {
                return Err(ResourceError::failed("start", &self.id, svc.why_exited(t)));
            }
            let last = self.run_monitor().await;
            if last == Health::Running {
                return Ok(());
            }
            if Instant::now() + READY_POLL >= deadline {
                tracing::warn!(resource = %self.id, ?last, "service not ready in time; killing it");
                self.kill_now().await?;
                return Err(ResourceError::timeout("start", &self.id, self.cfg.start_timeout));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// SIGKILL to the service: its cgroup, the `simple` child's process group,
    /// or (forking, no cgroup) the last start's process group.
    async fn kill_now(&self) -> Result<(), ResourceError> {
        let (child, pgid) = {
            let st = self.state();
            (st.child.clone(), st.start_pgid)
        };
        if let Some(c) = &child {
            signal_group(c.pid, libc::SIGKILL);
        } else if self.place.service.is_none() {
            if let Some(p) = pgid {
                signal_group(p, libc::SIGKILL);
            }
        }
        self.place.kill_service(&self.id, "stop", "stopping").await?;
        if let Some(c) = &child {
            if c.wait_exit(Instant::now() + process::KILL_WAIT).await.is_none() {
                return Err(ResourceError::failed(
                    "stop",
                    &self.id,
                    format!("the service process {} survived SIGKILL (uninterruptible I/O?)", c.pid),
                ));
            }
        }
        Ok(())
    }

    /// Is anything of the service still here? Used to skip `stop` for a
    /// stopped resource and to verify a stop.
    async fn is_stopped(&self) -> bool {
        let child = self.state().child.clone();
        if let Some(c) = &child {
            if c.exited().is_none() {
                return false;
            }
        }
        match self.place.service_running() {
            Some(Ok(true)) => false,
            Some(Ok(false)) if self.cfg.monitor.is_empty() => true,
            Some(Err(_)) => false,
            _ if !self.cfg.monitor.is_empty() => self.run_monitor().await == Health::Stopped,
            // simple mode without cgroup or monitor: only our child counted.
            _ => self.cfg.mode == ExecMode::Simple,
        }
    }

    async fn stop_graceful(&self) -> Result<(), ResourceError> {
        if self.is_stopped().await {
            self.place.kill_service(&self.id, "stop", "already stopped, but processes remained").await?;
            self.state().child = None;
            self.place.remove(&self.id);
            return Ok(());
        }
        let deadline = Instant::now() + self.cfg.stop_timeout;
        let child = self.state().child.clone();
        let mut trouble = None;
        if !self.cfg.stop.is_empty() {
            self.place.create(&self.id, "stop")?;
            let mut spec = self.command(&self.cfg.stop, self.cfg.stop_timeout);
            spec.child_setup = self.place.ops_setup();
            let res = run_command(&spec).await;
            self.place.kill_ops(&self.id).await;
            trouble = match res {
                Err(e) => Some(format!("stop cannot run: {}", error_chain(&e))),
                Ok(o) if o.timed_out => {
                    Some(format!("stop did not finish within {} ms", self.cfg.stop_timeout.as_millis()))
                }
                Ok(o) if o.exit_code() == Some(0) => None,
                Ok(o) => Some(format!("stop: {}", describe_exit(&o))),
            };
        } else if let Some(c) = &child {
            signal_group(c.pid, libc::SIGTERM);
        }
        if let Some(c) = &child {
            if c.wait_exit(deadline).await.is_none() {
                trouble.get_or_insert_with(|| {
                    format!(
                        "the service process {} did not exit within {} ms",
                        c.pid,
                        self.cfg.stop_timeout.as_millis()
                    )
                });
            }
        }
        if let Some(t) = &trouble {
            tracing::warn!(resource = %self.id, "{t}; killing what is left");
        }
        // Whatever `stop` left behind: the stop is over, nothing of the service may stay.
        if let Some(c) = &child {
            signal_group(c.pid, libc::SIGKILL);
        }
        self.place.kill_service(&self.id, "stop", "after stop").await?;
        if let Some(c) = &child {
            if c.wait_exit(Instant::now() + process::KILL_WAIT).await.is_none() {
                return Err(ResourceError::failed(
                    "stop",
                    &self.id,
                    format!("service process {} survived SIGKILL", c.pid),
                ));
            }
        }
        self.state().child = None;
        // With a cgroup, an empty cgroup proves the stop. Without one, only the
        // monitor can tell whether a forking service is gone.
        if self.place.service.is_none() && self.cfg.mode == ExecMode::Forking {
            match self.run_monitor().await {
                Health::Stopped => {}
                h => {
                    let why = trouble.unwrap_or_else(|| "stop exited 0".into());
                    return Err(ResourceError::failed("stop", &self.id, format!("{why}, but monitor reports {h:?}")));
                }
            }
        }
        self.place.remove(&self.id);
        Ok(())
    }
}

impl Resource for ExecResource {
    fn kind(&self) -> &'static str {
        "exec"
    }

    fn start<'a>(&'a self, ctx: &'a StartContext) -> BoxFuture<'a, Result<(), ResourceError>> {
        Box::pin(async move {
            self.state().token = Some(ctx.token);
            self.place.create(&self.id, "start")?;
            match self.cfg.mode {
                ExecMode::Forking => self.start_forking().await,
                ExecMode::Simple => self.start_simple().await,
            }
        })
    }

    fn stop(&self, force: bool) -> BoxFuture<'_, Result<(), ResourceError>> {
        Box::pin(async move {
            if !force {
                return self.stop_graceful().await;
            }
            self.kill_now().await?;
            self.state().child = None;
            if self.place.service.is_none() && self.cfg.mode == ExecMode::Forking {
                // Only the start's process group could be killed: a daemon that left it
                // survives. Say so rather than claim the resource is stopped.
                if let h @ (Health::Running | Health::Failed(_)) = self.run_monitor().await {
                    return Err(ResourceError::failed(
                        "stop",
                        &self.id,
                        format!("killed the start's process group, but monitor still reports {h:?} (no cgroup)"),
                    ));
                }
            }
            self.place.kill_ops(&self.id).await;
            self.place.remove(&self.id);
            Ok(())
        })
    }

    fn check(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            let child = self.state().child.clone();
            if let Some(c) = &child {
                if let Some(t) = c.exited() {
                    return Health::Failed(c.why_exited(t));
                }
            }
            if !self.cfg.monitor.is_empty() {
                return self.run_monitor().await;
            }
            if child.is_some() {
                return Health::Running;
            }
            match self.place.service_running() {
                Some(Ok(true)) => Health::Running,
                Some(Ok(false)) | None => Health::Stopped,
                Some(Err(e)) => Health::Failed(format!("cannot read the resource's cgroup: {}", error_chain(&e))),
            }
        })
    }
}

/// Forwards a service's output lines to the log, keeping the last few.
async fn forward<R: AsyncRead + Unpin>(r: Option<R>, id: &str, keep: &Mutex<VecDeque<String>>) {
    let Some(r) = r else { return };
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "tandem_guest::service", resource = id, "{line}");
        if let Ok(mut k) = keep.lock() {
            if k.len() == KEPT_LINES {
                k.pop_front();
            }
            k.push_back(line);
        }
    }
}

fn signal_group(pgid: i32, sig: libc::c_int) {
    if pgid > 1 {
        // SAFETY: kill(2) with a negative pid signals a process group we created.
        unsafe { libc::kill(-pgid, sig) };
    }
}
