//! Unit tests: one rule each, checked by comparing the emitted commands.

use crate::*;

pub(crate) fn n(i: u32) -> NodeId {
    NodeId(i)
}
fn g(s: &str) -> GroupId {
    s.into()
}
fn r(s: &str) -> ResourceId {
    s.into()
}

/// Three resources: `disk`, `ip`, and `app` which needs `disk`.
pub(crate) fn db_group(eligible: &[u32]) -> FailoverGroup {
    FailoverGroup::new(
        g("db"),
        vec![ResourceSpec::new("disk"), ResourceSpec::new("ip"), ResourceSpec::depending_on("app", &["disk"])],
        PlacementPolicy {
            eligible: eligible.iter().map(|i| n(*i)).collect(),
            failback: Failback::Manual,
            start_on_cluster_start: true,
            require_fencing: false,
        },
        RecoveryPolicy {
            max_restarts: 1,
            restart_window_ms: 10_000,
            max_failovers: 1,
            failover_window_ms: 60_000,
            final_action: FinalAction::StopEverywhere,
            max_stop_attempts: 2,
        },
    )
}

fn model(group: FailoverGroup) -> ClusterModel {
    ClusterModel::new(vec![n(1), n(2), n(3)], vec![group], Timing::default())
}

fn start(group: &str, res: &str, t: u64) -> Command {
    Command::StartResource { group: g(group), resource: r(res), token: LeaseToken(t), migrated_in: false }
}
fn stop(res: &str, force: bool) -> Command {
    Command::StopResource { group: g("db"), resource: r(res), force, handover: None }
}
/// A graceful stop of `res` of db that hands the group to node `to` (a move or failback).
fn stop_handoff(res: &str, to: u32) -> Command {
    let handover = Some(Handover { to: n(to), reason: ReleaseReason::Handoff { to: n(to) } });
    Command::StopResource { group: g("db"), resource: r(res), force: false, handover }
}
/// A graceful stop of `res` of db for this node's standby, handing the group to `to`.
fn stop_standby(res: &str, to: u32) -> Command {
    let handover = Some(Handover { to: n(to), reason: ReleaseReason::Standby });
    Command::StopResource { group: g("db"), resource: r(res), force: false, handover }
}
fn started(res: &str) -> Event {
    Event::ResourceStarted { group: g("db"), resource: r(res) }
}
fn stopped(res: &str) -> Event {
    Event::ResourceStopped { group: g("db"), resource: r(res) }
}
fn acquire() -> Command {
    Command::AcquireLease { group: g("db") }
}
fn acquired(t: u64, note: Option<LeaseNote>) -> Event {
    Event::LeaseAcquired { group: g("db"), token: LeaseToken(t), note }
}
fn failed(res: &str) -> Event {
    Event::MonitorFailed { group: g("db"), resource: r(res), monitor: None }
}
fn op(seq: u64, command: OperatorCommand) -> Event {
    Event::Operator { seq, command }
}

struct Node {
    e: Engine,
    now: u64,
}

impl Node {
    /// Starts an engine and answers every probe with "not running"; returns the commands
    /// emitted after the last probe answer.
    fn booted(me: u32, model: ClusterModel) -> (Node, Vec<Command>) {
        let mut e = Engine::new(n(me), model).unwrap();
        let probes = e.startup(0);
        let mut last = Vec::new();
        for c in probes {
            let Command::ProbeResource { group, resource } = c else { panic!("startup emitted {c:?}") };
            last = e.handle(0, Event::ProbeResult { group, resource, running: false });
        }
        (Node { e, now: 0 }, last)
    }

    fn ev(&mut self, event: Event) -> Vec<Command> {
        self.e.handle(self.now, event)
    }

    fn at(&mut self, now: u64, event: Event) -> Vec<Command> {
        self.now = now;
        self.ev(event)
    }

    /// Brings group db to Started under token `t`.
    fn run_db(&mut self, t: u64) {
        assert_eq!(self.ev(acquired(t, None)), vec![start("db", "disk", t)]);
        assert_eq!(self.ev(started("disk")), vec![start("db", "ip", t)]);
        assert_eq!(self.ev(started("ip")), vec![start("db", "app", t)]);
        assert_eq!(self.ev(started("app")), vec![]);
        assert_eq!(self.e.status().groups[0].state, GroupState::Started);
    }

    fn group(&self) -> GroupStatus {
        self.e.status().groups[0].clone()
    }
}

#[test]
fn validation_names_the_problem() {
    let mut m = model(db_group(&[1, 2]));
    m.groups[0].resources.swap(0, 2);
    assert_eq!(
        m.validate(),
        Err(ModelError::DependencyOrder { group: g("db"), resource: r("app"), dependency: r("disk") })
    );
    let mut m = model(db_group(&[1, 9]));
    assert_eq!(m.validate(), Err(ModelError::UnknownEligibleNode { group: g("db"), node: n(9) }));
    m.groups[0].placement.eligible = vec![n(1)];
    m.groups[0].resources[2].depends_on = vec![r("nope")];
    assert!(matches!(m.validate(), Err(ModelError::UnknownDependency { .. })));
    let err = Engine::new(n(7), model(db_group(&[1]))).unwrap_err();
    assert_eq!(err, ModelError::NodeNotInCluster(n(7)));
    assert!(err.to_string().contains("node-7"));
    let mut m = model(db_group(&[1]));
    m.groups[0].recovery.max_stop_attempts = 0;
    assert_eq!(m.validate(), Err(ModelError::NoStopAttempts(g("db"))));
}

#[test]
fn startup_probes_everything_and_waits_for_all_answers() {
    let mut e = Engine::new(n(1), model(db_group(&[1, 2]))).unwrap();
    let probes = e.startup(0);
    assert_eq!(
        probes,
        ["disk", "ip", "app"]
            .iter()
            .map(|x| Command::ProbeResource { group: g("db"), resource: r(x) })
            .collect::<Vec<_>>()
    );
    assert_eq!(e.handle(0, Event::ProbeResult { group: g("db"), resource: r("disk"), running: false }), vec![]);
    assert_eq!(e.handle(5_000, Event::Tick), vec![]);
    assert_eq!(e.status().groups[0].not_running, Some(NotRunningReason::Probing));
    assert_eq!(e.handle(5_000, Event::ProbeResult { group: g("db"), resource: r("ip"), running: false }), vec![]);
    assert_eq!(
        e.handle(5_000, Event::ProbeResult { group: g("db"), resource: r("app"), running: false }),
        vec![acquire()]
    );
}

#[test]
fn a_node_not_eligible_probes_and_does_nothing() {
    let mut e = Engine::new(n(3), model(db_group(&[1, 2]))).unwrap();
    assert_eq!(e.startup(0), vec![]);
    assert_eq!(e.handle(100_000, Event::NodeLost(n(1))), vec![]);
    assert_eq!(e.handle(200_000, Event::NodeLost(n(2))), vec![]);
}

#[test]
fn resources_start_in_order_under_the_lease_token_only() {
    let (mut a, cmds) = Node::booted(1, model(db_group(&[1, 2])));
    assert_eq!(cmds, vec![acquire()]);
    // Nothing starts while the lease is pending, whatever else happens.
    assert_eq!(a.at(10_000, Event::Tick), vec![]);
    a.run_db(7);
}

#[test]
fn operator_stop_stops_in_reverse_order_then_releases() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    a.run_db(7);
    assert_eq!(a.ev(op(1, OperatorCommand::StopGroup(g("db")))), vec![stop("app", false)]);
    assert_eq!(a.ev(stopped("app")), vec![stop("ip", false)]);
    assert_eq!(a.ev(stopped("ip")), vec![stop("disk", false)]);
    let cmds = a.ev(stopped("disk"));
    let [Command::ReleaseLease { token, note, reason, .. }] = cmds.as_slice() else { panic!("{cmds:?}") };
    assert_eq!((*token, *reason), (LeaseToken(7), ReleaseReason::Stopped));
    assert_eq!((note.desired, note.desired_seq), (Desired::Stopped(StopCause::Operator), 1));
    assert_eq!(a.group().not_running, Some(NotRunningReason::OperatorStopped));
    // Stays stopped; an operator start brings it back.
    assert_eq!(a.at(100_000, Event::Tick), vec![]);
    assert_eq!(a.ev(op(2, OperatorCommand::StartGroup(g("db")))), vec![acquire()]);
}

#[test]
fn lease_lost_force_stops_at_once_without_release() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    a.run_db(7);
    assert_eq!(a.ev(Event::LeaseLost { group: g("db") }), vec![stop("app", true)]);
    assert_eq!(a.ev(stopped("app")), vec![stop("ip", true)]);
    assert_eq!(a.ev(stopped("ip")), vec![stop("disk", true)]);
    assert_eq!(a.ev(stopped("disk")), vec![]);
}

#[test]
fn lease_lost_while_starting_stops_the_resource_once_its_start_returns() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    assert_eq!(a.ev(acquired(3, None)), vec![start("db", "disk", 3)]);
    assert_eq!(a.ev(Event::LeaseLost { group: g("db") }), vec![]);
    assert_eq!(a.ev(started("disk")), vec![stop("disk", true)]);
}

#[test]
fn confirmed_failure_restarts_the_resource_and_its_dependents_only() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    a.run_db(7);
    // disk fails: app depends on it, ip does not.
    assert_eq!(a.at(1_000, failed("disk")), vec![stop("app", false)]);
    assert_eq!(a.ev(stopped("app")), vec![stop("disk", false)]);
    assert_eq!(a.ev(stopped("disk")), vec![start("db", "disk", 7)]);
    assert_eq!(a.ev(started("disk")), vec![start("db", "app", 7)]);
    assert_eq!(a.ev(started("app")), vec![]);
    assert_eq!(a.group().restarts, 1);
    assert_eq!(a.group().resources[1].state, ResourceState::Started);
}

