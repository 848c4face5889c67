//! The `agent` method: a fence agent of Debian's `fence-agents` package, run unmodified.
//!
//! fence-agents read their parameters as `key=value` lines on stdin (the interface
//! Pacemaker's fencer uses): `action=off`, `ip=…`, `username=…`, `password=…`, `plug=…`.
//! Exit status 0 means the action succeeded; for `status`, 0 means the target is on and 2
//! that it is off (anything else: the agent could not tell). `AGENT -o metadata` prints an
//! XML description whose `<actions>` say whether `status` exists.
//!
//! Tandem runs `off`, then confirms with `status` unless the agent's metadata lacks it.
//! Every run is bounded by the method's `timeout`, after which the agent's whole process
//! group is killed (it may have forked `ipmitool`, `ssh`, …). The password is read from its
//! file or variable at each attempt, written only to the agent's stdin, and removed from
//! anything the agent prints before it reaches a log or an error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_config::AgentFence;
use tandem_monitors::exec::{CommandSpec, RunError, RunOutput, Termination, resolve_program, run_command};
use tandem_monitors::secret::SecretError;
use tandem_monitors::{Secret, SecretSource};
use tokio::sync::OnceCell;

use super::{Confirmation, summarize};

/// Where fence agents are looked for after PATH.
pub const AGENT_DIRS: &[&str] = &["/usr/sbin", "/sbin"];

/// fence-agents' exit status of `status` for a target that is off.
const STATUS_OFF: i32 = 2;
/// fence-agents' exit status of `status` for a target that is on.
const STATUS_ON: i32 = 0;

/// Why a fence agent did not confirm its target off.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent program does not exist.
    #[error(
        "fence agent {agent} not found in PATH, /usr/sbin or /sbin (install Debian's fence-agents, or give the full path)"
    )]
    NotFound {
        /// The agent as configured.
        agent: String,
    },
    /// A parameter cannot be passed on stdin.
    #[error("fence agent parameter {key:?}: {why}")]
    BadParam {
        /// The parameter name.
        key: String,
        /// What is wrong with it.
        why: String,
    },
    /// `-o metadata` failed or printed something that is not fence-agents metadata.
    #[error("fence agent {agent} gave no usable metadata (`{agent} -o metadata`): {why}")]
    Metadata {
        /// The agent.
        agent: String,
        /// What was wrong.
        why: String,
    },
    /// The agent cannot power a node off.
    #[error("fence agent {agent} has no `off` action in its metadata; it cannot fence")]
    NoOff {
        /// The agent.
        agent: String,
    },
    /// The agent could not be started.
    #[error("cannot run fence agent {agent} (action {action})")]
    Run {
        /// The agent.
        agent: String,
        /// The action.
        action: &'static str,
        /// Why.
        #[source]
        source: RunError,
    },
    /// The agent did not finish in time; its process group was killed.
    #[error("fence agent {agent} action {action} did not finish within {:.1} s; its process group was killed (last output: {output})", timeout.as_secs_f64())]
    TimedOut {
        /// The agent.
        agent: String,
        /// The action.
        action: &'static str,
        /// The method's timeout.
        timeout: Duration,
        /// What it printed, passwords removed.
        output: String,
    },
    /// The action failed.
    #[error("fence agent {agent} action {action} failed ({termination}): {output}")]
    Failed {
        /// The agent.
        agent: String,
        /// The action.
        action: &'static str,
        /// How it ended.
        termination: Termination,
        /// What it printed, passwords removed.
        output: String,
    },
    /// `off` succeeded but `status` says the target is still on.
    #[error("fence agent {agent} reported `off` done, but `status` says the node is still on ({output})")]
    StillOn {
        /// The agent.
        agent: String,
        /// What `status` printed.
        output: String,
    },
    /// `status` ended with neither 0 (on) nor 2 (off).
    #[error("fence agent {agent} `status` could not tell whether the node is off ({termination}): {output}")]
    StatusUnknown {
        /// The agent.
        agent: String,
        /// How it ended.
        termination: Termination,
        /// What it printed, passwords removed.
        output: String,
    },
    /// The password could not be read.
    #[error("fence agent {agent}: no password")]
    Secret {
        /// The agent.
        agent: String,
        /// Why.
        #[source]
        source: SecretError,
    },
}

impl AgentError {
    /// True when retrying cannot help (installation or configuration problems).
    pub fn is_permanent(&self) -> bool {
        matches!(self, AgentError::NotFound { .. } | AgentError::BadParam { .. } | AgentError::NoOff { .. })
    }
}

