//! The heartbeat packet: fixed layout, HMAC-SHA256 over a shared cluster key.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "TNHB"
//! 4       1     version (2)
//! 5       1     link index
//! 6       1     cluster name length n (1..=64)
//! 7       n     cluster name (UTF-8)
//! 7+n     4     sender node id (big endian)
//! 11+n    4     receiver node id
//! 15+n    8     sender incarnation
//! 23+n    8     sequence number
//! 31+n    1     flags: bit 0 = sender in standby; other bits zero
//! 32+n    32    HMAC-SHA256(key, bytes 0..32+n)
//! ```
//!
//! Version 2 added the flags byte; packets of any other version are `Malformed`.
//!
//! The content carries no timestamps (receivers judge freshness on their own
//! monotonic clock). The receiver id and link index are authenticated so a
//! captured packet cannot be replayed to another node or onto another link;
//! the (incarnation, sequence) check in the core rejects replays on the same
//! link.

use hmac::{KeyInit, Mac};
use sha2::Sha256;
use tandem_monitors::Secret;

use crate::core::NodeId;

type HmacSha256 = hmac::Hmac<Sha256>;

const MAGIC: &[u8; 4] = b"TNHB";
const VERSION: u8 = 2;
/// Bytes after the cluster name, before the MAC: ids, incarnation, sequence, flags.
const FIELDS: usize = 4 + 4 + 8 + 8 + 1;
const FLAG_STANDBY: u8 = 0x01;
const MAC_LEN: usize = 32;
/// Longest cluster name a packet can carry.
pub const MAX_CLUSTER_NAME: usize = 64;
/// Largest valid packet; anything longer is dropped unread.
pub const MAX_PACKET: usize = 7 + MAX_CLUSTER_NAME + FIELDS + MAC_LEN;

/// A heartbeat's authenticated content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// The link it was sent on.
    pub link: u8,
    /// The sender.
    pub from: NodeId,
    /// The node it is addressed to.
    pub to: NodeId,
    /// The sender's incarnation.
    pub incarnation: u64,
    /// The sender's sequence number.
    pub seq: u64,
    /// Whether the sender is in standby (planned maintenance).
    pub standby: bool,
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not a Tandem heartbeat of this version or cut short (wrong magic, version, length or
    /// unknown flags).
    #[error("heartbeat packet is malformed (wrong magic, version, length or flags)")]
    Malformed,
    /// Longer than [`MAX_PACKET`].
    #[error("heartbeat packet is longer than {MAX_PACKET} bytes")]
    Oversize,
    /// A well-formed packet of another cluster.
    #[error("heartbeat packet belongs to another cluster")]
    ForeignCluster,
    /// The MAC does not verify: wrong key or tampered content.
    #[error("heartbeat packet fails authentication (wrong cluster key or tampered)")]
    BadMac,
}

/// Invalid codec parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The cluster name does not fit a packet.
    #[error("cluster name must be 1 to {MAX_CLUSTER_NAME} bytes long, got {0} bytes; shorten it")]
    ClusterName(usize),
    /// The key is too short to be a secret.
    #[error("cluster key must be at least 16 bytes long; generate one with e.g. `openssl rand -hex 32`")]
    WeakKey,
}

/// Encodes and verifies heartbeats for one cluster name and key.
#[derive(Clone)]
pub struct Codec {
    name: Vec<u8>,
    mac: HmacSha256,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec").field("cluster", &String::from_utf8_lossy(&self.name)).field("key", &"***").finish()
    }
}

impl Codec {
    /// A codec for `cluster` authenticated with `key`.
    pub fn new(cluster: &str, key: &Secret) -> Result<Self, CodecError> {
        if cluster.is_empty() || cluster.len() > MAX_CLUSTER_NAME {
            return Err(CodecError::ClusterName(cluster.len()));
        }
        if key.expose().len() < 16 {
            return Err(CodecError::WeakKey);
        }
        let mac = HmacSha256::new_from_slice(key.expose().as_bytes()).map_err(|_| CodecError::WeakKey)?;
        Ok(Self { name: cluster.as_bytes().to_vec(), mac })
    }

    /// The packet for `hb`.
    pub fn encode(&self, hb: &Heartbeat) -> Vec<u8> {
        let mut p = Vec::with_capacity(MAX_PACKET);
        p.extend_from_slice(MAGIC);
        p.push(VERSION);
        p.push(hb.link);
        // The constructor bounds the name to 64 bytes.
        p.push(self.name.len() as u8);
        p.extend_from_slice(&self.name);
        p.extend_from_slice(&hb.from.0.to_be_bytes());
        p.extend_from_slice(&hb.to.0.to_be_bytes());
        p.extend_from_slice(&hb.incarnation.to_be_bytes());
        p.extend_from_slice(&hb.seq.to_be_bytes());
        p.push(if hb.standby { FLAG_STANDBY } else { 0 });
        let mut mac = self.mac.clone();
        mac.update(&p);
        p.extend_from_slice(&mac.finalize().into_bytes());
        p
    }