#[test]
fn exhausted_restarts_fail_over_and_mark_the_node() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    a.run_db(7);
    assert_eq!(a.at(1_000, failed("ip")), vec![stop("ip", false)]);
    assert_eq!(a.ev(stopped("ip")), vec![start("db", "ip", 7)]);
    assert_eq!(a.ev(started("ip")), vec![]);
    // Second failure inside the restart window: fail over.
    assert_eq!(a.at(2_000, failed("ip")), vec![stop("app", false)]);
    assert_eq!(a.ev(stopped("app")), vec![stop("ip", false)]);
    assert_eq!(a.ev(stopped("ip")), vec![stop("disk", false)]);
    let cmds = a.ev(stopped("disk"));
    let [Command::ReleaseLease { reason: ReleaseReason::Failover, note, .. }] = cmds.as_slice() else {
        panic!("{cmds:?}")
    };
    assert_eq!((note.failovers, note.failed_on.clone()), (1, vec![n(1)]));
    // Node 2 is now preferred; node 1 only tries after node 2's turn.
    assert_eq!(a.at(2_500, Event::Tick), vec![]);
    assert_eq!(a.group().failovers, 1);
}

#[test]
fn a_monitor_with_its_own_restart_limit_is_counted_apart_from_the_group() {
    let mut grp = db_group(&[1, 2]);
    grp.monitor_recovery.insert("sql".into(), RestartLimit { max_restarts: 2, restart_window_ms: 5_000 });
    let (mut a, _) = Node::booted(1, model(grp));
    a.run_db(7);
    let by = |m: &str, res: &str| Event::MonitorFailed { group: g("db"), resource: r(res), monitor: Some(m.into()) };
    let restart_ip = |a: &mut Node, ev: Event| {
        assert_eq!(a.ev(ev), vec![stop("ip", false)]);
        assert_eq!(a.ev(stopped("ip")), vec![start("db", "ip", 7)]);
        assert_eq!(a.ev(started("ip")), vec![]);
    };
    // `sql` may restart twice, apart from the group's one restart (db_group: max_restarts 1).
    a.now = 1_000;
    restart_ip(&mut a, by("sql", "ip"));
    a.now = 1_500;
    restart_ip(&mut a, by("sql", "ip"));
    assert_eq!((a.group().restarts, a.group().monitor_restarts.clone()), (2, vec![("sql".to_string(), 2)]));
    // A failure from another monitor (no limit of its own) still has the group's restart.
    a.now = 2_000;
    restart_ip(&mut a, by("other", "ip"));
    assert_eq!(a.group().restarts, 3);
    // The window passes for `sql`'s restarts (5 s), not for the group's (10 s): `sql` restarts
    // again; the next built-in check failure exceeds the group's limit and fails over.
    a.now = 7_000;
    restart_ip(&mut a, by("sql", "ip"));
    assert_eq!(a.group().monitor_restarts, vec![("sql".to_string(), 1)]);
    assert_eq!(a.at(7_500, failed("ip")), vec![stop("app", false)]);
    a.ev(stopped("app"));
    a.ev(stopped("ip"));
    let cmds = a.ev(stopped("disk"));
    assert!(matches!(cmds.as_slice(), [Command::ReleaseLease { reason: ReleaseReason::Failover, .. }]), "{cmds:?}");
}

#[test]
fn a_monitor_past_its_own_restart_limit_fails_the_group_over_and_reset_clears_its_count() {
    let mut grp = db_group(&[1, 2]);
    grp.recovery.max_restarts = 5;
    grp.monitor_recovery.insert("sql".into(), RestartLimit { max_restarts: 0, restart_window_ms: 60_000 });
    let (mut a, _) = Node::booted(1, model(grp.clone()));
    a.run_db(7);
    let sql = Event::MonitorFailed { group: g("db"), resource: r("app"), monitor: Some("sql".into()) };
    // No restart allowed for `sql`: its first failure fails the group over at once, though the
    // group would allow five restarts.
    assert_eq!(a.at(1_000, sql.clone()), vec![stop("app", false)]);
    a.ev(stopped("app"));
    a.ev(stopped("ip"));
    let cmds = a.ev(stopped("disk"));
    assert!(matches!(cmds.as_slice(), [Command::ReleaseLease { reason: ReleaseReason::Failover, .. }]), "{cmds:?}");

    // ResetCounters clears a monitor's count like the group's.
    grp.monitor_recovery.insert("sql".into(), RestartLimit { max_restarts: 1, restart_window_ms: 60_000 });
    let (mut b, _) = Node::booted(1, model(grp));
    b.run_db(7);
    assert_eq!(b.at(1_000, sql.clone()), vec![stop("app", false)]);
    assert_eq!(b.ev(stopped("app")), vec![start("db", "app", 7)]);
    b.ev(started("app"));
    assert_eq!(b.group().monitor_restarts, vec![("sql".to_string(), 1)]);
    b.ev(op(3, OperatorCommand::ResetCounters(g("db"))));
    assert_eq!((b.group().restarts, b.group().monitor_restarts.len()), (0, 0));
    assert_eq!(b.at(2_000, sql), vec![stop("app", false)]);
    assert_eq!(b.ev(stopped("app")), vec![start("db", "app", 7)], "restarted in place again after the reset");
}

#[test]
fn restarts_outside_the_window_do_not_accumulate() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    a.run_db(7);
    assert_eq!(a.at(1_000, failed("ip")), vec![stop("ip", false)]);
    a.ev(stopped("ip"));
    a.ev(started("ip"));
    // 20 s later the first restart left the 10 s window: restart again, no failover.
    assert_eq!(a.at(21_000, failed("ip")), vec![stop("ip", false)]);
    assert_eq!(a.ev(stopped("ip")), vec![start("db", "ip", 7)]);
}

#[test]
fn the_next_node_takes_a_failed_over_group_at_rank_zero() {
    let (mut b, cmds) = Node::booted(2, model(db_group(&[1, 2])));
    assert_eq!(cmds, vec![]);
    let note = LeaseNote { failovers: 1, failed_on: vec![n(1)], ..LeaseNote::initial(&db_group(&[1, 2])) };
    assert_eq!(b.at(100, Event::LeaseObserved { group: g("db"), holder: None, note: Some(note) }), vec![acquire()]);
}

#[test]
fn stagger_lets_the_preferred_node_go_first() {
    let (mut b, cmds) = Node::booted(2, model(db_group(&[1, 2])));
    assert_eq!(cmds, vec![]);
    assert_eq!(b.at(1_999, Event::Tick), vec![]);
    assert_eq!(b.at(2_000, Event::Tick), vec![acquire()]);
    assert_eq!(b.ev(Event::LeaseAcquireFailed { group: g("db"), holder: Some(n(1)) }), vec![]);
    assert_eq!(b.at(60_000, Event::Tick), vec![]);
    assert_eq!(b.group().location, Some(n(1)));
}

#[test]
fn failover_limit_stops_the_group_everywhere_until_reset() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    let note = LeaseNote { failovers: 1, failed_on: vec![n(2)], ..LeaseNote::initial(&db_group(&[1, 2])) };
    assert_eq!(a.ev(acquired(9, Some(note))), vec![start("db", "disk", 9)]);
    a.ev(started("disk"));
    a.ev(started("ip"));
    a.ev(started("app"));
    a.at(1_000, failed("app"));
    a.ev(stopped("app"));
    a.ev(started("app"));
    let cmds = a.at(1_500, failed("app"));
    assert_eq!(
        cmds,
        vec![Command::Notify(Notice::FailoverLimitReached { group: g("db"), failovers: 1 }), stop("app", false)]
    );
    a.ev(stopped("app"));
    a.ev(stopped("ip"));
    let cmds = a.ev(stopped("disk"));
    let [Command::ReleaseLease { reason: ReleaseReason::FailoverLimit, note, .. }] = cmds.as_slice() else {
        panic!("{cmds:?}")
    };
    assert_eq!(note.desired, Desired::Stopped(StopCause::FailoverLimit));
    let st = a.group();
    assert_eq!((st.state, st.not_running), (GroupState::Failed, Some(NotRunningReason::FailoverLimitReached)));
    assert_eq!(a.at(500_000, Event::Tick), vec![]);
    // The operator reset clears counters and releases the final action.
    assert_eq!(a.ev(op(4, OperatorCommand::ResetCounters(g("db")))), vec![acquire()]);
    assert_eq!((a.group().failovers, a.group().failed_on.len()), (0, 0));
}

#[test]
fn failover_limit_with_do_nothing_keeps_the_group_where_it_is() {
    let mut grp = db_group(&[1, 2]);
    grp.recovery.final_action = FinalAction::DoNothing;
    grp.recovery.max_restarts = 0;
    grp.recovery.max_failovers = 0;
    let (mut a, _) = Node::booted(1, model(grp));
    a.run_db(7);
    assert_eq!(
        a.at(1_000, failed("ip")),
        vec![Command::Notify(Notice::FailoverLimitReached { group: g("db"), failovers: 0 })]
    );
    assert_eq!(a.at(2_000, failed("app")), vec![]);
    assert_eq!(a.group().state, GroupState::Failed);
    // Reset: both failed resources restart in place, in reverse then forward order.
    assert_eq!(a.ev(op(1, OperatorCommand::ResetCounters(g("db")))), vec![stop("app", false)]);
    assert_eq!(a.ev(stopped("app")), vec![stop("ip", false)]);
    assert_eq!(a.ev(stopped("ip")), vec![start("db", "ip", 7)]);
    assert_eq!(a.ev(started("ip")), vec![start("db", "app", 7)]);
}

#[test]
fn stop_failures_are_retried_then_the_node_self_fences() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    a.run_db(7);
    a.ev(op(1, OperatorCommand::StopGroup(g("db"))));
    let fail = Event::ResourceStopFailed { group: g("db"), resource: r("app") };
    assert_eq!(a.ev(fail.clone()), vec![stop("app", false)]);
    assert_eq!(a.ev(fail), vec![Command::SelfFence { group: g("db"), resource: r("app") }]);
    // Everything after a self-fence is ignored: no release, no start.
    assert_eq!(a.ev(stopped("app")), vec![]);
    assert_eq!(a.ev(op(2, OperatorCommand::StartGroup(g("db")))), vec![]);
    assert!(a.e.status().self_fenced);
    assert_eq!(a.group().not_running, Some(NotRunningReason::SelfFenced));
}

