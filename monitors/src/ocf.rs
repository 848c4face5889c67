//! OCF resource agents: run any action of an agent unmodified
//! ([`OcfAgent::run`]), and the `ocf:PROVIDER:AGENT` monitor probe built on
//! its `monitor` action.
//!
//! Environment as Pacemaker sets it: `OCF_ROOT`, `OCF_RESKEY_<param>`,
//! `OCF_RESOURCE_INSTANCE`, `OCF_RESOURCE_TYPE`, `OCF_RESOURCE_PROVIDER`,
//! `OCF_RA_VERSION_MAJOR/MINOR`, `OCF_RESKEY_CRM_meta_timeout` (ms).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::exec::{
    ChildSetup, CommandSpec, DEFAULT_KILL_GRACE, Leftovers, RunError, RunOutput, Termination, run_command,
};
use crate::spec::{SpecContext, SpecError};
use crate::{CheckFuture, Deadline, FailureClass, Probe, ProbeFailure, ProbeSuccess};

/// The standard OCF root.
pub const DEFAULT_OCF_ROOT: &str = "/usr/lib/ocf";

/// An OCF action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OcfAction {
    /// `start`.
    Start,
    /// `stop`.
    Stop,
    /// `monitor`.
    Monitor,
    /// `validate-all`.
    ValidateAll,
    /// `meta-data`.
    MetaData,
    /// `promote`.
    Promote,
    /// `demote`.
    Demote,
    /// `reload`.
    Reload,
    /// Anything else the agent implements (e.g. `notify`, `migrate_to`).
    Other(String),
}

impl OcfAction {
    /// The action name as passed to the agent.
    pub fn as_str(&self) -> &str {
        match self {
            OcfAction::Start => "start",
            OcfAction::Stop => "stop",
            OcfAction::Monitor => "monitor",
            OcfAction::ValidateAll => "validate-all",
            OcfAction::MetaData => "meta-data",
            OcfAction::Promote => "promote",
            OcfAction::Demote => "demote",
            OcfAction::Reload => "reload",
            OcfAction::Other(s) => s,
        }
    }

    /// Actions that may leave a service running in the agent's process
    /// group; everything else gets its leftovers killed.
    fn may_leave_processes(&self) -> bool {
        matches!(self, OcfAction::Start | OcfAction::Promote | OcfAction::Reload | OcfAction::Other(_))
    }
}

/// OCF exit codes (OCF 1.1), with unknown codes kept as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OcfCode {
    /// 0: success (for monitor: running).
    Success,
    /// 1: generic error.
    ErrGeneric,
    /// 2: invalid or missing parameters.
    ErrArgs,
    /// 3: action not implemented.
    ErrUnimplemented,
    /// 4: insufficient permissions.
    ErrPerm,
    /// 5: required software not installed.
    ErrInstalled,
    /// 6: not configured (configuration is wrong).
    ErrConfigured,
    /// 7: not running (cleanly stopped).
    NotRunning,
    /// 8: running in the promoted (master) role.
    RunningPromoted,
    /// 9: failed in the promoted role.
    FailedPromoted,
    /// 190: running but degraded.
    Degraded,
    /// 191: promoted but degraded.
    DegradedPromoted,
    /// Any other exit code.
    Other(i32),
}

impl OcfCode {
    /// Classifies an exit code.
    pub fn from_code(c: i32) -> Self {
        match c {
            0 => OcfCode::Success,
            1 => OcfCode::ErrGeneric,
            2 => OcfCode::ErrArgs,
            3 => OcfCode::ErrUnimplemented,
            4 => OcfCode::ErrPerm,
            5 => OcfCode::ErrInstalled,
            6 => OcfCode::ErrConfigured,
            7 => OcfCode::NotRunning,
            8 => OcfCode::RunningPromoted,
            9 => OcfCode::FailedPromoted,
            190 => OcfCode::Degraded,
            191 => OcfCode::DegradedPromoted,
            other => OcfCode::Other(other),
        }
    }

