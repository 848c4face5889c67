//! Every kind of error is reported at the right file:line:column with the
//! right field, and all errors of a file are reported together.

use std::io::Write;

use tandem_config::{ConfigErrors, Diagnostic, ProblemKind, Severity};

/// A valid two-node base; fixtures append to or edit it.
const BASE: &str = r#"[cluster]
name = "c"

[[link]]
name = "lan"
port = 5405

[[link]]
name = "backup"
port = 5406

[[node]]
name = "a"
id = 1
links = { lan = "10.0.0.1", backup = "10.9.0.1" }

[[node]]
name = "b"
id = 2
links = { lan = "10.0.0.2", backup = "10.9.0.2" }
"#;

/// A guest's link to its host agent (host-cluster fencing needs it).
const HOST_LINK: &str = "\n[host_link]\naddress = \"vsock:2:7702\"\nvm_uuid = \"4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b01\"\nkey_file = \"/etc/tandem/link.key\"\n";

fn write(src: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(src.as_bytes()).unwrap();
    f
}

fn errors_of(src: &str) -> ConfigErrors {
    let f = write(src);
    match tandem_config::load(f.path()) {
        Ok(c) => panic!("accepted:\n{src}\n=> {c:#?}"),
        Err(e) => {
            // Every line of the display starts with the file name and a position.
            let text = e.to_string();
            let prefix = format!("{}:", f.path().display());
            assert_eq!(text.lines().count(), e.len(), "{text}");
            for line in text.lines() {
                assert!(line.starts_with(&prefix), "{line}");
            }
            e
        }
    }
}

/// (line, column, field, kind) of every error.
fn summary(e: &ConfigErrors) -> Vec<(usize, usize, String, ProblemKind)> {
    e.iter()
        .map(|d: &Diagnostic| {
            let l = d.location.expect("located");
            (l.line, l.column, d.field.clone(), d.kind)
        })
        .collect()
}

fn only(src: &str) -> (usize, usize, String, ProblemKind, String) {
    let e = errors_of(src);
    assert_eq!(e.len(), 1, "expected one error, got:\n{e}");
    let d = &e.errors[0];
    let l = d.location.unwrap();
    (l.line, l.column, d.field.clone(), d.kind, d.message.clone())
}

#[test]
fn base_is_valid_and_has_no_warnings() {
    let f = write(BASE);
    let c = tandem_config::check(f.path()).unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(c.config.nodes.len(), 2);
    assert_eq!(c.config.nodes[0].votes, 1);
    assert_eq!(c.config.links[0].interval, std::time::Duration::from_secs(1));
}

#[test]
fn syntax_error_is_located() {
    let src = format!("{BASE}\n[[group]\nname = \"g\"\n");
    let e = errors_of(&src);
    assert_eq!(e.errors[0].kind, ProblemKind::Syntax);
    let l = e.errors[0].location.unwrap();
    assert_eq!((l.line, l.column), (22, 9), "{e}");
    assert!(e.errors[0].message.contains("invalid TOML"), "{e}");
}

#[test]
fn type_error_points_at_the_value() {
    let src = BASE.replace("port = 5406", "port = \"x\"");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (10, 8, "link \"backup\".port", ProblemKind::Type));
    assert!(msg.contains("u16") || msg.contains("integer"), "{msg}");
}

#[test]
fn unknown_field_points_at_the_key() {
    let src = BASE.replace("id = 2\n", "id = 2\nvotse = 2\n");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (20, 1, "node \"b\".votse", ProblemKind::UnknownField));
    assert!(msg.contains("votes"), "lists the known fields: {msg}");
}

#[test]
fn unknown_section_is_reported_with_a_hint() {
    let src = format!("{BASE}\n[[nodes]]\nname = \"x\"\n");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (22, 3, "nodes", ProblemKind::UnknownField));
    assert!(msg.contains("[[node]]"), "{msg}");
}

#[test]
fn missing_field_points_at_the_table() {
    let src = BASE.replace("name = \"b\"\n", "");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (17, 1, "node[1]", ProblemKind::Type));
    assert!(msg.contains("missing field `name`"), "{msg}");
}

#[test]
fn duplicate_names_ids_and_addresses() {
    let src = BASE.replace(
        "name = \"b\"\nid = 2\nlinks = { lan = \"10.0.0.2\"",
        "name = \"a\"\nid = 1\nlinks = { lan = \"10.0.0.1\"",
    );
    let e = errors_of(&src);
    assert_eq!(
        summary(&e),
        vec![
            (18, 8, "node \"a\".name".into(), ProblemKind::Duplicate),
            (19, 6, "node \"a\".id".into(), ProblemKind::Duplicate),
            (20, 17, "node \"a\".links.lan".into(), ProblemKind::Duplicate),
        ],
        "{e}"
    );
}

#[test]
fn unknown_link_and_missing_link_address() {
    let src = BASE.replace(
        "links = { lan = \"10.0.0.2\", backup = \"10.9.0.2\" }",
        "links = { lan = \"10.0.0.2\", bakup = \"10.9.0.2\" }",
    );
    let e = errors_of(&src);
    assert_eq!(
        summary(&e),
        vec![
            (20, 9, "node \"b\".links".into(), ProblemKind::MissingLinkAddress),
            (20, 29, "node \"b\".links.bakup".into(), ProblemKind::UnknownReference),
        ],
        "{e}"
    );
    assert!(e.errors[0].message.contains("\"backup\""), "{e}");
}

#[test]
fn bad_ip_address_is_located() {
    let src = BASE.replace("\"10.9.0.2\"", "\"10.9.0.256\"");
    let (line, col, field, kind, _) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (20, 38, "node \"b\".links.backup", ProblemKind::Type));
}

const GROUP: &str = r#"
[[group]]
name = "g"
nodes = ["a", "b"]

  [[group.resource]]
  name = "vip"
  kind = "ip"
  address = "10.0.0.50/24"
  interface = "eth0"

  [[group.resource]]
  name = "app"
  kind = "exec"
  start = ["/bin/true"]
  stop = ["/bin/true"]
"#;

#[test]
fn group_fixture_is_valid_and_depends_on_defaults_to_previous() {
    let f = write(&format!("{BASE}{GROUP}"));
    let c = tandem_config::load(f.path()).unwrap();
    let g = &c.groups[0];
    assert!(g.resources[0].depends_on.is_empty());
    assert_eq!(g.resources[1].depends_on, vec!["vip".to_string()]);
}

