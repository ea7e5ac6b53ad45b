//! Redis's change stream for the near tier: `CLIENT TRACKING ON BCAST` on RESP3 connections of
//! their own (one per primary on a cluster), with a heartbeat that proves the stream is in sync.
//!
//! Broadcast mode, rather than tracking the keys each read touched, because the keys followed
//! (generations, custom entries) are few, read by every process and changed by every write:
//! broadcast needs no per-read registration on the data connections (whose replies then carry
//! no ordering promise with the pushes), and it reports changes made by any client, expiries
//! and evictions, which are all that can make a known generation wrong.

use super::{ChangeListener, FollowChanges};
use deadpool_redis::redis::{
    self, aio::MultiplexedConnection, AsyncConnectionConfig, ConnectionAddr, ConnectionInfo,
    PushInfo, PushKind, Value,
};
use std::time::{Duration, Instant};

/// Where the change stream connects: one server, or any nodes of a cluster (the primaries are
/// asked of them).
#[derive(Clone)]
// One value per change stream, built once: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Targets {
    Single(ConnectionInfo),
    Cluster(Vec<ConnectionInfo>),
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Follows changes until the listener closes. Each session connects, turns tracking on,
/// flushes the listener, then beats; any failure reports the stream lost and starts over.
pub(crate) async fn follow(targets: Targets, follow: FollowChanges) {
    let listener = follow.listener.clone();
    let mut down_since: Option<Instant> = None;
    let mut pause = Duration::from_millis(10);
    loop {
        if listener.is_closed() {
            return;
        }
        let outcome = session(&targets, &follow, &mut down_since).await;
        listener.lost();
        if listener.is_closed() {
            return;
        }
        if let Err(error) = outcome {
            if down_since.is_none() {
                tracing::warn!(
                    error = %error,
                    "diesel-memclone: the near cache lost Redis's invalidation stream; \
                     reads go to Redis until it is back"
                );
                down_since = Some(Instant::now());
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

async fn session(
    targets: &Targets,
    follow: &FollowChanges,
    down_since: &mut Option<Instant>,
) -> Result<(), Failure> {
    let listener = &follow.listener;
    // A heartbeat that takes this long means the stream hangs: start over. Near reads stopped
    // long before, at `max_lag`.
    let patience = (follow.heartbeat * 16).max(Duration::from_secs(1));
    let (nodes, topology) = match targets {
        Targets::Single(info) => (vec![info.clone()], None),
        Targets::Cluster(seeds) => {
            let (nodes, topology) = primaries(seeds, patience).await?;
            (nodes, Some(topology))
        }
    };
    let mut connections = Vec::with_capacity(nodes.len());
    for node in &nodes {
        connections.push(open(node, follow, patience).await?);
    }
    // Tracking is on everywhere: from here every change is reported, so what was learnt before
    // (perhaps while no stream listened) is dropped.
    listener.flush();
    if down_since.take().is_some() {
        tracing::info!("diesel-memclone: the near cache follows Redis's invalidations again");
    }
    loop {
        let sent = Instant::now();
        let beats = futures_util::future::try_join_all(connections.iter().map(|conn| {
            let mut conn = conn.clone();
            async move { redis::cmd("PING").query_async::<Value>(&mut conn).await }
        }));
        match tokio::time::timeout(patience, beats).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(error.into()),
            Err(_) => return Err("heartbeat timed out".into()),
        }
        if let (Some(topology), Some(first)) = (&topology, connections.first()) {
            // A failover or resharding moves slots: the primaries followed may no longer be the
            // ones written to.
            let mut conn = first.clone();
            let mut slots = redis::cmd("CLUSTER");
            slots.arg("SLOTS");
            let reply = tokio::time::timeout(patience, slots.query_async::<Value>(&mut conn))
                .await
                .map_err(|_| "CLUSTER SLOTS timed out")??;
            if slot_map(&reply, &nodes[0]).map(|(_, t)| t).as_ref() != Some(topology) {
                return Err("the cluster's slots moved".into());
            }
        }
        if listener.is_closed() {
            return Ok(());
        }
        listener.synced(sent, sent.elapsed());
        tokio::time::sleep(follow.heartbeat).await;
    }
}

/// Opens a RESP3 connection whose pushes go to the listener, and turns broadcast tracking on.
async fn open(
    node: &ConnectionInfo,
    follow: &FollowChanges,
    patience: Duration,
) -> Result<MultiplexedConnection, Failure> {
    let settings = node
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    let info = node.clone().set_redis_settings(settings);
    let listener = follow.listener.clone();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(patience))
        .set_response_timeout(Some(patience))
        .set_push_sender(move |push: PushInfo| {
            deliver(&*listener, push);
            Ok::<(), redis::aio::SendError>(())
        });
    let client = redis::Client::open(info)?;
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let mut tracking = redis::cmd("CLIENT");
    tracking.arg("TRACKING").arg("ON").arg("BCAST");
    for prefix in &follow.prefixes {
        tracking.arg("PREFIX").arg(prefix);
    }
    tracking.query_async::<()>(&mut conn).await?;
    Ok(conn)
}

/// Applies one push: runs on the connection's reader, before the replies that follow it are
/// handed over, which is what lets a heartbeat's reply prove the changes before it applied.
fn deliver(listener: &dyn ChangeListener, push: PushInfo) {
    match push.kind {
        PushKind::Invalidate => match push.data.first() {
            Some(Value::Array(keys)) | Some(Value::Set(keys)) => {
                for key in keys {
                    match key {
                        Value::BulkString(key) => listener.changed(key),
                        Value::SimpleString(key) => listener.changed(key.as_bytes()),
                        _ => listener.flush(),
                    }
                }
            }
            // `null`: the server flushed its database(s).
            _ => listener.flush(),
        },
        PushKind::Disconnection => listener.lost(),
        // Other pushes (pub/sub) are not ours.
        _ => {}
    }
}

/// The primaries of the cluster, asked of the first seed that answers, and a description of
/// the slot map to notice when it changes.
async fn primaries(
    seeds: &[ConnectionInfo],
    patience: Duration,
) -> Result<(Vec<ConnectionInfo>, String), Failure> {
    let mut last: Failure = "no cluster node given".into();
    for seed in seeds {
        let asked = async {
            let client = redis::Client::open(seed.clone())?;
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(patience))
                .set_response_timeout(Some(patience));
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Value>(&mut conn)
                .await
        };
        match asked.await {
            Ok(reply) => match slot_map(&reply, seed) {
                Some(found) => return Ok(found),
                None => last = "CLUSTER SLOTS gave an unexpected reply".into(),
            },
            Err(error) => last = error.into(),
        }
    }
    Err(last)
}

/// The primaries named by a `CLUSTER SLOTS` reply (as addresses like `seed`'s) and the sorted
/// slot ranges with their primary, as text.
fn slot_map(reply: &Value, seed: &ConnectionInfo) -> Option<(Vec<ConnectionInfo>, String)> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut described = Vec::new();
    let mut nodes: Vec<(String, u16)> = Vec::new();
    for range in ranges {
        let Value::Array(parts) = range else {
            return None;
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return None;
        };
        let host = match primary.first() {
            Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
            Some(Value::SimpleString(host)) => host.clone(),
            _ => return None,
        };
        let Some(Value::Int(port)) = primary.get(1) else {
            return None;
        };
        let host = if host.is_empty() || host == "?" {
            seed_host(seed)?
        } else {
            host
        };
        let port = u16::try_from(*port).ok()?;
        described.push(format!("{start}-{end}@{host}:{port}"));
        if !nodes.contains(&(host.clone(), port)) {
            nodes.push((host, port));
        }
    }
    described.sort();
    let nodes = nodes
        .into_iter()
        .map(|(host, port)| at(seed, host, port))
        .collect();
    Some((nodes, described.join(",")))
}

