#!/usr/bin/env bash
# Runs Entitle's whole test suite: unit tests, and end-to-end tests of the real
# gateway and worker against real Postgres, Redis and SMTP (each test makes
# its own database and Redis namespace), and the console's browser tests in
# headless Chromium. Starts or installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
source ops/lib.sh

ensure_stack
ensure_chromium

# Databases left by interrupted runs.
stale=$(psql "$DATABASE_URL" -qAtc "SELECT datname FROM pg_database WHERE datname LIKE 'entitle\_t\_%'")
for db in $stale; do
    psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
done

say "cargo test --workspace"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
