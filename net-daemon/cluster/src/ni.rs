//! The network information (NI): what every host knows about the cluster.
//!
//! The metadata Raft group replicates it: a host changes it only by proposing a
//! [`Command`], and every host applies the committed commands in the same order
//! with `NetworkInfo::apply`. Applying is pure and deterministic: it reads no
//! clock (times come inside the commands) and no randomness, so every replica
//! reaches the same NI, which [`NetworkInfo::checksum`] lets hosts compare.
//! Each command that changes anything raises `version` by one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shoal_shared::frame::WorkerRequest;

use crate::coords::Coordinate;
use crate::raft_store::MetadataState;
use crate::ranges::{IdRange, IdSpace, OwnedRange, RangeError};
use crate::HostId;

/// The first host of a cluster.
pub(crate) const FOUNDER: HostId = 1;

/// What a host may do, as the cluster sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostState {
    /// Accepted and serving reads and writes.
    Write,
    /// Serving reads only (its disk is full, or it is being drained).
    Read,
    /// Unreachable, by the agreement of several observers.
    Inactive,
    /// Proposed for a state change that is not settled yet.
    Proposal,
}

impl HostState {
    /// The lower-case name used in replies and logs.
    pub fn name(self) -> &'static str {
        match self {
            HostState::Write => "write",
            HostState::Read => "read",
            HostState::Inactive => "inactive",
            HostState::Proposal => "proposal",
        }
    }
}

/// What the gossip of a host last reported about its resources.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// Bytes the host offers for data (its configured capacity or its free space).
    pub capacity_bytes: u64,
    /// Free bytes on its data dir's filesystem.
    pub free_bytes: u64,
    /// Bytes its shards take on disk.
    pub(crate) used_bytes: u64,
    /// Relative CPU speed (cores × MHz / 1000).
    pub cpu_rating: u32,
    /// Its shard-workers: partition `p` is on its worker `p mod workers` (0: not reported).
    pub workers: u16,
}

/// One host of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// The id the cluster gave the host when it joined (never reused).
    pub id: HostId,
    /// Where the other hosts reach it ("host:port").
    pub peer_addr: String,
    /// Where clients reach it ("host:port", or "" when it has no TCP listener).
    pub client_addr: String,
    /// What the host may do now.
    pub state: HostState,
    /// When `state` last changed (ms since the epoch, the proposer's clock).
    pub since_ms: u64,
    /// When it was accepted.
    pub joined_ms: u64,
    /// Its resources, as it last reported them.
    pub capacity: Capacity,
    /// Its network coordinate, as it last reported it.
    pub coordinate: Coordinate,
    /// It is handing its partitions off before it is removed (`shoal leave`).
    pub leaving: bool,
}

/// Who holds one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionEntry {
    /// The host that serves the partition: its primary.
    pub owner: HostId,
    /// Raised by every change of this entry; requests between hosts carry it.
    pub epoch: u64,
    /// The host the partition is moving to, while a handoff runs.
    pub target: Option<HostId>,
    /// The primary's term: the epoch at which `owner` became primary.
    pub term: u64,
    /// The other hosts holding a copy (followers), in the order they were added.
    pub replicas: Vec<HostId>,
    /// Followers that are not in sync with the primary: they serve no read and are
    /// not named primary by a failover while others are.
    pub out_of_sync: Vec<HostId>,
    /// A follower being dropped: its primary no longer counts it, and drops it once
    /// enough others hold every acknowledged write.
    pub dropping: Option<HostId>,
}

impl PartitionEntry {
    /// The entry of a partition with one copy, on `owner`, from `epoch` on.
    pub fn single(owner: HostId, epoch: u64) -> PartitionEntry {
        PartitionEntry {
            owner,
            epoch,
            target: None,
            term: epoch,
            replicas: Vec::new(),
            out_of_sync: Vec::new(),
            dropping: None,
        }
    }

    /// Every host holding a copy, the primary first.
    pub fn members(&self) -> Vec<HostId> {
        let mut members = Vec::with_capacity(1 + self.replicas.len());
        members.push(self.owner);
        members.extend(&self.replicas);
        members
    }

    /// Whether `host` holds a copy.
    pub fn is_member(&self, host: HostId) -> bool {
        self.owner == host || self.replicas.contains(&host)
    }
}

/// A change to the NI, proposed by one host and applied by all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Starts the cluster: `FOUNDER` gets the whole id space and all `partitions`.
    Found {
        /// The new cluster's random id.
        cluster_id: u64,
        /// Where the other hosts reach the founder.
        peer_addr: String,
        /// Where clients reach the founder ("" without a TCP listener).
        client_addr: String,
        /// The cluster's partition count, fixed from now on.
        partitions: u16,
        /// The proposer's time, in Unix ms.
        now_ms: u64,
    },
    /// Accepts a new host, sponsored by `sponsor` (the host it asked), and gives it a range.
    /// Refused when the host's partition count differs from the cluster's.
    Join {
        /// Where the other hosts reach the new host.
        peer_addr: String,
        /// Where clients reach it ("" without a TCP listener).
        client_addr: String,
        /// Its `storage.partitions`.
        partitions: u16,
        /// The member that splits one of its id ranges for it.
        sponsor: HostId,
        /// The proposer's time, in Unix ms.
        now_ms: u64,
    },
    /// A known host is back, possibly at new addresses; it is writable again.
    Rejoin {
        /// The returning host.
        host: HostId,
        /// Where the other hosts reach it now.
        peer_addr: String,
        /// Where clients reach it now.
        client_addr: String,
        /// The proposer's time, in Unix ms.
        now_ms: u64,
    },
    /// Sets a host's state (the leader's liveness and capacity judgements).
    SetState {
        /// The host judged.
        host: HostId,
        /// Its new state.
        state: HostState,
        /// The proposer's time, in Unix ms (becomes `since_ms`).
        now_ms: u64,
    },
    /// Marks `count` more ids of `host` as issued before it issues them.
    ReserveIds {
        /// The host that will issue the ids.
        host: HostId,
        /// How many ids.
        count: u64,
    },
    /// Takes back the unused part of an offline host's ranges.
    Reclaim {
        /// The offline host.
        host: HostId,
    },
    /// The host's latest capacity and coordinate.
    Report {
        /// The reporting host.
        host: HostId,
        /// Its resources now.
        capacity: Capacity,
        /// Its network coordinate now.
        coordinate: Coordinate,
    },
    /// Starts moving `partition` to `to`; applies only at `epoch` and when no move runs.
    PlanMove {
        /// The partition to move.
        partition: u16,
        /// The host that will own it.
        to: HostId,
        /// The partition's epoch the plan was made at.
        epoch: u64,
    },
    /// The move of `partition` to `to` is done: `to` owns it. Applies only at `epoch`.
    CompleteMove {
        /// The partition moved.
        partition: u16,
        /// Its new owner.
        to: HostId,
        /// The partition's epoch while the move ran.
        epoch: u64,
    },
    /// Gives up the move of `partition`; the owner keeps it. Applies only at `epoch`.
    AbortMove {
        /// The partition whose move stops.
        partition: u16,
        /// The partition's epoch while the move ran.
        epoch: u64,
    },
    /// The host hands off all its partitions and is then removed.
    Leave {
        /// The host leaving.
        host: HostId,
    },
    /// Removes a host that owns no partition and receives none.
    Remove {
        /// The host removed.
        host: HostId,
    },
    /// Adds `host` as a follower of `partition`, out of sync until its primary reports
    /// it caught up. Applies only at `epoch`.
    AddReplica {
        /// The partition.
        partition: u16,
        /// The new follower.
        host: HostId,
        /// The partition's epoch the decision was made at.
        epoch: u64,
    },
    /// Starts dropping the follower `host` of `partition` (its primary stops counting
    /// it). Applies only at `epoch`.
    PlanDrop {
        /// The partition.
        partition: u16,
        /// The follower to drop.
        host: HostId,
        /// The partition's epoch the decision was made at.
        epoch: u64,
    },
    /// The primary has made sure that enough other copies hold every acknowledged write:
    /// `host` is no longer a follower of `partition`. Applies only at `epoch`.
    CompleteDrop {
        /// The partition.
        partition: u16,
        /// The follower dropped.
        host: HostId,
        /// The partition's epoch.
        epoch: u64,
    },
    /// Names `primary` (a follower, or the primary itself) the primary of `partition`
    /// from a new term: the epoch after this change. The failover round that chose it
    /// fenced the copies at that term. Applies only at `epoch`.
    Promote {
        /// The partition.
        partition: u16,
        /// The new primary.
        primary: HostId,
        /// The partition's epoch the round started from.
        epoch: u64,
    },
    /// The primary reports a follower caught up (`in_sync`) or fallen behind. Applies
    /// only at `epoch`.
    SetSync {
        /// The partition.
        partition: u16,
        /// The follower.
        host: HostId,
        /// Whether it is in sync now.
        in_sync: bool,
        /// The partition's epoch the report was made at.
        epoch: u64,
    },
}

