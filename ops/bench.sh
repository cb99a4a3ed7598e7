#!/usr/bin/env bash
# Entitle's benchmarks: reconciliation of 1,000,000 Stripe orders on both
# sides, and the expiry sweep over 1,000,000 expiring codes among 5,000,000.
# Prints each figure next to its floor and fails when one is missed. Needs
# about 3 GB of free disk for the (temporary) benchmark databases.
#
#   bash ops/bench.sh                 # both, full size
#   bash ops/bench.sh reconcile       # one of them
#   bash ops/bench.sh --orders 100000 # smaller (see --help)
set -euo pipefail
cd "$(dirname "$0")/.."
source ops/lib.sh

ensure_stack
say "cargo build --release -p entitle-bench"
cargo build --release --locked -p entitle-bench
exec ./target/release/entitle-bench "$@"
