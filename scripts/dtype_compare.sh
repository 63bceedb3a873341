#!/usr/bin/env bash
# Issue 13 (fidelity, bullet 2): the study's headline numbers on SmolLM2 from a bf16 run next to
# the f32 run, on the CPU. Runs collect -> fit -> r2 -> predict -> early-exit once with
# `--dtype f32` and once with `--dtype bf16` (same corpus, seed and sizes: the same sentences and
# positions), then prints a markdown table of r^2(mat/id, l -> L), P@1 per layer for mat and id,
# and the share of layers saved at P@1 0.95, with the largest |bf16 - f32| differences.
#
#   bash scripts/dtype_compare.sh [OUT_DIR] [TRAIN] [VAL]
#
# Defaults: OUT_DIR=/tmp/jumplens-dtype-compare, TRAIN=2000, VAL=500 (about 15 minutes for both
# runs on a quiet 2-core machine). JUMPLENS overrides the binary (default target/release/jumplens
# under $CARGO_TARGET_DIR or the repo); DTYPES="bf16" runs only that one (e.g. two processes at
# once), DTYPES="" only prints the table of runs already there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-/tmp/jumplens-dtype-compare}
n_train=${2:-2000}
n_val=${3:-500}
bin=${JUMPLENS:-${CARGO_TARGET_DIR:-$root/target}/release/jumplens}
py=${PYTHON:-python3}
model="$root/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
corpus="$root/assets/wiki/summaries_en-us.json"
[ -x "$bin" ] || { echo "error: $bin: no jumplens binary (cargo build --release)" >&2; exit 1; }
[ -f "$model" ] || { echo "error: $model: missing (scripts/fetch_assets.sh)" >&2; exit 1; }
mkdir -p "$out"
for dt in ${DTYPES-f32 bf16}; do
  run="$out/smollm2-$dt"
  t0=$(date +%s)
  # Every stage is resumable / skipped when done; --dtype is recorded in the manifest.
  "$bin" --dtype "$dt" collect "$model" --corpus "$corpus" --out "$run" --train "$n_train" --val "$n_val" --quiet
  "$bin" --dtype "$dt" fit "$run" --pairs all --quiet
  "$bin" --dtype "$dt" r2 "$run"
  "$bin" --dtype "$dt" predict "$run" --quiet
  "$bin" --dtype "$dt" early-exit "$run"
  echo "$dt: $(( $(date +%s) - t0 )) s (collect $n_train / $n_val, fit all pairs, r2, predict, early-exit)" >&2
done
[ -f "$out/smollm2-f32/early_exit.json" ] && [ -f "$out/smollm2-bf16/early_exit.json" ] || exit 0
"$py" - "$out/smollm2-f32" "$out/smollm2-bf16" <<'PY'
import json, sys
f32, bf16 = sys.argv[1], sys.argv[2]
load = lambda run, f: json.load(open(f"{run}/{f}"))
r = {k: (load(f32, "r2.json"), load(bf16, "r2.json")) for k in ["r2"]}["r2"]
p = (load(f32, "predict.json"), load(bf16, "predict.json"))
e = (load(f32, "early_exit.json"), load(bf16, "early_exit.json"))
m = (load(f32, "manifest.json"), load(bf16, "manifest.json"))
print("dtypes in the manifests:", m[0]["model"].get("dtype"), m[1]["model"].get("dtype"))
for split in ("train", "val"):
    a, b = m[0]["counts"][split]["examples"], m[1]["counts"][split]["examples"]
    assert a == b, (split, a, b)
    print(f"{split}: {a} examples in both runs")
L = len(r[0]["mat"]) - 1
rows = []
worst = {}
for l in range(L + 1):
    vals = {
        "r2 mat": [x["mat"][l][L] for x in r],
        "r2 id": [x["id"][l][L] for x in r],
        "P@1 mat": [x["lenses"]["mat"]["p@1"][l] for x in p],
        "P@1 id": [x["lenses"]["id"]["p@1"][l] for x in p],
    }
    rows.append((l, vals))
    for k, (a, b) in vals.items():
        if a is None or b is None:
            continue
        if k not in worst or abs(b - a) > abs(worst[k][2] - worst[k][1]):
            worst[k] = (l, a, b)
print()
print(f"| layer l | r² mat l→{L} f32 / bf16 | r² id l→{L} f32 / bf16 | P@1 mat f32 / bf16 | P@1 id f32 / bf16 |")
print("|---|---|---|---|---|")
fmt = lambda v: "—" if v is None else f"{v:.3f}"
step = max(1, L // 10)
for l, vals in rows:
    if l % step == 0 or l == L:
        print(f"| {l} | " + " | ".join(f"{fmt(a)} / {fmt(b)}" for a, b in vals.values()) + " |")
print()
print("| quantity | layer | f32 | bf16 | bf16 − f32 |")
print("|---|---|---|---|---|")
for k, (l, a, b) in worst.items():
    print(f"| largest difference, {k} | {l} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
for target in ("0.90", "0.95", "0.99"):
    for lens in ("mat", "id"):
        a = e[0]["saved_at"].get(target, {}).get(lens)
        b = e[1]["saved_at"].get(target, {}).get(lens)
        d = "—" if a is None or b is None else f"{b - a:+.4f}"
        print(f"| layers saved at P@1 {target}, {lens} | — | {fmt(a)} | {fmt(b)} | {d} |")
PY
