#!/usr/bin/env bash
# Load benchmark: Shoal against redis-server, driven by the same redis-benchmark,
# on the same machine, in one run. Only the ratios of one run mean anything on a
# shared machine, so the targets are interleaved and every figure is a median.
#
# Targets:
#   shoal-fsync   shoal serve, durability = "fsync" (the default)
#   shoal-async   shoal serve, durability = "async"
#   redis         redis-server --save '' --appendonly no
#   redis-always  redis-server --appendonly yes --appendfsync always
#
# Tests: redis-benchmark's own SET, GET, INCR, MSET and, on the collection types, HSET
# (myhash, random fields), LPUSH and LPOP (mylist: LPOP pops what LPUSH pushed in the
# same run), SADD (myset, random members) and ZADD (myzset, random members and scores);
# then a custom command, `ZRANGE bench:zrange 0 <ZRANGE_MEMBERS - 1>`, on a sorted set
# that the script fills with ZRANGE_MEMBERS members on every target before the runs.
#
# Usage: benches/compare-redis.sh            (defaults below)
#        N=20000 REPEATS=1 benches/compare-redis.sh   (a quick look)
# Environment:
#   N          requests per redis-benchmark run         (default 100000)
#   REPEATS    runs per target, test and pipeline depth (default 3)
#   CLIENTS    parallel connections                     (default 50)
#   TESTS      redis-benchmark -t list  (default set,get,incr,mset,hset,lpush,lpop,sadd,zadd)
#   ZRANGE_MEMBERS  members of bench:zrange, all read by each ZRANGE; 0 skips it (default 100)
#   PIPELINES  pipeline depths                          (default "1 16")
#   KEYSPACE   redis-benchmark -r                       (default 100000)
#   OUT        where to keep the raw CSV                (default: a temp file, printed)
#   WRITEBACK_MS  storage.writeback_ms of both Shoal targets (default: Shoal's default)
#
# Needs redis-server and redis-benchmark (apt-get install redis-server redis-tools)
# and python3. Builds Shoal in release mode. Stops everything it started.
set -euo pipefail

N=${N:-100000}
REPEATS=${REPEATS:-3}
CLIENTS=${CLIENTS:-50}
TESTS=${TESTS:-set,get,incr,mset,hset,lpush,lpop,sadd,zadd}
ZRANGE_MEMBERS=${ZRANGE_MEMBERS:-100}
PIPELINES=${PIPELINES:-"1 16"}
KEYSPACE=${KEYSPACE:-100000}

root=$(cd "$(dirname "$0")/.." && pwd)
for tool in redis-server redis-benchmark redis-cli python3; do
    command -v "$tool" >/dev/null || { echo "compare-redis: $tool is not installed" >&2; exit 1; }
done

echo "building shoal (release)..." >&2
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p shoal
shoal="${CARGO_TARGET_DIR:-$root/target}/release/shoal"

work=$(mktemp -d -t shoal-compare.XXXXXX)
raw=${OUT:-$work/results.csv}
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    [ -n "${OUT:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_ping() {
    local port=$1 name=$2
    for _ in $(seq 300); do
        if [ "$(redis-cli -p "$port" ping 2>/dev/null)" = "PONG" ]; then return 0; fi
        sleep 0.1
    done
    echo "compare-redis: $name did not answer PING on port $port" >&2
    exit 1
}

declare -A port
start_shoal() {
    local name=$1 durability=$2
    port[$name]=$(free_port)
    mkdir -p "$work/$name"
    cat >"$work/$name/shoal.toml" <<EOF
data_dir = "$work/$name/data"
[client]
listen = "127.0.0.1:${port[$name]}"
unix_socket = ""
[storage]
durability = "$durability"
${WRITEBACK_MS:+writeback_ms = $WRITEBACK_MS}
[metrics]
listen = ""
EOF
    setsid "$shoal" serve --config "$work/$name/shoal.toml" >"$work/$name/log" 2>&1 &
    pids+=($!)
    wait_ping "${port[$name]}" "$name"
}

start_redis() {
    local name=$1
    shift
    port[$name]=$(free_port)
    mkdir -p "$work/$name"
    redis-server --port "${port[$name]}" --bind 127.0.0.1 --dir "$work/$name" --save '' "$@" \
        >"$work/$name/log" 2>&1 &
    pids+=($!)
    wait_ping "${port[$name]}" "$name"
}

start_shoal shoal-fsync fsync
start_shoal shoal-async async
start_redis redis --appendonly no
start_redis redis-always --appendonly yes --appendfsync always
targets=(shoal-fsync shoal-async redis redis-always)

