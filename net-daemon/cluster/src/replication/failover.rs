//! The metadata leader's choice of a new primary for one partition.
//!
//! [`Failover`] owns one round: fence the replicas at the new term, collect their
//! positions, and name the copy that holds every acknowledged write. It talks to no
//! one itself: the leader's shell sends the [`Message::Fence`] queries, feeds the
//! answers back, and proposes the NI change the round ends with. Same three doors as
//! the other cores: [`Failover::handle`], [`Failover::poll_actions`],
//! [`Failover::next_deadline`]. It must never open a socket or read a clock.
//!
//! **Why the choice is safe.** A write is acknowledged once `c = min(min_replicas_to_write,
//! n)` copies hold it, counting only the primary and the followers in sync in the NI
//! (the set `S`; a follower still catching up counts for nothing). The round fences
//! every copy but counts only answers from `S`, and waits for `|S| - c + 1` of them, so
//! at least one answer comes from a copy that holds any acknowledged write (an answer
//! from a copy taking a full copy does not count: it cleared its records, and may have
//! held an acknowledged write before; a copy loses a write no other way); it picks
//! the highest position among them, and only a copy of `S` may lead. Every answering
//! copy has durably promised the new term, so the old primary can gather no more
//! acknowledgements: `|S| - c + 1` of `S` refuse it, which leaves it fewer than `c`.
//! Each copy answers only after its promise to the old primary ran out, so the old
//! primary's lease has ended before the new one is named.
//!
//! **A planned handover** ([`Failover::preferring`]) moves the primary to a chosen copy
//! while the old one is alive, to spread the primaries. The old primary answers with the
//! last entry it may have acknowledged (`FenceAnswer::acknowledged`): having promised
//! the new term, it acknowledges nothing more. A chosen copy whose position reaches that
//! entry holds every acknowledged write, so it is named even if others hold more (those
//! entries were never acknowledged). If the chosen copy falls short, or the old primary
//! or the chosen copy has not answered by the third query, the round chooses as a
//! failover does. Once the old primary has answered so, the round asks the others again
//! with a release: their promises protected its lease, and it gave the lease up by
//! stepping down, so they answer without waiting them out and the handover pauses
//! its partition for a few round trips instead of a lease.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::HostId;

use super::{FenceAnswer, Message, Position, Term};

/// The queries are sent again this often until enough replicas answered.
pub const ASK_AGAIN_AFTER: Duration = Duration::from_millis(500);
/// A planned handover waits for the old primary and the chosen copy this many queries.
const PREFERENCE_ASKS: u32 = 3;

/// Something that happened to the round.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A replica's answer to the query.
    Answer {
        /// The replica.
        from: HostId,
        /// Its answer.
        answer: FenceAnswer,
    },
    /// The time in [`Failover::next_deadline`] has come (or any other wake-up).
    Tick,
}

/// What the round needs done.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send the query to a replica.
    Send {
        /// The replica.
        to: HostId,
        /// A [`Message::Fence`].
        message: Message,
    },
    /// Propose that `primary` leads the partition from `term` on (an NI change that
    /// applies only at the epoch the round started from). The round is over.
    Promote {
        /// The copy chosen.
        primary: HostId,
        /// The new term.
        term: Term,
    },
    /// The round cannot finish (a higher term exists, or no answering copy may lead);
    /// the leader starts another later. The round is over.
    GiveUp {
        /// Why, for the log.
        reason: String,
    },
}

/// One failover round of one partition. See the module header.
#[derive(Debug)]
pub struct Failover {
    term: Term,
    members: Vec<HostId>,
    /// The members in sync in the NI: the only answers that count, and candidates.
    in_sync: Vec<HostId>,
    /// Answers needed from `in_sync`: `|in_sync| - c + 1` (see the module header).
    needed: usize,
    /// Hosts that may become primary (active ones).
    eligible: Vec<HostId>,
    answers: BTreeMap<HostId, FenceAnswer>,
    /// The copy a planned handover wants to lead, until the round gives up on it.
    preferred: Option<HostId>,
    /// Queries sent so far.
    asks: u32,
    /// The old primary's term, once it answered a planned handover having stepped down.
    released: Option<Term>,
    asked_at: Option<Instant>,
    over: bool,
    actions: Vec<Action>,
}

impl Failover {
    /// Starts a round that will name the primary of `term` among `members` (every host
    /// holding a copy, the old primary first), of which `in_sync` are in sync in the NI,
    /// choosing only among `eligible` hosts.
    pub fn new(
        term: Term,
        members: Vec<HostId>,
        in_sync: Vec<HostId>,
        eligible: Vec<HostId>,
        min_replicas_to_write: usize,
        now: Instant,
    ) -> Failover {
        let copies = min_replicas_to_write.clamp(1, members.len().max(1));
        let needed = (in_sync.len() + 1).saturating_sub(copies).max(1);
        let mut failover = Failover {
            term,
            needed,
            in_sync,
            members,
            eligible,
            answers: BTreeMap::new(),
            preferred: None,
            asks: 0,
            released: None,
            asked_at: None,
            over: false,
            actions: Vec::new(),
        };
        failover.ask(now);
        failover
    }

    /// Makes the round a planned handover to `host` (see the module header). `host` must
    /// be a member in sync; the old primary is the first member.
    pub fn preferring(mut self, host: HostId) -> Failover {
        self.preferred = Some(host);
        self
    }