fn seed_host(seed: &ConnectionInfo) -> Option<String> {
    match seed.addr() {
        ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => Some(host.clone()),
        _ => None,
    }
}

/// `seed`'s connection settings (credentials, TLS) at another node's address.
fn at(seed: &ConnectionInfo, host: String, port: u16) -> ConnectionInfo {
    let addr = match seed.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host, port),
    };
    seed.clone().set_addr(addr)
}

/// The connection settings of `url`.
pub(crate) fn info(url: &str) -> Result<ConnectionInfo, Failure> {
    Ok(redis::IntoConnectionInfo::into_connection_info(url)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Seen(std::sync::Mutex<Vec<String>>);

    impl ChangeListener for Seen {
        fn changed(&self, key: &[u8]) {
            self.0
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(key).into());
        }
        fn flush(&self) {
            self.0.lock().unwrap().push("FLUSH".into());
        }
        fn lost(&self) {
            self.0.lock().unwrap().push("LOST".into());
        }
        fn synced(&self, _: Instant, _: Duration) {}
        fn is_closed(&self) -> bool {
            false
        }
    }

    #[test]
    fn pushes_become_changes_flushes_and_losses() {
        let seen = Seen(Default::default());
        let keys = Value::Array(vec![Value::BulkString(b"a".to_vec())]);
        deliver(
            &seen,
            PushInfo {
                kind: PushKind::Invalidate,
                data: vec![keys],
            },
        );
        deliver(
            &seen,
            PushInfo {
                kind: PushKind::Invalidate,
                data: vec![Value::Nil],
            },
        );
        deliver(
            &seen,
            PushInfo {
                kind: PushKind::Disconnection,
                data: vec![],
            },
        );
        deliver(
            &seen,
            PushInfo {
                kind: PushKind::Message,
                data: vec![],
            },
        );
        assert_eq!(*seen.0.lock().unwrap(), ["a", "FLUSH", "LOST"]);
    }

    #[test]
    fn slot_maps_name_each_primary_once() {
        let seed = info("redis://127.0.0.1:7000").unwrap();
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |a: i64, b: i64, port: i64| {
            Value::Array(vec![Value::Int(a), Value::Int(b), node(port)])
        };
        let reply = Value::Array(vec![range(0, 5460, 7000), range(5461, 16383, 7001)]);
        let (nodes, described) = slot_map(&reply, &seed).unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(described, "0-5460@127.0.0.1:7000,5461-16383@127.0.0.1:7001");
        assert!(slot_map(&Value::Nil, &seed).is_none());
    }
}
