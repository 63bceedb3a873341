#!/usr/bin/env bash
# Benchmarks (not tests): jumplens against the reference implementations on the same inputs, in
# the same run, printed as a table with ratios.
#
#   scripts/bench.sh [RUN]
#
# Always: forward throughput on SmolLM2 (random sentences, all hidden states) at 32 x 24, 1 x 24
# and 8 x 128 tokens, jumplens vs PyTorch transformers (float32, 2 threads). With RUN (a collected
# SmolLM2 run, e.g. runs/smollm2-wiki): collection of the validation split's states (jumplens:
# prefix-only, length-grouped batches; PyTorch: the paper's pipeline, one forward per sentence cut
# after its position), the all-pairs fit on the training split (jumplens fit vs one scikit-learn
# LinearRegression per pair; PAIRS=K times only the first K sklearn pairs and extrapolates), then
# on a copy of the run r2, predict (both lenses, full-vocabulary casts) and sub-modules (3,000 fit /
# 300 eval), timed against the issue's targets (no reference implements them). REPORT=1 also times
# a whole `jumplens report` at paper size (9,000 / 3,000 sentences; ~10-21 minutes) in a
# temporary folder and prints its stage times.
#
# The paper-size RUN is what `jumplens report` writes with its defaults (9,000 training and 3,000
# validation sentences of assets/wiki, SmolLM2-135M; ~10-21 minutes on 2 cores):
#   target/release/jumplens report assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
#       --corpus assets/wiki/summaries_en-us.json --out runs/smollm2-wiki
# The script only reads RUN (it works on copies). BIN=path/to/jumplens picks another binary
# (default: $CARGO_TARGET_DIR/release/jumplens, else target/release/jumplens).
#
# Full authoritative command (quiet machine):
#   JUMPLENS_REF_PYTHON=.venv-ref/bin/python PAIRS=30 REPORT=1 scripts/bench.sh runs/smollm2-wiki
#
# The reference Python needs scripts/requirements-reference.txt:
#   python3 -m venv .venv-ref && .venv-ref/bin/pip install -r scripts/requirements-reference.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${JUMPLENS_REF_PYTHON:-.venv-ref/bin/python}
if [ ! -x "$PY" ]; then
    echo "reference Python not found at $PY: create .venv-ref (see the top of this script) or set JUMPLENS_REF_PYTHON" >&2
    exit 1