/// What applying a command answers its proposer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied; nothing to return.
    #[default]
    Done,
    /// `Join`: the new host's id and its first range.
    Joined {
        /// The id the new host got.
        host: HostId,
        /// The id range split off for it.
        range: IdRange,
    },
    /// `ReserveIds`: the ids now reserved for the host.
    Reserved(IdRange),
    /// `Reclaim`: how many unused ids went back to the pool.
    Reclaimed(u64),
    /// The command did not apply; the NI is unchanged.
    Refused(String),
}

/// The replicated network information.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetworkInfo {
    /// Random id chosen by the founder; 0 before `Found`.
    pub cluster_id: u64,
    /// Raised by one by every command that changes the NI.
    pub version: u64,
    /// Every host accepted and not removed, by id.
    pub hosts: BTreeMap<HostId, HostInfo>,
    /// Who owns which ids; `None` before `Found`.
    pub ids: Option<IdSpace>,
    /// The id the next accepted host gets.
    pub(crate) next_host_id: HostId,
    /// The owner of each partition; empty before `Found`.
    pub partitions: Vec<PartitionEntry>,
}

impl NetworkInfo {
    /// Applies a committed command. A refused command changes nothing.
    ///
    /// In debug builds, the NI's invariants are checked after every command
    /// ([`NetworkInfo::check_invariants`]); a command that breaks one panics.
    pub(crate) fn apply(&mut self, command: &Command) -> Outcome {
        #[cfg(debug_assertions)]
        let before = self.clone();
        let outcome = match self.change(command) {
            Ok(outcome) => {
                self.version += 1;
                outcome
            }
            Err(reason) => Outcome::Refused(reason),
        };
        #[cfg(debug_assertions)]
        if let Err(broken) = self.check_invariants(&before, &outcome) {
            panic!("applying {command:?} broke an invariant of the NI: {broken}");
        }
        outcome
    }

    /// Checks what must hold of this NI, reached from `before` by a command that
    /// answered `outcome`:
    /// - the version went up by one if the command applied, and stayed put if it was
    ///   refused;
    /// - the cluster id, once set, never changes, and the number of partitions changes
    ///   only when the cluster is founded;
    /// - each host is filed under its own id, below `next_host_id`, and a cluster with
    ///   hosts has an id space whose ranges tile it without overlap
    ///   ([`IdSpace::check_disjoint`]);
    /// - every partition's owner and target are hosts of the NI, and a target is not the
    ///   owner;
    /// - its followers are distinct hosts of the NI other than the owner, and only
    ///   followers are marked out of sync or dropping;
    /// - a term is never above the epoch and never goes down, and a new owner has a new
    ///   term;
    /// - an epoch never goes down, and a partition whose entry changed has a higher one.
    ///
    /// A leaving host may still be a target: [`Command::Leave`] lets the moves to it that
    /// already run finish (the leader plans none to it after).
    #[cfg(any(test, debug_assertions))]
    pub(crate) fn check_invariants(
        &self,
        before: &NetworkInfo,
        outcome: &Outcome,
    ) -> Result<(), String> {
        let applied = !matches!(outcome, Outcome::Refused(_));
        let expected_version = before.version + u64::from(applied);
        if self.version != expected_version {
            return Err(format!(
                "version {} after version {} and {outcome:?} (expected {expected_version})",
                self.version, before.version
            ));
        }
        if before.cluster_id != 0 && self.cluster_id != before.cluster_id {
            return Err(format!(
                "the cluster id changed from {:016x} to {:016x}",
                before.cluster_id, self.cluster_id
            ));
        }
        if before.cluster_id != 0 && self.partitions.len() != before.partitions.len() {
            return Err(format!(
                "{} partitions became {}",
                before.partitions.len(),
                self.partitions.len()
            ));
        }
        for (&id, host) in &self.hosts {
            if host.id != id {
                return Err(format!("host {} is filed under id {id}", host.id));
            }
            if id >= self.next_host_id {
                return Err(format!(
                    "host {id} is not below the next host id {}",
                    self.next_host_id
                ));
            }
        }
        match &self.ids {
            Some(ids) => ids
                .check_disjoint()
                .map_err(|error| format!("the id space is broken: {error}"))?,
            None if !self.hosts.is_empty() => {
                return Err("the cluster has hosts and no id space".into());
            }
            None => {}
        }
        for (partition, entry) in self.partitions.iter().enumerate() {
            if !self.hosts.contains_key(&entry.owner) {
                return Err(format!(
                    "partition {partition} is owned by host {}, which is not in the cluster",
                    entry.owner
                ));
            }
            if let Some(target) = entry.target {
                if !self.hosts.contains_key(&target) {
                    return Err(format!(
                        "partition {partition} moves to host {target}, which is not in the cluster"
                    ));
                }
                if target == entry.owner {
                    return Err(format!("partition {partition} moves to its owner {target}"));
                }
            }
            let mut seen = vec![entry.owner];
            for &host in &entry.replicas {
                if !self.hosts.contains_key(&host) || seen.contains(&host) {
                    return Err(format!(
                        "partition {partition} lists follower {host} twice, as its owner, or \
                         though it is not in the cluster"
                    ));
                }
                seen.push(host);
            }
            let listed = |host: &HostId| entry.replicas.contains(host);
            if !entry.out_of_sync.iter().all(listed) || !entry.dropping.iter().all(listed) {
                return Err(format!(
                    "partition {partition} marks a host that is no follower: {entry:?}"
                ));
            }
            if entry.term > entry.epoch {
                return Err(format!("partition {partition} has a term above its epoch"));
            }
            let Some(old) = before.partitions.get(partition) else {
                continue;
            };
            if entry.term < old.term || (entry.owner != old.owner && entry.term == old.term) {
                return Err(format!(
                    "partition {partition} changed primary from {old:?} to {entry:?} without a new term"
                ));
            }
            if entry.epoch < old.epoch || (entry != old && entry.epoch == old.epoch) {
                return Err(format!(
                    "partition {partition} went from {old:?} to {entry:?} without a higher epoch"
                ));
            }
        }
        Ok(())
    }

