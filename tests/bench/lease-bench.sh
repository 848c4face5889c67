#!/bin/bash
# Lease benchmark: uncontended join+acquire latency, takeover latency after SIGKILL of the holder
# (SIGKILL -> new holder's command starts), and lease I/O per host per second, at the default
# timeouts (R = 1000 ms) unless RENEWAL_MS is set. Usage:
#   cargo build --release -p tandemctl && tests/bench/lease-bench.sh [target/release/tandemctl]
set -euo pipefail
B=${1:-target/release/tandemctl}
R=${RENEWAL_MS:-1000}
RUNS=${RUNS:-3}
D=$(mktemp -d /tmp/lease-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$D"' EXIT
now_ns() { date +%s%N; }

"$B" lease init --device "$D/area" --hosts 16 --resources 16 --renewal-ms "$R" >/dev/null
echo "tandemctl lease benchmark, renewal R=$R ms, file-backed area on $(df --output=fstype "$D" | tail -1)"

echo "== uncontended: join + acquire (from tandemctl's own log), runs=$RUNS"
for i in $(seq "$RUNS"); do
  "$B" lease run --device "$D/area" --host-id 1 --resource "u$i" -- true 2>&1 | grep -o 'join [0-9]* ms, acquire [0-9]* ms'
done

echo "== takeover: SIGKILL of holder -> new holder's command starts, runs=$RUNS"
for i in $(seq "$RUNS"); do
  # Fresh host ids per run: a SIGKILLed host id cannot rejoin before T has passed.
  "$B" lease run --device "$D/area" --host-id $((2 * i + 2)) --resource takeover -- sleep 1000 2>/dev/null &
  holder=$!
  sleep $(( 2 + 4 * R / 1000 ))
  rm -f "$D/started"
  "$B" lease run --device "$D/area" --host-id $((2 * i + 3)) --resource takeover -- sh -c "date +%s%N > $D/started" 2>/dev/null &
  next=$!
  sleep $(( 1 + 3 * R / 1000 ))   # the contender has joined and is waiting
  t0=$(now_ns); kill -9 "$holder"; wait "$holder" 2>/dev/null || true
  wait "$next"
  t1=$(cat "$D/started")
  [ "$t1" -gt "$t0" ] || { echo "contender started before the SIGKILL: benchmark setup error" >&2; exit 1; }
  echo "takeover_ms $(( (t1 - t0) / 1000000 ))"
done

echo "== lease I/O per host per second while holding one resource (syscalls from /proc/PID/io over 10 s)"
"$B" lease run --device "$D/area" --host-id 15 --resource io -- sleep 1000 2>/dev/null &
h=$!
sleep $(( 2 + 4 * R / 1000 ))
r0=$(awk '/^syscr/{print $2}' /proc/$h/io); w0=$(awk '/^syscw/{print $2}' /proc/$h/io)
sleep 10
r1=$(awk '/^syscr/{print $2}' /proc/$h/io); w1=$(awk '/^syscw/{print $2}' /proc/$h/io)
kill -INT "$h"; wait "$h" 2>/dev/null || true
echo "reads_per_s $(( (r1 - r0) / 10 )) writes_per_s $(( (w1 - w0) / 10 )) (includes guard pipe writes: 1 per renewal)"