# The sorted set the ZRANGE run reads: members m1..mN with scores 1..N.
zrange_test="ZRANGE 0 $((ZRANGE_MEMBERS - 1)) of $ZRANGE_MEMBERS"
if [ "$ZRANGE_MEMBERS" -gt 0 ]; then
    for target in "${targets[@]}"; do
        redis-cli -p "${port[$target]}" del bench:zrange >/dev/null
        added=$(seq "$ZRANGE_MEMBERS" | awk '{printf "%s m%s ", $1, $1}' |
            xargs redis-cli -p "${port[$target]}" zadd bench:zrange)
        [ "$added" = "$ZRANGE_MEMBERS" ] ||
            { echo "compare-redis: filling bench:zrange on $target answered $added" >&2; exit 1; }
    done
fi

echo "target,pipeline,repeat,test,rps,avg_ms,min_ms,p50_ms,p95_ms,p99_ms,max_ms" >"$raw"
for repeat in $(seq "$REPEATS"); do
    for pipeline in $PIPELINES; do
        # Rotate the order every repeat so that no target always runs first.
        for i in "${!targets[@]}"; do
            target=${targets[$(((i + repeat) % ${#targets[@]}))]}
            echo "repeat $repeat/$REPEATS, -P $pipeline, $target..." >&2
            redis-benchmark -p "${port[$target]}" -t "$TESTS" -n "$N" -d 100 -r "$KEYSPACE" \
                -c "$CLIENTS" -P "$pipeline" --csv -q |
                tail -n +2 | tr -d '"' | sed "s/^/$target,$pipeline,$repeat,/" >>"$raw"
            if [ "$ZRANGE_MEMBERS" -gt 0 ]; then
                redis-benchmark -p "${port[$target]}" -n "$N" -c "$CLIENTS" -P "$pipeline" --csv -q \
                    ZRANGE bench:zrange 0 "$((ZRANGE_MEMBERS - 1))" |
                    tail -n +2 | tr -d '"' | sed "s/^ZRANGE bench:zrange [0-9]* [0-9]*,/$zrange_test,/" |
                    sed "s/^/$target,$pipeline,$repeat,/" >>"$raw"
            fi
        done
    done
done

# Anonymous resident memory of each Shoal process tree (LMDB's mapped pages are
# page cache, not heap, and are not counted).
for name in shoal-fsync shoal-async; do
    pid=$(cat "$work/$name/data/shoal.pid" 2>/dev/null || true)
    total=0
    for member in $(pgrep -g "${pid:-0}" 2>/dev/null || true); do
        kb=$(awk '/^RssAnon:/ {print $2}' "/proc/$member/status" 2>/dev/null || echo 0)
        total=$((total + ${kb:-0}))
    done
    echo "$name RssAnon of all processes: $((total / 1024)) MiB" >&2
done

echo "raw results: $raw" >&2
python3 - "$raw" "$N" "$REPEATS" "$CLIENTS" <<'EOF'
import csv, statistics, sys
path, n, repeats, clients = sys.argv[1:]
rows = list(csv.DictReader(open(path)))
def med(target, pipeline, test, field):
    values = [float(r[field]) for r in rows
              if r["target"] == target and r["pipeline"] == pipeline and r["test"] == test]
    return statistics.median(values) if values else None
def rps(x):
    return "-" if x is None else f"{x / 1000:.1f}k"
def ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}×"
def lat(target, pipeline, test):
    p50, p99 = med(target, pipeline, test, "p50_ms"), med(target, pipeline, test, "p99_ms")
    return "-" if p50 is None else f"{p50:.2f} / {p99:.2f}"
tests = list(dict.fromkeys(r["test"] for r in rows))
pipelines = list(dict.fromkeys(r["pipeline"] for r in rows))
print(f"redis-benchmark -n {n} -d 100 -c {clients}, median of {repeats} runs per cell; "
      "p50 / p99 latency in ms.\n")
print("| test | -P | Shoal fsync | Shoal async | Redis | Redis always | fsync ÷ always "
      "| async ÷ Redis | fsync ÷ Redis | Shoal fsync p50 / p99 | Redis p50 / p99 |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for pipeline in pipelines:
    for test in tests:
        f, a = med("shoal-fsync", pipeline, test, "rps"), med("shoal-async", pipeline, test, "rps")
        r, w = med("redis", pipeline, test, "rps"), med("redis-always", pipeline, test, "rps")
        print(f"| {test} | {pipeline} | {rps(f)} | {rps(a)} | {rps(r)} | {rps(w)} | {ratio(f, w)} "
              f"| {ratio(a, r)} | {ratio(f, r)} | {lat('shoal-fsync', pipeline, test)} "
              f"| {lat('redis', pipeline, test)} |")
EOF
