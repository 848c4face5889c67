//! Throw-away certificates: a CA and a server certificate for `localhost`
//! and 127.0.0.1, and client certificates by common name, written as PEM files.

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
    /// The CA's private key (mode 0600), for [`TestPki::client_cert`].
    pub ca_key: PathBuf,
}

/// A client certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// Certificate signed by the test CA, subject CN as asked.
    pub cert: PathBuf,
    /// Its private key (mode 0600).
    pub key: PathBuf,
}

fn ca_params() -> CertificateParams {
    // Rebuilt identically for each signing: the issuer name and key are what chain validation checks.
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.distinguished_name.push(DnType::CommonName, "Tandem test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
}

fn write_key(path: &Path, pem: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, pem).expect("write key");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
}

impl TestPki {
    /// Creates a client certificate with subject CN `cn`, signed by this CA,
    /// next to the CA's files (`client-CN.pem`, `client-CN.key`).
    pub fn client_cert(&self, cn: &str) -> ClientCert {
        let ca_key = KeyPair::from_pem(&std::fs::read_to_string(&self.ca_key).expect("read CA key")).expect("CA key");
        let issuer = Issuer::new(ca_params(), ca_key);
        let key = KeyPair::generate().expect("client key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer).expect("client cert");
        let dir = self.ca_cert.parent().expect("the CA file is in a directory");
        let out = ClientCert { cert: dir.join(format!("client-{cn}.pem")), key: dir.join(format!("client-{cn}.key")) };
        std::fs::write(&out.cert, cert.pem()).expect("write client cert");
        write_key(&out.key, &key.serialize_pem());
        out
    }
}

/// Creates a CA and a server certificate in `dir`.
pub fn make_pki(dir: &Path) -> TestPki {
    let ca_key = KeyPair::generate().expect("CA key");
    let ca_key_pem = ca_key.serialize_pem();
    let ca_params = ca_params();
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
        ca_key: dir.join("ca.key"),
    };
    std::fs::write(&pki.ca_cert, ca_cert.pem()).expect("write ca");
    std::fs::write(&pki.server_cert, cert.pem()).expect("write cert");
    write_key(&pki.server_key, &key.serialize_pem());
    write_key(&pki.ca_key, &ca_key_pem);
    pki
}
