//! The `host-cluster` method: ask the Tandem host cluster to power off the VM a node runs in.
//!
//! The guest side talks to the host cluster through the [`HostClusterFencing`] trait. Its
//! real implementation is the host–guest link ([`crate::link::GuestLink::fencing`]): the
//! request travels as a `LinkFenceRequest` to this node's own host agent, which hands it to
//! its host-side fencer and answers. A node that runs no link (no `[host_link]`, or no VM
//! UUID for it) gets [`NotBuiltHostCluster`], which fails every request: host-cluster
//! fencing never reports success without a host cluster behind it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::v1::{FenceVmOutcome, FenceVmRequest, FenceVmResponse};

/// The future a [`HostClusterFencing`] returns.
pub type FenceVmFuture<'a> = Pin<Box<dyn Future<Output = Result<FenceVmResponse, HostFenceError>> + Send + 'a>>;

/// The host cluster as the guest agent sees it: something that powers a VM off and
/// confirms it (`GuestFencing.FenceVm`).
pub trait HostClusterFencing: Send + Sync + fmt::Debug {
    /// Powers off `request.vm_uuid` and confirms it. Must answer only once the VM is off
    /// (`POWERED_OFF` / `ALREADY_OFF`) or with an error.
    fn fence_vm(&self, request: FenceVmRequest) -> FenceVmFuture<'_>;
}

/// Why the host cluster did not confirm a VM off.
#[derive(Debug, thiserror::Error)]
pub enum HostFenceError {
    /// There is no host agent to ask: this node runs no host link.
    #[error(
        "host-cluster fencing needs the host–guest link, and this node runs none: configure [host_link] (address, \
         key_file, and vm_uuid or this node's own host-cluster fence vm_uuid)"
    )]
    NotBuilt,
    /// The host cluster did not answer in time.
    #[error("the host cluster did not confirm VM {vm_uuid} off within {:.1} s", timeout.as_secs_f64())]
    TimedOut {
        /// The VM.
        vm_uuid: String,
        /// The method's timeout.
        timeout: Duration,
    },
    /// The host cluster answered without confirming the VM off.
    #[error("the host cluster did not confirm VM {vm_uuid} off: {detail}")]
    NotConfirmed {
        /// The VM.
        vm_uuid: String,
        /// What it said.
        detail: String,
    },
    /// The request failed (transport or host-side error).
    #[error("asking the host cluster to fence VM {vm_uuid} failed: {detail}")]
    Request {
        /// The VM.
        vm_uuid: String,
        /// What failed.
        detail: String,
    },
}

impl HostFenceError {
    /// True when retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, HostFenceError::NotBuilt)
    }
}

/// The stand-in for a node without a host link: every request fails with
/// [`HostFenceError::NotBuilt`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NotBuiltHostCluster;

impl HostClusterFencing for NotBuiltHostCluster {
    fn fence_vm(&self, _request: FenceVmRequest) -> FenceVmFuture<'_> {
        Box::pin(async { Err(HostFenceError::NotBuilt) })
    }
}

/// A node's host-cluster fencing, ready to run.
#[derive(Debug, Clone)]
pub struct HostClusterMethod {
    host: Arc<dyn HostClusterFencing>,
    cluster: String,
    vm_uuid: String,
    timeout: Duration,
}

impl HostClusterMethod {
    /// Fences VM `vm_uuid` of guest cluster `cluster` through `host`, waiting at most `timeout`.
    pub fn new(host: Arc<dyn HostClusterFencing>, cluster: String, vm_uuid: String, timeout: Duration) -> Self {
        Self { host, cluster, vm_uuid, timeout }
    }

    /// Asks the host cluster; `Ok` with its detail only for a confirmed power-off.
    pub async fn fence(&self, name: &str, id: u32) -> Result<String, HostFenceError> {
        let request = FenceVmRequest {
            vm_uuid: self.vm_uuid.clone(),
            cluster: self.cluster.clone(),
            node_name: name.to_string(),
            node_id: id,
            timeout_ms: u32::try_from(self.timeout.as_millis()).unwrap_or(u32::MAX),
        };
        let answer = tokio::time::timeout(self.timeout, self.host.fence_vm(request))
            .await
            .map_err(|_| HostFenceError::TimedOut { vm_uuid: self.vm_uuid.clone(), timeout: self.timeout })??;
        match answer.outcome() {
            FenceVmOutcome::PoweredOff | FenceVmOutcome::AlreadyOff => {
                Ok(format!("{:?} on {}: {}", answer.outcome(), answer.hypervisor, answer.detail))
            }
            FenceVmOutcome::Unspecified => {
                Err(HostFenceError::NotConfirmed { vm_uuid: self.vm_uuid.clone(), detail: answer.detail })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Answering(FenceVmOutcome);

    impl HostClusterFencing for Answering {
        fn fence_vm(&self, request: FenceVmRequest) -> FenceVmFuture<'_> {
            let outcome = self.0;
            Box::pin(async move {
                Ok(FenceVmResponse { outcome: outcome as i32, hypervisor: "h1".into(), detail: request.vm_uuid })
            })
        }
    }

    fn method(host: Arc<dyn HostClusterFencing>) -> HostClusterMethod {
        HostClusterMethod::new(host, "c".into(), "4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b01".into(), Duration::from_secs(1))
    }

    #[tokio::test]
    async fn not_built_never_succeeds() {
        let e = method(Arc::new(NotBuiltHostCluster)).fence("b", 2).await.unwrap_err();
        assert!(e.to_string().contains("needs the host–guest link"), "{e}");
        assert!(e.is_permanent());
    }

    #[tokio::test]
    async fn only_an_off_outcome_confirms() {
        assert!(method(Arc::new(Answering(FenceVmOutcome::PoweredOff))).fence("b", 2).await.is_ok());
        assert!(method(Arc::new(Answering(FenceVmOutcome::AlreadyOff))).fence("b", 2).await.is_ok());
        let e = method(Arc::new(Answering(FenceVmOutcome::Unspecified))).fence("b", 2).await.unwrap_err();
        assert!(matches!(e, HostFenceError::NotConfirmed { .. }), "{e}");
    }
}
