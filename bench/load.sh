#!/usr/bin/env bash
# The load benchmark in one command: installs wrk if missing, builds the release binaries, runs every
# scenario (bounded: --duration seconds each, loopback only). PostgreSQL scenarios run when
# IDSYNC_BENCH_POSTGRES_URL is set, e.g. postgres://postgres@127.0.0.1:5432/postgres.
# Usage: bench/load.sh [--duration 10] [--connections 64] [--users 1000] [--tenants 50] [--cold-tokens 40000]
#                      [--cold-rate 2000] [--rate N (scenario 6; default half the baseline)] [--memory-users 100000]
#                      [--scenarios 1,2,3,4,5,6,7]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq wrk
fi
cargo build --release --bin idsync --example passthrough
cargo bench --bench load -- "$@"
