#!/usr/bin/env bash
# Entitle's benchmarks, on the release build: the pipeline (webhook intake,
# backlog drains with one and two worker processes, a 100,000-order drain,
# latency at a steady rate), 80,000 batch codes redeemed once each and as
# many checked through the platform API (16 connections, a platform key),
# reconciliation of 1,000,000 Stripe orders on both sides, and the expiry
# sweep over 1,000,000 expiring codes among 5,000,000. Prints each figure
# next to its floor (pipeline and redemption figures next to a pgbench run
# taken in the same sitting, and the ratio) and fails when one is missed.
# Needs about 3 GB of free disk for the temporary databases.
#
#   bash ops/bench.sh                 # all of them, full size
#   bash ops/bench.sh pipeline        # one of them (intake, redeem, check, engines, ...)
#   bash ops/bench.sh --orders 100000 reconcile # smaller (see --help)
#   bash ops/bench.sh --codes 20000 redeem      # fewer codes redeemed
#   bash ops/bench.sh --expiry-codes 500000 --expiring 100000 expiry
set -euo pipefail
cd "$(dirname "$0")/.."
source ops/lib.sh

ensure_stack
# The pipeline's floor is a pgbench run.
command -v pgbench >/dev/null || apt_install postgresql-client
say "cargo build --release (benchmarks, gateway, worker)"
cargo build --release --locked -p entitle-bench -p entitle-gateway -p entitle-worker
exec ./target/release/entitle-bench "$@"
