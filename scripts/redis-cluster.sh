#!/usr/bin/env bash
# Starts a three-primary Redis Cluster on loopback ports 7000-7002 (nothing persisted), unless one
# is already up. Used by .ci/run and for local runs of the cluster tests.
set -euo pipefail
ports=(7000 7001 7002)
dir=${REDIS_CLUSTER_DIR:-/tmp/memclone-redis-cluster}

if redis-cli -p "${ports[0]}" cluster info 2>/dev/null | grep -q 'cluster_state:ok'; then
  echo "Redis Cluster already up on ${ports[*]}"
  exit 0
fi

mkdir -p "$dir"
for port in "${ports[@]}"; do
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  rm -f "$dir/nodes-$port.conf"
  redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
    --cluster-config-file "$dir/nodes-$port.conf" --cluster-node-timeout 5000 \
    --save "" --appendonly no --dir "$dir" --logfile "$dir/$port.log" --daemonize yes
done
for port in "${ports[@]}"; do
  for _ in $(seq 1 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${ports[@]}") --cluster-replicas 0 --cluster-yes >/dev/null
for _ in $(seq 1 100); do
  if redis-cli -p "${ports[0]}" cluster info | grep -q 'cluster_state:ok'; then
    echo "Redis Cluster up on ${ports[*]}"
    exit 0
  fi
  sleep 0.2
done
echo "Redis Cluster did not reach cluster_state:ok" >&2
exit 1
