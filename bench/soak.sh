#!/usr/bin/env bash
# The soak on demand (default 600 seconds; CI runs the same test for 60). With IDSYNC_TEST_POSTGRES_URL set
# it runs on PostgreSQL and includes a database outage; otherwise on SQLite without one.
# Usage: bench/soak.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
IDSYNC_SOAK_SECONDS="${1:-600}" cargo nextest run --no-capture soak_with_key_rotation
