//! TLS client set-up shared by every probe: verification on by default,
//! an optional CA file, or verification explicitly skipped.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::spec::{SpecContext, SpecError};
use crate::{Deadline, FailureClass, ProbeFailure};

/// How a probe verifies the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsOptions {
    /// Trust only the certificates in this PEM file (instead of the
    /// built-in web PKI roots).
    pub ca_file: Option<PathBuf>,
    /// Skip verification entirely (`insecure=true`): for self-signed
    /// test set-ups; the connection is still encrypted.
    pub insecure: bool,
    /// Name to verify and send as SNI instead of the URL's host.
    pub server_name: Option<String>,
}

impl TlsOptions {
    /// Reads the `ca_file`, `insecure` and `tls_server_name` options.
    pub fn from_spec(ctx: &SpecContext<'_>) -> Result<Self, SpecError> {
        Ok(Self {
            ca_file: ctx.opt("ca_file").map(PathBuf::from),
            insecure: ctx.opt_bool("insecure", false)?,
            server_name: ctx.opt("tls_server_name"),
        })
    }

    /// Builds the rustls configuration (reads the CA file now, so a bad
    /// path is a configuration error rather than a probe failure).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, SpecError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let config = if self.insecure {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider))).with_no_client_auth()
        } else {
            let roots = match &self.ca_file {
                Some(path) => {
                    let mut roots = RootCertStore::empty();
                    load_ca(path, &mut roots)?;
                    Arc::new(roots)
                }
                None => public_roots(),
            };
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        Ok(Arc::new(config))
    }
}

/// The public (webpki) roots, built once and shared: a copy per probe
/// costs about 10 KiB, which adds up with a thousand monitors.
fn public_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS.get_or_init(|| Arc::new(RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() })).clone()
}

fn load_ca(path: &Path, roots: &mut RootCertStore) -> Result<(), SpecError> {
    let file_err = |source| SpecError::File { what: "CA file", path: path.display().to_string(), source };
    let pem = std::fs::read(path).map_err(file_err)?;
    let mut n = 0;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(file_err)?;
        roots.add(cert).map_err(|e| SpecError::BadOption {
            key: "ca_file".into(),
            value: path.display().to_string(),
            why: format!("unusable certificate: {e}"),
        })?;
        n += 1;
    }
    if n == 0 {
        return Err(SpecError::BadOption {
            key: "ca_file".into(),
            value: path.display().to_string(),
            why: "no PEM certificate in the file".into(),
        });
    }
    Ok(())
}

/// Runs a TLS client handshake over `stream` within the deadline.
pub async fn handshake<S>(
    stream: S,
    config: Arc<ClientConfig>,
    host: &str,
    deadline: Deadline,
) -> Result<TlsStream<S>, ProbeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| ProbeFailure::critical(FailureClass::Config, format!("invalid TLS server name {host:?}: {e}")))?;
    deadline
        .run("in the TLS handshake", TlsConnector::from(config).connect(name, stream))
        .await?
        .map_err(|e| ProbeFailure::critical(FailureClass::Tls, format!("TLS handshake failed: {e}")))
}

/// Accepts any certificate: `insecure=true` only.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
