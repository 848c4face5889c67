#!/usr/bin/env bash
# Tandem's main job on one machine, for now: set up a fresh Debian 12
# machine (packages, release build), start a real PostgreSQL and nginx on
# loopback in a temporary directory, and watch them with `tandemctl probe`.
# Halfway through, nginx is stopped and started again so you see a failure
# being detected and cleared. Everything is removed on exit.
#
#   ROUNDS=20 bash scripts/lab.sh      # more rounds
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-10}

[ "$(id -u)" = 0 ] || { echo "run as root (it installs packages and starts servers as their own users)" >&2; exit 1; }
command -v cargo >/dev/null || { echo "cargo not found: install the Rust toolchain (rustup, Rust >= 1.85) first" >&2; exit 1; }

echo "== installing Debian packages"
bash .ci/install-deps
echo "== building tandemctl (release)"
cargo build --release --locked -q -p tandemctl
CTL=$PWD/target/release/tandemctl

LAB=$(mktemp -d /tmp/tandem-lab.XXXXXX)
chmod 755 "$LAB"
PGBIN=/usr/lib/postgresql/15/bin
cleanup() {
  [ -f "$LAB/nginx.pid" ] && kill "$(cat "$LAB/nginx.pid")" 2>/dev/null || true
  [ -d "$LAB/pg" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$LAB/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$LAB"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PGPORT=$(free_port); HTTPPORT=$(free_port)

echo "== starting PostgreSQL on 127.0.0.1:$PGPORT"
install -d -o postgres -g postgres "$LAB/pg" "$LAB/pgsock"
echo labpass >"$LAB/pgpass"; chown postgres "$LAB/pgpass"
runuser -u postgres -- "$PGBIN/initdb" -q -D "$LAB/pg" -U tandem --auth-local=trust --auth-host=scram-sha-256 --pwfile="$LAB/pgpass" >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$LAB/pg" -l "$LAB/pg.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $PGPORT -k $LAB/pgsock" start >/dev/null
runuser -u postgres -- "$PGBIN/createdb" -h "$LAB/pgsock" -p "$PGPORT" -U tandem lab

echo "== starting nginx on 127.0.0.1:$HTTPPORT"
mkdir -p "$LAB/www"; echo "tandem lab ok" >"$LAB/www/index.html"
cat >"$LAB/nginx.conf" <<NGINX
pid $LAB/nginx.pid;
error_log $LAB/nginx.err;
events {}
http {
  access_log off;
  client_body_temp_path $LAB/tmp; proxy_temp_path $LAB/tmp; fastcgi_temp_path $LAB/tmp;
  uwsgi_temp_path $LAB/tmp; scgi_temp_path $LAB/tmp;
  server { listen 127.0.0.1:$HTTPPORT; root $LAB/www; }
}
NGINX
start_nginx() { nginx -p "$LAB" -c "$LAB/nginx.conf"; }
start_nginx

probe() {
  "$CTL" probe --timeout 3 "$@" || true
}
echo "== watching (every 2 s, $ROUNDS rounds); nginx is stopped in round $((ROUNDS / 2)) and restarted two rounds later"
for i in $(seq 1 "$ROUNDS"); do
  if [ "$i" = $((ROUNDS / 2)) ]; then echo "-- stopping nginx"; kill "$(cat "$LAB/nginx.pid")"; sleep 0.5; fi
  if [ "$i" = $((ROUNDS / 2 + 2)) ]; then echo "-- starting nginx again"; start_nginx; sleep 0.3; fi
  echo "-- round $i, $(date +%T)"
  probe "postgresql://tandem@127.0.0.1:$PGPORT/lab" -o level=write --password-file "$LAB/pgpass"
  probe "http://127.0.0.1:$HTTPPORT/" -o body_regex='tandem lab ok'
  probe "tcp://127.0.0.1:$PGPORT"
  probe exec -- /usr/lib/nagios/plugins/check_http -H 127.0.0.1 -p "$HTTPPORT"
  sleep 2
done
echo "== done; servers stopped and $LAB removed"
