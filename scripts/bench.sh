#!/usr/bin/env bash
# Runs the data path benchmarks (release build) and prints the table recorded in BENCHMARKS.md.
# Needs root and /dev/fuse; uses ~3 GiB of /dev/shm for the S3 server's data. `--quick` for a
# smaller run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --locked --bench datapath -- "$@"
