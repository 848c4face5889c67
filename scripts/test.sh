#!/usr/bin/env bash
# Runs Tandem's whole test suite on a Debian 12 machine, as root:
# installs the Debian packages the tests need (real PostgreSQL, nginx,
# OpenSMTPD, dovecot, vsftpd, monitoring-plugins, resource-agents), then
# checks formatting and lints and runs every test. The tests start their own
# servers on loopback; nothing system-wide is started.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "cargo not found: install the Rust toolchain (rustup, Rust >= 1.85) first" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "run as root: the tests start servers as their own users and manage network namespaces" >&2
  exit 1
fi

echo "== installing Debian packages"
bash .ci/install-deps

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test"
# The host agent's end-to-end tests run the guest agent binary this build makes.
export TANDEM_GUEST_BIN="$PWD/target/debug/tandem-guest"
# The end-to-end tests append their measured failover times here (tandem_testkit::report);
# cargo hides a passing test's output, so the report is printed at the end.
report="${CARGO_TARGET_DIR:-$PWD/target}/failover-report.txt"
rm -f "$report"
status=0
cargo test --workspace --locked --no-fail-fast || status=$?

echo "== failover times measured by the end-to-end tests"
if [ -s "$report" ]; then
  sort "$report"
else
  echo "(none recorded)"
fi
exit "$status"
