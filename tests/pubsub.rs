//! Pub/sub through real `shoal serve` processes: channels, patterns and shard channels
//! on one host, with raw RESP2 and RESP3 connections and the `redis` crate; the
//! subscribed-mode rules; a subscriber that does not read is cut off; and on a 3-host
//! cluster, every message published through one host reaches the subscribers of every
//! host exactly once, in the order it was published.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{RawConn, Resp, Server};

fn bulk(text: &str) -> Resp {
    Resp::Bulk(text.as_bytes().to_vec())
}

/// A message as RESP2 sends it: an array of bulk strings.
fn message(parts: &[&str]) -> Resp {
    Resp::Array(parts.iter().map(|part| bulk(part)).collect())
}

/// A pub/sub confirmation as RESP2 sends it: bulk strings, the count an integer.
fn event(parts: &[&str]) -> Resp {
    Resp::Array(
        parts
            .iter()
            .map(|part| match part.parse::<i64>() {
                Ok(n) => Resp::Int(n),
                Err(_) => bulk(part),
            })
            .collect(),
    )
}

#[test]
fn channels_patterns_and_shard_channels_on_one_host() {
    let server = Server::start("");
    let mut sub = server.raw();
    assert_eq!(
        sub.cmd(&["SUBSCRIBE", "news", "sport"]),
        event(&["subscribe", "news", "1"])
    );
    assert_eq!(
        sub.read_reply().unwrap(),
        event(&["subscribe", "sport", "2"])
    );
    assert_eq!(
        sub.cmd(&["PSUBSCRIBE", "n*"]),
        event(&["psubscribe", "n*", "3"])
    );
    assert_eq!(
        sub.cmd(&["SSUBSCRIBE", "orders"]),
        event(&["ssubscribe", "orders", "1"])
    );
    // Subscribed, a RESP2 connection takes pub/sub commands, PING, QUIT and RESET only.
    assert_eq!(
        sub.cmd(&["GET", "k"]),
        Resp::Error(
            "ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
                .into()
        )
    );
    assert_eq!(sub.cmd(&["PING"]), message(&["pong", ""]));

    let mut publisher = server.raw();
    // The channel's subscriber and the pattern's: the same connection, twice.
    assert_eq!(publisher.cmd(&["PUBLISH", "news", "hello"]), Resp::Int(2));
    assert_eq!(
        sub.read_reply().unwrap(),
        message(&["message", "news", "hello"])
    );
    assert_eq!(
        sub.read_reply().unwrap(),
        message(&["pmessage", "n*", "news", "hello"])
    );
    assert_eq!(publisher.cmd(&["PUBLISH", "nobody", "x"]), Resp::Int(1));
    assert_eq!(
        sub.read_reply().unwrap(),
        message(&["pmessage", "n*", "nobody", "x"])
    );
    assert_eq!(publisher.cmd(&["SPUBLISH", "orders", "o1"]), Resp::Int(1));
    assert_eq!(
        sub.read_reply().unwrap(),
        message(&["smessage", "orders", "o1"])
    );
    assert_eq!(publisher.cmd(&["PUBLISH", "orders", "o2"]), Resp::Int(0));

    // PUBSUB answers for this host.
    assert_eq!(
        publisher.cmd(&["PUBSUB", "CHANNELS"]),
        Resp::Array(vec![bulk("news"), bulk("sport")])
    );
    assert_eq!(
        publisher.cmd(&["PUBSUB", "CHANNELS", "s*"]),
        Resp::Array(vec![bulk("sport")])
    );
    assert_eq!(
        publisher.cmd(&["PUBSUB", "NUMSUB", "news", "none"]),
        Resp::Array(vec![bulk("news"), Resp::Int(1), bulk("none"), Resp::Int(0)])
    );
    assert_eq!(publisher.cmd(&["PUBSUB", "NUMPAT"]), Resp::Int(1));
    assert_eq!(
        publisher.cmd(&["PUBSUB", "SHARDCHANNELS"]),
        Resp::Array(vec![bulk("orders")])
    );

    // Unsubscribing from all answers one confirmation per channel; with none left, the
    // connection takes any command again.
    sub.send(&common::encode_command(&[b"UNSUBSCRIBE"]));
    let mut left = vec![sub.read_reply().unwrap(), sub.read_reply().unwrap()];
    left.sort_by_key(|reply| format!("{reply:?}"));
    assert_eq!(
        left,
        vec![
            event(&["unsubscribe", "news", "2"]),
            event(&["unsubscribe", "sport", "1"])
        ]
    );
    assert_eq!(
        sub.cmd(&["PUNSUBSCRIBE"]),
        event(&["punsubscribe", "n*", "0"])
    );
    assert_eq!(
        sub.cmd(&["SUNSUBSCRIBE", "orders"]),
        event(&["sunsubscribe", "orders", "0"])
    );
    assert_eq!(
        sub.cmd(&["UNSUBSCRIBE"]),
        Resp::Array(vec![bulk("unsubscribe"), Resp::NilBulk, Resp::Int(0)])
    );
    assert_eq!(sub.cmd(&["GET", "k"]), Resp::NilBulk);
    assert_eq!(publisher.cmd(&["PUBLISH", "news", "late"]), Resp::Int(0));
}

