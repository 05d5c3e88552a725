//! Vivaldi network coordinates: each host's place in latency space.
//!
//! It owns the coordinate arithmetic, following the Vivaldi algorithm (Dabek
//! et al., 2004) as HashiCorp Serf applies it: a point in 8 dimensions plus a
//! height (the host's own access latency), an adjustment term, and an error
//! estimate that weighs each update. Every measured round trip to a peer moves
//! the local coordinate a little toward agreement with it; a weak gravity pulls
//! everything toward the origin so that the cluster does not drift. The
//! distance between two coordinates estimates their round-trip time, which
//! placement uses to spread replicas across distant hosts.
//!
//! Differences from Serf: the adjustment is an exponential moving average
//! instead of a window of samples (so the coordinate is all the state); where
//! Serf picks a random direction for two coinciding coordinates, the direction
//! here is derived from the sample (the code stays pure and reproducible).
//! Like Serf, an update that would produce a non-finite value resets the
//! coordinate to the origin. Filtering noisy
//! samples (Serf's median of three) is left to the caller. Units are seconds.

use serde::{Deserialize, Serialize};

/// Dimensions of the coordinate space.
pub(crate) const DIMENSIONS: usize = 8;
/// Round trips above this are ignored as bogus.
pub(crate) const MAX_RTT_S: f64 = 10.0;
/// Distances below this count as zero.
const ZERO_S: f64 = 1.0e-6;

/// The tuning of the coordinates (Serf's defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct VivaldiConfig {
    /// The highest error estimate, and that of a new coordinate.
    pub(crate) error_max: f64,
    /// How much one sample can change the error estimate (Vivaldi's c_e).
    pub(crate) error_gain: f64,
    /// How much one sample can move the coordinate (Vivaldi's c_c).
    pub(crate) position_gain: f64,
    /// The number of samples the adjustment averages over.
    pub(crate) adjustment_samples: f64,
    /// The lowest height.
    pub(crate) height_min_s: f64,
    /// The distance at which gravity pulls as hard as one second of error.
    pub(crate) gravity_rho_s: f64,
}

impl Default for VivaldiConfig {
    fn default() -> VivaldiConfig {
        VivaldiConfig {
            error_max: 1.5,
            error_gain: 0.25,
            position_gain: 0.25,
            adjustment_samples: 20.0,
            height_min_s: 10.0e-6,
            gravity_rho_s: 150.0,
        }
    }
}

/// A host's network coordinate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Coordinate {
    /// The point in the Euclidean part of the space.
    pub position_s: [f64; DIMENSIONS],
    /// The latency between the host and the core of the network.
    pub height_s: f64,
    /// A correction added to every distance from this host.
    pub adjustment_s: f64,
    /// How unsure the coordinate is (0 = sure, up to `error_max`).
    pub error: f64,
}

impl Default for Coordinate {
    /// The origin, as unsure as a coordinate can be.
    fn default() -> Coordinate {
        let config = VivaldiConfig::default();
        Coordinate {
            position_s: [0.0; DIMENSIONS],
            height_s: config.height_min_s,
            adjustment_s: 0.0,
            error: config.error_max,
        }
    }
}

impl Coordinate {
    /// The estimated round-trip time to `other`, in seconds.
    pub(crate) fn distance_s(&self, other: &Coordinate) -> f64 {
        let raw = self.raw_distance_s(other);
        let adjusted = raw + self.adjustment_s + other.adjustment_s;
        if adjusted > 0.0 {
            adjusted
        } else {
            raw
        }
    }

    /// True when every component is finite (and so usable).
    pub(crate) fn is_valid(&self) -> bool {
        self.position_s.iter().all(|x| x.is_finite())
            && self.height_s.is_finite()
            && self.adjustment_s.is_finite()
            && self.error.is_finite()
    }

