//! Paused copies that a live migration left on this host and that nobody will resume.
//!
//! A planned handover live-migrates a VM with its copy here left **paused** under a
//! [`HandoverMark`] (the sender and its lease token); this host resumes it only as the very
//! next holder of the VM's lease (`crate::vm`). When another host got the lease instead
//! (the sender died before releasing, this host was refused, the migration failed for the
//! sender after the copy arrived here), the copy never runs — but it holds memory and
//! looks like a VM "active" here. [`discard_stale_copies`] destroys such a copy once the
//! VM's lease shows a newer token than the mark's and this host does not hold it: from then
//! on the copy can only be stale. The rule is [`is_stale`].

use std::sync::Arc;
use std::time::Duration;

use tandem_engine::{GroupId, NodeId, ResourceState};
use tandem_node::runtime::AgentHandle;
use uuid::Uuid;

use crate::hypervisor::{DomainState, HandoverMark, Hypervisor};

/// How often this host looks for stale copies.
pub const SWEEP: Duration = Duration::from_secs(5);

/// Whether a paused copy marked `mark` (written by another host) is stale on this host:
/// the group is not held or being run here (`active_here`), and its lease was acquired
/// since the mark was written (`lease_token`, the last token read on the lease, is newer
/// than the mark's), so the handover this copy was for is over.
pub fn is_stale(mark: &HandoverMark, active_here: bool, lease_token: Option<u64>) -> bool {
    !active_here && lease_token.is_some_and(|t| t > mark.token)
}

/// Every [`SWEEP`], destroys the stale incoming copies of `vms` (group name, domain UUID)
/// on `hypervisor`; `me` is this host's name. Ends when the agent stops.
pub async fn discard_stale_copies(
    hypervisor: Arc<dyn Hypervisor>,
    me: String,
    vms: Vec<(String, Uuid)>,
    agent: AgentHandle,
) {
    loop {
        tokio::time::sleep(SWEEP).await;
        let Ok(status) = agent.status().await else { return };
        let Ok(domains) = hypervisor.list_domains().await else { continue };
        let my_id: Option<NodeId> = status.names.iter().find(|(_, n)| *n == me).map(|(id, _)| *id);
        for d in domains.iter().filter(|d| matches!(d.state, DomainState::Paused(_))) {
            let Some((group, _)) = vms.iter().find(|(_, u)| *u == d.uuid) else { continue };
            let key = d.uuid.to_string();
            let Ok(Some(mark)) = hypervisor.handover_mark(&key).await else { continue };
            if mark.from == me {
                continue;
            }
            let gid = GroupId(group.clone());
            let active_here = status.cluster.groups.iter().find(|g| g.id == gid).is_none_or(|g| {
                g.location.is_some() && g.location == my_id
                    || g.resources.iter().any(|r| r.state != ResourceState::Stopped)
            });
            let token = status.tokens.get(&gid).copied();
            if !is_stale(&mark, active_here, token) {
                continue;
            }
            tracing::warn!(target: "tandem_host", vm = %group, domain = %d.name, from = %mark.from,
                mark_token = mark.token, lease_token = ?token,
                "destroying a paused copy of VM {group} that {} live-migrated here under token {}: the lease has \
                 moved on since, so it will never be resumed", mark.from, mark.token);
            if let Err(e) = hypervisor.destroy(&key).await {
                tracing::warn!(target: "tandem_host", vm = %group, "cannot destroy the stale copy: {e}");
                continue;
            }
            if let Err(e) = hypervisor.undefine(&key).await {
                tracing::warn!(target: "tandem_host", vm = %group, "the stale copy is off but stays defined: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_stale_only_once_the_lease_moved_on_elsewhere() {
        let mark = HandoverMark { from: "h1".into(), token: 5 };
        // The sender still holds the lease (token 5), or nothing was read yet: keep it.
        assert!(!is_stale(&mark, false, Some(5)));
        assert!(!is_stale(&mark, false, None));
        // This host took the lease (token 6) and is resuming or running it: keep it.
        assert!(!is_stale(&mark, true, Some(6)));
        // Another host took the lease since: this copy is stale.
        assert!(is_stale(&mark, false, Some(6)));
    }
}