#[test]
fn messages_queued_before_an_unsubscribe_come_before_its_confirmation() {
    let server = Server::start("");
    let mut sub = server.raw();
    assert_eq!(
        sub.cmd(&["SUBSCRIBE", "a"]),
        event(&["subscribe", "a", "1"])
    );
    let mut publisher = server.raw();
    for n in 0..50 {
        assert_eq!(
            publisher.cmd(&["PUBLISH", "a", &n.to_string()]),
            Resp::Int(1)
        );
    }
    // UNSUBSCRIBE and a GET in one write: every message, then the confirmation, then
    // the GET's reply, which must not be taken for a message.
    let mut pipeline = common::encode_command(&[b"UNSUBSCRIBE"]);
    pipeline.extend(common::encode_command(&[b"GET", b"k"]));
    sub.send(&pipeline);
    for n in 0..50 {
        assert_eq!(
            sub.read_reply().unwrap(),
            message(&["message", "a", &n.to_string()])
        );
    }
    assert_eq!(sub.read_reply().unwrap(), event(&["unsubscribe", "a", "0"]));
    assert_eq!(sub.read_reply().unwrap(), Resp::NilBulk);
    // CLIENT KILL TYPE pubsub closes subscribers only.
    let mut other = server.raw();
    assert_eq!(
        other.cmd(&["SUBSCRIBE", "b"]),
        event(&["subscribe", "b", "1"])
    );
    assert_eq!(
        publisher.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]),
        Resp::Int(1)
    );
    assert!(other.read_reply().is_err(), "the subscriber was closed");
    assert_eq!(sub.cmd(&["PING"]), Resp::Simple("PONG".into()));
}

#[test]
fn resp3_subscribers_get_pushes_and_may_run_any_command() {
    let server = Server::start("");
    let mut sub = server.raw();
    assert!(matches!(sub.cmd(&["HELLO", "3"]), Resp::Map(_)));
    assert_eq!(
        sub.cmd(&["SUBSCRIBE", "c"]),
        Resp::Push(vec![bulk("subscribe"), bulk("c"), Resp::Int(1)])
    );
    // RESP3 has no subscribed mode: a GET is answered between the messages.
    assert_eq!(sub.cmd(&["GET", "k"]), Resp::Null);
    let mut publisher = server.raw();
    assert_eq!(publisher.cmd(&["PUBLISH", "c", "m"]), Resp::Int(1));
    assert_eq!(
        sub.read_reply().unwrap(),
        Resp::Push(vec![bulk("message"), bulk("c"), bulk("m")])
    );
    // RESET leaves every channel and returns to RESP2.
    assert_eq!(sub.cmd(&["RESET"]), Resp::Simple("RESET".into()));
    assert_eq!(publisher.cmd(&["PUBLISH", "c", "m"]), Resp::Int(0));
    assert_eq!(sub.cmd(&["GET", "k"]), Resp::NilBulk);
}

#[test]
fn a_subscriber_that_does_not_read_is_cut_off() {
    let server =
        Server::start("[client]\nmax_value_bytes = 65536\nmax_output_buffer_bytes = 1048576\n");
    let mut sub = server.raw();
    assert_eq!(
        sub.cmd(&["SUBSCRIBE", "flood"]),
        event(&["subscribe", "flood", "1"])
    );
    // The subscriber reads nothing more; 16 MiB of messages go to it.
    let payload = "x".repeat(64 * 1024);
    let mut publisher = server.raw();
    for _ in 0..256 {
        if publisher.cmd(&["PUBLISH", "flood", &payload]) == Resp::Int(0) {
            break;
        }
    }
    // It is no longer subscribed, and the net-daemon logged why.
    let (_, took) = common::poll_until(
        "the slow subscriber to be dropped",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || match publisher.cmd(&["PUBSUB", "NUMSUB", "flood"]) {
            Resp::Array(items) if items.get(1) == Some(&Resp::Int(0)) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    println!("the slow subscriber was dropped {took:?} after the flood");
    assert!(server
        .logs()
        .contains("subscriber does not read its messages fast enough"));
    // Others are served as before.
    assert_eq!(publisher.cmd(&["PING"]), Resp::Simple("PONG".into()));
}

#[test]
fn messages_reach_every_hosts_subscribers_once_and_in_order() {
    let cluster = Cluster::start(3, "[cluster]\nreplicas = 1\n");
    cluster.wait_voters(3, Duration::from_secs(60));
    let mut subscribers: Vec<RawConn> = (1..=3)
        .map(|host| {
            let mut sub = RawConn::tcp_to(cluster.host(host).server.addr());
            assert_eq!(
                sub.cmd(&["SUBSCRIBE", "feed"]),
                event(&["subscribe", "feed", "1"])
            );
            sub
        })
        .collect();
    let mut publisher = RawConn::tcp_to(cluster.host(1).server.addr());
    let started = Instant::now();
    const MESSAGES: usize = 200;
    for n in 0..MESSAGES {
        assert_eq!(
            publisher.cmd(&["PUBLISH", "feed", &n.to_string()]),
            Resp::Int(3),
            "message {n} reached every host's subscriber"
        );
    }
    for (host, sub) in subscribers.iter_mut().enumerate() {
        for n in 0..MESSAGES {
            assert_eq!(
                sub.read_reply().unwrap(),
                message(&["message", "feed", &n.to_string()]),
                "host {}",
                host + 1
            );
        }
    }
    println!(
        "{MESSAGES} messages through host 1 reached the subscribers of 3 hosts in {:?}",
        started.elapsed()
    );
    // Nothing more than once: a PING comes back next on each.
    for sub in &mut subscribers {
        assert_eq!(sub.cmd(&["PING"]), message(&["pong", ""]));
    }
}
