#!/usr/bin/env bash
# Mutation fuzzing of the file readers (tests/fuzz_readers.rs) for a fixed time per target, on
# the stable toolchain. Prints executions, panics, slow inputs and huge allocations per target;
# failing inputs are saved under $JUMPLENS_FUZZ_OUT (default target/fuzz-findings): copy the
# interesting ones to tests/fixtures/fuzz/<target>/ so that CI replays them.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET=600] [SEED=1] [TARGETS=all, or a comma list]
set -euo pipefail
cd "$(dirname "$0")/.."
export JUMPLENS_FUZZ_SECS=${1:-600}
export JUMPLENS_FUZZ_SEED=${2:-1}
if [ -n "${3:-}" ]; then export JUMPLENS_FUZZ_ONLY=$3; fi
cargo test --release --test fuzz_readers fuzz_for_a_while -- --ignored --nocapture