#[test]
fn ip_prefix_syntax() {
    let src = format!("{BASE}{GROUP}").replace("10.0.0.50/24", "10.0.0.50/33");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (29, 13, "group \"g\".resource \"vip\".address", ProblemKind::Type));
    assert!(msg.contains("0..=32"), "{msg}");
    let src = format!("{BASE}{GROUP}").replace("10.0.0.50/24", "10.0.0.50");
    assert!(only(&src).4.contains("prefix"));
}

#[test]
fn exec_mode_and_stop() {
    // forking (the default) needs `stop`; simple may omit it; unknown modes are refused.
    let src = format!("{BASE}{GROUP}").replace("  stop = [\"/bin/true\"]\n", "");
    let (line, _, field, kind, msg) = only(&src);
    assert_eq!((line, field.as_str(), kind), (32, "group \"g\".resource \"app\"", ProblemKind::Type));
    assert!(msg.contains("forking") && msg.contains("simple"), "{msg}");

    let src = format!("{BASE}{GROUP}").replace("  stop = [\"/bin/true\"]\n", "  mode = \"simple\"\n");
    let f = write(&src);
    let c = tandem_config::load(f.path()).unwrap();
    let tandem_config::ResourceKind::Exec(e) = &c.groups[0].resources[1].kind else { panic!("not exec") };
    assert_eq!(e.mode, tandem_config::ExecMode::Simple);
    assert!(e.stop.is_empty());

    let src = format!("{BASE}{GROUP}")
        .replace("  stop = [\"/bin/true\"]\n", "  stop = [\"/bin/true\"]\n  mode = \"oneshot\"\n");
    let (_, _, field, kind, _) = only(&src);
    assert_eq!((field.as_str(), kind), ("group \"g\".resource \"app\".mode", ProblemKind::Type));
}

#[test]
fn unknown_group_node_and_empty_group() {
    let src = format!("{BASE}{GROUP}").replace("nodes = [\"a\", \"b\"]", "nodes = [\"a\", \"c\"]");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (24, 15, "group \"g\".nodes[1]", ProblemKind::UnknownReference));
    assert!(msg.contains("\"a\", \"b\""), "lists known nodes: {msg}");
    let src = format!("{BASE}{GROUP}").replace("nodes = [\"a\", \"b\"]", "nodes = []");
    let (line, col, field, kind, _) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (24, 9, "group \"g\".nodes", ProblemKind::Empty));
}

#[test]
fn unknown_dependency_and_cycle() {
    let src = format!("{BASE}{GROUP}").replace("  name = \"vip\"\n", "  name = \"vip\"\n  depends_on = [\"db\"]\n");
    let (line, col, field, kind, _) = only(&src);
    assert_eq!(
        (line, col, field.as_str(), kind),
        (28, 17, "group \"g\".resource \"vip\".depends_on[0]", ProblemKind::UnknownReference)
    );

    let src = format!("{BASE}{GROUP}").replace("  name = \"vip\"\n", "  name = \"vip\"\n  depends_on = [\"app\"]\n");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!(
        (line, col, field.as_str(), kind),
        (28, 16, "group \"g\".resource \"vip\".depends_on", ProblemKind::DependencyCycle)
    );
    assert!(msg.contains("vip -> app -> vip"), "{msg}");
}

#[test]
fn unknown_resource_kind_points_at_kind() {
    let src = format!("{BASE}{GROUP}").replace("kind = \"exec\"", "kind = \"exe\"");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!(
        (line, col, field.as_str(), kind),
        (34, 10, "group \"g\".resource \"app\".kind", ProblemKind::InvalidValue)
    );
    assert!(msg.contains("exec"), "{msg}");
}

#[test]
fn unknown_field_inside_a_resource_points_at_the_key() {
    let src = format!("{BASE}{GROUP}").replace("  interface = \"eth0\"\n", "  interface = \"eth0\"\n  netmask = 24\n");
    let (line, col, field, kind, _) = only(&src);
    assert_eq!(
        (line, col, field.as_str(), kind),
        (31, 3, "group \"g\".resource \"vip\".netmask", ProblemKind::UnknownField)
    );
}

const DISK: &str = r#"
  [[group.resource]]
  name = "data"
  kind = "disk"
  directory = "/shared/data"
"#;

const LEASE: &str = "\n[lease]\ndevice = \"/dev/lease\"\n";

#[test]
fn shared_disk_needs_lease_and_fencing() {
    let src = format!("{BASE}{GROUP}{DISK}");
    let e = errors_of(&src);
    assert_eq!(
        summary(&e),
        vec![
            (12, 1, "node \"a\".fence".into(), ProblemKind::FenceRequired),
            (17, 1, "node \"b\".fence".into(), ProblemKind::FenceRequired),
            (40, 10, "group \"g\".resource \"data\".kind".into(), ProblemKind::LeaseRequired),
        ],
        "{e}"
    );
    assert!(e.errors[0].message.contains("stalls"), "explains the stall risk: {e}");
    assert!(e.errors[0].message.contains("lease-watchdog-only"), "{e}");
}

#[test]
fn explicit_watchdog_only_fencing_is_accepted() {
    let src = format!("{BASE}{GROUP}{DISK}{LEASE}")
        .replace("id = 1\n", "id = 1\nfence = { kind = \"lease-watchdog-only\" }\n")
        .replace(
            "id = 2\n",
            "id = 2\nfence = { kind = \"host-cluster\", vm_uuid = \"4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b01\" }\n",
        )
        + HOST_LINK;
    let f = write(&src);
    let c = tandem_config::load(f.path()).unwrap();
    assert!(c.groups[0].has_shared_disk());
    assert_eq!(c.lease.unwrap().timeouts(), tandem_lease::Timeouts::default());
}

