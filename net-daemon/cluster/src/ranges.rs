//! The id ranges of the hosts of a cluster, as the NI records them.
//!
//! It owns the rules that keep `ID.NEW` unique across hosts: which ranges of
//! the id space `[FIRST_ID, END_ID)` each host owns, and each range's
//! high-water mark. Ids below a mark may have been issued; ids at or above it
//! never were. A host takes ids from a range upward, and records the new mark
//! here (`IdSpace::reserve`) before it issues any of them. The metadata
//! consensus applies these operations to the NI; this module never talks to a
//! peer or a worker.
//!
//! - The first host of a cluster owns the whole space (`IdSpace::new`).
//! - A joining host gets the upper half of the unused part of its sponsor's
//!   largest unused range (`IdSpace::sponsor_split`).
//! - A host offline for good loses everything above its marks to the free pool
//!   (`IdSpace::reclaim_unused`); the pool hands out whole ranges
//!   (`IdSpace::grant_free`). The part below a mark stays recorded under its
//!   host, so it is never handed out again.
//!
//! Every range of every host and of the pool is disjoint from the others, and
//! together they tile the id space ([`IdSpace::check_disjoint`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::HostId;
use shoal_shared::ids::{BLOCK, END_ID, FIRST_ID};

/// The fewest unused ids a sponsor must have in one range to split it: each
/// half then holds at least one worker block.
pub(crate) const MIN_SPLIT_IDS: u64 = 2 * BLOCK;

const _: () = assert!(FIRST_ID < END_ID && MIN_SPLIT_IDS <= END_ID - FIRST_ID);

/// The ids `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdRange {
    /// The first id.
    pub start: u64,
    /// One past the last id.
    pub end: u64,
}

impl IdRange {
    /// The number of ids (0 if `end <= start`).
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// True when the range holds no id.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A range a host owns, with its high-water mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedRange {
    /// The ids the host owns.
    pub range: IdRange,
    /// Ids below this may have been issued; `range.start <= high_water <= range.end`.
    pub high_water: u64,
}

impl OwnedRange {
    /// The ids not issued yet: `[high_water, end)`.
    pub(crate) fn unused(&self) -> IdRange {
        IdRange {
            start: self.high_water,
            end: self.range.end,
        }
    }
}

/// Why an operation on the id ranges was refused, or what the checker found.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RangeError {
    /// The host has no entry in the id space.
    #[error("host {0} owns no id ranges")]
    UnknownHost(HostId),
    /// A joining host was named as its own sponsor.
    #[error("host {0} cannot sponsor itself")]
    SelfSponsor(HostId),
    /// The sponsor has no unused range of at least `MIN_SPLIT_IDS` ids.
    #[error("host {host} has no unused range to split (largest has {largest_unused} ids, {MIN_SPLIT_IDS} needed)")]
    NothingToSplit {
        /// The sponsor.
        host: HostId,
        /// Ids in its largest unused range.
        largest_unused: u64,
    },
    /// None of the host's ranges has `count` unused ids left.
    #[error("host {host} has no unused range with room for {count} ids")]
    Exhausted {
        /// The host reserving.
        host: HostId,
        /// The ids asked for.
        count: u64,
    },
    /// No range is left in the free pool.
    #[error("the free pool of ids is empty")]
    NoFreeRange,
    /// A range is empty or reaches outside the id space.
    #[error("range {0:?} is empty or outside the id space")]
    Malformed(IdRange),
    /// A range's high-water mark is below its start or past its end.
    #[error("host {host}: high-water mark {high_water} outside its range {range:?}")]
    MarkOutsideRange {
        /// The range's owner.
        host: HostId,
        /// The range.
        range: IdRange,
        /// Its high-water mark.
        high_water: u64,
    },
    /// Two ranges (owned or free) share ids.
    #[error("ranges {0:?} and {1:?} overlap")]
    Overlap(IdRange, IdRange),
    /// The ranges and the free pool do not cover the whole id space.
    #[error("the ranges cover {covered} ids, not the whole id space")]
    NotTiling {
        /// How many ids they cover.
        covered: u64,
    },
}

