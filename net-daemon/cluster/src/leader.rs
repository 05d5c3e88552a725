//! The metadata leader's decisions (pure): what the leader commits each round.
//!
//! This module owns the leader's duties as functions from what the leader knows to
//! what it should do:
//! - [`membership_changes`]: the metadata group's members follow the NI (every host a
//!   learner at its current address, up to [`MAX_VOTERS`] voters among the hosts not
//!   inactive, hosts that left removed once they are no voters);
//! - [`judge`]: hosts that enough observers suspect become `inactive`, and hosts
//!   offline past the threshold lose the unused part of their id ranges;
//! - [`place`]: partitions move toward the owners [`crate::placement`] wants, a few
//!   at a time; moves whose target is gone are given up; leaving hosts that hold
//!   nothing any more are removed;
//! - [`misplaced`]: how far the partition table is from balanced.
//! - [`replicate`]: with more than one copy per partition, followers are added until
//!   each partition has `replicas` copies on distinct live hosts, and followers on hosts
//!   gone for good are dropped once a replacement is in place;
//! - [`failovers`]: the partitions whose primary is inactive and that need a failover
//!   round ([`crate::replication::failover`]).
//!
//! Its inputs are the NI, the observers' suspect reports with their ages, a view of
//! the metadata group's membership, `now_ms` and [`LeaderSettings`]; its outputs are
//! NI [`Command`]s to commit and [`MembershipChange`]s to make, in order. The I/O
//! around it (the leader loop in [`crate::node`]) gathers the inputs, calls it and
//! carries the outputs out. It talks to [`crate::liveness`] (the agreement rule) and
//! [`crate::placement`] (the solver) only. It must never do I/O, spawn a task, await,
//! or read a clock: time comes in as arguments.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::liveness::{decide_inactive, Suspicion};
use crate::ni::{Command, HostState, NetworkInfo, PartitionEntry};
use crate::placement::{desired_owners, next_moves, quotas, score, Candidate};
use crate::HostId;

/// Most voters of the metadata group.
pub(crate) const MAX_VOTERS: usize = 5;
/// A host made writable again is not judged for this long, while the observers'
/// scores of it recover.
pub(crate) const REJOIN_GRACE_MS: u64 = 10_000;
/// A learner this close to the leader's log counts as caught up and may become a voter.
pub(crate) const CAUGHT_UP_ENTRIES: u64 = 16;
/// Most partition moves running at once in the whole cluster.
pub(crate) const MAX_MOVES_IN_FLIGHT: usize = 4;
/// Most partitions with a new follower still out of sync at once in the whole cluster.
/// Higher than the moves: a follower's catching up reads the primary's log or copies
/// its records, and the primary keeps serving throughout, so a new cluster's empty
/// partitions get their copies quickly.
pub(crate) const MAX_CATCHING_UP: usize = 16;
/// Hosts whose estimated round trip is shorter than this (in seconds) are near each
/// other (one rack or site): a partition's copies go to hosts far apart first.
pub(crate) const NEAR_RTT_S: f64 = 0.002;
/// Most failover rounds (planned handovers included) running at once. A handover moves
/// no data; it pauses its partition for a few round trips.
pub(crate) const MAX_ROUNDS: usize = 16;
/// A report is never dropped sooner than this, however short the heartbeat interval.
const REPORT_FRESH_MIN: Duration = Duration::from_secs(3);
/// A report counts for this many heartbeat intervals.
const REPORT_FRESH_HEARTBEATS: u32 = 6;

/// What the leader is told once: the cluster's settings that its decisions follow.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LeaderSettings {
    /// How long an observer's report counts (see [`report_fresh_for`]).
    pub(crate) report_fresh_for: Duration,
    /// An inactive host offline this long loses the unused part of its id ranges.
    pub(crate) offline_threshold_ms: u64,
    /// `cluster.max_fill_ratio`: a host filled this much receives no partitions.
    pub(crate) max_fill_ratio: f64,
    /// Most partition moves, or planned handovers, running at once in the whole cluster.
    pub(crate) max_moves_in_flight: usize,
    /// Most partitions with a follower still out of sync at once ([`MAX_CATCHING_UP`]).
    pub(crate) max_catching_up: usize,
    /// `cluster.replicas`: copies of each partition, the primary's included.
    pub(crate) replicas: usize,
}

impl LeaderSettings {
    /// The settings of a host with this heartbeat interval, offline threshold and fill
    /// ratio, with [`MAX_MOVES_IN_FLIGHT`] and [`MAX_CATCHING_UP`].
    pub(crate) fn new(
        heartbeat_interval: Duration,
        offline_threshold_ms: u64,
        max_fill_ratio: f64,
    ) -> LeaderSettings {
        LeaderSettings {
            report_fresh_for: report_fresh_for(heartbeat_interval),
            offline_threshold_ms,
            max_fill_ratio,
            max_moves_in_flight: MAX_MOVES_IN_FLIGHT,
            max_catching_up: MAX_CATCHING_UP,
            replicas: 1,
        }
    }
}

/// How long an observer's report counts: six heartbeat intervals, at least 3 s.
pub(crate) fn report_fresh_for(heartbeat_interval: Duration) -> Duration {
    (heartbeat_interval * REPORT_FRESH_HEARTBEATS).max(REPORT_FRESH_MIN)
}

/// Whether a report this old still counts.
pub(crate) fn is_fresh(age: Duration, settings: &LeaderSettings) -> bool {
    age <= settings.report_fresh_for
}

/// One observer's latest report of the peers it suspects, as the leader holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SuspectReport {
    /// The host that reported.
    pub(crate) observer: HostId,
    /// How long ago the leader received it.
    pub(crate) age: Duration,
    /// The peers the observer suspects.
    pub(crate) suspects: Vec<HostId>,
    /// The peers the observer has a link to (and so can observe).
    pub(crate) observed: Vec<HostId>,
}

/// The metadata group's membership as the leader sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RaftMembership {
    /// The leader itself (always counts as caught up).
    pub(crate) leader: HostId,
    /// The voters.
    pub(crate) voters: BTreeSet<HostId>,
    /// Every member, voter or learner, at the address the group has for it.
    pub(crate) nodes: BTreeMap<HostId, String>,
    /// The index of the leader's last log entry (0 when the log is empty).
    pub(crate) last_log_index: u64,
    /// For each member whose progress the leader knows, the index up to which its log
    /// matches the leader's.
    pub(crate) matched_index: BTreeMap<HostId, u64>,
}

/// A change to the metadata group's members, to make in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MembershipChange {
    /// Adds `host` at `addr` as a learner (without waiting for it to catch up).
    AddLearner { host: HostId, addr: String },
    /// Gives these members these new addresses.
    SetAddresses(BTreeMap<HostId, String>),
    /// Makes exactly these hosts the voters (the others stay learners).
    ReplaceVoters(BTreeSet<HostId>),
    /// Removes these members (none of them is a voter).
    RemoveNodes(BTreeSet<HostId>),
}

