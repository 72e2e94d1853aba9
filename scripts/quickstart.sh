#!/usr/bin/env bash
# Quick start: build `datastore`, create a datastore from a sample directory in the embedded
# default store (a local directory, nothing to configure), mount it read-only, look around,
# show that writes are refused, and unmount. Needs /dev/fuse (FUSE) and, as non-root, fuse3.
set -euo pipefail
cd "$(dirname "$0")/.."

# Only the binary and its own dependencies (no test crates), in the dev profile: dependencies
# optimized, generated API bindings not (Cargo.toml); a first build takes a few minutes on 2 cores.
echo "== cargo build --locked --bin datastore"
cargo build --locked --bin datastore
bin="${CARGO_TARGET_DIR:-$PWD/target}/debug/datastore"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sample="$work/sample"
mkdir -p "$sample/images/train" "$sample/labels"
echo "hello from a datastore" > "$sample/hello.txt"
for i in $(seq 1 20); do head -c $((i * 1000)) /dev/urandom > "$sample/images/train/img-$i.bin"; done
printf 'cat\ndog\n' > "$sample/labels/classes.txt"

echo "== datastore create quickstart-sample $sample"
version=$("$bin" create quickstart-sample "$sample")
echo "created version $version"
echo "== datastore list"
"$bin" list

mnt="$work/mnt"
mkdir -p "$mnt"
extra=()
[ "$(id -u)" -eq 0 ] || extra+=(--owner-only)
echo "== datastore mount quickstart-sample@$version $mnt"
"$bin" mount "quickstart-sample@$version" "$mnt" "${extra[@]}" &
pid=$!
for _ in $(seq 1 100); do
  grep -q " $mnt " /proc/self/mountinfo && break
  kill -0 "$pid" 2>/dev/null || { echo "mount failed"; exit 1; }
  sleep 0.1
done

echo "== ls -la $mnt"; ls -la "$mnt"
echo "== find $mnt | head"; find "$mnt" | head
echo "== cat hello.txt"; cat "$mnt/hello.txt"
cmp -s "$mnt/images/train/img-7.bin" "$sample/images/train/img-7.bin" && echo "img-7.bin: identical to the source"
if touch "$mnt/new-file" 2>/dev/null; then echo "unexpected: a write succeeded"; exit 1; fi
echo "writes are refused: $(touch "$mnt/new-file" 2>&1 | sed 's/.*: //')"

kill -TERM "$pid"
wait "$pid"
grep -q " $mnt " /proc/self/mountinfo && { echo "still mounted"; exit 1; }
echo "unmounted; the datastore stays in the default store (datastore delete quickstart-sample removes it)"
