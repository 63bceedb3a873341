#!/usr/bin/env bash
# Fault injection on a whole report (issue 19): kill -9 at N random moments of
# `jumplens report --quick` on BERT MLM and rerun each time; the final outputs must equal an
# uninterrupted run's bytes and no temporary file or lock may remain. Then a full disk (a small
# tmpfs; root only, else skipped with a message) and read-only outputs during each stage: each
# must fail with one error line and no panic, leave no temporary file, and the run must resume.
#
#   scripts/fault_injection.sh [N=20]
#   FI_TRAIN=300 FI_VAL=100 scripts/fault_injection.sh 5   # smaller sizes (faster)
#   JUMPLENS=path/to/jumplens FI_MODEL=... FI_CORPUS=... scripts/fault_injection.sh
#
# Prints one line per kill and a summary: kills survived, files compared, files differing.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}
MODEL=${FI_MODEL:-assets/bert_mlm}
CORPUS=${FI_CORPUS:-assets/wiki/summaries_en-us.json}
SIZES=()
[[ -n "${FI_TRAIN:-}" ]] && SIZES+=(--train "$FI_TRAIN")
[[ -n "${FI_VAL:-}" ]] && SIZES+=(--val "$FI_VAL")
if [[ -z "${JUMPLENS:-}" ]]; then
    cargo build --release --quiet
    JUMPLENS=${CARGO_TARGET_DIR:-target}/release/jumplens
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/jumplens-fi.XXXXXX")
trap 'umount "$WORK/disk" 2>/dev/null || true; rm -rf "$WORK"' EXIT
REPORT=(report "$MODEL" --corpus "$CORPUS" --quick "${SIZES[@]}" --quiet)
report() { "$JUMPLENS" "${REPORT[@]}" --out "$1"; }

# The run's files without the parts that are times by nature (wall_s, fit_s, gflops in the
# manifest; the page's timing table), as "sha256  path" lines.
digest() {
    (cd "$1" && find . -type f ! -name manifest.json ! -name report.html | sort | xargs sha256sum)
    python3 - "$1/manifest.json" <<'PY'
import hashlib, json, sys
def strip(v):
    if isinstance(v, dict):
        return {k: strip(x) for k, x in v.items() if k not in ("wall_s", "fit_s", "gflops", "path")}
    if isinstance(v, list):
        return [strip(x) for x in v]
    return v
m = strip(json.load(open(sys.argv[1])))
print(hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest(), " ./manifest.json (times stripped)")
PY
}
leftovers() { find "$1" \( -name '*.tmp' -o -name .lock \) | sort; }

start=$(date +%s.%N)
# Every run writes to the same path ($WORK/run: predict.json names its run folder), moved aside
# when finished.
report "$WORK/run" > "$WORK/ref.log" 2>&1 || { cat "$WORK/ref.log"; exit 1; }
mv "$WORK/run" "$WORK/ref"
ref_s=$(python3 -c "import time; print(time.time() - $start)")
echo "uninterrupted report: $(printf %.1f "$ref_s") s"
digest "$WORK/ref" > "$WORK/ref.sha"

survived=0
killed=0
for i in $(seq 1 "$N"); do
    # Each kill starts from an empty folder, so that a moment drawn uniformly over the
    # uninterrupted run's time hits each stage in proportion to its length.
    rm -rf "$WORK/run"
    at=$(python3 -c "import random; print(round(random.uniform(0.02, 1.0) * $ref_s, 2))")
    "$JUMPLENS" "${REPORT[@]}" --out "$WORK/run" > /dev/null 2>&1 &
    pid=$!  # jumplens itself (not a subshell), so that kill -9 hits it
    sleep "$at"
    if kill -9 "$pid" 2>/dev/null; then
        what="killed at ${at} s"; killed=$((killed + 1))
    else
        what="finished before ${at} s"
    fi
    wait "$pid" 2>/dev/null || true
    # The rerun must succeed from whatever the kill left.
    if report "$WORK/run" > "$WORK/rerun.log" 2>&1; then
        survived=$((survived + 1))
        echo "kill $i: $what; rerun ok"
    else
        echo "kill $i: $what; RERUN FAILED: $(tail -1 "$WORK/rerun.log")"
    fi
    digest "$WORK/run" > "$WORK/killed.sha"
    if ! diff -q "$WORK/ref.sha" "$WORK/killed.sha" > /dev/null; then
        echo "kill $i: outputs differ from the uninterrupted run:"; diff "$WORK/ref.sha" "$WORK/killed.sha" || true
        exit 1
    fi
    if [[ -n "$(leftovers "$WORK/run")" ]]; then
        echo "kill $i: left behind: $(leftovers "$WORK/run")"; exit 1
    fi