#[test]
fn lease_timing_is_checked_with_the_lease_library() {
    let src = format!("{BASE}{LEASE}host_dead_timeout = \"6s\"\n");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (22, 1, "lease", ProblemKind::LeaseTiming));
    assert!(msg.contains("6122 ms") && msg.contains("host_dead_timeout"), "{msg}");
    let src = format!("{BASE}{LEASE}renewal_interval = \"300ms\"\n");
    let f = write(&src);
    let c = tandem_config::load(f.path()).unwrap();
    assert_eq!(c.lease.unwrap().timeouts(), tandem_lease::Timeouts::from_renewal_ms(300));
    // The join-settle rule: K >= 2R + I holds, but a joiner could not renew in time.
    let src = format!("{BASE}{LEASE}renewal_interval = \"100ms\"\nio_timeout = \"1s\"\nfence_deadline = \"2250ms\"\n");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (22, 1, "lease", ProblemKind::LeaseTiming));
    assert!(msg.contains("joiner") && msg.contains("fence_deadline"), "{msg}");
    // A value below its minimum points at that value.
    let src = format!("{BASE}{LEASE}renewal_interval = \"50ms\"\n");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (24, 20, "lease.renewal_interval", ProblemKind::LeaseTiming));
    assert!(msg.contains("100 ms"), "{msg}");
    // A hardware watchdog needs a second after the SIGKILL: M >= grace (M/2) + 1 s.
    let src = format!("{BASE}{LEASE}watchdog = \"/dev/watchdog\"\n");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (24, 12, "lease.watchdog", ProblemKind::LeaseTiming));
    assert!(msg.contains("hardware watchdog needs kill margin"), "{msg}");
    let src = format!("{BASE}{LEASE}watchdog = \"dev/watchdog\"\nrenewal_interval = \"2s\"\n");
    let (_, _, field, _, msg) = only(&src);
    assert_eq!(field, "lease.watchdog");
    assert!(msg.contains("absolute"), "{msg}");
    let src = format!("{BASE}{LEASE}watchdog = \"/dev/watchdog\"\nrenewal_interval = \"2s\"\n");
    let f = write(&src);
    let c = tandem_config::load(f.path()).unwrap();
    let plan = c.lease.unwrap().fence_plan().unwrap();
    assert_eq!(plan.watchdog().unwrap().device, std::path::Path::new("/dev/watchdog"));
    assert_eq!(plan.watchdog_extra_ms(), 1000);
}

const MONITOR: &str = r#"
  [[group.monitor]]
  name = "web"
  target = "http://10.0.0.50/"
  options = { expect = "200" }
  resource = "app"
"#;

#[test]
fn monitor_specs_are_built_by_the_monitors_crate() {
    let ok = format!("{BASE}{GROUP}{MONITOR}");
    tandem_config::load(write(&ok).path()).unwrap();

    let src = ok.replace("options = { expect = \"200\" }", "options = { expect = \"200\", colour = \"red\" }");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!(
        (line, col, field.as_str(), kind),
        (41, 31, "group \"g\".monitor \"web\".options.colour", ProblemKind::MonitorSpec)
    );
    assert!(msg.contains("colour") && msg.contains("expect"), "{msg}");

    let src = ok.replace("http://10.0.0.50/", "gopher://10.0.0.50/");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!(
        (line, col, field.as_str(), kind),
        (40, 12, "group \"g\".monitor \"web\".target", ProblemKind::MonitorSpec)
    );
    assert!(msg.contains("postgresql"), "lists known schemes: {msg}");

    let src = ok.replace("expect = \"200\"", "expect = \"abc\"");
    let (line, col, field, _, _) = only(&src);
    assert_eq!((line, col, field.as_str()), (41, 24, "group \"g\".monitor \"web\".options.expect"));

    let src = ok.replace("resource = \"app\"", "resource = \"ap\"");
    let (line, col, field, kind, _) = only(&src);
    assert_eq!(
        (line, col, field.as_str(), kind),
        (42, 14, "group \"g\".monitor \"web\".resource", ProblemKind::UnknownReference)
    );
}

#[test]
fn a_monitor_may_have_a_restart_limit_of_its_own() {
    let ok = format!("{BASE}{GROUP}{MONITOR}").replace("resource = \"app\"", "resource = \"app\"\n  restart_limit = 5");
    let c = tandem_config::load(write(&ok).path()).unwrap();
    let m = &c.groups[0].monitors[0];
    assert_eq!((m.restart_limit, m.restart_window), (Some(5), None));
    let src = ok.replace("restart_limit = 5", "restart_limit = 5\n  restart_window = \"0s\"");
    let (line, _, field, kind, msg) = only(&src);
    assert_eq!(
        (line, field.as_str(), kind),
        (44, "group \"g\".monitor \"web\".restart_window", ProblemKind::InvalidValue)
    );
    assert!(msg.contains("greater than zero"), "{msg}");
}

#[test]
fn inline_monitor_password_is_refused_without_echoing_it() {
    let src = format!("{BASE}{GROUP}{MONITOR}").replace("http://10.0.0.50/", "http://u:hunter2@10.0.0.50/");
    let e = errors_of(&src);
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert_eq!(e.errors[0].kind, ProblemKind::MonitorSpec);
}

#[test]
fn many_errors_are_reported_together_in_file_order() {
    let src = format!("{BASE}{GROUP}{MONITOR}")
        .replace("port = 5406", "port = 0")
        .replace("id = 2", "id = 0")
        .replace("nodes = [\"a\", \"b\"]", "nodes = [\"a\", \"z\"]")
        .replace("kind = \"exec\"", "kind = \"exec\"\n  colour = 1")
        .replace("resource = \"app\"", "resource = \"zz\"");
    let e = errors_of(&src);
    let kinds: Vec<ProblemKind> = e.iter().map(|d| d.kind).collect();
    assert_eq!(
        kinds,
        vec![
            ProblemKind::InvalidValue,
            ProblemKind::InvalidValue,
            ProblemKind::UnknownReference,
            ProblemKind::UnknownField,
            ProblemKind::UnknownReference,
        ],
        "{e}"
    );
    let lines: Vec<usize> = e.iter().map(|d| d.location.unwrap().line).collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{lines:?}");
}

#[test]
fn single_link_is_a_warning_not_an_error() {
    let src = BASE
        .replace("[[link]]\nname = \"backup\"\nport = 5406\n", "")
        .replace(", backup = \"10.9.0.1\"", "")
        .replace(", backup = \"10.9.0.2\"", "");
    let c = tandem_config::check(write(&src).path()).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert_eq!(c.warnings[0].severity, Severity::Warning);
    assert_eq!(c.warnings[0].kind, ProblemKind::Redundancy);
    assert_eq!(c.warnings[0].location, Some(tandem_config::Location { line: 4, column: 1 }));
    assert!(c.warnings[0].to_string().contains(": warning: link \"lan\""), "{}", c.warnings[0]);
}

#[test]
fn unreadable_file_is_an_error_without_position() {
    let e = tandem_config::load("/nonexistent/tandem.toml").unwrap_err();
    assert_eq!(e.errors[0].kind, ProblemKind::Io);
    assert!(e.to_string().starts_with("/nonexistent/tandem.toml: cannot read"), "{e}");
}

