//! Property tests of the record codecs: round trips, and arbitrary bytes
//! never panic a decoder.

use proptest::prelude::*;
use tandem_lease::Timeouts;
use tandem_lease::format::{
    BallotRecord, DeltaRecord, DeltaState, Header, LeaderRecord, LeaderState, LeaseValue, RECORD_LEN,
};

fn value() -> impl Strategy<Value = LeaseValue> {
    (any::<u32>(), any::<u64>(), any::<u64>(), "[a-z0-9._-]{0,64}")
        .prop_map(|(owner, generation, acquisition, name)| LeaseValue { owner, generation, acquisition, name })
}

proptest! {
    #[test]
    fn delta_round_trip(area_id: u64, host_id: u32, live: bool, generation: u64, incarnation: u64, renew_seq: u64, ts: u64) {
        let r = DeltaRecord {
            area_id, host_id, state: if live { DeltaState::Live } else { DeltaState::Free },
            generation, incarnation, renew_seq, timestamp_ms: ts,
        };
        prop_assert_eq!(DeltaRecord::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn leader_round_trip(area_id: u64, slot: u32, st in 0u8..3, lver: u64, v in value(), ts: u64) {
        let state = [LeaderState::Unclaimed, LeaderState::Held, LeaderState::Released][st as usize];
        let r = LeaderRecord { area_id, slot, state, lver, value: v, timestamp_ms: ts };
        prop_assert_eq!(LeaderRecord::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn ballot_round_trip(area_id: u64, slot: u32, host_id: u32, lver: u64, mbal: u64, bal: u64, v in value()) {
        let r = BallotRecord { area_id, slot, host_id, lver, mbal, bal, value: v };
        prop_assert_eq!(BallotRecord::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn header_round_trip(big: bool, hosts in 1u32..=255, res in 1u32..=4096, r in 100u64..100_000, area_id: u64, cluster in "[a-zA-Z0-9-]{1,64}") {
        let h = Header {
            sector_size: if big { 4096 } else { 512 },
            host_slots: hosts,
            resource_slots: res,
            timeouts: Timeouts::from_renewal_ms(r),
            area_id,
            cluster_id: cluster,
        };
        prop_assert_eq!(Header::decode(&h.encode().unwrap()).unwrap(), h);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
        let _ = Header::decode(&bytes);
        let _ = DeltaRecord::decode(&bytes);
        let _ = LeaderRecord::decode(&bytes);
        let _ = BallotRecord::decode(&bytes);
    }

    /// Valid magic and checksum around random fields: decoders must refuse or accept, never panic.
    #[test]
    fn random_fields_with_valid_checksum_never_panic(kind in 0u8..4, body in proptest::collection::vec(any::<u8>(), RECORD_LEN - 16)) {
        let magic: &[u8; 8] = match kind { 0 => b"TNDMLEAS", 1 => b"TNDMDLTA", 2 => b"TNDMLEAD", _ => b"TNDMBALT" };
        let mut b = [0u8; RECORD_LEN];
        b[..8].copy_from_slice(magic);
        b[12..16].copy_from_slice(&1u32.to_le_bytes());
        b[16..].copy_from_slice(&body);
        let c = crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&b[..8]), &[0; 4]), &b[12..]);
        b[8..12].copy_from_slice(&c.to_le_bytes());
        let _ = Header::decode(&b);
        let _ = DeltaRecord::decode(&b);
        let _ = LeaderRecord::decode(&b);
        let _ = BallotRecord::decode(&b);
    }

    /// Any single flipped bit in a record is detected.
    #[test]
    fn bit_flips_are_detected(pos in 0usize..RECORD_LEN * 8, v in value()) {
        let r = LeaderRecord { area_id: 7, slot: 1, state: LeaderState::Held, lver: 3, value: v, timestamp_ms: 9 };
        let mut b = r.encode();
        b[pos / 8] ^= 1 << (pos % 8);
        prop_assert!(LeaderRecord::decode(&b).is_err());
    }
}