done
echo "kill -9: $killed of $N runs killed mid-way, $survived of $N reruns succeeded; $(wc -l < "$WORK/ref.sha") files equal the uninterrupted run's bytes; no temporary file or lock left"

one_error_line() {  # $1 = log: non-zero exit already checked; one "error" line, no panic
    if grep -q panicked "$1"; then echo "PANIC: $(cat "$1")"; return 1; fi
    [[ $(grep -c '^error' "$1") == 1 ]] || { echo "not one error line: $(cat "$1")"; return 1; }
}

mkdir -p "$WORK/disk"
if ! mount -t tmpfs -o size=2m tmpfs "$WORK/disk" 2>/dev/null; then
    echo "full disk / read-only: skipped (cannot mount a tmpfs here; needs root)"
    exit 0
fi
umount "$WORK/disk"
# Full disk at two moments: a disk too small for the activations (collect fails mid-write), and
# one that holds the collected run but not the maps (fit fails). Each must fail with one error
# line, leave no temporary file or lock, and resume on a large disk to the uninterrupted bytes.
collected_kb=$(du -sk "$WORK/ref/activations" | cut -f1)
for size_kb in 512 $((collected_kb + 256)); do
    mount -t tmpfs -o "size=${size_kb}k" tmpfs "$WORK/disk"
    if report "$WORK/disk/run" > "$WORK/full.log" 2>&1; then
        echo "full disk (${size_kb} KB): the report unexpectedly fit"; exit 1
    fi
    one_error_line "$WORK/full.log"
    [[ -z "$(leftovers "$WORK/disk/run")" ]] || { echo "full disk: left $(leftovers "$WORK/disk/run")"; exit 1; }
    kept=$(cd "$WORK/disk/run" && find . -type f ! -name '.*' | sort | tr '\n' ' ')
    echo "full disk (${size_kb} KB): $(grep '^error' "$WORK/full.log"); kept: ${kept:-nothing}"
    # Resume on a large disk from what the full one kept.
    rm -rf "$WORK/run"
    cp -a "$WORK/disk/run" "$WORK/run"
    umount "$WORK/disk"
    report "$WORK/run" > "$WORK/resume.log" 2>&1 || { echo "full disk: resume failed: $(tail -1 "$WORK/resume.log")"; exit 1; }
    if digest "$WORK/run" | diff -q "$WORK/ref.sha" - > /dev/null; then
        echo "full disk (${size_kb} KB): resumed elsewhere, outputs equal the uninterrupted run's"
    else
        echo "full disk (${size_kb} KB): resumed outputs DIFFER:"; digest "$WORK/run" | diff "$WORK/ref.sha" - || true; exit 1
    fi
done

# Read-only outputs: a finished run on a tmpfs remounted read-only; every stage must refuse
# with one line and leave the files as they were.
mount -t tmpfs -o size=2g tmpfs "$WORK/disk"
cp -a "$WORK/ref" "$WORK/disk/run"
mount -o remount,ro "$WORK/disk"
for stage in "collect $MODEL --corpus $CORPUS --quiet" "fit --quiet" "r2" "predict --quiet" "early-exit" "submodules --quiet"; do
    read -r -a args <<< "$stage"
    cmd=("$JUMPLENS" "${args[0]}")
    # (r2 and early-exit draw no progress, so they take no --quiet.)
    [[ ${args[0]} == collect ]] && cmd+=("${args[@]:1}" --out "$WORK/disk/run") || cmd+=("$WORK/disk/run" "${args[@]:1}")
    if "${cmd[@]}" > "$WORK/ro.log" 2>&1; then
        echo "read-only ${args[0]}: unexpectedly succeeded"; exit 1
    fi
    one_error_line "$WORK/ro.log"
    echo "read-only ${args[0]}: $(grep '^error' "$WORK/ro.log")"
done
if digest "$WORK/disk/run" | diff -q "$WORK/ref.sha" - > /dev/null; then
    echo "read-only: files unchanged"
else
    echo "read-only: files CHANGED"; exit 1
fi
umount "$WORK/disk"
