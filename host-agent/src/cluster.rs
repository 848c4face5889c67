//! What a host cluster configuration must hold beyond what `tandem-config` checks: every
//! host names its hypervisor, every failover group is one VM, and every VM's domain XML
//! loads and carries a UUID no other VM uses.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tandem_config::{ClusterConfig, ResourceKind};

use crate::vm::{Attachment, VmDefinition, VmError};

/// One HA VM of the cluster: its group and its definition.
#[derive(Debug, Clone)]
pub struct HaVm {
    /// The failover group (named like the VM in the configuration).
    pub group: String,
    /// The group's only resource (`kind = "vm"`).
    pub resource: String,
    /// The domain XML file.
    pub path: PathBuf,
    /// What the XML defines.
    pub definition: VmDefinition,
    /// The `[[network]]`s its interfaces attach to, sorted: when one fails on a host, the VM
    /// must run elsewhere.
    pub networks: Vec<String>,
}

/// The host cluster as this agent runs it.
#[derive(Debug, Clone)]
pub struct HostCluster {
    /// Every HA VM, in configuration order.
    pub vms: Vec<HaVm>,
    /// Each host's hypervisor URI, by host name.
    pub hypervisors: BTreeMap<String, String>,
    /// Where live migrations to each host are sent, by host name; hosts that cannot receive
    /// one (the test driver) are absent. See [`migration_uri_of`].
    pub migration_uris: BTreeMap<String, String>,
}

/// A host cluster configuration the host agent cannot run.
#[derive(Debug, thiserror::Error)]
pub enum HostClusterError {
    /// A host has no `hypervisor`.
    #[error(
        "node `{0}` has no `hypervisor`: a host agent needs its libvirt URI (`hypervisor = \"qemu:///system\"`, or \
         `test:///<absolute path>` for the test driver)"
    )]
    NoHypervisor(String),
    /// A group is not exactly one VM.
    #[error(
        "group `{group}` must hold exactly one resource of kind \"vm\" (it has {found}); a host agent runs one VM per group"
    )]
    NotOneVm {
        /// The group.
        group: String,
        /// What it holds (`2 resources`, `a resource of kind "exec"`…).
        found: String,
    },
    /// A domain XML file is unusable.
    #[error("group `{group}`, resource `{resource}`")]
    Definition {
        /// The group.
        group: String,
        /// The resource.
        resource: String,
        /// Why.
        #[source]
        source: VmError,
    },
    /// Two VMs share a UUID or a domain name.
    #[error("groups `{first}` and `{second}` define the same domain {what} `{value}`; every HA VM needs its own")]
    Duplicate {
        /// The first group.
        first: String,
        /// The second group.
        second: String,
        /// `UUID` or `name`.
        what: &'static str,
        /// The shared value.
        value: String,
    },
    /// A VM needs more than any host it may run on offers.
    #[error(
        "group `{group}` needs {memory_mib} MiB and {vcpus} vCPUs (its domain XML, or `demand`), more than the \
         `capacity` of every host in its `nodes`: it could never run; give it less or a host more"
    )]
    FitsNowhere {
        /// The group.
        group: String,
        /// Its memory demand.
        memory_mib: u64,
        /// Its vCPU demand.
        vcpus: u32,
    },
    /// The configuration has no groups.
    #[error("the configuration defines no [[group]]: a host cluster needs at least one HA VM")]
    NoVms,
    /// A `migration_uri` another host's daemon could not migrate to.
    #[error("node `{node}`: `migration_uri = \"{uri}\"` {why}")]
    MigrationUri {
        /// The node.
        node: String,
        /// The URI given.
        uri: String,
        /// What is wrong and what to do.
        why: &'static str,
    },
}

/// Where other hosts send live migrations to node `n`: its `migration_uri`, or one derived
/// from its `hypervisor` (a local URI such as `qemu:///system` becomes
/// `qemu+tls://<api address, else first link address>/system`; a remote one is used as it
/// is); `None` for the test driver, which cannot migrate. `Err` says why a given
/// `migration_uri` cannot work.
pub fn migration_uri_of(n: &tandem_config::Node) -> Result<Option<String>, &'static str> {
    if let Some(uri) = &n.migration_uri {
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Err("is not a libvirt URI; write e.g. qemu+tls://10.0.0.1/system");
        };
        if scheme.starts_with("test") {
            return Err("names libvirt's test driver, which cannot migrate; remove it");
        }
        if host_of(rest).is_empty() {
            return Err(
                "names no host: the source host's daemon connects to it, so a local URI would be itself; write                  e.g. qemu+tls://10.0.0.1/system",
            );
        }
        return Ok(Some(uri.clone()));
    }
    let Some(hv) = &n.hypervisor else { return Ok(None) };
    let Some((scheme, rest)) = hv.split_once("://") else { return Ok(None) };
    if scheme.starts_with("test") {
        return Ok(None);
    }
    if !host_of(rest).is_empty() {
        return Ok(Some(hv.clone()));
    }
    let Some(addr) = n.api.map(|a| a.ip()).or_else(|| n.links.values().next().copied()) else { return Ok(None) };
    let driver = scheme.split('+').next().unwrap_or(scheme);
    let path = rest.split('?').next().unwrap_or_default();
    let host = if addr.is_ipv6() { format!("[{addr}]") } else { addr.to_string() };
    Ok(Some(format!("{driver}+tls://{host}{path}")))
}

