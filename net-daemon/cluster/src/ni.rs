//! The network information (NI): what every host knows about the cluster.
//!
//! The metadata Raft group replicates it: a host changes it only by proposing a
//! [`Command`], and every host applies the committed commands in the same order
//! with [`NetworkInfo::apply`]. Applying is pure and deterministic: it reads no
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
pub const FOUNDER: HostId = 1;

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
    pub used_bytes: u64,
    /// Relative CPU speed (cores × MHz / 1000).
    pub cpu_rating: u32,
    /// Its shard-workers: partition `p` is on its worker `p mod workers` (0: not reported).
    pub workers: u16,
}

/// One host of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub id: HostId,
    /// Where the other hosts reach it ("host:port").
    pub peer_addr: String,
    /// Where clients reach it ("host:port", or "" when it has no TCP listener).
    pub client_addr: String,
    pub state: HostState,
    /// When `state` last changed (ms since the epoch, the proposer's clock).
    pub since_ms: u64,
    /// When it was accepted.
    pub joined_ms: u64,
    pub capacity: Capacity,
    /// Its network coordinate, as it last reported it.
    pub coordinate: Coordinate,
    /// It is handing its partitions off before it is removed (`shoal leave`).
    pub leaving: bool,
}

/// Who holds one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionEntry {
    /// The host that serves the partition.
    pub owner: HostId,
    /// Raised by every change of this entry; requests between hosts carry it.
    pub epoch: u64,
    /// The host the partition is moving to, while a handoff runs.
    pub target: Option<HostId>,
}

/// A change to the NI, proposed by one host and applied by all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Starts the cluster: `FOUNDER` gets the whole id space and all `partitions`.
    Found {
        cluster_id: u64,
        peer_addr: String,
        client_addr: String,
        partitions: u16,
        now_ms: u64,
    },
    /// Accepts a new host, sponsored by `sponsor` (the host it asked), and gives it a range.
    /// Refused when the host's partition count differs from the cluster's.
    Join {
        peer_addr: String,
        client_addr: String,
        partitions: u16,
        sponsor: HostId,
        now_ms: u64,
    },
    /// A known host is back, possibly at new addresses; it is writable again.
    Rejoin {
        host: HostId,
        peer_addr: String,
        client_addr: String,
        now_ms: u64,
    },
    SetState {
        host: HostId,
        state: HostState,
        now_ms: u64,
    },
    /// Marks `count` more ids of `host` as issued before it issues them.
    ReserveIds { host: HostId, count: u64 },
    /// Takes back the unused part of an offline host's ranges.
    Reclaim { host: HostId },
    /// The host's latest capacity and coordinate.
    Report {
        host: HostId,
        capacity: Capacity,
        coordinate: Coordinate,
    },
    /// Starts moving `partition` to `to`; applies only at `epoch` and when no move runs.
    PlanMove {
        partition: u16,
        to: HostId,
        epoch: u64,
    },
    /// The move of `partition` to `to` is done: `to` owns it. Applies only at `epoch`.
    CompleteMove {
        partition: u16,
        to: HostId,
        epoch: u64,
    },
    /// Gives up the move of `partition`; the owner keeps it. Applies only at `epoch`.
    AbortMove { partition: u16, epoch: u64 },
    /// The host hands off all its partitions and is then removed.
    Leave { host: HostId },
    /// Removes a host that owns no partition and receives none.
    Remove { host: HostId },
}

/// What applying a command answers its proposer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied; nothing to return.
    #[default]
    Done,
    /// `Join`: the new host's id and its first range.
    Joined { host: HostId, range: IdRange },
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
    pub hosts: BTreeMap<HostId, HostInfo>,
    /// Who owns which ids; `None` before `Found`.
    pub ids: Option<IdSpace>,
    /// The id the next accepted host gets.
    pub next_host_id: HostId,
    /// The owner of each partition; empty before `Found`.
    pub partitions: Vec<PartitionEntry>,
}

impl NetworkInfo {
    /// Applies a committed command. A refused command changes nothing.
    pub fn apply(&mut self, command: &Command) -> Outcome {
        let outcome = match self.change(command) {
            Ok(outcome) => outcome,
            Err(reason) => return Outcome::Refused(reason),
        };
        self.version += 1;
        outcome
    }