    /// Changes the NI as `command` says, or refuses it. Each variant has its own function.
    fn change(&mut self, command: &Command) -> Result<Outcome, String> {
        match command {
            Command::Found {
                cluster_id,
                peer_addr,
                client_addr,
                partitions,
                now_ms,
            } => self.found(*cluster_id, peer_addr, client_addr, *partitions, *now_ms),
            Command::Join {
                peer_addr,
                client_addr,
                partitions,
                sponsor,
                now_ms,
            } => self.join(peer_addr, client_addr, *partitions, *sponsor, *now_ms),
            Command::Rejoin {
                host,
                peer_addr,
                client_addr,
                now_ms,
            } => self.rejoin(*host, peer_addr, client_addr, *now_ms),
            Command::SetState {
                host,
                state,
                now_ms,
            } => self.set_state(*host, *state, *now_ms),
            Command::ReserveIds { host, count } => self.reserve_ids(*host, *count),
            Command::Reclaim { host } => self.reclaim(*host),
            Command::Report {
                host,
                capacity,
                coordinate,
            } => self.report(*host, capacity, coordinate),
            Command::PlanMove {
                partition,
                to,
                epoch,
            } => self.plan_move(*partition, *to, *epoch),
            Command::CompleteMove {
                partition,
                to,
                epoch,
            } => self.complete_move(*partition, *to, *epoch),
            Command::AbortMove { partition, epoch } => self.abort_move(*partition, *epoch),
            Command::Leave { host } => self.leave(*host),
            Command::Remove { host } => self.remove(*host),
            Command::AddReplica {
                partition,
                host,
                epoch,
            } => self.add_replica(*partition, *host, *epoch),
            Command::PlanDrop {
                partition,
                host,
                epoch,
            } => self.plan_drop(*partition, *host, *epoch),
            Command::CompleteDrop {
                partition,
                host,
                epoch,
            } => self.complete_drop(*partition, *host, *epoch),
            Command::Promote {
                partition,
                primary,
                epoch,
            } => self.promote(*partition, *primary, *epoch),
            Command::SetSync {
                partition,
                host,
                in_sync,
                epoch,
            } => self.set_sync(*partition, *host, *in_sync, *epoch),
        }
    }

    /// [`Command::Found`]: the founder gets the whole id space and every partition.
    /// Refused once the cluster is founded.
    fn found(
        &mut self,
        cluster_id: u64,
        peer_addr: &str,
        client_addr: &str,
        partitions: u16,
        now_ms: u64,
    ) -> Result<Outcome, String> {
        if self.cluster_id != 0 {
            return Err(format!(
                "cluster {:016x} is already founded",
                self.cluster_id
            ));
        }
        self.cluster_id = cluster_id;
        self.ids = Some(IdSpace::new(FOUNDER));
        self.next_host_id = FOUNDER + 1;
        self.hosts
            .insert(FOUNDER, new_host(FOUNDER, peer_addr, client_addr, now_ms));
        self.partitions = vec![PartitionEntry::single(FOUNDER, 1); usize::from(partitions)];
        Ok(Outcome::Done)
    }

    /// [`Command::Join`]: the next host id and a range split from the sponsor's, or else
    /// from the pool, or else from the roomiest host. Refused when the partition counts
    /// differ.
    fn join(
        &mut self,
        peer_addr: &str,
        client_addr: &str,
        partitions: u16,
        sponsor: HostId,
        now_ms: u64,
    ) -> Result<Outcome, String> {
        if usize::from(partitions) != self.partitions.len() {
            return Err(format!(
                "the cluster has {} partitions and this host is configured with {partitions} \
                 (storage.partitions must be equal on every host)",
                self.partitions.len()
            ));
        }
        let host = self.next_host_id;
        let ids = self.ids_mut()?;
        let range = match ids.sponsor_split(sponsor, host) {
            Ok(range) => range,
            // The sponsor is too full to split: the pool or the roomiest host gives.
            Err(RangeError::NothingToSplit { .. } | RangeError::UnknownHost(_)) => {
                match ids.grant_free(host) {
                    Ok(range) => range,
                    Err(_) => {
                        let other = ids.best_sponsor().ok_or("no host has ids left to share")?;
                        ids.sponsor_split(other, host).map_err(|e| e.to_string())?
                    }
                }
            }
            Err(error) => return Err(error.to_string()),
        };
        self.next_host_id += 1;
        self.hosts
            .insert(host, new_host(host, peer_addr, client_addr, now_ms));
        Ok(Outcome::Joined { host, range })
    }

    /// [`Command::Rejoin`]: the host's new addresses; it is writable again (since `now_ms`
    /// if it was not).
    fn rejoin(
        &mut self,
        host: HostId,
        peer_addr: &str,
        client_addr: &str,
        now_ms: u64,
    ) -> Result<Outcome, String> {
        let info = self.host_mut(host)?;
        peer_addr.clone_into(&mut info.peer_addr);
        client_addr.clone_into(&mut info.client_addr);
        if info.state != HostState::Write {
            info.state = HostState::Write;
            info.since_ms = now_ms;
        }
        Ok(Outcome::Done)
    }

    /// [`Command::SetState`]: the host's new state, since `now_ms`. Refused when it is in
    /// that state already.
    fn set_state(
        &mut self,
        host: HostId,
        state: HostState,
        now_ms: u64,
    ) -> Result<Outcome, String> {
        let info = self.host_mut(host)?;
        if info.state == state {
            return Err(format!("host {host} is already {}", state.name()));
        }
        info.state = state;
        info.since_ms = now_ms;
        Ok(Outcome::Done)
    }

