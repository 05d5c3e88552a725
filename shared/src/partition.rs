//! Routing a key: key → slot → partition → worker.
//!
//! A key's slot is CRC16(key) mod 16384 with `{hash tags}`, exactly as in Redis
//! Cluster. Slots are grouped into `partitions` contiguous ranges; the
//! partition is the unit of storage, logging and (later) placement. On one
//! host, partition `p` belongs to worker `p mod workers`. These functions are
//! pure and shared by every process, so they always agree.

/// A partition index.
pub type Partition = u16;

/// Number of hash slots, as in Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The hash slot of a key. If the key contains `{...}` with at least one byte
/// between the braces, only that part is hashed.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16::State::<crc16::XMODEM>::calculate(hashed) % SLOTS
}

/// The partition that holds a slot: slots are split into `partitions` contiguous ranges.
pub fn slot_partition(slot: u16, partitions: u16) -> u16 {
    (u32::from(slot) * u32::from(partitions) / u32::from(SLOTS)) as u16
}

/// The partition of a key.
pub fn key_partition(key: &[u8], partitions: u16) -> u16 {
    slot_partition(key_slot(key), partitions)
}

/// The local worker that owns a partition.
pub fn partition_worker(partition: u16, workers: usize) -> usize {
    usize::from(partition) % workers
}

/// The partitions a worker owns, in increasing order.
pub fn worker_partitions(worker: usize, workers: usize, partitions: u16) -> Vec<u16> {
    (0..partitions)
        .filter(|&p| partition_worker(p, workers) == worker)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        // Values from Redis Cluster's `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"123456789"), 0x31C3 % SLOTS);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    #[test]
    fn partitions_are_contiguous_slot_ranges() {
        assert_eq!(slot_partition(0, 256), 0);
        assert_eq!(slot_partition(63, 256), 0);
        assert_eq!(slot_partition(64, 256), 1);
        assert_eq!(slot_partition(SLOTS - 1, 256), 255);
        assert_eq!(slot_partition(SLOTS - 1, 1), 0);
        assert_eq!(slot_partition(SLOTS - 1, SLOTS), SLOTS - 1);
        let mut last = 0;
        for slot in 0..SLOTS {
            let p = slot_partition(slot, 7);
            assert!(p == last || p == last + 1);
            last = p;
        }
        assert_eq!(last, 6);
    }

    #[test]
    fn every_partition_has_exactly_one_worker() {
        let owned: usize = (0..3).map(|w| worker_partitions(w, 3, 256).len()).sum();
        assert_eq!(owned, 256);
        assert_eq!(partition_worker(5, 3), 2);
    }
}
