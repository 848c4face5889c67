//! The client side between agents: forwarding an operator command to a peer's
//! API (`DeliverOperator`), with this agent's `[api.tls]` identity.

use std::net::SocketAddr;
use std::time::Duration;

use tandem_config::ApiSettings;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::pb::guest_agent_client::GuestAgentClient;
use super::server::{ApiError, read};
use super::{OperatorRequest, pb};

/// Why a peer could not be reached or refused a forwarded command.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// This agent's TLS files could not be read or used.
    #[error("cannot set up TLS towards peer {node}")]
    Tls {
        /// The peer's node name.
        node: String,
        /// What went wrong.
        #[source]
        source: ApiError,
    },
    /// The connection failed or timed out.
    #[error("cannot reach peer {node} at {addr}")]
    Connect {
        /// The peer's node name.
        node: String,
        /// Its API address.
        addr: SocketAddr,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The peer answered with an error.
    #[error("peer {node} refused command #{seq}: {status}", status = .status.message())]
    Refused {
        /// The peer's node name.
        node: String,
        /// The command's sequence number.
        seq: u64,
        /// The peer's answer.
        status: tonic::Status,
    },
}

/// A client for the peer `node` at `addr` (its `[[node]] api`), bounded by
/// `timeout` for connecting and for each call. With `[api.tls]`, the peer's
/// certificate must chain to `client_ca` and name `node` (a DNS SAN), and
/// this agent presents `cert` as its client certificate.
pub async fn connect(
    node: &str,
    addr: SocketAddr,
    settings: &ApiSettings,
    timeout: Duration,
) -> Result<GuestAgentClient<Channel>, PeerError> {
    Ok(GuestAgentClient::new(channel(node, addr, settings, timeout).await?))
}

/// The connection [`connect`] makes, for a client of another service on the peer's API
/// listener (the host agents' `HostAgent`): same TLS identity, checks and timeouts.
pub async fn channel(
    node: &str,
    addr: SocketAddr,
    settings: &ApiSettings,
    timeout: Duration,
) -> Result<Channel, PeerError> {
    let tls_err = |source| PeerError::Tls { node: node.to_string(), source };
    let scheme = if settings.tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .expect("a socket address forms a valid URI")
        .connect_timeout(timeout)
        .timeout(timeout);
    if let Some(t) = &settings.tls {
        let mut tls = ClientTlsConfig::new()
            .identity(Identity::from_pem(
                read("certificate", &t.cert).map_err(tls_err)?,
                read("private key", &t.key).map_err(tls_err)?,
            ))
            .domain_name(node);
        if let Some(ca) = &t.client_ca {
            tls = tls.ca_certificate(Certificate::from_pem(read("client CA", ca).map_err(tls_err)?));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| tls_err(ApiError::Tls(e)))?;
    }
    endpoint.connect().await.map_err(|source| PeerError::Connect { node: node.to_string(), addr, source })
}

/// Forwards one operator command with its cluster-wide sequence number.
pub async fn deliver(
    client: &mut GuestAgentClient<Channel>,
    node: &str,
    seq: u64,
    request: &OperatorRequest,
) -> Result<(), PeerError> {
    client
        .deliver_operator(pb::DeliverOperatorRequest { seq, command: Some(request.to_proto()) })
        .await
        .map(|_| ())
        .map_err(|status| PeerError::Refused { node: node.to_string(), seq, status })
}
