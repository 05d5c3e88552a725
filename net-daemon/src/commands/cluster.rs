//! Cluster commands: `CLUSTER INFO`, `NODES`, `REPLICAS`, `SLOTS`, `SHARDS` and
//! `MYID` in Redis's formats as far as they fit, and `SHOAL.HOSTS`, the whole NI
//! with this host's view of each peer.
//!
//! A node id is the host id as 40 hex digits, the width of Redis's ids. The
//! slots a host lists are those of the partitions it leads in the NI's partition
//! table; cluster-aware clients may go to them directly, but any host answers
//! any key. `CLUSTER LEAVE` makes this host hand off its partitions and leave.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use shoal_shared::frame::{WorkerRequest, WorkerResponse};
use shoal_shared::partition::{slot_partition, SLOTS};
use shoal_shared::resp::Reply;

use super::Pending;
use crate::errors;
use crate::state::Shared;
use shoal_cluster::ni::{Command, HostInfo, HostState, NetworkInfo, Outcome, PartitionEntry};
use shoal_cluster::node::ClusterNode;
use shoal_cluster::HostId;

/// Runs `name` if it is a cluster command; `None` otherwise. Arity is already checked.
pub fn dispatch(shared: &Shared, name: &str, args: &[Bytes]) -> Option<Reply> {
    let reply = match name {
        "cluster" => cluster(shared, &args[1..]),
        "shoal.hosts" => match &shared.cluster {
            Some(node) => hosts(node),
            None => not_clustered(),
        },
        _ => return None,
    };
    Some(reply)
}

/// A node id in Redis's width.
pub fn node_id(host: HostId) -> String {
    format!("{host:040x}")
}

fn not_clustered() -> Reply {
    Reply::error(
        "ERR this host runs on its own: set cluster.cluster_secret (and cluster.seeds to join) \
         to make it part of a cluster",
    )
}

fn cluster(shared: &Shared, args: &[Bytes]) -> Reply {
    let subcommand = String::from_utf8_lossy(&args[0]).to_lowercase();
    if subcommand == "help" {
        return Reply::Array(
            [
                "CLUSTER INFO: the cluster's state, this host's id and the metadata version.",
                "CLUSTER NODES: one line per host, in Redis's format, with the slots it owns.",
                "CLUSTER REPLICAS <node-id>: the hosts that follow the partitions it leads, in CLUSTER NODES's format.",
                "CLUSTER SLOTS: the slot ranges, each with its primary and the followers that serve READONLY reads.",
                "CLUSTER SHARDS: the hosts and the slot ranges each owns.",
                "CLUSTER MYID: this host's node id.",
                "CLUSTER LEAVE: hand this host's partitions to the others, then leave the cluster.",
                "SHOAL.HOSTS: every host's full entry of the network information.",
            ]
            .into_iter()
            .map(|line| Reply::Simple(line.into()))
            .collect(),
        );
    }
    let Some(node) = &shared.cluster else {
        return not_clustered();
    };
    match (subcommand.as_str(), args.len()) {
        ("info", 1) => Reply::Verbatim(info(shared, node)),
        ("nodes", 1) => Reply::Verbatim(nodes(node)),
        ("slots", 1) => slots(node),
        ("replicas" | "slaves", 2) => replicas(node, &args[1]),
        ("myid", 1) => match node.host_id() {
            Some(host) => Reply::bulk(node_id(host)),
            None => Reply::error(format!("CLUSTERDOWN not a member yet: {}", node.phase())),
        },
        ("info" | "nodes" | "myid" | "slots" | "shards" | "leave" | "replicas" | "slaves", _) => {
            errors::wrong_arity(&format!("cluster|{subcommand}"))
        }
        _ => Reply::error(format!(
            "ERR unknown subcommand '{subcommand}'. Try CLUSTER HELP."
        )),
    }
}

