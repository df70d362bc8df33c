#!/usr/bin/env bash
# Runs every check and test: formatting, lints, Rust tests, Python client
# tests, the container image.
set -euo pipefail
cd "$(dirname "$0")/.."

# One Python venv for the Python client's tests, the SMTP server (aiosmtpd)
# that tests/otp.rs delivers mail to, schemathesis for the OpenAPI check and
# Playwright driving Debian's Chromium for the console (no browser download).
venv="${TALLY_VENV:-target/py-venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --upgrade pip >/dev/null
"$venv/bin/pip" install --quiet ./clients/python pytest aiosmtpd trustme schemathesis playwright
export TALLY_TEST_PYTHON="$PWD/$venv/bin/python"

cargo fmt --check
# Lints with every feature, then with none, as a release is built: some
# code compiles only without the test-only features.
cargo clippy --all-targets --all-features -- -D warnings
cargo clippy --all-targets -- -D warnings
# fault-injection adds admin ops for tests: debug_panic, which tests/panics.rs
# uses to prove a panic aborts the process and a restart recovers
# everything; debug_hold and debug_release, which tests/scan_limits.rs uses
# to hold the scans' permits.
cargo test --features fault-injection

TALLY_BIN="$(realpath "${CARGO_TARGET_DIR:-target}")/debug/tally" "$venv/bin/python" -m pytest -q clients/python/tests

# The container image, built and run with podman (says so when it cannot run).
"$venv/bin/python" tests/container.py
