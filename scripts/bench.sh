#!/usr/bin/env bash
# Benchmarks (not tests): jumplens against the reference implementations on the same inputs, in
# the same run, printed as a table with ratios.
#
#   scripts/bench.sh [RUN]
#
# Always: forward throughput on SmolLM2 (32 random sentences x 24 tokens, all hidden states),
# jumplens vs PyTorch transformers (float32, 2 threads). With RUN (a collected SmolLM2 run, e.g.
# runs/smollm2-wiki): collection of the validation split's states (jumplens: prefix-only,
# length-grouped batches; PyTorch: the paper's pipeline, one forward per sentence cut after its
# position) and the all-pairs fit on the training split (jumplens fit vs one scikit-learn
# LinearRegression per pair; PAIRS=K times only the first K sklearn pairs and extrapolates).
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
BIN=target/release/jumplens
MODEL=${MODEL:-assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
RUN=${1:-}
PAIRS=${PAIRS:-0}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2

peak() { # peak RSS in MB of the command's process, from GNU time
    /usr/bin/time -f "%M" -o "$1" "${@:2}"
}

peak "$tmp/fj.mem" $BIN bench forward "$MODEL" --batch 32 --seq 24 --iters 5 --ids-out "$tmp/ids.safetensors" > "$tmp/fj.json"
peak "$tmp/ft.mem" "$PY" scripts/bench_torch.py forward "$MODEL" "$tmp/ids.safetensors" 5 > "$tmp/ft.json"
if [ -n "$RUN" ]; then
    peak "$tmp/cj.mem" $BIN bench collect "$MODEL" --activations "$RUN/activations/val.safetensors" > "$tmp/cj.json"
    peak "$tmp/ct.mem" "$PY" scripts/bench_torch.py collect "$MODEL" "$RUN/activations/val.safetensors" > "$tmp/ct.json"
    cp -r "$RUN/manifest.json" "$RUN/activations" "$tmp/" && mkdir -p "$tmp/run" && mv "$tmp/manifest.json" "$tmp/activations" "$tmp/run/"
    start=$(date +%s.%N)
    peak "$tmp/fitj.mem" $BIN fit "$tmp/run" 2> "$tmp/fitj.log"
    echo "$(date +%s.%N) - $start" | bc > "$tmp/fitj.s"
    grep -o 'in [0-9.]* s ([0-9]* GFLOP/s)' "$tmp/fitj.log" > "$tmp/fitj.detail" || true
    peak "$tmp/fitt.mem" "$PY" scripts/bench_fit_sklearn.py "$tmp/run/activations/train.safetensors" --key hidden_states \
        --max-pairs "$PAIRS" --out "$tmp/fitt.json" > "$tmp/fitt.s" 2> "$tmp/fitt.log"
fi

python3 - "$tmp" "$PAIRS" <<'PY'
import json, os, sys
tmp, pairs = sys.argv[1], int(sys.argv[2])
def j(name): return json.load(open(os.path.join(tmp, name)))
def mem(name): return int(open(os.path.join(tmp, name)).read().split()[-1]) / 1024
rows = []
fj, ft = j("fj.json"), j("ft.json")
rows.append(("forward 32x24, all states (tok/s)", fj["tokens_per_s"], ft["tokens_per_s"], fj["tokens_per_s"] / ft["tokens_per_s"], mem("fj.mem"), mem("ft.mem")))
if os.path.exists(os.path.join(tmp, "cj.json")):
    cj, ct = j("cj.json"), j("ct.json")
    rows.append((f"collect {cj['tokens']} prefix tokens (s)", cj["seconds"], ct["seconds"], ct["seconds"] / cj["seconds"], mem("cj.mem"), mem("ct.mem")))
    fs = float(open(os.path.join(tmp, "fitj.s")).read())
    ref = j("fitt.json")
    sk = ref.get("seconds_extrapolated_all", ref["seconds"])
    label = "fit all pairs (s)" + (f", sklearn extrapolated from {pairs} pairs" if pairs else "")
    rows.append((label, fs, sk, sk / fs, mem("fitj.mem"), mem("fitt.mem")))
    detail = open(os.path.join(tmp, "fitj.detail")).read().strip()
    if detail:
        print(f"jumplens fit: {detail}")
print(f"| benchmark | jumplens | reference | ratio (jumplens advantage) | peak MB jumplens | peak MB reference |")
print(f"|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]:.3g} | {r[2]:.3g} | {r[3]:.2f}x | {r[4]:.0f} | {r[5]:.0f} |")
PY
