//! Pub/sub commands: SUBSCRIBE, UNSUBSCRIBE, PSUBSCRIBE, PUNSUBSCRIBE, SSUBSCRIBE,
//! SUNSUBSCRIBE, PUBLISH, SPUBLISH and PUBSUB, over this host's [`Broker`].
//!
//! In a cluster, PUBLISH delivers to this host's subscribers and sends the message to
//! every other active host that this host does not suspect, which delivers it to its
//! own; it answers once they have (or after 1 s), with the total count. It is a barrier, so a connection's messages reach every host
//! in the order it published them. PUBSUB answers for this host only, as Redis
//! Cluster's nodes do.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shoal_cluster::messages::{DataRequest, PeerRequest, PeerResponse};
use shoal_cluster::ni::HostState;
use shoal_shared::frame::WorkerResponse;
use shoal_shared::resp::Reply;

use super::{Pending, Session};
use crate::errors;
use crate::pubsub::Kind;
use crate::state::Shared;

/// How long PUBLISH waits for another host to deliver a message.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs `name` if it is a pub/sub command; `None` otherwise. Arity is already checked.
pub fn dispatch(
    shared: &Arc<Shared>,
    session: &mut Session,
    name: &str,
    args: &[Bytes],
) -> Option<Pending> {
    let reply = match name {
        "subscribe" | "psubscribe" | "ssubscribe" | "unsubscribe" | "punsubscribe"
        | "sunsubscribe" => {
            let kind = kind_of(name);
            let subscriber = session
                .subscriber
                .get_or_insert_with(|| shared.pubsub.subscriber());
            Reply::Sequence(match name.contains("unsubscribe") {
                true => subscriber.unsubscribe(kind, args[1..].to_vec()),
                false => args[1..]
                    .iter()
                    .map(|name| subscriber.subscribe(kind, name.clone()))
                    .collect(),
            })
        }
        "publish" | "spublish" => {
            let (channel, message) = (args[1].clone(), args[2].clone());
            let shared = Arc::clone(shared);
            let shard = name == "spublish";
            return Some(Pending::barrier(async move {
                let received = publish(&shared, channel, message, shard).await;
                Reply::Integer(received as i64)
            }));
        }
        "pubsub" => pubsub(shared, &args[1..]),
        _ => return None,
    };
    Some(Pending::Ready(reply))
}

/// What a (un)subscribe command is about: PSUBSCRIBE and PUNSUBSCRIBE patterns,
/// SSUBSCRIBE and SUNSUBSCRIBE shard channels, the others channels.
fn kind_of(name: &str) -> Kind {
    match name {
        "psubscribe" | "punsubscribe" => Kind::Pattern,
        "ssubscribe" | "sunsubscribe" => Kind::Shard,
        _ => Kind::Channel,
    }
}

/// Delivers a message here and on every other active host of the cluster; answers how
/// many subscribers received it.
async fn publish(shared: &Shared, channel: Bytes, message: Bytes, shard: bool) -> usize {
    let mut received = shared.pubsub.publish(&channel, &message, shard);
    let Some(node) = &shared.cluster else {
        return received;
    };
    let me = node.host_id();
    let ni = node.ni();
    // Hosts this one suspects are left out: each would cost every PUBLISH the timeout.
    let views = node.peer_views();
    let suspected = |host: u64| {
        views
            .get(&host)
            .and_then(|view| view.score.as_ref())
            .is_some_and(|score| score.suspect)
    };
    let hosts: Vec<u64> = ni
        .hosts
        .values()
        .filter(|host| Some(host.id) != me && host.state != HostState::Inactive)
        .filter(|host| !suspected(host.id))
        .map(|host| host.id)
        .collect();
    let calls = hosts.into_iter().map(|host| {
        let request = PeerRequest::Data(DataRequest::Publish {
            channel: channel.to_vec(),
            message: message.to_vec(),
            shard,
        });
        let node = Arc::clone(node);
        async move { node.call_host(host, request, FORWARD_TIMEOUT).await }
    });
    for answer in futures_join_all(calls).await {
        match answer {
            Ok(PeerResponse::Worker(WorkerResponse::Integer(n))) => received += n.max(0) as usize,
            other => tracing::debug!(?other, "a published message did not reach a host"),
        }
    }
    received
}

/// Runs the futures at once and answers their outputs in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        if let Ok(output) = handle.await {
            outputs.push(output);
        }
    }
    outputs
}

/// `PUBSUB CHANNELS [pattern] | NUMSUB [channel ...] | NUMPAT | SHARDCHANNELS [pattern]
/// | SHARDNUMSUB [channel ...]`, for this host's subscribers.
fn pubsub(shared: &Shared, args: &[Bytes]) -> Reply {
    let broker = &shared.pubsub;
    let names = |kind| match args {
        [_] => Reply::Array(
            broker
                .names(kind, None)
                .into_iter()
                .map(Reply::Bulk)
                .collect(),
        ),
        [_, pattern] => Reply::Array(
            broker
                .names(kind, Some(pattern))
                .into_iter()
                .map(Reply::Bulk)
                .collect(),
        ),
        _ => errors::wrong_arity("pubsub"),
    };
    let counts = |kind| {
        Reply::Map(
            args[1..]
                .iter()
                .map(|name| {
                    (
                        Reply::Bulk(name.clone()),
                        Reply::Integer(broker.count(kind, name) as i64),
                    )
                })
                .collect(),
        )
    };
    match args[0].to_ascii_uppercase().as_slice() {
        b"CHANNELS" => names(Kind::Channel),
        b"SHARDCHANNELS" => names(Kind::Shard),
        b"NUMSUB" => counts(Kind::Channel),
        b"SHARDNUMSUB" => counts(Kind::Shard),
        b"NUMPAT" if args.len() == 1 => {
            Reply::Integer(broker.names(Kind::Pattern, None).len() as i64)
        }
        b"NUMPAT" => errors::wrong_arity("pubsub|numpat"),
        _ => Reply::error(format!(
            "ERR unknown subcommand '{}'. Try PUBSUB HELP.",
            String::from_utf8_lossy(&args[0])
        )),
    }
}