#[test]
fn fence_tables_are_checked_field_by_field() {
    // Both the misspelt key and the field it was meant to be are reported.
    let src = BASE.replace("id = 1\n", "id = 1\nfence = { kind = \"agent\", agnt = \"fence_virsh\" }\n");
    let e = errors_of(&src);
    assert_eq!(
        summary(&e),
        vec![
            (15, 9, "node \"a\".fence".into(), ProblemKind::Type),
            (15, 27, "node \"a\".fence.agnt".into(), ProblemKind::UnknownField),
        ],
        "{e}"
    );
    assert!(e.errors[0].message.contains("missing field `agent`"), "{e}");

    let src = BASE.replace("id = 1\n", "id = 1\nfence = { kind = \"stonith\" }\n");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (15, 18, "node \"a\".fence.kind", ProblemKind::InvalidValue));
    assert!(msg.contains("lease-watchdog-only"), "{msg}");

    let src = BASE.replace("id = 1\n", "id = 1\nfence = { kind = \"lease-watchdog-only\", timeout = 5 }\n");
    let (line, col, field, kind, _) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (15, 41, "node \"a\".fence.timeout", ProblemKind::UnknownField));

    let src =
        BASE.replace("id = 1\n", "id = 1\nfence = { kind = \"host-cluster\", vm_uuid = \"not-a-uuid\" }\n") + HOST_LINK;
    let (line, col, field, kind, _) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (15, 44, "node \"a\".fence.vm_uuid", ProblemKind::InvalidValue));

    let src = BASE.replace("id = 1\n", "id = 1\nfence = { kind = \"command\", command = [] }\n");
    let (line, col, field, kind, _) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (15, 39, "node \"a\".fence.command", ProblemKind::InvalidValue));
}

#[test]
fn fence_agent_secrets_and_stdin_lines_are_guarded() {
    // An inline password is refused, and its value never appears in the message.
    let src = BASE.replace(
        "id = 1\n",
        "id = 1\nfence = { kind = \"agent\", agent = \"fence_ipmilan\", params = { password = \"hunter2\" } }\n",
    );
    let (_, _, field, kind, msg) = only(&src);
    assert_eq!((field.as_str(), kind), ("node \"a\".fence.params.password", ProblemKind::InvalidValue));
    assert!(msg.contains("password_file") && !msg.contains("hunter2"), "{msg}");

    // A line break in a value would smuggle another key=value line onto the agent's stdin.
    let src = BASE.replace(
        "id = 1\n",
        "id = 1\nfence = { kind = \"agent\", agent = \"fence_ipmilan\", params = { plug = \"vm1\\naction=on\" } }\n",
    );
    let (_, _, field, kind, msg) = only(&src);
    assert_eq!((field.as_str(), kind), ("node \"a\".fence.params.plug", ProblemKind::InvalidValue));
    assert!(msg.contains("line break"), "{msg}");

    let src = BASE.replace(
        "id = 1\n",
        "id = 1\nfence = { kind = \"agent\", agent = \"fence_ipmilan\", params = { action = \"reboot\" } }\n",
    );
    let (_, _, field, _, _) = only(&src);
    assert_eq!(field, "node \"a\".fence.params.action");

    let src = BASE.replace(
        "id = 1\n",
        "id = 1\nfence = { kind = \"agent\", agent = \"fence_ipmilan\", password_file = \"pw\", password_env = \"PW\" }\n",
    );
    let e = errors_of(&src);
    let fields: Vec<_> = summary(&e).into_iter().map(|s| s.2).collect();
    assert_eq!(fields, ["node \"a\".fence.password_file", "node \"a\".fence.password_env"], "{e}");

    let src =
        BASE.replace("id = 1\n", "id = 1\nfence = { kind = \"command\", command = [\"/bin/true\"], timeout = 0 }\n");
    let (_, _, field, _, _) = only(&src);
    assert_eq!(field, "node \"a\".fence.timeout");
}

#[test]
fn disk_needs_exactly_one_of_device_or_directory_and_absolute_paths() {
    let fenced = format!("{BASE}{GROUP}{LEASE}")
        .replace("id = 1\n", "id = 1\nfence = { kind = \"lease-watchdog-only\" }\n")
        .replace("id = 2\n", "id = 2\nfence = { kind = \"lease-watchdog-only\" }\n");
    let both = format!("{fenced}{DISK}  device = \"/dev/sdb\"\n  mountpoint = \"/data\"\n");
    let e = errors_of(&both);
    assert_eq!(e.errors[0].field, "group \"g\".resource \"data\".directory", "{e}");
    assert!(e.errors[0].message.contains("not both"), "{e}");

    let relative = format!("{fenced}{DISK}").replace("/shared/data", "shared/data");
    let (_, _, field, kind, msg) = only(&relative);
    assert_eq!((field.as_str(), kind), ("group \"g\".resource \"data\".directory", ProblemKind::InvalidValue));
    assert!(msg.contains("absolute"), "{msg}");

    let neither = format!("{fenced}{DISK}").replace("  directory = \"/shared/data\"\n", "  fstype = \"ext4\"\n");
    let (_, _, field, kind, _) = only(&neither);
    assert_eq!((field.as_str(), kind), ("group \"g\".resource \"data\"", ProblemKind::Type));
}

#[test]
fn exec_needs_a_program_and_links_need_sane_timeouts() {
    let src = format!("{BASE}{GROUP}").replace("start = [\"/bin/true\"]", "start = []");
    let (line, col, field, kind, _) = only(&src);
    assert_eq!(
        (line, col, field.as_str(), kind),
        (35, 11, "group \"g\".resource \"app\".start", ProblemKind::InvalidValue)
    );

    let src = BASE.replace("port = 5406\n", "port = 5406\ninterval = \"2s\"\ntimeout = \"3s\"\n");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (12, 11, "link \"backup\".timeout", ProblemKind::InvalidValue));
    assert!(msg.contains("twice"), "{msg}");

    let src = BASE.replace("port = 5406\n", "port = 5406\ninterval = \"2 fortnights\"\n");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (11, 12, "link \"backup\".interval", ProblemKind::Type));
    assert!(msg.contains("500ms"), "{msg}");
}

