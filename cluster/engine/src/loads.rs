//! What is active on each node, kept up to date group by group, so that placement asks
//! "what runs on node n besides group g" in time independent of the number of groups.
//!
//! The engine decides where each group counts as active (this node's own state, the
//! observed lease holder for peers) and tells [`Loads::set`] after every change; the
//! queries then subtract the asking group's own contribution. Debug builds compare the
//! tables with a full recomputation after every event (`Engine::check_loads`).

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{Capacity, ClusterModel, NodeId};

/// The nodes (by position in the model's node list) a group counts as active on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counted {
    /// On this engine's node.
    here: bool,
    /// On a peer (the observed holder of a lease this node does not hold).
    peer: Option<usize>,
}

/// The groups active on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NodeLoad {
    /// Summed demand; wide enough never to saturate, so that removing a group is exact.
    memory_mib: u128,
    vcpus: u64,
    /// By anti-affinity set id: the groups of that set active here.
    anti: Vec<BTreeSet<usize>>,
    /// By affinity set id: the groups of that set active here.
    aff: Vec<BTreeSet<usize>>,
}

/// Per-node loads of a cluster model, as seen by the engine of node `me`.
#[derive(Debug, Clone)]
pub(crate) struct Loads {
    me: usize,
    pos: BTreeMap<NodeId, usize>,
    /// Per group: its anti-affinity sets, as ids, in the group's own order.
    anti_ids: Vec<Vec<usize>>,
    /// Per group: its affinity sets, as ids.
    aff_ids: Vec<Vec<usize>>,
    /// Per group: its demand.
    demand: Vec<Capacity>,
    nodes: Vec<NodeLoad>,
    counted: Vec<Counted>,
}

fn set_ids<'a>(lists: impl Iterator<Item = &'a Vec<String>>) -> (Vec<Vec<usize>>, usize) {
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let ids = lists
        .map(|list| {
            list.iter()
                .map(|s| {
                    let next = names.len();
                    *names.entry(s.as_str()).or_insert(next)
                })
                .collect()
        })
        .collect();
    (ids, names.len())
}

impl Loads {
    /// Empty tables (no group active anywhere) for `model` seen from node `me`.
    pub(crate) fn new(model: &ClusterModel, me: NodeId) -> Self {
        let pos: BTreeMap<NodeId, usize> = model.nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let (anti_ids, n_anti) = set_ids(model.groups.iter().map(|g| &g.anti_affinity));
        let (aff_ids, n_aff) = set_ids(model.groups.iter().map(|g| &g.affinity));
        let node = NodeLoad {
            memory_mib: 0,
            vcpus: 0,
            anti: vec![BTreeSet::new(); n_anti],
            aff: vec![BTreeSet::new(); n_aff],
        };
        Loads {
            me: pos.get(&me).copied().unwrap_or(0),
            pos,
            anti_ids,
            aff_ids,
            demand: model.groups.iter().map(|g| g.demand).collect(),
            nodes: vec![node; model.nodes.len()],
            counted: vec![Counted::default(); model.groups.len()],
        }
    }

    /// Group `gi` is now active here (`here`) and/or on the peer `peer` (a node outside
    /// the model counts nowhere: placement never asks about it).
    pub(crate) fn set(&mut self, gi: usize, here: bool, peer: Option<NodeId>) {
        let new = Counted { here, peer: peer.and_then(|p| self.pos.get(&p).copied()).filter(|p| *p != self.me) };
        let old = self.counted[gi];
        if new == old {
            return;
        }
        let me = self.me;
        let on = move |c: Counted| c.here.then_some(me).into_iter().chain(c.peer);
        for p in on(old).filter(|p| !on(new).any(|q| q == *p)).collect::<Vec<_>>() {
            self.remove(gi, p);
        }
        for p in on(new).filter(|p| !on(old).any(|q| q == *p)).collect::<Vec<_>>() {
            self.add(gi, p);
        }
        self.counted[gi] = new;
    }

    fn add(&mut self, gi: usize, p: usize) {
        let d = self.demand[gi];
        let node = &mut self.nodes[p];
        node.memory_mib += u128::from(d.memory_mib);
        node.vcpus += u64::from(d.vcpus);
        for s in &self.anti_ids[gi] {
            node.anti[*s].insert(gi);
        }
        for s in &self.aff_ids[gi] {
            node.aff[*s].insert(gi);
        }
    }

    fn remove(&mut self, gi: usize, p: usize) {
        let d = self.demand[gi];
        let node = &mut self.nodes[p];
        node.memory_mib -= u128::from(d.memory_mib);
        node.vcpus -= u64::from(d.vcpus);
        for s in &self.anti_ids[gi] {
            node.anti[*s].remove(&gi);
        }
        for s in &self.aff_ids[gi] {
            node.aff[*s].remove(&gi);
        }
    }

    fn counts_on(&self, gi: usize, p: usize) -> bool {
        let c = self.counted[gi];
        (c.here && p == self.me) || c.peer == Some(p)
    }

    /// The summed demand of the groups other than `gi` active on `n`, saturated as
    /// `Capacity`'s sum is.
    pub(crate) fn used_by_others(&self, gi: usize, n: NodeId) -> Capacity {
        let Some(&p) = self.pos.get(&n) else { return Capacity::ZERO };
        let node = &self.nodes[p];
        let (mut memory, mut vcpus) = (node.memory_mib, node.vcpus);
        if self.counts_on(gi, p) {
            memory -= u128::from(self.demand[gi].memory_mib);
            vcpus -= u64::from(self.demand[gi].vcpus);
        }
        Capacity {
            memory_mib: u64::try_from(memory).unwrap_or(u64::MAX),
            vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
        }
    }

    /// The lowest-index group other than `gi` active on `n` that shares an anti-affinity
    /// set with `gi`.
    pub(crate) fn anti_affine_on(&self, gi: usize, n: NodeId) -> Option<usize> {
        let p = *self.pos.get(&n)?;
        let node = &self.nodes[p];
        self.anti_ids[gi].iter().filter_map(|s| node.anti[*s].iter().copied().find(|gj| *gj != gi)).min()
    }

    /// Whether a group other than `gi` sharing an affinity set with it is active on `n`.
    pub(crate) fn partner_on(&self, gi: usize, n: NodeId) -> bool {
        let Some(&p) = self.pos.get(&n) else { return false };
        let node = &self.nodes[p];
        self.aff_ids[gi].iter().any(|s| node.aff[*s].iter().any(|gj| *gj != gi))
    }

    /// Where the tables differ from `other` (built from scratch), if they do.
    #[cfg(any(test, debug_assertions))]
    pub(crate) fn diff(&self, other: &Loads) -> Option<String> {
        if let Some(gi) = (0..self.counted.len()).find(|gi| self.counted[*gi] != other.counted[*gi]) {
            return Some(format!("group {gi} counted {:?}, recomputed {:?}", self.counted[gi], other.counted[gi]));
        }
        let p = (0..self.nodes.len()).find(|p| self.nodes[*p] != other.nodes[*p])?;
        Some(format!("node at {p}: kept {:?}, recomputed {:?}", self.nodes[p], other.nodes[p]))
    }
}
