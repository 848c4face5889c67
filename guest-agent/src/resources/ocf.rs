//! `kind = "ocf"`: an OCF resource agent (Debian's `resource-agents`),
//! run unmodified through [`tandem_monitors::ocf::OcfAgent`].
//!
//! `meta-data` runs when the resource is built: an agent that does not print
//! OCF meta-data (`<resource-agent>` XML advertising `start`, `stop` and
//! `monitor`) is refused, as is a configuration that lacks a parameter the
//! agent marks `required`; timeouts the configuration leaves out are taken
//! from the agent's advertised ones. `validate-all` runs before the first
//! start; `start` runs in the resource's service cgroup (daemons the agent
//! launches stay there), `monitor`, `stop` and `validate-all` in its
//! operations cgroup. The instance name (`OCF_RESOURCE_INSTANCE`) is
//! `<group>-<resource>`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tandem_config::OcfResource as OcfConfig;
use tandem_monitors::ocf::{OcfAction, OcfAgent, OcfCode, OcfResult};

use super::process::{Placement, error_chain};
use super::{BoxFuture, Health, Resource, ResourceEnv, ResourceError, StartContext};

/// Limit for `meta-data` (agents advertise about 5 s; it prints a constant text).
const META_DATA_TIMEOUT: Duration = Duration::from_secs(15);

/// What an agent's `meta-data` says that Tandem uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OcfMetadata {
    /// Each advertised action and its advertised timeout, if it gives one (the first entry
    /// of an action wins: later ones are role-specific monitors).
    pub actions: BTreeMap<String, Option<Duration>>,
    /// Each parameter and whether the agent marks it `required`.
    pub parameters: BTreeMap<String, bool>,
}

/// Why an agent's meta-data is not OCF meta-data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    /// Not XML at all.
    #[error("its meta-data is not XML ({0})")]
    NotXml(String),
    /// XML, but not `<resource-agent>`.
    #[error("its meta-data is <{0}>, not <resource-agent>")]
    NotAnAgent(String),
    /// An action Tandem needs is not advertised.
    #[error("its meta-data does not advertise the `{0}` action (Tandem needs start, stop and monitor)")]
    MissingAction(&'static str),
}

/// Parses `meta-data` output (OCF resource agent API, `<resource-agent>` with `<parameters>`
/// and `<actions>`).
pub fn parse_metadata(xml: &str) -> Result<OcfMetadata, MetadataError> {
    // Agents start with `<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">`.
    let options = roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() };
    let doc = roxmltree::Document::parse_with_options(xml.trim(), options)
        .map_err(|e| MetadataError::NotXml(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "resource-agent" {
        return Err(MetadataError::NotAnAgent(root.tag_name().name().to_string()));
    }
    let mut meta = OcfMetadata::default();
    let children = |name: &'static str| {
        root.children().filter(move |n| n.has_tag_name(name)).flat_map(|n| n.children()).filter(|n| n.is_element())
    };
    for p in children("parameters").filter(|n| n.has_tag_name("parameter")) {
        if let Some(name) = p.attribute("name") {
            let required = matches!(p.attribute("required"), Some("1" | "true" | "yes"));
            meta.parameters.insert(name.to_string(), required);
        }
    }
    for a in children("actions").filter(|n| n.has_tag_name("action")) {
        if let Some(name) = a.attribute("name") {
            let timeout = a.attribute("timeout").and_then(parse_ocf_duration);
            meta.actions.entry(name.to_string()).or_insert(timeout);
        }
    }
    for needed in ["start", "stop", "monitor"] {
        if !meta.actions.contains_key(needed) {
            return Err(MetadataError::MissingAction(needed));
        }
    }
    Ok(meta)
}

/// An OCF/Pacemaker time: a number with an optional unit (`20s`, `20`, `90sec`, `2m`,
/// `2min`, `1h`, `500ms`); bare numbers are seconds.
fn parse_ocf_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => n,
        "ms" | "msec" | "msecs" => n / 1000.0,
        "m" | "min" | "mins" => n * 60.0,
        "h" | "hr" | "hrs" => n * 3600.0,
        _ => return None,
    };
    (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs))
}

/// Runs the agent's `meta-data` to completion from synchronous code (resources are built
/// before the agent's runtime does anything else): on a thread of its own with a small
/// runtime, so that it works inside or outside a tokio runtime.
fn read_metadata(agent: &OcfAgent) -> Result<String, String> {
    let agent = agent.clone();
    let run = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime to run meta-data: {e}"))?;
        rt.block_on(agent.run(&OcfAction::MetaData, META_DATA_TIMEOUT)).map_err(|e| error_chain(&e))
    });
    let r = run.join().map_err(|_| "running meta-data panicked".to_string())??;
    if r.output.timed_out {
        return Err(format!("meta-data did not finish within {} s; it was killed", META_DATA_TIMEOUT.as_secs()));
    }
    if r.code != Some(OcfCode::Success) {
        let why = r.reason.map(|s| format!(": {s}")).unwrap_or_default();
        return Err(format!("meta-data failed ({}){why}", r.output.termination));
    }
    Ok(String::from_utf8_lossy(&r.output.stdout).into_owned())
}

/// An `ocf` resource.
#[derive(Debug)]
pub struct OcfResource {
    id: String,
    agent: OcfAgent,
    place: Placement,
    validated: AtomicBool,
    start_timeout: Duration,
    stop_timeout: Duration,
    monitor_timeout: Duration,
}