/// The host part of a URI after `scheme://`.
fn host_of(rest: &str) -> &str {
    rest.split(['/', '?']).next().unwrap_or_default()
}

impl HostCluster {
    /// Checks `config` for a host agent and loads every VM's domain XML. Every problem is
    /// reported, not only the first.
    pub fn new(config: &ClusterConfig) -> Result<HostCluster, Vec<HostClusterError>> {
        let mut errors = Vec::new();
        let mut hypervisors = BTreeMap::new();
        let mut migration_uris = BTreeMap::new();
        for n in &config.nodes {
            match migration_uri_of(n) {
                Ok(Some(uri)) => {
                    migration_uris.insert(n.name.clone(), uri);
                }
                Ok(None) => {}
                Err(why) => errors.push(HostClusterError::MigrationUri {
                    node: n.name.clone(),
                    uri: n.migration_uri.clone().unwrap_or_default(),
                    why,
                }),
            }
            match &n.hypervisor {
                Some(uri) => {
                    hypervisors.insert(n.name.clone(), uri.clone());
                }
                None => errors.push(HostClusterError::NoHypervisor(n.name.clone())),
            }
        }
        if config.groups.is_empty() {
            errors.push(HostClusterError::NoVms);
        }
        let mut vms: Vec<HaVm> = Vec::new();
        for g in &config.groups {
            let vm = match g.resources.as_slice() {
                [r] => match &r.kind {
                    ResourceKind::Vm(vm) => Some((r, vm)),
                    other => {
                        errors.push(HostClusterError::NotOneVm {
                            group: g.name.clone(),
                            found: format!("a resource of kind \"{}\"", other.name()),
                        });
                        None
                    }
                },
                rs => {
                    errors.push(HostClusterError::NotOneVm {
                        group: g.name.clone(),
                        found: format!("{} resources", rs.len()),
                    });
                    None
                }
            };
            let Some((r, spec)) = vm else { continue };
            match VmDefinition::load(&spec.domain) {
                Ok(definition) => {
                    for other in &vms {
                        let dup = if other.definition.uuid == definition.uuid {
                            Some(("UUID", definition.uuid.to_string()))
                        } else if other.definition.name == definition.name {
                            Some(("name", definition.name.clone()))
                        } else {
                            None
                        };
                        if let Some((what, value)) = dup {
                            errors.push(HostClusterError::Duplicate {
                                first: other.group.clone(),
                                second: g.name.clone(),
                                what,
                                value,
                            });
                        }
                    }
                    let networks = networks_of(&definition, &config.networks);
                    vms.push(HaVm {
                        group: g.name.clone(),
                        resource: r.name.clone(),
                        path: spec.domain.clone(),
                        definition,
                        networks,
                    });
                }
                Err(source) => errors.push(HostClusterError::Definition {
                    group: g.name.clone(),
                    resource: r.name.clone(),
                    source,
                }),
            }
        }
        // Placement would leave a VM that fits on no eligible host blocked forever: say so now
        // (the configuration check cannot, the demand comes from the domain XML).
        for vm in &vms {
            let Some(g) = config.groups.iter().find(|g| g.name == vm.group) else { continue };
            let (memory_mib, vcpus) = match g.demand {
                Some(d) => (d.memory_mib, d.vcpus),
                None => (vm.definition.memory_mib, vm.definition.vcpus),
            };
            let fits_somewhere = g.nodes.iter().any(|n| {
                config.node(n).is_none_or(|n| n.capacity.is_none_or(|c| c.memory_mib >= memory_mib && c.vcpus >= vcpus))
            });
            if !fits_somewhere {
                errors.push(HostClusterError::FitsNowhere { group: g.name.clone(), memory_mib, vcpus });
            }
        }
        if errors.is_empty() { Ok(HostCluster { vms, hypervisors, migration_uris }) } else { Err(errors) }
    }
}

