//! Several `shoal serve` hosts on one machine forming one cluster, and faults on
//! the links between them.
//!
//! Each [`Cluster`] takes a subnet of the loopback range, 127.0.T.0/24, of its own,
//! so that tests running in parallel never share an address. Host `i` (1-based;
//! host 1 founds the cluster) listens for clients and for peers on 127.0.T.(10+i),
//! on free ports; a host moved to a new address, or added later, takes the next
//! unused last octet. Every host runs one shard-worker and shares one secret; the
//! hosts after the first are given only host 1's peer address as their seed.
//!
//! Peers dial from the IP of their own peer listener, so each host↔host link is
//! one (source IP, destination IP) pair, and a firewall rule on that pair acts on
//! that link alone; the test's own client connections come from 127.0.0.1 and are
//! never matched. A [`LinkFault`] is a set of iptables rules (the legacy backend:
//! its NFQUEUE target needs no nft `queue` support) in a chain named after this
//! process, `shoal-<pid>-<n>`: a cut drops every packet; an [`Impairment`] drops a
//! share of them (`-m statistic`) and hands the rest to an NFQUEUE, from which a
//! thread of the test process releases each packet after its delay. The delay is
//! done in user space because the kernels this runs on may have no `netem` qdisc.
//! Dropping a fault removes its rules and releases every held packet, also while a
//! test panics; rules left by a test process that was killed are removed by the
//! next one that injects a fault.
//!
//! Observing goes through the hosts' client ports only: `CLUSTER NODES`,
//! `CLUSTER INFO`, `CLUSTER MYID` and `SHOAL.HOSTS`, each on a new connection
//! with a short timeout, so a stopped host shows up as an error, not a hang.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Once, OnceLock};
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

use super::{free_port_on, merge, poll_until, process_alive, signal, RawConn, Resp, Rng, Server};

/// The secret every host of a test cluster shares.
pub const SECRET: &str = "shoal-cluster-tests-secret";

/// How long one query of a host may take (connect, then the reply): past the server's
/// own request timeout (5 s), within which a request waits out a failover or handover.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(6);

/// How long a host may take to found a cluster once it answers PING.
pub const FOUND_TIMEOUT: Duration = Duration::from_secs(20);

/// How often the `wait_*` helpers look again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The iptables binary; the legacy backend has the NFQUEUE target without nft `queue`.
const IPTABLES: &str = "iptables-legacy";

/// Where [`IPTABLES`] is: on the PATH, or in /usr/sbin or /sbin (a PATH without
/// the sbin directories is common outside login shells).
fn iptables_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        ["/usr/sbin", "/sbin"]
            .iter()
            .map(|dir| format!("{dir}/{IPTABLES}"))
            .find(|path| std::path::Path::new(path).exists())
            .unwrap_or_else(|| IPTABLES.to_string())
    })
}

/// Subnets handed out by this process so far.
static SUBNETS: AtomicU32 = AtomicU32::new(0);

/// A subnet 127.0.T.0/24 that no other cluster of this process uses. The start
/// depends on the pid, so that two test processes rarely pick the same one.
fn next_subnet() -> u8 {
    let n = SUBNETS.fetch_add(1, Ordering::Relaxed);
    let base = std::process::id() % 127 * 2;
    (1 + (base + n) % 254) as u8
}

/// One host of a test cluster.
pub struct Host {
    /// Its number: host `number` was started on 127.0.T.(10+number).
    pub number: usize,
    /// The address it listens on now (clients and peers).
    pub ip: Ipv4Addr,
    pub peer_port: u16,
    pub server: Server,
    /// Stopped with SIGSTOP and not continued yet.
    pub paused: bool,
    /// Its host id, once read.
    id: OnceLock<u64>,
}

impl Host {
    /// The address the other hosts reach it at.
    pub fn peer_addr(&self) -> SocketAddr {
        (self.ip, self.peer_port).into()
    }

    /// Whether its process tree runs (it may be paused).
    pub fn running(&self) -> bool {
        self.server.child.is_some()
    }

    /// Running and not paused: it answers queries.
    pub fn live(&self) -> bool {
        self.running() && !self.paused
    }

