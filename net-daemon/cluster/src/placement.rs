//! Placement: which host should own each partition (pure).
//!
//! The metadata leader calls [`desired_owners`] with the partition table and
//! the hosts' weights, and plans moves toward the answer ([`next_moves`]).
//! The solver gives each receiving host a quota of partitions proportional to
//! its weight (largest remainder, so the quotas add up exactly), lets every
//! host keep as many of its current partitions as its quota allows, and hands
//! the rest out to the hosts below their quota. Among the candidates for one
//! partition, the highest rendezvous score wins, so the answer depends on the
//! table and the hosts only, and a change of hosts moves few partitions:
//! adding a host moves about its share, and nothing moves between the others.
//!
//! Partitions of a host that is not a candidate at all (inactive: no copy can
//! be taken from it) stay where they are. A host that may keep but not
//! receive (its disk is past `cluster.max_fill_ratio`) keeps what it owns. A
//! leaving host keeps nothing.

use std::collections::BTreeMap;

use crate::ni::PartitionEntry;
use crate::HostId;

/// A host as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub(crate) host: HostId,
    /// Its share of the data, in any unit (its capacity).
    pub(crate) weight: u64,
    /// It may be given partitions.
    pub(crate) receives: bool,
    /// It may keep the partitions it owns (false while it leaves the cluster).
    pub(crate) keeps: bool,
}

/// The owner each partition should have.
pub(crate) fn desired_owners(table: &[PartitionEntry], candidates: &[Candidate]) -> Vec<HostId> {
    let mut desired: Vec<HostId> = table.iter().map(|entry| entry.owner).collect();
    let by_host: BTreeMap<HostId, &Candidate> = candidates.iter().map(|c| (c.host, c)).collect();
    let receivers: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.receives && c.keeps && c.weight > 0)
        .collect();
    if receivers.is_empty() {
        return desired;
    }
    // Partitions the receivers share: theirs, and those of hosts that must give theirs up.
    let shared: Vec<usize> = (0..table.len())
        .filter(|&p| match by_host.get(&table[p].owner) {
            Some(owner) => !owner.keeps || (owner.receives && owner.weight > 0),
            None => false,
        })
        .collect();
    let quotas = quotas(shared.len(), &receivers);
    let mut pool = Vec::new();
    for (receiver, &quota) in receivers.iter().zip(&quotas) {
        let mut owned: Vec<usize> = shared
            .iter()
            .copied()
            .filter(|&p| table[p].owner == receiver.host)
            .collect();
        owned.sort_by_key(|&p| std::cmp::Reverse(score(p, receiver.host)));
        pool.extend(owned.into_iter().skip(quota));
    }
    pool.extend(shared.iter().copied().filter(|&p| {
        by_host
            .get(&table[p].owner)
            .is_some_and(|owner| !owner.keeps)
    }));
    pool.sort_unstable();
    let mut in_pool = vec![false; table.len()];
    for &p in &pool {
        in_pool[p] = true;
    }
    let mut counts: Vec<usize> = receivers
        .iter()
        .map(|receiver| {
            shared
                .iter()
                .filter(|&&p| table[p].owner == receiver.host && !in_pool[p])
                .count()
        })
        .collect();
    for p in pool {
        let chosen = (0..receivers.len())
            .filter(|&i| counts[i] < quotas[i])
            .max_by_key(|&i| score(p, receivers[i].host));
        if let Some(i) = chosen {
            counts[i] += 1;
            desired[p] = receivers[i].host;
        }
    }
    desired
}

/// Moves to plan now: partitions whose owner differs from the desired one and that are
/// not moving yet, at most `max_in_flight` moving at once in all.
pub(crate) fn next_moves(
    table: &[PartitionEntry],
    desired: &[HostId],
    max_in_flight: usize,
) -> Vec<(u16, HostId)> {
    let in_flight = table.iter().filter(|entry| entry.target.is_some()).count();
    table
        .iter()
        .zip(desired)
        .enumerate()
        .filter(|(_, (entry, &want))| entry.target.is_none() && entry.owner != want)
        .map(|(p, (_, &want))| (p as u16, want))
        .take(max_in_flight.saturating_sub(in_flight))
        .collect()
}