#[test]
fn names_and_sections_are_checked() {
    let src = BASE.replace("name = \"c\"", "name = \"my cluster!\"");
    let (line, col, field, kind, _) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (2, 8, "cluster.name", ProblemKind::InvalidValue));

    let src = BASE.replace("[cluster]\nname = \"c\"\n", "");
    let e = errors_of(&src);
    assert!(e.errors[0].message.contains("missing [cluster]"), "{e}");

    let src = format!("{BASE}{GROUP}{GROUP}");
    let e = errors_of(&src);
    assert_eq!(e.errors[0].kind, ProblemKind::Duplicate, "{e}");
    assert_eq!(e.errors[0].location.unwrap().line, 39, "{e}");

    let src = BASE
        .replace("[[link]]\nname = \"lan\"", "[link]\nname = \"lan\"")
        .replace("[[link]]\nname = \"backup\"\nport = 5406\n", "");
    let e = errors_of(&src);
    assert!(e.iter().any(|d| d.field == "link" && d.message.contains("[[link]]")), "{e}");
}

#[test]
fn every_bad_field_of_one_table_is_reported() {
    let src = BASE.replace("id = 2\n", "id = \"two\"\nvotse = 2\ncolour = \"red\"\n");
    let e = errors_of(&src);
    assert_eq!(
        summary(&e),
        vec![
            (19, 6, "node \"b\".id".into(), ProblemKind::Type),
            (20, 1, "node \"b\".votse".into(), ProblemKind::UnknownField),
            (21, 1, "node \"b\".colour".into(), ProblemKind::UnknownField),
        ],
        "{e}"
    );
}

#[test]
fn api_section_with_mutual_tls_loads() {
    let src = BASE.replace("id = 2\n", "id = 2\napi = \"10.0.0.2:7701\"\n")
        + "\n[api]\nlisten = \"10.0.0.1:7701\"\nanonymous_roles = [\"viewer\"]\n\
           tls = { cert = \"/etc/tandem/api.pem\", key = \"/etc/tandem/api.key\", client_ca = \"/etc/tandem/ca.pem\" }\n\
           roles = { \"ops-alice\" = [\"operator\"], \"node-b\" = [\"peer\", \"viewer\"], \"hv1\" = [\"host\"] }\n";
    let f = write(&src);
    let c = tandem_config::check(f.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let api = &c.config.api;
    assert_eq!(api.listen, "10.0.0.1:7701".parse().unwrap());
    assert_eq!(api.roles["node-b"], vec![tandem_config::ApiRole::Peer, tandem_config::ApiRole::Viewer]);
    assert_eq!(api.effective_anonymous_roles(), vec![tandem_config::ApiRole::Viewer]);
    assert_eq!(c.config.nodes[1].api, Some("10.0.0.2:7701".parse().unwrap()));
    assert_eq!(c.config.nodes[0].api, None);
    // And back.
    let again = tandem_config::check_str(&tandem_config::to_toml(&c.config), "again.toml").unwrap();
    assert_eq!(again.config, c.config);
}

#[test]
fn api_defaults_to_loopback_with_every_role() {
    let c = tandem_config::check_str(BASE, "base.toml").unwrap().config;
    assert_eq!(c.api.listen, "127.0.0.1:7701".parse().unwrap());
    assert_eq!(c.api.effective_anonymous_roles(), tandem_config::ApiRole::ALL.to_vec());
    assert!(!tandem_config::to_toml(&c).contains("[api]"), "defaults are not written back");
}

#[test]
fn api_on_the_network_without_tls_needs_insecure() {
    let src = format!("{BASE}\n[api]\nlisten = \"0.0.0.0:7701\"\n");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (23, 10, "api.listen", ProblemKind::Insecure));
    assert!(msg.contains("insecure = true") && msg.contains("[api.tls]"), "{msg}");

    let src = format!("{BASE}\n[api]\nlisten = \"0.0.0.0:7701\"\ninsecure = true\n");
    let f = write(&src);
    let c = tandem_config::check(f.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert_eq!(c.warnings[0].kind, ProblemKind::Insecure);
    assert_eq!(c.warnings[0].field, "api.insecure");
}

#[test]
fn api_errors_are_located() {
    let src =
        format!("{BASE}\n[api]\nroles = {{ \"x\" = [\"admin\"] }}\ntls = {{ cert = \"api.pem\", key = \"/k\" }}\n");
    let e = errors_of(&src);
    let s = summary(&e);
    assert_eq!(s.len(), 1, "serde stops the section at the first bad value: {e}");
    assert_eq!(s[0], (23, 18, "api.roles.x[0]".into(), ProblemKind::Type), "{e}");
    assert!(e.errors[0].message.contains("viewer"), "lists the roles: {e}");

    let src =
        format!("{BASE}\n[api]\nroles = {{ \"x\" = [\"viewer\"] }}\ntls = {{ cert = \"api.pem\", key = \"/k\" }}\n");
    let e = errors_of(&src);
    assert_eq!(
        summary(&e),
        vec![
            (23, 9, "api.roles".into(), ProblemKind::InvalidValue),
            (24, 16, "api.tls.cert".into(), ProblemKind::InvalidValue),
        ],
        "{e}"
    );
    assert!(e.errors[0].message.contains("client_ca"), "{e}");

    let src = BASE.replace("id = 2\n", "id = 2\napi = \"0.0.0.0:7701\"\n");
    let (line, col, field, kind, _) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (20, 7, "node \"b\".api", ProblemKind::InvalidValue));
    let src = BASE.replace("id = 2\n", "id = 2\napi = \"10.0.0.2\"\n");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (20, 7, "node \"b\".api", ProblemKind::Type), "{msg}");
}