/// The id ranges of every host and the free pool: the NI's view of the id space.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IdSpace {
    /// Per host, its ranges ordered by start.
    hosts: BTreeMap<HostId, Vec<OwnedRange>>,
    /// Reclaimed ranges that no host owns, ordered by start, adjacent ones merged.
    free: Vec<IdRange>,
}

impl IdSpace {
    /// The id space of a new cluster: its first host owns all of it.
    pub(crate) fn new(first_host: HostId) -> IdSpace {
        let mut space = IdSpace {
            hosts: BTreeMap::new(),
            free: Vec::new(),
        };
        space.give(
            first_host,
            IdRange {
                start: FIRST_ID,
                end: END_ID,
            },
        );
        space
    }

    /// The ranges of `host`, ordered by start (None if it never owned any).
    pub(crate) fn host_ranges(&self, host: HostId) -> Option<&[OwnedRange]> {
        self.hosts.get(&host).map(Vec::as_slice)
    }

    /// The free pool, ordered by start.
    #[cfg(test)]
    pub(crate) fn free(&self) -> &[IdRange] {
        &self.free
    }

    /// The host whose largest unused range is the largest of all, if it can be
    /// split: the sponsor to use when the chosen one has nothing left. Ties go
    /// to the lowest host id.
    pub(crate) fn best_sponsor(&self) -> Option<HostId> {
        let mut best: Option<(HostId, u64)> = None;
        for (&host, ranges) in &self.hosts {
            let unused = largest_unused(ranges).map_or(0, |i| ranges[i].unused().len());
            if unused >= MIN_SPLIT_IDS && best.is_none_or(|(_, most)| unused > most) {
                best = Some((host, unused));
            }
        }
        best.map(|(host, _)| host)
    }

    /// Gives `joiner` the upper half of the unused part of `sponsor`'s range
    /// with the most unused ids; the sponsor keeps the lower part. Returns the
    /// joiner's new range. `joiner` may already own (used-up) ranges.
    pub(crate) fn sponsor_split(
        &mut self,
        sponsor: HostId,
        joiner: HostId,
    ) -> Result<IdRange, RangeError> {
        if sponsor == joiner {
            return Err(RangeError::SelfSponsor(sponsor));
        }
        let ranges = self
            .hosts
            .get_mut(&sponsor)
            .ok_or(RangeError::UnknownHost(sponsor))?;
        let index = largest_unused(ranges);
        let most_unused = index.map_or(0, |i| ranges[i].unused().len());
        let Some(index) = index.filter(|_| most_unused >= MIN_SPLIT_IDS) else {
            return Err(RangeError::NothingToSplit {
                host: sponsor,
                largest_unused: most_unused,
            });
        };
        let owned = &mut ranges[index];
        let split = owned.high_water + most_unused / 2;
        let given = IdRange {
            start: split,
            end: owned.range.end,
        };
        owned.range.end = split;
        self.give(joiner, given);
        Ok(given)
    }

    /// Advances a mark of `host` past `count` more ids, in its first range with
    /// room for them, and returns those ids. The host records this in the NI
    /// before it issues any of them.
    pub(crate) fn reserve(&mut self, host: HostId, count: u64) -> Result<IdRange, RangeError> {
        let ranges = self
            .hosts
            .get_mut(&host)
            .ok_or(RangeError::UnknownHost(host))?;
        let owned = ranges
            .iter_mut()
            .find(|owned| owned.unused().len() >= count)
            .ok_or(RangeError::Exhausted { host, count })?;
        let reserved = IdRange {
            start: owned.high_water,
            end: owned.high_water + count,
        };
        owned.high_water = reserved.end;
        Ok(reserved)
    }

