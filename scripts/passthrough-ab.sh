#!/bin/bash
# Warm re-read A/B of FUSE passthrough (BENCHMARKS.md, issue 13).
# usage: STORE=DIR DATASET=NAME FILE=NAME MNT=DIR scripts/passthrough-ab.sh on|off
# Mounts DATASET from the local store STORE with a fresh cache, reads MNT/FILE once (cold) and
# five times more (warm) with dd, and prints the rates and the relevant metrics.
set -u
D=${DATASTORE:-${CARGO_TARGET_DIR:-target}/release/datastore}
mode=$1 cache=$(mktemp -d)
extra=""; [ "$mode" = off ] && extra="--no-passthrough"
"$D" mount "$DATASET" "$MNT" --store "$STORE" --cache-dir "$cache" --cache-size 4GiB \
    --metrics-addr 127.0.0.1:19999 $extra >/dev/null 2>&1 &
pid=$!
for _ in $(seq 100); do mountpoint -q "$MNT" && break; sleep 0.1; done
rate() { dd if="$MNT/$FILE" of=/dev/null bs=1M 2>&1 | tail -1 | awk '{print $(NF-1) $NF}'; }
c=$(rate)
w=""; for _ in 1 2 3 4 5; do w="$w $(rate)"; done
m=$(curl -s 127.0.0.1:19999/metrics | grep -E "^datastore_(fuse_passthrough_opens|fuse_reads|cache_whole_copies)_total" \
    | awk '{printf "%s=%s ", $1, $2}' | sed 's/datastore_//g;s/_total//g')
echo "$mode cold=$c warm:$w | $m"
kill -INT $pid; wait $pid 2>/dev/null
rm -rf "$cache"