/// The changes that make the group follow `ni`: every host of the NI is added as a
/// learner; then at most one more change, the first that applies of: members whose
/// address changed get the new one; the voters become the current voters not inactive
/// in the NI, topped up to [`MAX_VOTERS`] with hosts not inactive and caught up (in
/// host order); members no longer in the NI and no voters are removed.
///
/// All of it is decided from `membership` as it was before the first change, so the
/// learners added in this round are neither moved nor made voters until the next one.
pub(crate) fn membership_changes(
    ni: &NetworkInfo,
    membership: &RaftMembership,
) -> Vec<MembershipChange> {
    let nodes = &membership.nodes;
    let mut changes: Vec<MembershipChange> = ni
        .hosts
        .values()
        .filter(|host| !nodes.contains_key(&host.id))
        .map(|host| MembershipChange::AddLearner {
            host: host.id,
            addr: host.peer_addr.clone(),
        })
        .collect();
    let moved: BTreeMap<HostId, String> = ni
        .hosts
        .values()
        .filter(|host| {
            nodes
                .get(&host.id)
                .is_some_and(|addr| *addr != host.peer_addr)
        })
        .map(|host| (host.id, host.peer_addr.clone()))
        .collect();
    if !moved.is_empty() {
        changes.push(MembershipChange::SetAddresses(moved));
        return changes;
    }
    let voters = &membership.voters;
    let wanted = wanted_voters(ni, membership);
    if wanted != *voters && !wanted.is_empty() {
        changes.push(MembershipChange::ReplaceVoters(wanted));
        return changes;
    }
    // Hosts removed from the NI (they left) leave the group once they are no voters.
    let removed: BTreeSet<HostId> = nodes
        .keys()
        .copied()
        .filter(|host| !ni.hosts.contains_key(host) && !voters.contains(host))
        .collect();
    if !removed.is_empty() {
        changes.push(MembershipChange::RemoveNodes(removed));
    }
    changes
}

/// The voters the group should have: the current voters that are hosts of the NI and
/// not inactive, then hosts not inactive whose log is within [`CAUGHT_UP_ENTRIES`] of
/// the leader's, in host order, up to [`MAX_VOTERS`].
fn wanted_voters(ni: &NetworkInfo, membership: &RaftMembership) -> BTreeSet<HostId> {
    let caught_up = |host: HostId| {
        host == membership.leader
            || membership
                .matched_index
                .get(&host)
                .is_some_and(|&index| index + CAUGHT_UP_ENTRIES >= membership.last_log_index)
    };
    let writable = |host: HostId| {
        ni.hosts
            .get(&host)
            .is_some_and(|info| info.state != HostState::Inactive)
    };
    let mut wanted: BTreeSet<HostId> = membership
        .voters
        .iter()
        .copied()
        .filter(|&voter| writable(voter))
        .collect();
    for &host in ni.hosts.keys() {
        if wanted.len() >= MAX_VOTERS {
            break;
        }
        if writable(host) && caught_up(host) {
            wanted.insert(host);
        }
    }
    wanted
}

/// What one round of the leader commits, in order: the [`judge`]ments, then the
/// [`place`]ment.
pub(crate) fn round_commands(
    ni: &NetworkInfo,
    reports: &[SuspectReport],
    now_ms: u64,
    settings: &LeaderSettings,
) -> Vec<Command> {
    let mut commands = judge(ni, reports, now_ms, settings);
    if settings.replicas > 1 {
        commands.extend(replicate(ni, now_ms, settings));
    } else {
        commands.extend(place(ni, settings));
    }
    commands
}

/// Whether a host is gone for good as a holder of copies: it left the NI, is leaving,
/// or has been inactive for `offline_threshold_ms`.
fn gone(ni: &NetworkInfo, host: HostId, now_ms: u64, settings: &LeaderSettings) -> bool {
    ni.hosts.get(&host).is_none_or(|info| {
        info.leaving
            || (info.state == HostState::Inactive
                && now_ms.saturating_sub(info.since_ms) >= settings.offline_threshold_ms)
    })
}

/// The follower changes that replication calls for, in partition order:
/// - a partition with fewer copies on live hosts (not inactive, not leaving) than
///   `replicas` (or than there are such hosts) gets a follower on a writable host, not
///   full: one far from every copy (an estimated round trip of at least [`NEAR_RTT_S`]
///   by the network coordinates: another rack or site) if there is one, and among
///   those the one that holds the fewest copies (ties by rendezvous score); at most
///   `max_catching_up` partitions have followers out of sync at once;
/// - otherwise a follower on a host [`gone`] for good is dropped (its primary completes
///   the drop once enough other copies hold every acknowledged write);
/// - a partition with a copy too many on live hosts, all in sync, drops the follower
///   on the host furthest above its share (see [`rebalance`]);
/// - leaving hosts that hold nothing any more are removed.
///
/// A partition with a handoff or a drop under way is left alone. When every partition
/// is whole, [`rebalance`] moves copies toward the hosts' shares.
pub(crate) fn replicate(ni: &NetworkInfo, now_ms: u64, settings: &LeaderSettings) -> Vec<Command> {
    let mut commands = Vec::new();
    let live = |host: HostId| {
        ni.hosts
            .get(&host)
            .is_some_and(|info| info.state != HostState::Inactive && !info.leaving)
    };
    let receivers: Vec<HostId> = candidates(ni, settings.max_fill_ratio)
        .into_iter()
        .filter(|candidate| candidate.receives)
        .map(|candidate| candidate.host)
        .collect();
    let live_hosts = ni.hosts.keys().filter(|&&host| live(host)).count();
    let want = settings.replicas.min(live_hosts).max(1);
    let mut held: BTreeMap<HostId, usize> = BTreeMap::new();
    for entry in &ni.partitions {
        for host in entry.members() {
            *held.entry(host).or_default() += 1;
        }
    }
    let mut catching_up = ni
        .partitions
        .iter()
        .filter(|entry| entry.out_of_sync.iter().any(|&host| live(host)))
        .count();
    let mut shares = Shares::new(ni, &live, want, settings);
    for (partition, entry) in ni.partitions.iter().enumerate() {
        if entry.target.is_some() || entry.dropping.is_some() {
            continue;
        }
        let members = entry.members();
        let live_members = members.iter().filter(|&&host| live(host)).count();
        if live_members < want {
            if catching_up >= settings.max_catching_up {
                continue;
            }
            // Far from every copy first (another rack or site, by the coordinates),
            // then the host holding the fewest copies.
            let near_a_copy = |host: HostId| {
                let Some(at) = ni.hosts.get(&host).map(|info| &info.coordinate) else {
                    return false;
                };
                members.iter().any(|member| {
                    ni.hosts
                        .get(member)
                        .is_some_and(|info| info.coordinate.distance_s(at) < NEAR_RTT_S)
                })
            };
            let best = receivers
                .iter()
                .copied()
                .filter(|host| !members.contains(host))
                .min_by_key(|&host| {
                    let copies = held.get(&host).copied().unwrap_or(0);
                    (
                        near_a_copy(host),
                        copies,
                        std::cmp::Reverse(score(partition, host)),
                    )
                });
            if let Some(host) = best {
                *held.entry(host).or_default() += 1;
                catching_up += 1;
                commands.push(Command::AddReplica {
                    partition: partition as u16,
                    host,
                    epoch: entry.epoch,
                });
            }
            continue;
        }
        if let Some(&host) = entry
            .replicas
            .iter()
            .find(|&&host| gone(ni, host, now_ms, settings))
        {
            commands.push(Command::PlanDrop {
                partition: partition as u16,
                host,
                epoch: entry.epoch,
            });
            continue;
        }
        let all_in_sync = !entry.out_of_sync.iter().any(|&host| live(host));
        if live_members > want && all_in_sync {
            if let Some(&host) = shares.drops.get(&partition) {
                commands.push(Command::PlanDrop {
                    partition: partition as u16,
                    host,
                    epoch: entry.epoch,
                });
            }
        }
    }
    if commands.is_empty() {
        commands.extend(rebalance(ni, &live, want, &mut shares, settings));
    }
    for host in ni.hosts.values().filter(|host| host.leaving) {
        let holds = ni
            .partitions
            .iter()
            .any(|entry| entry.is_member(host.id) || entry.target == Some(host.id));
        if !holds {
            commands.push(Command::Remove { host: host.id });
        }
    }
    commands
}

