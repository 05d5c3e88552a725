//! The cluster layer between real hosts: each test starts `shoal serve` hosts on
//! loopback addresses of their own (127.0.T.x, see `common::cluster`), observes
//! them through CLUSTER NODES / CLUSTER INFO / SHOAL.HOSTS, and kills, moves or
//! disturbs them: joining through one seed, concurrent joins, ids across hosts,
//! failure detection after kill -9, no false failures on a lossy, slow link, a
//! cut link and an isolated host, metadata leader fail-over, the cluster secret,
//! a host moving to a new address, and the reclaim of an offline host's ids.
//!
//! Each test prints what it measured; on a failure the cluster's state and every
//! host's log are printed.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, HostEntry, IdRange, Impairment};
use common::{describe, env_count, long_tests};
use redis::Value;

/// `ID.NEW count` on `con`: `count` positive ids.
fn new_ids(con: &mut redis::Connection, count: usize) -> Vec<u64> {
    let ids: Vec<u64> = match common::call_str(con, &["ID.NEW", &count.to_string()]) {
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Int(id) if id > 0 => id as u64,
                other => panic!("ID.NEW returned {other:?}, not a positive id"),
            })
            .collect(),
        other => panic!("ID.NEW {count} answered {other:?}"),
    };
    assert_eq!(ids.len(), count, "ID.NEW {count} returns {count} ids");
    ids
}

/// Every id range of every host in `entries`, checked to be non-empty and pairwise
/// disjoint; returns them as (host id, range), ordered by start.
fn disjoint_ranges(entries: &[HostEntry]) -> Result<Vec<(u64, IdRange)>, String> {
    let mut ranges: Vec<(u64, IdRange)> = entries
        .iter()
        .flat_map(|entry| entry.id_ranges.iter().map(|r| (entry.id, *r)))
        .collect();
    ranges.sort_by_key(|(_, range)| range.start);
    for (host, range) in &ranges {
        if range.start >= range.end
            || range.high_water < range.start
            || range.high_water > range.end
        {
            return Err(format!("host {host} has a malformed range {range:?}"));
        }
    }
    for pair in ranges.windows(2) {
        let ((a, first), (b, second)) = (pair[0], pair[1]);
        if first.end > second.start {
            return Err(format!(
                "host {a}'s range {first:?} overlaps host {b}'s range {second:?}"
            ));
        }
    }
    Ok(ranges)
}

/// The host with id `id` in a SHOAL.HOSTS reply.
fn entry(entries: &[HostEntry], id: u64) -> Result<&HostEntry, String> {
    entries
        .iter()
        .find(|e| e.id == id)
        .ok_or_else(|| format!("host id {id} is not in SHOAL.HOSTS"))
}

#[test]
fn five_hosts_given_one_seed_agree_within_10_s() {
    let launched = Instant::now();
    let cluster = Cluster::launch(5, "");
    let agreed = cluster.wait_agreed_on(5, Duration::from_secs(30));
    let since_joiners = cluster.joiners_spawned.elapsed();
    eprintln!(
        "5 hosts agree {since_joiners:?} after hosts 2-5 were spawned ({:?} after host 1 was)",
        launched.elapsed()
    );
    assert!(
        since_joiners <= Duration::from_secs(10),
        "5 hosts took {since_joiners:?} to agree, more than 10 s",
    );
    let ids: HashSet<u64> = agreed.iter().map(|a| a.host_id).collect();
    assert_eq!(ids.len(), 5, "5 distinct host ids: {agreed:?}");
    let mut cluster_ids = HashSet::new();
    for i in 1..=5 {
        let lines = cluster.nodes(i);
        assert_eq!(lines.len(), 5, "host {i} lists 5 hosts: {lines:?}");
        for line in &lines {
            assert!(
                !line.failed() && !line.suspected() && line.connected,
                "host {i} flags a host: {line:?}"
            );
        }
        let info = cluster.info(i);
        assert_eq!(info["cluster_state"], "ok", "host {i}: {info:?}");
        assert_eq!(info["shoal_phase"], "member", "host {i}: {info:?}");
        assert_eq!(info["cluster_known_nodes"], "5", "host {i}: {info:?}");
        cluster_ids.insert(info["shoal_cluster_id"].clone());
    }
    assert_eq!(cluster_ids.len(), 1, "one cluster id: {cluster_ids:?}");
}

