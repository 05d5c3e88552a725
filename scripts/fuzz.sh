#!/usr/bin/env bash
# Fuzzes Shoal's decoders of untrusted bytes with cargo-fuzz (libFuzzer).
#
#   scripts/fuzz.sh [seconds-per-target]     (default: 60)
#
# Targets (fuzz/fuzz_targets/): the RESP request parser, the net-daemon <-> worker
# frame decoder for requests and for responses, and the storage layout's value,
# log-entry and meta decoders. Each target checks the properties written in
# `shoal_shared::fuzzing` / `shoal_shard_worker::fuzzing`: no panic, a consistent
# answer (a value, "need more bytes" or an error), a round trip through the encoder,
# and no single allocation over the decoder's bound.
#
# Works on a stable toolchain: it builds without a sanitizer (`-s none`), which needs
# no nightly feature. SHOAL_FUZZ_SANITIZER=address runs under AddressSanitizer with
# `cargo +nightly` instead, where a nightly toolchain is installed.
#
# The committed seed corpus (fuzz/corpus/<target>/) is read but never written: new
# inputs go to a scratch directory, so the corpus stays small. A crash is saved in
# fuzz/artifacts/<target>/ and makes the script exit non-zero; reproduce it with
#   cargo fuzz run -s none <target> fuzz/artifacts/<target>/<file>
# then add the input to the corpus (or a test) together with the decoder's fix.
set -euo pipefail

seconds=${1:-60}
if ! [[ $seconds =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    echo "usage: $0 [seconds-per-target]" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz"

sanitizer=${SHOAL_FUZZ_SANITIZER:-none}
toolchain=()
if [ "$sanitizer" != none ]; then
    toolchain=(+nightly)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

cargo "${toolchain[@]}" fuzz build -s "$sanitizer"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
summary=()
for target in $(cargo fuzz list); do
    mkdir -p "$scratch/$target" "artifacts/$target"
    log="$scratch/$target.log"
    echo "== $target: ${seconds}s" >&2
    status=0
    cargo "${toolchain[@]}" fuzz run -s "$sanitizer" "$target" \
        "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 -timeout=10 \
        >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        tail -40 "$log" >&2
    fi
    summary+=("$(printf '%-18s %12s executions %8s/s  %s' "$target" "${runs:-?}" "${rate:-?}" \
        "$([ "$status" -eq 0 ] && echo ok || echo FAILED)")")
done

echo
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "failing targets: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
