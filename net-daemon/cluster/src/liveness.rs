//! Failure detection: an unreliability score per peer, and the rule that
//! turns the suspicions of several hosts into an `inactive` state.
//!
//! Each host runs an [`Observer`]: the peer links report every request to a
//! peer that succeeded or timed out, and the observer keeps one [`Score`] per
//! peer. A timeout adds [`LivenessConfig::timeout_penalty`], a success
//! multiplies the score by [`LivenessConfig::success_decay`]. A peer becomes
//! suspect when its score reaches the threshold and healthy again when it
//! falls below half of it, so a peer near the threshold does not flap. A peer
//! suspect for [`LivenessConfig::suspect_for_ms`] is one this host proposes
//! as `inactive`.
//!
//! The metadata leader commits `inactive` only when enough observers agree
//! ([`decide_inactive`]): a majority of those that probe the peer and a majority
//! of the cluster's active hosts. So one bad link cannot evict a healthy host,
//! and hosts cut off from the rest of the cluster (even with the metadata
//! leader among them) cannot evict the hosts on the majority side. This module
//! decides; it never sends a heartbeat or reads a clock.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::HostId;

/// The tuning of the scores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct LivenessConfig {
    /// A peer whose score reaches this is suspect; it is healthy again below half of it.
    pub(crate) suspect_threshold: f64,
    /// Added to the score on each timeout.
    pub(crate) timeout_penalty: f64,
    /// The score is multiplied by this on each success (between 0 and 1).
    pub(crate) success_decay: f64,
    /// How long a peer stays suspect before this host proposes it as `inactive`.
    pub(crate) suspect_for_ms: u64,
}

impl Default for LivenessConfig {
    fn default() -> LivenessConfig {
        LivenessConfig {
            suspect_threshold: 8.0,
            timeout_penalty: 1.0,
            success_decay: 0.8,
            suspect_for_ms: 3_000,
        }
    }
}

/// How unreliable one peer has been, seen from this host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// 0 for a peer that always answers; capped at twice the threshold, so a
    /// peer that comes back recovers in a bounded number of successes.
    pub value: f64,
    /// Whether the peer is suspect now.
    pub suspect: bool,
    /// When `suspect` last changed (or the first observation).
    pub since_ms: u64,
    /// The last success, if any.
    pub last_success_ms: Option<u64>,
    /// The last timeout, if any.
    pub(crate) last_timeout_ms: Option<u64>,
    /// The round-trip time of the last success, in microseconds.
    pub(crate) last_rtt_us: Option<u64>,
}

impl Score {
    fn new(now_ms: u64) -> Score {
        Score {
            value: 0.0,
            suspect: false,
            since_ms: now_ms,
            last_success_ms: None,
            last_timeout_ms: None,
            last_rtt_us: None,
        }
    }

    /// Sets `value`, then `suspect` and `since_ms` if it crossed a threshold.
    fn set(&mut self, value: f64, now_ms: u64, config: &LivenessConfig) {
        let threshold = config.suspect_threshold;
        self.value = value.clamp(0.0, 2.0 * threshold);
        let suspect = if self.suspect {
            self.value >= threshold / 2.0
        } else {
            self.value >= threshold
        };
        if suspect != self.suspect {
            self.suspect = suspect;
            self.since_ms = now_ms;
        }
    }
}

/// The scores of every peer this host talks to.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Observer {
    config: LivenessConfig,
    scores: BTreeMap<HostId, Score>,
}

impl Observer {
    /// An observer that has seen nothing yet.
    pub(crate) fn new(config: LivenessConfig) -> Observer {
        Observer {
            config,
            scores: BTreeMap::new(),
        }
    }

    /// A request to `peer` succeeded after `rtt_us`.
    pub(crate) fn on_success(&mut self, peer: HostId, rtt_us: u64, now_ms: u64) {
        let score = self
            .scores
            .entry(peer)
            .or_insert_with(|| Score::new(now_ms));
        score.last_success_ms = Some(now_ms);
        score.last_rtt_us = Some(rtt_us);
        score.set(
            score.value * self.config.success_decay,
            now_ms,
            &self.config,
        );
    }

    /// A request to `peer` timed out.
    pub(crate) fn on_timeout(&mut self, peer: HostId, now_ms: u64) {
        let score = self
            .scores
            .entry(peer)
            .or_insert_with(|| Score::new(now_ms));
        score.last_timeout_ms = Some(now_ms);
        let value = score.value + self.config.timeout_penalty;
        score.set(value, now_ms, &self.config);
    }

    /// The peers suspect for at least `suspect_for_ms`: those this host
    /// proposes as `inactive`, in increasing order.
    pub(crate) fn suspects(&self, now_ms: u64) -> Vec<HostId> {
        self.scores
            .iter()
            .filter(|(_, score)| {
                score.suspect && now_ms.saturating_sub(score.since_ms) >= self.config.suspect_for_ms
            })
            .map(|(&peer, _)| peer)
            .collect()
    }