    /// Moves this coordinate after a round trip of `rtt_s` to the host at
    /// `other`. A round trip that is not in `(0, MAX_RTT_S]` or an invalid
    /// `other` is ignored; an update that would yield a non-finite value
    /// resets the coordinate to the origin instead. Returns whether the sample
    /// was applied.
    pub(crate) fn update(
        &mut self,
        other: &Coordinate,
        rtt_s: f64,
        config: &VivaldiConfig,
    ) -> bool {
        // Written so that a NaN round trip fails the test.
        let usable = rtt_s > 0.0 && rtt_s <= MAX_RTT_S && other.is_valid();
        if !usable {
            return false;
        }
        let mut next = self.clone();

        // Vivaldi: weigh the sample by how sure each side is, move along the error.
        let distance = next.distance_s(other);
        let relative_error = (distance - rtt_s).abs() / rtt_s;
        let weight = next.error / (next.error + other.error).max(ZERO_S);
        let error_step = config.error_gain * weight;
        next.error =
            (error_step * relative_error + next.error * (1.0 - error_step)).min(config.error_max);
        let force = config.position_gain * weight * (rtt_s - distance);
        next.apply_force(force, other, config, rtt_s.to_bits());

        // The adjustment tracks half the average error left after the move.
        let residual = rtt_s - next.raw_distance_s(other);
        next.adjustment_s += (residual / 2.0 - next.adjustment_s) / config.adjustment_samples;

        // Gravity toward the origin keeps the whole cluster from drifting.
        let origin = Coordinate {
            height_s: config.height_min_s,
            ..Coordinate::default()
        };
        // Capped at the distance: a far-off coordinate is pulled to the origin, not past it.
        let from_origin_s = next.distance_s(&origin);
        let pull_s = (from_origin_s / config.gravity_rho_s)
            .powi(2)
            .min(from_origin_s);
        next.apply_force(-pull_s, &origin, config, rtt_s.to_bits().rotate_left(32));

        if !next.is_valid() {
            // As in Serf: start over rather than keep a broken coordinate.
            *self = Coordinate {
                height_s: config.height_min_s,
                error: config.error_max,
                ..Coordinate::default()
            };
            return false;
        }
        *self = next;
        true
    }

    /// The distance without adjustments.
    fn raw_distance_s(&self, other: &Coordinate) -> f64 {
        let squares: f64 = (0..DIMENSIONS)
            .map(|i| (self.position_s[i] - other.position_s[i]).powi(2))
            .sum();
        squares.sqrt() + self.height_s + other.height_s
    }

    /// Pushes this coordinate away from `other` by `force` seconds (toward it
    /// if negative); `seed` picks the direction when the two coincide.
    fn apply_force(&mut self, force: f64, other: &Coordinate, config: &VivaldiConfig, seed: u64) {
        let mut direction = [0.0; DIMENSIONS];
        for (i, d) in direction.iter_mut().enumerate() {
            *d = self.position_s[i] - other.position_s[i];
        }
        let mut magnitude = norm(&direction);
        if magnitude > ZERO_S {
            direction.iter_mut().for_each(|d| *d /= magnitude);
        } else {
            direction = pseudo_random_unit(seed);
            magnitude = 0.0;
        }
        for (x, d) in self.position_s.iter_mut().zip(direction) {
            *x += d * force;
        }
        if magnitude > ZERO_S {
            let height = self.height_s + (self.height_s + other.height_s) * force / magnitude;
            self.height_s = height.max(config.height_min_s);
        }
    }
}

