//! Decoding and validation: the TOML tree (with byte spans) is decoded one
//! element at a time, so that an error in one `[[node]]` does not hide an
//! error in the next, and then checked as a whole. Every diagnostic is
//! located by a path into the tree, which yields both its span and its
//! human-readable field name (`group "pg".resource "data".device`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use tandem_monitors::SpecError;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::diagnostic::{ConfigErrors, Diagnostic, Location, ProblemKind, Severity};
use crate::duration;
use crate::model::*;

/// Highest node id accepted (the lease area has one host slot per id).
pub const MAX_NODE_ID: u32 = 2000;

/// Longest name (cluster, node, link, group, resource, monitor) accepted; the
/// lease area stores group names in fields of this size.
pub const MAX_NAME_LEN: usize = 64;

/// A configuration that passed every check, with the warnings found.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// The configuration.
    pub config: ClusterConfig,
    /// Advice that does not block loading.
    pub warnings: Vec<Diagnostic>,
}

/// One step of a path into the TOML tree.
#[derive(Debug, Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}
use Seg::{Index as I, Key as K};

type Value<'s> = Spanned<DeValue<'s>>;

pub(crate) fn check_source(source: &str, file: &Path) -> Result<Checked, ConfigErrors> {
    let mut c = Checker { file: file.to_path_buf(), src: source, root: None, errors: Vec::new(), warnings: Vec::new() };
    let (root, syntax) = DeTable::parse_recoverable(source);
    for e in syntax {
        let span = e.span().unwrap_or(0..0);
        c.push(Severity::Error, ProblemKind::Syntax, span, String::new(), format!("invalid TOML: {}", e.message()));
    }
    if !c.errors.is_empty() {
        // A partly parsed tree would only add confusing follow-up errors.
        return Err(c.finish_err());
    }
    let root_span = root.span();
    c.root = Some(Spanned::new(root_span, DeValue::Table(root.into_inner())));
    let config = c.run();
    c.errors.sort_by_key(|d| d.span.as_ref().map(|s| s.start));
    c.warnings.sort_by_key(|d| d.span.as_ref().map(|s| s.start));
    match config {
        Some(config) if c.errors.is_empty() => Ok(Checked { config, warnings: c.warnings }),
        _ => Err(c.finish_err()),
    }
}

struct Checker<'s> {
    file: PathBuf,
    src: &'s str,
    root: Option<Value<'s>>,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

/// What decoding yields, aligned with the elements of each array in the file.
struct Decoded {
    cluster: Option<ClusterSection>,
    nodes: Vec<Option<Node>>,
    links: Vec<Option<Link>>,
    lease: Option<Option<LeaseSettings>>,
    groups: Vec<DecodedGroup>,
    api: Option<ApiSettings>,
    guest_link: Option<Option<GuestLinkSettings>>,
    host_link: Option<Option<HostLinkSettings>>,
    networks: Vec<Option<Network>>,
}

struct DecodedGroup {
    header: Option<FailoverGroup>,
    resources: Vec<Option<Resource>>,
    monitors: Vec<Option<Monitor>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseFields {
    device: PathBuf,
    #[serde(default, with = "duration::option")]
    renewal_interval: Option<Duration>,
    #[serde(default, with = "duration::option")]
    io_timeout: Option<Duration>,
    #[serde(default, with = "duration::option")]
    fence_deadline: Option<Duration>,
    #[serde(default, with = "duration::option")]
    kill_margin: Option<Duration>,
    #[serde(default, with = "duration::option")]
    host_dead_timeout: Option<Duration>,
    #[serde(default)]
    watchdog: Option<PathBuf>,
}

const SECTIONS: &str = "cluster, node, link, lease, group, api, guest_link, host_link, network";

impl<'s> Checker<'s> {
    fn finish_err(&mut self) -> ConfigErrors {
        ConfigErrors { errors: std::mem::take(&mut self.errors), warnings: std::mem::take(&mut self.warnings) }
    }

    fn push(&mut self, severity: Severity, kind: ProblemKind, span: Range<usize>, field: String, message: String) {
        let d = Diagnostic {
            severity,
            kind,
            file: self.file.clone(),
            location: Some(Location::of_offset(self.src, span.start)),
            span: Some(span),
            field,
            message,
        };
        match severity {
            Severity::Error => self.errors.push(d),
            Severity::Warning => self.warnings.push(d),
        }
    }

    fn root(&self) -> &Value<'s> {
        self.root.as_ref().expect("root is set before checks run")
    }

