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

# The fault suite's short version (ops/chaos.sh --quick), on the debug
# binaries: a private Postgres and Redis, worker SIGKILLs, a Redis flush and
# kill, a Postgres crash restart, the SMTP server down; fails when an order
# is lost or a code issued twice. ENTITLE_SKIP_CHAOS=1 skips it.
if [ "${ENTITLE_SKIP_CHAOS:-0}" != 1 ]; then
    say "fault suite, short version (debug binaries)"
    chaos=0
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || apt_install postgresql
    command -v redis-server >/dev/null || apt_install redis-server
    { cargo build --locked --workspace --bins &&
        "${CARGO_TARGET_DIR:-target}/debug/entitle-bench" chaos --quick \
            --binaries "${CARGO_TARGET_DIR:-target}/debug"; } || chaos=$?
    if [ "$chaos" -ne 0 ]; then
        echo "fault suite: FAILED"
        [ "$status" -ne 0 ] || status=$chaos
    fi
fi
exit "$status"