    /// Moves the unused part of every range of `host` (everything at or above
    /// its marks) to the free pool, for a host offline past the threshold.
    /// The host keeps the used parts, so their ids are never handed out
    /// again. Returns how many ids went to the pool; reclaiming twice is harmless.
    pub(crate) fn reclaim_unused(&mut self, host: HostId) -> Result<u64, RangeError> {
        let ranges = self
            .hosts
            .get_mut(&host)
            .ok_or(RangeError::UnknownHost(host))?;
        let mut reclaimed = 0;
        for owned in ranges.iter_mut() {
            let unused = owned.unused();
            if !unused.is_empty() {
                reclaimed += unused.len();
                self.free.push(unused);
                owned.range.end = owned.high_water;
            }
        }
        ranges.retain(|owned| !owned.range.is_empty());
        self.free.sort();
        self.free.dedup_by(|next, previous| {
            let adjacent = previous.end == next.start;
            if adjacent {
                previous.end = next.end;
            }
            adjacent
        });
        Ok(reclaimed)
    }

    /// Gives `host` the largest range of the free pool, whole (ties go to the
    /// lowest). The leader uses it for a joining host instead of a sponsor
    /// split, or for a host whose ranges are nearly used up.
    pub(crate) fn grant_free(&mut self, host: HostId) -> Result<IdRange, RangeError> {
        let mut best: Option<usize> = None;
        for (index, range) in self.free.iter().enumerate() {
            if best.is_none_or(|b| range.len() > self.free[b].len()) {
                best = Some(index);
            }
        }
        let range = self.free.remove(best.ok_or(RangeError::NoFreeRange)?);
        self.give(host, range);
        Ok(range)
    }

    /// Checks the invariants: every range is non-empty and inside the id
    /// space, every mark lies within its range, no two ranges (of any hosts or
    /// the pool) overlap, and together they tile the id space.
    pub fn check_disjoint(&self) -> Result<(), RangeError> {
        let mut all = self.free.clone();
        for (&host, ranges) in &self.hosts {
            for owned in ranges {
                let range = owned.range;
                if owned.high_water < range.start || owned.high_water > range.end {
                    let high_water = owned.high_water;
                    return Err(RangeError::MarkOutsideRange {
                        host,
                        range,
                        high_water,
                    });
                }
                all.push(range);
            }
        }
        all.sort();
        for range in &all {
            if range.is_empty() || range.start < FIRST_ID || range.end > END_ID {
                return Err(RangeError::Malformed(*range));
            }
        }
        for pair in all.windows(2) {
            if pair[0].end > pair[1].start {
                return Err(RangeError::Overlap(pair[0], pair[1]));
            }
        }
        let covered = all.iter().map(IdRange::len).sum();
        if covered != END_ID - FIRST_ID {
            return Err(RangeError::NotTiling { covered });
        }
        Ok(())
    }

    /// Adds `range` to `host`'s ranges, unused.
    fn give(&mut self, host: HostId, range: IdRange) {
        let ranges = self.hosts.entry(host).or_default();
        ranges.push(OwnedRange {
            range,
            high_water: range.start,
        });
        ranges.sort_by_key(|owned| owned.range.start);
    }
}