/// How many copies each host that may receive partitions holds on live hosts, against
/// its share of all copies, proportional to its capacity (at most one per partition).
/// Hosts that receive nothing (full, or not writable) keep what they hold and are left
/// out.
struct Shares {
    /// Host → (copies held, share).
    hosts: BTreeMap<HostId, (usize, usize)>,
    /// Partition → the follower it is to drop, for the partitions with a copy too many.
    drops: BTreeMap<usize, HostId>,
}

impl Shares {
    fn new(
        ni: &NetworkInfo,
        live: &impl Fn(HostId) -> bool,
        want: usize,
        settings: &LeaderSettings,
    ) -> Shares {
        let all = candidates(ni, settings.max_fill_ratio);
        let receivers: Vec<&Candidate> = all
            .iter()
            .filter(|c| c.receives && c.keeps && c.weight > 0)
            .collect();
        let mut hosts = BTreeMap::new();
        if receivers.is_empty() {
            return Shares {
                hosts,
                drops: BTreeMap::new(),
            };
        }
        let total = ni.partitions.len() * want;
        for (candidate, share) in receivers.iter().zip(quotas(total, &receivers)) {
            hosts.insert(candidate.host, (0, share.min(ni.partitions.len())));
        }
        for entry in &ni.partitions {
            for host in entry.members().into_iter().filter(|&h| live(h)) {
                if let Some((held, _)) = hosts.get_mut(&host) {
                    *held += 1;
                }
            }
        }
        let mut shares = Shares {
            hosts,
            drops: BTreeMap::new(),
        };
        // Copies on their way out count as gone, so that a host whose copy waits for its
        // drop is not asked to give up another: the one being dropped, and the one a
        // partition with a copy too many is to drop (`drops`, what `replicate` plans).
        for (partition, entry) in ni.partitions.iter().enumerate() {
            let live_members = entry.members().into_iter().filter(|&h| live(h)).count();
            if let Some(host) = entry.dropping.filter(|&h| live(h)) {
                shares.take(host);
            } else if live_members > want {
                let followers = entry.replicas.iter().copied().filter(|&h| live(h));
                if let Some(host) = shares.fullest(followers, partition) {
                    shares.take(host);
                    shares.drops.insert(partition, host);
                }
            }
        }
        shares
    }

    /// How far `host` holds more copies than its share (negative: fewer); 0 for a host
    /// left out.
    fn excess(&self, host: HostId) -> i64 {
        self.hosts
            .get(&host)
            .map_or(0, |&(held, share)| held as i64 - share as i64)
    }

    /// Among `hosts`, the one furthest above its share (or least below it; ties by
    /// rendezvous score with `partition`).
    fn fullest(&self, hosts: impl Iterator<Item = HostId>, partition: usize) -> Option<HostId> {
        hosts.max_by_key(|&host| (self.excess(host), score(partition, host)))
    }

    fn take(&mut self, host: HostId) {
        if let Some((held, _)) = self.hosts.get_mut(&host) {
            *held = held.saturating_sub(1);
        }
    }

    fn give(&mut self, host: HostId) {
        if let Some((held, _)) = self.hosts.get_mut(&host) {
            *held += 1;
        }
    }
}

/// Moves follower copies toward the hosts' [`Shares`] once every partition is whole:
/// the host furthest below its share gets a new follower of a partition that the host
/// furthest above its share follows (its copies all in sync, nothing else under way);
/// once the new copy is in sync, [`replicate`] drops the extra copy. A host that joined,
/// or came back after its copies were dropped, so gets its share; at most
/// `max_moves_in_flight` such moves run at once.
fn rebalance(
    ni: &NetworkInfo,
    live: &impl Fn(HostId) -> bool,
    want: usize,
    shares: &mut Shares,
    settings: &LeaderSettings,
) -> Vec<Command> {
    let busy = |entry: &PartitionEntry| {
        entry.target.is_some()
            || entry.dropping.is_some()
            || entry.out_of_sync.iter().any(|&host| live(host))
    };
    let whole = ni
        .partitions
        .iter()
        .all(|entry| entry.members().into_iter().filter(|&h| live(h)).count() >= want);
    let in_flight = ni
        .partitions
        .iter()
        .filter(|entry| {
            entry.dropping.is_some()
                || entry.members().into_iter().filter(|&h| live(h)).count() > want
        })
        .count();
    if !whole || in_flight >= settings.max_moves_in_flight {
        return Vec::new();
    }
    let mut commands = Vec::new();
    let mut moved: BTreeSet<usize> = BTreeSet::new();
    while in_flight + commands.len() < settings.max_moves_in_flight {
        let Some(under) = shares
            .hosts
            .keys()
            .copied()
            .filter(|&host| shares.excess(host) < 0)
            .min_by_key(|&host| (shares.excess(host), host))
        else {
            break;
        };
        // The partition whose follower furthest above its share can go to `under`.
        let choice = ni
            .partitions
            .iter()
            .enumerate()
            .filter(|(p, entry)| !moved.contains(p) && !busy(entry) && !entry.is_member(under))
            .filter_map(|(p, entry)| {
                let followers = entry.replicas.iter().copied().filter(|&h| live(h));
                let from = shares
                    .fullest(followers, p)
                    .filter(|&h| shares.excess(h) > 0)?;
                Some((shares.excess(from), score(p, under), p, from))
            })
            .max();
        let Some((_, _, partition, from)) = choice else {
            break;
        };
        moved.insert(partition);
        shares.give(under);
        shares.take(from);
        commands.push(Command::AddReplica {
            partition: partition as u16,
            host: under,
            epoch: ni.partitions[partition].epoch,
        });
    }
    commands
}

/// The state changes the reports call for: the hosts that the fresh reports agree on
/// ([`decide_inactive`], among the hosts not inactive) become inactive at `now_ms`,
/// unless they are inactive already or became writable less than
/// [`REJOIN_GRACE_MS`] ago; then, in host order, inactive hosts offline for
/// `offline_threshold_ms` or more that still have unused ids lose them.
pub(crate) fn judge(
    ni: &NetworkInfo,
    reports: &[SuspectReport],
    now_ms: u64,
    settings: &LeaderSettings,
) -> Vec<Command> {
    let mut suspicions: BTreeMap<HostId, Suspicion> = BTreeMap::new();
    for report in reports
        .iter()
        .filter(|report| is_fresh(report.age, settings))
    {
        for &peer in &report.observed {
            suspicions.entry(peer).or_default().observers += 1;
        }
        for &peer in &report.suspects {
            suspicions
                .entry(peer)
                .or_default()
                .suspected_by
                .insert(report.observer);
        }
    }
    let active = ni
        .hosts
        .values()
        .filter(|host| host.state != HostState::Inactive)
        .count();
    let mut commands: Vec<Command> = decide_inactive(&suspicions, active)
        .into_iter()
        .filter(|peer| {
            ni.hosts.get(peer).is_some_and(|host| {
                host.state != HostState::Inactive
                    && now_ms.saturating_sub(host.since_ms) >= REJOIN_GRACE_MS
            })
        })
        .map(|host| Command::SetState {
            host,
            state: HostState::Inactive,
            now_ms,
        })
        .collect();
    for host in ni.hosts.values() {
        let offline_for = now_ms.saturating_sub(host.since_ms);
        let has_unused = ni
            .ranges_of(host.id)
            .iter()
            .any(|range| !range.unused().is_empty());
        if host.state == HostState::Inactive
            && offline_for >= settings.offline_threshold_ms
            && has_unused
        {
            commands.push(Command::Reclaim { host: host.id });
        }
    }
    commands
}

