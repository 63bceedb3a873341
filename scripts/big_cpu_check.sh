#!/usr/bin/env bash
# Issue 13, item 3: an 8B-shaped bf16 checkpoint on the CPU with weights kept in bf16
# (`--dtype bf16`: 16-bit weights, f32 GEMM accumulation in row blocks, f32 norms/softmax).
# Creates the Llama-3-8B-shaped random model (16 GB, bf16) in FOLDER if missing, then runs
# `jumplens hidden-states` and `jumplens collect --train 40 --val 10` on it and prints the peak
# RSS (/usr/bin/time -v) and tok/s of each. Needs ~17 GB of free RAM: run it on a quiet machine.
#
#   bash scripts/big_cpu_check.sh FOLDER [JUMPLENS_BINARY]
set -euo pipefail
folder=${1:?usage: big_cpu_check.sh FOLDER [JUMPLENS_BINARY]}
bin=${2:-target/release/jumplens}
py=${PYTHON:-/work/refenv/bin/python}
root=$(cd "$(dirname "$0")/.." && pwd)
name=${MODEL_NAME:-llama3-8b}  # MODEL_NAME=smollm2 tries the script on a small shape
model="$folder/$name"
[ -x "$bin" ] || { echo "error: $bin: no jumplens binary (cargo build --release)" >&2; exit 1; }
if [ ! -f "$model/config.json" ]; then
  "$py" "$root/scripts/make_random_models.py" --dtype bf16 "$folder" "$name"
fi
# The random model has no tokenizer: borrow SmolLM2's (its ids are < 128,256).
if [ ! -f "$model/tokenizer.json" ]; then
  gguf="$root/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  "$bin" inspect "$gguf" --save-tokenizer "$model/tokenizer.json" >/dev/null
fi
corpus="$root/assets/wiki/summaries_en-us.json"
run="$folder/run-$name-bf16"
rm -rf "$run" "$folder/h.safetensors"

measure() { # NAME COMMAND...: runs it under /usr/bin/time -v, prints peak RSS and wall time
  local name=$1; shift
  local log; log=$(mktemp)
  local t0; t0=$(date +%s.%N)
  /usr/bin/time -v "$@" 2> "$log" >/dev/null || { cat "$log" >&2; exit 1; }
  local t1; t1=$(date +%s.%N)
  local rss; rss=$(awk -F: '/Maximum resident set size/ {gsub(/ /,"",$2); print $2}' "$log")
  echo "$name: peak RSS $(awk -v k="$rss" 'BEGIN{printf "%.2f GiB", k/1048576}'), wall $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f s", b-a}')"
  grep -E "tokens|tok/s" "$log" | tail -2 || true
  rm -f "$log"
}

text="The quick brown fox jumps over the lazy dog because it was late for dinner."
measure "hidden-states" "$bin" --dtype bf16 hidden-states "$model" --text "$text" --out "$folder/h.safetensors"
measure "collect 40/10" "$bin" --dtype bf16 collect "$model" --corpus "$corpus" --out "$run" --train 40 --val 10 --quiet
"$py" - "$run/manifest.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
toks = 0
for split in ("train", "val"):
    c = m["counts"][split]
    print(split, {k: c[k] for k in c if k in ("examples", "tokens", "wall_s")})
print("model dtype in the manifest:", m["model"].get("dtype"))
PY
echo "forward throughput (tok/s), 4 x 32 tokens:"
"$bin" --dtype bf16 bench forward "$model" --batch 4 --seq 32 --iters 1
