#!/usr/bin/env bash
# Load benchmark: one host of a 3-host Shoal cluster with one copy of each partition,
# one host of a 3-host cluster with three copies (`replicas = 3`), and a Shoal host on
# its own, driven by the same redis-benchmark, on the same machine, in one run.
# - One copy: through the cluster host, about two thirds of the keys belong to the
#   other two hosts and are forwarded over the peer links.
# - Three copies: the host measured is the founder, which leads a third of the
#   partitions once the primaries are spread (the script waits for that); each write
#   waits for a second copy.
# Targets are interleaved and every figure is a median.
#
# Usage: benches/cluster-compare.sh
#        N=20000 REPEATS=1 benches/cluster-compare.sh   (a quick look)
# Environment:
#   N          requests per redis-benchmark run         (default 200000)
#   REPEATS    runs per target and test                 (default 3)
#   CLIENTS    parallel connections                     (default 50)
#   PIPELINE   redis-benchmark -P                       (default 16)
#   TESTS      redis-benchmark -t list                  (default set,get)
#   SUBNET     T of the clusters' 127.0.T.x and 127.0.T+1.x addresses (default 77)
#
# Needs redis-benchmark, redis-cli and python3. Builds Shoal in release mode. Stops
# everything it started. Any error reply counts as a failed run.
set -euo pipefail

N=${N:-200000}
REPEATS=${REPEATS:-3}
CLIENTS=${CLIENTS:-50}
PIPELINE=${PIPELINE:-16}
TESTS=${TESTS:-set,get}
SUBNET=${SUBNET:-77}

root=$(cd "$(dirname "$0")/.." && pwd)
for tool in redis-benchmark redis-cli python3; do
    command -v "$tool" >/dev/null || { echo "cluster-compare: $tool is not installed" >&2; exit 1; }
done

echo "building shoal (release)..." >&2
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p shoal
shoal="${CARGO_TARGET_DIR:-$root/target}/release/shoal"

work=$(mktemp -d -t shoal-cluster-compare.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1],0)); print(s.getsockname()[1])' "$1"
}

wait_ping() {
    for _ in $(seq 300); do
        [ "$(redis-cli -h "$1" -p "$2" ping 2>/dev/null)" = "PONG" ] && return 0
        sleep 0.1
    done
    echo "cluster-compare: $1:$2 did not answer PING" >&2
    exit 1
}

# start NAME IP [SEED [REPLICAS]]: a host with a secret (a cluster member) unless NAME
# is "single". Sets addr[NAME] to "ip port" and peer[NAME] to its peer address.
declare -A addr peer_addr
start() {
    local name=$1 ip=$2 seed=${3:-} replicas=${4:-1}
    local port peer
    port=$(free_port "$ip")
    peer=$(free_port "$ip")
    addr[$name]="$ip $port"
    mkdir -p "$work/$name"
    {
        echo "data_dir = \"$work/$name/data\""
        echo "[client]"
        echo "listen = \"$ip:$port\""
        echo "unix_socket = \"\""
        echo "[metrics]"
        echo "listen = \"\""
        if [ "$name" != single ]; then
            echo "[cluster]"
            echo "cluster_secret = \"cluster-compare-secret-0123456789\""
            echo "peer_listen = \"$ip:$peer\""
            echo "replicas = $replicas"
            [ -n "$seed" ] && echo "seeds = [\"$seed\"]"
        fi
    } >"$work/$name/shoal.toml"
    setsid "$shoal" serve --config "$work/$name/shoal.toml" >"$work/$name/log" 2>&1 &
    pids+=($!)
    wait_ping "$ip" "$port"
    peer_addr[$name]="$ip:$peer"
}

start single 127.0.0.1
start host1 "127.0.$SUBNET.11"
start host2 "127.0.$SUBNET.12" "${peer_addr[host1]}"
start host3 "127.0.$SUBNET.13" "${peer_addr[host1]}"
replicated_subnet=$((SUBNET + 1))
start copies1 "127.0.$replicated_subnet.11" "" 3
start copies2 "127.0.$replicated_subnet.12" "${peer_addr[copies1]}" 3
start copies3 "127.0.$replicated_subnet.13" "${peer_addr[copies1]}" 3