    /// The numeric code.
    pub fn code(self) -> i32 {
        match self {
            OcfCode::Success => 0,
            OcfCode::ErrGeneric => 1,
            OcfCode::ErrArgs => 2,
            OcfCode::ErrUnimplemented => 3,
            OcfCode::ErrPerm => 4,
            OcfCode::ErrInstalled => 5,
            OcfCode::ErrConfigured => 6,
            OcfCode::NotRunning => 7,
            OcfCode::RunningPromoted => 8,
            OcfCode::FailedPromoted => 9,
            OcfCode::Degraded => 190,
            OcfCode::DegradedPromoted => 191,
            OcfCode::Other(c) => c,
        }
    }

    /// The OCF name and meaning, for messages.
    pub fn meaning(self) -> &'static str {
        match self {
            OcfCode::Success => "OCF_SUCCESS (running)",
            OcfCode::ErrGeneric => "OCF_ERR_GENERIC (generic error)",
            OcfCode::ErrArgs => "OCF_ERR_ARGS (invalid or missing parameters)",
            OcfCode::ErrUnimplemented => "OCF_ERR_UNIMPLEMENTED (action not implemented)",
            OcfCode::ErrPerm => "OCF_ERR_PERM (insufficient permissions)",
            OcfCode::ErrInstalled => "OCF_ERR_INSTALLED (required software not installed)",
            OcfCode::ErrConfigured => "OCF_ERR_CONFIGURED (not configured)",
            OcfCode::NotRunning => "OCF_NOT_RUNNING (not running)",
            OcfCode::RunningPromoted => "OCF_RUNNING_PROMOTED (running, promoted)",
            OcfCode::FailedPromoted => "OCF_FAILED_PROMOTED (failed in the promoted role)",
            OcfCode::Degraded => "OCF_DEGRADED (running, degraded)",
            OcfCode::DegradedPromoted => "OCF_DEGRADED_PROMOTED (promoted, degraded)",
            OcfCode::Other(_) => "not an OCF exit code",
        }
    }
}

/// Why an OCF action could not be run.
#[derive(Debug, thiserror::Error)]
pub enum OcfError {
    /// `PROVIDER:AGENT` is malformed.
    #[error("invalid OCF agent {0:?}: expected PROVIDER:AGENT, e.g. heartbeat:Dummy")]
    BadName(String),
    /// The agent script does not exist.
    #[error("OCF agent {path} does not exist (is the resource-agents package installed? is ocf_root right?)")]
    NotInstalled {
        /// Where it was looked for.
        path: String,
    },
    /// The runner could not start it.
    #[error("running OCF agent {agent}")]
    Run {
        /// `provider:agent`.
        agent: String,
        /// The runner's error.
        #[source]
        source: RunError,
    },
}

/// One OCF resource: an agent plus its parameters and instance name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OcfAgent {
    /// The OCF root (default `/usr/lib/ocf`).
    pub root: PathBuf,
    /// The provider, e.g. `heartbeat`.
    pub provider: String,
    /// The agent, e.g. `Dummy`.
    pub agent: String,
    /// `OCF_RESOURCE_INSTANCE` (default: the agent name).
    pub instance: String,
    /// Parameters, passed as `OCF_RESKEY_<name>`.
    pub params: BTreeMap<String, String>,
    /// SIGTERM → SIGKILL grace when an action times out.
    pub kill_grace: Duration,
    /// Code run in the agent's process before `exec` (cgroup placement).
    pub child_setup: Option<ChildSetup>,
}

/// The outcome of one OCF action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OcfResult {
    /// The OCF code (`None` when the agent was killed by a signal or timed out).
    pub code: Option<OcfCode>,
    /// The agent's `ocf-exit-reason:` line, else the last stderr line.
    pub reason: Option<String>,
    /// The raw run (output, timing, timeout flag).
    pub output: RunOutput,
}

impl OcfAgent {
    /// An agent `PROVIDER:AGENT` under the default root, with no parameters.
    pub fn parse(name: &str) -> Result<Self, OcfError> {
        let (provider, agent) = name.split_once(':').ok_or_else(|| OcfError::BadName(name.into()))?;
        let valid = |s: &str| {
            !s.is_empty() && s != "." && s != ".." && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
        };
        if !valid(provider) || !valid(agent) {
            return Err(OcfError::BadName(name.into()));
        }
        Ok(Self {
            root: PathBuf::from(DEFAULT_OCF_ROOT),
            provider: provider.into(),
            agent: agent.into(),
            instance: agent.into(),
            params: BTreeMap::new(),
            kill_grace: DEFAULT_KILL_GRACE,
            child_setup: None,
        })
    }