    /// Everything there is to do now, in order.
    pub fn poll_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// When to feed [`Event::Tick`]; `None` once the round is over.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.over {
            return None;
        }
        self.asked_at.map(|at| at + ASK_AGAIN_AFTER)
    }

    /// The round has ended (with a promotion or by giving up).
    pub fn is_over(&self) -> bool {
        self.over
    }

    /// Takes in what happened at `now`.
    pub fn handle(&mut self, event: Event, now: Instant) {
        if self.over {
            return;
        }
        match event {
            Event::Answer { from, answer } => {
                if !self.members.contains(&from) {
                    return;
                }
                if answer.term > self.term {
                    return self.give_up(format!(
                        "replica {from} promised term {}, above this round's {}",
                        answer.term, self.term
                    ));
                }
                if answer.term == self.term {
                    let releases = self.releases(from, &answer);
                    self.answers.insert(from, answer);
                    self.decide();
                    if let Some(old_term) = releases.filter(|_| !self.over) {
                        // The others need not wait out their promises to it.
                        self.ask_released(old_term);
                    }
                }
            }
            Event::Tick => {
                if self.asked_at.is_some_and(|at| now >= at + ASK_AGAIN_AFTER) {
                    if self.asks >= PREFERENCE_ASKS && self.preferred.take().is_some() {
                        self.decide();
                        if self.over {
                            return;
                        }
                    }
                    self.ask(now);
                }
            }
        }
    }

    fn ask(&mut self, now: Instant) {
        self.asked_at = Some(now);
        self.asks += 1;
        let released = self.released;
        self.send_fences(released);
    }

    /// In a planned handover, the term of the old primary if `answer` is its first
    /// answer saying it stepped down: it acknowledges and serves nothing more.
    fn releases(&self, from: HostId, answer: &FenceAnswer) -> Option<Term> {
        let old = *self.members.first()?;
        (self.preferred.is_some() && from == old && self.released.is_none())
            .then_some(answer.acknowledged?)
            .map(|position| position.term)
    }

    /// Asks the copies that have not answered again, releasing them from their promises
    /// to the primary of `old_term`, from now on.
    fn ask_released(&mut self, old_term: Term) {
        self.released = Some(old_term);
        self.send_fences(Some(old_term));
    }

    fn send_fences(&mut self, released: Option<Term>) {
        for &host in &self.members {
            if !self.answers.contains_key(&host) {
                let message = Message::Fence {
                    term: self.term,
                    released,
                };
                self.actions.push(Action::Send { to: host, message });
            }
        }
    }

    fn decide(&mut self) {
        if let Some(preferred) = self.preferred {
            match self.handover_ready(preferred) {
                Some(true) => {
                    self.over = true;
                    self.actions.push(Action::Promote {
                        primary: preferred,
                        term: self.term,
                    });
                    return;
                }
                // Both answered and the chosen copy falls short: choose as a failover.
                Some(false) => self.preferred = None,
                None => return,
            }
        }
        let answered = self
            .answers
            .keys()
            .filter(|host| self.in_sync.contains(host))
            .count();
        // A copy taking a full copy has cleared its records: it may have held an
        // acknowledged write and lost it since, so it cannot vouch for any.
        let counted: Vec<(&HostId, &FenceAnswer)> = self
            .answers
            .iter()
            .filter(|(host, answer)| self.in_sync.contains(host) && !answer.copying)
            .collect();
        if counted.len() < self.needed {
            if answered == self.in_sync.len() {
                self.give_up("too few copies with a usable log answered".into());
            }
            return;
        }
        let best = counted
            .iter()
            .copied()
            .filter(|(host, _)| self.eligible.contains(host))
            .max_by_key(|(host, answer)| {
                // The highest position; among equals, the first in the list.
                let rank = self
                    .members
                    .iter()
                    .position(|m| m == *host)
                    .unwrap_or(usize::MAX);
                (answer.position, std::cmp::Reverse(rank))
            })
            .map(|(&host, answer)| (host, answer.position));
        let highest = counted.iter().map(|(_, answer)| answer.position).max();
        match best {
            // A copy that may not lead holds more than any that may: naming one of the
            // others could lose acknowledged writes.
            Some((host, position)) if Some(position) == highest => {
                self.over = true;
                self.actions.push(Action::Promote {
                    primary: host,
                    term: self.term,
                });
            }
            Some(_) | None if answered < self.in_sync.len() => {
                // More answers may bring an eligible copy that is as far.
            }
            _ => self.give_up("no answering copy that may lead holds the highest position".into()),
        }
    }

    /// Whether the preferred copy may lead now: `None` until it and the old primary
    /// have answered.
    fn handover_ready(&self, preferred: HostId) -> Option<bool> {
        let old = self.answers.get(self.members.first()?)?;
        let chosen = self.answers.get(&preferred)?;
        let reaches = |acknowledged: Position| chosen.position >= acknowledged;
        Some(
            self.in_sync.contains(&preferred)
                && self.eligible.contains(&preferred)
                && !chosen.copying
                && old.acknowledged.is_some_and(reaches),
        )
    }

    fn give_up(&mut self, reason: String) {
        self.over = true;
        self.actions.push(Action::GiveUp { reason });
    }
}