/// `CLUSTER LEAVE`: commits that this host leaves; the leader then moves its partitions
/// away and removes it. `shoal leave` waits for that.
pub fn leave(shared: &Shared) -> Pending {
    let Some(node) = shared.cluster.clone() else {
        return Pending::Ready(not_clustered());
    };
    Pending::barrier(async move {
        let Some(host) = node.host_id() else {
            return Reply::error(format!("CLUSTERDOWN not a member yet: {}", node.phase()));
        };
        let ni = node.ni();
        if ni.hosts.get(&host).is_some_and(|info| info.leaving) {
            return Reply::Ok;
        }
        let others = ni
            .hosts
            .values()
            .filter(|info| info.id != host && !info.leaving && info.state != HostState::Inactive)
            .count();
        if others == 0 {
            return Reply::error(
                "ERR no other active host can take this host's partitions; the last host of a \
                 cluster cannot leave it",
            );
        }
        match node.propose(Command::Leave { host }).await {
            Ok(Outcome::Done) => {
                tracing::info!(host, "leaving the cluster: handing off every partition");
                Reply::Ok
            }
            Ok(other) => Reply::error(format!("ERR the leave was not accepted: {other:?}")),
            Err(error) => Reply::error(format!("TRYAGAIN {error}")),
        }
    })
}

/// Runs of consecutive slots whose partitions give the same `key`: `(first slot, last
/// slot, key)`.
fn slot_ranges<K: PartialEq>(
    ni: &NetworkInfo,
    key: impl Fn(&PartitionEntry) -> K,
) -> Vec<(u16, u16, K)> {
    let partitions = ni.partitions.len() as u16;
    let mut ranges: Vec<(u16, u16, K)> = Vec::new();
    if partitions == 0 {
        return ranges;
    }
    for slot in 0..SLOTS {
        let k = key(&ni.partitions[usize::from(slot_partition(slot, partitions))]);
        match ranges.last_mut() {
            Some((_, last, previous)) if *previous == k => *last = slot,
            _ => ranges.push((slot, slot, k)),
        }
    }
    ranges
}

/// The copies a client may be sent to: the primary, then the followers that serve
/// `READONLY` reads (in sync, on a host not marked inactive).
fn serving_copies(ni: &NetworkInfo, entry: &PartitionEntry) -> Vec<HostId> {
    let mut copies = vec![entry.owner];
    copies.extend(entry.replicas.iter().copied().filter(|host| {
        !entry.out_of_sync.contains(host)
            && ni
                .hosts
                .get(host)
                .is_some_and(|info| info.state != HostState::Inactive)
    }));
    copies
}

/// A host's client address as (ip, port).
fn client_endpoint(host: &HostInfo) -> (String, i64) {
    match host.client_addr.rsplit_once(':') {
        Some((ip, port)) => (ip.to_string(), port.parse().unwrap_or(0)),
        None => (String::new(), 0),
    }
}

/// `CLUSTER SLOTS`: per slot range, its primary, then the followers that serve
/// `READONLY` reads, as Redis lists a master and its replicas.
fn slots(node: &ClusterNode) -> Reply {
    let ni = node.ni();
    let entries = slot_ranges(&ni, |entry| serving_copies(&ni, entry))
        .into_iter()
        .map(|(first, last, copies)| {
            let mut fields = vec![
                Reply::Integer(i64::from(first)),
                Reply::Integer(i64::from(last)),
            ];
            fields.extend(copies.iter().filter_map(|id| {
                let (ip, port) = client_endpoint(ni.hosts.get(id)?);
                Some(Reply::Array(vec![
                    Reply::bulk(ip),
                    Reply::Integer(port),
                    Reply::bulk(node_id(*id)),
                ]))
            }));
            Reply::Array(fields)
        })
        .collect();
    Reply::Array(entries)
}

/// The hosts holding a set of partitions (primary first), the slot ranges of those
/// partitions, the followers out of sync, and the partitions.
type CopySet = (Vec<HostId>, Vec<(u16, u16)>, Vec<HostId>, BTreeSet<u16>);

