#!/usr/bin/env bash
# Runs the data path benchmarks (release build) and prints the tables recorded in BENCHMARKS.md:
# our mount beside the ceilings and the peers s3fs and rclone, same server, same data, same run.
# Needs root and /dev/fuse; uses ~5 GiB of /dev/shm for the S3 server's data. `--quick` for a
# smaller run (one measure per figure instead of the median of 3 fresh mounts).
#
# Installs the peers (Debian packages s3fs and rclone) when they are missing; if that fails the
# benchmark still runs and prints their cells as "n/a (reason)".
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in s3fs rclone; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
  echo "installing peers: ${missing[*]}" >&2
  if ! { apt-get install -y "${missing[@]}" >/dev/null ||
    { apt-get update >/dev/null && apt-get install -y "${missing[@]}" >/dev/null; }; }; then
    echo "could not install ${missing[*]}: their cells will read n/a" >&2
  fi
fi
cargo bench --locked --bench datapath -- "$@"