/// What an agent's `-o metadata` says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentMetadata {
    /// `<resource-agent name=…>`.
    pub name: String,
    /// The actions it supports (`off`, `status`, `monitor`, …).
    pub actions: BTreeSet<String>,
    /// The parameters it accepts on stdin.
    pub parameters: BTreeSet<String>,
}

impl AgentMetadata {
    /// Parses fence-agents metadata XML.
    pub fn parse(xml: &str) -> Result<Self, String> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| format!("not XML: {e}"))?;
        let root = doc.root_element();
        if root.tag_name().name() != "resource-agent" {
            return Err(format!("root element is <{}>, not <resource-agent>", root.tag_name().name()));
        }
        let children = |parent: &str, child: &str| -> BTreeSet<String> {
            root.children()
                .filter(|n| n.has_tag_name(parent))
                .flat_map(|p| p.children().filter(|n| n.has_tag_name(child)))
                .filter_map(|n| n.attribute("name").map(str::to_string))
                .collect()
        };
        let actions = children("actions", "action");
        if actions.is_empty() {
            return Err("no <actions>".into());
        }
        Ok(Self {
            name: root.attribute("name").unwrap_or_default().to_string(),
            actions,
            parameters: children("parameters", "parameter"),
        })
    }

    /// Whether the agent lists `action`.
    pub fn supports(&self, action: &str) -> bool {
        self.actions.contains(action)
    }
}

/// Runs `program -o metadata` (bounded by `timeout`) and parses what it prints.
pub async fn read_metadata(program: &Path, timeout: Duration) -> Result<AgentMetadata, AgentError> {
    let agent = program.display().to_string();
    let spec = CommandSpec::new(program).args(["-o", "metadata"]).timeout(timeout).kill_grace(grace(timeout));
    let out = run_command(&spec).await.map_err(|source| AgentError::Run {
        agent: agent.clone(),
        action: "metadata",
        source,
    })?;
    if out.timed_out || out.exit_code() != Some(0) {
        return Err(AgentError::Metadata {
            agent,
            why: format!("{}: {}", out.termination, summarize(&out.stdout, &out.stderr, None)),
        });
    }
    AgentMetadata::parse(&String::from_utf8_lossy(&out.stdout)).map_err(|why| AgentError::Metadata { agent, why })
}

/// SIGTERM → SIGKILL grace that fits a run of `timeout`.
fn grace(timeout: Duration) -> Duration {
    tandem_monitors::exec::DEFAULT_KILL_GRACE.min(timeout / 4)
}

/// A node's fence agent, ready to run.
#[derive(Debug)]
pub struct AgentMethod {
    agent: String,
    params: BTreeMap<String, String>,
    password: Option<SecretSource>,
    timeout: Duration,
    metadata: OnceCell<AgentMetadata>,
}

impl AgentMethod {
    /// From the node's `fence = { kind = "agent", … }`; re-checks the parameters (the config
    /// may not have gone through validation).
    pub fn from_config(a: &AgentFence) -> Result<Self, AgentError> {
        for (k, v) in &a.params {
            if let Some(why) = tandem_config::fence_param_problem(k, v) {
                return Err(AgentError::BadParam { key: k.clone(), why });
            }
        }
        Ok(Self {
            agent: a.agent.clone(),
            params: a.params.clone(),
            password: a.password_source(),
            timeout: a.timeout,
            metadata: OnceCell::new(),
        })
    }

    /// The agent's program path.
    pub fn program(&self) -> Result<PathBuf, AgentError> {
        resolve_program(&self.agent, AGENT_DIRS)
            .filter(|p| p.is_file())
            .ok_or_else(|| AgentError::NotFound { agent: self.agent.clone() })
    }

    /// The agent's metadata, read once per method (a failed read is retried next time).
    pub async fn metadata(&self) -> Result<&AgentMetadata, AgentError> {
        let program = self.program()?;
        self.metadata.get_or_try_init(|| read_metadata(&program, self.timeout)).await
    }

    /// The stdin the agent gets for `action`.
    fn stdin(&self, action: &str, password: Option<&Secret>) -> Vec<u8> {
        let mut s = format!("action={action}\n");
        for (k, v) in &self.params {
            s.push_str(&format!("{k}={v}\n"));
        }
        if let Some(p) = password {
            s.push_str(&format!("password={}\n", p.expose()));
        }
        s.into_bytes()
    }