    /// Sets a parameter.
    pub fn param(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.params.insert(k.into(), v.into());
        self
    }

    /// `ROOT/resource.d/PROVIDER/AGENT`.
    pub fn path(&self) -> PathBuf {
        self.root.join("resource.d").join(&self.provider).join(&self.agent)
    }

    /// `provider:agent`.
    pub fn name(&self) -> String {
        format!("{}:{}", self.provider, self.agent)
    }

    fn command(&self, action: &OcfAction, timeout: Duration, grace: Duration) -> CommandSpec {
        let mut c = CommandSpec::new(self.path())
            .args([action.as_str()])
            .timeout(timeout)
            .kill_grace(grace)
            .leftovers(if action.may_leave_processes() { Leftovers::Keep } else { Leftovers::Kill })
            .cwd(Path::new("/"))
            .env("OCF_ROOT", &self.root)
            .env("OCF_RA_VERSION_MAJOR", "1")
            .env("OCF_RA_VERSION_MINOR", "1")
            .env("OCF_RESOURCE_INSTANCE", &self.instance)
            .env("OCF_RESOURCE_TYPE", &self.agent)
            .env("OCF_RESOURCE_PROVIDER", &self.provider)
            .env("__OCF_ACTION", action.as_str())
            .env("OCF_RESKEY_CRM_meta_timeout", (timeout + grace).as_millis().to_string());
        c.child_setup = self.child_setup.clone();
        if action == &OcfAction::Monitor {
            c = c.env("OCF_RESKEY_CRM_meta_interval", "0");
        }
        for (k, v) in &self.params {
            c = c.env(format!("OCF_RESKEY_{k}"), v);
        }
        c
    }

    /// Runs `action` with a timeout; on expiry the agent's whole process
    /// group gets SIGTERM, then SIGKILL after `kill_grace`.
    pub async fn run(&self, action: &OcfAction, timeout: Duration) -> Result<OcfResult, OcfError> {
        self.run_with_grace(action, timeout, self.kill_grace).await
    }

    async fn run_with_grace(
        &self,
        action: &OcfAction,
        timeout: Duration,
        grace: Duration,
    ) -> Result<OcfResult, OcfError> {
        let path = self.path();
        if !path.is_file() {
            return Err(OcfError::NotInstalled { path: path.display().to_string() });
        }
        let output = run_command(&self.command(action, timeout, grace))
            .await
            .map_err(|e| OcfError::Run { agent: self.name(), source: e })?;
        let code = match (output.timed_out, output.termination) {
            (false, Termination::Exited(c)) => Some(OcfCode::from_code(c)),
            _ => None,
        };
        let reason = exit_reason(&output.stderr);
        Ok(OcfResult { code, reason, output })
    }
}

/// The `ocf-exit-reason:` message an agent printed, else its last stderr line.
fn exit_reason(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let mut last = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(r) = line.strip_prefix("ocf-exit-reason:") {
            return Some(crate::one_line(r.trim().to_string()));
        }
        last = Some(line);
    }
    last.map(|l| crate::one_line(l.to_string()))
}

/// `ocf:PROVIDER:AGENT`: the agent's `monitor` action. Options: `instance`
/// (OCF_RESOURCE_INSTANCE), `ocf_root`, `kill_grace` (seconds).
#[derive(Debug, Clone)]
pub struct OcfProbe {
    agent: OcfAgent,
}

impl OcfProbe {
    /// A monitor probe for `agent`.
    pub fn new(agent: OcfAgent) -> Self {
        Self { agent }
    }
}

/// Builds an [`OcfProbe`] from a spec and the `PROVIDER:AGENT` part of the target.
pub fn build(ctx: &SpecContext<'_>, agent: &str) -> Result<Box<dyn Probe>, SpecError> {
    let mut a = OcfAgent::parse(agent.trim())
        .map_err(|e| SpecError::Target { target: format!("ocf:{agent}"), why: e.to_string() })?;
    if let Some(root) = ctx.opt("ocf_root") {
        a.root = PathBuf::from(root);
    }
    if let Some(i) = ctx.opt("instance") {
        a.instance = i;
    }
    if let Some(g) = ctx.opt_secs("kill_grace")? {
        a.kill_grace = g;
    }
    if let Some(bad) =
        ctx.spec.params.keys().find(|k| k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return Err(SpecError::BadOption {
            key: bad.clone(),
            value: String::new(),
            why: "OCF parameter names are letters, digits and '_' (they become OCF_RESKEY_<name>)".into(),
        });
    }
    a.params = ctx.spec.params.clone();
    Ok(Box::new(OcfProbe { agent: a }))
}