    /// The score of `peer`, if it was ever observed.
    pub(crate) fn score(&self, peer: HostId) -> Option<&Score> {
        self.scores.get(&peer)
    }

    /// Drops the score of a peer that left the cluster.
    #[expect(dead_code, reason = "no caller in the workspace")]
    pub(crate) fn forget(&mut self, peer: HostId) {
        self.scores.remove(&peer);
    }
}

/// What the leader knows about one peer from the observers' proposals.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Suspicion {
    /// The hosts that propose the peer as `inactive`.
    pub(crate) suspected_by: BTreeSet<HostId>,
    /// How many hosts have a link to the peer (and so can observe it).
    pub(crate) observers: usize,
}

/// How many observers must suspect a peer before it is made `inactive`: a
/// majority of those with a link to it, a majority of the `cluster_hosts`
/// (the hosts not inactive, the peer included), and at least 2 in a cluster of
/// 3 or more hosts.
///
/// The majority of the cluster matters when the leader hears only some of the
/// observers: a minority of hosts cut off from the others, with the leader and a
/// majority of the metadata voters among them, all suspect every host of the
/// majority side; they must not evict it. A host that a majority of the cluster
/// can reach is suspected by a minority at most, so it is never evicted. A
/// cluster of 2 hosts evicts nobody: it cannot tell a dead peer from a cut link
/// (and its metadata group has no majority without both hosts anyway).
pub(crate) fn votes_needed(observers: usize, cluster_hosts: usize) -> usize {
    let majority = (observers / 2 + 1).max(cluster_hosts / 2 + 1);
    if cluster_hosts >= 3 {
        majority.max(2)
    } else {
        majority
    }
}

