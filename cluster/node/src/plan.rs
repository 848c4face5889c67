//! From a checked configuration to what the agent runs on one node: the engine's cluster
//! model, the membership configuration, the lease settings and the names under which each
//! group's lease lives on the lease disk. Pure: no I/O.

use std::net::SocketAddr;
use std::time::Duration;

use tandem_config::ClusterConfig;
use tandem_engine::{
    Capacity, ClusterModel, Failback, FailoverGroup, FinalAction, GroupId, NodeId, PlacementPolicy, RecoveryPolicy,
    ResourceSpec, RestartLimit, Timing,
};
use tandem_membership::{MembershipConfig, NodeConfig};

/// The prefix of a group's resource lease name (`g:<group>`), so group names can never
/// collide with the agent's own leases (the quorum tie-break lease).
pub const GROUP_LEASE_PREFIX: &str = "g:";
/// The tie-break lease of two-node clusters (see docs/membership.md).
pub const QUORUM_LEASE: &str = "tandem:quorum";
/// The first UDP port of the heartbeat links when a link sets none.
pub const DEFAULT_HEARTBEAT_PORT: u16 = 7790;

/// Why a configuration cannot run on this node.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// `--node` names no configured node.
    #[error("node `{0}` is not in the configuration's [[node]] list; pass one of the configured names with --node")]
    UnknownNode(String),
    /// The configuration has no `[lease]` section; the agent never starts a group without a lease.
    #[error(
        "the configuration has no [lease] section; tandem-guest runs every group under a disk-fencing lease, so configure a lease device"
    )]
    NoLease,
    /// The engine refused the derived model.
    #[error("the failover groups cannot be run")]
    Model(#[from] tandem_engine::ModelError),
    /// The membership layer refused the derived configuration.
    #[error("the heartbeat configuration cannot be run")]
    Membership(#[from] tandem_membership::ConfigError),
}

/// Everything one node's agent derives from the configuration.
#[derive(Debug, Clone)]
pub struct Plan {
    /// This node.
    pub me: NodeId,
    /// This node's name.
    pub my_name: String,
    /// The engine's model.
    pub model: ClusterModel,
    /// The membership configuration.
    pub membership: MembershipConfig,
    /// Node names by id.
    pub names: Vec<(NodeId, String)>,
}

impl Plan {
    /// Derives the plan of node `node` from a checked configuration.
    pub fn new(config: &ClusterConfig, node: &str) -> Result<Plan, PlanError> {
        let me_cfg = config.node(node).ok_or_else(|| PlanError::UnknownNode(node.to_string()))?;
        let lease = config.lease.as_ref().ok_or(PlanError::NoLease)?;
        let me = NodeId(me_cfg.id);
        let id_of = |name: &str| config.node(name).map(|n| NodeId(n.id));

        let groups = config
            .groups
            .iter()
            .map(|g| {
                let eligible: Vec<NodeId> = g.nodes.iter().filter_map(|n| id_of(n)).collect();
                FailoverGroup {
                    id: GroupId(g.name.clone()),
                    resources: g
                        .resources
                        .iter()
                        .map(|r| ResourceSpec {
                            id: r.name.as_str().into(),
                            depends_on: r.depends_on.iter().map(|d| d.as_str().into()).collect(),
                        })
                        .collect(),
                    placement: PlacementPolicy {
                        require_fencing: crate::fence::group_requires_fencing(config, g),
                        eligible,
                        failback: match g.failback {
                            tandem_config::Failback::Auto => Failback::Auto,
                            tandem_config::Failback::Manual => Failback::Manual,
                        },
                        start_on_cluster_start: g.autostart,
                    },
                    recovery: RecoveryPolicy {
                        max_restarts: g.restart_limit,
                        restart_window_ms: ms(g.restart_window),
                        max_failovers: g.failover_limit,
                        failover_window_ms: ms(g.failover_window),
                        final_action: match g.final_action {
                            tandem_config::FinalAction::Stop => FinalAction::StopEverywhere,
                            tandem_config::FinalAction::None => FinalAction::DoNothing,
                        },
                        ..RecoveryPolicy::default()
                    },
                    // An absent demand is none here; only the host agent derives one (from a
                    // VM's domain definition).
                    demand: g.demand.map_or(Capacity::ZERO, |c| Capacity::new(c.memory_mib, c.vcpus)),
                    priority: g.priority,
                    affinity: g.affinity.clone(),
                    anti_affinity: g.anti_affinity.clone(),
                    monitor_recovery: g
                        .monitors
                        .iter()
                        .filter(|m| m.restart_limit.is_some() || m.restart_window.is_some())
                        .map(|m| {
                            let limit = RestartLimit {
                                max_restarts: m.restart_limit.unwrap_or(g.restart_limit),
                                restart_window_ms: ms(m.restart_window.unwrap_or(g.restart_window)),
                            };
                            (m.name.clone(), limit)
                        })
                        .collect(),
                }
            })
            .collect();
        let timeouts = lease.timeouts();
        // Candidates for a free lease ask one after another, most preferred first; one
        // renewal interval apart is enough for the first one's acquisition to be visible.
        let timing = Timing {
            takeover_stagger_ms: timeouts.renewal_ms.max(200),
            acquire_retry_ms: timeouts.renewal_ms.max(200),
        };
        let mut model = ClusterModel::new(config.nodes.iter().map(|n| NodeId(n.id)).collect(), groups, timing);
        model.capacity = config
            .nodes
            .iter()
            .filter_map(|n| n.capacity.map(|c| (NodeId(n.id), Capacity::new(c.memory_mib, c.vcpus))))
            .collect();
        model.validate()?;

        let links: Vec<String> = config.links.iter().map(|l| l.name.clone()).collect();
        let port_of = |i: usize| config.links[i].port;
        let membership = MembershipConfig {
            this_node: tandem_membership::NodeId(me.0),
            nodes: config
                .nodes
                .iter()
                .map(|n| NodeConfig {
                    id: tandem_membership::NodeId(n.id),
                    votes: n.votes,
                    addresses: links
                        .iter()
                        .enumerate()
                        .filter_map(|(i, l)| n.links.get(l).map(|ip| SocketAddr::new(*ip, port_of(i))))
                        .collect(),
                })
                .collect(),
            links,
            // One interval and one timeout for every link: the core judges a peer by all
            // links together. The fastest interval and the slowest timeout are the safe pair.
            heartbeat_interval_ms: config.links.iter().map(|l| ms(l.interval)).min().unwrap_or(1000),
            link_timeout_ms: config.links.iter().map(|l| ms(l.timeout)).max().unwrap_or(5000),
            lease_disk: true,
            ping_targets: config.cluster.ping_targets.clone(),
        };
        membership.validate()?;
        membership.validate_against_lease(timeouts.host_dead_ms)?;

        Ok(Plan {
            me,
            my_name: node.to_string(),
            model,
            membership,
            names: config.nodes.iter().map(|n| (NodeId(n.id), n.name.clone())).collect(),
        })
    }

    /// The name of a node, or `node-<id>` for an id the configuration does not know.
    pub fn name_of(&self, id: NodeId) -> String {
        self.names.iter().find(|(n, _)| *n == id).map_or_else(|| id.to_string(), |(_, s)| s.clone())
    }

    /// The id of a node name.
    pub fn id_of(&self, name: &str) -> Option<NodeId> {
        self.names.iter().find(|(_, s)| s == name).map(|(n, _)| *n)
    }
}

/// The lease name of a group.
pub fn group_lease(group: &GroupId) -> String {
    format!("{GROUP_LEASE_PREFIX}{}", group.0)
}

/// The group a lease name belongs to, if it is a group lease.
pub fn lease_group(name: &str) -> Option<GroupId> {
    name.strip_prefix(GROUP_LEASE_PREFIX).map(|g| GroupId(g.to_string()))
}

fn ms(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}
