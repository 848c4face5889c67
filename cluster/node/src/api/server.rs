//! The listener: TLS (optionally mutual), health, reflection, graceful stop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tandem_config::{ApiRole, ApiSettings};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};
use tonic_health::ServingStatus;
use tonic_health::server::{HealthReporter, HealthService};
use tracing::{info, warn};

use super::pb::guest_agent_server::GuestAgentServer;
use super::service::GuestAgentService;
use super::{Access, Control};

/// A TLS handshake that takes longer than this is dropped (a stuck client
/// must not hold a connection slot forever).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long in-flight calls may take to finish once the server stops, before
/// it stops waiting for them (a client watching health forever must not hold
/// up the agent's exit).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The gRPC service name health reports for the API.
const SERVICE_NAME: &str = "tandem.v1.GuestAgent";

/// Why the API server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A certificate, key or CA file could not be read.
    #[error("cannot read the API's TLS {what} {path}")]
    ReadTls {
        /// Which file (`certificate`, `private key`, `client CA`).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The certificate and key do not form a usable TLS configuration.
    #[error("the API's TLS certificate, key or client CA is unusable (check that they are PEM and belong together)")]
    Tls(#[source] tonic::transport::Error),
    /// Listening on the network without TLS was not allowed explicitly.
    #[error(
        "refusing to serve the API on {0} without TLS: configure [api.tls], listen on a loopback address, \
         or set `insecure = true` in [api]"
    )]
    Insecure(SocketAddr),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr} for the API (is another agent running, or the address not local?)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The embedded descriptor set is corrupt (a build defect).
    #[error("cannot build the gRPC reflection service from the embedded descriptors")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The server failed while running.
    #[error("the API server failed")]
    Serve(#[source] tonic::transport::Error),
}

/// Mounts an agent's own gRPC service next to the node API, on the same listener, TLS and
/// roles. It gets the caller authorization ([`Access::authorize`]) and a token cancelled
/// when the server stops (long streams must end on it).
pub type ExtraService = Box<dyn FnOnce(&mut tonic::service::RoutesBuilder, Arc<Access>, CancellationToken) + Send>;

/// The API server, configured but not yet listening.
pub struct ApiServer {
    listen: SocketAddr,
    tls: Option<ServerTlsConfig>,
    access: Arc<Access>,
    control: Arc<dyn Control>,
    extra: Vec<ExtraService>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("listen", &self.listen)
            .field("tls", &self.tls.is_some())
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

pub(crate) fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ApiError> {
    std::fs::read(path).map_err(|source| ApiError::ReadTls { what, path: path.to_path_buf(), source })
}

impl ApiServer {
    /// Reads the TLS files of `settings` and checks that serving is allowed:
    /// without TLS, only on loopback unless `insecure` (then with a warning).
    pub fn new(settings: &ApiSettings, control: Arc<dyn Control>) -> Result<Self, ApiError> {
        let tls = match &settings.tls {
            Some(t) => {
                let identity = Identity::from_pem(read("certificate", &t.cert)?, read("private key", &t.key)?);
                let mut config = ServerTlsConfig::new().identity(identity).timeout(TLS_HANDSHAKE_TIMEOUT);
                if let Some(ca) = &t.client_ca {
                    // Optional at the handshake so that a client without a certificate gets
                    // PERMISSION_DENIED naming the role it lacks rather than a bare TLS alert.
                    config =
                        config.client_ca_root(Certificate::from_pem(read("client CA", ca)?)).client_auth_optional(true);
                }
                Some(config)
            }
            None if settings.listen.ip().is_loopback() => None,
            None if settings.insecure => {
                warn!(
                    listen = %settings.listen,
                    "the API serves on a non-loopback address WITHOUT TLS (insecure = true): anyone who reaches it \
                     gets the anonymous roles"
                );
                None
            }
            None => return Err(ApiError::Insecure(settings.listen)),
        };
        Ok(ApiServer {
            listen: settings.listen,
            tls,
            access: Arc::new(Access::from_settings(settings)),
            control,
            extra: Vec::new(),
        })
    }

    /// Serves `service` too (see [`ExtraService`]).
    pub fn with_service(mut self, service: ExtraService) -> Self {
        self.extra.push(service);
        self
    }

