#!/usr/bin/env bash
# Posts a signed, paid Stripe checkout.session.completed to the local gateway
# started by ops/run.sh. Usage: ops/demo-order.sh [EMAIL] [QUANTITY]
set -euo pipefail
cd "$(dirname "$0")/.."
config=var/entitle.local.toml
[ -f "$config" ] || { echo "start Entitle first: ops/run.sh" >&2; exit 1; }
# The first secret of the [stripe] section.
secret=$(awk '/^\[/ { in_stripe = ($0 == "[stripe]") }
              in_stripe && /^webhook_secrets/ { print; exit }' "$config" \
         | sed -E 's/^webhook_secrets = \["([^"]+)".*/\1/')
exec target/debug/entitle-demo order "${GATEWAY:-http://127.0.0.1:8080}" "$secret" \
    "${1:-you@example.com}" "${2:-3}"
