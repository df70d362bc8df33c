#!/usr/bin/env bash
# Runs every check and test: formatting, lints, Rust tests, Python client tests.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo build --bins
cargo test

if [ -f clients/python/pyproject.toml ]; then
    venv="${TALLY_VENV:-target/py-venv}"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet --upgrade pip >/dev/null
    "$venv/bin/pip" install --quiet ./clients/python pytest
    TALLY_BIN="$PWD/target/debug/tally" "$venv/bin/python" -m pytest -q clients/python/tests
fi