    fn name(&self) -> String {
        format!("host {} ({})", self.number, self.ip)
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLine {
    pub node_id: String,
    /// The client address ("ip:port").
    pub client_addr: String,
    pub peer_port: u16,
    pub flags: Vec<String>,
    pub pong_ms: u64,
    pub host_id: u64,
    pub connected: bool,
    /// The slot ranges it owns (first, last).
    pub slots: Vec<(u16, u16)>,
}

impl NodeLine {
    /// Parses `<id> <client>@<peer port> <flags> - 0 <pong ms> <host id> <link> <slots>...`.
    pub fn parse(line: &str) -> Result<NodeLine, String> {
        let bad = |why: &str| format!("CLUSTER NODES line {line:?}: {why}");
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return Err(bad("fewer than 8 fields"));
        }
        let slots = fields[8..]
            .iter()
            .map(|range| {
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                Ok((
                    first.parse().map_err(|_| bad("bad slot"))?,
                    last.parse().map_err(|_| bad("bad slot"))?,
                ))
            })
            .collect::<Result<Vec<(u16, u16)>, String>>()?;
        let (client_addr, peer_port) = fields[1].rsplit_once('@').ok_or_else(|| bad("no @"))?;
        if fields[0].len() != 40 || !fields[0].bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("the node id is not 40 hex digits"));
        }
        if fields[3] != "-" || fields[4] != "0" {
            return Err(bad("fields 4 and 5 are not `- 0`"));
        }
        let link = match fields[7] {
            "connected" => true,
            "disconnected" => false,
            _ => return Err(bad("the link is neither connected nor disconnected")),
        };
        let line = NodeLine {
            node_id: fields[0].to_string(),
            client_addr: client_addr.to_string(),
            peer_port: peer_port.parse().map_err(|_| bad("bad peer port"))?,
            flags: fields[2].split(',').map(str::to_string).collect(),
            pong_ms: fields[5].parse().map_err(|_| bad("bad pong time"))?,
            host_id: fields[6].parse().map_err(|_| bad("bad host id"))?,
            connected: link,
            slots,
        };
        if u64::from_str_radix(&line.node_id, 16) != Ok(line.host_id) {
            return Err(bad("the node id is not the host id in hex"));
        }
        Ok(line)
    }

    pub fn myself(&self) -> bool {
        self.flags.iter().any(|f| f == "myself")
    }

    /// `fail`: inactive in the NI, as the cluster agreed.
    pub fn failed(&self) -> bool {
        self.flags.iter().any(|f| f == "fail")
    }

    /// `fail?`: suspected by this host alone.
    pub fn suspected(&self) -> bool {
        self.flags.iter().any(|f| f == "fail?")
    }
}

/// What every host must agree on about one host: its id, its addresses and
/// whether it is failed (a local `fail?` is not part of it).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Agreed {
    pub host_id: u64,
    pub client_addr: String,
    pub peer_port: u16,
    pub failed: bool,
}

/// One id range of a host in `SHOAL.HOSTS`: `[start, end)`, issued below `high_water`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IdRange {
    pub start: u64,
    pub end: u64,
    pub high_water: u64,
}

impl IdRange {
    pub fn contains(&self, id: u64) -> bool {
        self.start <= id && id < self.end
    }
}

/// One host's entry in `SHOAL.HOSTS`.
#[derive(Clone, Debug, PartialEq)]
pub struct HostEntry {
    pub id: u64,
    pub node_id: String,
    pub peer_addr: String,
    pub client_addr: String,
    /// write, read, inactive or proposal.
    pub state: String,
    pub since_ms: i64,
    pub myself: bool,
    pub voter: bool,
    pub leader: bool,
    pub score: f64,
    pub suspect: bool,
    /// The asking host's last round trip to this one; -1 if none.
    pub rtt_us: i64,
    pub id_ranges: Vec<IdRange>,
}