fn norm(vector: &[f64; DIMENSIONS]) -> f64 {
    vector.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// A unit vector whose direction depends on `seed` only (splitmix64).
fn pseudo_random_unit(mut seed: u64) -> [f64; DIMENSIONS] {
    let mut vector = [0.0; DIMENSIONS];
    for x in vector.iter_mut() {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        *x = (z >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
    }
    let magnitude = norm(&vector);
    if magnitude > ZERO_S {
        vector.iter_mut().for_each(|x| *x /= magnitude);
    } else {
        vector = [0.0; DIMENSIONS];
        vector[0] = 1.0;
    }
    vector
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestRng;

    /// Runs `rounds` rounds in which every host measures a random peer
    /// (true RTT ± 5% noise) and returns the share of pairs whose estimate is
    /// within 20% of the true RTT.
    fn converge(truth_s: &[Vec<f64>], rounds: usize, seed: u64) -> f64 {
        let config = VivaldiConfig::default();
        let hosts = truth_s.len();
        let mut coordinates = vec![Coordinate::default(); hosts];
        let mut rng = TestRng::new(seed);
        for _ in 0..rounds {
            for host in 0..hosts {
                let peer = (host + 1 + rng.below(hosts as u64 - 1) as usize) % hosts;
                let noise = 1.0 + (rng.unit() - 0.5) * 0.1;
                let other = coordinates[peer].clone();
                coordinates[host].update(&other, truth_s[host][peer] * noise, &config);
            }
        }
        let (mut good, mut pairs) = (0, 0);
        for a in 0..hosts {
            for b in a + 1..hosts {
                assert!(coordinates[a].is_valid());
                let estimate = coordinates[a].distance_s(&coordinates[b]);
                let truth = truth_s[a][b];
                pairs += 1;
                if (estimate - truth).abs() <= 0.2 * truth {
                    good += 1;
                }
            }
        }
        good as f64 / pairs as f64
    }

    fn truth_s(points: &[(f64, f64)]) -> Vec<Vec<f64>> {
        points
            .iter()
            .map(|a| {
                points
                    .iter()
                    .map(|b| ((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)).sqrt())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_grid_converges_to_its_true_distances() {
        // 5 × 5 hosts, 10 ms apart.
        let points: Vec<(f64, f64)> = (0..25)
            .map(|i| ((i % 5) as f64 * 0.01, (i / 5) as f64 * 0.01))
            .collect();
        let share = converge(&truth_s(&points), 300, 42);
        assert!(share >= 0.9, "{share}");
    }

    #[test]
    fn a_line_converges_to_its_true_distances() {
        let points: Vec<(f64, f64)> = (0..10).map(|i| (i as f64 * 0.02, 0.0)).collect();
        let share = converge(&truth_s(&points), 300, 7);
        assert!(share >= 0.9, "{share}");
    }

    #[test]
    fn bad_round_trips_are_ignored() {
        let config = VivaldiConfig::default();
        let mut coordinate = Coordinate::default();
        let other = Coordinate::default();
        for rtt_s in [0.0, -0.01, f64::NAN, f64::INFINITY, MAX_RTT_S * 2.0] {
            assert!(!coordinate.update(&other, rtt_s, &config), "{rtt_s}");
        }
        assert_eq!(coordinate, Coordinate::default());

        let mut broken = Coordinate::default();
        broken.position_s[3] = f64::NAN;
        assert!(!coordinate.update(&broken, 0.01, &config));
        assert_eq!(coordinate, Coordinate::default());
    }

    #[test]
    fn coinciding_hosts_separate_and_stay_finite() {
        let config = VivaldiConfig::default();
        let mut a = Coordinate::default();
        let mut b = Coordinate::default();
        for i in 0..200 {
            let rtt_s = 0.05 + i as f64 * 1e-6;
            let seen_b = b.clone();
            assert!(a.update(&seen_b, rtt_s, &config));
            let seen_a = a.clone();
            assert!(b.update(&seen_a, rtt_s * 1.01, &config));
        }
        assert!(a.is_valid() && b.is_valid());
        let distance = a.distance_s(&b);
        assert!((distance - 0.05).abs() < 0.01, "{distance}");
    }

    #[test]
    fn extreme_values_never_produce_nan() {
        let config = VivaldiConfig::default();
        let mut rng = TestRng::new(99);
        let mut coordinate = Coordinate::default();
        for _ in 0..10_000 {
            let mut other = Coordinate::default();
            for x in other.position_s.iter_mut() {
                *x = (rng.unit() - 0.5) * 1e6;
            }
            other.error = rng.unit() * 1e-9;
            let rtt_s = rng.unit() * MAX_RTT_S;
            coordinate.update(&other, rtt_s, &config);
            assert!(coordinate.is_valid(), "{coordinate:?}");
            assert!(coordinate.distance_s(&other).is_finite());
        }
    }

    #[test]
    fn it_round_trips_through_serde() {
        let mut coordinate = Coordinate::default();
        coordinate.update(&Coordinate::default(), 0.02, &VivaldiConfig::default());
        assert_eq!(crate::round_trip(&coordinate), coordinate);
    }
}