#[test]
fn two_hosts_joining_at_once_get_distinct_ids_and_disjoint_ranges() {
    let mut cluster = Cluster::start(1, "");
    let seed = [cluster.host(1).peer_addr()];
    let mut joiners = [
        cluster.configure_host(&seed, ""),
        cluster.configure_host(&seed, ""),
    ];
    let spawned = Instant::now();
    for host in &mut joiners {
        host.server.spawn();
    }
    for host in &mut joiners {
        host.server.wait_ready();
    }
    cluster.hosts.extend(joiners);
    cluster.wait_agreed_on(3, Duration::from_secs(30));
    eprintln!(
        "2 concurrent joiners accepted and agreed {:?} after their spawn",
        spawned.elapsed()
    );
    let ids: Vec<u64> = (1..=3).map(|i| cluster.host_id(i)).collect();
    let distinct: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), 3, "distinct host ids: {ids:?}");
    // Every host sees the same ranges, one at least per host, pairwise disjoint.
    let (views, _) = cluster.wait_for(
        "every host to see the same id ranges",
        Duration::from_secs(10),
        |c| {
            let views: Vec<Vec<(u64, IdRange)>> = (1..=3)
                .map(|i| disjoint_ranges(&c.try_hosts(i)?))
                .collect::<Result<_, _>>()?;
            if views.iter().any(|v| v != &views[0]) {
                return Err(format!("the hosts' views of the ranges differ: {views:?}"));
            }
            Ok(views)
        },
    );
    for id in &ids {
        assert!(
            views[0].iter().any(|(host, _)| host == id),
            "host id {id} owns an id range: {:?}",
            views[0]
        );
    }
    eprintln!("id ranges: {:?}", views[0]);
}