impl HostEntry {
    fn parse(entry: &Resp) -> Result<HostEntry, String> {
        let fields = map_fields(entry)?;
        let get = |name: &str| {
            fields
                .get(name)
                .ok_or_else(|| format!("SHOAL.HOSTS entry without {name}: {entry:?}"))
        };
        let int = |name: &str| get(name).and_then(|v| resp_int(v, name));
        let text = |name: &str| get(name).and_then(|v| resp_text(v, name));
        let flag = |name: &str| int(name).map(|v| v != 0);
        let ranges = match get("id_ranges")? {
            Resp::Array(items) => items
                .iter()
                .map(|item| match item {
                    Resp::Array(parts) if parts.len() == 3 => Ok(IdRange {
                        start: resp_int(&parts[0], "range start")? as u64,
                        end: resp_int(&parts[1], "range end")? as u64,
                        high_water: resp_int(&parts[2], "range high water")? as u64,
                    }),
                    other => Err(format!(
                        "id range {other:?} is not [start, end, high_water]"
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
            other => return Err(format!("id_ranges {other:?} is not an array")),
        };
        let score = text("score")?;
        Ok(HostEntry {
            id: int("id")? as u64,
            node_id: text("node_id")?,
            peer_addr: text("peer_addr")?,
            client_addr: text("client_addr")?,
            state: text("state")?,
            since_ms: int("since_ms")?,
            myself: flag("myself")?,
            voter: flag("voter")?,
            leader: flag("leader")?,
            score: score
                .parse()
                .map_err(|_| format!("score {score:?} is not a number"))?,
            suspect: flag("suspect")?,
            rtt_us: int("rtt_us")?,
            id_ranges: ranges,
        })
    }
}

/// The fields of a map reply (RESP3) or of a flat array of pairs (RESP2).
fn map_fields(reply: &Resp) -> Result<BTreeMap<String, Resp>, String> {
    let pairs: Vec<(Resp, Resp)> = match reply {
        Resp::Map(pairs) => pairs.clone(),
        Resp::Array(items) if items.len() % 2 == 0 => items
            .chunks(2)
            .map(|pair| (pair[0].clone(), pair[1].clone()))
            .collect(),
        other => return Err(format!("expected a map, got {other:?}")),
    };
    pairs
        .into_iter()
        .map(|(key, value)| Ok((resp_text(&key, "a map key")?, value)))
        .collect()
}

fn resp_int(value: &Resp, what: &str) -> Result<i64, String> {
    match value {
        Resp::Int(n) => Ok(*n),
        other => Err(format!("{what}: expected an integer, got {other:?}")),
    }
}

fn resp_text(value: &Resp, what: &str) -> Result<String, String> {
    match value {
        Resp::Bulk(bytes) | Resp::Verbatim(_, bytes) => Ok(String::from_utf8_lossy(bytes).into()),
        Resp::Simple(text) | Resp::Double(text) => Ok(text.clone()),
        other => Err(format!("{what}: expected a string, got {other:?}")),
    }
}

/// A set of `shoal serve` hosts on 127.0.T.x forming one cluster.
pub struct Cluster {
    /// T in 127.0.T.x.
    pub subnet: u8,
    /// Host `i` is `hosts[i - 1]`.
    pub hosts: Vec<Host>,
    /// Merged into every host's config.
    extra_toml: String,
    /// The last octet the next new address gets.
    next_octet: u8,
    /// When `launch` spawned the hosts after the founder.
    pub joiners_spawned: Instant,
}

impl Cluster {
    /// Starts `n` hosts (see [`Cluster::launch`]) and waits (30 s at most) until every
    /// host lists all `n` and they agree.
    pub fn start(n: usize, extra_toml: &str) -> Cluster {
        let cluster = Cluster::launch(n, extra_toml);
        cluster.wait_agreed_on(n, Duration::from_secs(30));
        cluster
    }

    /// Starts host 1 and waits until it has founded a cluster, then spawns hosts 2..=n
    /// at once, each with host 1's peer address as its only seed, and waits until each
    /// answers PING (not until they are members). `extra_toml` is merged into every
    /// host's config, also of hosts added later.
    pub fn launch(n: usize, extra_toml: &str) -> Cluster {
        assert!(n >= 1, "a cluster has at least one host");
        let subnet = next_subnet();
        let mut cluster = Cluster {
            subnet,
            hosts: Vec::new(),
            extra_toml: extra_toml.to_string(),
            next_octet: 11,
            joiners_spawned: Instant::now(),
        };
        eprintln!("cluster on 127.0.{subnet}.0/24: {n} hosts");
        let mut founder = cluster.configure_host(&[], "");
        founder.server.spawn_and_wait();
        cluster.hosts.push(founder);
        cluster.wait_for("host 1 to found a cluster", FOUND_TIMEOUT, |c| {
            let info = c.try_info(1)?;
            match (info.get("shoal_phase"), info.get("cluster_state")) {
                (Some(phase), Some(state)) if phase == "member" && state == "ok" => Ok(()),
                _ => Err(format!("host 1: {info:?}")),
            }
        });
        let seed = cluster.hosts[0].peer_addr();
        let mut joiners: Vec<Host> = (2..=n)
            .map(|_| cluster.configure_host(&[seed], ""))
            .collect();
        cluster.joiners_spawned = Instant::now();
        for host in &mut joiners {
            host.server.spawn();
        }
        for host in &mut joiners {
            host.server.wait_ready();
        }
        cluster.hosts.extend(joiners);
        cluster
    }

    /// A free address in this cluster's subnet.
    fn next_ip(&mut self) -> Ipv4Addr {
        assert!(
            self.next_octet < 255,
            "subnet 127.0.{} is used up",
            self.subnet
        );
        let ip = Ipv4Addr::new(127, 0, self.subnet, self.next_octet);
        self.next_octet += 1;
        ip
    }

    /// Two distinct free ports on `ip`.
    fn free_ports(ip: Ipv4Addr) -> (u16, u16) {
        let client = free_port_on(IpAddr::V4(ip));
        loop {
            let peer = free_port_on(IpAddr::V4(ip));
            if peer != client {
                return (client, peer);
            }
        }
    }

    /// The config of a host at `ip` (client and peer ports given), with the cluster's
    /// extra TOML and then `extra_toml` merged over it. One copy of each partition unless
    /// the extra TOML asks for more: the membership, placement, handoff and 2PC tests
    /// watch partitions move between single owners (`tests/replication.rs` sets 3).
    fn host_toml(
        &self,
        ip: Ipv4Addr,
        ports: (u16, u16),
        seeds: &[SocketAddr],
        extra: &str,
    ) -> String {
        let seeds: Vec<String> = seeds
            .iter()
            .map(|s| format!("{:?}", s.to_string()))
            .collect();
        let mut table: toml::Table = toml::from_str(&format!(
            "workers = 1\n[client]\nlisten = \"{ip}:{client}\"\n\
             [cluster]\ncluster_secret = {SECRET:?}\npeer_listen = \"{ip}:{peer}\"\nseeds = [{seeds}]\n\
             replicas = 1\n",
            client = ports.0,
            peer = ports.1,
            seeds = seeds.join(", "),
        ))
        .expect("cluster host config");
        merge(
            &mut table,
            toml::from_str(&self.extra_toml).expect("the cluster's extra TOML is valid"),
        );
        merge(
            &mut table,
            toml::from_str(extra).expect("extra TOML is valid"),
        );
        toml::to_string(&table).expect("serialize config")
    }

    /// A new host on the next free address, seeded with `seeds`, configured (the
    /// cluster's extra TOML, then `extra_toml`) but not started nor added.
    pub fn configure_host(&mut self, seeds: &[SocketAddr], extra_toml: &str) -> Host {
        let ip = self.next_ip();
        let ports = Cluster::free_ports(ip);
        let server = Server::configure(&self.host_toml(ip, ports, seeds, extra_toml));
        Host {
            number: usize::from(ip.octets()[3]) - 10,
            ip,
            peer_port: ports.1,
            server,
            paused: false,
            id: OnceLock::new(),
        }
    }

    /// Starts a new host seeded with host `seed`'s peer address, waits until it answers
    /// PING, and adds it; returns its number.
    pub fn add_host(&mut self, seed: usize, extra_toml: &str) -> usize {
        let seeds = [self.host(seed).peer_addr()];
        let host = self.configure_host(&seeds, extra_toml);
        self.spawn_host(host)
    }

    /// Starts a configured host, waits until it answers PING, and adds it; returns its
    /// number.
    pub fn spawn_host(&mut self, mut host: Host) -> usize {
        host.server.spawn_and_wait();
        let number = host.number;
        self.hosts.push(host);
        number
    }

    /// Host `i` (1-based).
    pub fn host(&self, i: usize) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.number == i)
            .unwrap_or_else(|| panic!("no host {i}"))
    }

    pub fn host_mut(&mut self, i: usize) -> &mut Host {
        self.hosts
            .iter_mut()
            .find(|h| h.number == i)
            .unwrap_or_else(|| panic!("no host {i}"))
    }

    /// The numbers of the hosts that answer queries (running and not paused).
    pub fn live(&self) -> Vec<usize> {
        self.hosts
            .iter()
            .filter(|h| h.live())
            .map(|h| h.number)
            .collect()
    }

    /// kill -9 of host `i`'s process tree.
    pub fn kill(&mut self, i: usize) {
        let host = self.host_mut(i);
        if host.paused {
            signal(-host.server.pid(), libc::SIGCONT);
            host.paused = false;
        }
        host.server.kill_tree();
        eprintln!("killed host {i} with SIGKILL");
    }

    /// SIGSTOP to every process of host `i`.
    pub fn pause(&mut self, i: usize) {
        let host = self.host_mut(i);
        signal(-host.server.pid(), libc::SIGSTOP);
        host.paused = true;
    }

    /// SIGCONT to every process of host `i`.
    pub fn resume(&mut self, i: usize) {
        let host = self.host_mut(i);
        signal(-host.server.pid(), libc::SIGCONT);
        host.paused = false;
    }

    /// Restarts host `i` (killed or stopped before) with the same data dir on the next
    /// free address of the subnet; waits until it answers PING. Returns the new address.
    pub fn restart_on_new_address(&mut self, i: usize) -> Ipv4Addr {
        assert!(!self.host(i).running(), "kill host {i} before moving it");
        let ip = self.next_ip();
        let ports = Cluster::free_ports(ip);
        let host = self.host_mut(i);
        host.server.update_config(&format!(
            "[client]\nlisten = \"{ip}:{}\"\n[cluster]\npeer_listen = \"{ip}:{}\"\n",
            ports.0, ports.1
        ));
        host.ip = ip;
        host.peer_port = ports.1;
        host.server.restart();
        eprintln!("host {i} restarted on {ip}");
        ip
    }

    // ------------------------------------------------------------ observing

    /// One command on a fresh connection to host `i`; an error reply is an `Err`.
    pub fn query(&self, i: usize, args: &[&str]) -> Result<Resp, String> {
        let host = self.host(i);
        let addr = host.server.addr();
        let mut conn = RawConn::try_tcp(addr, QUERY_TIMEOUT)
            .map_err(|e| format!("{}: connect: {e}", host.name()))?;
        let reply = conn
            .try_cmd(args)
            .map_err(|e| format!("{}: {args:?}: {e}", host.name()))?;
        if reply.is_error() {
            return Err(format!("{}: {args:?} answered {reply:?}", host.name()));
        }
        Ok(reply)
    }

    /// `CLUSTER NODES` of host `i`, parsed.
    pub fn try_nodes(&self, i: usize) -> Result<Vec<NodeLine>, String> {
        let text = resp_text(&self.query(i, &["CLUSTER", "NODES"])?, "CLUSTER NODES")?;
        text.lines().map(NodeLine::parse).collect()
    }

    pub fn nodes(&self, i: usize) -> Vec<NodeLine> {
        self.try_nodes(i).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `CLUSTER INFO` of host `i` as key → value.
    pub fn try_info(&self, i: usize) -> Result<BTreeMap<String, String>, String> {
        let text = resp_text(&self.query(i, &["CLUSTER", "INFO"])?, "CLUSTER INFO")?;
        Ok(text
            .lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(key, value)| (key.to_string(), value.trim().to_string()))
            .collect())
    }

    pub fn info(&self, i: usize) -> BTreeMap<String, String> {
        self.try_info(i).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The fields of one `INFO` section of host `i` (`INFO <section>`).
    pub fn info_section(&self, i: usize, section: &str) -> BTreeMap<String, String> {
        let reply = self
            .query(i, &["INFO", section])
            .unwrap_or_else(|e| panic!("INFO {section} on host {i}: {e}"));
        let text = resp_text(&reply, "INFO").unwrap_or_else(|e| panic!("{e}"));
        text.lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(key, value)| (key.to_string(), value.trim().to_string()))
            .collect()
    }

    /// `SHOAL.HOSTS` of host `i`, parsed.
    pub fn try_hosts(&self, i: usize) -> Result<Vec<HostEntry>, String> {
        match self.query(i, &["SHOAL.HOSTS"])? {
            Resp::Array(entries) => entries.iter().map(HostEntry::parse).collect(),
            other => Err(format!("host {i}: SHOAL.HOSTS answered {other:?}")),
        }
    }

    pub fn hosts_of(&self, i: usize) -> Vec<HostEntry> {
        self.try_hosts(i).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Host `i`'s host id (`CLUSTER MYID`), remembered once read so that it is known
    /// after the host is killed.
    pub fn try_host_id(&self, i: usize) -> Result<u64, String> {
        let host = self.host(i);
        if let Some(id) = host.id.get() {
            return Ok(*id);
        }
        let text = resp_text(&self.query(i, &["CLUSTER", "MYID"])?, "CLUSTER MYID")?;
        let id = match u64::from_str_radix(&text, 16) {
            Ok(id) if text.len() == 40 => id,
            _ => return Err(format!("CLUSTER MYID {text:?} is not 40 hex digits")),
        };
        Ok(*host.id.get_or_init(|| id))
    }

    pub fn host_id(&self, i: usize) -> u64 {
        self.try_host_id(i).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The host number of host id `id`, among the hosts whose id was read.
    pub fn number_of(&self, id: u64) -> Option<usize> {
        self.hosts
            .iter()
            .find(|h| h.id.get() == Some(&id))
            .map(|h| h.number)
    }

    /// The metadata leader (a host id) as host `i` sees it.
    pub fn try_leader(&self, i: usize) -> Result<Option<u64>, String> {
        let info = self.try_info(i)?;
        let leader = info
            .get("shoal_metadata_leader")
            .ok_or_else(|| format!("host {i}: no shoal_metadata_leader in {info:?}"))?;
        if leader.is_empty() {
            return Ok(None);
        }
        leader
            .parse()
            .map(Some)
            .map_err(|_| format!("host {i}: shoal_metadata_leader {leader:?}"))
    }

    /// Waits until every live host sees `voters` voters in the metadata group, no change of
    /// the voter set in progress, and the same leader; returns the leader's host id and the
    /// time it took. A test that kills a host waits for this first, so that losing one
    /// voter still leaves a majority.
    pub fn wait_voters(&self, voters: usize, timeout: Duration) -> (u64, Duration) {
        self.wait_for(
            &format!("{voters} voters and one leader on every host"),
            timeout,
            |c| {
                let mut seen = std::collections::HashSet::new();
                for i in c.live() {
                    let info = c.try_info(i)?;
                    let count = info["shoal_metadata_voters"]
                        .split(',')
                        .filter(|v| !v.is_empty())
                        .count();
                    if count != voters || info["shoal_metadata_voters_changing"] != "0" {
                        return Err(format!(
                            "host {i} has voters {:?} (changing: {:?})",
                            info["shoal_metadata_voters"], info["shoal_metadata_voters_changing"]
                        ));
                    }
                    seen.insert(info["shoal_metadata_leader"].clone());
                }
                match seen.into_iter().collect::<Vec<_>>().as_slice() {
                    [leader] if !leader.is_empty() => {
                        leader.parse::<u64>().map_err(|e| e.to_string())
                    }
                    other => Err(format!("leaders named: {other:?}")),
                }
            },
        )
    }

    /// Calls `check` every 100 ms until it answers `Ok` (returned with the time it
    /// took), or panics after `timeout` with its last error. The cluster's state and
    /// the logs follow when the cluster is dropped.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Cluster) -> Result<T, String>,
    ) -> (T, Duration) {
        poll_until(what, timeout, POLL_INTERVAL, || check(self))
    }

    /// What every live host agrees on, if they do: each lists the same hosts with the
    /// same addresses and `fail` flags, and each lists itself once (`myself`) at its
    /// current address.
    pub fn try_agreed(&self) -> Result<Vec<Agreed>, String> {
        let mut agreed: Option<(usize, Vec<Agreed>)> = None;
        for i in self.live() {
            let host = self.host(i);
            let lines = self.try_nodes(i)?;
            let mine: Vec<&NodeLine> = lines.iter().filter(|l| l.myself()).collect();
            let [me] = mine.as_slice() else {
                return Err(format!("{} lists itself {} times", host.name(), mine.len()));
            };
            if me.client_addr != host.server.addr().to_string() || me.peer_port != host.peer_port {
                return Err(format!(
                    "{} lists itself at {}@{}, not {}@{}",
                    host.name(),
                    me.client_addr,
                    me.peer_port,
                    host.server.addr(),
                    host.peer_port
                ));
            }
            let mut view: Vec<Agreed> = lines
                .iter()
                .map(|l| Agreed {
                    host_id: l.host_id,
                    client_addr: l.client_addr.clone(),
                    peer_port: l.peer_port,
                    failed: l.failed(),
                })
                .collect();
            view.sort();
            match &agreed {
                None => agreed = Some((i, view)),
                Some((first, first_view)) if *first_view != view => {
                    return Err(format!(
                        "host {first} sees {first_view:?}, host {i} sees {view:?}"
                    ))
                }
                Some(_) => {}
            }
        }
        agreed
            .map(|(_, view)| view)
            .ok_or_else(|| "no host is live".to_string())
    }

    /// Waits until every live host agrees (see [`Cluster::try_agreed`]); returns what
    /// they agree on. Prints the time it took.
    pub fn wait_agreed(&self, timeout: Duration) -> Vec<Agreed> {
        let (agreed, took) =
            self.wait_for("every live host to agree", timeout, Cluster::try_agreed);
        eprintln!("hosts {:?} agree after {took:?}", self.live());
        agreed
    }

    /// Waits until every live host agrees on a list of `n` hosts; returns it.
    pub fn wait_agreed_on(&self, n: usize, timeout: Duration) -> Vec<Agreed> {
        let (agreed, took) = self.wait_for(
            &format!("every live host to agree on {n} hosts"),
            timeout,
            |c| match c.try_agreed()? {
                agreed if agreed.len() == n => Ok(agreed),
                agreed => Err(format!("{} hosts listed: {agreed:?}", agreed.len())),
            },
        );
        eprintln!("hosts {:?} agree on {n} hosts after {took:?}", self.live());
        agreed
    }

    /// Waits until every live host names the same metadata leader, and it is live.
    pub fn wait_leader(&self, timeout: Duration) -> (u64, Duration) {
        self.wait_for("one live metadata leader", timeout, |c| {
            let mut leaders = BTreeSet::new();
            for i in c.live() {
                leaders.insert(c.try_leader(i)?);
            }
            match leaders.into_iter().collect::<Vec<_>>().as_slice() {
                [Some(leader)] => {
                    let mut live = false;
                    for i in c.live() {
                        live |= c.try_host_id(i)? == *leader;
                    }
                    if live {
                        Ok(*leader)
                    } else {
                        Err(format!("the leader {leader} is not a live host"))
                    }
                }
                other => Err(format!("the live hosts name the leaders {other:?}")),
            }
        })
    }

    /// Every host's state and its view of the cluster, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = String::from("==== cluster state ====\n");
        for host in &self.hosts {
            let status = match (host.running(), host.paused) {
                (false, _) => "down",
                (true, true) => "paused",
                (true, false) => "running",
            };
            out.push_str(&format!(
                "-- {} peer {} client {}: {status}\n",
                host.name(),
                host.peer_addr(),
                host.server.addr()
            ));
            if !host.live() {
                continue;
            }
            match self.query(host.number, &["CLUSTER", "NODES"]) {
                Ok(reply) => out.push_str(&resp_text(&reply, "nodes").unwrap_or_default()),
                Err(error) => out.push_str(&format!("CLUSTER NODES: {error}\n")),
            }
            match self.try_info(host.number) {
                Ok(info) => {
                    for key in [
                        "cluster_state",
                        "shoal_phase",
                        "shoal_host_id",
                        "shoal_ni_version",
                        "shoal_metadata_leader",
                        "shoal_metadata_voters",
                    ] {
                        out.push_str(&format!(
                            "{key}:{} ",
                            info.get(key).map_or("?", String::as_str)
                        ));
                    }
                    out.push('\n');
                }
                Err(error) => out.push_str(&format!("CLUSTER INFO: {error}\n")),
            }
        }
        out
    }

    // ------------------------------------------------------------ link faults

    /// Drops every packet between hosts `a` and `b`, both ways, until the fault is dropped.
    pub fn cut_link(&self, a: usize, b: usize) -> LinkFault {
        let (a_ip, b_ip) = (self.host(a).ip, self.host(b).ip);
        LinkFault::inject(
            format!("link {a_ip} <-> {b_ip} cut"),
            link_matches(&a_ip.to_string(), &b_ip.to_string()),
            None,
        )
    }

    /// Drops every packet between host `a` and the rest of the cluster.
    pub fn isolate(&self, a: usize) -> LinkFault {
        let ip = self.host(a).ip;
        LinkFault::inject(
            format!("host {ip} isolated"),
            link_matches(&ip.to_string(), &self.subnet_cidr()),
            None,
        )
    }

    /// Loses and delays packets between hosts `a` and `b`, both ways.
    pub fn impair_link(&self, a: usize, b: usize, impairment: Impairment) -> LinkFault {
        let (a_ip, b_ip) = (self.host(a).ip, self.host(b).ip);
        LinkFault::inject(
            format!("link {a_ip} <-> {b_ip}: {impairment}"),
            link_matches(&a_ip.to_string(), &b_ip.to_string()),
            Some(impairment),
        )
    }

    /// Loses and delays every packet between host `a` and the rest of the cluster.
    pub fn impair_host(&self, a: usize, impairment: Impairment) -> LinkFault {
        let ip = self.host(a).ip;
        LinkFault::inject(
            format!("host {ip}: {impairment}"),
            link_matches(&ip.to_string(), &self.subnet_cidr()),
            Some(impairment),
        )
    }

    fn subnet_cidr(&self) -> String {
        format!("127.0.{}.0/24", self.subnet)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // On a failure: every host's view, then (as each `Server` drops) its log.
        if std::thread::panicking() {
            eprintln!("{}", self.describe());
        }
        // A stopped tree cannot answer `shoal status`, which killing it asks first.
        for host in &mut self.hosts {
            if host.paused && host.running() {
                signal(-host.server.pid(), libc::SIGCONT);
                host.paused = false;
            }
        }
    }
}

/// The (source, destination) pairs of both directions between `a` and `b`.
fn link_matches(a: &str, b: &str) -> Vec<(String, String)> {
    vec![
        (a.to_string(), b.to_string()),
        (b.to_string(), a.to_string()),
    ]
}

/// What a degraded link does to each packet: drop it with probability `loss`, else
/// deliver it after `delay` ± `jitter` (uniform; packets may overtake each other).
#[derive(Clone, Copy, Debug)]
pub struct Impairment {
    pub loss: f64,
    pub delay: Duration,
    pub jitter: Duration,
}

impl std::fmt::Display for Impairment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0}% loss, {} ± {} ms delay",
            self.loss * 100.0,
            self.delay.as_millis(),
            self.jitter.as_millis()
        )
    }
}