impl Probe for OcfProbe {
    fn kind(&self) -> &'static str {
        "ocf"
    }

    fn target(&self) -> String {
        format!("ocf:{} ({})", self.agent.name(), self.agent.instance)
    }

    fn check<'a>(&'a self, deadline: Deadline) -> CheckFuture<'a> {
        Box::pin(async move {
            let remaining = deadline.remaining();
            // SIGTERM early enough that SIGKILL lands by the deadline.
            let grace = self.agent.kill_grace.min(remaining / 4);
            let res = match self.agent.run_with_grace(&OcfAction::Monitor, remaining - grace, grace).await {
                Ok(r) => r,
                Err(e @ OcfError::NotInstalled { .. }) => {
                    return Err(ProbeFailure::unknown(FailureClass::Config, e.to_string()));
                }
                Err(e) => {
                    let class = match &e {
                        OcfError::Run {
                            source: RunError::NotFound { .. } | RunError::PermissionDenied { .. }, ..
                        } => FailureClass::Config,
                        _ => FailureClass::Io,
                    };
                    return Err(ProbeFailure::unknown(class, crate::exec::error_chain(&e)));
                }
            };
            monitor_outcome(&self.agent, &res, remaining)
        })
    }
}

fn monitor_outcome(agent: &OcfAgent, res: &OcfResult, timeout: Duration) -> crate::CheckOutcome {
    let name = format!("ocf:{} ({})", agent.name(), agent.instance);
    let why = res.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
    if res.output.timed_out {
        return Err(ProbeFailure::critical(
            FailureClass::Timeout,
            format!("{name} monitor timed out after {:.1} s; its process group was killed", timeout.as_secs_f64()),
        ));
    }
    let Some(code) = res.code else {
        return Err(ProbeFailure::critical(
            FailureClass::Protocol,
            format!("{name} monitor {}{why}", res.output.termination),
        ));
    };
    let msg = format!("{name} monitor: {} {}{why}", code.code(), code.meaning());
    match code {
        OcfCode::Success | OcfCode::RunningPromoted => Ok(ProbeSuccess::new(msg)),
        OcfCode::Degraded | OcfCode::DegradedPromoted => {
            Err(ProbeFailure::warning(FailureClass::UnexpectedAnswer, msg))
        }
        OcfCode::NotRunning => Err(ProbeFailure::critical(FailureClass::NotRunning, msg)),
        OcfCode::ErrArgs
        | OcfCode::ErrUnimplemented
        | OcfCode::ErrPerm
        | OcfCode::ErrInstalled
        | OcfCode::ErrConfigured => Err(ProbeFailure::critical(FailureClass::Config, msg)),
        OcfCode::ErrGeneric | OcfCode::FailedPromoted => {
            Err(ProbeFailure::critical(FailureClass::UnexpectedAnswer, msg))
        }
        OcfCode::Other(_) => Err(ProbeFailure::critical(FailureClass::Protocol, msg)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let a = OcfAgent::parse("heartbeat:Dummy").unwrap();
        assert_eq!(a.path(), Path::new("/usr/lib/ocf/resource.d/heartbeat/Dummy"));
        assert_eq!(a.instance, "Dummy");
        for bad in ["Dummy", "heartbeat:", ":Dummy", "../x:y", "a:../../bin/sh", "a:b/c"] {
            assert!(OcfAgent::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn codes_round_trip() {
        for c in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 190, 191, 42] {
            assert_eq!(OcfCode::from_code(c).code(), c);
        }
    }

    #[test]
    fn exit_reason_preferred() {
        assert_eq!(exit_reason(b"noise\nocf-exit-reason:bad thing\nmore\n").as_deref(), Some("bad thing"));
        assert_eq!(exit_reason(b"a\nb\n").as_deref(), Some("b"));
        assert_eq!(exit_reason(b""), None);
    }
}