#[test]
fn a_node_api_address_on_the_network_needs_tls_too() {
    // The agent listens on its node's `api` address: without TLS that is an open door.
    let src = BASE.replace("id = 2\n", "id = 2\napi = \"10.0.0.2:7701\"\n");
    let (line, _col, field, kind, msg) = only(&src);
    assert_eq!((line, field.as_str(), kind), (20, "node \"b\".api", ProblemKind::Insecure));
    assert!(msg.contains("10.0.0.2:7701") && msg.contains("[api.tls]"), "{msg}");
    // Loopback (tests, one-machine labs) and an explicit `insecure` are accepted.
    let src = BASE.replace("id = 2\n", "id = 2\napi = \"127.0.0.2:7701\"\n");
    tandem_config::check_str(&src, "lo.toml").unwrap_or_else(|e| panic!("{e}"));
    let src = BASE.replace("id = 2\n", "id = 2\napi = \"10.0.0.2:7701\"\n") + "\n[api]\ninsecure = true\n";
    tandem_config::check_str(&src, "insecure.toml").unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn ping_targets_are_addresses() {
    let src = BASE.replacen("[cluster]\n", "[cluster]\nping_targets = [\"10.0.0.254:53\"]\n", 1);
    let c = tandem_config::check_str(&src, "ping.toml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.config.cluster.ping_targets, vec!["10.0.0.254:53".parse().unwrap()]);
    let src = BASE.replacen("[cluster]\n", "[cluster]\nping_targets = [\"router\"]\n", 1);
    let e = errors_of(&src);
    assert!(e.errors.iter().any(|d| d.field.starts_with("cluster.ping_targets")), "{e}");
}

/// Two groups placed by capacity and (anti-)affinity on capped nodes.
const PLACED: &str = r#"
[[group]]
name = "g"
nodes = ["a", "b"]
priority = 10
demand = { memory_mib = 4096, vcpus = 4 }
affinity = ["web-tier"]
anti_affinity = ["db_pair"]

  [[group.resource]]
  name = "app"
  kind = "exec"
  start = ["/bin/true"]
  stop = ["/bin/true"]

[[group]]
name = "h"
nodes = ["b", "a"]
affinity = ["web-tier"]
anti_affinity = ["db_pair"]

  [[group.resource]]
  name = "app"
  kind = "exec"
  start = ["/bin/true"]
  stop = ["/bin/true"]
"#;

fn placed_base() -> String {
    BASE.replace(
        "links = { lan = \"10.0.0.1\", backup = \"10.9.0.1\" }\n",
        "links = { lan = \"10.0.0.1\", backup = \"10.9.0.1\" }\ncapacity = { memory_mib = 8192, vcpus = 8 }\n",
    )
    .replace(
        "links = { lan = \"10.0.0.2\", backup = \"10.9.0.2\" }\n",
        "links = { lan = \"10.0.0.2\", backup = \"10.9.0.2\" }\ncapacity = { memory_mib = 2048, vcpus = 16 }\n",
    )
}

#[test]
fn placement_fields_load_with_their_defaults() {
    let f = write(&format!("{}{PLACED}", placed_base()));
    let c = tandem_config::check(f.path()).unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let cap = |n: &str| c.config.node(n).unwrap().capacity.unwrap();
    assert_eq!((cap("a").memory_mib, cap("a").vcpus, cap("b").memory_mib), (8192, 8, 2048));
    let g = c.config.group("g").unwrap();
    assert_eq!(g.priority, 10);
    assert_eq!(g.demand, Some(tandem_config::Capacity { memory_mib: 4096, vcpus: 4 }));
    assert_eq!(
        (g.affinity.as_slice(), g.anti_affinity.as_slice()),
        (&["web-tier".to_string()][..], &["db_pair".to_string()][..])
    );
    let h = c.config.group("h").unwrap();
    assert_eq!((h.priority, h.demand), (0, None), "defaults: priority 0, demand left to the agent");
    // The fields survive a round trip through TOML.
    let again = tandem_config::check_str(&tandem_config::to_toml(&c.config), "again.toml").unwrap();
    assert_eq!(again.config, c.config);
}

#[test]
fn node_capacity_is_checked_field_by_field() {
    let src = format!("{}{PLACED}", placed_base()).replace("memory_mib = 8192, vcpus = 8", "memory_mib = 0, vcpus = 8");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!(
        (line, col, field.as_str(), kind),
        (16, 27, "node \"a\".capacity.memory_mib", ProblemKind::InvalidValue)
    );
    assert!(msg.contains("greater than zero"), "{msg}");
    let src = format!("{}{PLACED}", placed_base()).replace("memory_mib = 8192, vcpus = 8", "memory_mib = 8192");
    let (line, _, field, kind, msg) = only(&src);
    assert_eq!((line, field.as_str(), kind), (16, "node \"a\".capacity", ProblemKind::Type));
    assert!(msg.contains("vcpus"), "{msg}");
    let src = format!("{}{PLACED}", placed_base()).replace("vcpus = 8 }", "vcpus = 8, cpus = 2 }");
    let (line, _, field, kind, _) = only(&src);
    assert_eq!((line, field.as_str(), kind), (16, "node \"a\".capacity.cpus", ProblemKind::UnknownField));
}

#[test]
fn a_demand_no_node_can_hold_is_an_error() {
    // Node b (2048 MiB) is too small and node a (8 vCPUs) too: the group could never run.
    let src =
        format!("{}{PLACED}", placed_base()).replace("memory_mib = 4096, vcpus = 4", "memory_mib = 4096, vcpus = 12");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (28, 10, "group \"g\".demand", ProblemKind::Placement));
    assert!(msg.contains("\"a\" has 8192 MiB and 8 vCPUs") && msg.contains("\"b\" has 2048 MiB"), "{msg}");
    // A node without a capacity is unlimited: then the demand is fine.
    let src = src.replace("capacity = { memory_mib = 2048, vcpus = 16 }\n", "");
    tandem_config::check_str(&src, "ok.toml").unwrap();
}

#[test]
fn affinity_sets_are_named_and_consistent() {
    let src = format!("{}{PLACED}", placed_base())
        .replace("affinity = [\"web-tier\"]\nanti", "affinity = [\"db_pair\"]\nanti");
    let e = errors_of(&src);
    let s = summary(&e);
    assert!(
        s.contains(&(30, 18, "group \"g\".anti_affinity[0]".into(), ProblemKind::Placement)),
        "the same set in both lists: {e}"
    );
    let src = format!("{}{PLACED}", placed_base()).replace("[\"web-tier\"]\nanti_affinity = [\"db_pair\"]\n\n  [[group.resource]]\n  name = \"app\"\n  kind = \"exec\"\n  start = [\"/bin/true\"]\n  stop = [\"/bin/true\"]\n\n[[group]]", "[\"Web Tier\"]\nanti_affinity = [\"db_pair\"]\n\n  [[group.resource]]\n  name = \"app\"\n  kind = \"exec\"\n  start = [\"/bin/true\"]\n  stop = [\"/bin/true\"]\n\n[[group]]");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (29, 13, "group \"g\".affinity[0]", ProblemKind::InvalidValue));
    assert!(msg.contains("lowercase"), "{msg}");
    let src = format!("{}{PLACED}", placed_base()).replace("priority = 10", "priority = \"high\"");
    let (line, _, field, kind, _) = only(&src);
    assert_eq!((line, field.as_str(), kind), (27, "group \"g\".priority", ProblemKind::Type));
}