/// `CLUSTER SHARDS`, once every host told its copies' last commit ids (see [`shards`]).
pub fn shards_pending(shared: &Shared) -> Pending {
    let (Some(node), Some(router)) = (shared.cluster.clone(), shared.dispatch.router.clone())
    else {
        return Pending::Ready(not_clustered());
    };
    Pending::barrier(async move {
        let hosts: Vec<HostId> = node.ni().hosts.keys().copied().collect();
        let calls: Vec<_> = hosts
            .iter()
            .map(|&host| router.send_to_host(host, WorkerRequest::LastCommitIds))
            .collect();
        let mut positions = HashMap::new();
        for (host, call) in hosts.into_iter().zip(calls) {
            if let Ok(WorkerResponse::Positions(held)) = call.wait().await {
                for (partition, last) in held {
                    positions.insert((host, partition), last);
                }
            }
        }
        shards(&node, &positions)
    })
}

/// `CLUSTER SHARDS`: one shard per set of copies (primary, then followers), with the
/// slot ranges of the partitions it holds. A follower's health is `fail` when its host
/// is inactive, `loading` while it is out of sync, and `online` otherwise. A copy's
/// `replication-offset` is the sum of the last commit ids of the shard's partitions on
/// its host (`positions`, by host and partition; 0 for a host that did not answer).
fn shards(node: &ClusterNode, positions: &HashMap<(HostId, u16), u64>) -> Reply {
    let ni = node.ni();
    let partitions = ni.partitions.len() as u16;
    // Contiguous slot ranges per copy set, in slot order.
    let mut sets: Vec<CopySet> = Vec::new();
    let mut previous: Option<usize> = None;
    for slot in 0..if partitions == 0 { 0 } else { SLOTS } {
        let partition = slot_partition(slot, partitions);
        let entry = &ni.partitions[usize::from(partition)];
        let members = entry.members();
        let index = match sets.iter().position(|(m, _, _, _)| *m == members) {
            Some(index) => index,
            None => {
                sets.push((
                    members,
                    Vec::new(),
                    entry.out_of_sync.clone(),
                    BTreeSet::new(),
                ));
                sets.len() - 1
            }
        };
        sets[index].3.insert(partition);
        let ranges = &mut sets[index].1;
        match ranges.last_mut() {
            Some((_, last)) if previous == Some(index) && *last + 1 == slot => *last = slot,
            _ => ranges.push((slot, slot)),
        }
        previous = Some(index);
    }
    let field = |name: &str| Reply::bulk(name.to_string());
    let entries = sets
        .into_iter()
        .map(|(members, ranges, out_of_sync, held)| {
            let slots = ranges
                .iter()
                .flat_map(|(first, last)| {
                    [
                        Reply::Integer(i64::from(*first)),
                        Reply::Integer(i64::from(*last)),
                    ]
                })
                .collect();
            let offset = |host: HostId| {
                let sum: u64 = held.iter().filter_map(|&p| positions.get(&(host, p))).sum();
                sum as i64
            };
            let nodes = members
                .iter()
                .enumerate()
                .filter_map(|(i, id)| {
                    let host = ni.hosts.get(id)?;
                    let (ip, port) = client_endpoint(host);
                    let health = match host.state {
                        HostState::Inactive => "fail",
                        _ if out_of_sync.contains(id) => "loading",
                        _ => "online",
                    };
                    let role = if i == 0 { "master" } else { "replica" };
                    Some(Reply::Map(vec![
                        (field("id"), Reply::bulk(node_id(host.id))),
                        (field("port"), Reply::Integer(port)),
                        (field("ip"), Reply::bulk(ip.clone())),
                        (field("endpoint"), Reply::bulk(ip)),
                        (field("role"), Reply::bulk(role)),
                        (field("replication-offset"), Reply::Integer(offset(*id))),
                        (field("health"), Reply::bulk(health)),
                    ]))
                })
                .collect();
            Reply::Map(vec![
                (field("slots"), Reply::Array(slots)),
                (field("nodes"), Reply::Array(nodes)),
            ])
        })
        .collect();
    Reply::Array(entries)
}

