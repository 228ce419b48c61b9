#!/usr/bin/env bash
# Runs the whole Antumbra test suite: formatting, lints, unit, integration and end-to-end tests.
#
# It installs what the tests need when it is missing (Debian/Ubuntu packages: openssl, curl, jq, PostgreSQL,
# redis-server, mosquitto and its clients, python3-paho-mqtt), starts a private PostgreSQL and a private Redis on free loopback ports for this run only,
# and stops them when it ends. Usage: tests/run.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# --- what the tests need -------------------------------------------------------------------------------
pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
missing=()
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v jq >/dev/null 2>&1 || missing+=(jq)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
[ -x "$(pg_bindir)/initdb" ] || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v mosquitto_sub >/dev/null 2>&1 || missing+=(mosquitto-clients)
[ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
/usr/bin/python3 -c 'import paho.mqtt' >/dev/null 2>&1 || missing+=(python3-paho-mqtt)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- private servers -----------------------------------------------------------------------------------
# Below the kernel's ephemeral range (32768 and up by default), so no outgoing connection holds the port.
free_port() {
  local port
  while :; do
    port=$(( RANDOM % 12000 + 20000 ))
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
  done
}

work=$(mktemp -d /tmp/antumbra-tests.XXXXXX)
chmod 755 "$work"
pg_port=$(free_port)
redis_port=$(free_port)
bin=$(pg_bindir)
as_pg=()
if [ "$(id -u)" -eq 0 ]; then
  # PostgreSQL refuses to run as root; the Debian package creates the postgres user.
  chown postgres "$work"
  as_pg=(runuser -u postgres --)
fi

cleanup() {
  "${as_pg[@]}" "$bin/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true
  [ -f "$work/redis.pid" ] && kill "$(cat "$work/redis.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

log "starting PostgreSQL on 127.0.0.1:$pg_port and Redis on 127.0.0.1:$redis_port"
"${as_pg[@]}" "$bin/initdb" -D "$work/pg" -U postgres -A trust --no-sync -E UTF8 >"$work/initdb.log" 2>&1 \
  || { cat "$work/initdb.log"; exit 1; }
# A port can still be taken between the check and the bind: try another one, a few times.
for attempt in 1 2 3 4 5; do
  "${as_pg[@]}" "$bin/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w -t 60 \
    -o "-p $pg_port -k $work -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=300 -c max_wal_size=64MB -c min_wal_size=32MB" \
    start >/dev/null && break
  [ "$attempt" -lt 5 ] || { cat "$work/pg.log"; exit 1; }
  pg_port=$(free_port)
  log "PostgreSQL could not start; trying port $pg_port"
done
redis_up() {
  for _ in $(seq 50); do
    [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] && return 0
    sleep 0.1
  done
  return 1
}
for attempt in 1 2 3 4 5; do
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --dir "$work" --pidfile "$work/redis.pid" --logfile "$work/redis.log"
  redis_up && break
  [ "$attempt" -lt 5 ] || { cat "$work/redis.log"; exit 1; }
  redis_port=$(free_port)
  log "Redis could not start; trying port $redis_port"
done

export ANTUMBRA_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
export ANTUMBRA_TEST_REDIS_URL="redis://127.0.0.1:$redis_port/0"

# A clean clone (CI) gains nothing from incremental compilation and would keep gigabytes of its files;
# set CARGO_INCREMENTAL=1 to keep them between local runs.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# --- checks and tests ----------------------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo test"
cargo test --workspace --locked "$@"
