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

echo "== sanlock side by side (sanlock from Debian, daemon started here)"
if ! command -v sanlock >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends sanlock >/dev/null 2>&1 || true
  fi
fi
SANLOCK_DOC="documented: a dead host's leases are free after host_dead_seconds = 8 x io_timeout + 60 s = 140 s at the default io_timeout of 10 s (sanlock(8))"
if ! command -v sanlock >/dev/null; then
  echo "sanlock is not installed (apt-get install sanlock); $SANLOCK_DOC"
else
  # -w 0: no watchdog (wdmd) on this machine; -U/-G root: no sanlock user needed.
  sanlock daemon -D -w 0 -U root -G root >"$D/sanlock.log" 2>&1 &
  sl=$!
  sleep 2
  if ! kill -0 "$sl" 2>/dev/null; then
    echo "sanlock daemon exited at start-up: $(grep -v '^$' "$D/sanlock.log" | tail -3 | tr '\n' ' ')"
    echo "(ulimit -l: soft $(ulimit -Sl), hard $(ulimit -Hl); the daemon raises RLIMIT_MEMLOCK at start)"
    echo "no sanlock baseline from this run; $SANLOCK_DOC"
  else
    # Not exercised on the build machines (the daemon never started there): kept simple.
    sanlock direct init -s "LS:0:$D/sl-ls:0" >/dev/null
    sanlock direct init -r "LS:r1:$D/sl-res:0" >/dev/null
    t0=$(now_ns); sanlock client add_lockspace -s "LS:1:$D/sl-ls:0" >/dev/null; t1=$(now_ns)
    echo "sanlock add_lockspace (join) $(( (t1 - t0) / 1000000 )) ms"
    t0=$(now_ns); sanlock client command -r "LS:r1:$D/sl-res:0" -c /bin/true >/dev/null; t1=$(now_ns)
    echo "sanlock acquire + run /bin/true + release $(( (t1 - t0) / 1000000 )) ms"
    echo "sanlock takeover after a holder's death: not run (it takes >= 140 s); $SANLOCK_DOC"
    sanlock client shutdown -f 1 >/dev/null 2>&1 || kill "$sl"
    wait "$sl" 2>/dev/null || true
  fi
fi