fn info(shared: &Shared, node: &ClusterNode) -> String {
    let ni = node.ni();
    let (leader, voters) = node.raft_view().unwrap_or_default();
    let member = node.host_id().is_some() && ni.cluster_id != 0;
    let state = if member && leader.is_some() {
        "ok"
    } else {
        "fail"
    };
    let active = ni
        .hosts
        .values()
        .filter(|host| host.state != HostState::Inactive)
        .count();
    let assigned = if ni.partitions.is_empty() { 0 } else { SLOTS };
    let mut text = String::new();
    let _ = write!(
        text,
        "cluster_enabled:1\r\ncluster_state:{state}\r\ncluster_slots_assigned:{assigned}\r\n\
         cluster_slots_ok:{assigned}\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:0\r\n\
         cluster_known_nodes:{}\r\ncluster_size:{active}\r\ncluster_current_epoch:{}\r\n\
         cluster_my_epoch:{}\r\nshoal_phase:{}\r\nshoal_cluster_id:{:016x}\r\n\
         shoal_host_id:{}\r\nshoal_ni_version:{}\r\nshoal_ni_checksum:{:016x}\r\n\
         shoal_metadata_leader:{}\r\nshoal_metadata_voters:{}\r\nshoal_metadata_voters_changing:{}\r\n",
        ni.hosts.len(),
        ni.version,
        ni.version,
        node.phase(),
        ni.cluster_id,
        node.host_id().unwrap_or(0),
        ni.version,
        ni.checksum(),
        leader.map_or_else(String::new, |l| l.to_string()),
        voters
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        u8::from(node.voters_changing()),
    );
    let me = node.host_id().unwrap_or(0);
    let stats = &shared.handoffs;
    let read_batches = shared
        .dispatch
        .router
        .as_ref()
        .map_or((0, 0), |router| router.read_batches());
    let _ = write!(
        text,
        "shoal_partitions:{}\r\nshoal_partitions_owned:{}\r\nshoal_partitions_moving:{}\r\n\
         shoal_partitions_misplaced:{}\r\nshoal_partitions_under_replicated:{}\r\n\
         shoal_leaving:{}\r\nshoal_handoffs_completed:{}\r\nshoal_handoff_pause_us_last:{}\r\n\
         shoal_handoff_pause_us_max:{}\r\nshoal_handoff_records_copied:{}\r\n\
         shoal_handoff_entries_replayed:{}\r\nshoal_failovers_led:{}\r\n\
         shoal_handovers_led:{}\r\nshoal_full_copies:{}\r\nshoal_resyncs:{}\r\n\
         shoal_read_batches:{}\r\nshoal_reads_batched:{}\r\n",
        ni.partitions.len(),
        ni.owned_by(me).count(),
        ni.partitions
            .iter()
            .filter(|entry| entry.target.is_some())
            .count(),
        node.misplaced(),
        node.under_replicated(),
        u8::from(ni.hosts.get(&me).is_some_and(|host| host.leaving)),
        stats.completed.load(Ordering::Relaxed),
        stats.last_pause_us.load(Ordering::Relaxed),
        stats.max_pause_us.load(Ordering::Relaxed),
        stats.records_copied.load(Ordering::Relaxed),
        stats.entries_replayed.load(Ordering::Relaxed),
        node.failovers_led(),
        node.handovers_led(),
        shared
            .dispatch
            .router
            .as_ref()
            .map_or(0, |router| router.full_copies()),
        shared
            .dispatch
            .router
            .as_ref()
            .map_or(0, |router| router.resyncs()),
        read_batches.0,
        read_batches.1,
    );
    text
}

