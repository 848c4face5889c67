//! From the engine's status and notices to the API's messages. The runtime
//! adds what only it knows (node names and links, monitors, the host lease).

use tandem_engine as engine;
use tandem_engine::NodeId;

use super::pb;

/// The API's group state.
pub fn group_state(s: engine::GroupState) -> pb::GroupState {
    match s {
        engine::GroupState::Stopped => pb::GroupState::Stopped,
        engine::GroupState::Starting => pb::GroupState::Starting,
        engine::GroupState::Started => pb::GroupState::Started,
        engine::GroupState::Stopping => pb::GroupState::Stopping,
        engine::GroupState::Failed => pb::GroupState::Failed,
        engine::GroupState::Blocked => pb::GroupState::Blocked,
    }
}

/// The API's resource state.
pub fn resource_state(s: engine::ResourceState) -> pb::ResourceState {
    match s {
        engine::ResourceState::Unknown => pb::ResourceState::Unknown,
        engine::ResourceState::Stopped => pb::ResourceState::Stopped,
        engine::ResourceState::Starting => pb::ResourceState::Starting,
        engine::ResourceState::Started => pb::ResourceState::Started,
        engine::ResourceState::Stopping => pb::ResourceState::Stopping,
        engine::ResourceState::Failed => pb::ResourceState::Failed,
    }
}

/// Why a group does not run; `name` turns node ids into node names.
pub fn not_running(r: &engine::NotRunningReason, name: &dyn Fn(NodeId) -> String) -> pb::NotRunning {
    use engine::NotRunningReason as R;
    use pb::NotRunningReason as P;
    let (reason, node) = match r {
        R::OperatorStopped => (P::OperatorStopped, None),
        R::NotAutoStarted => (P::NotAutoStarted, None),
        R::FailoverLimitReached => (P::FailoverLimitReached, None),
        R::Probing => (P::Probing, None),
        R::NoQuorum => (P::NoQuorum, None),
        R::SelfFenced => (P::SelfFenced, None),
        R::WaitingForFence(n) => (P::WaitingForFence, Some(*n)),
        R::WaitingForLease(n) => (P::WaitingForLease, Some(*n)),
        R::NoEligibleNode => (P::NoEligibleNode, None),
        R::TakeoverPending => (P::TakeoverPending, None),
        R::Parked(n) => (P::Parked, Some(*n)),
        R::NoCapacity { nodes } => {
            let detail = nodes.iter().map(|(n, why)| format!("{}: {why}", name(*n))).collect();
            return pb::NotRunning { reason: P::NoCapacity as i32, node: String::new(), detail };
        }
        R::Standby { nodes } => {
            let detail = nodes.iter().map(|n| name(*n)).collect();
            return pb::NotRunning { reason: P::Standby as i32, node: String::new(), detail };
        }
        R::LocalVeto { reason } => {
            return pb::NotRunning { reason: P::LocalVeto as i32, node: String::new(), detail: vec![reason.clone()] };
        }
    };
    pb::NotRunning { reason: reason as i32, node: node.map(name).unwrap_or_default(), detail: Vec::new() }
}

/// One group as the engine sees it; `monitors` stays empty for the runtime to fill.
pub fn group_status(g: &engine::GroupStatus, name: &dyn Fn(NodeId) -> String) -> pb::GroupStatus {
    pb::GroupStatus {
        name: g.id.0.clone(),
        state: group_state(g.state) as i32,
        location: g.location.map(name).unwrap_or_default(),
        restarts: g.restarts,
        failovers: g.failovers,
        failed_on: g.failed_on.iter().copied().map(name).collect(),
        monitoring_suspended: g.monitoring_suspended,
        not_running: g.not_running.as_ref().map(|r| not_running(r, name)),
        resources: g
            .resources
            .iter()
            .map(|r| pb::ResourceStatus { name: r.id.0.clone(), state: resource_state(r.state) as i32 })
            .collect(),
        monitors: Vec::new(),
        // Filled in by the caller, who reads the lease area.
        fencing_token: None,
        veto: g.veto.clone(),
    }
}

/// The engine's part of `GetStatus`: this node, quorum, probing, self-fencing
/// and the groups. `nodes` and `lease` stay empty for the runtime to fill.
pub fn cluster_status(s: &engine::ClusterStatus, name: &dyn Fn(NodeId) -> String) -> pb::GuestStatus {
    pb::GuestStatus {
        node: name(s.node),
        node_id: s.node.0,
        quorum: s.quorum,
        probing: s.probing,
        self_fenced: s.self_fenced,
        nodes: Vec::new(),
        groups: s.groups.iter().map(|g| group_status(g, name)).collect(),
        lease: None,
    }
}

