#!/usr/bin/env bash
# Tandem's main job on one machine: set up a fresh Debian 12 machine
# (packages, release build), then
#  1. the host cluster (scripts/host-lab.sh): three tandem-host agents, each in
#     its own network namespace on its own libvirt test-driver hypervisor, six
#     HA VMs (examples/lab/); crash a host and watch its VMs come back on the
#     others, with the failover timeline;
#  2. start a real PostgreSQL and nginx on loopback in a temporary directory
#     and watch them with `tandemctl probe`; halfway through, nginx is stopped
#     and started again so you see a failure being detected and cleared;
#  3. start a two-node guest cluster (two tandem-guest agents on loopback
#     addresses, each "node" in a cgroup of its own, a lease file as the shared
#     disk) running an application that writes its fencing token, crash the
#     active node and watch the group come back on the other one.
# Everything is removed on exit.
#
#   ROUNDS=20 bash scripts/lab.sh      # more probe rounds
#   KEEP=1 bash scripts/host-lab.sh    # only the host cluster, left running
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-10}

[ "$(id -u)" = 0 ] || { echo "run as root (it installs packages and starts servers as their own users)" >&2; exit 1; }
command -v cargo >/dev/null || { echo "cargo not found: install the Rust toolchain (rustup, Rust >= 1.85) first" >&2; exit 1; }

echo "== installing Debian packages"
bash .ci/install-deps
echo "== building tandemctl, tandem-host and tandem-guest (release)"
cargo build --release --locked -q -p tandemctl -p tandem-host -p tandem-guest
CTL=$PWD/target/release/tandemctl
GUEST=$PWD/target/release/tandem-guest

echo "== part 1: a three-host cluster with six HA VMs"
HOST=$PWD/target/release/tandem-host CTL=$CTL bash scripts/host-lab.sh
echo "== part 2: application probes"

LAB=$(mktemp -d /tmp/tandem-lab.XXXXXX)
chmod 755 "$LAB"
PGBIN=/usr/lib/postgresql/15/bin
cleanup() {
  for n in n1 n2; do [ -d "${CG:-/nonexistent}/$n" ] && echo 1 >"$CG/$n/cgroup.kill" 2>/dev/null || true; done
  [ -n "${EVENTS_PID:-}" ] && kill "$EVENTS_PID" 2>/dev/null || true
  sleep 0.3
  [ -n "${CG:-}" ] && find "$CG" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  [ -f "$LAB/nginx.pid" ] && kill "$(cat "$LAB/nginx.pid")" 2>/dev/null || true
  [ -d "$LAB/pg" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$LAB/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$LAB"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PGPORT=$(free_port); HTTPPORT=$(free_port)

echo "== starting PostgreSQL on 127.0.0.1:$PGPORT"
install -d -o postgres -g postgres "$LAB/pg" "$LAB/pgsock" "$LAB/pglog"
echo labpass >"$LAB/pgpass"; chown postgres "$LAB/pgpass"
runuser -u postgres -- "$PGBIN/initdb" -D "$LAB/pg" -U tandem --auth-local=trust --auth-host=scram-sha-256 --pwfile="$LAB/pgpass" >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$LAB/pg" -l "$LAB/pglog/pg.log" -w \
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

echo
echo "== part 3: a two-node guest cluster"
CG=$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)
[ -n "$CG" ] || { echo "no cgroup2 mount: skipping the guest cluster part" >&2; exit 0; }
CG="$CG/tandem-lab-$$"
mkdir -p "$CG/n1" "$CG/n2" "$LAB/shared"
head -c 32 /dev/urandom | base64 >"$LAB/cluster.key"
"$CTL" lease init --device "$LAB/lease.img" --hosts 8 --resources 16 --cluster-id lab --renewal-ms 300 >/dev/null
HB=$(free_port); API=$(free_port)
cat >"$LAB/tandem.toml" <<TOML
[cluster]
name = "lab"
key_file = "$LAB/cluster.key"
state_dir = "$LAB"

[[link]]
name = "lo"
port = $HB
interval = "100ms"
timeout = "1s"

[lease]
device = "$LAB/lease.img"
renewal_interval = "300ms"

[[node]]
name = "n1"
id = 1
links = { lo = "127.0.0.11" }
api = "127.0.0.11:$API"
fence = { kind = "command", command = ["/bin/sh", "-c", "echo 1 > $CG/n1/cgroup.kill"] }

[[node]]
name = "n2"
id = 2
links = { lo = "127.0.0.12" }
api = "127.0.0.12:$API"
fence = { kind = "command", command = ["/bin/sh", "-c", "echo 1 > $CG/n2/cgroup.kill"] }

[[group]]
name = "app"
nodes = ["n1", "n2"]

  [[group.resource]]
  name = "data"
  kind = "disk"
  directory = "$LAB/shared"

  [[group.resource]]
  name = "writer"
  kind = "exec"
  mode = "simple"
  start = ["/bin/sh", "-c", "while :; do echo \"\$(date +%T.%N | cut -c1-12) token \$TANDEM_FENCING_TOKEN on \$TANDEM_NODE\" >> $LAB/shared/writer.log; sleep 0.5; done"]
TOML
"$GUEST" validate --config "$LAB/tandem.toml"
start_node() {  # name: the agent, its guard and its application all live in the node's cgroup
  sh -c "echo \$\$ > $CG/$1/cgroup.procs; exec env TANDEM_NODE=$1 $GUEST --config $LAB/tandem.toml --cgroup-root $CG/$1/groups" \
    2>"$LAB/$1.log" &
  disown
}
start_node n1; sleep 3; start_node n2; sleep 3
echo "-- status as n2 sees it"
"$CTL" --endpoint "http://127.0.0.12:$API" status
echo "-- the application's log (in the shared directory):"; tail -n 3 "$LAB/shared/writer.log"
echo "-- n2's event feed, from now on:"
"$CTL" --endpoint "http://127.0.0.12:$API" events & EVENTS_PID=$!
sleep 1
echo "-- $(date +%T.%N | cut -c1-12) crashing node n1 (every process in its cgroup)"
echo 1 >"$CG/n1/cgroup.kill"
sleep 6
kill "$EVENTS_PID" 2>/dev/null || true; EVENTS_PID=
echo "-- status as n2 sees it"
"$CTL" --endpoint "http://127.0.0.12:$API" status
echo "-- the application's log around the takeover: the fencing token went up, one writer at a time"
awk '{ if (prev != "" && $3 != tok) { print prev; print } prev = $0; tok = $3 }' "$LAB/shared/writer.log"
echo "== done; servers and agents stopped and $LAB removed"
