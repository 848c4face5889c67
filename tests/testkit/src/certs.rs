//! Throw-away certificates: a CA and a server certificate for `localhost`
//! and 127.0.0.1, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// PEM files of a test PKI.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// CA certificate (trust anchor for clients).
    pub ca_cert: PathBuf,
    /// Server certificate for `localhost` / 127.0.0.1.
    pub server_cert: PathBuf,
    /// Its private key (mode 0600).
    pub server_key: PathBuf,
}

/// Creates a CA and a server certificate in `dir`.
pub fn make_pki(dir: &Path) -> TestPki {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.distinguished_name.push(DnType::CommonName, "Tandem test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().expect("server key");
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("server params");
    params.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer).expect("server cert");

    let pki = TestPki {
        ca_cert: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
    };
    std::fs::write(&pki.ca_cert, ca_cert.pem()).expect("write ca");
    std::fs::write(&pki.server_cert, cert.pem()).expect("write cert");
    std::fs::write(&pki.server_key, key.serialize_pem()).expect("write key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pki.server_key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    pki
}
