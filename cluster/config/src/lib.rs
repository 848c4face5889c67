//! The declarative cluster configuration of Tandem's agents.
//!
//! A TOML file describes the cluster, its nodes, heartbeat links, the lease
//! area, and failover groups with their resources and monitors. [`load`]
//! reads and checks it; every problem is reported together, each with
//! `file:line:column`, the field (`group "pg".resource "data".device`) and
//! what to do. See docs/configuration.md for every field.
//!
//! ```no_run
//! match tandem_config::load("/etc/tandem/tandem.toml") {
//!     Ok(config) => println!("{} nodes", config.nodes.len()),
//!     Err(errors) => eprintln!("{errors}"),
//! }
//! ```

#![warn(missing_docs)]

mod check;
pub mod diagnostic;
pub mod duration;
pub mod model;

use std::path::Path;

pub use check::{Checked, MAX_NAME_LEN, MAX_NODE_ID, fence_param_problem};
pub use diagnostic::{ConfigErrors, Diagnostic, Location, ProblemKind, Severity};
pub use model::*;

/// Reads and checks the configuration file at `path`.
///
/// Warnings are dropped; use [`check`] to see them.
pub fn load(path: impl AsRef<Path>) -> Result<ClusterConfig, ConfigErrors> {
    check(path).map(|c| c.config)
}

/// Reads and checks the configuration file at `path`, returning the
/// configuration with any warnings (`tandem-guest validate`).
pub fn check(path: impl AsRef<Path>) -> Result<Checked, ConfigErrors> {
    let path = path.as_ref();
    let source = std::fs::read_to_string(path).map_err(|e| ConfigErrors::io(path, &e))?;
    check_str(&source, path)
}

/// Checks configuration text; `file` is the name diagnostics report.
pub fn check_str(source: &str, file: impl AsRef<Path>) -> Result<Checked, ConfigErrors> {
    check::check_source(source, file.as_ref())
}

/// Writes a checked configuration back as TOML that loads to an equal one.
pub fn to_toml(config: &ClusterConfig) -> String {
    toml::to_string(config).expect("the configuration model always serialises to TOML")
}

/// The JSON Schema of the configuration file (docs/config.schema.json).
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(ClusterConfig);
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema serialises");
    text.push('\n');
    text
}
