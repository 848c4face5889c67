//! How the API's answers look: compact tables and one-line events for
//! people, JSON (enums as lower-case names) for programs.

use std::fmt::Write as _;

use serde_json::{Value, json};
use tandem_proto::v1 as pb;

/// `GROUP_STATE_STARTED` -> `started`; unknown numbers as `unknown(N)`.
fn name<E: TryFrom<i32>>(v: i32, full: impl Fn(&E) -> &'static str, prefix: &str) -> String {
    match E::try_from(v) {
        Ok(e) => {
            let s = full(&e);
            s.strip_prefix(prefix).unwrap_or(s).to_ascii_lowercase().replace('_', "-")
        }
        Err(_) => format!("unknown({v})"),
    }
}

fn group_state(v: i32) -> String {
    name(v, pb::GroupState::as_str_name, "GROUP_STATE_")
}
fn resource_state(v: i32) -> String {
    name(v, pb::ResourceState::as_str_name, "RESOURCE_STATE_")
}
fn node_state(v: i32) -> String {
    name(v, pb::NodeState::as_str_name, "NODE_STATE_")
}
fn link_state(v: i32) -> String {
    name(v, pb::LinkState::as_str_name, "LINK_STATE_")
}
fn monitor_state(v: i32) -> String {
    name(v, pb::MonitorState::as_str_name, "MONITOR_STATE_")
}
fn reason(v: i32) -> String {
    name(v, pb::NotRunningReason::as_str_name, "NOT_RUNNING_REASON_")
}
/// `move` or `park`.
pub fn standby_mode(v: i32) -> String {
    name(v, pb::StandbyMode::as_str_name, "STANDBY_MODE_")
}
fn probe_status(v: i32) -> String {
    name(v, pb::ProbeStatus::as_str_name, "PROBE_STATUS_").to_ascii_uppercase()
}
fn failure_class(v: i32) -> String {
    name(v, pb::FailureClass::as_str_name, "FAILURE_CLASS_")
}

fn not_running_text(n: &pb::NotRunning) -> String {
    let r = reason(n.reason);
    if !n.detail.is_empty() {
        format!("{r}: {}", n.detail.join("; "))
    } else if n.node.is_empty() {
        r
    } else {
        format!("{r} ({})", n.node)
    }
}

fn not_running_json(n: &pb::NotRunning) -> Value {
    let mut v = json!({ "reason": reason(n.reason), "node": (!n.node.is_empty()).then(|| n.node.clone()) });
    if !n.detail.is_empty() {
        v["detail"] = json!(n.detail);
    }
    v
}

fn probe_json(r: &pb::ProbeResult) -> Value {
    json!({
        "status": probe_status(r.status),
        "latency_ms": r.latency_us as f64 / 1000.0,
        "reason": r.reason,
        "failure_class": (r.failure_class != 0).then(|| failure_class(r.failure_class)),
    })
}