    /// Binds the listen address (port 0 picks a free port; see [`BoundApi::local_addr`]).
    pub async fn bind(self) -> Result<BoundApi, ApiError> {
        let listener =
            TcpListener::bind(self.listen).await.map_err(|source| ApiError::Bind { addr: self.listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| ApiError::Bind { addr: self.listen, source })?;
        let health = HealthReporter::new();
        health.set_service_status(SERVICE_NAME, ServingStatus::Serving).await;
        Ok(BoundApi { server: self, listener, local_addr, health, grace: DEFAULT_SHUTDOWN_GRACE })
    }
}

/// The API server with its socket bound; [`BoundApi::serve`] runs it.
pub struct BoundApi {
    server: ApiServer,
    listener: TcpListener,
    local_addr: SocketAddr,
    health: HealthReporter,
    grace: Duration,
}

impl std::fmt::Debug for BoundApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundApi").field("local_addr", &self.local_addr).field("server", &self.server).finish()
    }
}

/// An interceptor that admits callers with `role` (health and reflection).
fn require(access: Arc<Access>, role: ApiRole, call: &'static str) -> impl tonic::service::Interceptor + Clone {
    move |req: Request<()>| -> Result<Request<()>, Status> {
        access.authorize(&req, role, call)?;
        Ok(req)
    }
}

impl BoundApi {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The health reporter: the runtime may set `tandem.v1.GuestAgent` (and
    /// `""`) to NOT_SERVING while it cannot act (self-fenced, stopping).
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Sets how long in-flight calls may take to finish once `shutdown` fired
    /// (default [`DEFAULT_SHUTDOWN_GRACE`]).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Serves until `shutdown` completes, then reports NOT_SERVING, ends open
    /// event and shutdown-progress streams, and lets in-flight calls finish for
    /// up to the shutdown grace; connections still open then are left behind.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ApiError> {
        let BoundApi { server, listener, local_addr, health, grace } = self;
        let stop = CancellationToken::new();
        let access = server.access.clone();
        let stopped = stop.clone();
        let service = GuestAgentService { control: server.control, access: access.clone(), stop: stop.clone() };
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        // v1alpha too: grpcurl and older clients still ask for it.
        let reflection_v1 = reflection().build_v1().map_err(ApiError::Reflection)?;
        let reflection_v1alpha = reflection().build_v1alpha().map_err(ApiError::Reflection)?;
        let health_service =
            tonic_health::pb::health_server::HealthServer::new(HealthService::from_health_reporter(health.clone()));

        let mut builder = Server::builder();
        if let Some(tls) = server.tls.clone() {
            builder = builder.tls_config(tls).map_err(ApiError::Tls)?;
        }
        let viewer = |call| require(access.clone(), ApiRole::Viewer, call);
        let mut routes = tonic::service::RoutesBuilder::default();
        routes
            .add_service(GuestAgentServer::new(service))
            .add_service(InterceptedService::new(health_service, viewer("Health")))
            .add_service(InterceptedService::new(reflection_v1, viewer("ServerReflection")))
            .add_service(InterceptedService::new(reflection_v1alpha, viewer("ServerReflection")));
        for extra in server.extra {
            extra(&mut routes, access.clone(), stop.clone());
        }
        let router = builder.add_routes(routes.routes());
        info!(%local_addr, tls = server.tls.is_some(), "API listening");
        let signal = async move {
            shutdown.await;
            info!(%local_addr, "API stopping");
            health.set_service_status("", ServingStatus::NotServing).await;
            health.set_service_status(SERVICE_NAME, ServingStatus::NotServing).await;
            stop.cancel();
        };
        // Nagle's algorithm with the client's delayed ACKs adds ~40 ms to small replies.
        let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |s| {
            if let Ok(s) = &s {
                let _ = s.set_nodelay(true);
            }
            s
        });
        let serve = router.serve_with_incoming_shutdown(incoming, signal);
        tokio::select! {
            r = serve => r.map_err(ApiError::Serve),
            _ = async { stopped.cancelled().await; tokio::time::sleep(grace).await } => {
                warn!(%local_addr, ?grace, "API calls still open after the shutdown grace; no longer waiting for them");
                Ok(())
            }
        }
    }
}
