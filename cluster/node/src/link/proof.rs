//! The host–guest link's mutual authentication: both ends prove they hold the VM's link
//! key with an HMAC-SHA256 over both ends' fresh nonces; the key itself never travels.
//!
//! ```text
//! host_proof  = HMAC(key, "tandem-link/host"  || uuid || guest_nonce || host_nonce)
//! guest_proof = HMAC(key, "tandem-link/guest" || uuid || host_nonce  || guest_nonce)
//! ```
//!
//! `uuid` is the VM's UUID as lowercase 8-4-4-4-12 text and both nonces are exactly
//! [`NONCE_LEN`] bytes, so the concatenation is unambiguous. The two labels keep one side's
//! proof from ever being valid as the other side's.

use hmac::{KeyInit, Mac};
use sha2::Sha256;
use tandem_monitors::Secret;

type HmacSha256 = hmac::Hmac<Sha256>;

/// Length of each side's nonce, in bytes.
pub const NONCE_LEN: usize = 32;

/// Shortest link key accepted, in characters.
pub const MIN_KEY_LEN: usize = 16;

const HOST_LABEL: &[u8] = b"tandem-link/host";
const GUEST_LABEL: &[u8] = b"tandem-link/guest";

/// A fresh random nonce.
pub fn nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

/// Why a link key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("cannot read the link key")]
    Read(#[source] tandem_monitors::secret::SecretError),
    /// The key is too short to resist guessing.
    #[error("the link key is shorter than {MIN_KEY_LEN} characters; write at least {MIN_KEY_LEN} random characters")]
    Weak,
}

/// Reads a link key file (its first line), refusing weak keys.
pub fn read_key(path: &std::path::Path) -> Result<Secret, KeyError> {
    let key = tandem_monitors::SecretSource::File(path.to_path_buf()).resolve().map_err(KeyError::Read)?;
    if key.expose().chars().count() < MIN_KEY_LEN {
        return Err(KeyError::Weak);
    }
    Ok(key)
}

/// The UUID in its canonical form (lowercase 8-4-4-4-12), or `None` when it is not one.
pub fn canonical_uuid(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split('-').collect();
    let ok = parts.len() == 5
        && parts.iter().zip([8, 4, 4, 4, 12]).all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()));
    ok.then(|| s.to_ascii_lowercase())
}

fn mac(key: &Secret, label: &[u8], uuid: &str, first: &[u8], second: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key.expose().as_bytes()).expect("HMAC takes keys of any length");
    m.update(label);
    m.update(uuid.as_bytes());
    m.update(first);
    m.update(second);
    m
}

/// The host's proof for this connection.
pub fn host_proof(key: &Secret, uuid: &str, guest_nonce: &[u8], host_nonce: &[u8]) -> Vec<u8> {
    mac(key, HOST_LABEL, uuid, guest_nonce, host_nonce).finalize().into_bytes().to_vec()
}

/// The guest's proof for this connection.
pub fn guest_proof(key: &Secret, uuid: &str, host_nonce: &[u8], guest_nonce: &[u8]) -> Vec<u8> {
    mac(key, GUEST_LABEL, uuid, host_nonce, guest_nonce).finalize().into_bytes().to_vec()
}

/// Whether `proof` is the host's proof (compared in constant time).
pub fn verify_host_proof(key: &Secret, uuid: &str, guest_nonce: &[u8], host_nonce: &[u8], proof: &[u8]) -> bool {
    mac(key, HOST_LABEL, uuid, guest_nonce, host_nonce).verify_slice(proof).is_ok()
}

/// Whether `proof` is the guest's proof (compared in constant time).
pub fn verify_guest_proof(key: &Secret, uuid: &str, host_nonce: &[u8], guest_nonce: &[u8], proof: &[u8]) -> bool {
    mac(key, GUEST_LABEL, uuid, host_nonce, guest_nonce).verify_slice(proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b01";

    #[test]
    fn proofs_bind_key_uuid_nonces_and_side() {
        let key = Secret::new("0123456789abcdef-link");
        let (g, h) = (nonce(), nonce());
        assert_ne!(g, h, "nonces are random");
        let hp = host_proof(&key, UUID, &g, &h);
        assert!(verify_host_proof(&key, UUID, &g, &h, &hp));
        assert!(!verify_host_proof(&Secret::new("another key, long enough"), UUID, &g, &h, &hp));
        assert!(!verify_host_proof(&key, "4f1c2a9e-7b3d-4c55-9a61-0e2f8d7c6b02", &g, &h, &hp));
        assert!(!verify_host_proof(&key, UUID, &h, &g, &hp), "nonces in the other order");
        assert!(!verify_host_proof(&key, UUID, &g, &nonce(), &hp), "another connection's nonce");
        assert!(!verify_host_proof(&key, UUID, &g, &h, &hp[..31]), "truncated");
        // The host's proof is never the guest's, even with the nonces swapped.
        assert!(!verify_guest_proof(&key, UUID, &g, &h, &hp));
        let gp = guest_proof(&key, UUID, &h, &g);
        assert!(verify_guest_proof(&key, UUID, &h, &g, &gp));
        assert_ne!(gp, hp);
    }

    #[test]
    fn uuids_are_canonical_lowercase() {
        assert_eq!(canonical_uuid("4F1C2A9E-7B3D-4C55-9A61-0E2F8D7C6B01").as_deref(), Some(UUID));
        assert_eq!(canonical_uuid("4f1c2a9e7b3d4c559a610e2f8d7c6b01"), None);
        assert_eq!(canonical_uuid("../../etc/passwd"), None);
    }
}
