//! The engine's [`LeaseNote`] as the bytes of a lease value block.
//!
//! Layout (version 1, little endian): version `u8`, desired `u8` (0 started, 1 stopped: not
//! auto-started, 2 stopped by an operator, 3 stopped by the failover limit), preferred node
//! `u16` (0: none), desired_seq `u64`, reset_seq `u64`, failovers `u32`, count `u8`, then
//! `count` node ids `u16`; desired 4 is "parked" (stopped by a node entering standby in
//! park mode) and is followed by the parking node's id `u16`. Then, optionally, a live
//! migration handed over with the lease: the node it went to `u16` and the migrating
//! holder's token `u64` (absent: none); an older agent ignores it, and a note without it
//! decodes as "none". Node ids are 1..=2000 (the configuration
//! enforces it), so `u16` holds them. A value that does not decode is reported, never
//! guessed at.

use tandem_engine::{Desired, LeaseNote, LeaseToken, Migrated, NodeId, StopCause};

const VERSION: u8 = 1;
const FIXED: usize = 1 + 1 + 2 + 8 + 8 + 4 + 1;

/// The largest note: the fixed part plus 32 failed-on nodes.
pub const MAX_NOTE_LEN: usize = FIXED + 2 * MAX_FAILED_ON + 2 + 2 + 8;
/// How many failed-on nodes a note keeps. More than that only matters for ranking among
/// nodes that all failed, so the oldest entries beyond it are dropped (lowest ids kept).
pub const MAX_FAILED_ON: usize = 32;

/// A value block that is not a note of this version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    /// Too short for its own header or node list.
    #[error("lease note is truncated ({0} bytes)")]
    Truncated(usize),
    /// Written by another version of Tandem.
    #[error(
        "lease note has version {0}, this agent reads version {VERSION}; run the same Tandem version on every node"
    )]
    Version(u8),
    /// A field holds a value no agent writes.
    #[error("lease note field `{0}` holds an invalid value")]
    Invalid(&'static str),
}

/// Encodes a note.
pub fn encode(note: &LeaseNote) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_NOTE_LEN);
    out.push(VERSION);
    out.push(match note.desired {
        Desired::Started => 0,
        Desired::Stopped(StopCause::NotAutoStarted) => 1,
        Desired::Stopped(StopCause::Operator) => 2,
        Desired::Stopped(StopCause::FailoverLimit) => 3,
        Desired::Stopped(StopCause::Parked(_)) => 4,
    });
    out.extend_from_slice(&id16(note.preferred).to_le_bytes());
    out.extend_from_slice(&note.desired_seq.to_le_bytes());
    out.extend_from_slice(&note.reset_seq.to_le_bytes());
    out.extend_from_slice(&note.failovers.to_le_bytes());
    let failed: Vec<u16> = note.failed_on.iter().take(MAX_FAILED_ON).map(|n| id16(Some(*n))).collect();
    out.push(failed.len() as u8);
    for id in failed {
        out.extend_from_slice(&id.to_le_bytes());
    }
    if let Desired::Stopped(StopCause::Parked(n)) = note.desired {
        out.extend_from_slice(&id16(Some(n)).to_le_bytes());
    }
    if let Some(m) = note.migrated {
        out.extend_from_slice(&id16(Some(m.to)).to_le_bytes());
        out.extend_from_slice(&m.by_token.0.to_le_bytes());
    }
    out
}