    fn change(&mut self, command: &Command) -> Result<Outcome, String> {
        match command {
            Command::Found {
                cluster_id,
                peer_addr,
                client_addr,
                partitions,
                now_ms,
            } => {
                if self.cluster_id != 0 {
                    return Err(format!(
                        "cluster {:016x} is already founded",
                        self.cluster_id
                    ));
                }
                self.cluster_id = *cluster_id;
                self.ids = Some(IdSpace::new(FOUNDER));
                self.next_host_id = FOUNDER + 1;
                self.hosts
                    .insert(FOUNDER, new_host(FOUNDER, peer_addr, client_addr, *now_ms));
                self.partitions = vec![
                    PartitionEntry {
                        owner: FOUNDER,
                        epoch: 1,
                        target: None,
                    };
                    usize::from(*partitions)
                ];
                Ok(Outcome::Done)
            }
            Command::Join {
                peer_addr,
                client_addr,
                partitions,
                sponsor,
                now_ms,
            } => {
                if usize::from(*partitions) != self.partitions.len() {
                    return Err(format!(
                        "the cluster has {} partitions and this host is configured with {partitions} \
                         (storage.partitions must be equal on every host)",
                        self.partitions.len()
                    ));
                }
                let host = self.next_host_id;
                let ids = self.ids_mut()?;
                let range = match ids.sponsor_split(*sponsor, host) {
                    Ok(range) => range,
                    // The sponsor is too full to split: the pool or the roomiest host gives.
                    Err(RangeError::NothingToSplit { .. } | RangeError::UnknownHost(_)) => {
                        match ids.grant_free(host) {
                            Ok(range) => range,
                            Err(_) => {
                                let other =
                                    ids.best_sponsor().ok_or("no host has ids left to share")?;
                                ids.sponsor_split(other, host).map_err(|e| e.to_string())?
                            }
                        }
                    }
                    Err(error) => return Err(error.to_string()),
                };
                self.next_host_id += 1;
                self.hosts
                    .insert(host, new_host(host, peer_addr, client_addr, *now_ms));
                Ok(Outcome::Joined { host, range })
            }
            Command::Rejoin {
                host,
                peer_addr,
                client_addr,
                now_ms,
            } => {
                let info = self.host_mut(*host)?;
                info.peer_addr.clone_from(peer_addr);
                info.client_addr.clone_from(client_addr);
                if info.state != HostState::Write {
                    info.state = HostState::Write;
                    info.since_ms = *now_ms;
                }
                Ok(Outcome::Done)
            }
            Command::SetState {
                host,
                state,
                now_ms,
            } => {
                let info = self.host_mut(*host)?;
                if info.state == *state {
                    return Err(format!("host {host} is already {}", state.name()));
                }
                info.state = *state;
                info.since_ms = *now_ms;
                Ok(Outcome::Done)
            }
            Command::ReserveIds { host, count } => {
                self.host_mut(*host)?;
                let ids = self.ids_mut()?;
                let range = match ids.reserve(*host, *count) {
                    Ok(range) => range,
                    // Out of ids: the pool or the roomiest other host gives a new range.
                    Err(RangeError::Exhausted { .. }) => {
                        if ids.grant_free(*host).is_err() {
                            let sponsor = ids
                                .best_sponsor()
                                .filter(|sponsor| sponsor != host)
                                .ok_or("the id space is exhausted")?;
                            ids.sponsor_split(sponsor, *host)
                                .map_err(|e| e.to_string())?;
                        }
                        ids.reserve(*host, *count).map_err(|e| e.to_string())?
                    }
                    Err(error) => return Err(error.to_string()),
                };
                Ok(Outcome::Reserved(range))
            }
            Command::Reclaim { host } => {
                self.host_mut(*host)?;
                let reclaimed = self
                    .ids_mut()?
                    .reclaim_unused(*host)
                    .map_err(|e| e.to_string())?;
                Ok(Outcome::Reclaimed(reclaimed))
            }
            Command::Report {
                host,
                capacity,
                coordinate,
            } => {
                let info = self.host_mut(*host)?;
                info.capacity = capacity.clone();
                info.coordinate = coordinate.clone();
                Ok(Outcome::Done)
            }
            Command::PlanMove {
                partition,
                to,
                epoch,
            } => {
                if !self.hosts.contains_key(to) {
                    return Err(format!("no host {to} in the cluster"));
                }
                let entry = self.partition_at(*partition, *epoch)?;
                if entry.target.is_some() || entry.owner == *to {
                    return Err(format!(
                        "partition {partition} cannot move to host {to} now"
                    ));
                }
                entry.target = Some(*to);
                entry.epoch += 1;
                Ok(Outcome::Done)
            }
            Command::CompleteMove {
                partition,
                to,
                epoch,
            } => {
                let entry = self.partition_at(*partition, *epoch)?;
                if entry.target != Some(*to) {
                    return Err(format!("partition {partition} is not moving to host {to}"));
                }
                entry.owner = *to;
                entry.target = None;
                entry.epoch += 1;
                Ok(Outcome::Done)
            }
            Command::AbortMove { partition, epoch } => {
                let entry = self.partition_at(*partition, *epoch)?;
                if entry.target.is_none() {
                    return Err(format!("partition {partition} is not moving"));
                }
                entry.target = None;
                entry.epoch += 1;
                Ok(Outcome::Done)
            }
            Command::Leave { host } => {
                let info = self.host_mut(*host)?;
                if info.leaving {
                    return Err(format!("host {host} is already leaving"));
                }
                info.leaving = true;
                Ok(Outcome::Done)
            }
            Command::Remove { host } => {
                self.host_mut(*host)?;
                if self
                    .partitions
                    .iter()
                    .any(|entry| entry.owner == *host || entry.target == Some(*host))
                {
                    return Err(format!("host {host} still holds partitions"));
                }
                // Its used ids stay recorded under its id, so no one issues them again.
                let _ = self.ids_mut()?.reclaim_unused(*host);
                self.hosts.remove(host);
                Ok(Outcome::Done)
            }
        }
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
                owner: host,
                epoch: 3,
                target: None
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
}
