//! The guest-link listeners: TCP (`[guest_link] listen`) and one Unix socket per VM with a
//! `vsock_uds` (`<vsock_uds>_<vsock_port>`, where userspace vsock backends such as
//! vhost-device-vsock or Firecracker hand over a guest's AF_VSOCK connection to that port).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tandem_config::{DEFAULT_GUEST_LINK_VSOCK_PORT, GuestLinkSettings};
use tandem_node::api::pb;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::LinkRegistry;
use super::service::HostLinkService;

/// A listener could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LinkServeError {
    /// The TCP address cannot be bound.
    #[error("cannot listen for guest links on {0} ([guest_link] listen)")]
    Tcp(SocketAddr, #[source] std::io::Error),
    /// A VM's socket cannot be created.
    #[error("cannot listen for VM {vm}'s guest link on {}", path.display())]
    Unix {
        /// The VM.
        vm: String,
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The open listeners.
#[derive(Debug, Default)]
pub struct LinkListeners {
    /// The TCP address, once bound (the real port when `:0` was asked for).
    pub tcp: Option<SocketAddr>,
    /// The per-VM Unix sockets, by VM name.
    pub sockets: Vec<(String, PathBuf)>,
}

fn server() -> tonic::transport::Server {
    // HTTP/2 pings notice a guest that vanished without closing its connection.
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}

/// Opens every guest-link listener of `settings` and the VMs' vsock sockets, serving until
/// `stop` is cancelled.
pub async fn serve(
    registry: Arc<LinkRegistry>,
    settings: Option<&GuestLinkSettings>,
    stop: CancellationToken,
) -> Result<LinkListeners, LinkServeError> {
    let mut out = LinkListeners::default();
    if let Some(addr) = settings.and_then(|s| s.listen) {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| LinkServeError::Tcp(addr, e))?;
        let bound = listener.local_addr().map_err(|e| LinkServeError::Tcp(addr, e))?;
        let service = HostLinkService { registry: registry.clone(), transport: "tcp", bound: None, path: None };
        let stop = stop.clone();
        tokio::spawn(async move {
            let r = server()
                .add_service(pb::host_link_server::HostLinkServer::new(service))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled())
                .await;
            if let Err(e) = r {
                error!(target: "tandem_host::link", "guest-link listener on {bound}: {e}");
            }
        });
        info!(target: "tandem_host::link", "guest links: listening on tcp {bound}");
        out.tcp = Some(bound);
    }
    let port = settings.map_or(DEFAULT_GUEST_LINK_VSOCK_PORT, |s| s.vsock_port);
    for vm in registry.vms() {
        let (Some(base), Some(_)) = (&vm.vsock_uds, &vm.key) else { continue };
        let path = PathBuf::from(format!("{}_{port}", base.display()));
        let fail = |source| LinkServeError::Unix { vm: vm.name.clone(), path: path.clone(), source };
        // A socket left by an earlier run would make bind fail; anything else is not ours.
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(&path).map_err(fail)?;
            }
        }
        let listener = tokio::net::UnixListener::bind(&path).map_err(fail)?;
        let service = HostLinkService {
            registry: registry.clone(),
            transport: "unix",
            bound: Some(vm.uuid.to_ascii_lowercase()),
            path: Some(path.display().to_string()),
        };
        let (stop, shown) = (stop.clone(), path.clone());
        tokio::spawn(async move {
            let r = server()
                .add_service(pb::host_link_server::HostLinkServer::new(service))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop.cancelled())
                .await;
            if let Err(e) = r {
                error!(target: "tandem_host::link", "guest-link socket {}: {e}", shown.display());
            }
            let _ = std::fs::remove_file(&shown);
        });
        info!(target: "tandem_host::link", vm = %vm.name, "guest link: listening on {}", path.display());
        out.sockets.push((vm.name.clone(), path));
    }
    Ok(out)
}