#[test]
fn a_million_ids_from_five_hosts_at_once_are_distinct() {
    const CALLS_PER_HOST: usize = 200;
    const IDS_PER_CALL: usize = 1000;
    let cluster = Cluster::start(5, "");
    let started = Instant::now();
    let per_host: Vec<(usize, Vec<u64>)> = std::thread::scope(|scope| {
        let threads: Vec<_> = (1..=5)
            .map(|i| {
                let mut con = cluster.host(i).server.conn();
                scope.spawn(move || {
                    let mut ids = Vec::with_capacity(CALLS_PER_HOST * IDS_PER_CALL);
                    for _ in 0..CALLS_PER_HOST {
                        ids.extend(new_ids(&mut con, IDS_PER_CALL));
                    }
                    (i, ids)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("id thread"))
            .collect()
    });
    eprintln!(
        "{} ids taken from 5 hosts in {:?}",
        CALLS_PER_HOST * IDS_PER_CALL * 5,
        started.elapsed()
    );
    let mut issuer: HashMap<u64, usize> = HashMap::with_capacity(5 * CALLS_PER_HOST * IDS_PER_CALL);
    for (host, ids) in &per_host {
        for &id in ids {
            if let Some(other) = issuer.insert(id, *host) {
                panic!(
                    "id {id} was issued twice, by host {other} and by host {host}: \
                     the hosts do not issue from disjoint id ranges"
                );
            }
        }
    }
    assert_eq!(issuer.len(), 5 * CALLS_PER_HOST * IDS_PER_CALL);
    // Each host issued from its own ranges, below their high-water marks.
    let host_ids: Vec<u64> = (1..=5).map(|i| cluster.host_id(i)).collect();
    cluster.wait_for(
        "every issued id to lie below a high-water mark of its host's ranges",
        Duration::from_secs(10),
        |c| {
            let entries = c.try_hosts(1)?;
            disjoint_ranges(&entries)?;
            for (host, ids) in &per_host {
                let ranges = &entry(&entries, host_ids[host - 1])?.id_ranges;
                for &id in ids {
                    if !ranges.iter().any(|r| r.start <= id && id < r.high_water) {
                        return Err(format!(
                            "host {host} issued id {id}, outside the used part of its ranges {ranges:?}"
                        ));
                    }
                }
            }
            Ok(())
        },
    );
}

#[test]
fn a_host_killed_with_sigkill_is_inactive_everywhere_within_15_s() {
    let mut cluster = Cluster::start(5, "");
    // Every host a voter, so that losing one still leaves a majority to mark it.
    let (leader, _) = cluster.wait_voters(5, Duration::from_secs(30));
    for i in 1..=5 {
        cluster.host_id(i);
    }
    // A host that is not the metadata leader, so that no election adds to the time.
    let victim = [3, 4, 5, 2]
        .into_iter()
        .find(|&i| cluster.host_id(i) != leader)
        .expect("a host that is not the leader");
    let victim_id = cluster.host_id(victim);
    cluster.kill(victim);
    let (_, took) = cluster.wait_for(
        "the killed host to be inactive on every survivor",
        Duration::from_secs(40),
        |c| {
            for i in c.live() {
                let line = c
                    .try_nodes(i)?
                    .into_iter()
                    .find(|l| l.host_id == victim_id)
                    .ok_or_else(|| format!("host {i} does not list host id {victim_id}"))?;
                if !line.failed() {
                    return Err(format!("host {i} shows {line:?}"));
                }
                let state = entry(&c.try_hosts(i)?, victim_id)?.state.clone();
                if state != "inactive" {
                    return Err(format!("host {i} has it {state}"));
                }
            }
            Ok(())
        },
    );
    eprintln!(
        "host {victim} (id {victim_id}) killed with SIGKILL: inactive on every survivor after {took:?}"
    );
    assert!(
        took <= Duration::from_secs(15),
        "marking a killed host inactive took {took:?}, more than 15 s"
    );
    for i in cluster.live() {
        for line in cluster.nodes(i) {
            if line.host_id == victim_id {
                assert!(
                    !line.connected,
                    "host {i} shows the dead host connected: {line:?}"
                );
            } else {
                assert!(
                    !line.failed(),
                    "host {i} marks a live host failed: {line:?}"
                );
            }
        }
    }
}

#[test]
fn loss_and_delay_on_one_host_make_no_host_inactive() {
    let seconds = env_count(
        "SHOAL_CLUSTER_LOSS_SECS",
        if long_tests() { 600 } else { 120 },
    );
    let impairment = Impairment {
        loss: 0.10,
        delay: Duration::from_millis(50),
        jitter: Duration::from_millis(20),
    };
    let cluster = Cluster::start(5, "");
    let (leader, _) = cluster.wait_leader(Duration::from_secs(10));
    let impaired = 3;
    let impaired_id = cluster.host_id(impaired);
    eprintln!("metadata leader: host id {leader}; impairing host {impaired} (id {impaired_id})");
    let fault = cluster.impair_host(impaired, impairment);
    let started = Instant::now();
    let mut polls = 0;
    let mut max_score: f64 = 0.0;
    let mut max_rtt_us: i64 = -1;
    let mut suspected_by = HashSet::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        let round = Instant::now();
        for i in cluster.live() {
            let entries = cluster.try_hosts(i).unwrap_or_else(|e| {
                panic!(
                    "polling host {i} after {:?} of {impairment}: {e}",
                    started.elapsed()
                )
            });
            assert_eq!(entries.len(), 5, "host {i} lists 5 hosts: {entries:?}");
            for e in &entries {
                assert_eq!(
                    e.state,
                    "write",
                    "after {:?} of {impairment} on host {impaired}, host {i} has host id {} {}: {e:?}",
                    started.elapsed(),
                    e.id,
                    e.state,
                );
                if e.id == impaired_id && i != impaired {
                    max_score = max_score.max(e.score);
                    max_rtt_us = max_rtt_us.max(e.rtt_us);
                    if e.suspect {
                        suspected_by.insert(i);
                    }
                }
            }
        }
        polls += 1;
        std::thread::sleep(Duration::from_secs(1).saturating_sub(round.elapsed()));
    }
    let counters = fault.counters();
    let delayed = fault.delayed_packets();
    fault.heal();
    let total = counters.dropped + counters.passed;
    let loss = counters.dropped as f64 / total.max(1) as f64;
    eprintln!(
        "{seconds} s of {impairment} on host {impaired}: {polls} polls of 5 hosts, none inactive; \
         {} of {total} packets dropped ({:.1}%), {delayed} delayed; the others' highest score \
         of it {max_score:.2}, highest round trip {:.1} ms, suspected (locally) by hosts {suspected_by:?}",
        counters.dropped,
        loss * 100.0,
        max_rtt_us as f64 / 1000.0
    );
    // The fault acted: packets were lost and delayed, and the round trips show it.
    assert!(total > 500, "the fault saw only {total} packets");
    assert!(
        (0.05..=0.15).contains(&loss),
        "{:.1}% of the packets were dropped, not about 10%",
        loss * 100.0
    );
    assert!(delayed > 0, "no packet was delayed");
    assert!(
        max_rtt_us >= 60_000,
        "the round trip to host {impaired} never reached 60 ms ({max_rtt_us} us): the delay did not act"
    );
    cluster.wait_agreed(Duration::from_secs(20));
}

#[test]
fn one_cut_link_makes_no_host_inactive_and_an_isolated_host_is_and_comes_back() {
    let cluster = Cluster::start(4, "");
    let (leader, _) = cluster.wait_leader(Duration::from_secs(10));
    let others: Vec<usize> = (1..=4).filter(|&i| cluster.host_id(i) != leader).collect();
    let (a, b) = (others[0], others[1]);
    let (a_id, b_id) = (cluster.host_id(a), cluster.host_id(b));

    // One cut link: both ends suspect each other, nobody is made inactive.
    let cut = cluster.cut_link(a, b);
    let started = Instant::now();
    let mut suspected_at = None;
    while started.elapsed() < Duration::from_secs(40) {
        for i in cluster.live() {
            for e in cluster.hosts_of(i) {
                assert_eq!(
                    e.state,
                    "write",
                    "after {:?} with the link {a}-{b} cut, host {i} has host id {} {}",
                    started.elapsed(),
                    e.id,
                    e.state,
                );
            }
        }
        let a_suspects_b = entry(&cluster.hosts_of(a), b_id).unwrap().suspect;
        let b_suspects_a = entry(&cluster.hosts_of(b), a_id).unwrap().suspect;
        if a_suspects_b && b_suspects_a && suspected_at.is_none() {
            suspected_at = Some(started.elapsed());
        }
        // Watch on for 8 s after both ends suspect each other: long enough for their
        // reports to reach the leader.
        if suspected_at.is_some_and(|at| started.elapsed() >= at + Duration::from_secs(8)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let counters = cut.counters();
    cut.heal();
    let suspected_at = suspected_at.unwrap_or_else(|| {
        panic!(
            "hosts {a} and {b} did not suspect each other within 40 s of their link being cut \
             ({counters:?})",
        )
    });
    eprintln!(
        "link {a}-{b} cut: both ends suspect each other after {suspected_at:?}, no host inactive \
         after {:?}; {} packets dropped",
        started.elapsed(),
        counters.dropped
    );
    let (_, took) = cluster.wait_for(
        "the cut link's ends to trust each other again",
        Duration::from_secs(30),
        |c| {
            let a_suspects_b = entry(&c.try_hosts(a)?, b_id)?.suspect;
            let b_suspects_a = entry(&c.try_hosts(b)?, a_id)?.suspect;
            match a_suspects_b || b_suspects_a {
                true => Err("still suspect".into()),
                false => Ok(()),
            }
        },
    );
    eprintln!("link {a}-{b} healed: no suspicion left after {took:?}");

    // Host b cut off from every other host: it is made inactive, and writable again
    // once its links are back.
    let isolation = cluster.isolate(b);
    let (_, took) = cluster.wait_for(
        "the isolated host to be inactive on the others",
        Duration::from_secs(40),
        |c| {
            for i in c.live().into_iter().filter(|&i| i != b) {
                let state = entry(&c.try_hosts(i)?, b_id)?.state.clone();
                if state != "inactive" {
                    return Err(format!("host {i} has host {b} {state}"));
                }
            }
            Ok(())
        },
    );
    eprintln!("host {b} isolated: inactive on the others after {took:?}");
    isolation.heal();
    let (_, took) = cluster.wait_for(
        "the host back from isolation to be writable everywhere",
        Duration::from_secs(40),
        |c| {
            let agreed = c.try_agreed()?;
            match agreed.iter().find(|a| a.failed) {
                Some(failed) => Err(format!("still failed: {failed:?}")),
                None => Ok(()),
            }
        },
    );
    for i in cluster.live() {
        assert_eq!(entry(&cluster.hosts_of(i), b_id).unwrap().state, "write");
    }
    eprintln!("host {b} back from isolation: writable on every host after {took:?}");
}

#[test]
fn a_paused_host_is_made_inactive_and_is_writable_again_once_it_resumes() {
    let mut cluster = Cluster::start(4, "");
    let (leader, _) = cluster.wait_leader(Duration::from_secs(10));
    let paused = [3, 4, 2]
        .into_iter()
        .find(|&i| cluster.host_id(i) != leader)
        .expect("a host that is not the leader");
    let paused_id = cluster.host_id(paused);
    // SIGSTOP: its connections stay open, but nothing answers on them.
    cluster.pause(paused);
    let (_, took) = cluster.wait_for(
        "the paused host to be inactive on the others",
        Duration::from_secs(40),
        |c| {
            for i in c.live() {
                let state = entry(&c.try_hosts(i)?, paused_id)?.state.clone();
                if state != "inactive" {
                    return Err(format!("host {i} has host {paused} {state}"));
                }
            }
            Ok(())
        },
    );
    eprintln!("host {paused} paused with SIGSTOP: inactive on the others after {took:?}");
    cluster.resume(paused);
    let (_, took) = cluster.wait_for(
        "the resumed host to be writable on every host",
        Duration::from_secs(40),
        |c| {
            for i in c.live() {
                for e in c.try_hosts(i)? {
                    if e.state != "write" {
                        return Err(format!("host {i} has host id {} {}", e.id, e.state));
                    }
                }
            }
            match c.try_agreed()?.len() {
                4 => Ok(()),
                n => Err(format!("{n} hosts listed")),
            }
        },
    );
    eprintln!("host {paused} resumed with SIGCONT: writable on every host after {took:?}");
}

#[test]
fn killing_the_metadata_leader_elects_another_within_10_s_and_joins_still_work() {
    let mut cluster = Cluster::start(5, "");
    for i in 1..=5 {
        cluster.host_id(i);
    }
    // Wait for the full set of voters, so that losing one leaves a majority.
    let (leader, took) = cluster.wait_voters(5, Duration::from_secs(30));
    let old = cluster
        .number_of(leader)
        .expect("the leader is one of the hosts");
    eprintln!("5 voters after {took:?}; the leader is host {old} (id {leader})");
    cluster.kill(old);
    let (new_leader, took) = cluster.wait_leader(Duration::from_secs(30));
    eprintln!("leader host {old} killed: host id {new_leader} leads after {took:?}");
    assert_ne!(new_leader, leader, "a new leader");
    assert!(
        took <= Duration::from_secs(10),
        "electing a new metadata leader took {took:?}, more than 10 s"
    );
    // A new host seeded with a survivor that is not the new leader.
    let seed = cluster
        .live()
        .into_iter()
        .find(|&i| cluster.host_id(i) != new_leader)
        .expect("a survivor that is not the leader");
    let spawned = Instant::now();
    let joiner = cluster.add_host(seed, "");
    let (agreed, took) = cluster.wait_for(
        "the new host to be a member that every host lists",
        Duration::from_secs(30),
        |c| {
            let info = c.try_info(joiner)?;
            if info["shoal_phase"] != "member" {
                return Err(format!("host {joiner}: {}", info["shoal_phase"]));
            }
            let agreed = c.try_agreed()?;
            match agreed.len() {
                6 => Ok(agreed),
                n => Err(format!("{n} hosts listed")),
            }
        },
    );
    let joiner_id = cluster.host_id(joiner);
    eprintln!(
        "host {joiner} (id {joiner_id}) joined through host {seed} after the fail-over: \
         agreed {:?} after its spawn ({took:?} of waiting)",
        spawned.elapsed()
    );
    assert!(
        (1..=5).all(|i| cluster.host_id(i) != joiner_id),
        "the joiner got a new id: {agreed:?}"
    );
}

#[test]
fn a_wrong_secret_cannot_join_and_seeds_without_a_secret_are_refused_at_start() {
    let mut cluster = Cluster::start(1, "");
    let seed = [cluster.host(1).peer_addr()];
    let host = cluster.configure_host(
        &seed,
        "[cluster]\ncluster_secret = \"not-the-secret-of-the-cluster\"\n",
    );
    let spawned = Instant::now();
    let wrong = cluster.spawn_host(host);
    let (says, _) = cluster.wait_for(
        "both hosts to log the wrong secret",
        Duration::from_secs(30),
        |c| {
            let joiner_log = c.host(wrong).server.last_stderr();
            let seed_log = c.host(1).server.last_stderr();
            let joiner_says = joiner_log
                .lines()
                .find(|line| line.contains("wrong cluster secret"));
            let seed_says = seed_log.lines().find(|line| {
                line.contains("refused a peer connection")
                    && line.contains("reason=wrong cluster secret")
            });
            match (joiner_says, seed_says) {
                (Some(joiner), Some(seed)) => Ok((joiner.to_string(), seed.to_string())),
                state => Err(format!("(joiner says, seed says) = {state:?}")),
            }
        },
    );
    eprintln!(
        "a joiner with the wrong secret: both logs say why {:?} after its spawn:\n  joiner: {}\n  seed: {}",
        spawned.elapsed(),
        says.0,
        says.1
    );
    let phase = cluster.info(wrong)["shoal_phase"].clone();
    assert!(
        phase.starts_with("joining"),
        "the joiner is still joining: {phase:?}"
    );
    let myid = cluster.query(wrong, &["CLUSTER", "MYID"]);
    assert!(
        myid.as_ref().is_err_and(|e| e.contains("CLUSTERDOWN")),
        "the joiner has no id: {myid:?}"
    );
    let lines = cluster.nodes(1);
    assert_eq!(
        lines.len(),
        1,
        "the cluster did not take the joiner in: {lines:?}"
    );
    assert_eq!(cluster.info(1)["cluster_known_nodes"], "1");

    // Seeds without a secret: the config is refused before anything starts.
    let mut host = cluster.configure_host(&seed, "[cluster]\ncluster_secret = \"\"\n");
    host.server.spawn();
    let status = host
        .server
        .wait_exit(Duration::from_secs(15))
        .expect("shoal serve with seeds and no secret exits by itself");
    let stderr = host.server.last_stderr();
    assert_eq!(
        status.code(),
        Some(2),
        "exit code 2 for a config error, got {}: {stderr}",
        describe(&status)
    );
    assert!(
        stderr.contains("cluster.seeds") && stderr.contains("cluster_secret"),
        "the error names cluster.seeds and the missing secret: {stderr}"
    );
    eprintln!("seeds without a secret: {}", stderr.trim());
}

#[test]
fn a_host_restarted_on_a_new_address_keeps_its_id_and_everyone_learns_the_address() {
    let mut cluster = Cluster::start(3, "");
    // Every host a voter, so that the two others still commit the new address.
    cluster.wait_voters(3, Duration::from_secs(30));
    let moved = 3;
    let id = cluster.host_id(moved);
    let old_client = cluster.host(moved).server.addr().to_string();
    let old_peer = cluster.host(moved).peer_addr();
    cluster.kill(moved);
    let new_ip = cluster.restart_on_new_address(moved);
    let restarted = Instant::now();
    let new_client = cluster.host(moved).server.addr().to_string();
    let new_peer = cluster.host(moved).peer_addr().to_string();
    let (agreed, took) = cluster.wait_for(
        "every host to list the moved host at its new address",
        Duration::from_secs(30),
        |c| {
            let agreed = c.try_agreed()?;
            let entry_of_moved = agreed
                .iter()
                .find(|a| a.host_id == id)
                .ok_or_else(|| format!("host id {id} is not listed"))?;
            if entry_of_moved.client_addr != new_client || entry_of_moved.failed {
                return Err(format!("listed as {entry_of_moved:?}"));
            }
            for i in c.live() {
                let e = entry(&c.try_hosts(i)?, id)?.clone();
                if e.peer_addr != new_peer || e.client_addr != new_client || e.state != "write" {
                    return Err(format!("host {i} has {e:?}"));
                }
            }
            Ok(agreed)
        },
    );
    eprintln!(
        "host {moved} moved from {old_client} (peer {old_peer}) to {new_ip}: listed there by every \
         host {:?} after its restart ({took:?} of waiting)",
        restarted.elapsed()
    );
    assert_eq!(agreed.len(), 3, "still 3 hosts: {agreed:?}");
    assert!(
        agreed.iter().all(|a| a.client_addr != old_client),
        "no host lists the old address: {agreed:?}"
    );
    let myid = cluster
        .query(moved, &["CLUSTER", "MYID"])
        .unwrap_or_else(|e| panic!("{e}"))
        .text();
    assert_eq!(myid, format!("{id:040x}"), "the moved host kept its id");
}

#[test]
fn past_the_offline_threshold_the_unused_ids_of_an_absent_host_are_reclaimed() {
    let mut cluster = Cluster::start(3, "[cluster]\noffline_threshold_secs = 3\n");
    // Every host a voter, so that the two others still commit the reclaim.
    cluster.wait_voters(3, Duration::from_secs(30));
    let absent = 3;
    let absent_id = cluster.host_id(absent);
    let mut con = cluster.host(absent).server.conn();
    let issued: Vec<u64> = (0..10).flat_map(|_| new_ids(&mut con, 1000)).collect();
    drop(con);
    let before = entry(&cluster.hosts_of(1), absent_id)
        .unwrap()
        .id_ranges
        .clone();
    cluster.kill(absent);
    let killed = Instant::now();
    let (_, took) = cluster.wait_for(
        "the absent host's ranges to shrink to their used part on every host",
        Duration::from_secs(60),
        |c| {
            for i in c.live() {
                let e = entry(&c.try_hosts(i)?, absent_id)?.clone();
                if e.state != "inactive" || e.id_ranges.iter().any(|r| r.end != r.high_water) {
                    return Err(format!("host {i} has {e:?}"));
                }
            }
            Ok(())
        },
    );
    eprintln!(
        "host {absent} killed; its unused ids reclaimed after {:?} ({took:?} of waiting); \
         ranges before {before:?}",
        killed.elapsed()
    );
    for i in cluster.live() {
        let entries = cluster.hosts_of(i);
        let ranges = disjoint_ranges(&entries).unwrap_or_else(|e| panic!("host {i}: {e}"));
        let after = entry(&entries, absent_id).unwrap().id_ranges.clone();
        eprintln!("host {i} sees the absent host's ranges as {after:?}");
        for &id in &issued {
            assert!(
                after.iter().any(|r| r.contains(id)),
                "id {id}, issued by host {absent}, lies in none of its ranges after the reclaim {after:?}"
            );
            let owner = ranges.iter().find(|(_, r)| r.contains(id)).map(|(h, _)| *h);
            assert_eq!(
                owner,
                Some(absent_id),
                "id {id}, issued by host {absent}, lies in host {owner:?}'s range (seen by host {i})"
            );
        }
    }
    // A host that joins now gets ids apart from everything issued.
    let joiner = cluster.add_host(1, "");
    cluster.wait_agreed_on(4, Duration::from_secs(30));
    let joiner_id = cluster.host_id(joiner);
    let entries = cluster.hosts_of(1);
    disjoint_ranges(&entries).unwrap_or_else(|e| panic!("{e}"));
    let joiner_ranges = &entry(&entries, joiner_id).unwrap().id_ranges;
    assert!(
        !joiner_ranges.is_empty(),
        "the joiner owns ids: {entries:?}"
    );
    for &id in &issued {
        assert!(
            joiner_ranges.iter().all(|r| !r.contains(id)),
            "id {id} issued by the absent host lies in the joiner's range {joiner_ranges:?}"
        );
    }
    eprintln!("the joiner (id {joiner_id}) got {joiner_ranges:?}");
}