#[test]
fn takeover_from_a_lost_node_waits_for_outside_fencing_when_required() {
    let mut grp = db_group(&[1, 2]);
    grp.placement.require_fencing = true;
    let (mut b, _) = Node::booted(2, model(grp));
    b.at(100, Event::LeaseObserved { group: g("db"), holder: Some(n(1)), note: None });
    assert_eq!(b.group().location, Some(n(1)));
    assert_eq!(b.at(200, Event::NodeLost(n(1))), vec![Command::RequestFence { node: n(1) }]);
    assert_eq!(b.group().not_running, Some(NotRunningReason::WaitingForFence(n(1))));
    // The lease layer saying the lease is dead is not enough, and no repeated requests.
    assert_eq!(b.at(300, Event::PeerFenced(n(1))), vec![]);
    assert_eq!(b.at(60_000, Event::Tick), vec![]);
    assert_eq!(b.at(60_100, Event::FenceConfirmed(n(1))), vec![acquire()]);
}

#[test]
fn takeover_without_fencing_lets_the_lease_layer_decide() {
    let (mut b, _) = Node::booted(2, model(db_group(&[1, 2])));
    b.at(100, Event::LeaseObserved { group: g("db"), holder: Some(n(1)), note: None });
    assert_eq!(b.at(200, Event::NodeLost(n(1))), vec![acquire()]);
    assert_eq!(b.ev(Event::LeaseAcquireFailed { group: g("db"), holder: Some(n(1)) }), vec![]);
    assert_eq!(b.at(700, Event::Tick), vec![]);
    assert_eq!(b.at(1_200, Event::Tick), vec![acquire()]);
    assert_eq!(b.ev(Event::LeaseAcquireFailed { group: g("db"), holder: Some(n(1)) }), vec![]);
    // The lease layer reports the holder's lease dead: retry at once.
    assert_eq!(b.at(1_300, Event::PeerFenced(n(1))), vec![acquire()]);
    b.run_db(2);
}

#[test]
fn the_stagger_restarts_when_the_lost_holder_s_lease_is_seen_dead() {
    // Node 3 ranks second for db after node 1 is lost. It tried early (refused by the lease
    // layer); once node 1's lease is dead it must give node 2 its stagger again, or the first
    // node to notice would win instead of the preferred one.
    let (mut c, _) = Node::booted(3, model(db_group(&[1, 2, 3])));
    c.at(100, Event::LeaseObserved { group: g("db"), holder: Some(n(1)), note: None });
    c.at(150, Event::NodeJoined(n(2)));
    assert_eq!(c.at(200, Event::NodeLost(n(1))), vec![]);
    // Second in line: it does not ask while node 1's lease may still be alive.
    assert_eq!(c.at(2_200, Event::Tick), vec![]);
    assert_eq!(c.at(5_000, Event::PeerFenced(n(1))), vec![]);
    // The observer repeats its verdict every round: that must not push the stagger back,
    // or a lower-ranked node could never act when the first one does not.
    assert_eq!(c.at(6_000, Event::PeerFenced(n(1))), vec![]);
    assert_eq!(c.at(6_999, Event::PeerFenced(n(1))), vec![]);
    assert_eq!(c.at(7_000, Event::PeerFenced(n(1))), vec![acquire()]);
}

#[test]
fn the_stagger_restarts_when_a_lost_holder_s_release_is_seen() {
    // Node 1 is cut off, loses quorum and releases db itself; node 3 (second choice) must
    // still give node 2 its head start from the moment the release is seen.
    let (mut c, _) = Node::booted(3, model(db_group(&[1, 2, 3])));
    c.at(100, Event::LeaseObserved { group: g("db"), holder: Some(n(1)), note: None });
    c.at(150, Event::NodeJoined(n(2)));
    assert_eq!(c.at(200, Event::NodeLost(n(1))), vec![]);
    assert_eq!(c.at(2_200, Event::Tick), vec![]);
    assert_eq!(c.at(5_000, Event::LeaseObserved { group: g("db"), holder: None, note: None }), vec![]);
    assert_eq!(c.at(6_999, Event::Tick), vec![]);
    assert_eq!(c.at(7_000, Event::Tick), vec![acquire()]);
}

#[test]
fn quorum_loss_stops_and_releases_and_blocks_acquisition() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    a.run_db(7);
    assert_eq!(a.ev(Event::QuorumLost), vec![stop("app", false)]);
    a.ev(stopped("app"));
    a.ev(stopped("ip"));
    let cmds = a.ev(stopped("disk"));
    assert!(matches!(cmds.as_slice(), [Command::ReleaseLease { reason: ReleaseReason::QuorumLost, .. }]), "{cmds:?}");
    assert_eq!(a.at(100_000, Event::Tick), vec![]);
    assert_eq!(a.group().not_running, Some(NotRunningReason::NoQuorum));
    assert_eq!(a.at(100_001, Event::QuorumRegained), vec![acquire()]);
}

#[test]
fn resources_found_running_are_adopted_under_a_new_lease() {
    let mut e = Engine::new(n(1), model(db_group(&[1, 2]))).unwrap();
    e.startup(0);
    e.handle(0, Event::ProbeResult { group: g("db"), resource: r("disk"), running: true });
    e.handle(0, Event::ProbeResult { group: g("db"), resource: r("ip"), running: false });
    let cmds = e.handle(0, Event::ProbeResult { group: g("db"), resource: r("app"), running: true });
    assert_eq!(cmds, vec![acquire()]);
    assert_eq!(
        e.handle(1, acquired(4, None)),
        vec![
            Command::AdoptResource { group: g("db"), resource: r("disk"), token: LeaseToken(4) },
            Command::AdoptResource { group: g("db"), resource: r("app"), token: LeaseToken(4) },
            start("db", "ip", 4),
        ]
    );
}

#[test]
fn resources_found_running_under_someone_elses_lease_are_killed() {
    let mut e = Engine::new(n(2), model(db_group(&[1, 2]))).unwrap();
    e.startup(0);
    e.handle(0, Event::ProbeResult { group: g("db"), resource: r("disk"), running: true });
    e.handle(0, Event::ProbeResult { group: g("db"), resource: r("ip"), running: true });
    e.handle(0, Event::ProbeResult { group: g("db"), resource: r("app"), running: false });
    let cmds = e.handle(1, Event::LeaseAcquireFailed { group: g("db"), holder: Some(n(1)) });
    assert_eq!(cmds, vec![stop("ip", true)]);
    assert_eq!(e.handle(2, stopped("ip")), vec![stop("disk", true)]);
    assert_eq!(e.handle(3, stopped("disk")), vec![]);
}

#[test]
fn operator_move_hands_off_to_the_target_which_goes_first() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2, 3])));
    a.run_db(7);
    let mv = op(5, OperatorCommand::MoveGroup { group: g("db"), to: n(3) });
    assert_eq!(a.ev(mv.clone()), vec![stop_handoff("app", 3)]);
    a.ev(stopped("app"));
    a.ev(stopped("ip"));
    let cmds = a.ev(stopped("disk"));
    let [Command::ReleaseLease { reason: ReleaseReason::Handoff { to }, note, .. }] = cmds.as_slice() else {
        panic!("{cmds:?}")
    };
    assert_eq!((*to, note.preferred), (n(3), Some(n(3))));
    // Node 3 received the same command; once it sees the lease free it asks at once.
    let (mut c, cmds) = Node::booted(3, model(db_group(&[1, 2, 3])));
    assert_eq!(cmds, vec![]);
    c.at(50, Event::LeaseObserved { group: g("db"), holder: Some(n(1)), note: None });
    assert_eq!(c.ev(mv), vec![]);
    assert_eq!(
        c.at(90, Event::LeaseObserved { group: g("db"), holder: None, note: Some(note.clone()) }),
        vec![acquire()]
    );
}

#[test]
fn a_move_without_a_target_picks_the_best_other_node_by_the_groups_placement() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2, 3])));
    assert_eq!(a.e.move_target(&g("nope")), None);
    a.run_db(7);
    // Running here: the next node in policy order.
    assert_eq!(a.e.move_target(&g("db")), Some(Ok(n(2))));
    // A node in standby or lost is skipped.
    a.ev(Event::PeerStandby { node: n(2), standby: true });
    assert_eq!(a.e.move_target(&g("db")), Some(Ok(n(3))));
    a.ev(Event::NodeLost(n(3)));
    let none = a.e.move_target(&g("db")).unwrap().unwrap_err();
    assert_eq!(none.nodes, vec![(n(1), Unavailable::RunsIt), (n(2), Unavailable::Standby), (n(3), Unavailable::Down)]);
    assert_eq!(none.location, Some(n(1)));
    // A node that failed the group ranks after one that did not, as in a failover.
    let (mut b, _) = Node::booted(2, model(db_group(&[1, 2, 3])));
    // Running nowhere known: its best node.
    assert_eq!(b.e.move_target(&g("db")), Some(Ok(n(1))));
    let mut note = LeaseNote::initial(&db_group(&[1, 2, 3]));
    note.failed_on = vec![n(1)];
    b.ev(Event::LeaseObserved { group: g("db"), holder: Some(n(3)), note: Some(note) });
    assert_eq!(b.e.move_target(&g("db")), Some(Ok(n(2))));
    // The query changed nothing: no command is pending.
    assert_eq!(b.ev(Event::Tick), vec![]);
}

#[test]
fn a_move_racing_a_failover_redirects_it() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2, 3])));
    a.run_db(7);
    a.at(1_000, failed("ip"));
    a.ev(stopped("ip"));
    a.ev(started("ip"));
    assert_eq!(a.at(1_500, failed("ip")), vec![stop("app", false)]);
    // The move arrives while the failover is stopping the group.
    assert_eq!(a.ev(op(3, OperatorCommand::MoveGroup { group: g("db"), to: n(3) })), vec![]);
    a.ev(stopped("app"));
    a.ev(stopped("ip"));
    let cmds = a.ev(stopped("disk"));
    let [Command::ReleaseLease { reason: ReleaseReason::Failover, note, .. }] = cmds.as_slice() else {
        panic!("{cmds:?}")
    };
    assert_eq!((note.preferred, note.failovers, note.desired_seq), (Some(n(3)), 1, 3));
}