/// The index of the range with the most unused ids (the first on ties).
fn largest_unused(ranges: &[OwnedRange]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (index, owned) in ranges.iter().enumerate() {
        if best.is_none_or(|b| owned.unused().len() > ranges[b].unused().len()) {
            best = Some(index);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WHOLE: IdRange = IdRange {
        start: FIRST_ID,
        end: END_ID,
    };

    #[test]
    fn first_host_owns_the_whole_space() {
        let space = IdSpace::new(7);
        let expected = OwnedRange {
            range: WHOLE,
            high_water: FIRST_ID,
        };
        assert_eq!(space.host_ranges(7), Some(&[expected][..]));
        assert!(space.free().is_empty());
        assert_eq!(space.check_disjoint(), Ok(()));
    }

    #[test]
    fn a_joiner_gets_the_upper_half_of_the_unused_part() {
        let mut space = IdSpace::new(1);
        let used = space.reserve(1, 1000).unwrap();
        assert_eq!(
            used,
            IdRange {
                start: 1,
                end: 1001
            }
        );
        let given = space.sponsor_split(1, 2).unwrap();
        let split = 1001 + (END_ID - 1001) / 2;
        assert_eq!(
            given,
            IdRange {
                start: split,
                end: END_ID
            }
        );
        assert_eq!(space.host_ranges(1).unwrap()[0].range.end, split);
        assert_eq!(space.host_ranges(1).unwrap()[0].high_water, 1001);
        assert_eq!(space.host_ranges(2).unwrap()[0].high_water, split);
        assert_eq!(space.check_disjoint(), Ok(()));
    }

    #[test]
    fn repeated_joins_subdivide_the_largest_unused_range() {
        let mut space = IdSpace::new(1);
        let second = space.sponsor_split(1, 2).unwrap();
        let third = space.sponsor_split(1, 3).unwrap();
        assert_eq!(third.end, second.start);
        assert_eq!(third.start, FIRST_ID + (second.start - FIRST_ID) / 2);
        let fourth = space.sponsor_split(3, 4).unwrap();
        assert_eq!(fourth.end, third.end);
        assert_eq!(space.check_disjoint(), Ok(()));
    }

    #[test]
    fn a_used_up_sponsor_is_refused_and_another_is_suggested() {
        let mut space = IdSpace::new(1);
        space.sponsor_split(1, 2).unwrap();
        let owned = space.host_ranges(1).unwrap()[0].range.len();
        space.reserve(1, owned - MIN_SPLIT_IDS + 1).unwrap();
        assert_eq!(
            space.sponsor_split(1, 3),
            Err(RangeError::NothingToSplit {
                host: 1,
                largest_unused: MIN_SPLIT_IDS - 1
            })
        );
        assert_eq!(space.best_sponsor(), Some(2));
        assert!(space.sponsor_split(2, 3).is_ok());
        assert_eq!(space.sponsor_split(2, 2), Err(RangeError::SelfSponsor(2)));
        assert_eq!(space.sponsor_split(9, 3), Err(RangeError::UnknownHost(9)));
    }

    #[test]
    fn reserve_takes_ids_upward_and_refuses_past_the_end() {
        let mut space = IdSpace::new(1);
        let given = space.sponsor_split(1, 2).unwrap();
        let first = space.reserve(2, BLOCK).unwrap();
        let second = space.reserve(2, BLOCK).unwrap();
        assert_eq!(first.start, given.start);
        assert_eq!(second.start, first.end);
        assert_eq!(
            space.reserve(2, given.len()),
            Err(RangeError::Exhausted {
                host: 2,
                count: given.len()
            })
        );
    }

    #[test]
    fn reclaim_frees_only_what_is_above_the_marks() {
        let mut space = IdSpace::new(1);
        let given = space.sponsor_split(1, 2).unwrap();
        let used = space.reserve(2, 5 * BLOCK).unwrap();
        assert_eq!(space.reclaim_unused(2), Ok(given.len() - used.len()));
        let kept = OwnedRange {
            range: used,
            high_water: used.end,
        };
        assert_eq!(space.host_ranges(2), Some(&[kept][..]));
        assert_eq!(
            space.free(),
            &[IdRange {
                start: used.end,
                end: given.end
            }]
        );
        assert_eq!(space.reclaim_unused(2), Ok(0));
        assert_eq!(space.check_disjoint(), Ok(()));

        // The pool goes out whole; the issued ids stay with host 2.
        assert_eq!(
            space.grant_free(3),
            Ok(IdRange {
                start: used.end,
                end: given.end
            })
        );
        assert_eq!(space.grant_free(3), Err(RangeError::NoFreeRange));
        assert_eq!(space.reserve(3, 1).unwrap().start, used.end);
        assert_eq!(space.check_disjoint(), Ok(()));
    }

    #[test]
    fn adjacent_free_ranges_merge() {
        let mut space = IdSpace::new(1);
        let given = space.sponsor_split(1, 2).unwrap();
        space.reserve(1, 10).unwrap();
        space.reclaim_unused(2).unwrap();
        space.reclaim_unused(1).unwrap();
        assert_eq!(
            space.free(),
            &[IdRange {
                start: 11,
                end: given.end
            }]
        );
        assert_eq!(space.host_ranges(2), Some(&[][..]));
        assert_eq!(space.check_disjoint(), Ok(()));
    }

    #[test]
    fn the_checker_finds_broken_tables() {
        let mut overlapping = IdSpace::new(1);
        overlapping.free.push(IdRange { start: 5, end: 9 });
        assert!(matches!(
            overlapping.check_disjoint(),
            Err(RangeError::Overlap(..))
        ));

        let mut lost = IdSpace::new(1);
        lost.sponsor_split(1, 2).unwrap();
        lost.hosts.remove(&2);
        assert!(matches!(
            lost.check_disjoint(),
            Err(RangeError::NotTiling { .. })
        ));

        let mut bad_mark = IdSpace::new(1);
        bad_mark.hosts.get_mut(&1).unwrap()[0].high_water = 0;
        assert!(matches!(
            bad_mark.check_disjoint(),
            Err(RangeError::MarkOutsideRange { .. })
        ));

        let mut empty = IdSpace::new(1);
        empty.free.push(IdRange { start: 3, end: 3 });
        assert_eq!(
            empty.check_disjoint(),
            Err(RangeError::Malformed(IdRange { start: 3, end: 3 }))
        );
    }

    #[test]
    fn it_round_trips_through_serde() {
        let mut space = IdSpace::new(1);
        space.sponsor_split(1, 2).unwrap();
        space.reserve(2, 3).unwrap();
        assert_eq!(crate::round_trip(&space), space);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Join { sponsor: usize },
        Reserve { host: usize, count: u64 },
        Reclaim { host: usize },
        Grant { host: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            any::<usize>().prop_map(|sponsor| Op::Join { sponsor }),
            (any::<usize>(), 0u32..63, 0u64..1000).prop_map(|(host, power, extra)| {
                Op::Reserve {
                    host,
                    count: (1u64 << power) + extra,
                }
            }),
            any::<usize>().prop_map(|host| Op::Reclaim { host }),
            any::<usize>().prop_map(|host| Op::Grant { host }),
        ]
    }

    fn overlap(a: IdRange, b: IdRange) -> bool {
        a.start < b.end && b.start < a.end
    }

    proptest! {
        #[test]
        fn ranges_stay_disjoint_and_issued_ids_are_never_handed_out_again(
            ops in proptest::collection::vec(op(), 1..80)
        ) {
            let mut space = IdSpace::new(0);
            let mut hosts: Vec<HostId> = vec![0];
            let mut issued: Vec<IdRange> = Vec::new();
            for op in ops {
                match op {
                    Op::Join { sponsor } => {
                        let joiner = hosts.len() as HostId;
                        let sponsor = hosts[sponsor % hosts.len()];
                        let result = space.sponsor_split(sponsor, joiner).or_else(|_| {
                            match space.best_sponsor() {
                                Some(other) => space.sponsor_split(other, joiner),
                                None => space.grant_free(joiner),
                            }
                        });
                        if result.is_ok() {
                            hosts.push(joiner);
                        }
                    }
                    Op::Reserve { host, count } => {
                        if let Ok(block) = space.reserve(hosts[host % hosts.len()], count) {
                            prop_assert_eq!(block.len(), count);
                            prop_assert!(!issued.iter().any(|&old| overlap(old, block)));
                            issued.push(block);
                        }
                    }
                    Op::Reclaim { host } => {
                        space.reclaim_unused(hosts[host % hosts.len()]).unwrap();
                    }
                    Op::Grant { host } => {
                        let _ = space.grant_free(hosts[host % hosts.len()]);
                    }
                }
                prop_assert_eq!(space.check_disjoint(), Ok(()));
                // What can still be issued never meets what was issued.
                let unused = space.hosts.values().flatten().map(OwnedRange::unused);
                for open in unused.chain(space.free.iter().copied()) {
                    prop_assert!(!issued.iter().any(|&old| overlap(old, open)));
                }
            }
        }
    }
}
