#!/bin/bash
D=/work/target-b/release/datastore
mode=$1
rm -rf /tmp/pt-cache
extra=""; [ "$mode" = off ] && extra="--no-passthrough"
$D mount big /tmp/pt-mnt --store /tmp/pt-store --cache-dir /tmp/pt-cache --cache-size 4GiB --metrics-addr 127.0.0.1:19999 $extra >/tmp/pt-mount.log 2>&1 &
pid=$!
for i in $(seq 100); do mountpoint -q /tmp/pt-mnt && break; sleep 0.1; done
rate() { dd if=/tmp/pt-mnt/big.bin of=/dev/null bs=1M 2>&1 | tail -1 | awk '{print $(NF-1) $NF}'; }
c=$(rate); sleep 1
w=""; for i in 1 2 3 4 5; do w="$w $(rate)"; done
m=$(curl -s 127.0.0.1:19999/metrics | grep -E "^datastore_(fuse_passthrough_opens|fuse_reads|cache_whole_copies)_total" | awk '{printf "%s=%s ", $1, $2}' | sed 's/datastore_//g;s/_total//g')
echo "$mode cold=$c warm:$w | $m"
kill -INT $pid; wait $pid 2>/dev/null
