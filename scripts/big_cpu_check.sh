#!/usr/bin/env bash
# Issue 13, item 3: a bf16 checkpoint too big for f32 on the CPU, weights kept in bf16
# (`--dtype bf16`: 16-bit weights, f32 GEMM accumulation in row blocks, f32 norms/softmax).
# Makes the random model FOLDER/NAME if missing (scripts/make_random_models.py: written tensor by
# tensor, ~2.5 GB of RAM whatever the size), then measures with GNU time (peak RSS, wall):
#   1. `jumplens hidden-states` of one text (load + one forward),
#   2. `jumplens collect --train 50 --val 10` (Wikipedia summaries, SmolLM2's tokenizer),
#   3. `jumplens bench forward` 4 x 32 tokens (the forward rate alone),
# and prints tok/s for each (1 and 2 count the load; 2's forwarded tokens are the sampled
# sentences cut after their read position, from the activations).
#
#   bash scripts/big_cpu_check.sh FOLDER [JUMPLENS_BINARY]
#   MODEL_NAME=llama3-1b bash scripts/big_cpu_check.sh /tmp/big    # the script on a 1B shape
#
# The default NAME is llama3-8b (16 GB on disk in bf16, ~16-17 GB of RAM while it runs: run it on
# a quiet machine). PYTHON picks the interpreter for make_random_models.py (torch, transformers,
# safetensors). FOLDER gets the model, h.safetensors and the run folder; remove it afterwards.
set -euo pipefail
folder=${1:?usage: big_cpu_check.sh FOLDER [JUMPLENS_BINARY]}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${2:-${CARGO_TARGET_DIR:-$root/target}/release/jumplens}
py=${PYTHON:-/work/refenv/bin/python}
name=${MODEL_NAME:-llama3-8b}
model="$folder/$name"
[ -x "$bin" ] || { echo "error: $bin: no jumplens binary (cargo build --release)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "error: /usr/bin/time (GNU time) is missing: apt-get install time" >&2; exit 1; }
mkdir -p "$folder"
if [ ! -f "$model/config.json" ]; then
  /usr/bin/time -f "make_random_models: peak RSS %M KiB, wall %e s" \
    "$py" "$root/scripts/make_random_models.py" --dtype bf16 "$folder" "$name"
fi
du -sh "$model" | awk '{print "checkpoint on disk: " $1}'
# The random model has no tokenizer: borrow SmolLM2's (its ids are < the vocabulary).
if [ ! -f "$model/tokenizer.json" ]; then
  "$bin" inspect "$root/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --save-tokenizer "$model/tokenizer.json" >/dev/null
fi
corpus="$root/assets/wiki/summaries_en-us.json"
run="$folder/run-$name-bf16"
rm -rf "$run" "$folder/h.safetensors"

# measure NAME TOKENS COMMAND...: peak RSS and wall of COMMAND (GNU time); TOKENS = "h" (the
# text's tokens in h.safetensors) or "run" (the collected run's forwarded tokens).
measure() {
  local label=$1 tokens=$2; shift 2
  local log; log=$(mktemp)
  /usr/bin/time -f "%M %e" -o "$log" "$@" >/dev/null
  read -r rss wall < "$log"; rm -f "$log"
  if [ "$tokens" = h ]; then
    tokens=$("$py" -c 'import sys; from safetensors import safe_open
with safe_open(sys.argv[1], "np") as f: print(f.get_slice("hidden_states").get_shape()[-2])' "$folder/h.safetensors")
  elif [ "$tokens" = run ]; then
    tokens=$("$py" - "$run" <<'PY'
import sys
from safetensors.numpy import load_file
n = 0
for split in ("train", "val"):
    t = load_file(f"{sys.argv[1]}/activations/{split}.safetensors")
    n += int((t["positions"] + 1).sum())  # a causal sentence runs up to its read position
print(n)
PY
)
  fi
  awk -v l="$label" -v k="$rss" -v w="$wall" -v t="$tokens" \
    'BEGIN{printf "%s: peak RSS %.2f GiB, wall %.1f s, %d tokens, %.1f tok/s (load included)\n", l, k/1048576, w, t, t/w}'
}

text="The quick brown fox jumps over the lazy dog because it was late for dinner."
measure "hidden-states (1 text)" h "$bin" --dtype bf16 hidden-states "$model" --text "$text" --out "$folder/h.safetensors"
measure "collect --train 50 --val 10" run "$bin" --dtype bf16 collect "$model" --corpus "$corpus" --out "$run" --train 50 --val 10 --quiet
"$py" - "$run/manifest.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
for split in ("train", "val"):
    c = m["counts"][split]
    print(f"  {split}: {c['examples']} examples in {c['wall_s']:.1f} s")
print("  model dtype in the manifest:", m["model"].get("dtype"))
PY
log=$(mktemp)
/usr/bin/time -f "%M %e" -o "$log" "$bin" --dtype bf16 bench forward "$model" --batch 4 --seq 32 --iters 1 | sed 's/^/  /'
read -r rss wall < "$log"; rm -f "$log"
awk -v k="$rss" -v w="$wall" 'BEGIN{printf "bench forward 4 x 32: peak RSS %.2f GiB, wall %.1f s\n", k/1048576, w}'
