# Shared by ops/run.sh and ops/test.sh: make sure Postgres and Redis answer on
# 127.0.0.1, starting them (and installing them from the distribution's
# packages) only when they do not.
#
# Respects DATABASE_URL (admin connection, default the local postgres
# database) and REDIS_URL.

set -euo pipefail

: "${DATABASE_URL:=postgres://postgres@127.0.0.1:5432/postgres}"
: "${REDIS_URL:=redis://127.0.0.1:6379}"
export DATABASE_URL REDIS_URL

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root (or sudo) to run: $*"; fi
}

apt_updated=0
apt_install() {
    command -v apt-get >/dev/null || die "cannot install $* : no apt-get here; install it by hand"
    if [ "$apt_updated" = 0 ]; then
        say "apt-get update"
        as_root apt-get update -qq
        apt_updated=1
    fi
    say "installing $* from the distribution's packages"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Is something listening on host:port? (bash's /dev/tcp; no extra tools.)
port_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# host and port of a URL like scheme://user@host:port/path
url_host() { local u="${1#*://}"; u="${u#*@}"; u="${u%%/*}"; echo "${u%%:*}"; }
url_port() { local u="${1#*://}"; u="${u#*@}"; u="${u%%/*}"; [[ "$u" == *:* ]] && echo "${u##*:}" || echo "$2"; }

wait_for_port() {
    local host=$1 port=$2 what=$3
    for _ in $(seq 1 60); do
        port_open "$host" "$port" && return 0
        sleep 0.5
    done
    die "$what did not start listening on $host:$port"
}

ensure_postgres() {
    local host port
    host=$(url_host "$DATABASE_URL"); port=$(url_port "$DATABASE_URL" 5432)
    if port_open "$host" "$port"; then
        command -v psql >/dev/null || apt_install postgresql-client
    else
        case "$host" in 127.0.0.1|localhost) ;; *) die "Postgres at $host:$port does not answer";; esac
        command -v pg_ctlcluster >/dev/null || apt_install postgresql
        local version
        version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
        if [ -z "$version" ]; then
            version=$(ls /usr/lib/postgresql | sort -V | tail -n1)
            as_root pg_createcluster "$version" main >/dev/null
        fi
        say "starting PostgreSQL $version"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
        wait_for_port "$host" "$port" PostgreSQL
    fi
    # A fresh Debian cluster asks for a password over TCP; a local development
    # cluster is opened to the postgres user on the loopback address instead.
    if ! psql "$DATABASE_URL" -qAtc 'SELECT 1' >/dev/null 2>&1; then
        local hba
        hba=$(as_root find /etc/postgresql -name pg_hba.conf 2>/dev/null | sort -V | tail -n1)
        [ -n "$hba" ] || die "cannot connect to $DATABASE_URL and found no local pg_hba.conf to fix"
        say "allowing the postgres user on 127.0.0.1 without password ($hba)"
        as_root sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
        as_root pg_ctlcluster --skip-systemctl-redirect "$(basename "$(dirname "$(dirname "$hba")")")" main reload
        sleep 1
        psql "$DATABASE_URL" -qAtc 'SELECT 1' >/dev/null || die "cannot connect to $DATABASE_URL"
    fi
}

ensure_redis() {
    local host port
    host=$(url_host "$REDIS_URL"); port=$(url_port "$REDIS_URL" 6379)
    port_open "$host" "$port" && return 0
    case "$host" in 127.0.0.1|localhost) ;; *) die "Redis at $host:$port does not answer";; esac
    command -v redis-server >/dev/null || apt_install redis-server
    say "starting Redis on $host:$port"
    local dir
    dir=$(mktemp -d)
    redis-server --daemonize yes --bind "$host" --port "$port" --save "" --appendonly no \
        --dir "$dir" --logfile "$dir/redis.log"
    wait_for_port "$host" "$port" Redis
}

ensure_cargo() {
    if ! command -v cargo >/dev/null; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null || apt_install cargo
    local minor
    minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
    [ "$minor" -ge 94 ] || die "Rust 1.94 or newer is needed (found $(rustc --version)); install it with rustup"
    command -v cc >/dev/null || apt_install gcc
}

# The console's browser tests drive Debian's Chromium through chromedriver.
ensure_chromium() {
    local missing=()
    command -v chromium >/dev/null || missing+=(chromium)
    command -v chromedriver >/dev/null || missing+=(chromium-driver)
    [ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
}

ensure_stack() {
    ensure_cargo
    ensure_postgres
    ensure_redis
}
