//! Round-trip properties of the storage layout: every encoder's output decodes to
//! what was encoded, and a cut-short record is an error, never a panic.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use shoal_shared::frame::ChangeType;
use shoal_shared::layout::{
    decode_expiry_key, decode_log_entry, decode_partition_meta, decode_value, encode_log_value,
    encode_partition_meta, encode_value, expiry_key, log_key, LogRecord, PartitionMeta,
};
use shoal_shared::limits::MAX_KEY_BYTES;

fn change() -> impl Strategy<Value = ChangeType> {
    prop_oneof![
        Just(ChangeType::Create),
        Just(ChangeType::Delete),
        Just(ChangeType::Update),
        Just(ChangeType::Marker)
    ]
}

proptest! {
    #[test]
    fn values_round_trip(
        commit_id in any::<u64>(),
        expires_at_ms in option::of(any::<u64>()),
        bytes in vec(any::<u8>(), 0..256),
    ) {
        let raw = encode_value(commit_id, expires_at_ms, &bytes);
        let value = decode_value(&raw).expect("decodes");
        prop_assert_eq!(value.commit_id, commit_id);
        prop_assert_eq!(value.expires_at_ms, expires_at_ms);
        prop_assert_eq!(value.bytes, &bytes[..]);
        // Shorter than its header is an error; longer cuts decode as shorter values.
        let header = if expires_at_ms.is_some() { 17 } else { 9 };
        for cut in 0..raw.len() {
            let decoded = decode_value(&raw[..cut]);
            if cut < header {
                prop_assert!(decoded.is_err(), "a {}-byte cut", cut);
            } else {
                prop_assert_eq!(decoded.expect("decodes").bytes, &bytes[..cut - header]);
            }
        }
    }

    /// An expiry of 0 is stored as "none", so expiries here start at 1.
    #[test]
    fn log_entries_round_trip(
        (partition, commit_id, timestamp_ms) in (any::<u16>(), any::<u64>(), any::<u64>()),
        change in change(),
        collection in any::<u16>(),
        expires_at_ms in option::of(1..=u64::MAX),
        key in vec(any::<u8>(), 0..=MAX_KEY_BYTES),
        data in vec(any::<u8>(), 0..256),
    ) {
        let record = LogRecord {
            timestamp_ms,
            change,
            collection,
            expires_at_ms,
            key: &key,
            data: &data,
        };
        let raw_key = log_key(partition, commit_id);
        let raw = encode_log_value(&record);
        let entry = decode_log_entry(&raw_key, &raw).expect("decodes");
        prop_assert_eq!(entry.partition, partition);
        prop_assert_eq!(entry.commit_id, commit_id);
        prop_assert_eq!(entry.timestamp_ms, timestamp_ms);
        prop_assert_eq!(entry.change, change);
        prop_assert_eq!(entry.collection, collection);
        prop_assert_eq!(entry.expires_at_ms, expires_at_ms);
        prop_assert_eq!(&entry.key, &key);
        prop_assert_eq!(&entry.data, &data);
        // A value cut inside its header or key is an error.
        for cut in 0..21 + key.len() {
            prop_assert!(decode_log_entry(&raw_key, &raw[..cut]).is_err(), "a {}-byte cut", cut);
        }
        for cut in 0..raw_key.len() {
            prop_assert!(decode_log_entry(&raw_key[..cut], &raw).is_err());
        }
    }

    #[test]
    fn expiry_keys_round_trip(
        expires_at_ms in any::<u64>(),
        collection in any::<u16>(),
        partition in any::<u16>(),
        key in vec(any::<u8>(), 0..=MAX_KEY_BYTES),
    ) {
        let raw = expiry_key(expires_at_ms, collection, partition, &key);
        let entry = decode_expiry_key(&raw).expect("decodes");
        prop_assert_eq!(
            (entry.expires_at_ms, entry.collection, entry.partition, entry.key),
            (expires_at_ms, collection, partition, &key[..])
        );
        for cut in 0..12 {
            prop_assert!(decode_expiry_key(&raw[..cut]).is_err());
        }
    }

    #[test]
    fn partition_meta_round_trips(
        last_commit_id in any::<u64>(),
        mtime_ms in any::<u64>(),
        trimmed_through in any::<u64>(),
    ) {
        let meta = PartitionMeta { last_commit_id, mtime_ms, trimmed_through };
        let raw = encode_partition_meta(meta);
        prop_assert_eq!(decode_partition_meta(&raw).expect("decodes"), meta);
        for cut in 0..raw.len() {
            prop_assert!(decode_partition_meta(&raw[..cut]).is_err());
        }
    }
}
