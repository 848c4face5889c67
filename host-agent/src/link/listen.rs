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
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tracing::{error, info, warn};

use super::LinkRegistry;
use super::service::HostLinkService;

/// A listener could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LinkServeError {
    /// A `[guest_link.tls]` file cannot be read, or its contents are unusable.
    #[error("[guest_link.tls]: cannot use the {what} {}", path.display())]
    Tls {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
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

/// A TLS handshake that has not finished by then is dropped: a client that connects and
/// stalls must not hold a connection slot.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn tls_config(tls: &tandem_config::ApiTls) -> Result<ServerTlsConfig, LinkServeError> {
    let read = |what, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| LinkServeError::Tls { what, path: path.to_path_buf(), source: Box::new(e) })
    };
    let identity = Identity::from_pem(read("certificate", &tls.cert)?, read("key", &tls.key)?);
    let mut config = ServerTlsConfig::new().identity(identity).timeout(TLS_HANDSHAKE_TIMEOUT);
    if let Some(ca) = &tls.client_ca {
        // Required, unlike the API's optional client certificates: a guest has nothing to
        // do on this listener without one, so the handshake itself refuses it.
        config = config.client_ca_root(Certificate::from_pem(read("client CA", ca)?));
    }
    Ok(config)
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
        let tls = settings.and_then(|s| s.tls.as_ref());
        let mut builder = server();
        if let Some(t) = tls {
            let config = tls_config(t)?;
            builder = builder.tls_config(config).map_err(|e| LinkServeError::Tls {
                what: "certificate",
                path: t.cert.clone(),
                source: Box::new(e),
            })?;
        }
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| LinkServeError::Tcp(addr, e))?;
        let bound = listener.local_addr().map_err(|e| LinkServeError::Tcp(addr, e))?;
        if tls.is_none() && !bound.ip().is_loopback() {
            warn!(
                target: "tandem_host::link",
                "guest links on {bound} without [guest_link.tls]: the handshake authenticates both ends, but what \
                 follows is readable and alterable on the path"
            );
        }
        let transport = if tls.is_some() { "tcp+tls" } else { "tcp" };
        let service = HostLinkService { registry: registry.clone(), transport, bound: None, path: None };
        let stop = stop.clone();
        tokio::spawn(async move {
            let r = builder
                .add_service(pb::host_link_server::HostLinkServer::new(service))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled())
                .await;
            if let Err(e) = r {
                error!(target: "tandem_host::link", "guest-link listener on {bound}: {e}");
            }
        });
        info!(target: "tandem_host::link", "guest links: listening on {transport} {bound}");
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