impl OcfResource {
    /// Checks that the agent is installed, is an OCF resource agent (its meta-data), gets
    /// every parameter it requires, and that the parameter names are usable; settles the
    /// operation timeouts (configuration, else the agent's meta-data, else the defaults).
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
        let not_an_agent = |why: String| {
            ResourceError::config(
                &id,
                format!("{} at {} is not a usable OCF resource agent: {why}", agent.name(), agent.path().display()),
            )
        };
        let meta =
            parse_metadata(&read_metadata(&agent).map_err(&not_an_agent)?).map_err(|e| not_an_agent(e.to_string()))?;
        let missing: Vec<&str> = meta
            .parameters
            .iter()
            .filter(|(p, required)| **required && !cfg.params.contains_key(*p))
            .map(|(p, _)| p.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(ResourceError::config(
                &id,
                format!(
                    "OCF agent {} requires the parameter(s) {}: add them to `params`",
                    agent.name(),
                    missing.join(", ")
                ),
            ));
        }
        for p in cfg.params.keys().filter(|p| !meta.parameters.contains_key(*p)) {
            tracing::warn!(resource = %id, "OCF agent {} does not declare the parameter {p:?}; check its name", agent.name());
        }
        let [start, stop, monitor] = OcfConfig::DEFAULT_TIMEOUTS;
        let timeout = |action: &str, configured: Option<Duration>, default: Duration| {
            let advised = meta.actions.get(action).copied().flatten();
            if let (Some(c), Some(a)) = (configured, advised)
                && c < a
            {
                tracing::warn!(
                    resource = %id,
                    "{action}_timeout {} ms is shorter than the {} ms {} advises",
                    c.as_millis(),
                    a.as_millis(),
                    agent.name()
                );
            }
            configured.or(advised).unwrap_or(default)
        };
        Ok(Self {
            start_timeout: timeout("start", cfg.start_timeout, start),
            stop_timeout: timeout("stop", cfg.stop_timeout, stop),
            monitor_timeout: timeout("monitor", cfg.monitor_timeout, monitor),
            id,
            agent,
            place: Placement::new(env.cgroup.as_deref(), name, None),
            validated: AtomicBool::new(false),
        })
    }

    /// The operation limits in use: start, stop, monitor.
    pub fn timeouts(&self) -> [Duration; 3] {
        [self.start_timeout, self.stop_timeout, self.monitor_timeout]
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
        let r = self.run("start", OcfAction::ValidateAll, self.start_timeout, false).await?;
        if r.output.timed_out {
            return Err(ResourceError::timeout("start", &self.id, self.start_timeout));
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
            let r = self.run("start", OcfAction::Start, self.start_timeout, true).await?;
            if r.output.timed_out {
                self.place.kill_service(&self.id, "start", "start timed out").await?;
                return Err(ResourceError::timeout("start", &self.id, self.start_timeout));
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
            let r = self.run("stop", OcfAction::Stop, self.stop_timeout, false).await?;
            // Whatever the agent said, no process of the service may remain.
            self.place.kill_service(&self.id, "stop", "after the agent's stop").await?;
            if r.output.timed_out {
                return Err(ResourceError::timeout("stop", &self.id, self.stop_timeout));
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
            let r = match self.run("check", OcfAction::Monitor, self.monitor_timeout, false).await {
                Ok(r) => r,
                Err(e) => return Health::Failed(e.to_string()),
            };
            if r.output.timed_out {
                return Health::Failed(format!(
                    "{} monitor did not finish within {} ms; it was killed",
                    self.agent.name(),
                    self.monitor_timeout.as_millis()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ocf_times_and_meta_data_shapes() {
        let s = Duration::from_secs;
        for (text, want) in [("20s", s(20)), ("20", s(20)), ("90sec", s(90)), ("2m", s(120)), ("2min", s(120))] {
            assert_eq!(parse_ocf_duration(text), Some(want), "{text}");
        }
        assert_eq!(parse_ocf_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_ocf_duration("1h"), Some(s(3600)));
        for bad in ["", "s", "0", "10 parsecs", "-5s"] {
            assert_eq!(parse_ocf_duration(bad), None, "{bad:?}");
        }
        let xml = r#"<?xml version="1.0"?>
            <!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
            <resource-agent name="x"><parameters><parameter name="a" required="1"/><parameter name="b"/></parameters>
            <actions><action name="start" timeout="30s"/><action name="stop"/>
            <action name="monitor" timeout="10s" interval="5s"/><action name="monitor" role="Promoted" timeout="99s"/>
            </actions></resource-agent>"#;
        let m = parse_metadata(xml).unwrap();
        assert_eq!(m.parameters, BTreeMap::from([("a".into(), true), ("b".into(), false)]));
        assert_eq!(m.actions["start"], Some(s(30)));
        assert_eq!(m.actions["stop"], None);
        assert_eq!(m.actions["monitor"], Some(s(10)), "the first monitor entry wins");
        assert_eq!(
            parse_metadata(&xml.replace(r#"<action name="stop"/>"#, "")),
            Err(MetadataError::MissingAction("stop"))
        );
        assert_eq!(parse_metadata("<html/>"), Err(MetadataError::NotAnAgent("html".into())));
        assert!(matches!(parse_metadata("usage: foo"), Err(MetadataError::NotXml(_))));
    }
}