/// Decodes a note.
pub fn decode(bytes: &[u8]) -> Result<LeaseNote, NoteError> {
    if bytes.len() < FIXED {
        return Err(NoteError::Truncated(bytes.len()));
    }
    if bytes[0] != VERSION {
        return Err(NoteError::Version(bytes[0]));
    }
    let mut desired = match bytes[1] {
        0 => Desired::Started,
        1 => Desired::Stopped(StopCause::NotAutoStarted),
        2 => Desired::Stopped(StopCause::Operator),
        3 => Desired::Stopped(StopCause::FailoverLimit),
        // The parking node follows the failed-on list.
        4 => Desired::Stopped(StopCause::Parked(NodeId(0))),
        _ => return Err(NoteError::Invalid("desired")),
    };
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let preferred = match u16_at(2) {
        0 => None,
        n => Some(NodeId(u32::from(n))),
    };
    let desired_seq = u64_at(4);
    let reset_seq = u64_at(12);
    let failovers = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    let count = usize::from(bytes[24]);
    if bytes.len() < FIXED + 2 * count {
        return Err(NoteError::Truncated(bytes.len()));
    }
    let mut failed_on = Vec::with_capacity(count);
    for i in 0..count {
        match u16_at(FIXED + 2 * i) {
            0 => return Err(NoteError::Invalid("failed_on")),
            n => failed_on.push(NodeId(u32::from(n))),
        }
    }
    let mut at = FIXED + 2 * count;
    if let Desired::Stopped(StopCause::Parked(_)) = desired {
        if bytes.len() < at + 2 {
            return Err(NoteError::Truncated(bytes.len()));
        }
        match u16_at(at) {
            0 => return Err(NoteError::Invalid("parked_by")),
            n => desired = Desired::Stopped(StopCause::Parked(NodeId(u32::from(n)))),
        }
        at += 2;
    }
    // Optional: absent in notes written before live migration existed.
    let migrated = match bytes.len() >= at + 10 {
        true if u16_at(at) != 0 => {
            Some(Migrated { to: NodeId(u32::from(u16_at(at))), by_token: LeaseToken(u64_at(at + 2)) })
        }
        _ => None,
    };
    failed_on.sort();
    failed_on.dedup();
    Ok(LeaseNote { desired, preferred, desired_seq, reset_seq, failovers, failed_on, migrated })
}

fn id16(n: Option<NodeId>) -> u16 {
    // Node ids are bounded by the configuration (1..=2000); saturate rather than wrap.
    n.map_or(0, |n| u16::try_from(n.0).unwrap_or(u16::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn desired() -> impl Strategy<Value = Desired> {
        prop_oneof![
            Just(Desired::Started),
            Just(Desired::Stopped(StopCause::NotAutoStarted)),
            Just(Desired::Stopped(StopCause::Operator)),
            Just(Desired::Stopped(StopCause::FailoverLimit)),
            (1u32..=2000).prop_map(|n| Desired::Stopped(StopCause::Parked(NodeId(n)))),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(d in desired(), p in proptest::option::of(1u32..=2000), ds: u64, rs: u64, f: u32,
                      mut failed in proptest::collection::vec(1u32..=2000, 0..=MAX_FAILED_ON),
                      m in proptest::option::of((1u32..=2000, any::<u64>()))) {
            failed.sort();
            failed.dedup();
            let note = LeaseNote {
                desired: d, preferred: p.map(NodeId), desired_seq: ds, reset_seq: rs, failovers: f,
                failed_on: failed.into_iter().map(NodeId).collect(),
                migrated: m.map(|(to, t)| Migrated { to: NodeId(to), by_token: LeaseToken(t) }),
            };
            let bytes = encode(&note);
            prop_assert!(bytes.len() <= MAX_NOTE_LEN);
            prop_assert_eq!(decode(&bytes).unwrap(), note);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn damaged_notes_are_refused() {
        let note = LeaseNote {
            desired: Desired::Started,
            preferred: None,
            desired_seq: 1,
            reset_seq: 0,
            failovers: 2,
            failed_on: vec![NodeId(1), NodeId(2)],
            migrated: None,
        };
        let bytes = encode(&note);
        assert_eq!(decode(&bytes[..bytes.len() - 1]), Err(NoteError::Truncated(bytes.len() - 1)));
        let mut v = bytes.clone();
        v[0] = 9;
        assert_eq!(decode(&v), Err(NoteError::Version(9)));
        let mut v = bytes.clone();
        v[1] = 7;
        assert_eq!(decode(&v), Err(NoteError::Invalid("desired")));
        assert_eq!(decode(&[]), Err(NoteError::Truncated(0)));
    }

    #[test]
    fn the_migration_target_is_optional_and_older_notes_have_none() {
        let mut note = LeaseNote {
            desired: Desired::Stopped(StopCause::Parked(NodeId(3))),
            preferred: Some(NodeId(2)),
            desired_seq: 4,
            reset_seq: 1,
            failovers: 0,
            failed_on: vec![NodeId(5)],
            migrated: None,
        };
        let old = encode(&note);
        assert_eq!(decode(&old).unwrap().migrated, None, "a note without the field");
        note.migrated = Some(Migrated { to: NodeId(2), by_token: LeaseToken(41) });
        let new = encode(&note);
        assert_eq!(new.len(), old.len() + 10, "appended after the parking node");
        assert_eq!(&new[..old.len()], &old[..], "an older agent reads the same note");
        assert_eq!(decode(&new).unwrap(), note);
    }
}