#[test]
fn auto_failback_returns_the_group_to_the_preferred_node_manual_does_not() {
    for (failback, expect_handoff) in [(Failback::Auto, true), (Failback::Manual, false)] {
        let mut grp = db_group(&[1, 2]);
        grp.placement.failback = failback;
        let (mut b, _) = Node::booted(2, model(grp));
        b.at(10, Event::NodeLost(n(1)));
        b.run_db(3);
        let cmds = b.at(5_000, Event::NodeJoined(n(1)));
        if expect_handoff {
            assert_eq!(cmds, vec![stop_handoff("app", 1)]);
            b.ev(stopped("app"));
            b.ev(stopped("ip"));
            let cmds = b.ev(stopped("disk"));
            assert!(
                matches!(cmds.as_slice(), [Command::ReleaseLease { reason: ReleaseReason::Handoff { to }, .. }] if *to == n(1))
            );
        } else {
            assert_eq!(cmds, vec![]);
            assert_eq!(b.group().state, GroupState::Started);
        }
    }
}

#[test]
fn not_auto_started_groups_wait_for_an_operator() {
    let mut grp = db_group(&[1, 2]);
    grp.placement.start_on_cluster_start = false;
    let (mut a, cmds) = Node::booted(1, model(grp));
    assert_eq!(cmds, vec![]);
    assert_eq!(a.group().not_running, Some(NotRunningReason::NotAutoStarted));
    assert_eq!(a.ev(op(1, OperatorCommand::StartGroup(g("db")))), vec![acquire()]);
}

#[test]
fn suspended_monitoring_ignores_failures() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    a.run_db(7);
    a.ev(op(1, OperatorCommand::SuspendMonitoring(g("db"))));
    assert_eq!(a.ev(failed("disk")), vec![]);
    assert!(a.group().monitoring_suspended);
    a.ev(op(2, OperatorCommand::ResumeMonitoring(g("db"))));
    assert_eq!(a.ev(failed("disk")), vec![stop("app", false)]);
}

#[test]
fn bad_operator_commands_are_rejected_with_a_reason() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    let cmds = a.ev(op(1, OperatorCommand::StopGroup(g("nope"))));
    assert!(
        matches!(&cmds[..], [Command::Notify(Notice::OperatorRejected { seq: 1, reason })] if reason.contains("nope"))
    );
    let cmds = a.ev(op(2, OperatorCommand::MoveGroup { group: g("db"), to: n(3) }));
    assert!(
        matches!(&cmds[..], [Command::Notify(Notice::OperatorRejected { seq: 2, reason })] if reason.contains("not eligible"))
    );
}

#[test]
fn an_unexpected_grant_is_given_back() {
    let (mut b, _) = Node::booted(2, model(db_group(&[1, 2])));
    let cmds = b.ev(acquired(11, None));
    assert!(matches!(cmds.as_slice(), [Command::ReleaseLease { token: LeaseToken(11), .. }]), "{cmds:?}");
}

#[test]
fn older_operator_commands_lose_to_newer_ones() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    a.run_db(7);
    assert_eq!(a.ev(op(5, OperatorCommand::StartGroup(g("db")))), vec![]);
    // A stop with an older sequence number arrives late: ignored.
    assert_eq!(a.ev(op(4, OperatorCommand::StopGroup(g("db")))), vec![]);
    assert_eq!(a.group().state, GroupState::Started);
}

#[test]
fn a_failure_while_adopting_restarts_the_resource_under_the_new_lease() {
    let mut e = Engine::new(n(1), model(db_group(&[1, 2]))).unwrap();
    e.startup(0);
    for res in ["disk", "ip", "app"] {
        e.handle(0, Event::ProbeResult { group: g("db"), resource: r(res), running: true });
    }
    assert_eq!(e.handle(1, failed("disk")), vec![]);
    assert_eq!(
        e.handle(2, acquired(4, None)),
        vec![
            Command::AdoptResource { group: g("db"), resource: r("disk"), token: LeaseToken(4) },
            Command::AdoptResource { group: g("db"), resource: r("ip"), token: LeaseToken(4) },
            Command::AdoptResource { group: g("db"), resource: r("app"), token: LeaseToken(4) },
            stop("app", false),
        ]
    );
    assert_eq!(e.handle(3, stopped("app")), vec![stop("disk", false)]);
    assert_eq!(e.handle(4, stopped("disk")), vec![start("db", "disk", 4)]);
}

#[test]
fn lease_lost_while_acquiring_waits_for_the_pending_answer() {
    let (mut a, cmds) = Node::booted(1, model(db_group(&[1, 2])));
    assert_eq!(cmds, vec![acquire()]);
    // A LeaseLost about an earlier holding must not trigger a second request.
    assert_eq!(a.at(100, Event::LeaseLost { group: g("db") }), vec![]);
    assert_eq!(a.at(5_000, Event::Tick), vec![]);
    a.run_db(2);
}

#[test]
fn a_newer_grant_of_a_held_lease_re_stamps_what_runs() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    assert_eq!(a.ev(acquired(2, None)), vec![start("db", "disk", 2)]);
    a.ev(started("disk"));
    let cmds = a.ev(acquired(3, None));
    assert_eq!(
        cmds,
        vec![
            Command::AdoptResource { group: g("db"), resource: r("disk"), token: LeaseToken(3) },
            Command::AdoptResource { group: g("db"), resource: r("ip"), token: LeaseToken(3) },
        ]
    );
    assert_eq!(a.ev(started("ip")), vec![start("db", "app", 3)]);
}

#[test]
fn a_stale_read_of_our_own_past_lease_is_not_a_reclaim() {
    let mut grp = db_group(&[3, 1]);
    grp.placement.failback = Failback::Auto;
    let (mut a, _) = Node::booted(1, model(grp));
    a.at(10, Event::NodeLost(n(3)));
    a.at(1_000, Event::Tick);
    a.run_db(5);
    assert_eq!(a.at(2_000, Event::NodeJoined(n(3))), vec![stop_handoff("app", 3)]);
    a.ev(stopped("app"));
    a.ev(stopped("ip"));
    let cmds = a.ev(stopped("disk"));
    assert!(matches!(cmds.as_slice(), [Command::ReleaseLease { reason: ReleaseReason::Handoff { .. }, .. }]));
    // A lease read taken before the release arrives late and names us: node 3 goes first.
    assert_eq!(a.at(2_100, Event::LeaseObserved { group: g("db"), holder: Some(n(1)), note: None }), vec![]);
    assert_eq!(a.at(4_099, Event::Tick), vec![]);
    // Node 3 never took it: one stagger (2 s) after we saw it free we take it back, and keep it.
    assert_eq!(a.at(4_100, Event::Tick), vec![acquire()]);
    a.run_db(6);
    assert_eq!(a.at(10_000, Event::Tick), vec![]);
}

#[test]
fn a_restarted_agent_reclaims_the_lease_its_previous_incarnation_held() {
    let (mut b, _) = Node::booted(2, model(db_group(&[1, 2])));
    // The lease names this node, but this engine never asked for it.
    assert_eq!(b.at(100, Event::LeaseObserved { group: g("db"), holder: Some(n(2)), note: None }), vec![acquire()]);
}

#[test]
fn a_group_left_failed_can_still_be_stopped_or_moved_by_an_operator() {
    let mut grp = db_group(&[1, 2]);
    grp.recovery.final_action = FinalAction::DoNothing;
    grp.recovery.max_restarts = 0;
    grp.recovery.max_failovers = 0;
    let (mut a, _) = Node::booted(1, model(grp.clone()));
    a.run_db(7);
    a.at(1_000, failed("ip"));
    assert_eq!(a.group().state, GroupState::Failed);
    assert_eq!(a.ev(op(1, OperatorCommand::StopGroup(g("db")))), vec![stop("app", false)]);
    a.ev(stopped("app"));
    a.ev(stopped("ip"));
    let cmds = a.ev(stopped("disk"));
    assert!(matches!(cmds.as_slice(), [Command::ReleaseLease { reason: ReleaseReason::Stopped, .. }]), "{cmds:?}");

    let (mut a, _) = Node::booted(1, model(grp));
    a.run_db(7);
    a.at(1_000, failed("ip"));
    assert_eq!(a.ev(op(1, OperatorCommand::MoveGroup { group: g("db"), to: n(2) })), vec![stop_handoff("app", 2)]);
}

#[test]
fn a_stop_racing_a_start_lets_the_start_finish_then_stops_in_reverse() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    assert_eq!(a.ev(acquired(2, None)), vec![start("db", "disk", 2)]);
    a.ev(started("disk"));
    assert_eq!(a.ev(op(1, OperatorCommand::StopGroup(g("db")))), vec![]);
    assert_eq!(a.group().state, GroupState::Stopping);
    assert_eq!(a.ev(started("ip")), vec![stop("ip", false)]);
    assert_eq!(a.ev(stopped("ip")), vec![stop("disk", false)]);
    let cmds = a.ev(stopped("disk"));
    assert!(matches!(cmds.as_slice(), [Command::ReleaseLease { reason: ReleaseReason::Stopped, .. }]), "{cmds:?}");
}

#[test]
fn a_grant_arriving_without_quorum_is_released_untouched() {
    let (mut a, cmds) = Node::booted(1, model(db_group(&[1, 2])));
    assert_eq!(cmds, vec![acquire()]);
    assert_eq!(a.ev(Event::QuorumLost), vec![]);
    let cmds = a.ev(acquired(2, None));
    assert!(matches!(cmds.as_slice(), [Command::ReleaseLease { reason: ReleaseReason::QuorumLost, .. }]), "{cmds:?}");
}

