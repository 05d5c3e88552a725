//! Replication of a partition's commit log to its replicas, and failover: the sans-IO
//! cores.
//!
//! A partition is held by an ordered list of hosts in the NI, the primary first. The
//! primary's local worker writes every change with its log entry, then the primary
//! ships the entries to the other replicas, which apply them in order to their own
//! copies. A write is acknowledged to its client once `min_replicas_to_write` copies
//! (the primary's included) hold it durably: that is the *commit point*. The rules,
//! each against a failure other systems shipped (see `docs/cluster.md`, Replication):
//! - **Terms fence old primaries.** A primary is appointed by a committed NI change,
//!   and the partition's epoch after that change is its *term*. A replica that has
//!   seen term `t` refuses everything from a lower term, durably.
//! - **Nothing uncommitted is visible.** The primary reads only up to the commit point
//!   ([`Replica::readable`]), and only while it holds a lease.
//! - **Leases from the acknowledgements.** Every acknowledgement carries a promise: the
//!   replica answers no failover query for `lease` after it received the entry. The
//!   primary counts the promises of `min_replicas_to_write - 1` replicas; any failover
//!   query that can succeed reaches one of them, so a new primary starts only after
//!   the old one's lease ran out. In a planned handover the old primary steps down
//!   first, and the leader releases the replicas from their promises to it, so the
//!   handover does not wait out the lease.
//! - **Failover picks a copy that holds every acknowledged write.** The metadata leader
//!   fences `replicas - min_replicas_to_write + 1` replicas at the new term and takes
//!   the highest `(term, last commit id)` among their answers ([`failover`]). Any
//!   acknowledged write is on `min_replicas_to_write` copies, so one of the answers
//!   holds it.
//! - **A new term commits only its own entries.** A new primary first writes an empty
//!   *marker* entry in its term; entries of older terms become committed with it (the
//!   Raft paper's figure 8).
//! - **A copy with a foreign tail is re-copied.** Every log carries its [`History`] of
//!   terms. A replica whose last entries were written in a term that the primary's log
//!   does not share for those ids takes a full copy, as does one whose position the
//!   primary's log no longer reaches back to.
//!
//! Modules:
//! - [`history`]: which term wrote each commit id.
//! - [`replica`]: one host's copy of one partition, as primary or follower.
//! - [`failover`]: the metadata leader's choice of a new primary.

pub mod failover;
pub mod history;
pub mod replica;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use history::History;

/// A primary's term: the partition's NI epoch at which it was appointed.
pub type Term = u64;
/// A partition's commit id (gapless: each write takes `last + 1`).
pub type CommitId = u64;

/// Where a log ends: the term of its last entry, then its last commit id. Positions
/// compare in that order, as Raft compares logs; the copy with the highest position
/// holds every entry that a majority of its term ever acknowledged.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    /// The term that wrote the last entry (0 for an empty log).
    pub term: Term,
    /// The last commit id (0 for an empty log).
    pub last: CommitId,
}

/// The replication settings of a cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Copies a write needs, the primary's included, before it is acknowledged.
    pub min_replicas_to_write: usize,
    /// How long a replica's promise lasts: it answers no failover query for this long
    /// after an entry reached it. The primary's lease ends `lease_margin` earlier.
    pub lease: Duration,
    /// Taken off the lease on the primary's side, for clock rate drift between hosts.
    pub lease_margin: Duration,
    /// The primary sends every follower something at least this often.
    pub heartbeat: Duration,
    /// A follower that has heard nothing from its primary for this long reports it lost.
    pub primary_silence: Duration,
    /// A follower heard from within this counts toward `min_replicas_to_write` when a
    /// write is admitted.
    pub good_replica_within: Duration,
    /// A follower serves `READONLY` reads only while it heard from its primary within
    /// this: its reads miss at most the writes acknowledged in this time (and in one
    /// message's delay).
    pub max_read_staleness: Duration,
    /// A follower that has not reached a commit point of this long ago (or has not
    /// answered since) is reported out of sync, so that the NI shows it.
    pub out_of_sync_after: Duration,
    /// Most entries in one append message.
    pub max_entries_per_append: u64,
    /// Most entries sent to one follower and not yet acknowledged.
    pub max_entries_in_flight: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            min_replicas_to_write: 2,
            lease: Duration::from_millis(1500),
            lease_margin: Duration::from_millis(200),
            heartbeat: Duration::from_millis(200),
            primary_silence: Duration::from_millis(1000),
            good_replica_within: Duration::from_millis(1000),
            max_read_staleness: Duration::from_millis(1000),
            out_of_sync_after: Duration::from_secs(3),
            max_entries_per_append: 256,
            max_entries_in_flight: 4096,
        }
    }
}

