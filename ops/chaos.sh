#!/usr/bin/env bash
# Entitle's fault suite, on the release build: the real gateway and two
# worker processes on a Postgres cluster and a Redis server of the suite's
# own (temporary, on free ports; the shared ones are not touched), a steady
# load of 1- to 3-unit orders from the native checkout, Stripe and Shopify
# through senders that retry as a channel does, and one fault after another:
# a loop of worker SIGKILLs, Redis FLUSHALL, Redis kill -9 and restarted
# empty, Postgres restarted with -m immediate, the SMTP server down. Prints
# one row per fault (orders accepted, lost, duplicate codes, orders fulfilled
# twice, duplicate emails, seconds until all was done after the fault, the
# webhook p99 during it) and fails when an order is lost, a code issued twice,
# an order fulfilled twice, or (full run) a fault took over 30 s to heal.
#
#   bash ops/chaos.sh                 # the full run (25 kills, SMTP down 2 min): about 10 minutes
#   bash ops/chaos.sh --quick         # the short one the test suite runs: 2 to 3 minutes
#   bash ops/chaos.sh --rate 50 --kills 40 --smtp-down-secs 60
#   BENCH_LOG=entitle=debug bash ops/chaos.sh --quick   # the processes' RUST_LOG
set -euo pipefail
cd "$(dirname "$0")/.."
source ops/lib.sh

ensure_cargo
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || apt_install postgresql
command -v redis-server >/dev/null || apt_install redis-server
say "cargo build --release (fault suite, gateway, worker)"
cargo build --release --locked -p entitle-bench -p entitle-gateway -p entitle-worker
exec "${CARGO_TARGET_DIR:-target}/release/entitle-bench" chaos "$@"
