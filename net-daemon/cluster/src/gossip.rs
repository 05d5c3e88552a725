//! Gossip of host metrics: free space, CPU rating, load and round-trip
//! samples, carried by the heartbeats.
//!
//! Each host publishes its own metrics as a *rumor* with a sequence number and a
//! decay counter (TTL) of [`MAX_TTL`]. Heartbeats carry every live rumor both
//! ways; a host keeps the newest rumor of each origin, one step older than it
//! arrived. Every heartbeat round ages each rumor one more step, so a rumor that
//! its origin stops refreshing fades out after [`MAX_TTL`] rounds, and a rumor
//! at TTL 0 is no longer passed on. A host whose link to another is cut still
//! hears of it through the others. Pure: no clock, no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::HostId;

/// Steps (hops or rounds) a rumor lives.
pub(crate) const MAX_TTL: u8 = 8;
/// Most round-trip samples a rumor carries (the shortest ones).
pub(crate) const MAX_RTT_SAMPLES: usize = 8;

/// What a host reports of itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Free bytes on the data dir's filesystem.
    pub free_bytes: u64,
    /// Relative CPU speed: the sum of the cores' frequencies, in GHz × 1000.
    pub(crate) cpu_rating: u32,
    /// One-minute load average × 1000.
    pub load_milli: u32,
    /// Its round trips to some peers, in microseconds (the shortest first).
    pub(crate) rtt_us: Vec<(HostId, u64)>,
}

/// One host's metrics as they travel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rumor {
    pub(crate) origin: HostId,
    /// Raised by the origin at each publication; a higher one replaces a lower one.
    pub(crate) seq: u64,
    /// Steps left before the rumor fades.
    pub ttl: u8,
    pub metrics: Metrics,
}

/// The rumors one host knows.
#[derive(Clone, Debug, Default)]
pub(crate) struct Gossip {
    me: HostId,
    seq: u64,
    known: BTreeMap<HostId, Rumor>,
}

impl Gossip {
    pub(crate) fn new(me: HostId) -> Gossip {
        Gossip {
            me,
            seq: 0,
            known: BTreeMap::new(),
        }
    }

    /// Publishes this host's metrics as a fresh rumor; keeps the shortest round trips.
    pub(crate) fn publish(&mut self, mut metrics: Metrics) {
        metrics.rtt_us.sort_by_key(|&(peer, rtt)| (rtt, peer));
        metrics.rtt_us.truncate(MAX_RTT_SAMPLES);
        self.seq += 1;
        let rumor = Rumor {
            origin: self.me,
            seq: self.seq,
            ttl: MAX_TTL,
            metrics,
        };
        self.known.insert(self.me, rumor);
    }

    /// The rumors to send a peer: every one still alive.
    pub(crate) fn outgoing(&self) -> Vec<Rumor> {
        self.known
            .values()
            .filter(|rumor| rumor.ttl > 0)
            .cloned()
            .collect()
    }

    /// Takes what a peer sent: for each origin, a newer rumor replaces the one known,
    /// one step older. Rumors about this host, or with no life left, are ignored.
    pub(crate) fn merge(&mut self, rumors: Vec<Rumor>) {
        for mut rumor in rumors {
            if rumor.origin == self.me || rumor.ttl == 0 {
                continue;
            }
            rumor.ttl -= 1;
            rumor.metrics.rtt_us.truncate(MAX_RTT_SAMPLES);
            match self.known.get(&rumor.origin) {
                Some(known) if known.seq >= rumor.seq => {}
                _ => {
                    self.known.insert(rumor.origin, rumor);
                }
            }
        }
    }

    /// One heartbeat round passes: every other host's rumor ages a step; rumors at 0
    /// are forgotten.
    pub(crate) fn decay(&mut self) {
        let me = self.me;
        self.known.retain(|&origin, rumor| {
            if origin != me {
                rumor.ttl = rumor.ttl.saturating_sub(1);
            }
            rumor.ttl > 0
        });
    }

    /// The live rumor of `host`, if any.
    pub(crate) fn get(&self, host: HostId) -> Option<&Rumor> {
        self.known.get(&host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(free_bytes: u64) -> Metrics {
        Metrics {
            free_bytes,
            ..Metrics::default()
        }
    }

    #[test]
    fn newer_rumors_replace_older_ones_one_step_older() {
        let mut a = Gossip::new(1);
        let mut b = Gossip::new(2);
        a.publish(metrics(10));
        b.merge(a.outgoing());
        assert_eq!(
            b.get(1).map(|r| (r.ttl, r.metrics.free_bytes)),
            Some((MAX_TTL - 1, 10))
        );
        // An old rumor arriving late changes nothing.
        let old = a.outgoing();
        a.publish(metrics(20));
        b.merge(a.outgoing());
        b.merge(old);
        assert_eq!(b.get(1).map(|r| r.metrics.free_bytes), Some(20));
        // Nobody overwrites what a host says of itself.
        let mut forged = a.outgoing();
        forged[0].seq += 100;
        forged[0].metrics.free_bytes = 0;
        a.merge(forged);
        assert_eq!(a.get(1).map(|r| r.metrics.free_bytes), Some(20));
    }

    #[test]
    fn a_host_behind_a_cut_link_is_heard_of_through_others() {
        // 1 – 2 – 3 in a line: 1 and 3 never talk.
        let mut hosts: Vec<Gossip> = (1..=3).map(Gossip::new).collect();
        for round in 0..3 {
            for (i, host) in hosts.iter_mut().enumerate() {
                host.publish(metrics(round * 10 + i as u64));
            }
            for (from, to) in [(0, 1), (1, 0), (1, 2), (2, 1)] {
                let rumors = hosts[from].outgoing();
                hosts[to].merge(rumors);
            }
            hosts.iter_mut().for_each(Gossip::decay);
        }
        let heard = hosts[2].get(1).expect("host 3 hears of host 1");
        assert!(heard.metrics.free_bytes >= 10, "a recent rumor: {heard:?}");
        assert!(heard.ttl < MAX_TTL - 1, "two hops and some rounds old");
    }

    #[test]
    fn rumors_that_stop_being_refreshed_fade_out() {
        let mut a = Gossip::new(1);
        let mut b = Gossip::new(2);
        a.publish(metrics(1));
        b.merge(a.outgoing());
        for _ in 0..MAX_TTL {
            b.decay();
        }
        assert!(b.get(1).is_none());
        assert!(b.outgoing().is_empty());
    }

    #[test]
    fn only_the_shortest_round_trips_travel() {
        let mut a = Gossip::new(1);
        let rtt_us = (2..30).map(|peer| (peer, 1000 - peer)).collect();
        a.publish(Metrics {
            rtt_us,
            ..Metrics::default()
        });
        let sent = &a.outgoing()[0].metrics.rtt_us;
        assert_eq!(sent.len(), MAX_RTT_SAMPLES);
        assert_eq!(sent[0], (29, 971));
    }
}