/// `CLUSTER NODES`: every host once, as the master of the slots whose partitions it
/// leads (it follows others too, which Redis's one role per node cannot say; see
/// [`replicas`]).
fn nodes(node: &ClusterNode) -> String {
    let ni = node.ni();
    let ranges = slot_ranges(&ni, |entry| entry.owner);
    let mut text = String::new();
    for host in ni.hosts.values() {
        let slots: Vec<(u16, u16)> = ranges
            .iter()
            .filter(|(_, _, owner)| *owner == host.id)
            .map(|&(first, last, _)| (first, last))
            .collect();
        node_line(&mut text, node, host, NodeRole::Master(&slots));
    }
    text
}

/// `CLUSTER REPLICAS node-id` (and `CLUSTER SLAVES`): in `CLUSTER NODES`'s format, the
/// hosts that hold a follower copy of a partition that `node-id` leads. A follower out of
/// sync for any of them is flagged `nofailover`: no failover names it while it catches up.
fn replicas(node: &ClusterNode, id: &[u8]) -> Reply {
    let ni = node.ni();
    let Some(master) = ni
        .hosts
        .values()
        .find(|host| node_id(host.id).as_bytes() == id.to_ascii_lowercase())
    else {
        return Reply::error(format!("ERR Unknown node {}", String::from_utf8_lossy(id)));
    };
    // Follower host → whether it is out of sync for any of the master's partitions.
    let mut followers: BTreeMap<HostId, bool> = BTreeMap::new();
    for entry in ni
        .partitions
        .iter()
        .filter(|entry| entry.owner == master.id)
    {
        for &follower in &entry.replicas {
            *followers.entry(follower).or_default() |= entry.out_of_sync.contains(&follower);
        }
    }
    let lines = followers
        .into_iter()
        .filter_map(|(follower, out_of_sync)| {
            let host = ni.hosts.get(&follower)?;
            let mut line = String::new();
            node_line(
                &mut line,
                node,
                host,
                NodeRole::Replica {
                    of: master.id,
                    out_of_sync,
                },
            );
            Some(Reply::bulk(line.trim_end().to_string()))
        })
        .collect();
    Reply::Array(lines)
}

/// What a `CLUSTER NODES` line says a host is.
enum NodeRole<'a> {
    /// The master of these slot ranges.
    Master(&'a [(u16, u16)]),
    /// A replica of `of`'s partitions.
    Replica { of: HostId, out_of_sync: bool },
}

/// Appends `host`'s line in `CLUSTER NODES`'s format to `text`.
fn node_line(text: &mut String, node: &ClusterNode, host: &HostInfo, role: NodeRole) {
    let views = node.peer_views();
    let myself = Some(host.id) == node.host_id();
    let view = views.get(&host.id);
    let suspect = view
        .and_then(|v| v.score.as_ref())
        .is_some_and(|score| score.suspect);
    let mut flags = vec![];
    if myself {
        flags.push("myself");
    }
    let master = match role {
        NodeRole::Master(_) => {
            flags.push("master");
            "-".to_string()
        }
        NodeRole::Replica { of, out_of_sync } => {
            flags.push("slave");
            if out_of_sync {
                flags.push("nofailover");
            }
            node_id(of)
        }
    };
    match host.state {
        HostState::Inactive => flags.push("fail"),
        _ if suspect => flags.push("fail?"),
        _ => {}
    }
    let peer_port = host
        .peer_addr
        .rsplit_once(':')
        .map_or("0", |(_, port)| port);
    let pong_ms = view
        .and_then(|v| v.score.as_ref())
        .and_then(|score| score.last_success_ms)
        .unwrap_or(0);
    let link = if myself || (host.state != HostState::Inactive && !suspect) {
        "connected"
    } else {
        "disconnected"
    };
    let _ = write!(
        text,
        "{} {}@{} {} {master} 0 {} {} {}",
        node_id(host.id),
        host.client_addr,
        peer_port,
        flags.join(","),
        pong_ms,
        host.id,
        link,
    );
    if let NodeRole::Master(slots) = role {
        for (first, last) in slots {
            let _ = match first == last {
                true => write!(text, " {first}"),
                false => write!(text, " {first}-{last}"),
            };
        }
    }
    text.push('\n');
}

