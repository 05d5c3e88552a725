#!/usr/bin/env bash
# Scale benchmark: Shoal with KEYS keys loaded against Shoal with SMALL_KEYS keys, driven
# by the same redis-benchmark in one run, plus the memory it holds and how long it takes
# to start on the big data dir.
#
# 1. Loads SMALL_KEYS and KEYS keys (100-byte values) into two fresh instances, each
#    with durability = "async" for the load only: a python3 generator writes RESP
#    `SET key:<i, 12 digits> <value>` into `redis-cli --pipe` (LOADERS connections).
#    The key names are the ones redis-benchmark's `-r` draws (`key:000000xxxxxx`), so
#    its GETs hit loaded keys and its SETs overwrite them. Progress (DBSIZE, rate,
#    RssAnon) is printed every PROGRESS_SECS; DBSIZE is checked at the end.
# 2. Restarts both with DURABILITY (default "fsync", Shoal's default) and runs
#    `redis-benchmark -t get,set -d 100 -c CLIENTS` at -P 1 and -P 16 over each
#    instance's whole keyspace, alternating the instances, REPEATS times.
# 3. Stops the big instance cleanly and times `shoal serve` on its data dir from
#    process start until `redis-cli PING` answers PONG (polled every 10 ms), STARTS
#    times with the page cache warm and, when COLD=1 and /proc/sys/vm/drop_caches is
#    writable, COLD_STARTS times after `sync; echo 3 > /proc/sys/vm/drop_caches`.
#
# RssAnon is summed over the supervisor's process group (supervisor, net-daemon and
# every worker): LMDB's mapped pages are page cache, not heap, and are not counted.
# The config is the default except ports, data dir, metrics (off), the Unix socket
# (off) and the load's durability. With the default log retention (1,000,000 entries
# per partition, 7 days) the commit log keeps every write of the load, so the data dir
# holds each key twice: its value and its log entry.
#
# Usage: benches/scale.sh                          (10,000,000 keys, about 4 minutes on 2 cores)
#        KEYS=1000000 REPEATS=1 benches/scale.sh   (a quick look)
# Environment:
#   KEYS         keys in the big instance                  (default 10000000)
#   SMALL_KEYS   keys in the small instance                (default 100000)
#   N            requests per redis-benchmark run          (default 100000)
#   REPEATS      runs per instance, test and pipeline depth (default 3)
#   CLIENTS      parallel connections                      (default 50)
#   PIPELINES    pipeline depths                           (default "1 16")
#   DURABILITY   durability while benchmarked and started  (default fsync)
#   WRITEBACK_MS storage.writeback_ms of both instances    (default: Shoal's)
#   LOADERS      parallel redis-cli --pipe connections     (default 2)
#   PROGRESS_SECS  seconds between progress lines          (default 5)
#   STARTS       warm start-up timings                     (default 3)
#   COLD         1: also time start-up after dropping the page cache (default 1)
#   COLD_STARTS  cold start-up timings                     (default 1)
#   WORK         where to put the data dirs (default: a temp dir, removed at exit)
#   OUT          where to keep the raw CSV                 (default: in the work dir)
#
# Needs redis-cli, redis-benchmark (apt-get install redis-tools) and python3, and a few
# GB of disk for 10,000,000 keys (the script prints the data dir sizes). Builds Shoal in
# release mode. Stops everything it started.
set -euo pipefail

KEYS=${KEYS:-10000000}
SMALL_KEYS=${SMALL_KEYS:-100000}
N=${N:-100000}
REPEATS=${REPEATS:-3}
CLIENTS=${CLIENTS:-50}
PIPELINES=${PIPELINES:-"1 16"}
DURABILITY=${DURABILITY:-fsync}
LOADERS=${LOADERS:-2}
PROGRESS_SECS=${PROGRESS_SECS:-5}
STARTS=${STARTS:-3}
COLD=${COLD:-1}
COLD_STARTS=${COLD_STARTS:-1}

root=$(cd "$(dirname "$0")/.." && pwd)
for tool in redis-benchmark redis-cli python3; do
    command -v "$tool" >/dev/null || { echo "scale: $tool is not installed" >&2; exit 1; }
done

echo "building shoal (release)..." >&2
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p shoal
shoal="${CARGO_TARGET_DIR:-$root/target}/release/shoal"

if [ -n "${WORK:-}" ]; then
    mkdir -p "$WORK"
    work=$(mktemp -d "$WORK/shoal-scale.XXXXXX")
else
    work=$(mktemp -d -t shoal-scale.XXXXXX)
