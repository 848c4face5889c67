//! Micro benchmark (no criterion): one engine of a 1,000-group / 10-node cluster with node
//! capacities, anti-affinity and affinity sets, in a steady state where every group runs on
//! its preferred node; then one observation round (a `LeaseObserved` for every group, as the
//! node runtime's lease poller sends them) is fed one event at a time (`Engine::handle`) and,
//! where the engine has it, as one batch (`Engine::handle_batch`).
//!
//! Run: `cargo run --release -p tandem-engine --example scale` (`SCALE_GROUPS`, `SCALE_NODES`,
//! `SCALE_ROUNDS` change the size).

use std::time::Instant;

use tandem_engine::{
    Capacity, ClusterModel, Command, Engine, Event, Failback, FailoverGroup, GroupId, LeaseNote, LeaseToken, NodeId,
    PlacementPolicy, RecoveryPolicy, ResourceSpec, Timing,
};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Group `i` prefers node `i % nodes + 1`, then the next ones; groups `10k..10k+9` are
/// anti-affine (set `apart-k`), groups `i` and `i + partners` share an affinity set.
fn model(groups: usize, nodes: usize) -> ClusterModel {
    let ids: Vec<NodeId> = (1..=nodes as u32).map(NodeId).collect();
    // Every group has partners on its own preferred node and elsewhere.
    let partners = (groups / nodes / 2).max(1);
    let groups = (0..groups)
        .map(|i| {
            let eligible = (0..nodes).map(|k| ids[(i + k) % nodes]).collect();
            let mut g = FailoverGroup::new(
                GroupId(format!("g{i:04}")),
                vec![ResourceSpec::new("vm")],
                PlacementPolicy {
                    eligible,
                    failback: Failback::Manual,
                    start_on_cluster_start: true,
                    require_fencing: false,
                },
                RecoveryPolicy::default(),
            );
            g.demand = Capacity::new(1_024, 2);
            g.anti_affinity = vec![format!("apart-{}", i / 10)];
            g.affinity = vec![format!("near-{}", i % partners)];
            g
        })
        .collect();
    let mut m = ClusterModel::new(ids.clone(), groups, Timing::default());
    for n in ids {
        // Room for 1.5 times the groups each node runs in the steady state.
        m.capacity.insert(n, Capacity::new(1_024 * 150, 300));
    }
    m
}

/// Answers the engine's commands the way the runtime would, at once, until it is quiet.
fn settle(e: &mut Engine, now: u64, mut cmds: Vec<Command>, next_token: &mut u64) {
    while !cmds.is_empty() {
        let mut events = Vec::new();
        for c in cmds {
            match c {
                Command::AcquireLease { group } => {
                    *next_token += 1;
                    events.push(Event::LeaseAcquired { group, token: LeaseToken(*next_token), note: None });
                }
                Command::StartResource { group, resource, .. } => {
                    events.push(Event::ResourceStarted { group, resource })
                }
                Command::StopResource { group, resource, .. } => {
                    events.push(Event::ResourceStopped { group, resource })
                }
                Command::ProbeResource { group, resource } => {
                    events.push(Event::ProbeResult { group, resource, running: false })
                }
                _ => {}
            }
        }
        cmds = Vec::new();
        for ev in events {
            cmds.extend(e.handle(now, ev));
        }
    }
}

fn observations(m: &ClusterModel, nodes: usize, note: &LeaseNote) -> Vec<Event> {
    m.groups
        .iter()
        .enumerate()
        .map(|(i, g)| Event::LeaseObserved {
            group: g.id.clone(),
            holder: Some(NodeId((i % nodes) as u32 + 1)),
            note: Some(note.clone()),
        })
        .collect()
}

/// An engine for node 1 in the steady state: every group held by its preferred node.
fn steady(m: &ClusterModel, nodes: usize, note: &LeaseNote) -> Engine {
    let mut e = Engine::new(NodeId(1), m.clone()).expect("valid model");
    let mut token = 0;
    // Peers' groups are seen held before the probes finish (cheap: nothing is evaluated
    // while probing); this node's own groups are free and taken.
    let now = 1_000;
    for ev in observations(m, nodes, note) {
        if let Event::LeaseObserved { holder: Some(NodeId(1)), .. } = ev {
            continue;
        }
        e.handle(now, ev);
    }
    let cmds = e.startup(now);
    settle(&mut e, now, cmds, &mut token);
    let mine = e.status().groups.iter().filter(|g| g.location == Some(NodeId(1))).count();
    assert_eq!(mine, m.groups.len().div_ceil(nodes), "the steady state was not reached");
    e
}

/// Feeds `events` one by one or in one batch; prints and returns the time per event.
fn feed(e: &mut Engine, now: u64, events: &[Event], batch: bool, label: &str) -> f64 {
    let t = Instant::now();
    let cmds = if batch {
        e.handle_batch(now, events.to_vec()).len()
    } else {
        events.iter().map(|ev| e.handle(now, ev.clone()).len()).sum()
    };
    let el = t.elapsed().as_secs_f64();
    let per = el * 1e6 / events.len() as f64;
    let how = if batch { "handle_batch" } else { "handle" };
    println!(
        "{label:<28} {how:<12} {:>5} events in {:>10.3} ms = {per:>10.1} us/event ({cmds} commands)",
        events.len(),
        el * 1e3
    );
    per
}

fn main() {
    let groups = env("SCALE_GROUPS", 1_000);
    let nodes = env("SCALE_NODES", 10);
    let rounds = env("SCALE_ROUNDS", 3);
    let m = model(groups, nodes);
    let note = LeaseNote::initial(&m.groups[0]);
    let t0 = Instant::now();
    let mut e = steady(&m, nodes, &note);
    println!(
        "setup: {groups} groups, {nodes} nodes, {} groups on node-1, {:.2} s",
        groups.div_ceil(nodes),
        t0.elapsed().as_secs_f64()
    );
    let round = observations(&m, nodes, &note);
    for batch in [false, true] {
        for r in 0..rounds {
            feed(&mut e, 2_000 + r as u64 * 500, &round, batch, &format!("steady round {r}"));
        }
    }
    let t = Instant::now();
    let status = e.status();
    println!("status(): {:.3} ms for {} groups", t.elapsed().as_secs_f64() * 1e3, status.groups.len());

    // Node 2 is lost and its host lease dead: its groups are free, and every event
    // evaluates where they go (node 1 ranks last for them: it only watches).
    for batch in [false, true] {
        let mut e = steady(&m, nodes, &note);
        let lost = [Event::NodeLost(NodeId(2)), Event::PeerFenced(NodeId(2))];
        feed(&mut e, 10_000, &lost, batch, "node-2 lost");
        for r in 0..rounds {
            feed(&mut e, 10_100 + r as u64 * 500, &round, batch, &format!("node-2 lost, round {r}"));
        }
    }
}