/// A message between the copies of one partition, and between them and the metadata
/// leader during a failover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Primary → follower: entries (`first..=last`, none when `first > last`) and the
    /// commit point. The entries' data travel beside it, read from the primary's log.
    Append(Append),
    /// Follower → primary: the answer to an [`Append`].
    Ack(Ack),
    /// Leader → replica: promise to refuse everything below `term`, then answer with
    /// your position ([`Message::FenceAnswer`]).
    Fence {
        /// The term the new primary will have.
        term: Term,
        /// In a planned handover, once the old primary answered that it stepped down:
        /// its term. A replica's promise to that primary no longer binds (it serves and
        /// acknowledges nothing more), so the replica answers without waiting it out.
        released: Option<Term>,
    },
    /// Replica → leader: the answer to [`Message::Fence`].
    FenceAnswer(FenceAnswer),
}

/// Entries from the primary; see [`Message::Append`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Append {
    /// The sender's term.
    pub term: Term,
    /// The terms of the sender's log up to `log_end`.
    pub history: History,
    /// The first commit id the sender's log still holds (what trimming left).
    pub log_start: CommitId,
    /// The sender's last durable commit id.
    pub log_end: CommitId,
    /// The first entry carried.
    pub first: CommitId,
    /// The last entry carried (`first - 1` when none is).
    pub last: CommitId,
    /// The sender's commit point.
    pub commit: CommitId,
    /// Echoed by the answer, so the primary knows which promise it got.
    pub stamp: Stamp,
}

/// When a primary sent something, on its own monotonic clock, in one run of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// Which run of the primary's core sent it (a new run ignores older stamps).
    pub run: u64,
    /// Microseconds since that run started.
    pub at_us: u64,
}

/// A follower's answer to an [`Append`]; see [`Message::Ack`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// The term of the append answered.
    pub term: Term,
    /// What the follower holds.
    pub result: AckResult,
    /// The stamp of the append answered (`None` when the answer is to no append).
    pub stamp: Option<Stamp>,
}

/// What a follower tells its primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckResult {
    /// The follower's log holds the primary's entries up to `last`, durably.
    Holds {
        /// Its last durable commit id.
        last: CommitId,
    },
    /// The append started after `last + 1`: send again from `last + 1`.
    Gap {
        /// The last entry the follower holds or is writing.
        last: CommitId,
    },
    /// The follower is taking a full copy; it holds nothing the primary can count.
    Copying,
    /// The follower's copy is in place and its log reaches `last`, but it still lacks
    /// the end of the copy: send it what follows, and count it for nothing yet.
    Settling {
        /// The last entry its log holds.
        last: CommitId,
    },
    /// The follower promised a higher term: the sender is no longer primary.
    Refused {
        /// The term it promised.
        fenced: Term,
    },
}

/// A replica's answer to [`Message::Fence`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceAnswer {
    /// The highest term the replica has promised (the query's, unless it saw a higher one).
    pub term: Term,
    /// Where its durable log ends.
    pub position: Position,
    /// It is taking a full copy and holds no usable log.
    pub copying: bool,
    /// If the fence made it step down as primary: its term and its commit point then.
    /// No write past that entry was acknowledged, so a copy whose position reaches it
    /// holds every acknowledged write (what a planned handover needs).
    pub acknowledged: Option<Position>,
}