/// The watched networks a VM's interfaces attach to.
pub fn networks_of(vm: &VmDefinition, networks: &[tandem_config::Network]) -> Vec<String> {
    let mut out: Vec<String> = networks
        .iter()
        .filter(|n| {
            vm.attachments.iter().any(|a| match a {
                Attachment::Bridge(b) => n.bridge.as_deref() == Some(b.as_str()),
                Attachment::Network(v) => n.libvirt_network.as_deref() == Some(v.as_str()),
            })
        })
        .map(|n| n.name.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Fills each group's `demand` from its VM's definition (memory and vCPUs) where the
/// configuration gives none, so that placement counts what the VMs really use.
pub fn with_vm_demands(mut config: ClusterConfig, cluster: &HostCluster) -> ClusterConfig {
    for g in &mut config.groups {
        if g.demand.is_none()
            && let Some(vm) = cluster.vms.iter().find(|v| v.group == g.name)
        {
            g.demand =
                Some(tandem_config::Capacity { memory_mib: vm.definition.memory_mib, vcpus: vm.definition.vcpus });
        }
    }
    config
}

/// The hosts, for the HostAgent API.
pub fn host_facts(config: &ClusterConfig) -> Vec<crate::api::HostFacts> {
    config
        .nodes
        .iter()
        .map(|n| crate::api::HostFacts {
            name: n.name.clone(),
            id: n.id,
            capacity: n.capacity.map(|c| (c.memory_mib, c.vcpus)),
        })
        .collect()
}

/// The HA VMs, for the HostAgent API.
pub fn vm_facts(cluster: &HostCluster) -> Vec<crate::api::VmFacts> {
    cluster
        .vms
        .iter()
        .map(|v| crate::api::VmFacts {
            group: v.group.clone(),
            domain: v.definition.name.clone(),
            uuid: v.definition.uuid.to_string(),
            memory_mib: v.definition.memory_mib,
            vcpus: v.definition.vcpus,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn net(name: &str, bridge: Option<&str>, libvirt: Option<&str>) -> tandem_config::Network {
        tandem_config::Network {
            name: name.into(),
            bridge: bridge.map(Into::into),
            libvirt_network: libvirt.map(Into::into),
            interfaces: vec!["eth1".into()],
            ping_targets: Vec::new(),
            hold: Duration::ZERO,
        }
    }

    #[test]
    fn a_vm_uses_the_networks_its_interfaces_attach_to() {
        let xml = "<domain type='test'><name>v</name><uuid>8f1b6a34-0d5e-4c3b-9a51-2e7f4b8c9d10</uuid>\
                   <memory unit='MiB'>64</memory><devices><interface type='bridge'><source bridge='br-a'/>\
                   </interface><interface type='network'><source network='lan'/></interface>\
                   <interface type='bridge'><source bridge='br-other'/></interface></devices></domain>";
        let vm = VmDefinition::parse(xml, "v.xml").unwrap();
        let nets = [
            net("storage", Some("br-a"), None),
            net("front", None, Some("lan")),
            net("unused", Some("br-z"), Some("other")),
        ];
        assert_eq!(networks_of(&vm, &nets), vec!["front".to_string(), "storage".to_string()]);
        assert!(networks_of(&vm, &[]).is_empty());
    }

    fn node(hypervisor: &str, migration_uri: Option<&str>, api: Option<&str>) -> tandem_config::Node {
        serde_json::from_value(serde_json::json!({
            "name": "hv1", "id": 1, "links": { "lan": "10.0.0.9" }, "hypervisor": hypervisor,
            "migration_uri": migration_uri, "api": api,
        }))
        .expect("a node")
    }

    #[test]
    fn migration_uris_are_derived_from_the_hypervisor_or_checked() {
        let uri = |hv, mig, api| migration_uri_of(&node(hv, mig, api));
        // Local daemon: TLS to the API address, else the first link address.
        assert_eq!(uri("qemu:///system", None, Some("10.0.0.1:7701")), Ok(Some("qemu+tls://10.0.0.1/system".into())));
        assert_eq!(uri("qemu:///system", None, None), Ok(Some("qemu+tls://10.0.0.9/system".into())));
        assert_eq!(uri("qemu:///system", None, Some("[fd00::1]:7701")), Ok(Some("qemu+tls://[fd00::1]/system".into())));
        // A remote hypervisor URI is reachable as it is; the test driver cannot migrate.
        assert_eq!(uri("qemu+ssh://root@hv1/system", None, None), Ok(Some("qemu+ssh://root@hv1/system".into())));
        assert_eq!(uri("test:///tmp/h1.xml", None, Some("10.0.0.1:7701")), Ok(None));
        // Given explicitly: used when it can work, refused with why otherwise.
        let given = "qemu+tcp://10.1.0.1/system";
        assert_eq!(uri("qemu:///system", Some(given), None), Ok(Some(given.into())));
        assert!(uri("qemu:///system", Some("10.1.0.1"), None).unwrap_err().contains("not a libvirt URI"));
        assert!(uri("qemu:///system", Some("test:///default"), None).unwrap_err().contains("test driver"));
        assert!(uri("qemu:///system", Some("qemu:///system"), None).unwrap_err().contains("names no host"));
    }
}