    /// Runs `action` once, bounded by the timeout.
    async fn run(
        &self,
        program: &Path,
        action: &'static str,
        password: Option<&Secret>,
    ) -> Result<RunOutput, AgentError> {
        let spec = CommandSpec::new(program)
            .stdin(self.stdin(action, password))
            .timeout(self.timeout)
            .kill_grace(grace(self.timeout));
        let out =
            run_command(&spec).await.map_err(|source| AgentError::Run { agent: self.agent.clone(), action, source })?;
        if out.timed_out {
            return Err(AgentError::TimedOut {
                agent: self.agent.clone(),
                action,
                timeout: self.timeout,
                output: summarize(&out.stdout, &out.stderr, password.map(Secret::expose)),
            });
        }
        Ok(out)
    }

    /// Powers the target off, then confirms it with `status` when the agent has it.
    /// Returns how it was confirmed and the agent's own words.
    pub async fn off_and_confirm(&self) -> Result<(Confirmation, String), AgentError> {
        let program = self.program()?;
        let has_status = {
            let md = self.metadata().await?;
            if !md.supports("off") {
                return Err(AgentError::NoOff { agent: self.agent.clone() });
            }
            md.supports("status")
        };
        let password = match &self.password {
            Some(src) => {
                Some(src.resolve().map_err(|source| AgentError::Secret { agent: self.agent.clone(), source })?)
            }
            None => None,
        };
        let pw = password.as_ref();
        let said = |o: &RunOutput| summarize(&o.stdout, &o.stderr, pw.map(Secret::expose));

        let off = self.run(&program, "off", pw).await?;
        if off.exit_code() != Some(0) {
            return Err(AgentError::Failed {
                agent: self.agent.clone(),
                action: "off",
                termination: off.termination,
                output: said(&off),
            });
        }
        if !has_status {
            return Ok((Confirmation::OffWithoutStatus, said(&off)));
        }
        let status = self.run(&program, "status", pw).await?;
        match status.exit_code() {
            Some(STATUS_OFF) => Ok((Confirmation::StatusOff, format!("{}; status: {}", said(&off), said(&status)))),
            Some(STATUS_ON) => Err(AgentError::StillOn { agent: self.agent.clone(), output: said(&status) }),
            _ => Err(AgentError::StatusUnknown {
                agent: self.agent.clone(),
                termination: status.termination,
                output: said(&status),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_actions_and_parameters() {
        let xml = r#"<?xml version="1.0" ?>
<resource-agent name="fence_x" shortdesc="x">
<parameters>
	<parameter name="action" unique="0" required="1"><content type="string" default="reboot"/></parameter>
	<parameter name="ip" unique="0" required="0"/>
</parameters>
<actions>
	<action name="on" automatic="0"/>
	<action name="off" />
	<action name="metadata" />
</actions>
</resource-agent>"#;
        let md = AgentMetadata::parse(xml).unwrap();
        assert_eq!(md.name, "fence_x");
        assert!(md.supports("off") && !md.supports("status"));
        assert_eq!(md.parameters.iter().map(String::as_str).collect::<Vec<_>>(), ["action", "ip"]);
        assert!(AgentMetadata::parse("<html/>").unwrap_err().contains("resource-agent"));
        assert!(AgentMetadata::parse("usage: fence_x [options]").is_err());
    }

    #[test]
    fn stdin_lines_and_secret_hygiene() {
        let cfg = AgentFence {
            agent: "fence_x".into(),
            params: [("ip".to_string(), "127.0.0.1".to_string()), ("plug".into(), "vm1".into())].into(),
            password_file: None,
            password_env: Some("TANDEM_TEST_FENCE_PW".into()),
            timeout: Duration::from_secs(5),
        };
        let m = AgentMethod::from_config(&cfg).unwrap();
        let pw = Secret::new("hunter2");
        let stdin = String::from_utf8(m.stdin("off", Some(&pw))).unwrap();
        assert_eq!(stdin, "action=off\nip=127.0.0.1\nplug=vm1\npassword=hunter2\n");
        assert!(!format!("{m:?}").contains("hunter2"));

        let bad = AgentFence { params: [("plug".to_string(), "vm1\naction=on".to_string())].into(), ..cfg };
        assert!(matches!(AgentMethod::from_config(&bad), Err(AgentError::BadParam { .. })));
    }
}
