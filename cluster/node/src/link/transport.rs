//! Opening a gRPC channel to the host agent over TCP, a Unix socket or AF_VSOCK, each
//! bounded by a connect timeout (a host that does not answer must not hang the link task).

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tandem_config::LinkAddress;
use tonic::transport::{Channel, Endpoint, Uri};

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

fn keepalive(e: Endpoint, limit: Duration) -> Endpoint {
    // HTTP/2 pings notice a host that vanished without closing the connection (a paused
    // host, a cut network) within about 15 s even while nothing else is sent.
    e.connect_timeout(limit)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
}

/// Opens a channel to `address`, within `limit`.
pub async fn connect(address: &LinkAddress, limit: Duration) -> Result<Channel, TransportError> {
    let text = address.to_string();
    let attempt = async {
        match address {
            LinkAddress::Tcp { host, port } => {
                let host = if host.contains(':') { format!("[{host}]") } else { host.clone() };
                let endpoint = Endpoint::from_shared(format!("http://{host}:{port}"))
                    .map_err(|source| TransportError::Address { address: text.clone(), source })?;
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
        let e = connect(&LinkAddress::Unix(dir.path().join("none.sock")), CONNECT_TIMEOUT).await.unwrap_err();
        assert!(matches!(e, TransportError::Connect { .. }), "{e}");
        let port = tandem_testkit::free_port();
        let e = connect(&LinkAddress::Tcp { host: "127.0.0.1".into(), port }, CONNECT_TIMEOUT).await.unwrap_err();
        assert!(matches!(e, TransportError::Connect { .. }), "{e}");
        // This machine has no vsock transport: the attempt must end with an error (address
        // family not supported, no such device, refused), never hang.
        let start = std::time::Instant::now();
        let e = connect(&LinkAddress::Vsock { cid: 2, port: 7702 }, Duration::from_secs(3)).await.unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(4), "{:?}", start.elapsed());
        assert!(e.to_string().contains("vsock:2:7702"), "{e}");
    }
}