/// Packet counts of a fault's chain.
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultCounters {
    /// Packets dropped (all of them for a cut).
    pub dropped: u64,
    /// Packets let through (after their delay, if any).
    pub passed: u64,
}

/// Fault chains created by this process so far.
static FAULTS: AtomicU32 = AtomicU32::new(0);

/// Runs iptables (waiting for the xtables lock); the output, or why it failed.
fn iptables(args: &[&str]) -> Result<String, String> {
    let output = Command::new(iptables_path())
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| {
            format!(
                "cannot run {IPTABLES} ({e}); install the Debian package iptables (.ci/run does)"
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "{IPTABLES} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The pid in a chain name `shoal-<pid>-<n>`.
fn chain_pid(chain: &str) -> Option<i32> {
    chain
        .strip_prefix("shoal-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Removes the rules and chains of test processes that died without removing them.
fn remove_stale_rules() {
    let Ok(rules) = iptables(&["-S"]) else { return };
    let stale = |chain: &str| chain_pid(chain).is_some_and(|pid| !process_alive(pid));
    for line in rules.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["-A", "OUTPUT", spec @ .., "-j", chain] = words.as_slice() {
            if stale(chain) {
                let mut args = vec!["-D", "OUTPUT"];
                args.extend_from_slice(spec);
                args.extend(["-j", chain]);
                let _ = iptables(&args);
            }
        }
    }
    for line in rules.lines() {
        if let Some(chain) = line.strip_prefix("-N ") {
            if stale(chain) {
                eprintln!("removing the stale link-fault chain {chain}");
                let _ = iptables(&["-F", chain]);
                let _ = iptables(&["-X", chain]);
            }
        }
    }
}

/// Packet loss or a cut on some links, in force until dropped.
pub struct LinkFault {
    what: String,
    chain: String,
    /// The rules in OUTPUT that send the matched packets to `chain`.
    jumps: Vec<Vec<String>>,
    delayer: Option<Delayer>,
}

impl LinkFault {
    /// Sends the packets from `src` to `dst` of each pair (IPs or CIDRs) to a new chain
    /// that drops them all (`impairment` None) or impairs them.
    fn inject(
        what: String,
        matches: Vec<(String, String)>,
        impairment: Option<Impairment>,
    ) -> LinkFault {
        static CLEANED: Once = Once::new();
        CLEANED.call_once(remove_stale_rules);
        let chain = format!(
            "shoal-{}-{}",
            std::process::id(),
            FAULTS.fetch_add(1, Ordering::Relaxed)
        );
        let mut fault = LinkFault {
            what,
            chain: chain.clone(),
            jumps: Vec::new(),
            delayer: None,
        };
        let must = |args: &[&str]| iptables(args).unwrap_or_else(|e| panic!("{e}"));
        must(&["-N", &chain]);
        match impairment {
            None => {
                must(&["-A", &chain, "-j", "DROP"]);
            }
            Some(impairment) => {
                if impairment.loss > 0.0 {
                    let probability = format!("{:.4}", impairment.loss);
                    must(&[
                        "-A",
                        &chain,
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &probability,
                        "-j",
                        "DROP",
                    ]);
                }
                if impairment.delay.is_zero() && impairment.jitter.is_zero() {
                    must(&["-A", &chain, "-j", "ACCEPT"]);
                } else {
                    let delayer = Delayer::start(impairment);
                    let queue = delayer.queue_num.to_string();
                    must(&[
                        "-A",
                        &chain,
                        "-j",
                        "NFQUEUE",
                        "--queue-num",
                        &queue,
                        "--queue-bypass",
                    ]);
                    fault.delayer = Some(delayer);
                }
            }
        }
        for (src, dst) in matches {
            let spec: Vec<String> = ["-s", &src, "-d", &dst, "-j", &chain]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let mut args = vec!["-I", "OUTPUT"];
            args.extend(spec.iter().map(String::as_str));
            must(&args);
            fault.jumps.push(spec);
        }
        eprintln!("link fault on: {}", fault.what);
        fault
    }

    /// The packets the fault dropped and let through so far (iptables counters).
    pub fn counters(&self) -> FaultCounters {
        let listing =
            iptables(&["-L", &self.chain, "-v", "-x", "-n"]).unwrap_or_else(|e| panic!("{e}"));
        let mut counters = FaultCounters::default();
        // Two header lines, then: pkts bytes target prot opt in out source destination ...
        for line in listing.lines().skip(2) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let (Some(packets), Some(target)) = (words.first(), words.get(2)) else {
                continue;
            };
            let packets: u64 = packets.parse().unwrap_or(0);
            match *target {
                "DROP" => counters.dropped += packets,
                _ => counters.passed += packets,
            }
        }
        counters
    }

    /// Packets the delay thread held and released so far.
    pub fn delayed_packets(&self) -> u64 {
        self.delayer
            .as_ref()
            .map_or(0, |d| d.released.load(Ordering::Relaxed))
    }

    /// Ends the fault (the same as dropping it).
    pub fn heal(self) {}
}

impl Drop for LinkFault {
    fn drop(&mut self) {
        for spec in &self.jumps {
            let mut args = vec!["-D", "OUTPUT"];
            args.extend(spec.iter().map(String::as_str));
            if let Err(error) = iptables(&args) {
                eprintln!("removing a link fault: {error}");
            }
        }
        // No packet reaches the queue now; release those it holds.
        drop(self.delayer.take());
        for args in [["-F", &self.chain], ["-X", &self.chain]] {
            if let Err(error) = iptables(&args) {
                eprintln!("removing a link fault: {error}");
            }
        }
        eprintln!("link fault off: {}", self.what);
    }
}

/// NFQUEUE numbers tried by this process so far.
static QUEUES: AtomicU32 = AtomicU32::new(0);

/// A thread that takes the packets of one NFQUEUE and accepts each after its delay.
struct Delayer {
    queue_num: u16,
    stop: Arc<AtomicBool>,
    released: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Delayer {
    fn start(impairment: Impairment) -> Delayer {
        let mut queue = nfq::Queue::open()
            .unwrap_or_else(|e| panic!("open an NFQUEUE socket (needs root): {e}"));
        // Queue numbers are machine-wide: start from the pid and skip the taken ones.
        let base = 20_000 + std::process::id() % 4096 * 8;
        let queue_num = loop {
            let tried = QUEUES.fetch_add(1, Ordering::Relaxed);
            assert!(tried < 512, "no free NFQUEUE number");
            let num = (base + tried % 4096) as u16;
            if queue.bind(num).is_ok() {
                break num;
            }
        };
        // Metadata only: the verdict needs the packet id, not the bytes.
        queue
            .set_copy_range(queue_num, 0)
            .unwrap_or_else(|e| panic!("NFQUEUE {queue_num}: set the copy range: {e}"));
        queue
            .set_queue_max_len(queue_num, 8192)
            .unwrap_or_else(|e| panic!("NFQUEUE {queue_num}: set the length: {e}"));
        queue.set_nonblocking(true);
        let stop = Arc::new(AtomicBool::new(false));
        let released = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, released) = (Arc::clone(&stop), Arc::clone(&released));
            let mut rng = Rng::new(u64::from(queue_num) ^ 0x5eed);
            std::thread::Builder::new()
                .name(format!("nfqueue-{queue_num}"))
                .spawn(move || {
                    let low = impairment.delay.saturating_sub(impairment.jitter);
                    let high = impairment.delay + impairment.jitter;
                    let mut held: Vec<(Instant, nfq::Message)> = Vec::new();
                    loop {
                        let stopping = stop.load(Ordering::Acquire);
                        loop {
                            match queue.recv() {
                                Ok(message) => {
                                    let delay = rng.duration_between(low, high);
                                    held.push((Instant::now() + delay, message));
                                }
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                                Err(e) => {
                                    eprintln!("NFQUEUE {queue_num}: {e}");
                                    break;
                                }
                            }
                        }
                        let now = Instant::now();
                        let mut index = 0;
                        while index < held.len() {
                            if stopping || held[index].0 <= now {
                                let (_, mut message) = held.swap_remove(index);
                                message.set_verdict(nfq::Verdict::Accept);
                                if let Err(e) = queue.verdict(message) {
                                    eprintln!("NFQUEUE {queue_num}: verdict: {e}");
                                }
                                released.fetch_add(1, Ordering::Relaxed);
                            } else {
                                index += 1;
                            }
                        }
                        if stopping {
                            break;
                        }
                        // The delayer's tick: held packets are released at 1 ms resolution.
                        sleep(Duration::from_millis(1));
                    }
                    let _ = queue.unbind(queue_num);
                })
                .expect("spawn the NFQUEUE thread")
        };
        Delayer {
            queue_num,
            stop,
            released,
            thread: Some(thread),
        }
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