#[test]
fn a_stable_run_clears_the_failover_history() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    let note = LeaseNote { failovers: 1, failed_on: vec![n(2)], ..LeaseNote::initial(&db_group(&[1, 2])) };
    a.ev(acquired(9, Some(note)));
    a.ev(started("disk"));
    a.ev(started("ip"));
    a.ev(started("app"));
    assert_eq!(a.group().failovers, 1);
    // The failover window is 60 s: one tick past it resets the count.
    a.at(59_999, Event::Tick);
    assert_eq!(a.group().failovers, 1);
    a.at(60_000, Event::Tick);
    assert_eq!((a.group().failovers, a.group().failed_on.len()), (0, 0));
    // So the next exhausted restart fails over instead of taking the final action.
    a.at(61_000, failed("ip"));
    a.ev(stopped("ip"));
    a.ev(started("ip"));
    assert_eq!(a.at(62_000, failed("ip")), vec![stop("app", false)]);
}

#[test]
fn status_says_where_a_group_runs_and_why_it_waits() {
    let (mut b, _) = Node::booted(2, model(db_group(&[1, 2])));
    b.at(100, Event::LeaseObserved { group: g("db"), holder: Some(n(1)), note: None });
    let st = b.group();
    assert_eq!((st.state, st.location, st.not_running), (GroupState::Started, Some(n(1)), None));
    // Lost holder, no fencing required: the lease layer has not let go yet.
    b.at(200, Event::NodeLost(n(1)));
    b.ev(Event::LeaseAcquireFailed { group: g("db"), holder: Some(n(1)) });
    let st = b.group();
    assert_eq!((st.state, st.not_running), (GroupState::Blocked, Some(NotRunningReason::WaitingForLease(n(1)))));
}

// Placement: capacity, anti-affinity, affinity, priority.

/// A one-resource group (a VM) needing `mib` MiB and `cpus` vCPUs.
fn vm_group(name: &str, eligible: &[u32], mib: u64, cpus: u32) -> FailoverGroup {
    let mut grp = FailoverGroup::new(
        g(name),
        vec![ResourceSpec::new("vm")],
        PlacementPolicy {
            eligible: eligible.iter().map(|i| n(*i)).collect(),
            failback: Failback::Manual,
            start_on_cluster_start: true,
            require_fencing: false,
        },
        RecoveryPolicy::default(),
    );
    grp.demand = Capacity::new(mib, cpus);
    grp
}

fn placed_model(groups: Vec<FailoverGroup>, caps: &[(u32, u64, u32)]) -> ClusterModel {
    let mut m = ClusterModel::new(vec![n(1), n(2), n(3)], groups, Timing::default());
    m.capacity = caps.iter().map(|(i, mib, cpus)| (n(*i), Capacity::new(*mib, *cpus))).collect();
    m
}

fn acquire_of(group: &str) -> Command {
    Command::AcquireLease { group: g(group) }
}

fn vm_event(group: &str, f: fn(GroupId, ResourceId) -> Event) -> Event {
    f(g(group), r("vm"))
}

fn no_capacity(group: &str, nodes: Vec<(NodeId, Unfit)>) -> Command {
    Command::Notify(Notice::NoCapacity { group: g(group), nodes })
}

impl Node {
    /// Starts an engine, feeds `before` while it probes, then answers every probe with
    /// "not running"; returns the commands emitted after the last probe answer.
    fn booted_after(me: u32, model: ClusterModel, before: Vec<Event>) -> (Node, Vec<Command>) {
        let mut e = Engine::new(n(me), model).unwrap();
        let probes = e.startup(0);
        for ev in before {
            assert_eq!(e.handle(0, ev), vec![]);
        }
        let mut last = Vec::new();
        for c in probes {
            let Command::ProbeResource { group, resource } = c else { panic!("startup emitted {c:?}") };
            last = e.handle(0, Event::ProbeResult { group, resource, running: false });
        }
        (Node { e, now: 0 }, last)
    }

    /// Brings the one-resource group `group` to Started under token `t`.
    fn run_vm(&mut self, group: &str, t: u64) {
        assert_eq!(
            self.ev(Event::LeaseAcquired { group: g(group), token: LeaseToken(t), note: None }),
            vec![start(group, "vm", t)]
        );
        assert_eq!(self.ev(vm_event(group, |group, resource| Event::ResourceStarted { group, resource })), vec![]);
    }

    fn status_of(&self, group: &str) -> GroupStatus {
        self.e.status().groups.into_iter().find(|s| s.id == g(group)).unwrap()
    }
}

#[test]
fn a_group_that_does_not_fit_the_preferred_node_goes_to_the_next_that_fits() {
    let m = placed_model(vec![vm_group("big", &[1, 2, 3], 4_096, 4)], &[(1, 1_024, 2), (2, 8_192, 8)]);
    // Node 1 is preferred but too small: it never asks, whatever the time.
    let (mut a, cmds) = Node::booted(1, m.clone());
    assert_eq!(cmds, vec![]);
    assert_eq!(a.at(100_000, Event::Tick), vec![]);
    assert_eq!(a.status_of("big").not_running, Some(NotRunningReason::TakeoverPending));
    // Node 2 is the best node that fits: rank 0, it asks at once.
    let (_, cmds) = Node::booted(2, m.clone());
    assert_eq!(cmds, vec![acquire_of("big")]);
    // Node 3 (unlimited) comes next: one stagger later, and only if node 2 did not take it.
    let (mut c, cmds) = Node::booted(3, m);
    assert_eq!(cmds, vec![]);
    assert_eq!(c.at(1_999, Event::Tick), vec![]);
    assert_eq!(c.at(2_000, Event::Tick), vec![acquire_of("big")]);
}

#[test]
fn a_group_that_fits_nowhere_is_reported_then_starts_when_a_node_joins() {
    let m = placed_model(vec![vm_group("big", &[1, 2, 3], 4_096, 4)], &[(1, 2_048, 8), (2, 8_192, 2)]);
    let (mut a, cmds) = Node::booted(1, m.clone());
    assert_eq!(cmds, vec![], "node 3 (unlimited) is expected to take it");
    let why = vec![(n(1), Unfit::Memory { needed: 4_096, free: 2_048 }), (n(2), Unfit::Vcpus { needed: 4, free: 2 })];
    assert_eq!(a.at(100, Event::NodeLost(n(3))), vec![no_capacity("big", why.clone())]);
    let st = a.status_of("big");
    assert_eq!((st.state, st.not_running), (GroupState::Blocked, Some(NotRunningReason::NoCapacity { nodes: why })));
    // Reported once, not on every tick; never started where it does not fit.
    assert_eq!(a.at(60_000, Event::Tick), vec![]);
    // Node 3 returns: it fits there. Node 1 says so and leaves it to node 3...
    assert_eq!(
        a.at(61_000, Event::NodeJoined(n(3))),
        vec![Command::Notify(Notice::NoCapacityResolved { group: g("big") })]
    );
    assert_eq!(a.at(200_000, Event::Tick), vec![]);
    // ...whose own engine takes it at rank 0 as soon as its probes are done.
    let (_, cmds) = Node::booted(3, m);
    assert_eq!(cmds, vec![acquire_of("big")]);
}

#[test]
fn a_group_that_fits_nowhere_starts_as_soon_as_another_group_stops() {
    let m = placed_model(
        vec![vm_group("a", &[1], 4_096, 4), vm_group("b", &[1], 2_048, 2)],
        &[(1, 4_096, 4), (2, 1, 1), (3, 1, 1)],
    );
    let (mut x, cmds) = Node::booted(1, m);
    // Same priority: model order. `a` takes the whole node; `b` is reported, not dropped.
    let why = vec![(n(1), Unfit::Memory { needed: 2_048, free: 0 })];
    assert_eq!(cmds, vec![acquire_of("a"), no_capacity("b", why)]);
    x.run_vm("a", 1);
    assert_eq!(
        x.ev(op(1, OperatorCommand::StopGroup(g("a")))),
        vec![Command::StopResource { group: g("a"), resource: r("vm"), force: false, handover: None }]
    );
    // The stop completes: `a` is released and, in the same step, `b` asks for its lease.
    let cmds = x.ev(vm_event("a", |group, resource| Event::ResourceStopped { group, resource }));
    let [Command::ReleaseLease { group, reason: ReleaseReason::Stopped, .. }, rest @ ..] = cmds.as_slice() else {
        panic!("{cmds:?}")
    };
    assert_eq!(group, &g("a"));
    assert_eq!(rest, [acquire_of("b"), Command::Notify(Notice::NoCapacityResolved { group: g("b") })]);
    x.run_vm("b", 2);
}

#[test]
fn anti_affinity_keeps_two_groups_apart_even_on_the_last_healthy_node() {
    let mut gx = vm_group("x", &[1, 2], 0, 0);
    let mut gy = vm_group("y", &[1, 2], 0, 0);
    gx.anti_affinity = vec!["apart".into()];
    gy.anti_affinity = vec!["apart".into()];
    // No capacity at all: anti-affinity alone decides.
    let (mut a, cmds) = Node::booted(1, placed_model(vec![gx, gy], &[]));
    // Node 1 takes x; y must go to node 2, which node 1 leaves it to.
    assert_eq!(cmds, vec![acquire_of("x")]);
    a.run_vm("x", 1);
    assert_eq!(a.at(10_000, Event::Tick), vec![]);
    // Node 2 is lost: node 1 is the only healthy node and still refuses y.
    let why = vec![(n(1), Unfit::AntiAffinity { group: g("x"), set: "apart".into() })];
    assert_eq!(a.at(11_000, Event::NodeLost(n(2))), vec![no_capacity("y", why.clone())]);
    assert_eq!(a.at(100_000, Event::Tick), vec![]);
    assert_eq!(a.status_of("y").not_running, Some(NotRunningReason::NoCapacity { nodes: why }));
    // Once x is stopped, y may run here.
    a.ev(op(1, OperatorCommand::StopGroup(g("x"))));
    let cmds = a.ev(vm_event("x", |group, resource| Event::ResourceStopped { group, resource }));
    assert!(cmds.contains(&acquire_of("y")), "{cmds:?}");
}

