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
pub(crate) enum Targets {
    Single(Box<ConnectionInfo>),
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
        if down_since.is_none() {
            // The session was in sync before it ended: reconnect quickly.
            pause = Duration::from_millis(10);
        }
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
    let patience = follow
        .heartbeat
        .saturating_mul(16)
        .max(Duration::from_secs(1));
    let (nodes, topology) = match targets {
        Targets::Single(info) => (vec![(**info).clone()], None),
        Targets::Cluster(seeds) => {
            let (nodes, topology) = primaries(seeds, patience).await?;
            (nodes, Some(topology))
        }
    };
    if nodes.is_empty() {
        return Err("no primary to follow".into());
    }
    let mut connections = Vec::with_capacity(nodes.len());
    for node in &nodes {
        connections.push(open(node, follow, patience).await?);
    }
    // Tracking is on everywhere: from here every change is reported, so what was learnt before
    // (perhaps while no stream listened) is dropped.
    listener.flush();
    let mut beat = 0usize;
    loop {
        let sent = Instant::now();
        // `ROLE` is the heartbeat: its reply proves the pushes before it were applied, and that
        // the node is still a primary (a demoted one would report changes late, or never).
        let beats = futures_util::future::try_join_all(connections.iter().map(|conn| {
            let mut conn = conn.clone();
            async move { redis::cmd("ROLE").query_async::<Value>(&mut conn).await }
        }));
        let roles = match tokio::time::timeout(patience, beats).await {
            Ok(Ok(roles)) => roles,
            Ok(Err(error)) => return Err(error.into()),
            Err(_) => return Err("heartbeat timed out".into()),
        };
        let round_trip = sent.elapsed();
        if !roles.iter().all(is_primary) {
            return Err("a followed node is no longer a primary".into());
        }
        if let Some(topology) = &topology {
            // A failover or resharding moves slots: the primaries followed may no longer be the
            // ones written to. Each beat asks another followed primary.
            let asked = beat % connections.len();
            let mut conn = connections[asked].clone();
            let mut ask = redis::cmd("CLUSTER");
            ask.arg("NODES");
            let reply = tokio::time::timeout(patience, ask.query_async::<Value>(&mut conn))
                .await
                .map_err(|_| "CLUSTER NODES timed out")??;
            let now = cluster_map(&reply, &nodes[asked])?;
            if &now.1 != topology {
                return Err("the cluster's primaries or slots changed".into());
            }
        }
        if listener.is_closed() {
            return Ok(());
        }
        listener.synced(sent, round_trip);
        if beat == 0 && down_since.take().is_some() {
            tracing::info!("diesel-memclone: the near cache follows Redis's invalidations again");
        }
        beat = beat.wrapping_add(1);
        tokio::time::sleep(follow.heartbeat).await;
    }
}

fn is_primary(role: &Value) -> bool {
    match role {
        Value::Array(parts) => match parts.first() {
            Some(Value::BulkString(role)) => role == b"master",
            Some(Value::SimpleString(role)) => role == "master",
            _ => false,
        },
        _ => false,
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
/// them to notice when they change.
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
                .arg("NODES")
                .query_async::<Value>(&mut conn)
                .await
        };
        match asked.await {
            Ok(reply) => match cluster_map(&reply, seed) {
                Ok(found) => return Ok(found),
                Err(error) => last = error,
            },
            Err(error) => last = error.into(),
        }
    }
    Err(last)
}

/// Every primary a `CLUSTER NODES` reply names, slots or not (a new primary receives keys
/// while slots migrate to it), at addresses like `asked`'s, and a description of the primaries
/// and their slots. An error while slots migrate (keys then live on two nodes), or while the
/// primaries do not cover all 16384 slots (a cluster being set up or failing over).
fn cluster_map(
    reply: &Value,
    asked: &ConnectionInfo,
) -> Result<(Vec<ConnectionInfo>, String), Failure> {
    let text = match reply {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::VerbatimString { text, .. } => text.clone(),
        Value::SimpleString(text) => text.clone(),
        _ => return Err("CLUSTER NODES gave an unexpected reply".into()),
    };
    let mut described = Vec::new();
    let mut nodes = Vec::new();
    let mut covered = 0u32;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [id, address, flags, ..] = fields[..] else {
            continue;
        };
        let flags: Vec<&str> = flags.split(',').collect();
        if !flags.contains(&"master")
            || flags
                .iter()
                .any(|f| ["fail", "handshake", "noaddr"].contains(f))
        {
            continue;
        }
        let slots = fields.get(8..).unwrap_or_default();
        if slots.iter().any(|slot| slot.starts_with('[')) {
            return Err("cluster slots are migrating".into());
        }
        for range in slots {
            let (start, end) = range.split_once('-').unwrap_or((range, range));
            let (Ok(start), Ok(end)) = (start.parse::<u32>(), end.parse::<u32>()) else {
                return Err("CLUSTER NODES gave an unexpected slot".into());
            };
            covered += end.saturating_sub(start) + 1;
        }
        // `ip:port@cport[,hostname]`
        let host_port = address.split('@').next().unwrap_or_default();
        let Some((host, port)) = host_port.rsplit_once(':') else {
            return Err("CLUSTER NODES gave an unexpected address".into());
        };
        let port: u16 = port
            .parse()
            .map_err(|_| "CLUSTER NODES gave an unexpected port")?;
        let host = if host.is_empty() {
            seed_host(asked).ok_or("no host for a cluster node")?
        } else {
            host.to_owned()
        };
        described.push(format!("{id}:{port}:{}", slots.join(" ")));
        nodes.push(at(asked, host, port));
    }
    if covered != 16384 {
        return Err(format!("the cluster's primaries cover {covered} of 16384 slots").into());
    }
    described.sort();
    Ok((nodes, described.join(",")))
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
    fn cluster_maps_need_every_slot_and_no_migration() {
        let asked = info("redis://127.0.0.1:7000").unwrap();
        let reply = |text: &str| Value::BulkString(text.as_bytes().to_vec());
        let healthy = "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                       b 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-16383\n\
                       c 127.0.0.1:7003@17003 master - 0 0 3 connected\n\
                       d 127.0.0.1:7002@17002 slave a 0 0 1 connected\n";
        let (nodes, described) = cluster_map(&reply(healthy), &asked).unwrap();
        assert_eq!(nodes.len(), 3, "every primary, with slots or not");
        assert_eq!(described, "a:7000:0-5460,b:7001:5461-16383,c:7003:");
        let partial = "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n";
        assert!(cluster_map(&reply(partial), &asked).is_err());
        let migrating = "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-16383 [5->-c]\n";
        assert!(cluster_map(&reply(migrating), &asked).is_err());
        assert!(cluster_map(&reply(""), &asked).is_err());
        assert!(cluster_map(&Value::Nil, &asked).is_err());
    }

    #[test]
    fn only_a_primary_beats() {
        let role = |r: &str| Value::Array(vec![Value::BulkString(r.as_bytes().to_vec())]);
        assert!(is_primary(&role("master")));
        assert!(!is_primary(&role("slave")));
        assert!(!is_primary(&Value::Nil));
    }
}