/// The hosts as placement sees them: every host not inactive, weighted by its capacity
/// in MiB; it keeps its partitions unless it is leaving, and receives more only when it
/// is writable, not leaving and filled less than `max_fill_ratio`.
pub(crate) fn candidates(ni: &NetworkInfo, max_fill_ratio: f64) -> Vec<Candidate> {
    ni.hosts
        .values()
        .filter(|host| host.state != HostState::Inactive)
        .map(|host| {
            let capacity = &host.capacity;
            let fill = capacity.used_bytes as f64 / capacity.capacity_bytes.max(1) as f64;
            Candidate {
                host: host.id,
                weight: capacity.capacity_bytes >> 20,
                receives: host.state == HostState::Write && !host.leaving && fill < max_fill_ratio,
                keeps: !host.leaving,
            }
        })
        .collect()
}

/// Partitions whose owner is not the one placement wants (0 once balanced).
pub(crate) fn misplaced(ni: &NetworkInfo, max_fill_ratio: f64) -> usize {
    let desired = desired_owners(&ni.partitions, &candidates(ni, max_fill_ratio));
    ni.partitions
        .iter()
        .zip(desired)
        .filter(|(entry, want)| entry.owner != *want)
        .count()
}

/// The partition moves and host removals that placement calls for, in this order:
/// moves whose target is no host or an inactive one are given up (in partition order);
/// moves toward the desired owners start, at most `max_moves_in_flight` running at once
/// (counting the moves still running, the ones given up included); leaving hosts that
/// own nothing and receive nothing are removed (in host order).
pub(crate) fn place(ni: &NetworkInfo, settings: &LeaderSettings) -> Vec<Command> {
    let mut commands = Vec::new();
    for (partition, entry) in ni.partitions.iter().enumerate() {
        let target_gone = entry.target.is_some_and(|target| {
            ni.hosts
                .get(&target)
                .is_none_or(|host| host.state == HostState::Inactive)
        });
        if target_gone {
            commands.push(Command::AbortMove {
                partition: partition as u16,
                epoch: entry.epoch,
            });
        }
    }
    let desired = desired_owners(&ni.partitions, &candidates(ni, settings.max_fill_ratio));
    for (partition, to) in next_moves(&ni.partitions, &desired, settings.max_moves_in_flight) {
        commands.push(Command::PlanMove {
            partition,
            to,
            epoch: ni.partitions[usize::from(partition)].epoch,
        });
    }
    for host in ni.hosts.values().filter(|host| host.leaving) {
        let holds = ni
            .partitions
            .iter()
            .any(|entry| entry.owner == host.id || entry.target == Some(host.id));
        if !holds {
            commands.push(Command::Remove { host: host.id });
        }
    }
    commands
}

/// Partitions with fewer copies in sync on live hosts (the primary counts as in sync)
/// than `replicas`, or than there are live hosts (0 once every partition is whole).
pub(crate) fn under_replicated(ni: &NetworkInfo, replicas: usize) -> usize {
    let live = |host: &HostId| {
        ni.hosts
            .get(host)
            .is_some_and(|info| info.state != HostState::Inactive && !info.leaving)
    };
    let want = replicas
        .min(ni.hosts.keys().filter(|h| live(h)).count())
        .max(1);
    ni.partitions
        .iter()
        .filter(|entry| {
            let in_sync = entry
                .members()
                .iter()
                .filter(|host| live(host) && !entry.out_of_sync.contains(host))
                .count();
            in_sync < want
        })
        .count()
}

/// The planned handovers that spread the primaries, in partition order: `(partition,
/// copy to lead it)`. Each host that may receive partitions (see [`candidates`]) gets a
/// quota of the replicated partitions to lead, proportional to its capacity; a partition
/// whose primary leads more than its quota goes to the in-sync follower furthest below
/// its own (ties by rendezvous score). Only partitions whose copies are all active and
/// in sync, with no drop or move under way, are handed over. The leader's shell runs
/// each as a failover round that prefers the chosen copy.
pub(crate) fn handovers(ni: &NetworkInfo, settings: &LeaderSettings) -> Vec<(u16, HostId)> {
    let all = candidates(ni, settings.max_fill_ratio);
    let receivers: Vec<&Candidate> = all
        .iter()
        .filter(|c| c.receives && c.keeps && c.weight > 0)
        .collect();
    let replicated: Vec<usize> = (0..ni.partitions.len())
        .filter(|&p| !ni.partitions[p].replicas.is_empty())
        .collect();
    let quota: BTreeMap<HostId, usize> = receivers
        .iter()
        .map(|c| c.host)
        .zip(quotas(replicated.len(), &receivers))
        .collect();
    let mut led: BTreeMap<HostId, usize> = BTreeMap::new();
    for &p in &replicated {
        *led.entry(ni.partitions[p].owner).or_default() += 1;
    }
    let active = |host: &HostId| {
        ni.hosts
            .get(host)
            .is_some_and(|info| info.state != HostState::Inactive)
    };
    let room = |led: &BTreeMap<HostId, usize>, host: &HostId| {
        let quota = quota.get(host).copied().unwrap_or(0);
        quota as i64 - led.get(host).copied().unwrap_or(0) as i64
    };
    let mut planned = Vec::new();
    for p in replicated {
        let entry = &ni.partitions[p];
        let quiet = entry.out_of_sync.is_empty()
            && entry.dropping.is_none()
            && entry.target.is_none()
            && entry.members().iter().all(active);
        if !quiet || room(&led, &entry.owner) >= 0 {
            continue;
        }
        let best = entry
            .replicas
            .iter()
            .copied()
            .filter(|host| room(&led, host) > 0)
            .max_by_key(|&host| (room(&led, &host), score(p, host)));
        if let Some(to) = best {
            *led.entry(entry.owner).or_default() -= 1;
            *led.entry(to).or_default() += 1;
            planned.push((p as u16, to));
        }
    }
    planned
}