fn hosts(node: &ClusterNode) -> Reply {
    let ni = node.ni();
    let views = node.peer_views();
    let (leader, voters) = node.raft_view().unwrap_or_default();
    let entries = ni
        .hosts
        .values()
        .map(|host| {
            let view = views.get(&host.id);
            let score = view.and_then(|v| v.score.as_ref());
            let rumor = node.rumor(host.id);
            let ranges = ni
                .ranges_of(host.id)
                .iter()
                .map(|owned| {
                    Reply::Array(vec![
                        Reply::Integer(owned.range.start as i64),
                        Reply::Integer(owned.range.end.min(i64::MAX as u64) as i64),
                        Reply::Integer(owned.high_water as i64),
                    ])
                })
                .collect();
            let coordinate = &host.coordinate;
            let field = |name: &str| Reply::bulk(name.to_string());
            Reply::Map(vec![
                (field("id"), Reply::Integer(host.id as i64)),
                (field("node_id"), Reply::bulk(node_id(host.id))),
                (field("peer_addr"), Reply::bulk(host.peer_addr.clone())),
                (field("client_addr"), Reply::bulk(host.client_addr.clone())),
                (field("state"), Reply::bulk(host.state.name())),
                (field("since_ms"), Reply::Integer(host.since_ms as i64)),
                (field("joined_ms"), Reply::Integer(host.joined_ms as i64)),
                (
                    field("myself"),
                    Reply::Integer(i64::from(Some(host.id) == node.host_id())),
                ),
                (
                    field("voter"),
                    Reply::Integer(i64::from(voters.contains(&host.id))),
                ),
                (
                    field("leader"),
                    Reply::Integer(i64::from(leader == Some(host.id))),
                ),
                (
                    field("score"),
                    Reply::Double(score.map_or(0.0, |s| s.value)),
                ),
                (
                    field("suspect"),
                    Reply::Integer(i64::from(score.is_some_and(|s| s.suspect))),
                ),
                (
                    field("score_since_ms"),
                    Reply::Integer(score.map_or(0, |s| s.since_ms) as i64),
                ),
                (
                    field("rtt_us"),
                    Reply::Integer(view.and_then(|v| v.rtt_us).map_or(-1, |r| r as i64)),
                ),
                (
                    field("coordinate"),
                    Reply::Array(
                        coordinate
                            .position_s
                            .iter()
                            .chain(
                                [
                                    coordinate.height_s,
                                    coordinate.adjustment_s,
                                    coordinate.error,
                                ]
                                .iter(),
                            )
                            .map(|&x| Reply::Double(x))
                            .collect(),
                    ),
                ),
                (field("id_ranges"), Reply::Array(ranges)),
                (
                    field("gossip_ttl"),
                    Reply::Integer(rumor.as_ref().map_or(-1, |r| i64::from(r.ttl))),
                ),
                (
                    field("load"),
                    Reply::Double(
                        rumor
                            .as_ref()
                            .map_or(0.0, |r| f64::from(r.metrics.load_milli) / 1000.0),
                    ),
                ),
                (
                    field("gossip_free_bytes"),
                    Reply::Integer(rumor.as_ref().map_or(-1, |r| r.metrics.free_bytes as i64)),
                ),
                (
                    field("capacity_bytes"),
                    Reply::Integer(host.capacity.capacity_bytes as i64),
                ),
                (
                    field("free_bytes"),
                    Reply::Integer(host.capacity.free_bytes as i64),
                ),
                (
                    field("cpu_rating"),
                    Reply::Integer(i64::from(host.capacity.cpu_rating)),
                ),
            ])
        })
        .collect();
    Reply::Array(entries)
}
