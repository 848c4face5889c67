//! The guest agent's resource kinds: exclusive disks, floating IP addresses, programs, OCF
//! resource agents and systemd units. The [`Resource`] trait and its types live in
//! tandem-node (re-exported here) so that every agent's runtime can drive them.

pub mod cgroup;
pub mod disk;
pub mod exec;
pub mod ip;
pub mod mountinfo;
pub mod ocf;
pub mod process;
pub mod systemd;

pub use tandem_node::resources::*;

use tandem_config::ResourceKind;

/// Builds the resource `spec` of group `group`. Checks what can be checked
/// without side effects (programs and agents exist, the user exists, systemd
/// runs here); nothing is started.
pub fn build(
    group: &str,
    spec: &tandem_config::Resource,
    env: &ResourceEnv,
) -> Result<Box<dyn Resource>, ResourceError> {
    check_name(group, spec)?;
    Ok(match &spec.kind {
        ResourceKind::Exec(e) => Box::new(exec::ExecResource::build(group, &spec.name, e, env)?),
        ResourceKind::Ocf(o) => Box::new(ocf::OcfResource::build(group, &spec.name, o, env)?),
        ResourceKind::Disk(d) => Box::new(disk::DiskResource::build(group, &spec.name, d, env)?),
        ResourceKind::Ip(i) => Box::new(ip::IpResource::build(group, &spec.name, i, env)?),
        ResourceKind::Systemd(s) => Box::new(systemd::SystemdResource::build(group, &spec.name, s, env)?),
        ResourceKind::Vm(_) => {
            return Err(ResourceError::config(
                &format!("{group}/{}", spec.name),
                "kind \"vm\" is run by the host agent (tandem-host), not by tandem-guest",
            ));
        }
    })
}

/// The guest agent's [`ResourceFactory`].
#[derive(Debug, Clone, Copy, Default)]
pub struct GuestResources;

impl ResourceFactory for GuestResources {
    fn build(
        &self,
        group: &str,
        spec: &tandem_config::Resource,
        env: &ResourceEnv,
    ) -> Result<Box<dyn Resource>, ResourceError> {
        build(group, spec, env)
    }
}