/// Splits `total` partitions among the receivers in proportion to their weights; the
/// remainders go to the largest fractions (ties to the lower host id).
pub(crate) fn quotas(total: usize, receivers: &[&Candidate]) -> Vec<usize> {
    let weight_sum: u128 = receivers.iter().map(|r| u128::from(r.weight)).sum();
    let exact: Vec<(usize, u128)> = receivers
        .iter()
        .map(|r| {
            let scaled = total as u128 * u128::from(r.weight);
            ((scaled / weight_sum) as usize, scaled % weight_sum)
        })
        .collect();
    let mut quotas: Vec<usize> = exact.iter().map(|&(whole, _)| whole).collect();
    let left = total - quotas.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..receivers.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(exact[i].1), receivers[i].host));
    for &i in order.iter().take(left) {
        quotas[i] += 1;
    }
    quotas
}

/// The rendezvous score of a host for a partition (splitmix64 of both).
pub(crate) fn score(partition: usize, host: HostId) -> u64 {
    let mut x = (partition as u64) ^ host.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(owners: &[HostId]) -> Vec<PartitionEntry> {
        owners
            .iter()
            .map(|&owner| PartitionEntry::single(owner, 1))
            .collect()
    }

    fn host(host: HostId, weight: u64) -> Candidate {
        Candidate {
            host,
            weight,
            receives: true,
            keeps: true,
        }
    }

    fn counts(owners: &[HostId]) -> BTreeMap<HostId, usize> {
        let mut counts = BTreeMap::new();
        for &owner in owners {
            *counts.entry(owner).or_default() += 1;
        }
        counts
    }

    #[test]
    fn shares_follow_the_weights_exactly() {
        let start = table(&[1; 256]);
        let desired = desired_owners(&start, &[host(1, 1), host(2, 2), host(3, 4)]);
        let counts = counts(&desired);
        // 256 × 1/7, 2/7, 4/7 = 36.6, 73.1, 146.3.
        assert_eq!(counts[&1], 37);
        assert_eq!(counts[&2], 73);
        assert_eq!(counts[&3], 146);
    }

    #[test]
    fn a_new_host_takes_only_its_share_from_the_others() {
        let three = [host(1, 10), host(2, 10), host(3, 10)];
        let before = desired_owners(&table(&[1; 256]), &three);
        let mut four = three.to_vec();
        four.push(host(4, 10));
        let after = desired_owners(&table(&before), &four);
        let moved: Vec<usize> = (0..256).filter(|&p| before[p] != after[p]).collect();
        assert_eq!(counts(&after)[&4], 64);
        assert_eq!(moved.len(), 64, "only the new host's share moves");
        assert!(moved.iter().all(|&p| after[p] == 4));
    }

    #[test]
    fn a_balanced_table_stays_as_it_is() {
        let hosts = [host(1, 3), host(2, 5), host(3, 8)];
        let once = desired_owners(&table(&[2; 256]), &hosts);
        assert_eq!(desired_owners(&table(&once), &hosts), once);
    }

    #[test]
    fn a_leaving_host_gives_everything_away_and_inactive_hosts_keep_theirs() {
        let hosts = [host(1, 1), host(2, 1), host(3, 1)];
        let start = desired_owners(&table(&[1; 255]), &hosts);
        let mut leaving = hosts.to_vec();
        leaving[1].keeps = false;
        leaving[1].receives = false;
        let after = desired_owners(&table(&start), &leaving);
        assert_eq!(counts(&after).get(&2), None);
        assert_eq!(counts(&after)[&1] + counts(&after)[&3], 255);
        // Host 3 inactive: not a candidate; its partitions stay, nothing goes to it.
        let after = desired_owners(&table(&start), &hosts[..2]);
        assert_eq!(counts(&after)[&3], counts(&start)[&3]);
        assert!((0..255).all(|p| start[p] != 3 || after[p] == 3));
    }

    #[test]
    fn a_full_host_keeps_its_partitions_and_gets_no_more() {
        let mut hosts = vec![host(1, 1), host(2, 1)];
        let start = desired_owners(&table(&[1; 100]), &hosts);
        hosts.push(host(3, 1));
        hosts[0].receives = false;
        let after = desired_owners(&table(&start), &hosts);
        assert_eq!(counts(&after)[&1], counts(&start)[&1]);
        assert_eq!(
            counts(&after)[&2] + counts(&after)[&3],
            100 - counts(&start)[&1]
        );
    }

    #[test]
    fn moves_are_limited_and_skip_partitions_already_moving() {
        let mut current = table(&[1; 8]);
        current[0].target = Some(2);
        let desired = vec![2; 8];
        let moves = next_moves(&current, &desired, 3);
        assert_eq!(moves, vec![(1, 2), (2, 2)]);
    }
}
