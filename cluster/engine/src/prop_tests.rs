//! Property tests over random event sequences.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use crate::tests::{db_group, n};
use crate::*;

fn two_group_model() -> ClusterModel {
    let mut web = db_group(&[2, 1, 3]);
    web.id = "web".into();
    web.resources = vec![ResourceSpec::new("vip"), ResourceSpec::depending_on("nginx", &["vip"])];
    web.recovery.final_action = FinalAction::DoNothing;
    let mut db = db_group(&[1, 2]);
    db.placement.require_fencing = true;
    db.monitor_recovery.insert("sql".into(), RestartLimit { max_restarts: 2, restart_window_ms: 5_000 });
    ClusterModel::new(vec![n(1), n(2), n(3)], vec![db, web], Timing::default())
}

/// The two groups with placement rules: `1`, node 1 has room for one of them only; `2`, they
/// are anti-affine; `3`, both; anything else, none.
fn placed_model(rules: u8) -> ClusterModel {
    let mut m = two_group_model();
    if rules & 1 != 0 {
        m.capacity.insert(n(1), Capacity::new(4_096, 4));
        m.groups[0].demand = Capacity::new(3_072, 2);
        m.groups[1].demand = Capacity::new(2_048, 2);
        m.groups[1].priority = 5;
    }
    if rules & 2 != 0 {
        m.groups[0].anti_affinity = vec!["apart".into()];
        m.groups[1].anti_affinity = vec!["apart".into(), "other".into()];
    }
    m
}

const GROUPS: [&str; 3] = ["db", "web", "nope"];
const RESOURCES: [&str; 6] = ["disk", "ip", "app", "vip", "nginx", "x"];

fn pick<T: Copy>(xs: &[T], b: u8) -> T {
    xs[b as usize % xs.len()]
}

fn operator(a: u8, b: u8) -> OperatorCommand {
    let group: GroupId = pick(&GROUPS, b).into();
    match a % 6 {
        0 => OperatorCommand::StartGroup(group),
        1 => OperatorCommand::StopGroup(group),
        2 => OperatorCommand::MoveGroup { group, to: n(u32::from(b % 4)) },
        3 => OperatorCommand::ResetCounters(group),
        4 => OperatorCommand::SuspendMonitoring(group),
        _ => OperatorCommand::ResumeMonitoring(group),
    }
}

/// Any event at all, including ones that make no sense (unknown names, answers nobody
/// asked for, duplicates).
fn arbitrary_event(kind: u8, a: u8, b: u8) -> Event {
    let group: GroupId = pick(&GROUPS, a).into();
    let resource: ResourceId = pick(&RESOURCES, b).into();
    let node = n(u32::from(b % 4));
    let note = (a % 3 == 0).then(|| LeaseNote {
        failovers: u32::from(b % 3),
        failed_on: vec![node],
        migrated: (b % 2 == 0).then_some(crate::Migrated { to: node, by_token: LeaseToken(u64::from(a)) }),
        ..LeaseNote::initial(&db_group(&[1]))
    });
    match kind % 22 {
        0 => Event::ProbeResult { group, resource, running: b % 2 == 0 },
        1 => Event::ResourceStarted { group, resource },
        2 => Event::ResourceStartFailed { group, resource },
        3 => Event::ResourceStopped { group, resource },
        4 => Event::ResourceStopFailed { group, resource },
        5 => Event::MonitorFailed { group, resource, monitor: (b % 2 == 0).then(|| "sql".into()) },
        6 => Event::LeaseAcquired { group, token: LeaseToken(u64::from(b)), note },
        7 => Event::LeaseAcquireFailed { group, holder: (b % 3 != 0).then_some(node) },
        8 => Event::LeaseLost { group },
        9 => Event::LeaseObserved { group, holder: (b % 2 == 0).then_some(node), note },
        10 => Event::NodeJoined(node),
        11 => Event::NodeLost(node),
        12 => Event::PeerFenced(node),
        13 => Event::FenceConfirmed(node),
        14 => Event::QuorumLost,
        15 => Event::QuorumRegained,
        16 => Event::Operator { seq: u64::from(a), command: operator(a, b) },
        17 => Event::SetStandby(match b % 3 {
            0 => None,
            1 => Some(StandbyMode::Move),
            _ => Some(StandbyMode::Park),
        }),
        18 => Event::PeerStandby { node, standby: a % 2 == 0 },
        19 => Event::LocalVeto { group, reason: (b % 2 == 0).then(|| "veto".to_owned()) },
        20 => Event::ResourceMigrated { group, resource, to: node },
        _ => Event::Tick,
    }
}

