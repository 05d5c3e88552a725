//! The term history of a partition's log: which primary term wrote each commit id.
//!
//! Commit ids of a partition are gapless (each write takes `last + 1`), so a log is
//! described by its last commit id and by the points where its writer changed: a list
//! of `(term, first commit id written in that term)`, both strictly increasing. Two
//! copies hold the same entries up to commit id `n` exactly when their histories agree
//! up to `n` ([`History::agrees_up_to`]); this is how a returning replica finds out
//! whether it holds an old primary's tail that the current primary never had.
//!
//! An entry is added only when a new primary writes its first entry, so a history
//! grows by one pair per failover and is never trimmed with the log: trimming it would
//! make two copies that hold the same entries look different.

use serde::{Deserialize, Serialize};

use super::{CommitId, Position, Term};

/// The terms of a log, oldest first. See the module header.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// `(term, first commit id of that term)`, both strictly increasing.
    starts: Vec<(Term, CommitId)>,
}

impl History {
    /// The history of a log whose entries up to `last` (if any) were all written in
    /// `term`: what a partition that existed before replication starts from.
    pub fn single(term: Term, first: CommitId) -> History {
        History {
            starts: vec![(term, first)],
        }
    }

    /// Rebuilds a history from its stored `(term, first id)` pairs; `None` when they do
    /// not both increase strictly.
    pub fn from_starts(starts: Vec<(Term, CommitId)>) -> Option<History> {
        let increasing = starts
            .windows(2)
            .all(|pair| pair[0].0 < pair[1].0 && pair[0].1 < pair[1].1);
        increasing.then_some(History { starts })
    }

    /// The stored form: `(term, first id)` pairs, oldest first.
    pub fn starts(&self) -> &[(Term, CommitId)] {
        &self.starts
    }

    /// The term that wrote commit id `id`, or `None` before the first recorded term (or
    /// for id 0, which names no entry).
    pub fn term_of(&self, id: CommitId) -> Option<Term> {
        if id == 0 {
            return None;
        }
        self.starts
            .iter()
            .rev()
            .find(|&&(_, first)| first <= id)
            .map(|&(term, _)| term)
    }

    /// The position of a log with this history that ends at `last`.
    pub fn position(&self, last: CommitId) -> Position {
        Position {
            term: self.term_of(last).unwrap_or(0),
            last,
        }
    }

    /// Records that `term` writes from commit id `first` on. Whatever this history says
    /// about ids from `first` on is replaced (a copy taking over the primary's history
    /// after a full copy, or a new primary's first entry). Does nothing when `term` is
    /// not newer than the last recorded term and `first` changes nothing.
    pub fn begin(&mut self, term: Term, first: CommitId) {
        if self.term_of(first) == Some(term) {
            return;
        }
        self.starts.retain(|&(t, f)| f < first && t < term);
        self.starts.push((term, first));
    }

    /// True when both histories name the same term for every commit id from 1 to `id`,
    /// so that two logs written by these histories hold the same entries up to `id`.
    pub fn agrees_up_to(&self, other: &History, id: CommitId) -> bool {
        let prefix = |history: &History| -> Vec<(Term, CommitId)> {
            history
                .starts
                .iter()
                .copied()
                .filter(|&(_, first)| first <= id)
                .collect()
        };
        prefix(self) == prefix(other)
    }

    /// The history of this log cut after `last`: the terms that wrote ids up to `last`.
    pub fn up_to(&self, last: CommitId) -> History {
        History {
            starts: self
                .starts
                .iter()
                .copied()
                .filter(|&(_, first)| first <= last)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(starts: &[(Term, CommitId)]) -> History {
        History::from_starts(starts.to_vec()).unwrap()
    }

    #[test]
    fn the_term_of_an_id_is_the_last_term_that_started_at_or_before_it() {
        let h = history(&[(1, 1), (4, 10), (6, 11)]);
        assert_eq!(h.term_of(0), None);
        assert_eq!(h.term_of(1), Some(1));
        assert_eq!(h.term_of(9), Some(1));
        assert_eq!(h.term_of(10), Some(4));
        assert_eq!(h.term_of(11), Some(6));
        assert_eq!(h.term_of(1000), Some(6));
        assert_eq!(h.position(9), Position { term: 1, last: 9 });
        assert_eq!(
            History::default().position(0),
            Position { term: 0, last: 0 }
        );
    }

    #[test]
    fn stored_starts_must_increase_in_both_fields() {
        assert!(History::from_starts(vec![(1, 1), (2, 5)]).is_some());
        assert!(History::from_starts(vec![(2, 1), (1, 5)]).is_none());
        assert!(History::from_starts(vec![(1, 5), (2, 5)]).is_none());
    }

    #[test]
    fn begin_replaces_what_the_history_said_from_that_id_on() {
        let mut h = history(&[(1, 1), (3, 8)]);
        h.begin(5, 6);
        assert_eq!(h.starts(), &[(1, 1), (5, 6)]);
        // The same term again changes nothing.
        h.begin(5, 9);
        assert_eq!(h.starts(), &[(1, 1), (5, 6)]);
        h.begin(7, 20);
        assert_eq!(h.starts(), &[(1, 1), (5, 6), (7, 20)]);
    }

    #[test]
    fn agreement_compares_only_the_ids_up_to_the_bound() {
        let old_primary = history(&[(1, 1), (3, 8)]);
        let new_primary = history(&[(1, 1), (4, 8)]);
        assert!(old_primary.agrees_up_to(&new_primary, 7));
        assert!(!old_primary.agrees_up_to(&new_primary, 8));
        let later = history(&[(1, 1), (3, 8), (4, 12)]);
        assert!(old_primary.agrees_up_to(&later, 11));
        assert!(!old_primary.agrees_up_to(&later, 12));
        assert_eq!(later.up_to(11), old_primary);
    }
}
