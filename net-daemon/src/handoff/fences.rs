//! Which local fences to change so that they match the NI: a pure decision.
//!
//! [`plan`] owns the rule of `super::reconcile`: a partition this host owns and is not
//! handing off is served (its fence lifted; with followers, replication owns the fence
//! of its primary: a promise of a higher term sets it and opening a term lifts it); a
//! partition it follows (a replica) is
//! fenced, so that clients, expiry and log retention leave the copy to replication; a
//! partition it neither owns, follows nor receives is fenced and its copy cleared,
//! once; a partition with a move driven here is left to that move. It reads no worker and no NI itself: the shell passes the fences it read
//! and the table, and performs the steps. It must never do I/O.

use std::collections::{BTreeSet, HashSet};

use shoal_shared::frame::Partition;

use shoal_cluster::ni::PartitionEntry;
use shoal_cluster::HostId;

/// One change to make to a local worker, for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FenceStep {
    /// This host owns the partition and no move runs: lift its fence.
    Unfence(Partition),
    /// This host follows the partition: fence it, and keep the copy.
    Fence(Partition),
    /// The partition is `owner`'s and does not move here: fence it (unless it is fenced
    /// already), then clear its copy; once cleared, count it in `cleared`.
    FenceAndClear {
        partition: Partition,
        owner: HostId,
        already_fenced: bool,
    },
}

/// The steps, in partition order, that bring the fences in line with `table` (the NI's
/// partition entries, indexed by partition) for host `me`, given the partitions the
/// workers fence now (`fenced`), those with a move driven here (`driving`, left alone),
/// and those already cleared since this host last owned them (`cleared`, not cleared
/// again). Forgets, in `cleared`, the partitions `me` owns, so that losing one later
/// clears it again.
pub(crate) fn plan(
    table: &[PartitionEntry],
    me: HostId,
    fenced: &BTreeSet<Partition>,
    driving: &HashSet<Partition>,
    cleared: &mut HashSet<Partition>,
) -> Vec<FenceStep> {
    let mut steps = Vec::new();
    for (partition, entry) in table.iter().enumerate() {
        let partition = partition as Partition;
        if driving.contains(&partition) {
            continue;
        }
        let is_fenced = fenced.contains(&partition);
        if entry.owner == me {
            cleared.remove(&partition);
            // While a move away runs, the fence is the source's, for that move. With
            // followers, the fence is replication's: a promise of a higher term sets it,
            // and opening a term lifts it.
            if entry.target.is_none() && is_fenced && entry.replicas.is_empty() {
                steps.push(FenceStep::Unfence(partition));
            }
        } else if entry.replicas.contains(&me) {
            cleared.remove(&partition);
            if !is_fenced {
                steps.push(FenceStep::Fence(partition));
            }
        } else if entry.target != Some(me) && !cleared.contains(&partition) {
            steps.push(FenceStep::FenceAndClear {
                partition,
                owner: entry.owner,
                already_fenced: is_fenced,
            });
        }
    }
    steps
}
