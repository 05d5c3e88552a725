#!/usr/bin/env bash
# Mixed load: SETs and GETs at once, from two redis-benchmark processes, against Shoal
# with write-back (storage.writeback_ms = 1000, the default) and without it
# (writeback_ms = 0), and against redis-server with `appendfsync always`, in one run.
# With write-back, a GET of a key written since the worker's last LMDB commit goes
# through the worker; this shows what that costs the reads, and what the writes gain.
#
# Usage: benches/mixed.sh                      (defaults below)
#        REPEATS=1 benches/mixed.sh            (a quick look)
# Environment:
#   SETS / GETS      requests of each benchmark per run  (default 150000 / 300000)
#   SET_CLIENTS / GET_CLIENTS  connections of each      (default 25 / 25)
#   PIPELINES        pipeline depths                     (default "1 16")
#   REPEATS          runs per target and depth           (default 3)
#   KEYSPACE         redis-benchmark -r                  (default 100000)
#
# Needs redis-server, redis-benchmark and python3. Builds Shoal in release mode.
# Prints one line per target and depth: the medians of SET/s and GET/s.
set -euo pipefail

SETS=${SETS:-150000}
GETS=${GETS:-300000}
SET_CLIENTS=${SET_CLIENTS:-25}
GET_CLIENTS=${GET_CLIENTS:-25}
PIPELINES=${PIPELINES:-"1 16"}
REPEATS=${REPEATS:-3}
KEYSPACE=${KEYSPACE:-100000}

root=$(cd "$(dirname "$0")/.." && pwd)
for tool in redis-server redis-benchmark redis-cli python3; do
    command -v "$tool" >/dev/null || { echo "mixed: $tool is not installed" >&2; exit 1; }
done
echo "building shoal (release)..." >&2
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p shoal
shoal="${CARGO_TARGET_DIR:-$root/target}/release/shoal"

work=$(mktemp -d -t shoal-mixed.XXXXXX)
pid=""
stop() {
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        pid=""
    fi
}
trap 'stop; rm -rf "$work"' EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_ping() {
    for _ in $(seq 300); do
        [ "$(redis-cli -p "$1" ping 2>/dev/null)" = "PONG" ] && return 0
        sleep 0.1
    done
    echo "mixed: nothing answered PING on port $1" >&2
    exit 1
}

# Starts `target` on a fresh data dir; sets `port` and `pid`.
start() {
    local target=$1 dir="$work/$target.$RANDOM"
    port=$(free_port)
    mkdir -p "$dir"
    case $target in
    redis-always)
        redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --save '' \
            --appendonly yes --appendfsync always >"$dir/log" 2>&1 &
        ;;
    shoal-*)
        cat >"$dir/shoal.toml" <<EOF
data_dir = "$dir/data"
[client]
listen = "127.0.0.1:$port"
unix_socket = ""
[storage]
writeback_ms = ${target#shoal-wb}
[metrics]
listen = ""
EOF
        setsid "$shoal" serve --config "$dir/shoal.toml" >"$dir/log" 2>&1 &
        ;;
    esac
    pid=$!
    wait_ping "$port"
}

# The requests per second a redis-benchmark --csv output file reports.
rps() { tail -n 1 "$1" | tr -d '"' | cut -d, -f2; }

raw="$work/results.csv"
targets=(shoal-wb1000 shoal-wb0 redis-always)
for repeat in $(seq "$REPEATS"); do
    for pipeline in $PIPELINES; do
        for i in "${!targets[@]}"; do
            target=${targets[$(((i + repeat) % ${#targets[@]}))]}
            echo "repeat $repeat/$REPEATS, -P $pipeline, $target..." >&2
            start "$target"
            # Most keys exist before the mix starts.
            redis-benchmark -p "$port" -t set -n "$KEYSPACE" -r "$KEYSPACE" -d 100 -c 50 \
                -P 16 -q >/dev/null
            redis-benchmark -p "$port" -t set -n "$SETS" -r "$KEYSPACE" -d 100 \
                -c "$SET_CLIENTS" -P "$pipeline" --csv -q >"$work/set.csv" &
            setter=$!
            redis-benchmark -p "$port" -t get -n "$GETS" -r "$KEYSPACE" -d 100 \
                -c "$GET_CLIENTS" -P "$pipeline" --csv -q >"$work/get.csv"
            wait "$setter"
            echo "$target,$pipeline,$(rps "$work/set.csv"),$(rps "$work/get.csv")" >>"$raw"
            stop
        done
    done
done

python3 - "$raw" <<'EOF'
import csv, statistics, sys
rows = {}
for target, pipeline, sets, gets in csv.reader(open(sys.argv[1])):
    rows.setdefault((target, int(pipeline)), []).append((float(sets), float(gets)))
print("| target | -P | SET/s | GET/s |")
print("|---|---|---|---|")
for (target, pipeline), runs in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    sets = statistics.median(r[0] for r in runs)
    gets = statistics.median(r[1] for r in runs)
    print(f"| {target} | {pipeline} | {sets / 1000:.1f}k | {gets / 1000:.1f}k |")
EOF