#[test]
fn affinity_prefers_the_partners_node_over_policy_order() {
    let db = || {
        let mut grp = vm_group("db", &[2, 1], 0, 0);
        grp.affinity = vec!["stack".into()];
        grp
    };
    let app = |affinity: &[&str]| {
        let mut grp = vm_group("app", &[1, 2], 0, 0);
        grp.affinity = affinity.iter().map(|s| s.to_string()).collect();
        grp
    };
    let db_on_2 = vec![Event::LeaseObserved { group: g("db"), holder: Some(n(2)), note: None }];
    // Node 1 is app's first choice by policy, but db runs on node 2: node 1 waits a stagger.
    let (mut a, cmds) = Node::booted_after(1, placed_model(vec![db(), app(&["stack"])], &[]), db_on_2.clone());
    assert_eq!(cmds, vec![]);
    assert_eq!(a.at(1_999, Event::Tick), vec![]);
    assert_eq!(a.at(2_000, Event::Tick), vec![acquire_of("app")], "node 1 still takes it if node 2 does not");
    // Node 2, which takes db, asks for app at once too.
    let (_, cmds) = Node::booted(2, placed_model(vec![db(), app(&["stack"])], &[]));
    assert_eq!(cmds, vec![acquire_of("db"), acquire_of("app")]);
    // Without the shared set, policy order holds: node 1 first, node 2 waits.
    let (_, cmds) = Node::booted_after(1, placed_model(vec![db(), app(&["other"])], &[]), db_on_2);
    assert_eq!(cmds, vec![acquire_of("app")]);
    let (_, cmds) = Node::booted(2, placed_model(vec![db(), app(&["other"])], &[]));
    assert_eq!(cmds, vec![acquire_of("db")]);
}

#[test]
fn with_room_for_one_of_two_groups_the_higher_priority_gets_it() {
    let m = |low: i32, high: i32| {
        let mut l = vm_group("low", &[1, 2], 4_096, 4);
        let mut h = vm_group("high", &[1, 2], 4_096, 4);
        l.priority = low;
        h.priority = high;
        // `low` comes first in the model: only priority can put `high` first.
        placed_model(vec![l, h], &[(1, 4_096, 4), (2, 1_024, 1)])
    };
    let why = |free_on_1| {
        vec![
            (n(1), Unfit::Memory { needed: 4_096, free: free_on_1 }),
            (n(2), Unfit::Memory { needed: 4_096, free: 1_024 }),
        ]
    };
    let (_, cmds) = Node::booted(1, m(0, 10));
    assert_eq!(cmds, vec![acquire_of("high"), no_capacity("low", why(0))]);
    let (_, cmds) = Node::booted(1, m(10, 0));
    assert_eq!(cmds, vec![acquire_of("low"), no_capacity("high", why(0))]);
    // Equal priorities: model order.
    let (_, cmds) = Node::booted(1, m(0, 0));
    assert_eq!(cmds, vec![acquire_of("low"), no_capacity("high", why(0))]);
}

#[test]
fn a_reclaimed_lease_that_does_not_fit_is_released_before_anything_starts() {
    let m = placed_model(vec![vm_group("x", &[1, 2], 4_096, 4), vm_group("y", &[1, 2], 4_096, 4)], &[(1, 4_096, 4)]);
    let mut e = Engine::new(n(1), m).unwrap();
    let probes = e.startup(0);
    assert_eq!(probes.len(), 2);
    // A previous incarnation held y's lease; x still runs here.
    assert_eq!(e.handle(0, Event::LeaseObserved { group: g("y"), holder: Some(n(1)), note: None }), vec![]);
    assert_eq!(e.handle(0, Event::ProbeResult { group: g("x"), resource: r("vm"), running: true }), vec![]);
    let cmds = e.handle(0, Event::ProbeResult { group: g("y"), resource: r("vm"), running: false });
    assert_eq!(cmds, vec![acquire_of("x"), acquire_of("y")]);
    assert_eq!(
        e.handle(1, Event::LeaseAcquired { group: g("x"), token: LeaseToken(4), note: None }),
        vec![Command::AdoptResource { group: g("x"), resource: r("vm"), token: LeaseToken(4) }]
    );
    let cmds = e.handle(2, Event::LeaseAcquired { group: g("y"), token: LeaseToken(9), note: None });
    let [Command::ReleaseLease { group, token, reason, .. }] = cmds.as_slice() else { panic!("{cmds:?}") };
    assert_eq!((group, *token, *reason), (&g("y"), LeaseToken(9), ReleaseReason::NoCapacity));
    // It does not come back for it: node 2 (unlimited) is where it fits.
    assert_eq!(e.handle(100_000, Event::Tick), vec![]);
}

#[test]
fn capacity_and_placement_rules_are_validated() {
    let mut m = placed_model(vec![vm_group("x", &[1], 1, 1)], &[(9, 1, 1)]);
    assert_eq!(m.validate(), Err(ModelError::UnknownCapacityNode(n(9))));
    m.capacity.clear();
    m.groups[0].affinity = vec!["s".into()];
    m.groups[0].anti_affinity = vec!["s".into()];
    assert_eq!(m.validate(), Err(ModelError::AffinityConflict { group: g("x"), set: "s".into() }));
    m.groups[0].anti_affinity = vec![String::new()];
    assert_eq!(m.validate(), Err(ModelError::EmptySetName(g("x"))));
    assert!(Capacity::new(4, 2).fits(&Capacity::new(4, 2)));
    assert!(!Capacity::new(4, 2).fits(&Capacity::new(5, 1)));
    assert_eq!(Capacity::new(4, 2) + Capacity::new(1, 1), Capacity::new(5, 3));
    assert_eq!(Capacity::new(4, 2).saturating_sub(Capacity::new(5, 1)), Capacity::new(0, 1));
}

// Standby (planned maintenance) and local vetoes.

fn standby(mode: Option<StandbyMode>) -> Event {
    Event::SetStandby(mode)
}
fn standby_notice(mode: Option<StandbyMode>) -> Command {
    Command::Notify(Notice::Standby { mode })
}
fn peer_standby(i: u32, on: bool) -> Event {
    Event::PeerStandby { node: n(i), standby: on }
}

impl Node {
    /// Stops db's three resources in reverse order and returns the commands after the last.
    /// Completes a graceful stop of db (whatever it hands over to) and returns what follows.
    fn stop_db(&mut self) -> Vec<Command> {
        let graceful = |cmds: Vec<Command>, next: &str| {
            assert!(
                matches!(cmds.as_slice(), [Command::StopResource { resource, force: false, .. }] if resource.0 == next),
                "{cmds:?}"
            )
        };
        graceful(self.ev(stopped("app")), "ip");
        graceful(self.ev(stopped("ip")), "disk");
        self.ev(stopped("disk"))
    }
}

/// The note and reason of a lone `ReleaseLease` followed by notices.
fn released(cmds: &[Command]) -> (LeaseNote, ReleaseReason, Vec<Command>) {
    let [Command::ReleaseLease { note, reason, .. }, rest @ ..] = cmds else { panic!("{cmds:?}") };
    (note.clone(), *reason, rest.to_vec())
}

#[test]
fn standby_move_stops_gracefully_and_releases_without_counting_a_failure() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    a.run_db(7);
    assert_eq!(
        a.at(1_000, standby(Some(StandbyMode::Move))),
        vec![standby_notice(Some(StandbyMode::Move)), stop_standby("app", 2)]
    );
    let (note, reason, rest) = released(&a.stop_db());
    assert_eq!(reason, ReleaseReason::Standby);
    assert_eq!((note.desired, note.failovers, note.failed_on.clone()), (Desired::Started, 0, vec![]));
    assert_eq!(rest, vec![Command::Notify(Notice::StandbyReleased { group: g("db"), parked: false })]);
    // It acquires nothing while in standby, whatever the time and whoever is lost.
    assert_eq!(a.at(100_000, Event::NodeLost(n(2))), vec![]);
    assert_eq!(a.at(200_000, Event::LeaseObserved { group: g("db"), holder: None, note: Some(note) }), vec![]);
    let st = a.e.status();
    assert_eq!(st.standby, Some(StandbyMode::Move));
    assert_eq!((st.groups[0].restarts, st.groups[0].failovers), (0, 0));
    // The only otherwise healthy node is this one: the reason says so, not "no capacity".
    assert_eq!(st.groups[0].not_running, Some(NotRunningReason::Standby { nodes: vec![n(1)] }));
    // Back online: a candidate again, it takes the group at once (node 2 is lost).
    assert_eq!(a.at(200_100, standby(None)), vec![standby_notice(None), acquire()]);
    // Entering the same mode twice says nothing.
    assert_eq!(a.ev(standby(None)), vec![]);
}

#[test]
fn a_peer_in_standby_is_not_ranked_so_takeover_is_immediate() {
    let (mut b, _) = Node::booted(2, model(db_group(&[1, 2])));
    b.at(100, Event::LeaseObserved { group: g("db"), holder: Some(n(1)), note: None });
    assert_eq!(b.at(200, peer_standby(1, true)), vec![]);
    assert_eq!(b.e.status().peers_in_standby, vec![n(1)]);
    // Node 1 released it: node 2 is rank 0 now and does not wait a stagger behind node 1.
    let note = LeaseNote::initial(&db_group(&[1, 2]));
    assert_eq!(b.at(300, Event::LeaseObserved { group: g("db"), holder: None, note: Some(note) }), vec![acquire()]);
    // The flag survives membership flaps.
    b.ev(Event::NodeLost(n(1)));
    b.ev(Event::NodeJoined(n(1)));
    assert_eq!(b.e.status().peers_in_standby, vec![n(1)]);
}

#[test]
fn failback_never_targets_a_standby_node_and_follows_the_policy_once_it_is_back() {
    for (failback, expect_handoff) in [(Failback::Auto, true), (Failback::Manual, false)] {
        let mut grp = db_group(&[1, 2]);
        grp.placement.failback = failback;
        let (mut b, _) = Node::booted(2, model(grp));
        b.at(10, peer_standby(1, true));
        b.at(20, Event::LeaseObserved { group: g("db"), holder: None, note: None });
        b.run_db(3);
        // Node 1 is preferred but in standby: the group stays here.
        assert_eq!(b.at(100_000, Event::Tick), vec![]);
        let cmds = b.at(100_100, peer_standby(1, false));
        if expect_handoff {
            assert_eq!(cmds, vec![stop_handoff("app", 1)]);
            let (_, reason, _) = released(&b.stop_db());
            assert_eq!(reason, ReleaseReason::Handoff { to: n(1) });
        } else {
            assert_eq!(cmds, vec![]);
            assert_eq!(b.group().state, GroupState::Started);
        }
    }
}