#[test]
fn a_set_no_other_group_names_is_a_warning() {
    let src = format!("{}{PLACED}", placed_base()).replace("anti_affinity = [\"db_pair\"]\n\n  [[group.resource]]\n  name = \"app\"\n  kind = \"exec\"\n  start = [\"/bin/true\"]\n  stop = [\"/bin/true\"]\n\n[[group]]", "anti_affinity = [\"db-pair\"]\n\n  [[group.resource]]\n  name = \"app\"\n  kind = \"exec\"\n  start = [\"/bin/true\"]\n  stop = [\"/bin/true\"]\n\n[[group]]");
    let c = tandem_config::check_str(&src, "w.toml").unwrap();
    let w: Vec<(usize, String, ProblemKind)> =
        c.warnings.iter().map(|d| (d.location.unwrap().line, d.field.clone(), d.kind)).collect();
    assert_eq!(
        w,
        vec![
            (30, "group \"g\".anti_affinity[0]".into(), ProblemKind::UnknownReference),
            (42, "group \"h\".anti_affinity[0]".into(), ProblemKind::UnknownReference),
        ]
    );
    assert!(c.warnings[0].message.contains("\"db-pair\""), "{}", c.warnings[0].message);
}

#[test]
fn host_cluster_fencing_needs_the_host_link() {
    let src = BASE.replace(
        "id = 2\n",
        "id = 2\nfence = { kind = \"host-cluster\", vm_uuid = \"4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b01\" }\n",
    );
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (20, 18, "node \"b\".fence.kind", ProblemKind::InvalidValue));
    assert!(msg.contains("add [host_link]"), "{msg}");
    // With the link, the node's fence UUID is the link's VM UUID when [host_link] has none.
    let src = src + "\n[host_link]\naddress = \"tcp:10.0.0.254:7702\"\nkey_file = \"/etc/tandem/link.key\"\n";
    let f = write(&src);
    let c = tandem_config::load(f.path()).unwrap();
    let l = c.host_link.unwrap();
    assert_eq!(l.address, tandem_config::LinkAddress::Tcp { host: "10.0.0.254".into(), port: 7702 });
    assert_eq!((l.vm_uuid, l.heartbeat_interval), (None, std::time::Duration::from_secs(1)));
}

#[test]
fn host_link_fields_are_checked() {
    let src = format!(
        "{BASE}\n[host_link]\naddress = \"vsock:two:7702\"\nkey_file = \"/k\"\nvm_uuid = \"4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b01\"\n"
    );
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (23, 11, "host_link.address", ProblemKind::Type));
    assert!(msg.contains("vsock:CID:PORT"), "{msg}");
    let src = format!(
        "{BASE}\n[host_link]\naddress = \"vsock:2:7702\"\nvm_uuid = \"nope\"\nkey_file = \"link.key\"\nheartbeat_interval = \"0s\"\n"
    );
    let s = summary(&errors_of(&src));
    assert_eq!(
        s,
        vec![
            (24, 11, "host_link.vm_uuid".to_string(), ProblemKind::InvalidValue),
            (25, 12, "host_link.key_file".to_string(), ProblemKind::InvalidValue),
            (26, 22, "host_link.heartbeat_interval".to_string(), ProblemKind::InvalidValue),
        ]
    );
    let src = format!(
        "{BASE}\n[host_link]\naddress = \"unix:relative\"\nkey_file = \"/k\"\nvm_uuid = \"4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b01\"\n"
    );
    let (line, col, field, _, msg) = only(&src);
    assert_eq!((line, col, field.as_str()), (23, 11, "host_link.address"));
    assert!(msg.contains("must be absolute"), "{msg}");
    // Neither a UUID here nor a host-cluster fence: nothing tells the link which VM this is.
    let src = format!("{BASE}\n[host_link]\naddress = \"unix:/run/tandem/link.sock\"\nkey_file = \"/k\"\n");
    let (line, col, field, _, msg) = only(&src);
    assert_eq!((line, col, field.as_str()), (22, 1, "host_link"));
    assert!(msg.contains("no VM UUID"), "{msg}");
    // TLS: only for tcp:, a certificate needs its key.
    let uuid = "vm_uuid = \"4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b01\"";
    let src = format!(
        "{BASE}\n[host_link]\naddress = \"unix:/run/l.sock\"\nkey_file = \"/k\"\n{uuid}\ntls = {{ ca = \"/ca.pem\" }}\n"
    );
    let (line, col, field, _, msg) = only(&src);
    assert_eq!((line, col, field.as_str()), (26, 7, "host_link.tls"));
    assert!(msg.contains("TLS is for a tcp: address"), "{msg}");
    let src = format!(
        "{BASE}\n[host_link]\naddress = \"tcp:10.0.0.1:7702\"\nkey_file = \"/k\"\n{uuid}\ntls = {{ ca = \"ca.pem\", cert = \"/c.pem\" }}\n"
    );
    let s = summary(&errors_of(&src));
    assert_eq!(
        s.iter().map(|(_, _, f, k)| (f.as_str(), *k)).collect::<Vec<_>>(),
        vec![("host_link.tls.ca", ProblemKind::InvalidValue), ("host_link.tls.cert", ProblemKind::InvalidValue)],
        "{s:?}"
    );
    let ok = format!(
        "{BASE}\n[host_link]\naddress = \"tcp:10.0.0.1:7702\"\nkey_file = \"/k\"\n{uuid}\n\
         tls = {{ ca = \"/ca.pem\", cert = \"/c.pem\", key = \"/c.key\", server_name = \"h1\" }}\n"
    );
    let f = write(&ok);
    let c = tandem_config::load(f.path()).unwrap();
    assert_eq!(c.host_link.unwrap().tls.unwrap().server_name.as_deref(), Some("h1"));
}