    /// Parses and authenticates a packet. Never panics, whatever the bytes.
    pub fn decode(&self, p: &[u8]) -> Result<Heartbeat, WireError> {
        if p.len() > MAX_PACKET {
            return Err(WireError::Oversize);
        }
        if p.len() < 7 || &p[..4] != MAGIC || p[4] != VERSION {
            return Err(WireError::Malformed);
        }
        let n = usize::from(p[6]);
        if n == 0 || n > MAX_CLUSTER_NAME || p.len() != 7 + n + FIELDS + MAC_LEN {
            return Err(WireError::Malformed);
        }
        if p[7..7 + n] != self.name[..] {
            return Err(WireError::ForeignCluster);
        }
        let body = &p[..p.len() - MAC_LEN];
        let mut mac = self.mac.clone();
        mac.update(body);
        // verify_slice compares in constant time.
        mac.verify_slice(&p[p.len() - MAC_LEN..]).map_err(|_| WireError::BadMac)?;
        let f = &p[7 + n..];
        let u32_at = |i: usize| u32::from_be_bytes([f[i], f[i + 1], f[i + 2], f[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&f[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let flags = f[24];
        if flags & !FLAG_STANDBY != 0 {
            return Err(WireError::Malformed);
        }
        Ok(Heartbeat {
            link: p[5],
            from: NodeId(u32_at(0)),
            to: NodeId(u32_at(4)),
            incarnation: u64_at(8),
            seq: u64_at(16),
            standby: flags & FLAG_STANDBY != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn codec(name: &str, key: &str) -> Codec {
        Codec::new(name, &Secret::new(key)).unwrap()
    }

    const KEY: &str = "0123456789abcdef0123456789abcdef";

    fn hb() -> Heartbeat {
        Heartbeat { link: 1, from: NodeId(2), to: NodeId(3), incarnation: 77, seq: 9, standby: false }
    }

    #[test]
    fn round_trip() {
        let c = codec("prod", KEY);
        let p = c.encode(&hb());
        assert_eq!(p.len(), 7 + 4 + 25 + 32);
        assert_eq!(c.decode(&p), Ok(hb()));
    }

    #[test]
    fn the_standby_flag_round_trips_is_authenticated_and_old_versions_are_refused() {
        let c = codec("prod", KEY);
        let on = Heartbeat { standby: true, ..hb() };
        let p = c.encode(&on);
        assert_eq!(c.decode(&p), Ok(on));
        let flags = p.len() - MAC_LEN - 1;
        assert_eq!(p[flags], 1);
        // Clearing the flag without the key breaks the MAC.
        let mut q = p.clone();
        q[flags] = 0;
        assert_eq!(c.decode(&q), Err(WireError::BadMac));
        // Unknown flag bits (even authenticated) are not this version's packet.
        let mut q = p[..flags].to_vec();
        q.push(0x03);
        let mut mac = c.mac.clone();
        mac.update(&q);
        q.extend_from_slice(&mac.finalize().into_bytes());
        assert_eq!(c.decode(&q), Err(WireError::Malformed));
        // A version-1 packet (no flags byte, version 1) is malformed, not misread.
        let mut v1 = p[..flags].to_vec();
        v1[4] = 1;
        let mut mac = c.mac.clone();
        mac.update(&v1);
        v1.extend_from_slice(&mac.finalize().into_bytes());
        assert_eq!(c.decode(&v1), Err(WireError::Malformed));
        let mut v1_sized = p.clone();
        v1_sized[4] = 1;
        assert_eq!(c.decode(&v1_sized), Err(WireError::Malformed));
    }

    #[test]
    fn wrong_key_foreign_cluster_and_tampering_are_refused() {
        let p = codec("prod", KEY).encode(&hb());
        assert_eq!(codec("prod", "another key, sixteen+ bytes").decode(&p), Err(WireError::BadMac));
        assert_eq!(codec("test", KEY).decode(&p), Err(WireError::ForeignCluster));
        let c = codec("prod", KEY);
        for i in 0..p.len() {
            let mut q = p.clone();
            q[i] ^= 0x01;
            assert!(c.decode(&q).is_err(), "flipping byte {i} went unnoticed");
        }
        assert_eq!(c.decode(&p[..p.len() - 1]), Err(WireError::Malformed));
        assert_eq!(c.decode(&[0u8; MAX_PACKET + 1]), Err(WireError::Oversize));
    }

    #[test]
    fn codec_parameters_are_checked_and_key_never_printed() {
        assert_eq!(Codec::new("", &Secret::new(KEY)).unwrap_err(), CodecError::ClusterName(0));
        assert_eq!(Codec::new(&"x".repeat(65), &Secret::new(KEY)).unwrap_err(), CodecError::ClusterName(65));
        assert_eq!(Codec::new("prod", &Secret::new("short")).unwrap_err(), CodecError::WeakKey);
        let dbg = format!("{:?}", codec("prod", KEY));
        assert!(!dbg.contains(KEY) && dbg.contains("prod"), "{dbg}");
    }

    proptest! {
        #[test]
        fn garbage_never_panics_nor_verifies(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert!(codec("prod", KEY).decode(&bytes).is_err());
        }

        #[test]
        fn garbage_with_valid_header_never_verifies(tail in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut p = b"TNHB\x02\x00\x04prod".to_vec();
            p.extend_from_slice(&tail);
            prop_assert!(codec("prod", KEY).decode(&p).is_err());
        }
    }
}