/// An engine notice as an event's kind.
pub fn notice(n: &engine::Notice) -> pb::event::Kind {
    let notice = match n {
        engine::Notice::FailoverLimitReached { group, failovers } => {
            pb::notice::Notice::FailoverLimitReached(pb::FailoverLimitReached {
                group: group.0.clone(),
                failovers: *failovers,
            })
        }
        engine::Notice::OperatorRejected { seq, reason } => {
            pb::notice::Notice::OperatorRejected(pb::OperatorRejected { seq: *seq, reason: reason.clone() })
        }
        // As text until the API has messages for placement notices.
        engine::Notice::NoCapacity { group, nodes } => {
            let why: Vec<String> = nodes.iter().map(|(n, u)| format!("{n}: {u}")).collect();
            pb::notice::Notice::Text(format!("{group} fits on no healthy node ({})", why.join("; ")))
        }
        engine::Notice::NoCapacityResolved { group } => {
            pb::notice::Notice::Text(format!("{group} is no longer blocked by capacity"))
        }
        engine::Notice::Standby { mode: Some(mode) } => {
            pb::notice::Notice::Text(format!("this node entered standby ({})", standby_mode_name(*mode)))
        }
        engine::Notice::Standby { mode: None } => pb::notice::Notice::Text("this node is online again".into()),
        engine::Notice::StandbyReleased { group, parked } => pb::notice::Notice::Text(if *parked {
            format!("{group} stopped and parked for this node's standby")
        } else {
            format!("{group} stopped for this node's standby; another node may take it")
        }),
        engine::Notice::VetoReleased { group, reason } => {
            pb::notice::Notice::Text(format!("{group} released: it may not run on this node ({reason})"))
        }
    };
    pb::event::Kind::Notice(pb::Notice { notice: Some(notice) })
}

/// `move` or `park`.
pub fn standby_mode_name(m: engine::StandbyMode) -> &'static str {
    match m {
        engine::StandbyMode::Move => "move",
        engine::StandbyMode::Park => "park",
    }
}

/// The API's standby mode (`Unspecified` when online).
pub fn standby_mode(m: Option<engine::StandbyMode>) -> pb::StandbyMode {
    match m {
        None => pb::StandbyMode::Unspecified,
        Some(engine::StandbyMode::Move) => pb::StandbyMode::Move,
        Some(engine::StandbyMode::Park) => pb::StandbyMode::Park,
    }
}

/// An operator request in the engine's terms; `node_id` resolves node names.
/// The group name is taken as is: the engine ignores commands for unknown
/// groups, so the runtime checks group names before assigning a sequence number.
pub fn operator_command(
    r: &super::OperatorRequest,
    node_id: &dyn Fn(&str) -> Option<NodeId>,
) -> Result<engine::OperatorCommand, super::ControlError> {
    use super::OperatorAction as A;
    use engine::OperatorCommand as C;
    let g = engine::GroupId(r.group.clone());
    Ok(match &r.action {
        A::Start => C::StartGroup(g),
        A::Stop => C::StopGroup(g),
        A::Move { to: Some(to) } => {
            C::MoveGroup { group: g, to: node_id(to).ok_or_else(|| super::ControlError::UnknownNode(to.clone()))? }
        }
        A::Move { to: None } => {
            return Err(super::ControlError::InvalidArgument(
                "a move without a target node is resolved by the agent that accepts it; name the node".into(),
            ));
        }
        A::Reset => C::ResetCounters(g),
        A::SuspendMonitoring => C::SuspendMonitoring(g),
        A::ResumeMonitoring => C::ResumeMonitoring(g),
    })
}

/// An event stamped with the current time (`seq` is the runtime's).
pub fn event(seq: u64, kind: pb::event::Kind) -> pb::Event {
    pb::Event { seq, unix_ms: super::events::unix_ms(), kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_status_names_nodes_and_keeps_counters() {
        let g = engine::GroupStatus {
            id: engine::GroupId("pg".into()),
            state: engine::GroupState::Blocked,
            location: Some(NodeId(2)),
            restarts: 1,
            monitor_restarts: Vec::new(),
            failovers: 2,
            failed_on: vec![NodeId(1)],
            monitoring_suspended: true,
            veto: Some("nic down".into()),
            resources: vec![engine::ResourceStatus {
                id: engine::ResourceId("data".into()),
                state: engine::ResourceState::Failed,
            }],
            not_running: Some(engine::NotRunningReason::WaitingForFence(NodeId(1))),
        };
        let name = |n: NodeId| format!("n{}", n.0);
        let p = group_status(&g, &name);
        assert_eq!(p.state(), pb::GroupState::Blocked);
        assert_eq!((p.location.as_str(), p.restarts, p.failovers), ("n2", 1, 2));
        assert_eq!(p.failed_on, vec!["n1".to_string()]);
        assert!(p.monitoring_suspended);
        assert_eq!(p.resources[0].state(), pb::ResourceState::Failed);
        assert_eq!(p.veto.as_deref(), Some("nic down"));
        let nr = p.not_running.unwrap();
        assert_eq!((nr.reason(), nr.node.as_str()), (pb::NotRunningReason::WaitingForFence, "n1"));
        let nr = not_running(&engine::NotRunningReason::Standby { nodes: vec![NodeId(1), NodeId(3)] }, &name);
        assert_eq!((nr.reason(), nr.detail), (pb::NotRunningReason::Standby, vec!["n1".into(), "n3".into()]));
        let nr = not_running(&engine::NotRunningReason::Parked(NodeId(2)), &name);
        assert_eq!((nr.reason(), nr.node.as_str()), (pb::NotRunningReason::Parked, "n2"));
    }

    #[test]
    fn move_to_an_unknown_node_is_not_found() {
        let r = super::super::OperatorRequest {
            group: "pg".into(),
            action: super::super::OperatorAction::Move { to: Some("nowhere".into()) },
        };
        let e = operator_command(&r, &|_| None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let ok = operator_command(&r, &|n| (n == "nowhere").then_some(NodeId(7))).unwrap();
        assert_eq!(ok, engine::OperatorCommand::MoveGroup { group: engine::GroupId("pg".into()), to: NodeId(7) });
    }
}