/// `GetStatus` as JSON.
pub fn status_json(s: &pb::GuestStatus) -> Value {
    json!({
        "node": s.node,
        "node_id": s.node_id,
        "quorum": s.quorum,
        "probing": s.probing,
        "self_fenced": s.self_fenced,
        "lease": s.lease.as_ref().map(|l| json!({
            "host_id": l.host_id, "valid": l.valid, "valid_for_ms": l.valid_for_ms,
        })),
        "nodes": s.nodes.iter().map(|n| json!({
            "name": n.name,
            "id": n.id,
            "state": node_state(n.state),
            "local": n.local,
            "standby": n.standby,
            "standby_mode": (n.standby_mode != 0).then(|| standby_mode(n.standby_mode)),
            "links": n.links.iter().map(|l| json!({ "name": l.name, "state": link_state(l.state) })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "groups": s.groups.iter().map(|g| json!({
            "name": g.name,
            "state": group_state(g.state),
            "location": (!g.location.is_empty()).then(|| g.location.clone()),
            "restarts": g.restarts,
            "failovers": g.failovers,
            "failed_on": g.failed_on,
            "monitoring_suspended": g.monitoring_suspended,
            "veto": g.veto,
            "not_running": g.not_running.as_ref().map(not_running_json),
            "resources": g.resources.iter().map(|r| json!({
                "name": r.name, "state": resource_state(r.state),
            })).collect::<Vec<_>>(),
            "monitors": g.monitors.iter().map(|m| json!({
                "name": m.name,
                "resource": (!m.resource.is_empty()).then(|| m.resource.clone()),
                "state": monitor_state(m.state),
                "last_result": m.last_result.as_ref().map(probe_json),
                "consecutive_failures": m.consecutive_failures,
                "last_probe_ms_ago": m.last_probe_ms_ago,
                "restarts": m.restarts,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// Left-aligned columns, two spaces apart, indented by two.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: Vec<String>| {
        let mut l = String::from(" ");
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            l.push(' ');
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$} ");
            }
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// `GetStatus` for people.
pub fn status_text(s: &pb::GuestStatus) -> String {
    let mut out = String::new();
    let _ = write!(out, "node {} (id {})  quorum: {}", s.node, s.node_id, if s.quorum { "yes" } else { "NO" });
    if s.probing {
        out.push_str("  probing resources");
    }
    if s.self_fenced {
        out.push_str("  SELF-FENCED (restart the agent)");
    }
    if let Some(l) = &s.lease {
        if l.valid {
            let _ = write!(out, "  lease: host id {}, valid {:.1} s", l.host_id, l.valid_for_ms as f64 / 1000.0);
        } else {
            let _ = write!(out, "  lease: host id {}, NOT HELD", l.host_id);
        }
    }
    out.push('\n');
    if !s.nodes.is_empty() {
        out.push_str("nodes:\n");
        let rows: Vec<Vec<String>> = s
            .nodes
            .iter()
            .map(|n| {
                let links = if n.local {
                    "(this node)".to_string()
                } else {
                    n.links.iter().map(|l| format!("{} {}", l.name, link_state(l.state))).collect::<Vec<_>>().join(", ")
                };
                let standby = match (n.standby, n.standby_mode) {
                    (false, _) => "-".to_string(),
                    (true, 0) => "yes".to_string(),
                    (true, m) => standby_mode(m),
                };
                vec![n.name.clone(), n.id.to_string(), node_state(n.state), standby, links]
            })
            .collect();
        table(&mut out, &["NAME", "ID", "STATE", "STANDBY", "LINKS"], &rows);
    }
    if s.groups.is_empty() {
        out.push_str("no groups\n");
        return out;
    }
    out.push_str("groups:\n");
    let rows: Vec<Vec<String>> = s
        .groups
        .iter()
        .map(|g| {
            let mut note = g.not_running.as_ref().map(not_running_text).unwrap_or_default();
            if let Some(v) = &g.veto {
                if !note.is_empty() {
                    note.push_str("; ");
                }
                let _ = write!(note, "vetoed here: {v}");
            }
            if !g.failed_on.is_empty() {
                if !note.is_empty() {
                    note.push_str("; ");
                }
                let _ = write!(note, "failed on {}", g.failed_on.join(", "));
            }
            vec![
                g.name.clone(),
                group_state(g.state),
                if g.location.is_empty() { "-".into() } else { g.location.clone() },
                g.restarts.to_string(),
                g.failovers.to_string(),
                if g.monitoring_suspended { "suspended".into() } else { "on".into() },
                note,
            ]
        })
        .collect();
    table(&mut out, &["GROUP", "STATE", "LOCATION", "RESTARTS", "FAILOVERS", "MONITORING", "REASON"], &rows);
    let resources: Vec<Vec<String>> = s
        .groups
        .iter()
        .filter(|g| !g.resources.is_empty())
        .map(|g| {
            let list = g.resources.iter().map(|r| format!("{} {}", r.name, resource_state(r.state)));
            vec![g.name.clone(), list.collect::<Vec<_>>().join(", ")]
        })
        .collect();
    if !resources.is_empty() {
        out.push_str("resources (here):\n");
        table(&mut out, &["GROUP", "RESOURCES"], &resources);
    }
    let monitors: Vec<Vec<String>> = s
        .groups
        .iter()
        .flat_map(|g| g.monitors.iter().map(move |m| (g, m)))
        .map(|(g, m)| {
            let last = match &m.last_result {
                Some(r) => format!(
                    "{} {:.1} ms{}",
                    probe_status(r.status),
                    r.latency_us as f64 / 1000.0,
                    if r.reason.is_empty() { String::new() } else { format!(" - {}", r.reason) }
                ),
                None => "-".into(),
            };
            vec![
                g.name.clone(),
                m.name.clone(),
                if m.resource.is_empty() { "(group)".into() } else { m.resource.clone() },
                monitor_state(m.state),
                m.consecutive_failures.to_string(),
                last,
            ]
        })
        .collect();
    if !monitors.is_empty() {
        out.push_str("monitors:\n");
        table(&mut out, &["GROUP", "MONITOR", "RESOURCE", "STATE", "FAILS", "LAST"], &monitors);
    }
    out
}

fn op_name(v: i32) -> String {
    name(v, pb::ResourceOp::as_str_name, "RESOURCE_OP_")
}
fn outcome(v: i32) -> String {
    name(v, pb::OpOutcome::as_str_name, "OP_OUTCOME_")
}

/// One event as a JSON object (`type` says which kind).
pub fn event_json(e: &pb::Event) -> Value {
    use pb::event::Kind;
    let mut v = match &e.kind {
        Some(Kind::GroupState(g)) => json!({
            "type": "group-state", "group": g.group, "state": group_state(g.state),
            "location": (!g.location.is_empty()).then(|| g.location.clone()),
            "not_running": g.not_running.as_ref().map(not_running_json),
        }),
        Some(Kind::ResourceOp(r)) => json!({
            "type": "resource-op", "group": r.group, "resource": r.resource, "op": op_name(r.op),
            "outcome": outcome(r.outcome), "message": r.message, "duration_ms": r.duration_ms,
        }),
        Some(Kind::MonitorFailure(m)) => json!({
            "type": "monitor-failure", "group": m.group, "monitor": m.monitor,
            "resource": (!m.resource.is_empty()).then(|| m.resource.clone()),
            "result": m.result.as_ref().map(probe_json),
            "consecutive_failures": m.consecutive_failures, "confirmed": m.confirmed,
        }),
        Some(Kind::FenceRequested(f)) => json!({ "type": "fence-requested", "node": f.node }),
        Some(Kind::FenceResult(f)) => {
            json!({ "type": "fence-result", "node": f.node, "fenced": f.fenced, "message": f.message })
        }
        Some(Kind::Notice(n)) => match &n.notice {
            Some(pb::notice::Notice::FailoverLimitReached(f)) => {
                json!({ "type": "notice", "notice": "failover-limit-reached", "group": f.group, "failovers": f.failovers })
            }
            Some(pb::notice::Notice::OperatorRejected(r)) => {
                json!({ "type": "notice", "notice": "operator-rejected", "command": r.seq, "reason": r.reason })
            }
            Some(pb::notice::Notice::Text(t)) => json!({ "type": "notice", "notice": "text", "text": t }),
            None => json!({ "type": "notice" }),
        },
        Some(Kind::Lagged(l)) => json!({ "type": "lagged", "dropped": l.dropped, "message": l.message }),
        None => json!({ "type": "unknown" }),
    };
    v["seq"] = e.seq.into();
    v["unix_ms"] = e.unix_ms.into();
    v
}

/// `HH:MM:SS.mmm` UTC of a Unix time in milliseconds.
fn clock(unix_ms: u64) -> String {
    let ms = unix_ms % 1000;
    let s = unix_ms / 1000;
    format!("{:02}:{:02}:{:02}.{ms:03}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

/// One event as one line for people.
pub fn event_text(e: &pb::Event) -> String {
    use pb::event::Kind;
    let what = match &e.kind {
        Some(Kind::GroupState(g)) => {
            let mut t = format!("group {}: {}", g.group, group_state(g.state));
            if !g.location.is_empty() {
                let _ = write!(t, " on {}", g.location);
            }
            if let Some(n) = &g.not_running {
                let _ = write!(t, " ({})", not_running_text(n));
            }
            t
        }
        Some(Kind::ResourceOp(r)) => {
            let mut t = format!("resource {}/{}: {} {}", r.group, r.resource, op_name(r.op), outcome(r.outcome));
            if r.duration_ms > 0 {
                let _ = write!(t, " after {} ms", r.duration_ms);
            }
            if !r.message.is_empty() {
                let _ = write!(t, " - {}", r.message);
            }
            t
        }
        Some(Kind::MonitorFailure(m)) => {
            let result = m
                .result
                .as_ref()
                .map(|r| format!("{} - {}", probe_status(r.status), r.reason))
                .unwrap_or_else(|| "failed".into());
            format!(
                "monitor {}/{}: {result} ({} in a row{})",
                m.group,
                m.monitor,
                m.consecutive_failures,
                if m.confirmed { ", confirmed" } else { "" }
            )
        }
        Some(Kind::FenceRequested(f)) => format!("fence requested for node {}", f.node),
        Some(Kind::FenceResult(f)) => format!(
            "fence of node {}: {}{}",
            f.node,
            if f.fenced { "done" } else { "FAILED" },
            if f.message.is_empty() { String::new() } else { format!(" - {}", f.message) }
        ),
        Some(Kind::Notice(n)) => match &n.notice {
            Some(pb::notice::Notice::FailoverLimitReached(f)) => format!(
                "notice: group {} reached its failover limit after {} failovers; `tandemctl group reset {}` releases it",
                f.group, f.failovers, f.group
            ),
            Some(pb::notice::Notice::OperatorRejected(r)) => {
                format!("notice: operator command #{} rejected: {}", r.seq, r.reason)
            }
            Some(pb::notice::Notice::Text(t)) => format!("notice: {t}"),
            None => "notice".into(),
        },
        Some(Kind::Lagged(l)) => format!("{} (this client was too slow)", l.message),
        None => "unknown event (newer agent?)".into(),
    };
    format!("{} {what}", clock(e.unix_ms))
}

fn shutdown_action(v: i32) -> String {
    name(v, pb::ShutdownAction::as_str_name, "SHUTDOWN_ACTION_")
}
fn shutdown_step(v: i32) -> String {
    name(v, pb::ShutdownStep::as_str_name, "SHUTDOWN_STEP_")
}

/// One `PrepareShutdown` message as JSON.
pub fn progress_json(p: &pb::ShutdownProgress) -> Value {
    match &p.progress {
        Some(pb::shutdown_progress::Progress::Group(g)) => json!({
            "type": "group", "group": g.group, "action": shutdown_action(g.action),
            "to": (!g.to.is_empty()).then(|| g.to.clone()), "step": shutdown_step(g.step), "message": g.message,
        }),
        Some(pb::shutdown_progress::Progress::Done(d)) => {
            json!({ "type": "done", "safe_to_power_off": d.safe_to_power_off, "blockers": d.blockers })
        }
        None => json!({ "type": "unknown" }),
    }
}

/// One `PrepareShutdown` message for people.
pub fn progress_text(p: &pb::ShutdownProgress) -> String {
    match &p.progress {
        Some(pb::shutdown_progress::Progress::Group(g)) => {
            let mut t = format!("group {}: {}", g.group, shutdown_action(g.action));
            if !g.to.is_empty() {
                let _ = write!(t, " to {}", g.to);
            }
            let _ = write!(t, " {}", shutdown_step(g.step));
            if !g.message.is_empty() {
                let _ = write!(t, " - {}", g.message);
            }
            t
        }
        Some(pb::shutdown_progress::Progress::Done(d)) if d.safe_to_power_off => {
            "safe to power off: nothing of the cluster runs on this node".into()
        }
        Some(pb::shutdown_progress::Progress::Done(d)) => {
            format!("NOT safe to power off: {}", d.blockers.join("; "))
        }
        None => "unknown progress message (newer agent?)".into(),
    }
}

// ---------------------------------------------------------------- maintenance

fn maintenance_step(v: i32) -> String {
    pb::MaintenanceStep::try_from(v)
        .map(|s| s.as_str_name().trim_start_matches("MAINTENANCE_STEP_").to_lowercase().replace('_', " "))
        .unwrap_or_else(|_| format!("step {v}"))
}

/// One maintenance progress message as JSON.
pub fn maintenance_json(p: &pb::MaintenanceProgress) -> Value {
    match &p.progress {
        Some(pb::maintenance_progress::Progress::Vm(v)) => json!({
            "type": "vm", "vm": v.vm, "step": maintenance_step(v.step).replace(' ', "_"),
            "host": (!v.host.is_empty()).then(|| v.host.clone()), "detail": v.detail, "elapsed_ms": v.elapsed_ms,
        }),
        Some(pb::maintenance_progress::Progress::Done(d)) => json!({
            "type": "done", "host": d.host, "complete": d.complete, "blockers": d.blockers,
            "summary": d.summary, "elapsed_ms": d.elapsed_ms,
        }),
        None => json!({ "type": "unknown" }),
    }
}

/// One maintenance progress message for people.
pub fn maintenance_text(p: &pb::MaintenanceProgress) -> String {
    match &p.progress {
        Some(pb::maintenance_progress::Progress::Vm(v)) => {
            let mut t = format!("{:>7.1}s  VM {}: {}", v.elapsed_ms as f64 / 1000.0, v.vm, maintenance_step(v.step));
            if !v.host.is_empty() {
                let _ = write!(t, " on {}", v.host);
            }
            if !v.detail.is_empty() {
                let _ = write!(t, " - {}", v.detail);
            }
            t
        }
        Some(pb::maintenance_progress::Progress::Done(d)) => {
            let mut t = format!("{:>7.1}s  {}", d.elapsed_ms as f64 / 1000.0, d.summary);
            for b in &d.blockers {
                let _ = write!(t, "\n          blocked: {b}");
            }
            t
        }
        None => "unknown progress message (newer agent?)".into(),
    }
}

// ---------------------------------------------------------------- host agent

fn host_state(v: i32) -> String {
    name(v, pb::HostState::as_str_name, "HOST_STATE_")
}
fn vm_state(v: i32) -> String {
    name(v, pb::VmState::as_str_name, "VM_STATE_")
}
fn domain_state(v: i32) -> String {
    name(v, pb::DomainState::as_str_name, "DOMAIN_STATE_")
}

/// The first line of `hosts` and `vms`: who answered, with a warning when its lease expired.
fn cluster_header(out: &mut String, s: &pb::HostClusterStatus) {
    let _ = writeln!(out, "cluster as seen by {}  quorum: {}", s.host, if s.quorum { "yes" } else { "NO" });
    if !s.lease_valid {
        let _ = writeln!(out, "WARNING: {}'s host lease has expired; this view may be out of date", s.host);
    }
}

/// `used/capacity`, or `used/-` without a configured capacity.
fn used_of<T: std::fmt::Display>(used: T, capacity: Option<T>) -> String {
    match capacity {
        Some(c) => format!("{used}/{c}"),
        None => format!("{used}/-"),
    }
}

/// `GetClusterStatus`'s hosts as JSON.
pub fn hosts_json(s: &pb::HostClusterStatus) -> Value {
    json!({
        "host": s.host,
        "lease_valid": s.lease_valid,
        "quorum": s.quorum,
        "hosts": s.hosts.iter().map(|h| json!({
            "name": h.name,
            "id": h.id,
            "state": host_state(h.state),
            "capacity": h.capacity.as_ref().map(|c| json!({ "memory_mib": c.memory_mib, "vcpus": c.vcpus })),
            "used_memory_mib": h.used_memory_mib,
            "used_vcpus": h.used_vcpus,
            "vm_count": h.vm_count,
            "maintenance": h.maintenance,
        })).collect::<Vec<_>>(),
    })
}

/// `GetClusterStatus`'s hosts for people.
pub fn hosts_text(s: &pb::HostClusterStatus) -> String {
    let mut out = String::new();
    cluster_header(&mut out, s);
    if s.hosts.is_empty() {
        out.push_str("no hosts\n");
        return out;
    }
    let rows: Vec<Vec<String>> = s
        .hosts
        .iter()
        .map(|h| {
            vec![
                h.name.clone(),
                h.id.to_string(),
                if h.maintenance { format!("{} (maintenance)", host_state(h.state)) } else { host_state(h.state) },
                h.vm_count.to_string(),
                used_of(h.used_memory_mib, h.capacity.as_ref().map(|c| c.memory_mib)),
                used_of(h.used_vcpus, h.capacity.as_ref().map(|c| c.vcpus)),
            ]
        })
        .collect();
    table(&mut out, &["HOST", "ID", "STATE", "VMS", "MEMORY MiB", "VCPUS"], &rows);
    out
}

/// `GetClusterStatus`'s VMs and placement problems as JSON.
pub fn vms_json(s: &pb::HostClusterStatus) -> Value {
    json!({
        "host": s.host,
        "lease_valid": s.lease_valid,
        "quorum": s.quorum,
        "vms": s.vms.iter().map(|v| json!({
            "name": v.name,
            "domain": v.domain,
            "uuid": v.uuid,
            "host": (!v.host.is_empty()).then(|| v.host.clone()),
            "state": vm_state(v.state),
            "fencing_token": v.fencing_token,
            "not_running": v.not_running.as_ref().map(not_running_json),
            "not_running_text": (!v.not_running_text.is_empty()).then(|| v.not_running_text.clone()),
            "restarts": v.restarts,
            "failovers": v.failovers,
            "failed_on": v.failed_on,
            "memory_mib": v.memory_mib,
            "vcpus": v.vcpus,
            "guest": v.guest.as_ref().map(guest_link_json),
        })).collect::<Vec<_>>(),
        "problems": s.problems.iter().map(|p| json!({ "vm": p.vm, "reason": p.reason })).collect::<Vec<_>>(),
    })
}

/// A VM's guest link as JSON.
fn guest_link_json(g: &pb::GuestLink) -> Value {
    json!({
        "connected": g.connected,
        "ever_linked": g.ever_linked,
        "transport": (!g.transport.is_empty()).then(|| g.transport.clone()),
        "peer": (!g.peer.is_empty()).then(|| g.peer.clone()),
        "node_name": (!g.node_name.is_empty()).then(|| g.node_name.clone()),
        "guest_cluster": (!g.guest_cluster.is_empty()).then(|| g.guest_cluster.clone()),
        "heartbeat_age_ms": g.heartbeat_age_ms,
        "since_ms": g.since_ms,
        "groups": g.groups.iter().map(|x| json!({
            "name": x.name,
            "state": group_state(x.state),
            "active_here": x.active_here,
            "fencing_token": x.fencing_token,
        })).collect::<Vec<_>>(),
    })
}

/// A VM's guest link in a few words: "linked (n1, 2 groups active)", "link lost 12s ago",
/// "no link".
pub fn guest_link_text(g: &pb::GuestLink) -> String {
    if g.connected {
        let active = g.groups.iter().filter(|x| x.active_here).count();
        let groups = if active == 1 { "1 group active".to_string() } else { format!("{active} groups active") };
        let mut text = format!("linked ({}, {groups})", g.node_name);
        // Heartbeats are expected about every second: say so when they are late.
        if g.heartbeat_age_ms >= 5000 {
            let _ = write!(text, ", silent {}s", g.heartbeat_age_ms / 1000);
        }
        text
    } else if g.ever_linked {
        format!("link lost {}s ago", g.since_ms / 1000)
    } else {
        "no link".into()
    }
}

/// `GetClusterStatus`'s VMs and placement problems for people.
pub fn vms_text(s: &pb::HostClusterStatus) -> String {
    let mut out = String::new();
    cluster_header(&mut out, s);
    if s.vms.is_empty() {
        out.push_str("no HA VMs\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .vms
            .iter()
            .map(|v| {
                let mut why = v.not_running_text.clone();
                if !v.failed_on.is_empty() {
                    if !why.is_empty() {
                        why.push_str("; ");
                    }
                    let _ = write!(why, "failed on {}", v.failed_on.join(", "));
                }
                vec![
                    v.name.clone(),
                    vm_state(v.state),
                    if v.host.is_empty() { "-".into() } else { v.host.clone() },
                    v.fencing_token.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
                    v.restarts.to_string(),
                    v.failovers.to_string(),
                    v.memory_mib.to_string(),
                    v.vcpus.to_string(),
                    v.guest.as_ref().map(guest_link_text).unwrap_or_else(|| "-".into()),
                    why,
                ]
            })
            .collect();
        table(
            &mut out,
            &["VM", "STATE", "HOST", "TOKEN", "RESTARTS", "FAILOVERS", "MEMORY MiB", "VCPUS", "GUEST", "WHY"],
            &rows,
        );
    }
    if !s.problems.is_empty() {
        out.push_str("placement problems:\n");
        for p in &s.problems {
            let _ = writeln!(out, "  {}: {}", p.vm, p.reason);
        }
    }
    out
}

/// The answer of `SuspendVm` (`suspended` true) or `ResumeVm`, as JSON or for people.
pub fn vm_pause(vm: &str, suspended: bool, r: &pb::VmStateReply, json: bool) -> String {
    if json {
        let v = json!({
            "vm": vm,
            "host": r.host,
            "domain": r.domain,
            "state": domain_state(r.state),
            "reason": (!r.reason.is_empty()).then(|| r.reason.clone()),
        });
        return serde_json::to_string_pretty(&v).expect("JSON");
    }
    let reason = if r.reason.is_empty() { String::new() } else { format!(" ({})", r.reason) };
    let what = if suspended {
        "suspended; the cluster leaves it paused (no failover); `tandemctl vm resume` lets it run"
    } else {
        "resumed"
    };
    format!("{what}: VM {vm} (domain {}) on {} is now {}{reason}", r.domain, r.host, domain_state(r.state))
}

/// `ListDomains` as JSON.
pub fn domains_json(l: &pb::DomainList) -> Value {
    json!({
        "host": l.host,
        "uri": l.uri,
        "domains": l.domains.iter().map(|d| json!({
            "name": d.name,
            "uuid": d.uuid,
            "state": domain_state(d.state),
            "reason": (!d.reason.is_empty()).then(|| d.reason.clone()),
            "memory_mib": d.memory_mib,
            "max_memory_mib": d.max_memory_mib,
            "vcpus": d.vcpus,
            "persistent": d.persistent,
            "ha": d.ha,
        })).collect::<Vec<_>>(),
    })
}

/// `ListDomains` for people.
pub fn domains_text(l: &pb::DomainList) -> String {
    let mut out = format!("domains of {} ({})\n", l.host, l.uri);
    if l.domains.is_empty() {
        out.push_str("no domains\n");
        return out;
    }
    let rows: Vec<Vec<String>> = l
        .domains
        .iter()
        .map(|d| {
            vec![
                d.name.clone(),
                domain_state(d.state),
                if d.reason.is_empty() { "-".into() } else { d.reason.clone() },
                format!("{}/{}", d.memory_mib, d.max_memory_mib),
                d.vcpus.to_string(),
                if d.ha { "yes".into() } else { "no".into() },
                d.uuid.clone(),
            ]
        })
        .collect();
    table(&mut out, &["NAME", "STATE", "REASON", "MEMORY MiB", "VCPUS", "HA", "UUID"], &rows);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_names_are_short_and_lower_case() {
        assert_eq!(group_state(pb::GroupState::Started as i32), "started");
        assert_eq!(reason(pb::NotRunningReason::WaitingForFence as i32), "waiting-for-fence");
        assert_eq!(probe_status(pb::ProbeStatus::Critical as i32), "CRITICAL");
        assert_eq!(group_state(99), "unknown(99)");
        assert_eq!(host_state(pb::HostState::Self_ as i32), "self");
        assert_eq!(domain_state(pb::DomainState::PmSuspended as i32), "pm-suspended");
    }

    #[test]
    fn pause_answers_name_host_state_and_reason() {
        let r = pb::VmStateReply {
            host: "hv1".into(),
            domain: "db-vm".into(),
            state: pb::DomainState::Paused as i32,
            reason: "user".into(),
        };
        assert_eq!(
            vm_pause("db", true, &r, false),
            "suspended; the cluster leaves it paused (no failover); `tandemctl vm resume` lets it run: VM db \
             (domain db-vm) on hv1 is now paused (user)"
        );
        let v: Value = serde_json::from_str(&vm_pause("db", true, &r, true)).unwrap();
        assert_eq!(v, json!({"vm": "db", "host": "hv1", "domain": "db-vm", "state": "paused", "reason": "user"}));
        let r = pb::VmStateReply { state: pb::DomainState::Running as i32, reason: String::new(), ..r };
        assert_eq!(vm_pause("db", false, &r, false), "resumed: VM db (domain db-vm) on hv1 is now running");
        let v: Value = serde_json::from_str(&vm_pause("db", false, &r, true)).unwrap();
        assert_eq!(v["reason"], Value::Null);
    }

    #[test]
    fn guest_links_read_in_a_few_words() {
        let group = |name: &str, active_here| pb::GuestGroupSummary {
            name: name.into(),
            state: pb::GroupState::Started as i32,
            active_here,
            fencing_token: None,
        };
        let linked = pb::GuestLink {
            connected: true,
            ever_linked: true,
            node_name: "n1".into(),
            heartbeat_age_ms: 800,
            groups: vec![group("a", true), group("b", true), group("c", false)],
            ..Default::default()
        };
        assert_eq!(guest_link_text(&linked), "linked (n1, 2 groups active)");
        let silent = pb::GuestLink { heartbeat_age_ms: 7200, ..linked.clone() };
        assert_eq!(guest_link_text(&silent), "linked (n1, 2 groups active), silent 7s");
        let lost = pb::GuestLink { connected: false, since_ms: 12_400, ..linked };
        assert_eq!(guest_link_text(&lost), "link lost 12s ago");
        assert_eq!(guest_link_text(&pb::GuestLink::default()), "no link");
    }

    #[test]
    fn clock_is_utc_time_of_day() {
        assert_eq!(clock(86_400_000 + 3_723_004), "01:02:03.004");
    }
}