fi
raw=${OUT:-$work/results.csv}  # the work dir, data dirs included, is removed at exit
facts=$work/facts
: >"$facts"
# Processes started and not yet waited for (a waited-for pid may be reused by others).
declare -A pids=()
cleanup() {
    for pid in "${!pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${!pids[@]}"; do
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

say() { echo "scale: $*" >&2; }
# Records a figure for the final table: name, value.
fact() { echo "$1=$2" >>"$facts"; }
now_ns() { date +%s%N; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

declare -A port pid_of keys_of
keys_of[small]=$SMALL_KEYS
keys_of[big]=$KEYS

# Writes the config of instance $1 with durability $2.
write_config() {
    local name=$1 durability=$2
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
}

# Starts instance $1 and waits until it answers PING, polling every 10 ms. Sets
# started_ms to the milliseconds from process start to the first PONG.
started_ms=0
start_shoal() {
    local name=$1 started pid
    started=$(now_ns)
    setsid "$shoal" serve --config "$work/$name/shoal.toml" >>"$work/$name/log" 2>&1 &
    pid=$!
    pids[$pid]=1
    pid_of[$name]=$pid
    for _ in $(seq 6000); do
        if [ "$(redis-cli -p "${port[$name]}" ping 2>/dev/null)" = "PONG" ]; then
            started_ms=$((($(now_ns) - started) / 1000000))
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            say "$name exited during start-up; its log:"
            tail -n 20 "$work/$name/log" >&2
            exit 1
        fi
        sleep 0.01
    done
    say "$name did not answer PING within 60 s"
    exit 1
}

# Stops instance $1 with SIGTERM and waits for the supervisor to exit (a clean stop).
stop_shoal() {
    local name=$1 pid=${pid_of[$1]}
    kill -TERM "$pid"
    local status=0
    wait "$pid" || status=$?
    unset "pids[$pid]"
    pid_of[$name]=
    if [ "$status" != 0 ]; then
        say "$name exited with status $status on SIGTERM; its log:"
        tail -n 20 "$work/$name/log" >&2
        exit 1
    fi
}

# RssAnon of every process in instance $1's process group, in KiB.
rss_anon_kib() {
    local total=0 kb member
    for member in $(pgrep -g "${pid_of[$1]}" 2>/dev/null || true); do
        kb=$(awk '/^RssAnon:/ {print $2}' "/proc/$member/status" 2>/dev/null || echo 0)
        total=$((total + ${kb:-0}))
    done
    echo "$total"
}

# One line per process of instance $1: pid, command, RssAnon.
rss_anon_detail() {
    local member
    for member in $(pgrep -g "${pid_of[$1]}" 2>/dev/null || true); do
        printf '  pid %s %s: %s\n' "$member" \
            "$(tr '\0' ' ' <"/proc/$member/cmdline" 2>/dev/null | cut -c1-60)" \
            "$(awk '/^RssAnon:/ {print $2, $3}' "/proc/$member/status" 2>/dev/null)"
    done
}

dbsize() { redis-cli -p "${port[$1]}" dbsize 2>/dev/null || echo 0; }

# RESP for `SET key:<i> <value>` over [first, last), the key's 12-digit number padding
# the value to 100 bytes, written to stdout.
generate() {
    python3 - "$1" "$2" <<'EOF'
import sys
first, last = int(sys.argv[1]), int(sys.argv[2])
out = sys.stdout.buffer
pad = b"x" * 88
template = b"*3\r\n$3\r\nSET\r\n$16\r\nkey:%012d\r\n$100\r\n%012d" + pad + b"\r\n"
chunk = 10000
for start in range(first, last, chunk):
    out.write(b"".join(template % (i, i) for i in range(start, min(start + chunk, last))))
out.flush()
EOF
}

# Loads keys_of[$1] keys into instance $1 over LOADERS connections and checks DBSIZE.
load() {
    local name=$1 total=${keys_of[$1]} loaders=() i first last started elapsed_ms
    local last_keys=0 last_ns peak=0 rss keys now
    say "$name: loading $total keys over $LOADERS connection(s)..."
    started=$(now_ns)
    last_ns=$started
    for i in $(seq 0 $((LOADERS - 1))); do
        first=$((total * i / LOADERS))
        last=$((total * (i + 1) / LOADERS))
        generate "$first" "$last" | redis-cli -p "${port[$name]}" --pipe >"$work/$name/pipe-$i.out" 2>&1 &
        loaders+=($!)
        pids[$!]=1
    done
    local next_report=$((started + PROGRESS_SECS * 1000000000))
    while :; do
        local running=0
        for i in "${loaders[@]}"; do kill -0 "$i" 2>/dev/null && running=1; done
        [ "$running" = 1 ] || break
        sleep 0.2
        [ "$(now_ns)" -ge "$next_report" ] || continue
        next_report=$((next_report + PROGRESS_SECS * 1000000000))
        keys=$(dbsize "$name")
        now=$(now_ns)
        rss=$(rss_anon_kib "$name")
        [ "$rss" -gt "$peak" ] && peak=$rss
        say "$name: $keys keys loaded, $(((keys - last_keys) * 1000000000 / (now - last_ns))) keys/s, RssAnon $((rss / 1024)) MiB"
        last_keys=$keys
        last_ns=$now
    done
    for i in "${!loaders[@]}"; do
        local status=0
        wait "${loaders[$i]}" || status=$?
        unset "pids[${loaders[$i]}]"
        if [ "$status" != 0 ] || ! grep -q '^errors: 0,' "$work/$name/pipe-$i.out"; then
            say "$name: loader $i failed:"
            cat "$work/$name/pipe-$i.out" >&2
            exit 1
        fi
    done
    elapsed_ms=$((($(now_ns) - started) / 1000000))
    keys=$(dbsize "$name")
    if [ "$keys" != "$total" ]; then
        say "$name: DBSIZE is $keys after loading $total keys"
        exit 1
    fi
    local probe=$((total / 3)) expected value
    expected=$(printf 'key:%012d' "$probe")
    value=$(redis-cli -p "${port[$name]}" get "$expected")
    if [ "${value:0:12}" != "$(printf '%012d' "$probe")" ] || [ "${#value}" != 100 ]; then
        say "$name: GET $expected returned '$value'"
        exit 1
    fi
    rss=$(rss_anon_kib "$name")
    [ "$rss" -gt "$peak" ] && peak=$rss
    say "$name: loaded $keys keys in $((elapsed_ms / 1000)) s ($((keys * 1000 / elapsed_ms)) keys/s); RssAnon $((rss / 1024)) MiB, peak seen $((peak / 1024)) MiB:"
    rss_anon_detail "$name" >&2
    fact "$name.load_ms" "$elapsed_ms"
    fact "$name.load_rate" "$((keys * 1000 / elapsed_ms))"
    fact "$name.rss_load_kib" "$rss"
    fact "$name.rss_load_peak_kib" "$peak"
}

for name in small big; do
    port[$name]=$(free_port)
    write_config "$name" async
    start_shoal "$name"
    load "$name"
    stop_shoal "$name"
    fact "$name.data_bytes" "$(du -sb "$work/$name/data" | cut -f1)"
    fact "$name.data_disk_bytes" "$(du -sB1 "$work/$name/data" | cut -f1)"
done

for name in small big; do
    write_config "$name" "$DURABILITY"
    start_shoal "$name"
done

echo "instance,keys,pipeline,repeat,test,rps,avg_ms,min_ms,p50_ms,p95_ms,p99_ms,max_ms" >"$raw"
targets=(small big)
for repeat in $(seq "$REPEATS"); do
    for pipeline in $PIPELINES; do
        # Alternate which instance runs first.
        for i in 0 1; do
            name=${targets[$(((i + repeat) % 2))]}
            say "repeat $repeat/$REPEATS, -P $pipeline, $name (${keys_of[$name]} keys)..."
            redis-benchmark -p "${port[$name]}" -t get,set -n "$N" -d 100 -r "${keys_of[$name]}" \
                -c "$CLIENTS" -P "$pipeline" --csv -q |
                tail -n +2 | tr -d '"' | sed "s/^/$name,${keys_of[$name]},$pipeline,$repeat,/" >>"$raw"
        done
    done
done

for name in small big; do
    keys=$(dbsize "$name")
    [ "$keys" = "${keys_of[$name]}" ] || { say "$name: DBSIZE is $keys after the benchmark"; exit 1; }
    rss=$(rss_anon_kib "$name")
    say "$name: RssAnon after the benchmark $((rss / 1024)) MiB:"
    rss_anon_detail "$name" >&2
    fact "$name.rss_bench_kib" "$rss"
    stop_shoal "$name"
done

warm=()
for i in $(seq "$STARTS"); do
    start_shoal big
    say "big: start-up (warm) $i/$STARTS: PONG after $started_ms ms"
    warm+=("$started_ms")
    stop_shoal big
done
fact big.start_warm_ms "${warm[*]}"

cold=()
if [ "$COLD" = 1 ] && [ -w /proc/sys/vm/drop_caches ]; then
    for i in $(seq "$COLD_STARTS"); do
        sync
        echo 3 >/proc/sys/vm/drop_caches
        start_shoal big
        say "big: start-up (cold) $i/$COLD_STARTS: PONG after $started_ms ms"
        cold+=("$started_ms")
        stop_shoal big
    done
elif [ "$COLD" = 1 ]; then
    say "cannot write /proc/sys/vm/drop_caches (not root?); no cold start-up figure"
fi
fact big.start_cold_ms "${cold[*]:-}"

[ -z "${OUT:-}" ] || echo "raw results: $raw" >&2
python3 - "$raw" "$facts" "$N" "$REPEATS" "$CLIENTS" "$DURABILITY" <<'EOF'
import csv, statistics, sys
path, facts_path, n, repeats, clients, durability = sys.argv[1:]
rows = list(csv.DictReader(open(path)))
facts = dict(line.rstrip("\n").split("=", 1) for line in open(facts_path) if "=" in line)
keys = {r["instance"]: int(r["keys"]) for r in rows}
def runs(instance, pipeline, test, field):
    return [float(r[field]) for r in rows
            if r["instance"] == instance and r["pipeline"] == pipeline and r["test"] == test]
def med(instance, pipeline, test, field):
    values = runs(instance, pipeline, test, field)
    return statistics.median(values) if values else None
def rps(instance, pipeline, test):
    values = runs(instance, pipeline, test, "rps")
    if not values:
        return "-"
    cell = f"{statistics.median(values) / 1000:.1f}k"
    if len(values) > 1:
        short = lambda v: f"{v / 1000:.1f}" if v < 100_000 else f"{v / 1000:.0f}"
        cell += f" ({short(min(values))}–{short(max(values))}k)"
    return cell
def ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}×"
def lat(instance, pipeline, test):
    p50, p99 = med(instance, pipeline, test, "p50_ms"), med(instance, pipeline, test, "p99_ms")
    return "-" if p50 is None else f"{p50:.2f} / {p99:.2f}"
def count(k):
    return f"{k / 1e6:g}M" if k >= 1e6 else f"{k / 1e3:g}k"
def mib(kib):
    return f"{int(kib) / 1024:.0f} MiB"
def size(b):
    b = int(b)
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"
def times(ms):
    ms = [int(x) for x in ms.split()]
    if not ms:
        return "-"
    return " / ".join(f"{x / 1000:.2f} s" for x in ms)
small, big = count(keys["small"]), count(keys["big"])
print(f"redis-benchmark -t get,set -n {n} -d 100 -c {clients} -r <keys>, durability "
      f"\"{durability}\", median of {repeats} runs per cell (lowest–highest); "
      "p50 / p99 latency in ms (medians).\n")
print(f"| test | -P | {small} keys | {big} keys | {big} ÷ {small} | {small} p50 / p99 | {big} p50 / p99 |")
print("|---|---|---|---|---|---|---|")
for pipeline in dict.fromkeys(r["pipeline"] for r in rows):
    for test in dict.fromkeys(r["test"] for r in rows):
        s, b = med("small", pipeline, test, "rps"), med("big", pipeline, test, "rps")
        print(f"| {test} | {pipeline} | {rps('small', pipeline, test)} | {rps('big', pipeline, test)} "
              f"| {ratio(b, s)} "
              f"| {lat('small', pipeline, test)} | {lat('big', pipeline, test)} |")
print()
print(f"| figure | {small} keys | {big} keys |")
print("|---|---|---|")
def row(label, key, fmt):
    cells = [fmt(facts[f"{name}.{key}"]) if facts.get(f"{name}.{key}", "") != "" else "-"
             for name in ("small", "big")]
    print(f"| {label} | {cells[0]} | {cells[1]} |")
row("bulk load (async, redis-cli --pipe)", "load_rate", lambda x: f"{int(x) / 1000:.0f}k keys/s")
row("bulk load time", "load_ms", lambda x: f"{int(x) / 1000:.1f} s")
row("data dir (du)", "data_disk_bytes", size)
row("RssAnon, all processes, end of load", "rss_load_kib", mib)
row("RssAnon, highest seen during load", "rss_load_peak_kib", mib)
row("RssAnon, all processes, after the benchmark", "rss_bench_kib", mib)
row("start-up to PONG, page cache warm", "start_warm_ms", times)
row("start-up to PONG, page cache dropped", "start_cold_ms", times)
EOF
