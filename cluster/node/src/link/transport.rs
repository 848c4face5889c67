//! Opening a gRPC channel to the host agent over TCP, a Unix socket or AF_VSOCK, each
//! bounded by a connect timeout (a host that does not answer must not hang the link task).

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tandem_config::LinkAddress;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the link could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The address does not make a valid URI (a malformed host name).
    #[error("{address} is not a usable address")]
    Address {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// Connecting failed (refused, unreachable, no AF_VSOCK support in this kernel…).
    #[error("cannot connect to the host agent at {address}")]
    Connect {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// Connecting took longer than the limit.
    #[error("no connection to the host agent at {address} within {} s", limit.as_secs())]
    Timeout {
        /// The address.
        address: String,
        /// The limit.
        limit: Duration,
    },
}

/// TLS for a `tcp:` link (`[host_link.tls]`), read from its files when the agent starts.
#[derive(Clone)]
pub struct LinkTls {
    /// PEM CA certificate(s) the host's certificate must chain to.
    pub ca: Vec<u8>,
    /// This guest's PEM certificate and key, for hosts that verify guests.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the host's certificate must carry (default: the address's host).
    pub server_name: Option<String>,
}

/// A `[host_link.tls]` file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the {what} {}", path.display())]
pub struct LinkTlsError {
    /// Which file: `CA`, `certificate`, `key`.
    pub what: &'static str,
    /// Its path.
    pub path: std::path::PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

impl LinkTls {
    /// Reads the files of `[host_link.tls]`.
    pub fn load(settings: &tandem_config::HostLinkTls) -> Result<LinkTls, LinkTlsError> {
        let read = |what, path: &std::path::Path| {
            std::fs::read(path).map_err(|source| LinkTlsError { what, path: path.to_path_buf(), source })
        };
        let identity = match (&settings.cert, &settings.key) {
            (Some(c), Some(k)) => Some((read("certificate", c)?, read("key", k)?)),
            _ => None,
        };
        Ok(LinkTls { ca: read("CA", &settings.ca)?, identity, server_name: settings.server_name.clone() })
    }
}

impl std::fmt::Debug for LinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("LinkTls")
            .field("client_certificate", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn keepalive(e: Endpoint, limit: Duration) -> Endpoint {
    // HTTP/2 pings notice a host that vanished without closing the connection (a paused
    // host, a cut network) within about 15 s even while nothing else is sent.
    e.connect_timeout(limit)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
}

/// Opens a channel to `address`, within `limit`; over TLS when `tls` is given (`tcp:` only).
pub async fn connect(address: &LinkAddress, tls: Option<&LinkTls>, limit: Duration) -> Result<Channel, TransportError> {
    let text = address.to_string();
    let attempt = async {
        match address {
            LinkAddress::Tcp { host, port } => {
                let scheme = if tls.is_some() { "https" } else { "http" };
                let bracketed = if host.contains(':') { format!("[{host}]") } else { host.clone() };
                let mut endpoint = Endpoint::from_shared(format!("{scheme}://{bracketed}:{port}"))
                    .map_err(|source| TransportError::Address { address: text.clone(), source })?;
                if let Some(t) = tls {
                    let mut config = ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(&t.ca))
                        .domain_name(t.server_name.clone().unwrap_or_else(|| host.clone()));
                    if let Some((cert, key)) = &t.identity {
                        config = config.identity(Identity::from_pem(cert, key));
                    }
                    endpoint = endpoint
                        .tls_config(config)
                        .map_err(|source| TransportError::Address { address: text.clone(), source })?;
                }
                keepalive(endpoint, limit)
                    .connect()
                    .await
                    .map_err(|source| TransportError::Connect { address: text.clone(), source })
            }
            LinkAddress::Unix(path) => {
                let path = path.clone();
                keepalive(Endpoint::from_static("http://guest-link.invalid"), limit)
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
                    }))
                    .await
                    .map_err(|source| TransportError::Connect { address: text.clone(), source })
            }
            LinkAddress::Vsock { cid, port } => {
                let addr = tokio_vsock::VsockAddr::new(*cid, *port);
                keepalive(Endpoint::from_static("http://guest-link.invalid"), limit)
                    .connect_with_connector(tower::service_fn(move |_: Uri| async move {
                        Ok::<_, std::io::Error>(TokioIo::new(tokio_vsock::VsockStream::connect(addr).await?))
                    }))
                    .await
                    .map_err(|source| TransportError::Connect { address: text.clone(), source })
            }
        }
    };
    tokio::time::timeout(limit, attempt)
        .await
        .map_err(|_| TransportError::Timeout { address: address.to_string(), limit })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refused_and_unsupported_transports_fail_fast() {
        let dir = tempfile::tempdir().unwrap();
        let e = connect(&LinkAddress::Unix(dir.path().join("none.sock")), None, CONNECT_TIMEOUT).await.unwrap_err();
        assert!(matches!(e, TransportError::Connect { .. }), "{e}");
        let port = tandem_testkit::free_port();
        let e = connect(&LinkAddress::Tcp { host: "127.0.0.1".into(), port }, None, CONNECT_TIMEOUT).await.unwrap_err();
        assert!(matches!(e, TransportError::Connect { .. }), "{e}");
        // This machine has no vsock transport: the attempt must end with an error (address
        // family not supported, no such device, refused), never hang.
        let start = std::time::Instant::now();
        let e = connect(&LinkAddress::Vsock { cid: 2, port: 7702 }, None, Duration::from_secs(3)).await.unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(4), "{:?}", start.elapsed());
        assert!(e.to_string().contains("vsock:2:7702"), "{e}");
    }
}
