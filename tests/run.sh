#!/usr/bin/env bash
# Runs every test Roony has: Rust unit and integration tests (real redb, the real
# async-stripe client against the Stripe emulator, the real binary), then the Python
# suites that drive the built binary with official clients and the Stripe OpenAPI spec.
# Works on a fresh machine: it creates its own Python virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/roony-target}"
VENV="${ROONY_VENV:-$HOME/.cache/roony-venv}"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/py/requirements.txt

cargo build --locked --bin roony
cargo test --locked

ROONY_BIN="$CARGO_TARGET_DIR/debug/roony" "$VENV/bin/python" -m pytest tests/py -q -p no:cacheprovider
