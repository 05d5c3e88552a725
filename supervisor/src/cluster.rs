//! `shoal cluster status [--json]`: the cluster as the running host sees it, and
//! `shoal leave`: the running host hands its partitions off and leaves.
//!
//! Both talk to the server over the admin connection: status asks for
//! `CLUSTER INFO` and `SHOAL.HOSTS` and prints a summary and one line per host,
//! or the same as JSON; leave sends `CLUSTER LEAVE` and follows `CLUSTER INFO`
//! until the cluster has removed the host, printing what is left to hand off.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Map, Value as Json};
use shoal_shared::config::Config;

use crate::admin::{Connection, Value};

/// Fields of `SHOAL.HOSTS` that hold doubles (bulk strings in RESP2).
const DOUBLE_FIELDS: &[&str] = &["score", "coordinate", "load"];

/// Longest `shoal leave` follows a handoff that makes no progress.
const LEAVE_STALL_TIMEOUT: Duration = Duration::from_secs(600);

/// `CLUSTER INFO` of the host, as a map of its fields.
fn cluster_info(connection: &mut Connection) -> anyhow::Result<Map<String, Json>> {
    let info = match connection.command(&[b"CLUSTER", b"INFO"])? {
        Value::Bulk(Some(text)) => String::from_utf8_lossy(&text).into_owned(),
        Value::Error(error) => bail!("{error}"),
        other => bail!("unexpected answer to CLUSTER INFO: {}", other.describe()),
    };
    Ok(info
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.to_string(), Json::String(value.trim().to_string())))
        .collect())
}

/// Runs `shoal leave`: the host hands every partition to the others, then the cluster
/// removes it. Prints the partitions left as they go.
pub fn leave(config: &Config) -> anyhow::Result<()> {
    let mut connection = Connection::open(config)?;
    match connection.command(&[b"CLUSTER", b"LEAVE"])? {
        Value::Simple(_) => {}
        Value::Error(error) => bail!("{error}"),
        other => bail!("unexpected answer to CLUSTER LEAVE: {}", other.describe()),
    }
    let started = Instant::now();
    let mut progress_at = Instant::now();
    let mut last_owned = None;
    loop {
        let info = cluster_info(&mut connection)?;
        let owned: u64 = info
            .get("shoal_partitions_owned")
            .and_then(Json::as_str)
            .and_then(|v| v.parse().ok())
            .context("CLUSTER INFO has no shoal_partitions_owned")?;
        let listed = match connection.command(&[b"CLUSTER", b"NODES"])? {
            Value::Bulk(Some(text)) => String::from_utf8_lossy(&text).contains("myself"),
            Value::Error(error) => bail!("{error}"),
            other => bail!("unexpected answer to CLUSTER NODES: {}", other.describe()),
        };
        if owned == 0 && !listed {
            println!(
                "left the cluster after {:.1} s; the other hosts hold all its data. Stop this \
                 host's service now.",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if last_owned != Some(owned) {
            println!(
                "{owned} partitions left to hand off ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
            last_owned = Some(owned);
            progress_at = Instant::now();
        }
        if progress_at.elapsed() > LEAVE_STALL_TIMEOUT {
            bail!(
                "no progress for {} s with {owned} partitions left; the leave goes on in the \
                 background (see the server's log and `shoal cluster status`)",
                LEAVE_STALL_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Runs `shoal cluster status`.
pub fn status(config: &Config, as_json: bool) -> anyhow::Result<()> {
    let mut connection = Connection::open(config)?;
    let info = cluster_info(&mut connection)?;
    let hosts = match connection.command(&[b"SHOAL.HOSTS"])? {
        Value::Array(Some(hosts)) => hosts
            .iter()
            .map(host_json)
            .collect::<anyhow::Result<Vec<Json>>>()?,
        Value::Error(error) => bail!("{error}"),
        other => bail!("unexpected answer to SHOAL.HOSTS: {}", other.describe()),
    };
    if as_json {
        let document = json!({ "info": info, "hosts": hosts });
        println!("{}", serde_json::to_string_pretty(&document)?);
        return Ok(());
    }
    let field = |key: &str| info.get(key).and_then(Json::as_str).unwrap_or("");
    println!(
        "cluster {} ({}): {} hosts, NI version {} (checksum {}), metadata leader {}, voters {}",
        field("shoal_cluster_id"),
        field("cluster_state"),
        field("cluster_known_nodes"),
        field("shoal_ni_version"),
        field("shoal_ni_checksum"),
        field("shoal_metadata_leader"),
        field("shoal_metadata_voters"),
    );
    println!(
        "this host: {} ({})",
        field("shoal_host_id"),
        field("shoal_phase")
    );
    println!(
        "{:>5}  {:<9} {:<22} {:<22} {:<6} {:>6} {:>9}",
        "HOST", "STATE", "PEER ADDRESS", "CLIENT ADDRESS", "VOTER", "SCORE", "RTT"
    );
    for host in &hosts {
        let text = |key: &str| {
            host.get(key).map_or(String::new(), |v| match v {
                Json::String(s) => s.clone(),
                other => other.to_string(),
            })
        };
        let rtt = match host.get("rtt_us").and_then(Json::as_i64) {
            Some(us) if us >= 0 => format!("{:.2} ms", us as f64 / 1000.0),
            _ => "-".into(),
        };
        let mut id = text("id");
        if host.get("myself").and_then(Json::as_i64) == Some(1) {
            id.push('*');
        }
        if host.get("leader").and_then(Json::as_i64) == Some(1) {
            id.push('L');
        }
        println!(
            "{:>5}  {:<9} {:<22} {:<22} {:<6} {:>6.2} {:>9}",
            id,
            text("state"),
            text("peer_addr"),
            text("client_addr"),
            if host.get("voter").and_then(Json::as_i64) == Some(1) {
                "yes"
            } else {
                "no"
            },
            host.get("score").and_then(Json::as_f64).unwrap_or(0.0),
            rtt,
        );
    }
    println!("(* this host, L the metadata leader; score and RTT as this host measures them)");
    Ok(())
}

/// One host of `SHOAL.HOSTS` (a flat array of field, value pairs in RESP2) as a JSON object.
fn host_json(value: &Value) -> anyhow::Result<Json> {
    let Value::Array(Some(items)) = value else {
        bail!("a host entry is {}, not an array", value.describe());
    };
    let mut object = Map::new();
    for pair in items.chunks(2) {
        let [Value::Bulk(Some(key)), value] = pair else {
            bail!("a host entry is not a list of field, value pairs");
        };
        let key = String::from_utf8_lossy(key).into_owned();
        let doubles = DOUBLE_FIELDS.contains(&key.as_str());
        object.insert(
            key,
            to_json(value, doubles).context("decoding a host entry")?,
        );
    }
    Ok(Json::Object(object))
}

fn to_json(value: &Value, doubles: bool) -> anyhow::Result<Json> {
    Ok(match value {
        Value::Integer(n) => json!(n),
        Value::Bulk(Some(bytes)) => {
            let text = String::from_utf8_lossy(bytes).into_owned();
            match (doubles, text.parse::<f64>()) {
                (true, Ok(number)) => json!(number),
                _ => Json::String(text),
            }
        }
        Value::Simple(text) => Json::String(text.clone()),
        Value::Bulk(None) | Value::Array(None) => Json::Null,
        Value::Array(Some(items)) => Json::Array(
            items
                .iter()
                .map(|item| to_json(item, doubles))
                .collect::<anyhow::Result<_>>()?,
        ),
        Value::Error(error) => bail!("{error}"),
    })
}