#[test]
fn standby_park_keeps_the_group_stopped_everywhere_until_the_parker_is_back() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    a.run_db(7);
    assert_eq!(
        a.at(1_000, standby(Some(StandbyMode::Park))),
        vec![standby_notice(Some(StandbyMode::Park)), stop("app", false)]
    );
    let (note, reason, rest) = released(&a.stop_db());
    assert_eq!((reason, note.desired), (ReleaseReason::Standby, Desired::Stopped(StopCause::Parked(n(1)))));
    assert_eq!((note.failovers, note.failed_on.len()), (0, 0));
    assert_eq!(rest, vec![Command::Notify(Notice::StandbyReleased { group: g("db"), parked: true })]);
    // Node 2 sees the parked note: it never starts the group, even with node 1 lost.
    let (mut b, _) = Node::booted(2, model(db_group(&[1, 2])));
    let seen = Event::LeaseObserved { group: g("db"), holder: None, note: Some(note.clone()) };
    assert_eq!(b.at(2_000, seen.clone()), vec![]);
    assert_eq!(b.at(3_000, Event::NodeLost(n(1))), vec![]);
    assert_eq!(b.at(100_000, Event::Tick), vec![]);
    let st = b.group();
    assert_eq!((st.state, st.not_running), (GroupState::Stopped, Some(NotRunningReason::Parked(n(1)))));
    // Node 1 leaves standby: it takes the lease back to unpark, and runs it (its best node).
    a.now = 5_000;
    a.ev(seen);
    assert_eq!(a.ev(standby(None)), vec![standby_notice(None), acquire()]);
    assert_eq!(a.ev(acquired(8, Some(note))), vec![start("db", "disk", 8)]);
    assert_eq!(a.group().not_running, None);
}

#[test]
fn an_unparking_node_that_is_not_the_best_hands_the_group_to_the_best() {
    let note =
        LeaseNote { desired: Desired::Stopped(StopCause::Parked(n(1))), ..LeaseNote::initial(&db_group(&[2, 1])) };
    let (mut a, cmds) = Node::booted_after(
        1,
        model(db_group(&[2, 1])),
        vec![Event::LeaseObserved { group: g("db"), holder: None, note: Some(note.clone()) }],
    );
    assert_eq!(cmds, vec![acquire()], "online and the parker: it unparks at once");
    let cmds = a.ev(acquired(4, Some(note)));
    let (note, reason, _) = released(&cmds);
    assert_eq!((reason, note.desired), (ReleaseReason::Handoff { to: n(2) }, Desired::Started));
}

#[test]
fn an_operator_start_overrides_a_parking() {
    let parked = LeaseNote {
        desired: Desired::Stopped(StopCause::Parked(n(1))),
        desired_seq: 3,
        ..LeaseNote::initial(&db_group(&[1, 2]))
    };
    let (mut b, cmds) = Node::booted_after(
        2,
        model(db_group(&[1, 2])),
        vec![peer_standby(1, true), Event::LeaseObserved { group: g("db"), holder: None, note: Some(parked.clone()) }],
    );
    assert_eq!(cmds, vec![]);
    // An older command does not override it; a newer one does: it runs elsewhere.
    assert_eq!(b.at(30, op(2, OperatorCommand::StartGroup(g("db")))), vec![]);
    let cmds = b.at(40, op(4, OperatorCommand::StartGroup(g("db"))));
    assert_eq!(cmds, vec![acquire()], "{:?}", b.group());
    assert_eq!(b.ev(acquired(9, Some(parked))), vec![start("db", "disk", 9)]);
    // A parker holding a group that an operator started while it was stopping: not parked.
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    a.run_db(7);
    a.at(1_000, standby(Some(StandbyMode::Park)));
    assert_eq!(a.ev(op(9, OperatorCommand::StartGroup(g("db")))), vec![]);
    let (note, reason, rest) = released(&a.stop_db());
    assert_eq!((reason, note.desired, note.desired_seq), (ReleaseReason::Standby, Desired::Started, 9));
    assert_eq!(rest, vec![Command::Notify(Notice::StandbyReleased { group: g("db"), parked: false })]);
}

#[test]
fn leaving_standby_while_stopping_completes_the_release_unparked_then_competes_again() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    a.run_db(7);
    a.at(1_000, standby(Some(StandbyMode::Park)));
    assert_eq!(a.ev(stopped("app")), vec![stop("ip", false)]);
    assert_eq!(a.ev(standby(None)), vec![standby_notice(None)]);
    assert_eq!(a.ev(stopped("ip")), vec![stop("disk", false)]);
    let (note, reason, rest) = released(&a.ev(stopped("disk")));
    assert_eq!((reason, note.desired), (ReleaseReason::Standby, Desired::Started));
    assert_eq!(rest, vec![Command::Notify(Notice::StandbyReleased { group: g("db"), parked: false })]);
    // Online again and first in line: it asks for the lease once its retry delay passed.
    assert_eq!(a.at(1_999, Event::Tick), vec![]);
    assert_eq!(a.at(2_000, Event::Tick), vec![acquire()]);
}

#[test]
fn a_standby_restored_before_startup_adopts_what_runs_then_releases_it_gracefully() {
    let mut e = Engine::new(n(1), model(db_group(&[1, 2]))).unwrap();
    assert_eq!(e.handle(0, standby(Some(StandbyMode::Move))), vec![standby_notice(Some(StandbyMode::Move))]);
    e.startup(0);
    e.handle(0, Event::ProbeResult { group: g("db"), resource: r("disk"), running: true });
    e.handle(0, Event::ProbeResult { group: g("db"), resource: r("ip"), running: false });
    assert_eq!(e.handle(0, Event::ProbeResult { group: g("db"), resource: r("app"), running: true }), vec![acquire()]);
    let cmds = e.handle(1, acquired(4, None));
    assert_eq!(
        cmds,
        vec![
            Command::AdoptResource { group: g("db"), resource: r("disk"), token: LeaseToken(4) },
            Command::AdoptResource { group: g("db"), resource: r("app"), token: LeaseToken(4) },
            stop_standby("app", 2),
        ]
    );
    assert_eq!(e.handle(2, stopped("app")), vec![stop_standby("disk", 2)]);
    let (_, reason, _) = released(&e.handle(3, stopped("disk")));
    assert_eq!(reason, ReleaseReason::Standby);
    assert_eq!(e.handle(100_000, Event::Tick), vec![]);
}

#[test]
fn a_group_left_by_a_standby_node_still_obeys_anti_affinity_elsewhere() {
    let mut gx = vm_group("x", &[1, 2], 0, 0);
    let mut gy = vm_group("y", &[2], 0, 0);
    gx.anti_affinity = vec!["apart".into()];
    gy.anti_affinity = vec!["apart".into()];
    let m = placed_model(vec![gx, gy], &[]);
    let (mut b, _) =
        Node::booted_after(2, m, vec![Event::LeaseObserved { group: g("x"), holder: Some(n(1)), note: None }]);
    b.run_vm("y", 1);
    b.at(100, peer_standby(1, true));
    // Node 1 released x: node 2 runs y, anti-affine: x stays stopped, reported as no capacity.
    let cmds = b.at(200, Event::LeaseObserved { group: g("x"), holder: None, note: None });
    let why = vec![(n(2), Unfit::AntiAffinity { group: g("y"), set: "apart".into() })];
    assert_eq!(cmds, vec![no_capacity("x", why.clone())]);
    assert_eq!(b.at(100_000, Event::Tick), vec![]);
    assert_eq!(b.status_of("x").not_running, Some(NotRunningReason::NoCapacity { nodes: why }));
}

#[test]
fn a_standby_node_that_is_the_only_candidate_of_a_capped_group_says_standby() {
    let m = placed_model(vec![vm_group("x", &[1, 2], 1_024, 1)], &[(2, 512, 1)]);
    let (mut a, cmds) = Node::booted(1, m);
    assert_eq!(cmds, vec![acquire_of("x")]);
    a.run_vm("x", 1);
    assert_eq!(
        a.at(10, standby(Some(StandbyMode::Move))),
        vec![
            standby_notice(Some(StandbyMode::Move)),
            Command::StopResource { group: g("x"), resource: r("vm"), force: false, handover: None }
        ]
    );
    let cmds = a.ev(vm_event("x", |group, resource| Event::ResourceStopped { group, resource }));
    assert!(matches!(cmds.first(), Some(Command::ReleaseLease { reason: ReleaseReason::Standby, .. })), "{cmds:?}");
    // Node 2 is too small: the group fits nowhere but node 1, which is in standby. Capacity
    // elsewhere is what blocks it, so that is what status and the notice say.
    let why = vec![(n(2), Unfit::Memory { needed: 1_024, free: 512 })];
    assert!(cmds.contains(&no_capacity("x", why.clone())), "{cmds:?}");
    assert_eq!(a.status_of("x").not_running, Some(NotRunningReason::NoCapacity { nodes: why }));
    // Node 2 lost: only the standby node is left.
    a.at(20, Event::NodeLost(n(2)));
    assert_eq!(a.status_of("x").not_running, Some(NotRunningReason::Standby { nodes: vec![n(1)] }));
}

