//! The `command` method: any program, run with the target node's name appended.
//!
//! It also gets `TANDEM_FENCE_NODE` (the name), `TANDEM_FENCE_NODE_ID` (the id) and
//! `TANDEM_FENCE_ACTION=off` in its environment. Exit status 0 means "the node is off";
//! anything else, or running past the method's `timeout`, is a failed attempt, and on
//! timeout its whole process group is killed.

use std::time::Duration;

use tandem_config::CommandFence;
use tandem_monitors::exec::{CommandSpec, DEFAULT_KILL_GRACE, RunError, Termination, run_command};

use super::summarize;

/// Why a fence command did not confirm its target off.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The configured command is empty.
    #[error("fence command is empty: give the program first, e.g. [\"/usr/local/sbin/poweroff-node\"]")]
    Empty,
    /// The program could not be started.
    #[error("cannot run fence command {program}")]
    Run {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: RunError,
    },
    /// It did not finish in time; its process group was killed.
    #[error("fence command {program} did not finish within {:.1} s; its process group was killed (last output: {output})", timeout.as_secs_f64())]
    TimedOut {
        /// The program.
        program: String,
        /// The method's timeout.
        timeout: Duration,
        /// What it printed.
        output: String,
    },
    /// It ended with something other than exit 0.
    #[error("fence command {program} failed ({termination}): {output}")]
    Failed {
        /// The program.
        program: String,
        /// How it ended.
        termination: Termination,
        /// What it printed.
        output: String,
    },
}

impl CommandError {
    /// True when retrying cannot help (missing or unexecutable program).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            CommandError::Empty
                | CommandError::Run { source: RunError::NotFound { .. } | RunError::PermissionDenied { .. }, .. }
        )
    }
}

/// A node's fence command, ready to run.
#[derive(Debug, Clone)]
pub struct CommandMethod {
    argv: Vec<String>,
    timeout: Duration,
}

impl CommandMethod {
    /// From the node's `fence = { kind = "command", … }`.
    pub fn from_config(c: &CommandFence) -> Result<Self, CommandError> {
        if c.command.first().is_none_or(|p| p.trim().is_empty()) {
            return Err(CommandError::Empty);
        }
        Ok(Self { argv: c.command.clone(), timeout: c.timeout })
    }

    /// Runs the command against node `name` (id `id`); `Ok` with its output's summary when
    /// it exited 0.
    pub async fn run(&self, name: &str, id: u32) -> Result<String, CommandError> {
        let program = self.argv[0].clone();
        let spec = CommandSpec::new(&program)
            .args(self.argv[1..].iter().chain(std::iter::once(&name.to_string())))
            .env("TANDEM_FENCE_NODE", name)
            .env("TANDEM_FENCE_NODE_ID", id.to_string())
            .env("TANDEM_FENCE_ACTION", "off")
            .timeout(self.timeout)
            .kill_grace(DEFAULT_KILL_GRACE.min(self.timeout / 4));
        let out = run_command(&spec).await.map_err(|source| CommandError::Run { program: program.clone(), source })?;
        let output = summarize(&out.stdout, &out.stderr, None);
        if out.timed_out {
            return Err(CommandError::TimedOut { program, timeout: self.timeout, output });
        }
        match out.exit_code() {
            Some(0) => Ok(output),
            _ => Err(CommandError::Failed { program, termination: out.termination, output }),
        }
    }
}