    /// [`Command::ReserveIds`]: the next `count` ids of the host; a host out of ids first
    /// gets a new range from the pool or from the roomiest other host.
    fn reserve_ids(&mut self, host: HostId, count: u64) -> Result<Outcome, String> {
        self.host_mut(host)?;
        let ids = self.ids_mut()?;
        let range = match ids.reserve(host, count) {
            Ok(range) => range,
            // Out of ids: the pool or the roomiest other host gives a new range.
            Err(RangeError::Exhausted { .. }) => {
                if ids.grant_free(host).is_err() {
                    let sponsor = ids
                        .best_sponsor()
                        .filter(|&sponsor| sponsor != host)
                        .ok_or("the id space is exhausted")?;
                    ids.sponsor_split(sponsor, host)
                        .map_err(|e| e.to_string())?;
                }
                ids.reserve(host, count).map_err(|e| e.to_string())?
            }
            Err(error) => return Err(error.to_string()),
        };
        Ok(Outcome::Reserved(range))
    }

    /// [`Command::Reclaim`]: the unused part of the host's ranges goes back to the pool.
    fn reclaim(&mut self, host: HostId) -> Result<Outcome, String> {
        self.host_mut(host)?;
        let reclaimed = self
            .ids_mut()?
            .reclaim_unused(host)
            .map_err(|e| e.to_string())?;
        Ok(Outcome::Reclaimed(reclaimed))
    }

    /// [`Command::Report`]: the host's latest capacity and coordinate.
    fn report(
        &mut self,
        host: HostId,
        capacity: &Capacity,
        coordinate: &Coordinate,
    ) -> Result<Outcome, String> {
        let info = self.host_mut(host)?;
        info.capacity = capacity.clone();
        info.coordinate = coordinate.clone();
        Ok(Outcome::Done)
    }

    /// [`Command::PlanMove`]: the partition starts moving to `to` (its epoch goes up).
    /// Refused for an unknown host, another epoch, a move already running, or a move to
    /// the owner itself.
    fn plan_move(&mut self, partition: u16, to: HostId, epoch: u64) -> Result<Outcome, String> {
        if !self.hosts.contains_key(&to) {
            return Err(format!("no host {to} in the cluster"));
        }
        let entry = self.partition_at(partition, epoch)?;
        if entry.target.is_some() || entry.owner == to {
            return Err(format!(
                "partition {partition} cannot move to host {to} now"
            ));
        }
        entry.target = Some(to);
        entry.epoch += 1;
        Ok(Outcome::Done)
    }

    /// [`Command::CompleteMove`]: `to` owns the partition (its epoch goes up). Refused at
    /// another epoch or when the partition is not moving to `to`.
    fn complete_move(&mut self, partition: u16, to: HostId, epoch: u64) -> Result<Outcome, String> {
        let entry = self.partition_at(partition, epoch)?;
        if entry.target != Some(to) {
            return Err(format!("partition {partition} is not moving to host {to}"));
        }
        entry.owner = to;
        entry.target = None;
        entry.epoch += 1;
        entry.term = entry.epoch;
        Ok(Outcome::Done)
    }

    /// [`Command::AbortMove`]: the move stops and the owner keeps the partition (its epoch
    /// goes up). Refused at another epoch or when the partition is not moving.
    fn abort_move(&mut self, partition: u16, epoch: u64) -> Result<Outcome, String> {
        let entry = self.partition_at(partition, epoch)?;
        if entry.target.is_none() {
            return Err(format!("partition {partition} is not moving"));
        }
        entry.target = None;
        entry.epoch += 1;
        Ok(Outcome::Done)
    }

    /// [`Command::Leave`]: the host is marked leaving. Moves to it that already run are
    /// left to finish. Refused when it is leaving already.
    fn leave(&mut self, host: HostId) -> Result<Outcome, String> {
        let info = self.host_mut(host)?;
        if info.leaving {
            return Err(format!("host {host} is already leaving"));
        }
        info.leaving = true;
        Ok(Outcome::Done)
    }

    /// [`Command::Remove`]: the host is gone from the NI and the unused part of its
    /// ranges goes back to the pool. Refused while it holds or receives a partition.
    fn remove(&mut self, host: HostId) -> Result<Outcome, String> {
        self.host_mut(host)?;
        if self
            .partitions
            .iter()
            .any(|entry| entry.is_member(host) || entry.target == Some(host))
        {
            return Err(format!("host {host} still holds partitions"));
        }
        // Its used ids stay recorded under its id, so no one issues them again.
        let _ = self.ids_mut()?.reclaim_unused(host);
        self.hosts.remove(&host);
        Ok(Outcome::Done)
    }

    /// [`Command::AddReplica`]: `host` follows the partition, out of sync. Refused for an
    /// unknown host, a host that holds or receives a copy already, or a running move.
    fn add_replica(&mut self, partition: u16, host: HostId, epoch: u64) -> Result<Outcome, String> {
        if !self.hosts.contains_key(&host) {
            return Err(format!("no host {host} in the cluster"));
        }
        let entry = self.partition_at(partition, epoch)?;
        if entry.is_member(host) || entry.target.is_some() {
            return Err(format!(
                "host {host} cannot become a follower of partition {partition} now"
            ));
        }
        entry.replicas.push(host);
        entry.out_of_sync.push(host);
        entry.epoch += 1;
        Ok(Outcome::Done)
    }

    /// [`Command::PlanDrop`]: the follower is marked for dropping. Refused when it is no
    /// follower or another drop runs.
    fn plan_drop(&mut self, partition: u16, host: HostId, epoch: u64) -> Result<Outcome, String> {
        let entry = self.partition_at(partition, epoch)?;
        if !entry.replicas.contains(&host) || entry.dropping.is_some() {
            return Err(format!(
                "host {host} cannot be dropped from partition {partition} now"
            ));
        }
        entry.dropping = Some(host);
        entry.epoch += 1;
        Ok(Outcome::Done)
    }

    /// [`Command::CompleteDrop`]: the follower is gone from the partition. Refused when it
    /// is not the one being dropped.
    fn complete_drop(
        &mut self,
        partition: u16,
        host: HostId,
        epoch: u64,
    ) -> Result<Outcome, String> {
        let entry = self.partition_at(partition, epoch)?;
        if entry.dropping != Some(host) {
            return Err(format!(
                "host {host} is not being dropped from partition {partition}"
            ));
        }
        entry.replicas.retain(|&h| h != host);
        entry.out_of_sync.retain(|&h| h != host);
        entry.dropping = None;
        entry.epoch += 1;
        Ok(Outcome::Done)
    }