    /// Span of the value at `path` (or of its key, with `at_key`), falling
    /// back to the deepest part of the path that exists, and the path's display.
    fn locate(&self, path: &[Seg<'_>], at_key: bool) -> (Range<usize>, String) {
        let mut cur = self.root();
        let mut span = cur.span();
        let mut display = String::new();
        let mut found = true;
        for (i, seg) in path.iter().enumerate() {
            match *seg {
                Seg::Key(k) => {
                    if !display.is_empty() {
                        display.push('.');
                    }
                    display.push_str(k);
                    if !found {
                        continue;
                    }
                    match cur.get_ref().as_table().and_then(|t| t.get_key_value(k)) {
                        Some((key, v)) => {
                            span = if at_key && i + 1 == path.len() { key.span() } else { v.span() };
                            cur = v;
                        }
                        None => found = false,
                    }
                }
                Seg::Index(n) => {
                    let elem = if found { cur.get_ref().as_array().and_then(|a| a.get(n)) } else { None };
                    match elem {
                        Some(v) => {
                            display.push_str(&element_label(v, n));
                            span = v.span();
                            cur = v;
                        }
                        None => {
                            display.push_str(&format!("[{n}]"));
                            found = false;
                        }
                    }
                }
            }
        }
        (span, display)
    }

    fn error(&mut self, kind: ProblemKind, path: &[Seg<'_>], message: String) {
        let (span, field) = self.locate(path, false);
        self.push(Severity::Error, kind, span, field, message);
    }

    fn error_at_key(&mut self, kind: ProblemKind, path: &[Seg<'_>], message: String) {
        let (span, field) = self.locate(path, true);
        self.push(Severity::Error, kind, span, field, message);
    }

    fn warn(&mut self, kind: ProblemKind, path: &[Seg<'_>], message: String) {
        let (span, field) = self.locate(path, false);
        self.push(Severity::Warning, kind, span, field, message);
    }

    /// The display path of whatever lies at byte `offset`.
    fn path_at(&self, offset: usize) -> String {
        let mut display = String::new();
        let mut cur = self.root();
        loop {
            let next = match cur.get_ref() {
                DeValue::Table(t) => {
                    t.iter().find(|(k, v)| k.span().contains(&offset) || covers(v, offset)).map(|(k, v)| {
                        if !display.is_empty() {
                            display.push('.');
                        }
                        display.push_str(k.get_ref());
                        v
                    })
                }
                DeValue::Array(a) => a.iter().enumerate().find(|(_, v)| covers(v, offset)).map(|(n, v)| {
                    display.push_str(&element_label(v, n));
                    v
                }),
                _ => None,
            };
            match next {
                Some(v) => cur = v,
                None => return display,
            }
        }
    }

    /// Deserialises one value, reporting failures at their exact positions.
    ///
    /// Serde stops at the first problem; to report every bad field of a
    /// table, the offending key is removed and the table decoded again
    /// (at most once per key). The "missing field" that removing a
    /// required key causes is not reported: its real error already was.
    fn decode<T: DeserializeOwned>(&mut self, v: &Value<'s>) -> Option<T> {
        let mut current = v.clone();
        let mut removed: Vec<String> = Vec::new();
        loop {
            let e = match T::deserialize(ValueDeserializer::from(current.clone())) {
                Ok(t) => return if removed.is_empty() { Some(t) } else { None },
                Err(e) => e,
            };
            let span = e.span().unwrap_or_else(|| current.span());
            let msg = e.message().trim().to_string();
            let consequence = removed.iter().any(|k| msg.starts_with(&format!("missing field `{k}`")));
            if !consequence {
                let kind = if msg.starts_with("unknown field") { ProblemKind::UnknownField } else { ProblemKind::Type };
                let field = self.path_at(span.start);
                self.push(Severity::Error, kind, span.clone(), field, explain_serde(&msg));
            }
            // The top-level key of this table the error lies in, if any.
            let culprit = current.get_ref().as_table().and_then(|t| {
                t.iter()
                    .find(|(k, v)| k.span().contains(&span.start) || covers(v, span.start))
                    .map(|(k, _)| k.get_ref().to_string())
            });
            let key = culprit.filter(|k| !removed.contains(k))?;
            let DeValue::Table(t) = current.get_mut() else { return None };
            t.remove(key.as_str());
            removed.push(key);
        }
    }

    /// Elements of an array of tables (`[[node]]`); absent means none.
    fn elements(&mut self, path: &[Seg<'_>]) -> Vec<Value<'s>> {
        let Some(cur) = self.lookup(path) else { return Vec::new() };
        match cur.get_ref().as_array() {
            Some(a) => a.iter().cloned().collect(),
            None => {
                self.error(
                    ProblemKind::Type,
                    path,
                    format!("expected an array of tables: write each entry as [[{}]]", dotted_keys(path)),
                );
                Vec::new()
            }
        }
    }

    fn run(&mut self) -> Option<ClusterConfig> {
        let decoded = self.decode_all();
        self.validate(&decoded);
        let Decoded { cluster, nodes, links, lease, groups, api, guest_link, host_link, networks } = decoded;
        let mut groups_out = Vec::new();
        for g in groups {
            let mut header = g.header?;
            header.resources = g.resources.into_iter().collect::<Option<_>>()?;
            header.monitors = g.monitors.into_iter().collect::<Option<_>>()?;
            groups_out.push(header);
        }
        Some(ClusterConfig {
            cluster: cluster?,
            nodes: nodes.into_iter().collect::<Option<_>>()?,
            links: links.into_iter().collect::<Option<_>>()?,
            lease: lease?,
            groups: groups_out,
            api: api?,
            guest_link: guest_link?,
            host_link: host_link?,
            networks: networks.into_iter().collect::<Option<_>>()?,
        })
    }

    fn decode_all(&mut self) -> Decoded {
        let top: Vec<(Spanned<String>, Value<'s>)> = match self.root().get_ref().as_table() {
            Some(t) => t.iter().map(|(k, v)| (Spanned::new(k.span(), k.get_ref().to_string()), v.clone())).collect(),
            None => Vec::new(),
        };
        for (k, _) in &top {
            if !SECTIONS.split(", ").any(|s| s == k.get_ref()) {
                let hint = match k.get_ref().as_str() {
                    "nodes" => " (write [[node]])",
                    "links" => " (write [[link]])",
                    "groups" => " (write [[group]])",
                    "networks" => " (write [[network]])",
                    _ => "",
                };
                self.error_at_key(
                    ProblemKind::UnknownField,
                    &[K(k.get_ref())],
                    format!("unknown section `{}`{hint}; the sections are: {SECTIONS}", k.get_ref()),
                );
            }
        }
        let get = |name: &str| top.iter().find(|(k, _)| k.get_ref() == name).map(|(_, v)| v.clone());

        let cluster = match get("cluster") {
            Some(v) => self.decode::<ClusterSection>(&v),
            None => {
                self.error(
                    ProblemKind::Type,
                    &[],
                    "missing [cluster] section; add `[cluster]` with `name = \"…\"`".to_string(),
                );
                None
            }
        };
        let nodes = self.elements(&[K("node")]).iter().map(|v| self.decode_node(v)).collect();
        let links = self.elements(&[K("link")]).iter().map(|v| self.decode::<Link>(v)).collect();
        let lease = match get("lease") {
            Some(v) => self.decode_lease(&v).map(Some),
            None => Some(None),
        };
        let groups = self.elements(&[K("group")]).iter().enumerate().map(|(gi, v)| self.decode_group(gi, v)).collect();
        let api = match get("api") {
            Some(v) => self.decode::<ApiSettings>(&v),
            None => Some(ApiSettings::default()),
        };
        let guest_link = match get("guest_link") {
            Some(v) => self.decode::<GuestLinkSettings>(&v).map(Some),
            None => Some(None),
        };
        let host_link = match get("host_link") {
            Some(v) => self.decode::<HostLinkSettings>(&v).map(Some),
            None => Some(None),
        };
        let networks = self.elements(&[K("network")]).iter().map(|v| self.decode::<Network>(v)).collect();
        Decoded { cluster, nodes, links, lease, groups, api, guest_link, host_link, networks }
    }

    /// Removes `key` from a table value, returning the rest and the removed value.
    fn split_off(v: &Value<'s>, keys: &[&str]) -> (Value<'s>, Vec<Option<Value<'s>>>) {
        match v.get_ref().as_table() {
            Some(t) => {
                let mut t = t.clone();
                let taken = keys.iter().map(|k| t.remove(*k)).collect();
                (Spanned::new(v.span(), DeValue::Table(t)), taken)
            }
            None => (v.clone(), keys.iter().map(|_| None).collect()),
        }
    }

    fn decode_node(&mut self, v: &Value<'s>) -> Option<Node> {
        let (rest, taken) = Self::split_off(v, &["fence"]);
        let fence = taken[0].as_ref().map(|f| self.decode_fence(f));
        let mut node = self.decode::<Node>(&rest)?;
        node.fence = match fence {
            Some(f) => Some(f?),
            None => None,
        };
        Some(node)
    }

    /// Reads `kind` out of a tagged table, reporting a missing or unknown kind.
    fn tagged(&mut self, v: &Value<'s>, what: &str, kinds: &[&str]) -> Option<(String, Value<'s>)> {
        if v.get_ref().as_table().is_none() {
            let field = self.path_at(v.span().start);
            self.push(
                Severity::Error,
                ProblemKind::Type,
                v.span(),
                field,
                format!("expected a table with `kind = \"…\"` ({what}: one of {})", kinds.join(", ")),
            );
            return None;
        }
        let (rest, taken) = Self::split_off(v, &["kind"]);
        let Some(kind_v) = &taken[0] else {
            let field = self.path_at(v.span().start);
            self.push(
                Severity::Error,
                ProblemKind::Type,
                v.span(),
                field,
                format!("missing `kind`; {what} kinds are: {}", kinds.join(", ")),
            );
            return None;
        };
        let kind = self.decode::<String>(kind_v)?;
        if !kinds.contains(&kind.as_str()) {
            let field = self.path_at(kind_v.span().start);
            self.push(
                Severity::Error,
                ProblemKind::InvalidValue,
                kind_v.span(),
                field,
                format!("unknown {what} kind {kind:?}; known kinds: {}", kinds.join(", ")),
            );
            return None;
        }
        Some((kind, rest))
    }

    fn decode_fence(&mut self, v: &Value<'s>) -> Option<FenceMethod> {
        let (kind, rest) = self.tagged(v, "fence", &["agent", "command", "host-cluster", "lease-watchdog-only"])?;
        Some(match kind.as_str() {
            "agent" => FenceMethod::Agent(self.decode(&rest)?),
            "command" => FenceMethod::Command(self.decode(&rest)?),
            "host-cluster" => FenceMethod::HostCluster(self.decode(&rest)?),
            _ => FenceMethod::LeaseWatchdogOnly(self.decode(&rest)?),
        })
    }

    fn decode_lease(&mut self, v: &Value<'s>) -> Option<LeaseSettings> {
        let f = self.decode::<LeaseFields>(v)?;
        let renewal = f.renewal_interval.unwrap_or(Duration::from_secs(1));
        let derived = tandem_lease::Timeouts::from_renewal_ms(renewal.as_millis() as u64);
        let ms = Duration::from_millis;
        Some(LeaseSettings {
            device: f.device,
            renewal_interval: renewal,
            io_timeout: f.io_timeout.unwrap_or(ms(derived.io_timeout_ms)),
            fence_deadline: f.fence_deadline.unwrap_or(ms(derived.fence_ms)),
            kill_margin: f.kill_margin.unwrap_or(ms(derived.kill_margin_ms)),
            host_dead_timeout: f.host_dead_timeout.unwrap_or(ms(derived.host_dead_ms)),
            watchdog: f.watchdog,
        })
    }

    fn decode_group(&mut self, gi: usize, v: &Value<'s>) -> DecodedGroup {
        let (rest, _) = Self::split_off(v, &["resource", "monitor"]);
        let header = self.decode::<FailoverGroup>(&rest);
        let raw = self.elements(&[K("group"), I(gi), K("resource")]);
        let mut resources: Vec<Option<Resource>> = raw.iter().map(|r| self.decode_resource(r)).collect();
        // Absent depends_on means "the previous resource in the list".
        for ri in 1..raw.len() {
            let explicit = raw[ri].get_ref().get("depends_on").is_some();
            let previous = raw[ri - 1].get_ref().get("name").and_then(|n| n.get_ref().as_str()).map(str::to_string);
            if let (false, Some(r), Some(prev)) = (explicit, resources[ri].as_mut(), previous) {
                r.depends_on = vec![prev];
            }
        }
        let monitors = self.elements(&[K("group"), I(gi), K("monitor")]).iter().map(|m| self.decode(m)).collect();
        DecodedGroup { header, resources, monitors }
    }

    fn decode_resource(&mut self, v: &Value<'s>) -> Option<Resource> {
        let (kind, rest) = self.tagged(v, "resource", &["disk", "ip", "exec", "ocf", "systemd", "vm"])?;
        let (rest, taken) = Self::split_off(&rest, &["name", "depends_on"]);
        let name = match &taken[0] {
            Some(n) => self.decode::<String>(n),
            None => {
                let field = self.path_at(v.span().start);
                self.push(Severity::Error, ProblemKind::Type, v.span(), field, "missing field `name`".to_string());
                None
            }
        };
        let depends_on = match &taken[1] {
            Some(d) => self.decode::<Vec<String>>(d),
            // Filled in with the previous resource once all names are known.
            None => Some(vec![]),
        };
        let kind = match kind.as_str() {
            "disk" => self.decode(&rest).map(ResourceKind::Disk),
            "ip" => self.decode(&rest).map(ResourceKind::Ip),
            "exec" => self.decode(&rest).map(ResourceKind::Exec),
            "ocf" => self.decode(&rest).map(ResourceKind::Ocf),
            "vm" => self.decode(&rest).map(ResourceKind::Vm),
            _ => self.decode(&rest).map(ResourceKind::Systemd),
        };
        Some(Resource { name: name?, depends_on: depends_on?, kind: kind? })
    }

    /// Names of the elements of an array in the tree, whether or not they
    /// decoded: references to an element that failed to decode are not
    /// reported a second time.
    fn raw_names(&self, path: &[Seg<'_>]) -> BTreeSet<String> {
        let Some(cur) = self.lookup(path) else { return BTreeSet::new() };
        cur.get_ref()
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.get_ref().get("name").and_then(|n| n.get_ref().as_str()).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn has_key(&self, path: &[Seg<'_>]) -> bool {
        self.lookup(path).is_some()
    }

    /// The value at `path`, if the file has it.
    fn lookup(&self, path: &[Seg<'_>]) -> Option<&Value<'s>> {
        path.iter().try_fold(self.root(), |cur, seg| match *seg {
            Seg::Key(k) => cur.get_ref().as_table().and_then(|t| t.get(k)),
            Seg::Index(n) => cur.get_ref().as_array().and_then(|a| a.get(n)),
        })
    }

    fn check_name(&mut self, path: &[Seg<'_>], what: &str, name: &str) {
        let ok = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            self.error(
                ProblemKind::InvalidValue,
                path,
                format!(
                    "invalid {what} name {name:?}: use 1..={MAX_NAME_LEN} letters, digits, '-', '_' or '.' \
                     (names appear in logs, commands and the lease area)"
                ),
            );
        }
    }

    fn check_absolute(&mut self, path: &[Seg<'_>], what: &str, p: &Path) {
        if !p.is_absolute() {
            self.error(
                ProblemKind::InvalidValue,
                path,
                format!(
                    "{what} {:?} is not an absolute path; the agent does not run in the directory of this file, \
                     so write the full path",
                    p.display().to_string()
                ),
            );
        }
    }

    fn check_argv(&mut self, path: &[Seg<'_>], what: &str, argv: &[String]) {
        if argv.first().is_none_or(|p| p.trim().is_empty()) {
            self.error(
                ProblemKind::InvalidValue,
                path,
                format!("{what} needs a program: write it as a list, program first: [\"/usr/bin/prog\", \"arg\"]"),
            );
        }
    }

    fn check_positive(&mut self, path: &[Seg<'_>], d: Duration) {
        if d.is_zero() {
            self.error(ProblemKind::InvalidValue, path, "must be greater than zero".to_string());
        }
    }

    fn validate(&mut self, d: &Decoded) {
        if let Some(c) = &d.cluster {
            self.check_name(&[K("cluster"), K("name")], "cluster", &c.name);
            if let Some(k) = &c.key_file {
                self.check_absolute(&[K("cluster"), K("key_file")], "key_file", k);
            }
        }
        self.validate_links(d);
        self.validate_nodes(d);
        self.validate_lease(d);
        self.validate_groups(d);
        self.validate_api(d);
        self.validate_guest_link(d);
        self.validate_host_link(d);
        self.validate_networks(d);
    }

    /// `[guest_link]` and the VMs' link settings (host agents).
    fn validate_guest_link(&mut self, d: &Decoded) {
        let settings = d.guest_link.clone().flatten();
        if let Some(g) = &settings {
            if let Some(addr) = g.listen
                && addr.port() == 0
            {
                self.error(
                    ProblemKind::InvalidValue,
                    &[K("guest_link"), K("listen")],
                    format!("port 0 is not usable: give the port guests connect to, e.g. \"{}:7702\"", addr.ip()),
                );
            }
            if let Some(tls) = &g.tls {
                let at = |k| [K("guest_link"), K("tls"), K(k)];
                self.check_absolute(&at("cert"), "guest-link certificate", &tls.cert);
                self.check_absolute(&at("key"), "guest-link key", &tls.key);
                if let Some(ca) = &tls.client_ca {
                    self.check_absolute(&at("client_ca"), "guest-link client CA", ca);
                }
                if g.listen.is_none() {
                    self.warn(
                        ProblemKind::InvalidValue,
                        &[K("guest_link"), K("tls")],
                        "TLS applies to the TCP listener only, and there is none: add listen = \"ADDRESS:PORT\"".into(),
                    );
                }
            }
            // VMADDR_PORT_ANY (u32::MAX) and 0 name no port a guest could connect to.
            if g.vsock_port == 0 || g.vsock_port == u32::MAX {
                self.error(
                    ProblemKind::InvalidValue,
                    &[K("guest_link"), K("vsock_port")],
                    format!("{} is not a vsock port a guest can connect to; use e.g. 7702", g.vsock_port),
                );
            }
        }
        let mut sockets: HashMap<PathBuf, String> = HashMap::new();
        for (gi, g) in d.groups.iter().enumerate() {
            for (ri, r) in g.resources.iter().enumerate() {
                let Some(Resource { kind: ResourceKind::Vm(vm), .. }) = r else { continue };
                let rp = |k| [K("group"), I(gi), K("resource"), I(ri), K(k)];
                let group = g.header.as_ref().map(|h| h.name.clone()).unwrap_or_default();
                if let Some(f) = &vm.link_key_file {
                    self.check_absolute(&rp("link_key_file"), "link_key_file", f);
                    let listens = settings.as_ref().is_some_and(|s| s.listen.is_some()) || vm.vsock_uds.is_some();
                    if !listens {
                        self.warn(
                            ProblemKind::InvalidValue,
                            &rp("link_key_file"),
                            "the guest has nowhere to link to: add [guest_link] listen = \"ADDRESS:PORT\" or give \
                             this VM a vsock_uds"
                                .into(),
                        );
                    }
                }
                if let Some(c) = &vm.guest_cluster {
                    self.check_name(&rp("guest_cluster"), "guest cluster", c);
                }
                if let Some(t) = vm.guest_heartbeat_timeout {
                    self.check_positive(&rp("guest_heartbeat_timeout"), t);
                    if vm.link_key_file.is_none() {
                        self.error(
                            ProblemKind::InvalidValue,
                            &rp("guest_heartbeat_timeout"),
                            "guest heartbeats come over the guest link: give this VM a link_key_file too".into(),
                        );
                    }
                }
                if let Some(u) = &vm.vsock_uds {
                    self.check_absolute(&rp("vsock_uds"), "vsock_uds", u);
                    if vm.link_key_file.is_none() {
                        self.error(
                            ProblemKind::InvalidValue,
                            &rp("vsock_uds"),
                            "a guest link needs the VM's key: give this VM a link_key_file too".into(),
                        );
                    }
                    if let Some(other) = sockets.insert(u.clone(), group.clone()) {
                        self.error(
                            ProblemKind::Duplicate,
                            &rp("vsock_uds"),
                            format!("VM {other:?} uses this vsock socket already; each VM has its own"),
                        );
                    }
                }
            }
        }
    }

    /// `[host_link]` (guest agents), and the host-cluster fencing that needs it.
    fn validate_host_link(&mut self, d: &Decoded) {
        let link = d.host_link.clone().flatten();
        let has_section = self.has_key(&[K("host_link")]);
        for (i, n) in d.nodes.iter().enumerate() {
            if let Some(Node { fence: Some(FenceMethod::HostCluster(_)), .. }) = n
                && !has_section
            {
                self.error(
                    ProblemKind::InvalidValue,
                    &[K("node"), I(i), K("fence"), K("kind")],
                    "host-cluster fencing is asked for over the host–guest link: add [host_link] with the host \
                     agent's address and this VM's key_file (see docs/guest-agent.md)"
                        .into(),
                );
            }
        }
        let Some(l) = link else { return };
        self.check_absolute(&[K("host_link"), K("key_file")], "key_file", &l.key_file);
        self.check_positive(&[K("host_link"), K("heartbeat_interval")], l.heartbeat_interval);
        if let LinkAddress::Unix(p) = &l.address
            && p.as_os_str().len() > 107
        {
            self.error(
                ProblemKind::InvalidValue,
                &[K("host_link"), K("address")],
                "a Unix socket path is at most 107 bytes long; use a shorter path".into(),
            );
        }
        if let Some(tls) = &l.tls {
            let at = |k| [K("host_link"), K("tls"), K(k)];
            if !matches!(l.address, LinkAddress::Tcp { .. }) {
                self.error(
                    ProblemKind::InvalidValue,
                    &[K("host_link"), K("tls")],
                    "TLS is for a tcp: address; vsock and Unix-socket links reach only this VM's own host and \
                     need none: remove [host_link.tls]"
                        .into(),
                );
            }
            self.check_absolute(&at("ca"), "host-link CA", &tls.ca);
            match (&tls.cert, &tls.key) {
                (Some(c), Some(k)) => {
                    self.check_absolute(&at("cert"), "host-link certificate", c);
                    self.check_absolute(&at("key"), "host-link key", k);
                }
                (None, None) => {}
                (Some(_), None) => self.error(
                    ProblemKind::InvalidValue,
                    &at("cert"),
                    "a certificate needs its private key: add key = \"/path/to/key.pem\"".into(),
                ),
                (None, Some(_)) => self.error(
                    ProblemKind::InvalidValue,
                    &at("key"),
                    "a key without its certificate: add cert = \"/path/to/cert.pem\"".into(),
                ),
            }
        }
        match &l.vm_uuid {
            Some(u) if !is_uuid(u) => self.error(
                ProblemKind::InvalidValue,
                &[K("host_link"), K("vm_uuid")],
                format!("{u:?} is not a UUID (8-4-4-4-12 hex digits); `virsh domuuid VM` prints it"),
            ),
            Some(_) => {}
            None => {
                let any = d.nodes.iter().flatten().any(|n| matches!(n.fence, Some(FenceMethod::HostCluster(_))));
                if !any {
                    self.error(
                        ProblemKind::InvalidValue,
                        &[K("host_link")],
                        "no VM UUID for the link: set vm_uuid here (`virsh domuuid VM` prints it), or give the \
                         nodes fence = { kind = \"host-cluster\", vm_uuid = \"…\" }"
                            .into(),
                    );
                }
            }
        }
    }

    fn validate_networks(&mut self, d: &Decoded) {
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut bridges: HashMap<String, usize> = HashMap::new();
        for (i, n) in d.networks.iter().enumerate() {
            let Some(n) = n else { continue };
            self.check_name(&[K("network"), I(i), K("name")], "network", &n.name);
            if let Some(first) = seen.insert(n.name.clone(), i) {
                self.error(
                    ProblemKind::Duplicate,
                    &[K("network"), I(i), K("name")],
                    format!(
                        "duplicate network name {:?} (also [[network]] #{}); give each network its own name",
                        n.name,
                        first + 1
                    ),
                );
            }
            if n.bridge.is_none() && n.libvirt_network.is_none() {
                self.error(
                    ProblemKind::Type,
                    &[K("network"), I(i)],
                    "a network needs `bridge` or `libvirt_network`: that is how its VMs are found in their domain XML"
                        .into(),
                );
            }
            if let Some(b) = &n.bridge {
                if !is_interface_name(b) {
                    self.error(ProblemKind::InvalidValue, &[K("network"), I(i), K("bridge")], interface_problem(b));
                } else if let Some(first) = bridges.insert(b.clone(), i) {
                    self.error(
                        ProblemKind::Duplicate,
                        &[K("network"), I(i), K("bridge")],
                        format!("bridge {b:?} is already [[network]] #{}'s; one network per bridge", first + 1),
                    );
                }
            }
            if n.bridge.is_none() && n.interfaces.is_empty() && n.libvirt_network.is_some() {
                self.error(
                    ProblemKind::Empty,
                    &[K("network"), I(i)],
                    "name the host `interfaces` behind this libvirt network (e.g. `interfaces = [\"eth1\"]`): \
                     without them its link state cannot be watched"
                        .into(),
                );
            }
            for (j, ifname) in n.interfaces.iter().enumerate() {
                if !is_interface_name(ifname) {
                    self.error(
                        ProblemKind::InvalidValue,
                        &[K("network"), I(i), K("interfaces"), I(j)],
                        interface_problem(ifname),
                    );
                }
            }
        }
    }

    fn validate_api(&mut self, d: &Decoded) {
        for (i, n) in d.nodes.iter().enumerate() {
            if let Some(addr) = n.as_ref().and_then(|n| n.api) {
                if addr.port() == 0 || addr.ip().is_unspecified() {
                    self.error(
                        ProblemKind::InvalidValue,
                        &[K("node"), I(i), K("api")],
                        format!(
                            "{addr} is not an address other nodes can reach: give this node's own address and the \
                             API port, e.g. \"10.0.0.1:{DEFAULT_API_PORT}\""
                        ),
                    );
                }
            }
        }
        // Each agent listens on its node's `api` address when it has one: the same rule
        // as for `listen` applies to it.
        let (tls, insecure) = d.api.as_ref().map_or((false, false), |a| (a.tls.is_some(), a.insecure));
        for (i, n) in d.nodes.iter().enumerate() {
            if let Some(addr) = n.as_ref().and_then(|n| n.api)
                && !tls
                && !insecure
                && !addr.ip().is_loopback()
                && !addr.ip().is_unspecified()
            {
                self.error(
                    ProblemKind::Insecure,
                    &[K("node"), I(i), K("api")],
                    format!(
                        "this node's agent would listen on {addr} without TLS: anyone who reaches it could stop \
                         groups and shut the node down; add [api.tls] (cert, key, client_ca), or set \
                         [api] insecure = true if the network is trusted"
                    ),
                );
            }
        }
        let Some(api) = &d.api else { return };
        let has_tls = api.tls.is_some();
        if !has_tls && !api.listen.ip().is_loopback() && !api.insecure {
            self.error(
                ProblemKind::Insecure,
                &[K("api"), K("listen")],
                format!(
                    "the API would listen on {} without TLS: anyone who reaches it could stop groups and shut the node \
                     down; add [api.tls] (cert, key, client_ca), listen on 127.0.0.1, or set `insecure = true` if the \
                     network is trusted",
                    api.listen
                ),
            );
        }
        if api.insecure && has_tls {
            self.warn(
                ProblemKind::Insecure,
                &[K("api"), K("insecure")],
                "`insecure = true` has no effect with [api.tls]; remove it".into(),
            );
        } else if api.insecure && !api.listen.ip().is_loopback() {
            self.warn(
                ProblemKind::Insecure,
                &[K("api"), K("insecure")],
                format!(
                    "the API listens on {} without TLS: every client there gets the roles of `anonymous_roles`",
                    api.listen
                ),
            );
        }
        if let Some(tls) = &api.tls {
            self.check_absolute(&[K("api"), K("tls"), K("cert")], "API certificate", &tls.cert);
            self.check_absolute(&[K("api"), K("tls"), K("key")], "API key", &tls.key);
            if let Some(ca) = &tls.client_ca {
                self.check_absolute(&[K("api"), K("tls"), K("client_ca")], "API client CA", ca);
            }
        }
        let verifies_clients = api.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if !api.roles.is_empty() && !verifies_clients {
            self.error(
                ProblemKind::InvalidValue,
                &[K("api"), K("roles")],
                "roles are given by client certificate, but no certificate is verified: add [api.tls] with \
                 `client_ca` (the CA that signs the client certificates)"
                    .into(),
            );
        }
        for (cn, roles) in &api.roles {
            if cn.trim().is_empty() {
                self.error_at_key(
                    ProblemKind::InvalidValue,
                    &[K("api"), K("roles"), K(cn)],
                    "empty certificate common name: write the CN of the client certificate, e.g. \"ops-alice\"".into(),
                );
            }
            if roles.is_empty() {
                self.warn(
                    ProblemKind::InvalidValue,
                    &[K("api"), K("roles"), K(cn)],
                    format!("no roles for {cn:?}: its certificate will be refused everything; list roles or remove it"),
                );
            }
        }
    }

    fn validate_links(&mut self, d: &Decoded) {
        if d.links.is_empty() {
            self.error(
                ProblemKind::Empty,
                &[K("link")],
                "no [[link]]: add at least one network for heartbeats (two on separate networks are recommended)"
                    .into(),
            );
        } else if d.links.len() == 1 {
            self.warn(
                ProblemKind::Redundancy,
                &[K("link"), I(0)],
                "only one link: a single network failure will look like a node failure to the other nodes; \
                 add a second [[link]] on a separate network"
                    .into(),
            );
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, l) in d.links.iter().enumerate() {
            let Some(l) = l else { continue };
            self.check_name(&[K("link"), I(i), K("name")], "link", &l.name);
            if let Some(first) = seen.insert(l.name.clone(), i) {
                self.error(
                    ProblemKind::Duplicate,
                    &[K("link"), I(i), K("name")],
                    format!(
                        "duplicate link name {:?} (also [[link]] #{}); give each link its own name",
                        l.name,
                        first + 1
                    ),
                );
            }
            if l.port == 0 {
                self.error(
                    ProblemKind::InvalidValue,
                    &[K("link"), I(i), K("port")],
                    "port 0 is not usable; pick a UDP port in 1..=65535".into(),
                );
            }
            self.check_positive(&[K("link"), I(i), K("interval")], l.interval);
            if l.timeout < l.interval * 2 {
                self.error(
                    ProblemKind::InvalidValue,
                    &[K("link"), I(i), K("timeout")],
                    format!(
                        "timeout {} is less than twice the heartbeat interval {}: a single lost heartbeat would mark \
                         the link down; raise timeout or lower interval",
                        duration::format(l.timeout),
                        duration::format(l.interval)
                    ),
                );
            }
        }
    }

    fn validate_nodes(&mut self, d: &Decoded) {
        if d.nodes.is_empty() {
            self.error(ProblemKind::Empty, &[K("node")], "no [[node]]: a cluster needs at least one node".into());
        }
        let link_names = self.raw_names(&[K("link")]);
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut ids: HashMap<u32, String> = HashMap::new();
        let mut addrs: HashMap<(String, std::net::IpAddr), String> = HashMap::new();
        for (i, n) in d.nodes.iter().enumerate() {
            let Some(n) = n else { continue };
            self.check_name(&[K("node"), I(i), K("name")], "node", &n.name);
            if let Some(first) = names.insert(n.name.clone(), i) {
                self.error(
                    ProblemKind::Duplicate,
                    &[K("node"), I(i), K("name")],
                    format!(
                        "duplicate node name {:?} (also [[node]] #{}); give each node its own name",
                        n.name,
                        first + 1
                    ),
                );
            }
            if n.id == 0 || n.id > MAX_NODE_ID {
                self.error(
                    ProblemKind::InvalidValue,
                    &[K("node"), I(i), K("id")],
                    format!("node id {} is out of range: use 1..={MAX_NODE_ID} (the id is the node's slot in the lease area)", n.id),
                );
            } else if let Some(other) = ids.insert(n.id, n.name.clone()) {
                self.error(
                    ProblemKind::Duplicate,
                    &[K("node"), I(i), K("id")],
                    format!(
                        "node id {} is already used by node {other:?}; ids must be unique (they are lease host ids)",
                        n.id
                    ),
                );
            }
            for (link, addr) in &n.links {
                if !link_names.contains(link) {
                    self.error_at_key(
                        ProblemKind::UnknownReference,
                        &[K("node"), I(i), K("links"), K(link)],
                        format!("no [[link]] named {link:?}; known links: {}", join_names(&link_names)),
                    );
                } else if let Some(other) = addrs.insert((link.clone(), *addr), n.name.clone()) {
                    self.error(
                        ProblemKind::Duplicate,
                        &[K("node"), I(i), K("links"), K(link)],
                        format!("address {addr} on link {link:?} is already node {other:?}'s; each node needs its own address"),
                    );
                }
            }
            for l in d.links.iter().flatten() {
                if !n.links.contains_key(&l.name) {
                    self.error(
                        ProblemKind::MissingLinkAddress,
                        &[K("node"), I(i), K("links")],
                        format!("no address on link {:?}: add `{} = \"ADDRESS\"` to this node's links", l.name, l.name),
                    );
                }
            }
            if let Some(c) = &n.capacity {
                for (k, zero) in [("memory_mib", c.memory_mib == 0), ("vcpus", c.vcpus == 0)] {
                    if zero {
                        self.error(
                            ProblemKind::InvalidValue,
                            &[K("node"), I(i), K("capacity"), K(k)],
                            "a node's capacity must be greater than zero; remove `capacity` to leave the node \
                             unlimited"
                                .into(),
                        );
                    }
                }
            }
            if let Some(f) = &n.fence {
                match f {
                    FenceMethod::Agent(a) => {
                        if a.agent.trim().is_empty() {
                            self.error(
                                ProblemKind::InvalidValue,
                                &[K("node"), I(i), K("fence"), K("agent")],
                                "empty fence agent name; e.g. \"fence_virsh\"".into(),
                            );
                        }
                        for (k, v) in &a.params {
                            let at = [K("node"), I(i), K("fence"), K("params"), K(k)];
                            if let Some(why) = fence_param_problem(k, v) {
                                self.error(ProblemKind::InvalidValue, &at, why);
                            }
                        }
                        if a.password_file.is_some() && a.password_env.is_some() {
                            self.error(
                                ProblemKind::InvalidValue,
                                &[K("node"), I(i), K("fence"), K("password_env")],
                                "give either password_file or password_env, not both".into(),
                            );
                        }
                        if let Some(f) = &a.password_file {
                            self.check_absolute(&[K("node"), I(i), K("fence"), K("password_file")], "password_file", f);
                        }
                        self.check_positive(&[K("node"), I(i), K("fence"), K("timeout")], a.timeout);
                    }
                    FenceMethod::Command(c) => {
                        self.check_argv(&[K("node"), I(i), K("fence"), K("command")], "fence command", &c.command);
                        self.check_positive(&[K("node"), I(i), K("fence"), K("timeout")], c.timeout);
                    }
                    FenceMethod::HostCluster(h) => {
                        self.check_positive(&[K("node"), I(i), K("fence"), K("timeout")], h.timeout);
                        if !is_uuid(&h.vm_uuid) {
                            self.error(
                                ProblemKind::InvalidValue,
                                &[K("node"), I(i), K("fence"), K("vm_uuid")],
                                format!(
                                    "{:?} is not a UUID (8-4-4-4-12 hex digits); `virsh domuuid VM` prints it",
                                    h.vm_uuid
                                ),
                            );
                        }
                    }
                    FenceMethod::LeaseWatchdogOnly(_) => {}
                }
            }
        }
    }

    fn validate_lease(&mut self, d: &Decoded) {
        let Some(Some(l)) = &d.lease else { return };
        self.check_absolute(&[K("lease"), K("device")], "lease device", &l.device);
        let fields = [
            ("renewal_interval", l.renewal_interval),
            ("io_timeout", l.io_timeout),
            ("fence_deadline", l.fence_deadline),
            ("kill_margin", l.kill_margin),
            ("host_dead_timeout", l.host_dead_timeout),
        ];
        let mut whole = true;
        for (name, v) in fields {
            if v.subsec_nanos() % 1_000_000 != 0 {
                whole = false;
                self.error(
                    ProblemKind::InvalidValue,
                    &[K("lease"), K(name)],
                    format!(
                        "{} has a fraction of a millisecond; lease timeouts are whole milliseconds",
                        duration::format(v)
                    ),
                );
            }
        }
        if !whole {
            return;
        }
        if let Some(w) = &l.watchdog {
            self.check_absolute(&[K("lease"), K("watchdog")], "watchdog device", w);
            if l.timeouts().validate().is_ok()
                && let Err(e @ tandem_lease::fence::FenceError::WatchdogMargin { .. }) = l.fence_plan()
            {
                self.error(ProblemKind::LeaseTiming, &[K("lease"), K("watchdog")], e.to_string());
            }
        }
        if let Err(e) = l.timeouts().validate() {
            // A value below its minimum is the fault of that one field (when
            // written in the file); the ordering rules involve several.
            let field = match &e {
                tandem_lease::ConfigError::TooSmall { field, .. } => match *field {
                    "renewal_ms" => Some("renewal_interval"),
                    "io_timeout_ms" => Some("io_timeout"),
                    "fence_ms" => Some("fence_deadline"),
                    "kill_margin_ms" => Some("kill_margin"),
                    "host_dead_ms" => Some("host_dead_timeout"),
                    _ => None,
                },
                _ => None,
            }
            .filter(|f| self.has_key(&[K("lease"), K(f)]));
            let path: Vec<Seg<'_>> = match field {
                Some(f) => vec![K("lease"), K(f)],
                None => vec![K("lease")],
            };
            self.error(
                ProblemKind::LeaseTiming,
                &path,
                format!(
                    "{e} [here R = renewal_interval, I = io_timeout, K = fence_deadline, M = kill_margin, \
                     T = host_dead_timeout; unset ones derive from renewal_interval]"
                ),
            );
        }
    }

    fn validate_groups(&mut self, d: &Decoded) {
        let node_names = self.raw_names(&[K("node")]);
        let mut group_names: HashMap<String, usize> = HashMap::new();
        // Nodes that need fencing, with the group and disk that make them need it.
        let mut needs_fence: BTreeMap<String, (String, String)> = BTreeMap::new();
        for (gi, g) in d.groups.iter().enumerate() {
            let gp = |k| [K("group"), I(gi), K(k)];
            if let Some(h) = &g.header {
                self.check_name(&gp("name"), "group", &h.name);
                if let Some(first) = group_names.insert(h.name.clone(), gi) {
                    self.error(
                        ProblemKind::Duplicate,
                        &gp("name"),
                        format!("duplicate group name {:?} (also [[group]] #{}); group names are lease names and must be unique", h.name, first + 1),
                    );
                }
                if h.nodes.is_empty() {
                    self.error(
                        ProblemKind::Empty,
                        &gp("nodes"),
                        "no nodes: list the nodes this group may run on, preferred first".into(),
                    );
                } else if h.nodes.len() == 1 {
                    self.warn(
                        ProblemKind::Redundancy,
                        &gp("nodes"),
                        "only one node: this group cannot fail over; list a second node".into(),
                    );
                }
                let mut seen = BTreeSet::new();
                for (ni, n) in h.nodes.iter().enumerate() {
                    let p = [K("group"), I(gi), K("nodes"), I(ni)];
                    if !node_names.contains(n) {
                        self.error(
                            ProblemKind::UnknownReference,
                            &p,
                            format!("no [[node]] named {n:?}; known nodes: {}", join_names(&node_names)),
                        );
                    } else if !seen.insert(n.clone()) {
                        self.error(ProblemKind::Duplicate, &p, format!("node {n:?} is listed twice"));
                    }
                }
                if h.restart_limit > 0 {
                    self.check_positive(&gp("restart_window"), h.restart_window);
                }
                if h.failover_limit > 0 {
                    self.check_positive(&gp("failover_window"), h.failover_window);
                }
                if let Some(disk) = g.resources.iter().flatten().find(|r| matches!(r.kind, ResourceKind::Disk(_))) {
                    for n in &h.nodes {
                        needs_fence.entry(n.clone()).or_insert((h.name.clone(), disk.name.clone()));
                    }
                }
                self.validate_placement(gi, h, d);
            }
            self.validate_resources(gi, g, d);
            self.validate_monitors(gi, g);
        }
        for (ni, n) in d.nodes.iter().enumerate() {
            let Some(n) = n else { continue };
            if n.fence.is_some() || self.has_key(&[K("node"), I(ni), K("fence")]) {
                continue;
            }
            if let Some((group, disk)) = needs_fence.get(&n.name) {
                self.error(
                    ProblemKind::FenceRequired,
                    &[K("node"), I(ni), K("fence")],
                    format!(
                        "node {:?} may run group {group:?}, which owns shared disk {disk:?}, but has no `fence`: if \
                         this node stalls (paused VM, hung kernel) it cannot fence itself, and writes already queued \
                         on it may reach the disk after another node took the group over. Configure fence = {{ kind = \
                         \"agent\" | \"command\" | \"host-cluster\", … }} so the survivors can power it off, or write \
                         fence = {{ kind = \"lease-watchdog-only\" }} to accept relying on the lease's self-fencing \
                         and a hardware watchdog alone",
                        n.name
                    ),
                );
            }
        }
    }

    /// Affinity and anti-affinity set names, their consistency, and whether the group's
    /// demand fits on at least one of its nodes.
    fn validate_placement(&mut self, gi: usize, h: &FailoverGroup, d: &Decoded) {
        for (key, sets) in [("affinity", &h.affinity), ("anti_affinity", &h.anti_affinity)] {
            let mut seen = BTreeSet::new();
            for (si, set) in sets.iter().enumerate() {
                let p = [K("group"), I(gi), K(key), I(si)];
                if set.is_empty()
                    || set.len() > MAX_NAME_LEN
                    || !set.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_'))
                {
                    self.error(
                        ProblemKind::InvalidValue,
                        &p,
                        format!(
                            "invalid set name {set:?}: use 1..={MAX_NAME_LEN} lowercase letters, digits, '-' or '_'"
                        ),
                    );
                } else if !seen.insert(set) {
                    self.error(ProblemKind::Duplicate, &p, format!("set {set:?} is listed twice"));
                } else if key == "anti_affinity" && h.affinity.contains(set) {
                    self.error(
                        ProblemKind::Placement,
                        &p,
                        format!(
                            "set {set:?} is in both affinity and anti_affinity: the group cannot both seek and avoid \
                             the groups of one set; remove it from one of the lists"
                        ),
                    );
                } else {
                    // A set no other group names has no effect: probably a typo.
                    let others =
                        d.groups.iter().enumerate().filter(|(gj, _)| *gj != gi).filter_map(|(_, g)| g.header.as_ref());
                    let shared = others.clone().any(|o| o.affinity.contains(set) || o.anti_affinity.contains(set));
                    if !shared {
                        self.warn(
                            ProblemKind::UnknownReference,
                            &p,
                            format!("no other group names set {set:?}, so it has no effect; check its spelling"),
                        );
                    }
                }
            }
        }
        if let Some(demand) = &h.demand {
            // Only judged when every listed node decoded: an undecodable one may be large.
            let caps: Vec<(&str, Option<Capacity>)> = h
                .nodes
                .iter()
                .map(|n| d.nodes.iter().flatten().find(|x| &x.name == n).map(|x| (x.name.as_str(), x.capacity)))
                .collect::<Option<_>>()
                .unwrap_or_default();
            let fits = |c: &Capacity| demand.memory_mib <= c.memory_mib && demand.vcpus <= c.vcpus;
            // A zero capacity is already reported at the node; judging by it would only add noise.
            let valid = |c: &Capacity| c.memory_mib > 0 && c.vcpus > 0;
            let never = !caps.is_empty() && caps.iter().all(|(_, c)| c.as_ref().is_some_and(|c| valid(c) && !fits(c)));
            if never {
                let listed: Vec<String> =
                    caps.iter().filter_map(|(n, c)| c.map(|c| format!("{n:?} has {c}"))).collect();
                self.error(
                    ProblemKind::Placement,
                    &[K("group"), I(gi), K("demand")],
                    format!(
                        "the group needs {demand}, more than any of its nodes offers ({}): it could never run; \
                         lower the demand, raise a node's capacity, or add a larger node to `nodes`",
                        listed.join(", ")
                    ),
                );
            }
        }
    }

    fn validate_resources(&mut self, gi: usize, g: &DecodedGroup, d: &Decoded) {
        let res_names = self.raw_names(&[K("group"), I(gi), K("resource")]);
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (ri, r) in g.resources.iter().enumerate() {
            let Some(r) = r else { continue };
            let rp = |k| [K("group"), I(gi), K("resource"), I(ri), K(k)];
            self.check_name(&rp("name"), "resource", &r.name);
            if let Some(first) = seen.insert(r.name.clone(), ri) {
                self.error(
                    ProblemKind::Duplicate,
                    &rp("name"),
                    format!("duplicate resource name {:?} in this group (also resource #{})", r.name, first + 1),
                );
            }
            for (di, dep) in r.depends_on.iter().enumerate() {
                let p = [K("group"), I(gi), K("resource"), I(ri), K("depends_on"), I(di)];
                if dep == &r.name {
                    self.error(ProblemKind::DependencyCycle, &p, "a resource cannot depend on itself".into());
                } else if !res_names.contains(dep) {
                    self.error(
                        ProblemKind::UnknownReference,
                        &p,
                        format!("no resource named {dep:?} in this group; known: {}", join_names(&res_names)),
                    );
                }
            }
            match &r.kind {
                ResourceKind::Disk(disk) => {
                    if d.lease.as_ref().is_some_and(|l| l.is_none()) {
                        self.error(
                            ProblemKind::LeaseRequired,
                            &rp("kind"),
                            "a shared disk is guarded by a lease, but there is no [lease] section: add [lease] with \
                             `device = \"/dev/…\"` on storage every node of the group sees"
                                .into(),
                        );
                    }
                    match (&disk.device, &disk.directory) {
                        (Some(dev), None) => {
                            self.check_absolute(&rp("device"), "device", dev);
                            match &disk.mountpoint {
                                Some(m) => self.check_absolute(&rp("mountpoint"), "mountpoint", m),
                                None => self.error(ProblemKind::Type, &rp("device"), "a disk `device` needs a `mountpoint` to mount it on".into()),
                            }
                        }
                        (None, Some(dir)) => {
                            self.check_absolute(&rp("directory"), "directory", dir);
                            for k in ["mountpoint", "fstype"] {
                                if self.has_key(&rp(k)) {
                                    self.error(ProblemKind::InvalidValue, &rp(k), format!("`{k}` only applies to a `device`; a `directory` is already mounted"));
                                }
                            }
                            if self.has_key(&rp("fsck")) {
                                self.error(ProblemKind::InvalidValue, &rp("fsck"), "`fsck` only applies to a `device`".into());
                            }
                        }
                        (Some(_), Some(_)) => self.error(ProblemKind::InvalidValue, &rp("directory"), "give either `device` (with `mountpoint`) or `directory`, not both".into()),
                        (None, None) => self.error(ProblemKind::Type, &[K("group"), I(gi), K("resource"), I(ri)], "a disk needs `device` + `mountpoint` (a block device the agent mounts) or `directory` (already-mounted shared storage)".into()),
                    }
                }
                ResourceKind::Ip(ip) => {
                    let iface = &ip.interface;
                    if iface.is_empty() || iface.len() > 15 || iface.contains(['/', ' ']) {
                        self.error(
                            ProblemKind::InvalidValue,
                            &rp("interface"),
                            format!("{iface:?} is not an interface name (1..=15 characters, no '/' or spaces)"),
                        );
                    }
                }
                ResourceKind::Exec(e) => {
                    self.check_argv(&rp("start"), "start", &e.start);
                    if self.has_key(&rp("stop")) {
                        self.check_argv(&rp("stop"), "stop", &e.stop);
                    } else if e.mode == ExecMode::Forking {
                        self.error(
                            ProblemKind::Type,
                            &[K("group"), I(gi), K("resource"), I(ri)],
                            "an exec resource in mode \"forking\" (the default) needs `stop`, the program that stops \
                             what `start` left running; only mode = \"simple\" may omit it (the agent then sends SIGTERM)"
                                .into(),
                        );
                    }
                    if self.has_key(&rp("monitor")) {
                        self.check_argv(&rp("monitor"), "monitor", &e.monitor);
                    }
                    if let Some(cwd) = &e.cwd {
                        self.check_absolute(&rp("cwd"), "cwd", cwd);
                    }
                    for k in ["start_timeout", "stop_timeout", "monitor_timeout"] {
                        let v = match k {
                            "start_timeout" => e.start_timeout,
                            "stop_timeout" => e.stop_timeout,
                            _ => e.monitor_timeout,
                        };
                        self.check_positive(&rp(k), v);
                    }
                }
                ResourceKind::Ocf(o) => {
                    for (k, v) in [("provider", &o.provider), ("agent", &o.agent)] {
                        if v.is_empty() || v.contains(['/', '\0']) || v.starts_with('.') {
                            self.error(
                                ProblemKind::InvalidValue,
                                &rp(k),
                                format!("{v:?} is not an OCF {k} name (e.g. provider \"heartbeat\", agent \"pgsql\")"),
                            );
                        }
                    }
                    for (k, v) in [
                        ("start_timeout", o.start_timeout),
                        ("stop_timeout", o.stop_timeout),
                        ("monitor_timeout", o.monitor_timeout),
                    ] {
                        if let Some(v) = v {
                            self.check_positive(&rp(k), v);
                        }
                    }
                    for k in o.params.keys() {
                        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                            self.error_at_key(
                                ProblemKind::InvalidValue,
                                &[K("group"), I(gi), K("resource"), I(ri), K("params"), K(k)],
                                "OCF parameter names are letters, digits and '_' (they become OCF_RESKEY_<name>)"
                                    .into(),
                            );
                        }
                    }
                }
                ResourceKind::Vm(vm) => {
                    self.check_absolute(&rp("domain"), "domain", &vm.domain);
                    for (k, v) in [("start_timeout", vm.start_timeout), ("shutdown_timeout", vm.shutdown_timeout)] {
                        self.check_positive(&rp(k), v);
                    }
                }
                ResourceKind::Systemd(s) => {
                    if s.unit.trim().is_empty() || s.unit.contains('/') {
                        self.error(
                            ProblemKind::InvalidValue,
                            &rp("unit"),
                            format!("{:?} is not a systemd unit name (e.g. \"postgresql.service\")", s.unit),
                        );
                    }
                }
            }
        }
        self.check_cycles(gi, g);
    }

    fn check_cycles(&mut self, gi: usize, g: &DecodedGroup) {
        let deps: BTreeMap<&str, (usize, Vec<&str>)> = g
            .resources
            .iter()
            .enumerate()
            .filter_map(|(ri, r)| {
                r.as_ref().map(|r| (r.name.as_str(), (ri, r.depends_on.iter().map(String::as_str).collect())))
            })
            .collect();
        // Depth-first search; each cycle is reported once, at its first member in file order.
        let mut state: BTreeMap<&str, u8> = BTreeMap::new(); // 1 = on stack, 2 = done
        let mut reported = false;
        let mut order: Vec<&str> = deps.keys().copied().collect();
        order.sort_by_key(|n| deps[n].0);
        for start in order {
            let mut stack: Vec<(&str, usize)> = vec![(start, 0)];
            if state.contains_key(start) {
                continue;
            }
            state.insert(start, 1);
            while let Some((node, next)) = stack.last().copied() {
                let children = deps.get(node).map(|d| d.1.as_slice()).unwrap_or(&[]);
                if next < children.len() {
                    stack.last_mut().expect("non-empty").1 += 1;
                    let child = children[next];
                    if child == node || !deps.contains_key(child) {
                        continue;
                    }
                    match state.get(child) {
                        None => {
                            state.insert(child, 1);
                            stack.push((child, 0));
                        }
                        Some(1) if !reported => {
                            let from = stack.iter().position(|(n, _)| *n == child).expect("on stack");
                            let mut cycle: Vec<&str> = stack[from..].iter().map(|(n, _)| *n).collect();
                            cycle.push(child);
                            let first =
                                cycle[..cycle.len() - 1].iter().min_by_key(|n| deps[*n].0).copied().expect("non-empty");
                            let ri = deps[first].0;
                            self.error(
                                ProblemKind::DependencyCycle,
                                &[K("group"), I(gi), K("resource"), I(ri), K("depends_on")],
                                format!("dependency cycle: {}; remove one of these dependencies", cycle.join(" -> ")),
                            );
                            reported = true;
                        }
                        _ => {}
                    }
                } else {
                    state.insert(node, 2);
                    stack.pop();
                }
            }
        }
    }

    fn validate_monitors(&mut self, gi: usize, g: &DecodedGroup) {
        let res_names = self.raw_names(&[K("group"), I(gi), K("resource")]);
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (mi, m) in g.monitors.iter().enumerate() {
            let Some(m) = m else { continue };
            let mp = |k| [K("group"), I(gi), K("monitor"), I(mi), K(k)];
            self.check_name(&mp("name"), "monitor", &m.name);
            if let Some(first) = seen.insert(m.name.clone(), mi) {
                self.error(
                    ProblemKind::Duplicate,
                    &mp("name"),
                    format!("duplicate monitor name {:?} in this group (also monitor #{})", m.name, first + 1),
                );
            }
            if let Some(r) = &m.resource
                && !res_names.contains(r)
            {
                self.error(
                    ProblemKind::UnknownReference,
                    &mp("resource"),
                    format!("no resource named {r:?} in this group; known: {}", join_names(&res_names)),
                );
            }
            self.check_positive(&mp("interval"), m.interval);
            self.check_positive(&mp("timeout"), m.timeout);
            if let Some(w) = m.restart_window {
                self.check_positive(&mp("restart_window"), w);
            }
            if m.password_file.is_some() && m.password_env.is_some() {
                self.error(
                    ProblemKind::InvalidValue,
                    &mp("password_env"),
                    "give either password_file or password_env, not both".into(),
                );
            }
            if let Some(f) = &m.password_file {
                self.check_absolute(&mp("password_file"), "password_file", f);
            }
            let target = m.target.trim();
            if !m.command.is_empty() && target != "exec" {
                self.error(
                    ProblemKind::MonitorSpec,
                    &mp("command"),
                    format!("`command` is only for target = \"exec\", not {target:?}"),
                );
            }
            if !m.params.is_empty() && !target.starts_with("ocf:") {
                self.error(
                    ProblemKind::MonitorSpec,
                    &mp("params"),
                    format!("`params` are only for ocf:PROVIDER:AGENT targets, not {target:?}"),
                );
            }
            // The password is not read here: validation may run where the
            // secret is not available, and must never print it.
            let spec = tandem_monitors::ProbeSpec { password: None, ..m.probe_spec() };
            if let Err(e) = tandem_monitors::build_probe(&spec) {
                let (path, at_key): (Vec<Seg<'_>>, bool) = match &e {
                    SpecError::UnknownOptions { unknown, .. } => {
                        let first = unknown.split(", ").next().unwrap_or_default();
                        let k = m.options.keys().find(|k| k.as_str() == first).map(String::as_str);
                        match k {
                            Some(k) => (vec![K("group"), I(gi), K("monitor"), I(mi), K("options"), K(k)], true),
                            None => (mp("options").to_vec(), false),
                        }
                    }
                    SpecError::BadOption { key, .. } => {
                        if let Some(k) = m.options.keys().find(|k| *k == key) {
                            (vec![K("group"), I(gi), K("monitor"), I(mi), K("options"), K(k)], false)
                        } else if let Some(k) = m.params.keys().find(|k| *k == key) {
                            (vec![K("group"), I(gi), K("monitor"), I(mi), K("params"), K(k)], true)
                        } else {
                            (mp("options").to_vec(), false)
                        }
                    }
                    SpecError::Missing(msg) if msg.starts_with("exec:") => (mp("command").to_vec(), false),
                    SpecError::File { .. } => (mp("options").to_vec(), false),
                    _ => (mp("target").to_vec(), false),
                };
                let msg = format!("{}; check it with `tandemctl probe`", error_chain(&e));
                if at_key {
                    self.error_at_key(ProblemKind::MonitorSpec, &path, msg);
                } else {
                    self.error(ProblemKind::MonitorSpec, &path, msg);
                }
            }
        }
    }
}

fn covers(v: &Value<'_>, offset: usize) -> bool {
    if v.span().contains(&offset) {
        return true;
    }
    match v.get_ref() {
        DeValue::Table(t) => t.iter().any(|(k, v)| k.span().contains(&offset) || covers(v, offset)),
        DeValue::Array(a) => a.iter().any(|v| covers(v, offset)),
        _ => false,
    }
}

/// `node "a"` for elements with a string name, `[3]` otherwise.
fn element_label(v: &Value<'_>, index: usize) -> String {
    match v.get_ref().get("name").and_then(|n| n.get_ref().as_str()) {
        Some(name) => format!(" {name:?}"),
        None => format!("[{index}]"),
    }
}

/// `group.resource` for a path to an array of tables (indices dropped).
fn dotted_keys(path: &[Seg<'_>]) -> String {
    path.iter().filter_map(|s| if let Seg::Key(k) = s { Some(*k) } else { None }).collect::<Vec<_>>().join(".")
}

fn join_names(names: &BTreeSet<String>) -> String {
    if names.is_empty() {
        "(none)".to_string()
    } else {
        names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
    }
}

/// What the kernel accepts as an interface name (`dev_valid_name`): 1..=15 bytes, not `.`
/// or `..`, no `/`, `:` or whitespace.
fn is_interface_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

fn interface_problem(s: &str) -> String {
    format!(
        "{s:?} is not an interface name: use 1..=15 characters without '/', ':' or spaces (as `ip link` shows them)"
    )
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts.iter().zip([8, 4, 4, 4, 12]).all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Serde's messages, with a hint where a bare one would leave users guessing.
fn explain_serde(msg: &str) -> String {
    if msg.starts_with("unknown field") {
        format!("{msg}; remove it or fix its spelling")
    } else if msg.starts_with("missing field") {
        format!("{msg}; add it to this table")
    } else {
        msg.to_string()
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Why a fence agent parameter cannot be passed on the agent's stdin, if it cannot.
/// Shared with the guest agent, which re-checks at run time.
pub fn fence_param_problem(key: &str, value: &str) -> Option<String> {
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Some(format!(
            "fence agent parameter name {key:?} must be letters, digits, `_` or `-` (it becomes a `key=value` line on \
             the agent's stdin)"
        ));
    }
    if matches!(key, "password" | "passwd") {
        return Some(
            "an inline password would be shown by every config dump and `ps`-visible tool: put it in a file and \
             set password_file (or set password_env)"
                .into(),
        );
    }
    if matches!(key, "action" | "option") {
        return Some(format!("{key:?} is set by Tandem (off, then status); remove it"));
    }
    if value.contains(['\n', '\r', '\0']) {
        return Some(
            "a parameter value may not contain a line break or NUL: it would inject another `key=value` line into \
             the agent's stdin"
                .into(),
        );
    }
    None
}