#[test]
fn a_local_veto_releases_the_group_as_failed_here_and_keeps_it_away() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    a.run_db(7);
    let veto = |reason: Option<&str>| Event::LocalVeto { group: g("db"), reason: reason.map(str::to_owned) };
    // A healthy group leaving a veto is handed to the best other node (live where possible).
    let handover = Some(Handover { to: n(2), reason: ReleaseReason::Vetoed });
    assert_eq!(
        a.at(1_000, veto(Some("bridge br0 is down"))),
        vec![Command::StopResource { group: g("db"), resource: r("app"), force: false, handover }]
    );
    let (note, reason, rest) = released(&a.stop_db());
    assert_eq!(reason, ReleaseReason::Vetoed);
    assert_eq!((note.failovers, note.failed_on.clone(), note.desired), (0, vec![n(1)], Desired::Started));
    assert_eq!(
        rest,
        vec![Command::Notify(Notice::VetoReleased { group: g("db"), reason: "bridge br0 is down".into() })]
    );
    let st = a.group();
    assert_eq!((st.restarts, st.veto.as_deref()), (0, Some("bridge br0 is down")));
    assert_eq!(st.not_running, Some(NotRunningReason::TakeoverPending));
    // Node 2 gone: it would be the only node, but the veto holds it away.
    assert_eq!(a.at(100_000, Event::NodeLost(n(2))), vec![]);
    assert_eq!(a.at(200_000, Event::Tick), vec![]);
    assert_eq!(a.group().not_running, Some(NotRunningReason::LocalVeto { reason: "bridge br0 is down".into() }));
    // Lifted: a candidate again.
    assert_eq!(a.at(200_100, veto(None)), vec![acquire()]);
    // Peers rank the vetoed node last: node 2 takes the released group at rank 0.
    let (mut b, _) = Node::booted(2, model(db_group(&[1, 2])));
    assert_eq!(b.at(10, Event::LeaseObserved { group: g("db"), holder: None, note: Some(note) }), vec![acquire()]);
}

#[test]
fn a_vetoed_node_acquires_nothing_even_at_rank_zero() {
    let (mut a, cmds) = Node::booted_after(
        1,
        model(db_group(&[1, 2])),
        vec![Event::LocalVeto { group: g("db"), reason: Some("nic".into()) }],
    );
    assert_eq!(cmds, vec![]);
    assert_eq!(a.at(100_000, Event::Tick), vec![]);
    assert_eq!(a.group().not_running, Some(NotRunningReason::TakeoverPending));
}

fn migrated(res: &str, to: u32) -> Event {
    Event::ResourceMigrated { group: g("db"), resource: r(res), to: n(to) }
}

#[test]
fn a_migrated_handover_names_the_target_in_the_note_and_only_the_next_holder_resumes() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2, 3])));
    a.run_db(7);
    // Operator and forced stops hand nothing over.
    assert_eq!(a.ev(op(5, OperatorCommand::MoveGroup { group: g("db"), to: n(3) })), vec![stop_handoff("app", 3)]);
    assert_eq!(a.ev(migrated("app", 3)), vec![stop_handoff("ip", 3)]);
    assert_eq!(a.ev(stopped("ip")), vec![stop_handoff("disk", 3)]);
    let cmds = a.ev(stopped("disk"));
    let (note, reason, _) = released(&cmds);
    assert_eq!(reason, ReleaseReason::Handoff { to: n(3) });
    assert_eq!(note.migrated, Some(Migrated { to: n(3), by_token: LeaseToken(7) }));

    // Node 3, the very next holder (token 8), resumes; its own note forgets the migration.
    let (mut c, _) = Node::booted(3, model(db_group(&[1, 2, 3])));
    let resume =
        |t| Command::StartResource { group: g("db"), resource: r("disk"), token: LeaseToken(t), migrated_in: true };
    c.ev(Event::LeaseObserved { group: g("db"), holder: None, note: Some(note.clone()) });
    assert_eq!(c.ev(acquired(8, Some(note.clone()))), vec![resume(8)]);
    // Every resource of the first start resumes; a restart after a failure starts afresh.
    assert_eq!(
        c.ev(started("disk")),
        vec![Command::StartResource { group: g("db"), resource: r("ip"), token: LeaseToken(8), migrated_in: true }]
    );
    c.ev(started("ip"));
    c.ev(started("app"));
    assert_eq!(c.at(1_000, failed("ip")), vec![stop("ip", false)]);
    assert_eq!(c.ev(stopped("ip")), vec![start("db", "ip", 8)]);
    c.ev(started("ip"));
    assert_eq!(c.ev(op(9, OperatorCommand::StopGroup(g("db")))), vec![stop("app", false)]);
    let (note8, _, _) = released(&c.stop_db());
    assert_eq!(note8.migrated, None, "the next holder's note no longer names a migration");

    // A grant that does not directly follow the migrating holder's (token 9: someone held
    // it in between and died before rewriting the note) starts afresh.
    let free = Event::LeaseObserved { group: g("db"), holder: None, note: Some(note.clone()) };
    let (mut d, _) = Node::booted(3, model(db_group(&[1, 2, 3])));
    assert_eq!(d.ev(free.clone()), vec![acquire()]);
    assert_eq!(d.ev(acquired(9, Some(note.clone()))), vec![start("db", "disk", 9)]);
    // Nor does any other node resume it (node 2 asks once node 3 had its turn).
    let unpinned = LeaseNote { preferred: None, ..note };
    let (mut b, _) = Node::booted(2, model(db_group(&[1, 2, 3])));
    b.ev(Event::LeaseObserved { group: g("db"), holder: None, note: Some(unpinned.clone()) });
    assert_eq!(b.at(60_000, Event::Tick), vec![acquire()]);
    assert_eq!(b.ev(acquired(8, Some(unpinned))), vec![start("db", "disk", 8)]);
}

#[test]
fn the_node_holding_a_migrated_copy_ranks_first() {
    let note = LeaseNote {
        migrated: Some(Migrated { to: n(3), by_token: LeaseToken(4) }),
        ..LeaseNote::initial(&db_group(&[1, 2, 3]))
    };
    // Node 3 is last in the policy order, yet it asks at once; node 1 waits its stagger.
    let free = |note: &LeaseNote| vec![Event::LeaseObserved { group: g("db"), holder: None, note: Some(note.clone()) }];
    let (_, cmds) = Node::booted_after(3, model(db_group(&[1, 2, 3])), free(&note));
    assert_eq!(cmds, vec![acquire()]);
    let (mut a, cmds) = Node::booted_after(1, model(db_group(&[1, 2, 3])), free(&note));
    assert_eq!(cmds, vec![]);
    assert_eq!(a.at(20, Event::Tick), vec![]);
    // Without the migration node 1 goes first, node 3 waits.
    let plain = LeaseNote::initial(&db_group(&[1, 2, 3]));
    let (_, cmds) = Node::booted_after(1, model(db_group(&[1, 2, 3])), free(&plain));
    assert_eq!(cmds, vec![acquire()]);
    let (_, cmds) = Node::booted_after(3, model(db_group(&[1, 2, 3])), free(&plain));
    assert_eq!(cmds, vec![]);
}

#[test]
fn a_standby_move_hands_over_to_the_best_other_node_and_parking_hands_over_nothing() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 3, 2])));
    a.run_db(7);
    assert_eq!(
        a.at(1_000, standby(Some(StandbyMode::Move))),
        vec![standby_notice(Some(StandbyMode::Move)), stop_standby("app", 3)]
    );
    let (mut p, _) = Node::booted(1, model(db_group(&[1, 3, 2])));
    p.run_db(7);
    assert_eq!(
        p.at(1_000, standby(Some(StandbyMode::Park))),
        vec![standby_notice(Some(StandbyMode::Park)), stop("app", false)]
    );
}

#[test]
fn a_batch_whose_events_leave_nothing_to_do_in_between_equals_them_one_by_one() {
    let observed = |holder: u32| Event::LeaseObserved { group: g("db"), holder: Some(n(holder)), note: None };
    let probes: Vec<Event> = ["disk", "ip", "app"]
        .iter()
        .map(|x| Event::ProbeResult { group: g("db"), resource: r(x), running: false })
        .collect();
    let mut one = Engine::new(n(2), model(db_group(&[1, 2]))).unwrap();
    let mut batched = Engine::new(n(2), model(db_group(&[1, 2]))).unwrap();
    assert_eq!(one.startup(0), batched.startup(0));
    let mut cmds = Vec::new();
    for ev in probes.iter().cloned().chain([observed(1), Event::Tick, observed(1)]) {
        cmds.extend(one.handle(100, ev));
    }
    let events = probes.into_iter().chain([observed(1), Event::Tick, observed(1)]).collect();
    assert_eq!(batched.handle_batch(100, events), cmds);
    assert_eq!(format!("{:?}", batched.status()), format!("{:?}", one.status()));
    assert_eq!(one.status().groups[0].location, Some(n(1)));
}

#[test]
fn a_batch_decides_on_the_state_its_last_event_left() {
    let observed = |holder: u32| Event::LeaseObserved { group: g("db"), holder: Some(n(holder)), note: None };
    let (mut one, _) = Node::booted(2, model(db_group(&[1, 2])));
    let (mut batched, _) = Node::booted(2, model(db_group(&[1, 2])));
    one.at(100, observed(1));
    batched.at(100, observed(1));
    // One by one, node 1 lost makes node 2 the first candidate: it asks at once...
    assert_eq!(one.at(200, Event::NodeLost(n(1))), vec![acquire()]);
    // ...while a batch in which node 1 is back and still holding the lease asks nothing.
    let back = vec![Event::NodeLost(n(1)), Event::NodeJoined(n(1)), observed(1)];
    assert_eq!(batched.e.handle_batch(200, back), vec![]);
    assert_eq!(batched.group().location, Some(n(1)));
    assert_eq!(batched.group().state, GroupState::Started);
}

#[test]
fn a_batch_ignores_what_follows_a_self_fence() {
    let (mut a, _) = Node::booted(1, model(db_group(&[1, 2])));
    a.run_db(7);
    a.ev(op(1, OperatorCommand::StopGroup(g("db"))));
    let fail = Event::ResourceStopFailed { group: g("db"), resource: r("app") };
    let batch = vec![fail.clone(), fail, stopped("app"), op(2, OperatorCommand::StartGroup(g("db")))];
    assert_eq!(
        a.e.handle_batch(100, batch),
        vec![stop("app", false), Command::SelfFence { group: g("db"), resource: r("app") }]
    );
    assert!(a.e.status().self_fenced);
    assert_eq!(a.e.handle_batch(200, vec![stopped("app")]), vec![]);
}