echo "waiting for the partitions to spread over the 3 hosts..." >&2
settled=""
for _ in $(seq 600); do
    info=$(redis-cli -h ${addr[host1]% *} -p ${addr[host1]#* } cluster info 2>/dev/null | tr -d '\r')
    owned=$(echo "$info" | sed -n 's/^shoal_partitions_owned://p')
    moving=$(echo "$info" | sed -n 's/^shoal_partitions_moving://p')
    misplaced=$(echo "$info" | sed -n 's/^shoal_partitions_misplaced://p')
    if [ "${moving:-1}" = 0 ] && [ "${misplaced:-1}" = 0 ] && [ "${owned:-256}" -lt 100 ]; then
        settled=yes
        break
    fi
    sleep 0.5
done
[ -n "$settled" ] || { echo "cluster-compare: the partitions did not settle" >&2; exit 1; }
echo "host 1 owns $owned of 256 partitions" >&2

echo "waiting for three copies of every partition in the replicated cluster, and its primaries spread..." >&2
settled=""
for _ in $(seq 1200); do
    info=$(redis-cli -h ${addr[copies1]% *} -p ${addr[copies1]#* } cluster info 2>/dev/null | tr -d '\r')
    under=$(echo "$info" | sed -n 's/^shoal_partitions_under_replicated://p')
    owned=$(echo "$info" | sed -n 's/^shoal_partitions_owned://p')
    if [ "${under:-1}" = 0 ] && [ "${owned:-256}" -lt 100 ]; then
        settled=yes
        break
    fi
    sleep 0.5
done
[ -n "$settled" ] || { echo "cluster-compare: the replicated cluster did not settle" >&2; exit 1; }
echo "replicated host 1 leads $owned of 256 partitions" >&2

raw=$work/results.csv
echo "target,repeat,test,rps,avg_ms,min_ms,p50_ms,p95_ms,p99_ms,max_ms" >"$raw"
targets=(single host1 copies1)
errors=0
for repeat in $(seq "$REPEATS"); do
    for i in 0 1 2; do
        target=${targets[$(((i + repeat) % 3))]}
        read -r ip port <<<"${addr[$target]}"
        echo "repeat $repeat/$REPEATS, $target..." >&2
        redis-benchmark -h "$ip" -p "$port" -t "$TESTS" -n "$N" -d 100 -r 100000 \
            -c "$CLIENTS" -P "$PIPELINE" --csv -q 2>"$work/stderr" |
            tail -n +2 | tr -d '"' | sed "s/^/$target,$repeat,/" >>"$raw"
        if grep -qiE "error|TRYAGAIN" "$work/stderr"; then
            errors=$((errors + 1))
            head -5 "$work/stderr" >&2
        fi
    done
done

python3 - "$raw" "$N" "$REPEATS" "$CLIENTS" "$PIPELINE" <<'EOF'
import csv, statistics, sys
path, n, repeats, clients, pipeline = sys.argv[1:]
rows = list(csv.DictReader(open(path)))
def med(target, test, field):
    values = [float(r[field]) for r in rows if r["target"] == target and r["test"] == test]
    return statistics.median(values) if values else None
print(f"redis-benchmark -n {n} -d 100 -c {clients} -P {pipeline}, median of {repeats} runs.\n")
print("| test | single host | one host of 3, 1 copy | one host of 3, 3 copies "
      "| 1 copy ÷ single | 3 copies ÷ single | 3 copies ÷ 1 copy "
      "| p50 / p99 ms: single, 1 copy, 3 copies |")
print("|---|---|---|---|---|---|---|---|")
def lat(target, test):
    return f"{med(target, test, 'p50_ms'):.2f} / {med(target, test, 'p99_ms'):.2f}"
for test in dict.fromkeys(r["test"] for r in rows):
    s, c, r = (med(t, test, "rps") for t in ("single", "host1", "copies1"))
    print(f"| {test} | {s / 1000:.1f}k | {c / 1000:.1f}k | {r / 1000:.1f}k "
          f"| {c / s:.2f}× | {r / s:.2f}× | {r / c:.2f}× "
          f"| {lat('single', test)}, {lat('host1', test)}, {lat('copies1', test)} |")
EOF
if [ "$errors" -gt 0 ]; then
    echo "cluster-compare: $errors runs printed errors" >&2
    exit 1
fi
echo "no errors" >&2
