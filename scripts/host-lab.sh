#!/usr/bin/env bash
# The host-cluster lab (part 1 of scripts/lab.sh; runnable alone once built):
# three tandem-host agents, each in its own network namespace (tlab-h1..3 on a
# private bridge, 10.77.0.1-3) on its own libvirt test-driver hypervisor, six
# HA VMs from examples/lab/. It shows the cluster, crashes host h1 (every
# process of the host at once: its test-driver VMs vanish with it) and prints
# where its VMs came back and the failover timeline.
#   HOST=target/release/tandem-host CTL=target/release/tandemctl bash scripts/host-lab.sh
#   KEEP=1 ...   # leave the lab running (Ctrl-C removes it)
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${HOST:-$PWD/target/release/tandem-host}
CTL=${CTL:-$PWD/target/release/tandemctl}
[ -x "$HOST" ] && [ -x "$CTL" ] || { echo "build first: cargo build --release -p tandem-host -p tandemctl" >&2; exit 1; }

LAB=$(mktemp -d /tmp/tandem-host-lab.XXXXXX)
chmod 755 "$LAB"
CG=$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)/tandem-host-lab-$$
HOSTS="h1 h2 h3"
cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    for h in $HOSTS; do [ -f "$LAB/$h.log" ] && { echo "--- $h's log (last lines)"; tail -n 15 "$LAB/$h.log"; }; done
  fi
  for h in $HOSTS; do [ -d "$CG/$h" ] && echo 1 >"$CG/$h/cgroup.kill" 2>/dev/null || true; done
  [ -n "${EVENTS_PID:-}" ] && kill "$EVENTS_PID" 2>/dev/null || true
  sleep 0.5
  find "$CG" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  for h in $HOSTS; do ip netns del "tlab-$h" 2>/dev/null || true; done
  ip link del tlab-br 2>/dev/null || true
  rm -rf "$LAB"
}
trap cleanup EXIT

# The private network: a bridge in this namespace, one namespace per host.
ip link add tlab-br type bridge
ip addr add 10.77.0.254/24 dev tlab-br
ip link set tlab-br up
i=0
for h in $HOSTS; do
  i=$((i + 1))
  ip netns add "tlab-$h"
  ip link add "tlab-$h" type veth peer name eth0 netns "tlab-$h"
  ip link set "tlab-$h" master tlab-br up
  ip -n "tlab-$h" addr add "10.77.0.$i/24" dev eth0
  ip -n "tlab-$h" link set eth0 up
  ip -n "tlab-$h" link set lo up
done

cp -r examples/lab/. "$LAB/"
sed -i "s#@LAB@#$LAB#g" "$LAB/host.toml"
for h in $HOSTS; do cp "$LAB/host-template.xml" "$LAB/$h.xml"; done
head -c 32 /dev/urandom | base64 >"$LAB/cluster.key"
"$CTL" lease init --device "$LAB/lease.img" --hosts 8 --resources 32 --cluster-id lab --renewal-ms 500 >/dev/null
"$HOST" validate --config "$LAB/host.toml"

start_host() {  # the agent and its guard live in the host's cgroup, so one write kills the whole "host"
  mkdir -p "$CG/$1"
  # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup tree.
  sh -c "echo \$\$ > $CG/$1/cgroup.procs; exec nsenter --net=/run/netns/tlab-$1 env TANDEM_NODE=$1 $HOST --config $LAB/host.toml --cgroup-root $CG/$1/groups" \
    2>"$LAB/$1.log" &
  disown
}
echo "== starting three host agents (joining the lease area takes a few seconds)"
for h in $HOSTS; do start_host "$h"; done
ctl() { "$CTL" --endpoint "http://10.77.0.$1:7701" "${@:2}"; }

# Wait until every VM runs.
for _ in $(seq 60); do
  running=$(ctl 2 vms --json 2>/dev/null | python3 -c 'import json,sys; print(sum(1 for v in json.load(sys.stdin)["vms"] if v["state"]=="running"))' 2>/dev/null || echo 0)
  [ "$running" = 6 ] && break
  sleep 1
done
echo "== the cluster, as h2 sees it"
ctl 2 hosts
ctl 2 vms
echo "-- h1's own hypervisor (libvirt's view):"
ctl 1 domains

echo "-- h2's event feed from now on (timeline below)"
ctl 2 events >"$LAB/events.txt" 2>&1 & EVENTS_PID=$!
sleep 1
T0=$(date +%s.%N)
echo "== $(date +%T.%N | cut -c1-12) crashing host h1 (every process in its cgroup; its VMs vanish with it)"
echo 1 >"$CG/h1/cgroup.kill"
for _ in $(seq 120); do
  moved=$(ctl 2 vms --json 2>/dev/null | python3 -c '
import json,sys
vms = json.load(sys.stdin)["vms"]
print(int(all(v["state"] == "running" and v.get("host") not in (None, "", "h1") for v in vms)))' 2>/dev/null || echo 0)
  [ "$moved" = 1 ] && break
  sleep 0.5
done
T1=$(date +%s.%N)
kill "$EVENTS_PID" 2>/dev/null || true; EVENTS_PID=
echo "== every VM runs again, $(python3 -c "print(f'{$T1 - $T0:.1f}')") s after the crash"
ctl 2 hosts
ctl 2 vms
echo "-- the failover timeline (h2's event feed):"
cat "$LAB/events.txt"

echo "== h1 boots again and rejoins (its VMs stay where they are: failback is manual)"
start_host h1
# Rejoined means: its own API answers with quorum (it joined the lease area), and h2 hears it.
for _ in $(seq 60); do
  ctl 1 hosts --json 2>/dev/null | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["quorum"] else 1)' \
    && ctl 2 hosts --json 2>/dev/null | python3 -c 'import json,sys; sys.exit(0 if any(h["name"]=="h1" and h["state"]=="up" for h in json.load(sys.stdin)["hosts"]) else 1)' \
    && break
  sleep 1
done
sleep 2  # its host lease is seen renewed by the others
echo "== planned maintenance of h2: its VMs shut down cleanly and start elsewhere; nothing counts as a failure"
ctl 3 maintenance enter h2 --wait   # h3 forwards it to h2
ctl 3 vms
echo "== h2's maintenance ends: it takes VMs again"
ctl 3 maintenance exit h2 --wait
if [ -n "${KEEP:-}" ]; then
  echo "== the lab keeps running in $LAB; try: $CTL --endpoint http://10.77.0.2:7701 vms   (Ctrl-C ends it)"
  sleep infinity
fi
echo "== host lab done; agents stopped, namespaces and $LAB removed"
