#!/usr/bin/env bash
# Runs Entitle locally: the gateway on 127.0.0.1:8080, the worker, and an SMTP
# sink on 127.0.0.1:2525 whose messages land in var/mail/. Starts (installing
# when missing) Postgres and Redis, creates the `entitle` database, generates
# local keys in var/entitle.local.toml, migrates and loads the catalogue.
#
# Without ENTITLE_STRIPE__API_KEY, Stripe's API is stood in for locally so
# `ops/demo-order.sh` can place orders; with it, the real Stripe API is used.
set -euo pipefail
cd "$(dirname "$0")/.."
source ops/lib.sh

ensure_stack
mkdir -p var/mail var/log

config=var/entitle.local.toml
if [ ! -f "$config" ]; then
    say "writing local keys and secrets to $config (not committed)"
    key() { head -c 32 /dev/urandom | base64; }
    cat > "$config" <<TOML
# Local settings made by ops/run.sh; layered over ops/entitle.default.toml.
[database]
url = "postgres://postgres@127.0.0.1:5432/entitle"

[codes]
hash_key = "$(key)"
seal_key = "$(key)"

[stripe]
webhook_secrets = ["whsec_local_$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"]
api_key = "sk_test_local"

[shopify]
webhook_secrets = ["shpss_local_$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"]

[native]
webhook_secrets = ["whsec_$(key)"]
TOML
fi
export ENTITLE_CONFIG="$PWD/$config"

db_exists=$(psql "$DATABASE_URL" -qAtc "SELECT 1 FROM pg_database WHERE datname = 'entitle'")
if [ -z "$db_exists" ]; then
    say "creating database entitle"
    psql "$DATABASE_URL" -qc "CREATE DATABASE entitle" >/dev/null
fi

say "building"
cargo build --locked --bins
bin=target/debug

pids=()
stop() {
    trap - INT TERM EXIT
    say "stopping"
    kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap stop INT TERM EXIT

"$bin/entitle-mailsink" 2525 var/mail & pids+=($!)
if [ -z "${ENTITLE_STRIPE__API_KEY:-}" ]; then
    "$bin/entitle-demo" stripe-api 12111 & pids+=($!)
    export ENTITLE_STRIPE__API_BASE="http://127.0.0.1:12111"
    wait_for_port 127.0.0.1 12111 "the Stripe API stand-in"
fi
"$bin/entitle-gateway" migrate
# A console admin for the demo (the first run creates it; later runs keep it).
console_password=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
if ENTITLE_STAFF_PASSWORD="$console_password" "$bin/entitle-gateway" create-staff \
        --name you --email you@example.com --role admin --reason "local demo" >/dev/null 2>&1; then
    console_login="you@example.com, password $console_password (shown once)"
else
    console_login="you@example.com (password shown at the first run; or create-staff another)"
fi
# A platform key for the demo's redemptions, kept in var/ (never committed).
# Named by the moment it was made: a database that outlived var/ (a fresh
# clone against the same local Postgres) still holds the earlier one, whose
# secret is gone, and names of active keys are unique.
if [ ! -s var/platform.key ]; then
    (umask 077; "$bin/entitle-gateway" create-platform-key \
        --name "demo-platform-$(date -u +%Y%m%dT%H%M%S)" \
        --reason "local demo" > var/platform.key)
fi
platform_key=$(cat var/platform.key)
"$bin/entitle-gateway" serve 2> >(tee var/log/gateway.log >&2) & pids+=($!)
"$bin/entitle-worker" run 2> >(tee var/log/worker.log >&2) & pids+=($!)
wait_for_port 127.0.0.1 8080 "the gateway"

cat >&2 <<TEXT

Entitle is running.
  gateway    http://127.0.0.1:8080   (health: /healthz, /readyz; metrics: http://127.0.0.1:9090/metrics)
  console    http://127.0.0.1:8080/console   sign in as $console_login
  emails     var/mail/*.eml          (SMTP sink on 127.0.0.1:2525)
  config     $config
Place an order:   ops/demo-order.sh you@example.com 3
Redeem a code:    the link in its email (/redeem), or the platform API:
                  curl -s -X POST http://127.0.0.1:8080/v1/redemptions -H "Authorization: Bearer $platform_key" \\
                    -H 'content-type: application/json' -d '{"code":"<code>","account_id":"acct_1","entity_ref":"me"}'
Admin token:      ENTITLE_CONFIG=$config $bin/entitle-gateway create-token --name you --role admin
Operator CLI:     ENTITLE_TOKEN=<token> $bin/entitlectl order find --email you@example.com
Stop:             Ctrl-C

TEXT
wait -n "${pids[@]}"