    /// [`Command::Promote`]: `primary` leads from the new epoch on, which becomes its
    /// term. The old primary stays a follower with its sync state: it may hold writes it
    /// acknowledged that only it and the new primary have, so until the new primary has
    /// made sure that the others hold them (see the replication core's sync reports),
    /// the next failover round must count it. A running move is given up. Refused when
    /// `primary` holds no copy.
    fn promote(&mut self, partition: u16, primary: HostId, epoch: u64) -> Result<Outcome, String> {
        let entry = self.partition_at(partition, epoch)?;
        if !entry.is_member(primary) {
            return Err(format!(
                "host {primary} holds no copy of partition {partition}"
            ));
        }
        let old = entry.owner;
        if old != primary {
            entry.replicas.retain(|&h| h != primary);
            entry.out_of_sync.retain(|&h| h != primary);
            entry.replicas.insert(0, old);
            if entry.dropping == Some(primary) {
                entry.dropping = None;
            }
            entry.owner = primary;
        }
        entry.target = None;
        entry.epoch += 1;
        entry.term = entry.epoch;
        Ok(Outcome::Done)
    }

    /// [`Command::SetSync`]: the follower's sync state as its primary reports it. Refused
    /// for a host that is no follower; a report that changes nothing is refused too, so
    /// the epoch moves only on a change.
    fn set_sync(
        &mut self,
        partition: u16,
        host: HostId,
        in_sync: bool,
        epoch: u64,
    ) -> Result<Outcome, String> {
        let entry = self.partition_at(partition, epoch)?;
        if !entry.replicas.contains(&host) {
            return Err(format!(
                "host {host} is no follower of partition {partition}"
            ));
        }
        let listed = entry.out_of_sync.contains(&host);
        if listed != in_sync {
            return Err(format!(
                "host {host} is already {} in partition {partition}",
                if in_sync { "in sync" } else { "out of sync" }
            ));
        }
        if in_sync {
            entry.out_of_sync.retain(|&h| h != host);
        } else {
            entry.out_of_sync.push(host);
        }
        entry.epoch += 1;
        Ok(Outcome::Done)
    }

    /// The partitions `host` holds a copy of, as primary or follower.
    pub fn held_by(&self, host: HostId) -> impl Iterator<Item = u16> + '_ {
        self.partitions
            .iter()
            .enumerate()
            .filter(move |(_, entry)| entry.is_member(host))
            .map(|(p, _)| p as u16)
    }

    /// The entry of `partition`, if its epoch is still `epoch`.
    fn partition_at(&mut self, partition: u16, epoch: u64) -> Result<&mut PartitionEntry, String> {
        let entry = self
            .partitions
            .get_mut(usize::from(partition))
            .ok_or_else(|| format!("no partition {partition}"))?;
        if entry.epoch != epoch {
            return Err(format!(
                "partition {partition} is at epoch {}, not {epoch}",
                entry.epoch
            ));
        }
        Ok(entry)
    }

    /// Whether `host` owns every partition `request` reads or writes.
    pub fn owns_all(&self, host: HostId, request: &WorkerRequest) -> bool {
        let owns = |partition: u16| {
            self.partitions
                .get(usize::from(partition))
                .is_some_and(|entry| entry.owner == host)
        };
        request.client_partitions().into_iter().all(owns)
    }

    /// The partitions `host` owns.
    pub fn owned_by(&self, host: HostId) -> impl Iterator<Item = u16> + '_ {
        self.partitions
            .iter()
            .enumerate()
            .filter(move |(_, entry)| entry.owner == host)
            .map(|(p, _)| p as u16)
    }

    fn host_mut(&mut self, host: HostId) -> Result<&mut HostInfo, String> {
        self.hosts
            .get_mut(&host)
            .ok_or_else(|| format!("no host {host} in the cluster"))
    }

    fn ids_mut(&mut self) -> Result<&mut IdSpace, String> {
        self.ids
            .as_mut()
            .ok_or_else(|| "the cluster is not founded yet".to_string())
    }

    /// The ranges `host` owns, with how far each is used.
    pub fn ranges_of(&self, host: HostId) -> &[OwnedRange] {
        self.ids
            .as_ref()
            .and_then(|ids| ids.host_ranges(host))
            .unwrap_or(&[])
    }

    /// A digest of the whole NI, equal on every host that applied the same commands.
    pub fn checksum(&self) -> u64 {
        let bytes =
            bincode::serde::encode_to_vec(self, bincode::config::standard()).unwrap_or_default();
        let digest = Sha256::digest(&bytes);
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_be_bytes(first)
    }
}

impl MetadataState for NetworkInfo {
    type Command = Command;
    type Outcome = Outcome;

    fn apply(&mut self, command: &Command, _log_index: u64) -> Outcome {
        NetworkInfo::apply(self, command)
    }
}