fi
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/jumplens}
MODEL=${MODEL:-assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
RUN=${1:-}
PAIRS=${PAIRS:-0}
REPORT=${REPORT:-0}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2

peak() { # peak RSS in MB of the command's process, from GNU time
    /usr/bin/time -f "%M" -o "$1" "${@:2}"
}

# Forward shapes: batch x tokens x timed iterations (after one warm-up each).
for shape in "32 24 5" "1 24 20" "8 128 5"; do
    set -- $shape
    tag="$1x$2"
    peak "$tmp/fj-$tag.mem" "$BIN" bench forward "$MODEL" --batch "$1" --seq "$2" --iters "$3" --ids-out "$tmp/ids-$tag.safetensors" > "$tmp/fj-$tag.json"
    peak "$tmp/ft-$tag.mem" "$PY" scripts/bench_torch.py forward "$MODEL" "$tmp/ids-$tag.safetensors" "$3" > "$tmp/ft-$tag.json"
done
if [ -n "$RUN" ]; then
    peak "$tmp/cj.mem" $BIN bench collect "$MODEL" --activations "$RUN/activations/val.safetensors" > "$tmp/cj.json"
    peak "$tmp/ct.mem" "$PY" scripts/bench_torch.py collect "$MODEL" "$RUN/activations/val.safetensors" > "$tmp/ct.json"
    cp -r "$RUN/manifest.json" "$RUN/activations" "$tmp/" && mkdir -p "$tmp/run" && mv "$tmp/manifest.json" "$tmp/activations" "$tmp/run/"
    start=$(date +%s.%N)
    peak "$tmp/fitj.mem" $BIN fit "$tmp/run" 2> "$tmp/fitj.log"
    echo "$(date +%s.%N) - $start" | bc > "$tmp/fitj.s"
    grep -o 'in [0-9.]* s ([0-9]* GFLOP/s)' "$tmp/fitj.log" > "$tmp/fitj.detail" || true
    "$BIN" r2 "$tmp/run" > /dev/null 2>&1
    for stage in predict submodules; do
        start=$(date +%s.%N)
        peak "$tmp/$stage.mem" "$BIN" "$stage" "$tmp/run" --quiet > /dev/null
        echo "$(date +%s.%N) - $start" | bc > "$tmp/$stage.s"
    done
    peak "$tmp/fitt.mem" "$PY" scripts/bench_fit_sklearn.py "$tmp/run/activations/train.safetensors" --key hidden_states \
        --max-pairs "$PAIRS" --out "$tmp/fitt.json" > "$tmp/fitt.s" 2> "$tmp/fitt.log"
fi

if [ "$REPORT" = 1 ]; then
    start=$(date +%s.%N)
    # Keep what the report said when it fails (the temporary folder is removed on exit).
    peak "$tmp/report.mem" "$BIN" report "$MODEL" --quiet --corpus assets/wiki/summaries_en-us.json --out "$tmp/report" 2> "$tmp/report.log" > /dev/null \
        || { echo "report failed; its last lines and stage times:" >&2; tail -n 5 "$tmp/report.log" >&2
             python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("stages"))' "$tmp/report/manifest.json" >&2 || true; exit 1; }
    echo "$(date +%s.%N) - $start" | bc > "$tmp/report.s"
fi

python3 - "$tmp" "$PAIRS" <<'PY'
import json, os, sys
tmp, pairs = sys.argv[1], int(sys.argv[2])
def has(name): return os.path.exists(os.path.join(tmp, name))
def secs(name): return float(open(os.path.join(tmp, name)).read())
def j(name): return json.load(open(os.path.join(tmp, name)))
def mem(name): return int(open(os.path.join(tmp, name)).read().split()[-1]) / 1024
rows = []
for tag in ("32x24", "1x24", "8x128"):
    fj, ft = j(f"fj-{tag}.json"), j(f"ft-{tag}.json")
    rows.append((f"forward {tag}, all states (tok/s; PyTorch)", fj["tokens_per_s"], ft["tokens_per_s"], fj["tokens_per_s"] / ft["tokens_per_s"], mem(f"fj-{tag}.mem"), mem(f"ft-{tag}.mem")))
if has("cj.json"):
    cj, ct = j("cj.json"), j("ct.json")
    rows.append((f"collect {cj['tokens']} prefix tokens (s)", cj["seconds"], ct["seconds"], ct["seconds"] / cj["seconds"], mem("cj.mem"), mem("ct.mem")))
    fs = float(open(os.path.join(tmp, "fitj.s")).read())
    ref = j("fitt.json")
    sk = ref.get("seconds_extrapolated_all", ref["seconds"])
    label = "fit all pairs (s)" + (f", sklearn extrapolated from {pairs} pairs" if pairs else "")
    rows.append((label, fs, sk, sk / fs, mem("fitj.mem"), mem("fitt.mem")))
    # Stages without a reference implementation: the reference column is the issue's target.
    for stage, target in (("predict", 40.0), ("submodules", 150.0)):
        rows.append((f"{stage} (s; reference = the issue's target)", secs(f"{stage}.s"), target, target / secs(f"{stage}.s"), mem(f"{stage}.mem"), float("nan")))
    detail = open(os.path.join(tmp, "fitj.detail")).read().strip()
    if detail:
        print(f"jumplens fit: {detail}")
if has("report.s"):
    rows.append(("whole report, paper size (s; reference = the issue's target)", secs("report.s"), 600.0, 600.0 / secs("report.s"), mem("report.mem"), float("nan")))
    stages = [l.strip() for l in open(os.path.join(tmp, "report.log")) if l.strip().endswith(" s") and "  " in l.strip()]
    if stages:
        print("jumplens report stages: " + "; ".join(" ".join(s.split()) for s in stages))
print(f"| benchmark | jumplens | reference | ratio (jumplens advantage) | peak MB jumplens | peak MB reference |")
print(f"|---|---|---|---|---|---|")
for r in rows:
    ref_mem = "—" if r[5] != r[5] else f"{r[5]:.0f}"  # NaN: no reference process
    print(f"| {r[0]} | {r[1]:.3g} | {r[2]:.3g} | {r[3]:.2f}x | {r[4]:.0f} | {ref_mem} |")
PY