/// Tokens the engine may use per group, learned from the events it was fed.
#[derive(Default)]
struct LeaseBook(BTreeMap<GroupId, BTreeSet<LeaseToken>>);

impl LeaseBook {
    fn saw(&mut self, e: &Event) {
        match e {
            Event::LeaseAcquired { group, token, .. } => {
                self.0.entry(group.clone()).or_default().insert(*token);
            }
            Event::LeaseLost { group } => {
                self.0.remove(group);
            }
            _ => {}
        }
    }

    fn check(&mut self, c: &Command) -> Result<(), TestCaseError> {
        match c {
            Command::StartResource { group, token, .. } => {
                prop_assert!(
                    self.0.get(group).is_some_and(|t| t.contains(token)),
                    "StartResource with token {token:?} not held for {group}"
                );
            }
            Command::ReleaseLease { group, .. } => {
                self.0.remove(group);
            }
            _ => {}
        }
        Ok(())
    }
}

/// Feeds `ev` one by one, or (with a queue) queues it and hands the queue over as one
/// batch when `flush`; `None` while the event waits in the queue.
fn feed(e: &mut Engine, now: u64, ev: Event, queue: Option<&mut Vec<Event>>, flush: bool) -> Option<Vec<Command>> {
    match queue {
        None => Some(e.handle(now, ev)),
        Some(q) => {
            q.push(ev);
            flush.then(|| e.handle_batch(now, std::mem::take(q)))
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_events_never_panic_nor_start_without_the_lease(
        rules in 0u8..4,
        batched in any::<bool>(),
        steps in prop::collection::vec((any::<u8>(), any::<u8>(), any::<u8>(), 0u64..5_000), 0..400)
    ) {
        let mut e = Engine::new(n(1), placed_model(rules)).unwrap();
        let mut book = LeaseBook::default();
        let mut now = 0;
        for c in e.startup(0) {
            book.check(&c)?;
        }
        // Batched: events queue up and reach the engine in `handle_batch` now and then.
        let mut queued = Vec::new();
        let last = steps.len().saturating_sub(1);
        for (i, (kind, a, b, dt)) in steps.into_iter().enumerate() {
            now += dt;
            let ev = arbitrary_event(kind, a, b);
            book.saw(&ev);
            let Some(cmds) = feed(&mut e, now, ev, batched.then_some(&mut queued), (a ^ b) % 3 == 0 || i == last)
            else {
                continue;
            };
            for c in cmds {
                book.check(&c)?;
            }
            let _ = e.status();
        }
    }

    #[test]
    fn with_a_faithful_runtime_order_lease_and_placement_rules_hold(
        rules in 0u8..4,
        batched in any::<bool>(),
        steps in prop::collection::vec((any::<u8>(), any::<u8>(), any::<u8>(), 0u64..3_000), 0..400)
    ) {
        let model = placed_model(rules);
        let mut rt = FaithfulRuntime::new(model.clone());
        let mut e = Engine::new(n(1), model).unwrap();
        let cmds = e.startup(0);
        rt.accept(cmds)?;
        let mut now = 0;
        let mut seq = 0;
        // Batched: events (answers included) queue up and reach the engine in
        // `handle_batch` now and then.
        let mut queued = Vec::new();
        let last = steps.len().saturating_sub(1);
        for (i, (kind, a, b, dt)) in steps.into_iter().enumerate() {
            now += dt;
            let ev = if kind % 3 != 0 && !rt.pending.is_empty() {
                // Two steps in three answer a pending command.
                let i = usize::from(a) % rt.pending.len();
                let cmd = rt.pending.remove(i);
                match rt.execute(cmd, b) {
                    Some(ev) => ev,
                    None => continue,
                }
            } else {
                let group: GroupId = pick(&GROUPS[..2], a).into();
                let node = n(u32::from(b % 3) + 1);
                match kind % 11 {
                    0 | 1 => {
                        let g = &rt.model.groups[usize::from(a) % 2];
                        Event::MonitorFailed {
                            group: g.id.clone(),
                            resource: g.resources[usize::from(b) % g.resources.len()].id.clone(),
                            monitor: (b % 2 == 0).then(|| "sql".into()),
                        }
                    }
                    2 if rt.held.contains_key(&group) => {
                        rt.held.remove(&group);
                        Event::LeaseLost { group }
                    }
                    3 => Event::LeaseObserved { group, holder: (b % 2 == 0).then_some(node), note: None },
                    4 => Event::NodeLost(node),
                    5 => Event::NodeJoined(node),
                    6 => if b % 2 == 0 { Event::QuorumLost } else { Event::QuorumRegained },
                    7 | 8 => {
                        seq += 1;
                        Event::Operator { seq, command: operator(a, b) }
                    }
                    9 => Event::PeerFenced(node),
                    10 if a % 4 == 0 => Event::SetStandby([None, Some(StandbyMode::Move), Some(StandbyMode::Park)][usize::from(b) % 3]),
                    10 if a % 4 == 1 => Event::PeerStandby { node, standby: b % 2 == 0 },
                    10 if a % 4 == 2 => Event::LocalVeto { group, reason: (b % 2 == 0).then(|| "veto".to_owned()) },
                    _ => Event::Tick,
                }
            };
            let Some(cmds) = feed(&mut e, now, ev, batched.then_some(&mut queued), (a ^ b) % 3 == 0 || i == last)
            else {
                continue;
            };
            rt.accept(cmds)?;
        }
        if !queued.is_empty() {
            rt.accept(e.handle_batch(now, queued))?;
        }
    }
}

/// A runtime that does exactly what it is told and checks each command against the truth.
struct FaithfulRuntime {
    model: ClusterModel,
    running: BTreeSet<(GroupId, usize)>,
    held: BTreeMap<GroupId, LeaseToken>,
    next_token: u64,
    pending: Vec<Command>,
}

impl FaithfulRuntime {
    fn new(model: ClusterModel) -> Self {
        FaithfulRuntime { model, running: BTreeSet::new(), held: BTreeMap::new(), next_token: 1, pending: Vec::new() }
    }

    fn index(&self, group: &GroupId, resource: &ResourceId) -> (usize, usize) {
        let gi = self.model.groups.iter().position(|g| &g.id == group).unwrap();
        let ri = self.model.groups[gi].resources.iter().position(|r| &r.id == resource).unwrap();
        (gi, ri)
    }

    fn accept(&mut self, cmds: Vec<Command>) -> Result<(), TestCaseError> {
        for c in cmds {
            match &c {
                Command::StartResource { group, resource, token, .. } => {
                    prop_assert_eq!(self.held.get(group), Some(token), "start of {} without its lease", resource);
                    self.check_placement(group)?;
                    let (gi, ri) = self.index(group, resource);
                    for d in &self.model.groups[gi].resources[ri].depends_on {
                        let (_, di) = self.index(group, d);
                        prop_assert!(self.running.contains(&(group.clone(), di)), "{} started before {}", resource, d);
                    }
                }
                Command::StopResource { group, resource, .. } => {
                    let (gi, ri) = self.index(group, resource);
                    for j in self.model.groups[gi].dependents_of(ri) {
                        prop_assert!(
                            !self.running.contains(&(group.clone(), j)),
                            "{} stopped while its dependent {} runs",
                            resource,
                            self.model.groups[gi].resources[j].id
                        );
                    }
                }
                Command::ReleaseLease { group, token, .. } => {
                    prop_assert!(
                        !self.running.iter().any(|(g, _)| g == group),
                        "lease of {} released while resources run",
                        group
                    );
                    prop_assert_eq!(self.held.get(group), Some(token));
                    self.held.remove(group);
                    continue;
                }
                Command::SelfFence { .. } => {
                    self.running.clear();
                    self.held.clear();
                    self.pending.clear();
                    continue;
                }
                _ => {}
            }
            self.pending.push(c);
        }
        Ok(())
    }

    /// Node 1's hard placement rules, on the truth: the groups with something running or
    /// starting there, plus `group`, fit its capacity and are not anti-affine.
    fn check_placement(&self, group: &GroupId) -> Result<(), TestCaseError> {
        let mut active: BTreeSet<&GroupId> = self.running.iter().map(|(g, _)| g).collect();
        active.extend(self.pending.iter().filter_map(|c| match c {
            Command::StartResource { group, .. } => Some(group),
            _ => None,
        }));
        active.insert(group);
        let groups: Vec<&FailoverGroup> = self.model.groups.iter().filter(|g| active.contains(&g.id)).collect();
        if let Some(cap) = self.model.capacity.get(&n(1)) {
            let used = groups.iter().fold(Capacity::ZERO, |sum, g| sum + g.demand);
            prop_assert!(cap.fits(&used), "{:?} active on node 1 need {}, over its capacity {}", active, used, cap);
        }
        for (i, a) in groups.iter().enumerate() {
            for b in &groups[i + 1..] {
                prop_assert!(
                    !a.anti_affinity.iter().any(|s| b.anti_affinity.contains(s)),
                    "anti-affine {} and {} active on node 1",
                    a.id,
                    b.id
                );
            }
        }
        Ok(())
    }

    fn execute(&mut self, c: Command, coin: u8) -> Option<Event> {
        let ok = coin % 5 != 0;
        Some(match c {
            Command::ProbeResource { group, resource } => {
                let (_, ri) = self.index(&group, &resource);
                let running = self.running.contains(&(group.clone(), ri));
                Event::ProbeResult { group, resource, running }
            }
            Command::StartResource { group, resource, .. } => {
                let (_, ri) = self.index(&group, &resource);
                if ok {
                    self.running.insert((group.clone(), ri));
                    Event::ResourceStarted { group, resource }
                } else {
                    Event::ResourceStartFailed { group, resource }
                }
            }
            Command::StopResource { group, resource, handover, .. } => {
                let (_, ri) = self.index(&group, &resource);
                if ok {
                    self.running.remove(&(group.clone(), ri));
                    match handover {
                        // A handover may move the resource's state instead of stopping it.
                        Some(h) if coin % 2 == 0 => Event::ResourceMigrated { group, resource, to: h.to },
                        _ => Event::ResourceStopped { group, resource },
                    }
                } else {
                    Event::ResourceStopFailed { group, resource }
                }
            }
            Command::AcquireLease { group } => {
                if ok && !self.held.contains_key(&group) {
                    let token = LeaseToken(self.next_token);
                    self.next_token += 1;
                    self.held.insert(group.clone(), token);
                    Event::LeaseAcquired { group, token, note: None }
                } else {
                    Event::LeaseAcquireFailed { group, holder: Some(n(2)) }
                }
            }
            Command::AdoptResource { .. } => return None,
            Command::RequestFence { node } => Event::FenceConfirmed(node),
            _ => return None,
        })
    }
}

/// The checkers above can fail: each rejects the command sequence it exists to catch.
#[test]
fn the_property_checkers_reject_what_they_guard_against() {
    let start = |token| Command::StartResource {
        group: "db".into(),
        resource: "app".into(),
        token: LeaseToken(token),
        migrated_in: false,
    };
    let mut book = LeaseBook::default();
    assert!(book.check(&start(1)).is_err(), "a start without any grant must be rejected");
    book.saw(&Event::LeaseAcquired { group: "db".into(), token: LeaseToken(1), note: None });
    assert!(book.check(&start(1)).is_ok());
    book.saw(&Event::LeaseLost { group: "db".into() });
    assert!(book.check(&start(1)).is_err(), "a start after LeaseLost must be rejected");

    let mut rt = FaithfulRuntime::new(two_group_model());
    rt.held.insert("db".into(), LeaseToken(1));
    // app needs disk, which does not run.
    assert!(rt.accept(vec![start(1)]).is_err());
    let mut rt = FaithfulRuntime::new(two_group_model());
    rt.held.insert("db".into(), LeaseToken(1));
    rt.running.insert(("db".into(), 0));
    rt.running.insert(("db".into(), 2));
    // disk stops while app, which needs it, runs.
    let stop_disk = Command::StopResource { group: "db".into(), resource: "disk".into(), force: false, handover: None };
    assert!(rt.accept(vec![stop_disk]).is_err());
    let release = Command::ReleaseLease {
        group: "db".into(),
        token: LeaseToken(1),
        note: LeaseNote::initial(&db_group(&[1])),
        reason: ReleaseReason::Stopped,
    };
    assert!(rt.accept(vec![release]).is_err(), "a release while resources run must be rejected");
    // web starts while db runs on an anti-affine / too small node 1.
    for rules in [1, 2] {
        let mut rt = FaithfulRuntime::new(placed_model(rules));
        rt.running.insert(("db".into(), 0));
        rt.held.insert("web".into(), LeaseToken(1));
        let start_vip = Command::StartResource {
            group: "web".into(),
            resource: "vip".into(),
            token: LeaseToken(1),
            migrated_in: false,
        };
        assert!(rt.accept(vec![start_vip]).is_err(), "placement rules {rules} must be enforced by the checker");
    }
}