#[test]
fn vm_link_fields_are_checked() {
    let vm = |extra: &str| {
        format!(
            "{BASE}\n[[group]]\nname = \"web\"\nnodes = [\"a\", \"b\"]\n\n[[group.resource]]\nname = \"vm\"\nkind = \"vm\"\ndomain = \"/etc/tandem/web.xml\"\n{extra}"
        )
    };
    let src = vm(
        "link_key_file = \"web.key\"\nguest_cluster = \"bad name\"\nvsock_uds = \"/run/web.vsock\"\nguest_heartbeat_timeout = \"0s\"\n",
    ) + "\n[guest_link]\nlisten = \"10.0.0.1:0\"\nvsock_port = 0\n";
    let s = summary(&errors_of(&src));
    assert_eq!(
        s,
        vec![
            (30, 17, "group \"web\".resource \"vm\".link_key_file".to_string(), ProblemKind::InvalidValue),
            (31, 17, "group \"web\".resource \"vm\".guest_cluster".to_string(), ProblemKind::InvalidValue),
            (33, 27, "group \"web\".resource \"vm\".guest_heartbeat_timeout".to_string(), ProblemKind::InvalidValue),
            (36, 10, "guest_link.listen".to_string(), ProblemKind::InvalidValue),
            (37, 14, "guest_link.vsock_port".to_string(), ProblemKind::InvalidValue),
        ]
    );
    // Link options without a key, and a key with nowhere to link to.
    let src = vm("vsock_uds = \"/run/web.vsock\"\nguest_heartbeat_timeout = \"30s\"\n");
    let e = errors_of(&src);
    assert_eq!(e.len(), 2, "{e}");
    assert!(e.errors.iter().all(|d| d.message.contains("link_key_file")), "{e}");
    let f = write(&vm("link_key_file = \"/etc/tandem/web.key\"\n"));
    let c = tandem_config::check(f.path()).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings[0].message.contains("nowhere to link to"), "{}", c.warnings[0]);
    // A good one.
    let f = write(
        &(vm(
            "link_key_file = \"/etc/tandem/web.key\"\nguest_cluster = \"pg\"\nvsock_uds = \"/run/web.vsock\"\nguest_heartbeat_timeout = \"30s\"\n",
        ) + "\n[guest_link]\nlisten = \"10.0.0.1:7702\"\n"),
    );
    let c = tandem_config::check(f.path()).unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let g = c.config.guest_link.unwrap();
    assert_eq!((g.listen, g.vsock_port), (Some("10.0.0.1:7702".parse().unwrap()), 7702));
}

#[test]
fn networks_parse_with_defaults() {
    let src = format!(
        "{BASE}\n[[network]]\nname = \"storage\"\nbridge = \"br-st\"\n\n[[network]]\nname = \"lan\"\n\
         libvirt_network = \"default\"\ninterfaces = [\"bond0\", \"eth1\"]\nping_targets = [\"10.0.0.254:53\"]\n\
         hold = \"500ms\"\n"
    );
    let c = tandem_config::check_str(&src, "n.toml").unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let n = &c.config.networks;
    assert_eq!(n.len(), 2);
    assert_eq!(n[0].hold, std::time::Duration::from_secs(2));
    assert_eq!(n[0].watched_interfaces(), vec!["br-st".to_string()]);
    assert_eq!(n[1].watched_interfaces(), vec!["bond0".to_string(), "eth1".to_string()]);
    assert_eq!(n[1].hold, std::time::Duration::from_millis(500));
    assert_eq!(n[1].ping_targets.len(), 1);
}

#[test]
fn network_errors_name_the_field() {
    // Line 22 is the first line after BASE's last one.
    let src = format!("{BASE}\n[[network]]\nname = \"lan\"\n");
    let (line, _, field, kind, msg) = only(&src);
    assert_eq!((line, field.as_str(), kind), (22, "network \"lan\"", ProblemKind::Type));
    assert!(msg.contains("`bridge` or `libvirt_network`"), "{msg}");

    let src = format!("{BASE}\n[[network]]\nname = \"lan\"\nlibvirt_network = \"default\"\n");
    let (_, _, field, kind, msg) = only(&src);
    assert_eq!((field.as_str(), kind), ("network \"lan\"", ProblemKind::Empty));
    assert!(msg.contains("interfaces"), "{msg}");

    let src = format!("{BASE}\n[[network]]\nname = \"lan\"\nbridge = \"br0\"\ninterfaces = [\"eth0\", \"a/b\"]\n");
    let (line, col, field, kind, msg) = only(&src);
    assert_eq!((line, col, field.as_str(), kind), (25, 23, "network \"lan\".interfaces[1]", ProblemKind::InvalidValue));
    assert!(msg.contains("\"a/b\" is not an interface name"), "{msg}");

    let src = format!(
        "{BASE}\n[[network]]\nname = \"lan\"\nbridge = \"br0\"\n\n[[network]]\nname = \"lan\"\nbridge = \"br0\"\n"
    );
    let e = errors_of(&src);
    let s = summary(&e);
    assert_eq!(s.len(), 2, "{e}");
    assert_eq!((s[0].2.as_str(), s[0].3), ("network \"lan\".name", ProblemKind::Duplicate));
    assert_eq!((s[1].2.as_str(), s[1].3), ("network \"lan\".bridge", ProblemKind::Duplicate));

    let src = format!("{BASE}\n[[network]]\nname = \"lan\"\nbridge = \"br0\"\nhold = \"soon\"\n");
    let (line, _, field, kind, _) = only(&src);
    assert_eq!((line, field.as_str(), kind), (25, "network \"lan\".hold", ProblemKind::Type));

    let src = format!("{BASE}\n[networks]\n");
    let (_, _, _, kind, msg) = only(&src);
    assert_eq!(kind, ProblemKind::UnknownField);
    assert!(msg.contains("write [[network]]"), "{msg}");
}

#[test]
fn a_vm_s_guest_cluster_is_a_name_located_like_any_field() {
    let vm = |gc: &str| {
        format!(
            "{BASE}\n[[group]]\nname = \"pg1\"\nnodes = [\"a\", \"b\"]\n\n[[group.resource]]\nname = \"vm\"\nkind = \"vm\"\n\
             domain = \"/etc/tandem/pg1.xml\"\nguest_cluster = {gc}\n"
        )
    };
    let f = write(&vm("\"pg\""));
    let c = tandem_config::load(f.path()).unwrap();
    match &c.groups[0].resources[0].kind {
        tandem_config::ResourceKind::Vm(v) => assert_eq!(v.guest_cluster.as_deref(), Some("pg")),
        other => panic!("{other:?}"),
    }
    let src = vm("\"pg cluster\"");
    let line = src.lines().position(|l| l.starts_with("guest_cluster")).unwrap() + 1;
    let (l, col, field, kind, msg) = only(&src);
    assert_eq!((l, col, kind), (line, 17, ProblemKind::InvalidValue), "{msg}");
    assert_eq!(field, "group \"pg1\".resource \"vm\".guest_cluster");
    assert!(msg.contains("invalid guest cluster name \"pg cluster\""), "{msg}");
    let (l, _, field, kind, _) = only(&vm("7"));
    assert_eq!((l, kind), (line, ProblemKind::Type));
    assert!(field.ends_with("guest_cluster"), "{field}");
}