/// The partitions whose primary is inactive and that have a follower to take over:
/// the leader runs a failover round for each.
pub(crate) fn failovers(ni: &NetworkInfo) -> Vec<u16> {
    ni.partitions
        .iter()
        .enumerate()
        .filter(|(_, entry)| !entry.replicas.is_empty())
        .filter(|(_, entry)| {
            ni.hosts
                .get(&entry.owner)
                .is_none_or(|owner| owner.state == HostState::Inactive)
        })
        .map(|(partition, _)| partition as u16)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coords::Coordinate;
    use crate::ni::{Capacity, Outcome, PartitionEntry, FOUNDER};

    const GIB: u64 = 1 << 30;
    /// Late enough that every host of [`cluster`] is past the rejoin grace.
    const NOW_MS: u64 = 100_000;

    fn settings() -> LeaderSettings {
        LeaderSettings::new(Duration::from_millis(500), 15_000, 0.9)
    }

    fn apply(ni: &mut NetworkInfo, command: Command) {
        let outcome = ni.apply(&command);
        assert!(
            !matches!(outcome, Outcome::Refused(_)),
            "{command:?}: {outcome:?}"
        );
    }

    fn addr(host: HostId) -> String {
        format!("10.0.0.{host}:7380")
    }

    /// A founded cluster of `hosts` writable hosts (ids 1..=hosts) with 16 partitions, all
    /// on the founder, and 1 GiB of capacity each.
    fn cluster(hosts: u64) -> NetworkInfo {
        let mut ni = NetworkInfo::default();
        apply(
            &mut ni,
            Command::Found {
                cluster_id: 7,
                peer_addr: addr(FOUNDER),
                client_addr: String::new(),
                partitions: 16,
                now_ms: 1,
            },
        );
        for host in 2..=hosts {
            apply(
                &mut ni,
                Command::Join {
                    peer_addr: addr(host),
                    client_addr: String::new(),
                    partitions: 16,
                    sponsor: FOUNDER,
                    now_ms: 2,
                },
            );
        }
        for host in 1..=hosts {
            report_capacity(&mut ni, host, GIB, 0);
        }
        ni
    }

    fn report_capacity(ni: &mut NetworkInfo, host: HostId, capacity_bytes: u64, used_bytes: u64) {
        apply(
            ni,
            Command::Report {
                host,
                capacity: Capacity {
                    capacity_bytes,
                    free_bytes: capacity_bytes - used_bytes,
                    used_bytes,
                    cpu_rating: 1000,
                    workers: 1,
                },
                coordinate: Coordinate::default(),
            },
        );
    }

    fn set_state(ni: &mut NetworkInfo, host: HostId, state: HostState, now_ms: u64) {
        apply(
            ni,
            Command::SetState {
                host,
                state,
                now_ms,
            },
        );
    }

    /// A report from `observer`, `age_ms` old, observing every other host of 1..=hosts.
    fn report(observer: HostId, hosts: u64, suspects: &[HostId], age_ms: u64) -> SuspectReport {
        SuspectReport {
            observer,
            age: Duration::from_millis(age_ms),
            suspects: suspects.to_vec(),
            observed: (1..=hosts).filter(|&host| host != observer).collect(),
        }
    }

    fn inactive(host: HostId, now_ms: u64) -> Command {
        Command::SetState {
            host,
            state: HostState::Inactive,
            now_ms,
        }
    }

    #[test]
    fn reports_count_for_six_heartbeats_and_at_least_three_seconds() {
        assert_eq!(
            report_fresh_for(Duration::from_millis(500)),
            Duration::from_secs(3)
        );
        assert_eq!(
            report_fresh_for(Duration::from_secs(1)),
            Duration::from_secs(6)
        );
        let settings = settings();
        assert!(is_fresh(Duration::from_secs(3), &settings));
        assert!(!is_fresh(Duration::from_millis(3001), &settings));
    }

    #[test]
    fn a_host_is_judged_inactive_only_when_a_majority_of_active_hosts_suspects_it() {
        let ni = cluster(5);
        let settings = settings();
        // Two of the four observers of host 5: not a majority of the five active hosts.
        let mut reports = vec![
            report(1, 5, &[5], 0),
            report(2, 5, &[5], 0),
            report(3, 5, &[], 0),
            report(4, 5, &[], 0),
        ];
        assert_eq!(judge(&ni, &reports, NOW_MS, &settings), vec![]);
        // A third: a majority of the observers and of the cluster.
        reports[2] = report(3, 5, &[5], 0);
        assert_eq!(
            judge(&ni, &reports, NOW_MS, &settings),
            vec![inactive(5, NOW_MS)]
        );
        // A host suspecting itself is no vote.
        let reports = vec![
            report(1, 5, &[5], 0),
            report(2, 5, &[5], 0),
            report(5, 5, &[5], 0),
        ];
        assert_eq!(judge(&ni, &reports, NOW_MS, &settings), vec![]);
    }

    #[test]
    fn stale_reports_do_not_count() {
        let ni = cluster(5);
        let settings = settings();
        let fresh_ms = settings.report_fresh_for.as_millis() as u64;
        let reports = vec![
            report(1, 5, &[5], 0),
            report(2, 5, &[5], fresh_ms),
            report(3, 5, &[5], fresh_ms + 1),
        ];
        assert_eq!(judge(&ni, &reports, NOW_MS, &settings), vec![]);
        let reports = vec![
            report(1, 5, &[5], 0),
            report(2, 5, &[5], fresh_ms),
            report(3, 5, &[5], fresh_ms),
        ];
        assert_eq!(
            judge(&ni, &reports, NOW_MS, &settings),
            vec![inactive(5, NOW_MS)]
        );
    }

    #[test]
    fn inactive_hosts_do_not_count_toward_the_majority_and_are_not_judged_again() {
        let mut ni = cluster(5);
        set_state(&mut ni, 4, HostState::Inactive, NOW_MS);
        set_state(&mut ni, 5, HostState::Inactive, NOW_MS);
        let settings = settings();
        // Three hosts are active: two suspicions of host 3 are a majority of them.
        let reports = vec![report(1, 5, &[3, 4, 5], 0), report(2, 5, &[3, 4, 5], 0)];
        assert_eq!(
            judge(&ni, &reports, NOW_MS + 1, &settings),
            vec![inactive(3, NOW_MS + 1)]
        );
    }

    #[test]
    fn a_returning_host_is_not_judged_during_the_rejoin_grace() {
        let mut ni = cluster(5);
        set_state(&mut ni, 5, HostState::Inactive, 10_000);
        apply(
            &mut ni,
            Command::Rejoin {
                host: 5,
                peer_addr: "10.0.1.5:7380".into(),
                client_addr: String::new(),
                now_ms: 20_000,
            },
        );
        let settings = settings();
        // The observers' scores of it have not recovered yet.
        let reports = vec![
            report(1, 5, &[5], 0),
            report(2, 5, &[5], 0),
            report(3, 5, &[5], 0),
        ];
        let grace_ends_ms = 20_000 + REJOIN_GRACE_MS;
        assert_eq!(judge(&ni, &reports, grace_ends_ms - 1, &settings), vec![]);
        assert_eq!(
            judge(&ni, &reports, grace_ends_ms, &settings),
            vec![inactive(5, grace_ends_ms)]
        );
    }

    #[test]
    fn a_host_offline_past_the_threshold_loses_its_unused_ids_once() {
        let mut ni = cluster(3);
        set_state(&mut ni, 3, HostState::Inactive, 10_000);
        let settings = settings();
        let threshold_ms = 10_000 + settings.offline_threshold_ms;
        assert_eq!(judge(&ni, &[], threshold_ms - 1, &settings), vec![]);
        assert_eq!(
            judge(&ni, &[], threshold_ms, &settings),
            vec![Command::Reclaim { host: 3 }]
        );
        apply(&mut ni, Command::Reclaim { host: 3 });
        assert_eq!(judge(&ni, &[], threshold_ms, &settings), vec![]);
        // A writable host is never reclaimed, however old its since-time.
        assert_eq!(judge(&ni, &[], u64::MAX, &settings).len(), 0);
    }

    /// The group of `cluster(hosts)` as a leader (host 1) would see it: every host a
    /// member at its address, these voters, every log caught up.
    fn membership(hosts: u64, voters: &[HostId]) -> RaftMembership {
        RaftMembership {
            leader: FOUNDER,
            voters: voters.iter().copied().collect(),
            nodes: (1..=hosts).map(|host| (host, addr(host))).collect(),
            last_log_index: 100,
            matched_index: (1..=hosts).map(|host| (host, 100)).collect(),
        }
    }

    fn voters(hosts: &[HostId]) -> MembershipChange {
        MembershipChange::ReplaceVoters(hosts.iter().copied().collect())
    }

    #[test]
    fn voters_are_topped_up_to_five_among_the_caught_up_hosts() {
        let ni = cluster(8);
        let mut group = membership(8, &[FOUNDER]);
        // Host 3 is 16 entries behind (caught up), host 4 is 17 behind, host 5 unknown.
        group.matched_index.insert(3, 84);
        group.matched_index.insert(4, 83);
        group.matched_index.remove(&5);
        assert_eq!(
            membership_changes(&ni, &group),
            vec![voters(&[1, 2, 3, 6, 7])]
        );
        // Five voters: nothing changes, though host 8 is caught up too.
        let group = membership(8, &[1, 2, 3, 6, 7]);
        assert_eq!(membership_changes(&ni, &group), vec![]);
    }

    #[test]
    fn new_hosts_join_as_learners_and_become_voters_a_round_later() {
        let ni = cluster(3);
        let mut group = membership(1, &[FOUNDER]);
        group.matched_index.clear();
        assert_eq!(
            membership_changes(&ni, &group),
            vec![
                MembershipChange::AddLearner {
                    host: 2,
                    addr: addr(2)
                },
                MembershipChange::AddLearner {
                    host: 3,
                    addr: addr(3)
                },
            ]
        );
        let group = membership(3, &[FOUNDER]);
        assert_eq!(membership_changes(&ni, &group), vec![voters(&[1, 2, 3])]);
    }

    #[test]
    fn an_inactive_voter_is_replaced_or_dropped() {
        let mut ni = cluster(6);
        set_state(&mut ni, 3, HostState::Inactive, NOW_MS);
        // Host 6 takes its place.
        let group = membership(6, &[1, 2, 3, 4, 5]);
        assert_eq!(
            membership_changes(&ni, &group),
            vec![voters(&[1, 2, 4, 5, 6])]
        );
        // No host can take its place: the group shrinks.
        let mut group = membership(6, &[1, 2, 3, 4, 5]);
        group.matched_index.remove(&6);
        assert_eq!(membership_changes(&ni, &group), vec![voters(&[1, 2, 4, 5])]);
        // Back and caught up, it is a candidate like any other.
        apply(
            &mut ni,
            Command::Rejoin {
                host: 3,
                peer_addr: addr(3),
                client_addr: String::new(),
                now_ms: NOW_MS + 1,
            },
        );
        let group = membership(6, &[1, 2, 4, 5]);
        assert_eq!(
            membership_changes(&ni, &group),
            vec![voters(&[1, 2, 3, 4, 5])]
        );
    }

    #[test]
    fn moved_hosts_get_their_new_address_before_anything_else() {
        let mut ni = cluster(3);
        apply(
            &mut ni,
            Command::Rejoin {
                host: 3,
                peer_addr: "10.0.1.3:7380".into(),
                client_addr: String::new(),
                now_ms: NOW_MS,
            },
        );
        // The voters are short of hosts 2 and 3 too, but that waits for the next round.
        let group = membership(3, &[FOUNDER]);
        assert_eq!(
            membership_changes(&ni, &group),
            vec![MembershipChange::SetAddresses(BTreeMap::from([(
                3,
                "10.0.1.3:7380".to_string()
            )]))]
        );
    }

    #[test]
    fn hosts_that_left_leave_the_group_once_they_are_no_voters() {
        let ni = cluster(3);
        let mut group = membership(3, &[1, 2, 3, 4]);
        group.nodes.insert(4, addr(4));
        group.nodes.insert(5, addr(5));
        assert_eq!(membership_changes(&ni, &group), vec![voters(&[1, 2, 3])]);
        group.voters.remove(&4);
        assert_eq!(
            membership_changes(&ni, &group),
            vec![MembershipChange::RemoveNodes(BTreeSet::from([4, 5]))]
        );
    }

    fn plan(partition: u16, to: HostId, epoch: u64) -> Command {
        Command::PlanMove {
            partition,
            to,
            epoch,
        }
    }

    #[test]
    fn moves_are_limited_per_round_counting_the_moves_in_flight() {
        let mut ni = cluster(2);
        apply(&mut ni, Command::Leave { host: FOUNDER });
        let settings = settings();
        // Everything goes to host 2, four partitions at a time, in partition order.
        assert_eq!(
            place(&ni, &settings),
            vec![plan(0, 2, 1), plan(1, 2, 1), plan(2, 2, 1), plan(3, 2, 1)]
        );
        apply(&mut ni, plan(0, 2, 1));
        apply(&mut ni, plan(5, 2, 1));
        assert_eq!(place(&ni, &settings), vec![plan(1, 2, 1), plan(2, 2, 1)]);
        let one_at_a_time = LeaderSettings {
            max_moves_in_flight: 1,
            ..settings.clone()
        };
        assert_eq!(place(&ni, &one_at_a_time), vec![]);
    }

    #[test]
    fn moves_whose_target_is_gone_are_given_up() {
        let mut ni = cluster(3);
        apply(&mut ni, plan(4, 2, 1));
        apply(&mut ni, plan(9, 3, 1));
        set_state(&mut ni, 3, HostState::Inactive, NOW_MS);
        // The founder keeps its share and host 2 already gets one: no new move fits
        // beside the two in flight, the one given up included.
        let settings = LeaderSettings {
            max_moves_in_flight: 2,
            ..settings()
        };
        assert_eq!(
            place(&ni, &settings),
            vec![Command::AbortMove {
                partition: 9,
                epoch: 2
            }]
        );
        // A target that is no host of the NI at all.
        ni.hosts.remove(&2);
        assert_eq!(
            place(&ni, &settings),
            vec![
                Command::AbortMove {
                    partition: 4,
                    epoch: 2
                },
                Command::AbortMove {
                    partition: 9,
                    epoch: 2
                },
            ]
        );
    }

    #[test]
    fn a_leaving_host_is_emptied_then_removed() {
        let mut ni = cluster(2);
        apply(&mut ni, Command::Leave { host: 2 });
        let settings = settings();
        // It owns nothing and receives nothing: it goes.
        assert_eq!(place(&ni, &settings), vec![Command::Remove { host: 2 }]);
        // While a move to it runs, it stays.
        ni.partitions[6] = PartitionEntry {
            target: Some(2),
            ..PartitionEntry::single(FOUNDER, 2)
        };
        assert_eq!(place(&ni, &settings), vec![]);
        // While it owns a partition, it stays, and the partition moves away first.
        ni.partitions[6] = PartitionEntry::single(2, 3);
        assert_eq!(place(&ni, &settings), vec![plan(6, FOUNDER, 3)]);
    }

    #[test]
    fn misplaced_counts_the_partitions_placement_would_move() {
        let mut ni = cluster(1);
        assert_eq!(misplaced(&ni, 0.9), 0);
        // A second host of equal capacity: half of the sixteen partitions should move.
        let mut two = cluster(2);
        assert_eq!(misplaced(&two, 0.9), 8);
        // Full past the ratio, it gets nothing; inactive, it is no candidate at all.
        report_capacity(&mut two, 2, GIB, GIB / 100 * 91);
        assert_eq!(misplaced(&two, 0.9), 0);
        assert_eq!(misplaced(&two, 0.95), 8);
        let mut three = cluster(2);
        set_state(&mut three, 2, HostState::Inactive, NOW_MS);
        assert_eq!(misplaced(&three, 0.9), 0);
        // A leaving founder should give everything away.
        apply(
            &mut three,
            Command::Rejoin {
                host: 2,
                peer_addr: addr(2),
                client_addr: String::new(),
                now_ms: NOW_MS,
            },
        );
        apply(&mut three, Command::Leave { host: FOUNDER });
        assert_eq!(misplaced(&three, 0.9), 16);
        // A host with no capacity reported has no weight.
        report_capacity(&mut ni, FOUNDER, 0, 0);
        assert_eq!(misplaced(&ni, 0.9), 0);
    }

    #[test]
    fn a_round_commits_the_judgements_before_the_placement() {
        let mut ni = cluster(3);
        apply(&mut ni, Command::Leave { host: 3 });
        let reports = vec![report(1, 3, &[2], 0), report(3, 3, &[2], 0)];
        let settings = settings();
        let commands = round_commands(&ni, &reports, NOW_MS, &settings);
        assert_eq!(commands[0], inactive(2, NOW_MS));
        assert_eq!(commands[1..], place(&ni, &settings)[..]);
        assert_eq!(commands.last(), Some(&Command::Remove { host: 3 }));
    }

    fn replicated(replicas: usize) -> LeaderSettings {
        LeaderSettings {
            replicas,
            ..settings()
        }
    }

    /// Applies rounds of [`replicate`], marking every new follower in sync and completing
    /// every drop at once, until a round changes nothing; answers the rounds taken.
    fn replicate_until_quiet(ni: &mut NetworkInfo, settings: &LeaderSettings) -> usize {
        for round in 1..200 {
            let commands = replicate(ni, NOW_MS, settings);
            if commands.is_empty() {
                return round;
            }
            for command in commands {
                apply(ni, command);
            }
            for partition in 0..ni.partitions.len() {
                if let Some(host) = ni.partitions[partition].dropping {
                    let epoch = ni.partitions[partition].epoch;
                    let partition = partition as u16;
                    apply(
                        ni,
                        Command::CompleteDrop {
                            partition,
                            host,
                            epoch,
                        },
                    );
                }
                for host in ni.partitions[partition].out_of_sync.clone() {
                    let epoch = ni.partitions[partition].epoch;
                    apply(
                        ni,
                        Command::SetSync {
                            partition: partition as u16,
                            host,
                            in_sync: true,
                            epoch,
                        },
                    );
                }
            }
        }
        panic!("replication never settled");
    }

    #[test]
    fn copies_go_to_hosts_far_apart_by_the_coordinates_first() {
        // Hosts 1 and 2 in one site, 3 and 4 in another 40 ms away.
        let mut ni = cluster(4);
        for host in [3, 4] {
            let info = ni.hosts.get_mut(&host).unwrap();
            info.coordinate.position_s[0] = 0.040;
        }
        let settings = replicated(2);
        replicate_until_quiet(&mut ni, &settings);
        for (partition, entry) in ni.partitions.iter().enumerate() {
            let sites: BTreeSet<bool> = entry.members().iter().map(|&host| host >= 3).collect();
            assert_eq!(
                sites.len(),
                2,
                "partition {partition}: {:?}",
                entry.members()
            );
        }
        // Within a site the copies still spread by count.
        let mut held: BTreeMap<HostId, usize> = BTreeMap::new();
        for entry in &ni.partitions {
            for host in entry.members() {
                *held.entry(host).or_default() += 1;
            }
        }
        assert!(held[&3].abs_diff(held[&4]) <= 1, "{held:?}");
    }

    #[test]
    fn primaries_are_handed_over_to_in_sync_followers_until_spread_by_capacity() {
        let mut ni = cluster(3);
        let settings = replicated(3);
        replicate_until_quiet(&mut ni, &settings);
        assert!(ni.partitions.iter().all(|entry| entry.owner == FOUNDER));
        let planned = handovers(&ni, &settings);
        let mut led: BTreeMap<HostId, usize> = BTreeMap::new();
        for &(partition, to) in &planned {
            assert_ne!(to, FOUNDER);
            assert!(ni.partitions[usize::from(partition)].replicas.contains(&to));
            *led.entry(to).or_default() += 1;
        }
        // 16 partitions over 3 equal hosts: the founder keeps 6, the others get 5 each.
        assert_eq!(
            led.values().copied().collect::<Vec<_>>(),
            [5, 5],
            "{planned:?}"
        );
        // A copy out of sync holds its partition back.
        let (first, _) = planned[0];
        let mut held = ni.clone();
        held.partitions[usize::from(first)].out_of_sync.push(3);
        assert!(!handovers(&held, &settings).iter().any(|&(p, _)| p == first));
        for (partition, to) in planned {
            let epoch = ni.partitions[usize::from(partition)].epoch;
            apply(
                &mut ni,
                Command::Promote {
                    partition,
                    primary: to,
                    epoch,
                },
            );
        }
        // The old primaries are out of sync until they catch up; then all is balanced.
        replicate_until_quiet(&mut ni, &settings);
        assert_eq!(handovers(&ni, &settings), vec![]);
        // One copy per partition: nothing to hand over.
        assert_eq!(handovers(&cluster(3), &replicated(1)), vec![]);
        // Four hosts, three copies each: every host ends up leading its quarter.
        let mut ni = cluster(4);
        replicate_until_quiet(&mut ni, &settings);
        for _ in 0..10 {
            let planned = handovers(&ni, &settings);
            if planned.is_empty() {
                break;
            }
            for (partition, to) in planned {
                let epoch = ni.partitions[usize::from(partition)].epoch;
                apply(
                    &mut ni,
                    Command::Promote {
                        partition,
                        primary: to,
                        epoch,
                    },
                );
            }
            replicate_until_quiet(&mut ni, &settings);
        }
        let mut led: BTreeMap<HostId, usize> = BTreeMap::new();
        for entry in &ni.partitions {
            *led.entry(entry.owner).or_default() += 1;
        }
        assert_eq!(led.values().copied().collect::<Vec<_>>(), [4, 4, 4, 4]);
    }

    #[test]
    fn every_partition_gets_its_copies_on_distinct_hosts_spread_evenly() {
        let mut ni = cluster(4);
        let settings = replicated(3);
        // A few at a time.
        let first = replicate(&ni, NOW_MS, &settings);
        assert_eq!(first.len(), settings.max_catching_up);
        replicate_until_quiet(&mut ni, &settings);
        let mut copies: BTreeMap<HostId, usize> = BTreeMap::new();
        for entry in &ni.partitions {
            let members = entry.members();
            assert_eq!(members.len(), 3, "{entry:?}");
            let distinct: BTreeSet<HostId> = members.iter().copied().collect();
            assert_eq!(distinct.len(), 3, "{entry:?}");
            for host in members {
                *copies.entry(host).or_default() += 1;
            }
        }
        // 48 copies: the founder holds 16 primaries; the other 32 spread over 3 hosts.
        assert_eq!(copies[&FOUNDER], 16);
        for host in 2..=4 {
            assert!((10..=11).contains(&copies[&host]), "{copies:?}");
        }
        // Fewer hosts than copies: every host holds one.
        let mut small = cluster(2);
        replicate_until_quiet(&mut small, &settings);
        assert!(small
            .partitions
            .iter()
            .all(|entry| entry.members().len() == 2));
        // One copy: nothing to do.
        assert_eq!(replicate(&cluster(3), NOW_MS, &replicated(1)), vec![]);
    }

    /// Alternates [`replicate_until_quiet`] with the planned [`handovers`] (promoted at
    /// once) until neither changes anything.
    fn settle_with_handovers(ni: &mut NetworkInfo, settings: &LeaderSettings) {
        for _ in 0..20 {
            let rounds = replicate_until_quiet(ni, settings);
            let planned = handovers(ni, settings);
            if planned.is_empty() && rounds == 1 {
                return;
            }
            for (partition, primary) in planned {
                let epoch = ni.partitions[usize::from(partition)].epoch;
                apply(
                    ni,
                    Command::Promote {
                        partition,
                        primary,
                        epoch,
                    },
                );
            }
        }
        panic!("never settled");
    }

    /// Copies per host, and checks that every partition has `want` copies on distinct
    /// hosts.
    fn copies_per_host(ni: &NetworkInfo, want: usize) -> BTreeMap<HostId, usize> {
        let mut copies: BTreeMap<HostId, usize> = BTreeMap::new();
        for entry in &ni.partitions {
            let members = entry.members();
            let distinct: BTreeSet<HostId> = members.iter().copied().collect();
            assert_eq!((members.len(), distinct.len()), (want, want), "{entry:?}");
            for host in members {
                *copies.entry(host).or_default() += 1;
            }
        }
        copies
    }

    #[test]
    fn a_host_that_joins_a_replicated_cluster_gets_its_share_of_the_copies() {
        let mut ni = cluster(3);
        let settings = replicated(3);
        replicate_until_quiet(&mut ni, &settings);
        assert_eq!(
            copies_per_host(&ni, 3)
                .values()
                .copied()
                .collect::<Vec<_>>(),
            [16, 16, 16]
        );
        apply(
            &mut ni,
            Command::Join {
                peer_addr: addr(4),
                client_addr: String::new(),
                partitions: 16,
                sponsor: FOUNDER,
                now_ms: 3,
            },
        );
        report_capacity(&mut ni, 4, GIB, 0);
        // A few moves at a time: a new follower on host 4 first, then the copy too many
        // is dropped from a host above its share.
        let first = replicate(&ni, NOW_MS, &settings);
        assert_eq!(first.len(), settings.max_moves_in_flight, "{first:?}");
        assert!(first
            .iter()
            .all(|c| matches!(c, Command::AddReplica { host: 4, .. })));
        settle_with_handovers(&mut ni, &settings);
        // 48 copies over 4 equal hosts.
        let copies = copies_per_host(&ni, 3);
        assert_eq!(
            copies.values().copied().collect::<Vec<_>>(),
            [12, 12, 12, 12]
        );
        // Twice the capacity, twice the share.
        report_capacity(&mut ni, 4, 2 * GIB, 0);
        settle_with_handovers(&mut ni, &settings);
        let copies = copies_per_host(&ni, 3);
        assert_eq!(copies[&4], 16, "{copies:?}");
    }

    #[test]
    fn a_copy_too_many_after_a_host_came_back_is_dropped() {
        let mut ni = cluster(4);
        let settings = replicated(3);
        replicate_until_quiet(&mut ni, &settings);
        // Host 3 is away (not past the threshold): its partitions get other followers.
        set_state(&mut ni, 3, HostState::Inactive, NOW_MS - 1_000);
        replicate_until_quiet(&mut ni, &settings);
        // Back: its partitions hold four copies until one of each is dropped.
        set_state(&mut ni, 3, HostState::Write, NOW_MS);
        replicate_until_quiet(&mut ni, &settings);
        copies_per_host(&ni, 3);
    }

    #[test]
    fn under_replicated_partitions_are_counted_until_every_copy_is_in_sync() {
        let mut ni = cluster(3);
        assert_eq!(under_replicated(&ni, 1), 0);
        assert_eq!(under_replicated(&ni, 3), 16);
        replicate_until_quiet(&mut ni, &replicated(3));
        assert_eq!(under_replicated(&ni, 3), 0);
        set_state(&mut ni, 3, HostState::Inactive, NOW_MS);
        // Two live hosts: two copies are all there can be.
        assert_eq!(under_replicated(&ni, 3), 0);
        let epoch = ni.partitions[0].epoch;
        apply(
            &mut ni,
            Command::SetSync {
                partition: 0,
                host: 2,
                in_sync: false,
                epoch,
            },
        );
        assert_eq!(under_replicated(&ni, 3), 1);
    }

    #[test]
    fn a_host_gone_for_good_is_replaced_then_dropped() {
        let mut ni = cluster(4);
        let settings = replicated(3);
        replicate_until_quiet(&mut ni, &settings);
        let holds_3: Vec<u16> = ni.held_by(3).collect();
        assert!(!holds_3.is_empty());
        // Host 3 is inactive but not yet past the threshold: nothing changes.
        set_state(&mut ni, 3, HostState::Inactive, NOW_MS - 1_000);
        let commands = replicate(&ni, NOW_MS, &settings);
        assert!(
            commands
                .iter()
                .all(|c| matches!(c, Command::AddReplica { host, .. } if *host != 3)),
            "{commands:?}"
        );
        assert!(
            !commands.is_empty(),
            "its partitions get a new follower first"
        );
        replicate_until_quiet(&mut ni, &settings);
        // Past the threshold, its followers are dropped, each once its replacement is in.
        set_state(&mut ni, 3, HostState::Write, NOW_MS - 20_000);
        set_state(&mut ni, 3, HostState::Inactive, NOW_MS - 16_000);
        let drops: Vec<u16> = replicate(&ni, NOW_MS, &settings)
            .into_iter()
            .filter_map(|command| match command {
                Command::PlanDrop {
                    partition, host: 3, ..
                } => Some(partition),
                _ => None,
            })
            .collect();
        assert_eq!(drops, holds_3);
        for entry in &ni.partitions {
            let live = entry.members().into_iter().filter(|&h| h != 3).count();
            assert_eq!(live, 3, "{entry:?}");
        }
    }

    #[test]
    fn failover_is_wanted_where_the_primary_is_inactive_and_a_follower_exists() {
        let mut ni = cluster(3);
        set_state(&mut ni, FOUNDER, HostState::Inactive, NOW_MS);
        assert_eq!(
            failovers(&ni),
            Vec::<u16>::new(),
            "one copy: nothing to fail over to"
        );
        let settings = replicated(2);
        set_state(&mut ni, FOUNDER, HostState::Write, NOW_MS);
        replicate_until_quiet(&mut ni, &settings);
        set_state(&mut ni, FOUNDER, HostState::Inactive, NOW_MS);
        assert_eq!(failovers(&ni), (0..16).collect::<Vec<u16>>());
    }
}