/// The leader's rule: the peers to commit as `inactive`, in increasing order.
/// A peer's suspicion of itself does not count.
pub(crate) fn decide_inactive(
    reports: &BTreeMap<HostId, Suspicion>,
    cluster_hosts: usize,
) -> Vec<HostId> {
    reports
        .iter()
        .filter(|(peer, suspicion)| {
            let votes = suspicion
                .suspected_by
                .iter()
                .filter(|&observer| observer != *peer)
                .count();
            votes >= votes_needed(suspicion.observers, cluster_hosts)
        })
        .map(|(&peer, _)| peer)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestRng;

    const SECOND_MS: u64 = 1000;

    /// The reports of `observers` about `peer`, from each observer's `suspects`.
    fn reports(
        peer: HostId,
        observers: &BTreeMap<HostId, Observer>,
        now_ms: u64,
    ) -> BTreeMap<HostId, Suspicion> {
        let suspected_by = observers
            .iter()
            .filter(|(_, observer)| observer.suspects(now_ms).contains(&peer))
            .map(|(&host, _)| host)
            .collect();
        let suspicion = Suspicion {
            suspected_by,
            observers: observers.len(),
        };
        BTreeMap::from([(peer, suspicion)])
    }

    #[test]
    fn timeouts_make_a_peer_suspect_and_successes_clear_it() {
        let mut observer = Observer::default();
        for second in 0..8 {
            assert!(!observer.score(5).is_some_and(|s| s.suspect));
            observer.on_timeout(5, second * SECOND_MS);
        }
        let score = observer.score(5).unwrap();
        assert!(score.suspect);
        assert_eq!(score.since_ms, 7 * SECOND_MS);
        assert_eq!(score.last_timeout_ms, Some(7 * SECOND_MS));
        // Proposed only once it has been suspect long enough.
        assert!(observer.suspects(8 * SECOND_MS).is_empty());
        assert_eq!(observer.suspects(10 * SECOND_MS), vec![5]);

        // 8 → 6.4 → 5.12 → 4.1: still suspect (hysteresis); → 3.3: healthy.
        for second in 11..14 {
            observer.on_success(5, 300, second * SECOND_MS);
            assert!(observer.score(5).unwrap().suspect);
        }
        observer.on_success(5, 300, 14 * SECOND_MS);
        let score = observer.score(5).unwrap();
        assert!(!score.suspect);
        assert_eq!(score.since_ms, 14 * SECOND_MS);
        assert_eq!(score.last_rtt_us, Some(300));
        assert!(observer.suspects(20 * SECOND_MS).is_empty());
    }

    #[test]
    fn a_long_outage_is_forgotten_in_a_bounded_number_of_successes() {
        let mut observer = Observer::default();
        for second in 0..3600 {
            observer.on_timeout(2, second * SECOND_MS);
        }
        assert_eq!(observer.score(2).unwrap().value, 16.0);
        for second in 3600..3610 {
            observer.on_success(2, 100, second * SECOND_MS);
        }
        assert!(!observer.score(2).unwrap().suspect);
    }

    #[test]
    fn one_flaky_link_evicts_nobody() {
        // Hosts 1..=4; host 1's link to host 4 drops everything.
        for cluster_hosts in [3, 4] {
            let mut observers: BTreeMap<HostId, Observer> = (1..cluster_hosts as HostId)
                .map(|host| (host, Observer::default()))
                .collect();
            let peer = cluster_hosts as HostId;
            for second in 0..60 {
                for (&host, observer) in observers.iter_mut() {
                    if host == 1 {
                        observer.on_timeout(peer, second * SECOND_MS);
                    } else {
                        observer.on_success(peer, 500, second * SECOND_MS);
                    }
                }
            }
            let reports = reports(peer, &observers, 60 * SECOND_MS);
            assert_eq!(reports[&peer].suspected_by, BTreeSet::from([1]));
            assert!(decide_inactive(&reports, cluster_hosts).is_empty());
        }
    }

    #[test]
    fn a_dead_host_is_evicted_once_the_observers_agree() {
        let mut observers: BTreeMap<HostId, Observer> =
            (1..=4).map(|host| (host, Observer::default())).collect();
        // Host 5 is dead; observer h notices at second 3h, is suspect 8
        // timeouts later and proposes it 3 s after that: at 13, 16, 19, 22 s.
        let mut first_commit = None;
        for second in 0..30 {
            for (&host, observer) in observers.iter_mut() {
                if second >= host * 3 {
                    observer.on_timeout(5, second * SECOND_MS);
                }
            }
            let committed = decide_inactive(&reports(5, &observers, second * SECOND_MS), 5);
            if first_commit.is_none() && committed == vec![5] {
                first_commit = Some(second);
            }
        }
        // 3 of the 4 observers must agree.
        assert_eq!(first_commit, Some(19));
    }

    #[test]
    fn the_agreement_rule() {
        assert_eq!(votes_needed(1, 2), 2);
        assert_eq!(votes_needed(2, 3), 2);
        assert_eq!(votes_needed(1, 3), 2);
        assert_eq!(votes_needed(4, 5), 3);
        assert_eq!(votes_needed(5, 6), 4);
        assert_eq!(votes_needed(3, 50), 26);
        assert_eq!(votes_needed(49, 50), 26);
        // Its own suspicion of itself does not count.
        let reports = BTreeMap::from([(
            3,
            Suspicion {
                suspected_by: BTreeSet::from([2, 3]),
                observers: 2,
            },
        )]);
        assert!(decide_inactive(&reports, 3).is_empty());
    }

    #[test]
    fn a_cut_off_minority_evicts_nobody_and_the_majority_evicts_it() {
        // Hosts 1..=10; hosts 1..=3 (the metadata leader among them) are cut off from
        // 4..=10. The leader hears only its own side: every host there suspects every
        // host of the other side.
        let minority: BTreeSet<HostId> = (1..=3).collect();
        let majority: BTreeSet<HostId> = (4..=10).collect();
        let reports_of = |observers: &BTreeSet<HostId>, peers: &BTreeSet<HostId>| {
            peers
                .iter()
                .map(|&peer| {
                    let suspicion = Suspicion {
                        suspected_by: observers.clone(),
                        observers: observers.len(),
                    };
                    (peer, suspicion)
                })
                .collect::<BTreeMap<HostId, Suspicion>>()
        };
        assert!(decide_inactive(&reports_of(&minority, &majority), 10).is_empty());
        // A leader on the majority side evicts the minority.
        assert_eq!(
            decide_inactive(&reports_of(&majority, &minority), 10),
            vec![1, 2, 3]
        );
        // Among 6 active hosts, 3 that suspect the other 3 are not a majority.
        let three: BTreeSet<HostId> = (4..=6).collect();
        assert!(decide_inactive(&reports_of(&three, &(7..=10).collect()), 6).is_empty());
    }

    #[test]
    fn ten_percent_timeouts_stay_well_under_the_threshold() {
        let mut rng = TestRng::new(0x5eed_1234);
        let mut observer = Observer::default();
        let (mut sum, mut max) = (0.0, 0.0f64);
        let samples = 200_000;
        for sample in 0..samples {
            if rng.below(10) == 0 {
                observer.on_timeout(9, sample);
            } else {
                observer.on_success(9, 200, sample);
            }
            let score = observer.score(9).unwrap();
            assert!(!score.suspect, "sample {sample}: {score:?}");
            sum += score.value;
            max = max.max(score.value);
        }
        let mean = sum / samples as f64;
        assert!(mean < 1.0, "mean {mean}");
        assert!(max < 7.0, "max {max}");
    }
}