fn new_host(id: HostId, peer_addr: &str, client_addr: &str, now_ms: u64) -> HostInfo {
    HostInfo {
        id,
        peer_addr: peer_addr.to_string(),
        client_addr: client_addr.to_string(),
        state: HostState::Write,
        since_ms: now_ms,
        joined_ms: now_ms,
        capacity: Capacity::default(),
        coordinate: Coordinate::default(),
        leaving: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn founded() -> NetworkInfo {
        let mut ni = NetworkInfo::default();
        let outcome = ni.apply(&Command::Found {
            cluster_id: 7,
            peer_addr: "127.0.0.1:7380".into(),
            client_addr: "127.0.0.1:7379".into(),
            partitions: 16,
            now_ms: 1,
        });
        assert_eq!(outcome, Outcome::Done);
        ni
    }

    fn join(ni: &mut NetworkInfo, sponsor: HostId, addr: &str) -> (HostId, IdRange) {
        match ni.apply(&Command::Join {
            peer_addr: addr.into(),
            client_addr: String::new(),
            partitions: 16,
            sponsor,
            now_ms: 2,
        }) {
            Outcome::Joined { host, range } => (host, range),
            other => panic!("join refused: {other:?}"),
        }
    }

    #[test]
    fn joins_get_distinct_ids_and_disjoint_ranges() {
        let mut ni = founded();
        for i in 0..6 {
            let (host, range) = join(&mut ni, FOUNDER + (i % 2), &format!("10.0.0.{i}:7380"));
            assert_eq!(host, FOUNDER + 1 + i);
            assert!(!range.is_empty());
        }
        assert_eq!(ni.hosts.len(), 7);
        assert_eq!(ni.version, 7);
        // Later joins split earlier joiners' ranges: what each host owns now is disjoint.
        ni.ids.as_ref().unwrap().check_disjoint().unwrap();
        for host in ni.hosts.keys() {
            assert!(!ni.ranges_of(*host).is_empty(), "host {host} owns no range");
        }
    }

    #[test]
    fn refused_commands_change_nothing() {
        let mut ni = founded();
        let before = ni.clone();
        assert!(matches!(
            ni.apply(&Command::SetState {
                host: 9,
                state: HostState::Inactive,
                now_ms: 5
            }),
            Outcome::Refused(_)
        ));
        assert!(matches!(
            ni.apply(&Command::Found {
                cluster_id: 8,
                peer_addr: String::new(),
                client_addr: String::new(),
                partitions: 16,
                now_ms: 5
            }),
            Outcome::Refused(_)
        ));
        assert_eq!(ni, before);
    }

    #[test]
    fn a_returning_host_keeps_its_id_and_gets_its_new_address() {
        let mut ni = founded();
        let (host, _) = join(&mut ni, FOUNDER, "127.0.0.2:7380");
        ni.apply(&Command::SetState {
            host,
            state: HostState::Inactive,
            now_ms: 10,
        });
        assert_eq!(ni.hosts[&host].state, HostState::Inactive);
        ni.apply(&Command::Rejoin {
            host,
            peer_addr: "127.0.0.9:7380".into(),
            client_addr: String::new(),
            now_ms: 20,
        });
        let info = &ni.hosts[&host];
        assert_eq!(
            (info.state, info.since_ms, info.peer_addr.as_str()),
            (HostState::Write, 20, "127.0.0.9:7380")
        );
    }

    #[test]
    fn reclaimed_ids_are_never_reserved_again() {
        let mut ni = founded();
        let (host, _) = join(&mut ni, FOUNDER, "127.0.0.2:7380");
        let Outcome::Reserved(issued) = ni.apply(&Command::ReserveIds { host, count: 1000 }) else {
            panic!("reserve refused")
        };
        let Outcome::Reclaimed(reclaimed) = ni.apply(&Command::Reclaim { host }) else {
            panic!("reclaim refused")
        };
        assert!(reclaimed > 0);
        // The pool's ids go to the next host; none of them was issued before.
        let (_, range) = join(&mut ni, FOUNDER, "127.0.0.3:7380");
        assert!(range.end <= issued.start || issued.end <= range.start);
        // The reclaimed host, back again, gets new ids above nothing it issued.
        let Outcome::Reserved(more) = ni.apply(&Command::ReserveIds { host, count: 10 }) else {
            panic!("reserve refused")
        };
        assert!(more.end <= issued.start || issued.end <= more.start);
        ni.ids.as_ref().unwrap().check_disjoint().unwrap();
    }

    #[test]
    fn replicas_applying_the_same_commands_agree_on_the_checksum() {
        let mut a = founded();
        let mut b = founded();
        for ni in [&mut a, &mut b] {
            join(ni, FOUNDER, "127.0.0.2:7380");
        }
        assert_eq!(a.checksum(), b.checksum());
        a.apply(&Command::ReserveIds { host: 2, count: 1 });
        assert_ne!(a.checksum(), b.checksum());
    }

    #[test]
    fn moves_follow_the_epoch_and_hosts_leave_only_empty() {
        let mut ni = founded();
        let (host, _) = join(&mut ni, FOUNDER, "127.0.0.2:7380");
        assert_eq!(ni.owned_by(FOUNDER).count(), 16);
        let plan = Command::PlanMove {
            partition: 3,
            to: host,
            epoch: 1,
        };
        assert_eq!(ni.apply(&plan), Outcome::Done);
        // A stale or repeated command is refused.
        assert!(matches!(ni.apply(&plan), Outcome::Refused(_)));
        assert!(matches!(
            ni.apply(&Command::CompleteMove {
                partition: 3,
                to: host,
                epoch: 1
            }),
            Outcome::Refused(_)
        ));
        assert!(matches!(
            ni.apply(&Command::Remove { host }),
            Outcome::Refused(_)
        ));
        let complete = Command::CompleteMove {
            partition: 3,
            to: host,
            epoch: 2,
        };
        assert_eq!(ni.apply(&complete), Outcome::Done);
        assert_eq!(
            ni.partitions[3],
            PartitionEntry {
                term: 3,
                ..PartitionEntry::single(host, 3)
            }
        );
        // An aborted move leaves the owner in place.
        ni.apply(&Command::PlanMove {
            partition: 4,
            to: host,
            epoch: 1,
        });
        assert_eq!(
            ni.apply(&Command::AbortMove {
                partition: 4,
                epoch: 2
            }),
            Outcome::Done
        );
        assert_eq!(ni.partitions[4].owner, FOUNDER);
        assert_eq!(ni.apply(&Command::Leave { host }), Outcome::Done);
        assert!(ni.hosts[&host].leaving);
        ni.apply(&Command::PlanMove {
            partition: 3,
            to: FOUNDER,
            epoch: 3,
        });
        ni.apply(&Command::CompleteMove {
            partition: 3,
            to: FOUNDER,
            epoch: 4,
        });
        assert_eq!(ni.apply(&Command::Remove { host }), Outcome::Done);
        assert!(!ni.hosts.contains_key(&host));
    }

    #[test]
    fn a_host_with_another_partition_count_cannot_join() {
        let mut ni = founded();
        let outcome = ni.apply(&Command::Join {
            peer_addr: "127.0.0.2:7380".into(),
            client_addr: String::new(),
            partitions: 256,
            sponsor: FOUNDER,
            now_ms: 2,
        });
        assert!(
            matches!(outcome, Outcome::Refused(reason) if reason.contains("storage.partitions"))
        );
    }

    fn refused(outcome: Outcome) -> String {
        match outcome {
            Outcome::Refused(reason) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_join_with_an_unknown_sponsor_takes_from_the_pool_then_from_the_roomiest_host() {
        let mut ni = founded();
        // The pool is empty: the roomiest host (the founder) gives.
        let founder_unused = ni.ranges_of(FOUNDER)[0].unused();
        let (second, range) = join(&mut ni, 42, "127.0.0.2:7380");
        assert_eq!(range.start, founder_unused.start + founder_unused.len() / 2);
        assert_eq!(range.end, founder_unused.end);
        // Its unused ids go to the pool when it is reclaimed: the next such join gets them whole.
        assert_eq!(
            ni.apply(&Command::Reclaim { host: second }),
            Outcome::Reclaimed(range.len())
        );
        let (third, pooled) = join(&mut ni, 42, "127.0.0.3:7380");
        assert_eq!((third, pooled), (second + 1, range));
        assert_eq!(ni.ids.as_ref().unwrap().free(), &[]);
    }

    #[test]
    fn a_host_out_of_ids_gets_a_new_range_from_the_roomiest_other_host() {
        let mut ni = founded();
        let (host, range) = join(&mut ni, FOUNDER, "127.0.0.2:7380");
        assert_eq!(
            ni.apply(&Command::ReserveIds {
                host,
                count: range.len()
            }),
            Outcome::Reserved(range)
        );
        let Outcome::Reserved(more) = ni.apply(&Command::ReserveIds { host, count: 1 }) else {
            panic!("reserve refused")
        };
        let ranges = ni.ranges_of(host);
        assert_eq!(ranges.len(), 2);
        // The new range sits below the used-up one (the founder keeps the lower part).
        assert_eq!(ranges[1].range, range);
        assert_eq!(more.start, ranges[0].range.start);
        assert_eq!(more.len(), 1);
        // Neither an unknown host nor an unfounded cluster reserves anything.
        refused(ni.apply(&Command::ReserveIds { host: 9, count: 1 }));
        let mut empty = NetworkInfo::default();
        refused(empty.apply(&Command::ReserveIds { host: 1, count: 1 }));
    }

    #[test]
    fn set_state_records_the_time_and_refuses_the_state_the_host_has() {
        let mut ni = founded();
        let reason = refused(ni.apply(&Command::SetState {
            host: FOUNDER,
            state: HostState::Write,
            now_ms: 5,
        }));
        assert!(reason.contains("already write"), "{reason}");
        assert_eq!(
            ni.apply(&Command::SetState {
                host: FOUNDER,
                state: HostState::Read,
                now_ms: 5,
            }),
            Outcome::Done
        );
        let info = &ni.hosts[&FOUNDER];
        assert_eq!((info.state, info.since_ms), (HostState::Read, 5));
        assert_eq!(ni.version, 2);
    }

    #[test]
    fn a_rejoin_of_a_writable_host_keeps_its_since_time() {
        let mut ni = founded();
        ni.apply(&Command::Rejoin {
            host: FOUNDER,
            peer_addr: "127.0.0.5:7380".into(),
            client_addr: "127.0.0.5:7379".into(),
            now_ms: 50,
        });
        let info = &ni.hosts[&FOUNDER];
        assert_eq!(
            (
                info.state,
                info.since_ms,
                info.peer_addr.as_str(),
                info.client_addr.as_str()
            ),
            (HostState::Write, 1, "127.0.0.5:7380", "127.0.0.5:7379")
        );
        refused(ni.apply(&Command::Rejoin {
            host: 9,
            peer_addr: String::new(),
            client_addr: String::new(),
            now_ms: 50,
        }));
    }

    #[test]
    fn a_report_replaces_capacity_and_coordinate() {
        let mut ni = founded();
        let capacity = Capacity {
            capacity_bytes: 10,
            free_bytes: 7,
            used_bytes: 3,
            cpu_rating: 2000,
            workers: 4,
        };
        let coordinate = Coordinate {
            height_s: 0.5,
            ..Coordinate::default()
        };
        let report = Command::Report {
            host: FOUNDER,
            capacity: capacity.clone(),
            coordinate: coordinate.clone(),
        };
        assert_eq!(ni.apply(&report), Outcome::Done);
        let info = &ni.hosts[&FOUNDER];
        assert_eq!((&info.capacity, &info.coordinate), (&capacity, &coordinate));
        refused(ni.apply(&Command::Report {
            host: 9,
            capacity,
            coordinate,
        }));
    }

    #[test]
    fn moves_are_refused_unless_they_fit_the_table() {
        let mut ni = founded();
        let (host, _) = join(&mut ni, FOUNDER, "127.0.0.2:7380");
        let (third, _) = join(&mut ni, FOUNDER, "127.0.0.3:7380");
        let before = ni.clone();
        let plan = |partition, to, epoch| Command::PlanMove {
            partition,
            to,
            epoch,
        };
        assert!(refused(ni.apply(&plan(0, 9, 1))).contains("no host 9"));
        assert!(refused(ni.apply(&plan(16, host, 1))).contains("no partition 16"));
        assert!(refused(ni.apply(&plan(0, host, 2))).contains("at epoch 1, not 2"));
        assert!(refused(ni.apply(&plan(0, FOUNDER, 1))).contains("cannot move"));
        assert!(refused(ni.apply(&Command::AbortMove {
            partition: 0,
            epoch: 1
        }))
        .contains("not moving"));
        assert_eq!(ni, before);
        assert_eq!(ni.apply(&plan(0, host, 1)), Outcome::Done);
        // One move at a time, and only to its target.
        assert!(refused(ni.apply(&plan(0, third, 2))).contains("cannot move"));
        assert!(refused(ni.apply(&Command::CompleteMove {
            partition: 0,
            to: FOUNDER,
            epoch: 2
        }))
        .contains("not moving to host 1"));
        assert_eq!(
            ni.partitions[0],
            PartitionEntry {
                term: 1,
                target: Some(host),
                ..PartitionEntry::single(FOUNDER, 2)
            }
        );
    }

    #[test]
    fn a_leaving_host_keeps_the_moves_to_it_and_is_removed_only_once_empty() {
        let mut ni = founded();
        let (host, range) = join(&mut ni, FOUNDER, "127.0.0.2:7380");
        ni.apply(&Command::PlanMove {
            partition: 2,
            to: host,
            epoch: 1,
        });
        assert_eq!(ni.apply(&Command::Leave { host }), Outcome::Done);
        assert!(refused(ni.apply(&Command::Leave { host })).contains("already leaving"));
        assert_eq!(ni.partitions[2].target, Some(host));
        assert!(refused(ni.apply(&Command::Remove { host })).contains("still holds"));
        ni.apply(&Command::AbortMove {
            partition: 2,
            epoch: 2,
        });
        assert_eq!(ni.apply(&Command::Remove { host }), Outcome::Done);
        assert!(!ni.hosts.contains_key(&host));
        // Its unused ids went back to the pool; nothing was issued, so it keeps no range.
        assert_eq!(ni.ids.as_ref().unwrap().free(), &[range]);
        assert_eq!(ni.ranges_of(host), &[]);
        refused(ni.apply(&Command::Remove { host }));
        refused(ni.apply(&Command::Leave { host }));
    }

    /// `ni` after `change`, as a command that applied would leave it (one version up).
    fn broken(ni: &NetworkInfo, change: impl FnOnce(&mut NetworkInfo)) -> NetworkInfo {
        let mut after = ni.clone();
        after.version += 1;
        change(&mut after);
        after
    }

    #[test]
    fn the_invariant_check_catches_a_broken_ni() {
        let mut ni = founded();
        let (host, _) = join(&mut ni, FOUNDER, "127.0.0.2:7380");
        ni.apply(&Command::PlanMove {
            partition: 1,
            to: host,
            epoch: 1,
        });
        let done = Outcome::Done;
        let fine = broken(&ni, |_| {});
        assert_eq!(fine.check_invariants(&ni, &done), Ok(()));
        let check = |after: NetworkInfo, outcome: &Outcome| {
            after
                .check_invariants(&ni, outcome)
                .expect_err("a broken NI passed the check")
        };
        // The version.
        assert!(check(fine.clone(), &Outcome::Refused("no".into())).contains("version"));
        assert!(check(broken(&ni, |n| n.version += 1), &done).contains("version"));
        // The cluster and its partitions.
        assert!(check(broken(&ni, |n| n.cluster_id = 8), &done).contains("cluster id"));
        assert!(check(broken(&ni, |n| n.partitions.truncate(8)), &done).contains("partitions"));
        // The hosts and their ids.
        let misfiled = broken(&ni, |n| {
            let info = n.hosts.remove(&host).unwrap();
            n.hosts.insert(host + 5, info);
            n.next_host_id = host + 6;
        });
        assert!(check(misfiled, &done).contains("filed under"));
        assert!(check(broken(&ni, |n| n.next_host_id = host), &done).contains("next host id"));
        assert!(check(broken(&ni, |n| n.ids = None), &done).contains("no id space"));
        // A range of the founder's handed out again from the pool (edited through serde:
        // the id space's own operations never overlap).
        let overlapping = broken(&ni, |n| {
            let mut ids = serde_json::to_value(n.ids.as_ref().unwrap()).unwrap();
            let range = ids["hosts"]["1"][0]["range"].clone();
            ids["free"] = serde_json::json!([range]);
            n.ids = Some(serde_json::from_value(ids).unwrap());
        });
        assert!(check(overlapping, &done).contains("id space is broken"));
        // The partition table.
        let unknown_owner = broken(&ni, |n| n.partitions[0].owner = 9);
        assert!(check(unknown_owner, &done).contains("owned by host 9"));
        let unknown_target = broken(&ni, |n| n.partitions[1].target = Some(9));
        assert!(check(unknown_target, &done).contains("moves to host 9"));
        let to_owner = broken(&ni, |n| n.partitions[1].target = Some(FOUNDER));
        assert!(check(to_owner, &done).contains("moves to its owner"));
        let epoch_down = broken(&ni, |n| n.partitions[1].epoch = 1);
        assert!(check(epoch_down, &done).contains("without a higher epoch"));
        let same_term = broken(&ni, |n| n.partitions[0].owner = host);
        assert!(check(same_term, &done).contains("without a new term"));
        let same_epoch = broken(&ni, |n| n.partitions[0].replicas = vec![host]);
        assert!(check(same_epoch, &done).contains("without a higher epoch"));
        // Followers.
        let owner_follows = broken(&ni, |n| n.partitions[0].replicas = vec![FOUNDER]);
        assert!(check(owner_follows, &done).contains("lists follower 1"));
        let unknown = broken(&ni, |n| n.partitions[0].replicas = vec![9]);
        assert!(check(unknown, &done).contains("lists follower 9"));
        let marked = broken(&ni, |n| n.partitions[0].out_of_sync = vec![host]);
        assert!(check(marked, &done).contains("no follower"));
        let term_up = broken(&ni, |n| n.partitions[0].term = 5);
        assert!(check(term_up, &done).contains("term above its epoch"));
    }

    #[test]
    fn followers_are_added_dropped_and_promoted_at_their_epoch() {
        let mut ni = founded();
        let (two, _) = join(&mut ni, FOUNDER, "127.0.0.2:7380");
        let (three, _) = join(&mut ni, FOUNDER, "127.0.0.3:7380");
        let add = |host, epoch| Command::AddReplica {
            partition: 0,
            host,
            epoch,
        };
        assert_eq!(ni.apply(&add(two, 1)), Outcome::Done);
        assert!(refused(ni.apply(&add(three, 1))).contains("epoch 2"));
        assert!(refused(ni.apply(&add(two, 2))).contains("cannot become a follower"));
        assert!(refused(ni.apply(&add(FOUNDER, 2))).contains("cannot become a follower"));
        assert_eq!(ni.apply(&add(three, 2)), Outcome::Done);
        let entry = &ni.partitions[0];
        assert_eq!(
            (entry.members(), entry.epoch, entry.term),
            (vec![FOUNDER, two, three], 3, 1)
        );
        assert_eq!(entry.out_of_sync, vec![two, three]);
        assert_eq!(ni.held_by(two).collect::<Vec<_>>(), vec![0]);
        // The primary reports host 2 caught up; a report that changes nothing is refused.
        let sync = |host, in_sync, epoch| Command::SetSync {
            partition: 0,
            host,
            in_sync,
            epoch,
        };
        assert_eq!(ni.apply(&sync(two, true, 3)), Outcome::Done);
        assert!(refused(ni.apply(&sync(two, true, 4))).contains("already in sync"));
        assert!(refused(ni.apply(&sync(FOUNDER, true, 4))).contains("no follower"));
        // A host holding a copy is not removed.
        assert!(refused(ni.apply(&Command::Remove { host: three })).contains("still holds"));
        // Failover to host 2: a new term; the old primary follows, still in sync.
        let promote = |primary, epoch| Command::Promote {
            partition: 0,
            primary,
            epoch,
        };
        assert!(refused(ni.apply(&promote(9, 4))).contains("holds no copy"));
        assert_eq!(ni.apply(&promote(two, 4)), Outcome::Done);
        let entry = ni.partitions[0].clone();
        assert_eq!((entry.owner, entry.epoch, entry.term), (two, 5, 5));
        assert_eq!(entry.replicas, vec![FOUNDER, three]);
        assert_eq!(entry.out_of_sync, vec![three]);
        // Re-appointing the same primary still opens a new term.
        assert_eq!(ni.apply(&promote(two, 5)), Outcome::Done);
        assert_eq!((ni.partitions[0].epoch, ni.partitions[0].term), (6, 6));
        // Dropping host 3: planned, then completed by the primary.
        let plan = |host, epoch| Command::PlanDrop {
            partition: 0,
            host,
            epoch,
        };
        let complete = |host, epoch| Command::CompleteDrop {
            partition: 0,
            host,
            epoch,
        };
        assert!(refused(ni.apply(&plan(two, 6))).contains("cannot be dropped"));
        assert!(refused(ni.apply(&complete(three, 6))).contains("not being dropped"));
        assert_eq!(ni.apply(&plan(three, 6)), Outcome::Done);
        assert!(refused(ni.apply(&plan(FOUNDER, 7))).contains("cannot be dropped"));
        assert_eq!(ni.apply(&complete(three, 7)), Outcome::Done);
        let entry = &ni.partitions[0];
        assert_eq!(
            (entry.members(), entry.dropping, entry.epoch),
            (vec![two, FOUNDER], None, 8)
        );
        assert!(entry.out_of_sync.is_empty());
        assert_eq!(ni.apply(&Command::Remove { host: three }), Outcome::Done);
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "broke an invariant of the NI")]
    fn applying_a_command_to_a_broken_ni_panics_in_debug_builds() {
        let mut ni = founded();
        ni.partitions[0].owner = 9;
        ni.apply(&Command::Leave { host: FOUNDER });
    }
}
