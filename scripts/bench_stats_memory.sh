#!/usr/bin/env bash
# Peak RSS (GNU time %M) of `collect --stats-only` at two training sizes, next to the stored
# collection at the same sizes: the streaming collection's memory does not grow with N.
#
#   bash scripts/bench_stats_memory.sh [N1] [N2]      (sentences; default 2000 and 16000)
#
# Model: the tiny GPT-2 fixture (d = 32, 3 states) with a 100-word tokenizer, every position
# of 6-7-word sentences of a generated corpus, so that the run takes seconds on 2 cores; the
# training states alone are N x 7 x 3 x 32 x 4 bytes (2.7 MB at N = 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
n1=${1:-2000}
n2=${2:-16000}
bin=${JUMPLENS_BIN:-${CARGO_TARGET_DIR:-target}/release/jumplens}
[ -x "$bin" ] || cargo build --release --quiet
[ -x /usr/bin/time ] || { echo "needs GNU time (/usr/bin/time; apt-get install time)" >&2; exit 1; }
work=$(mktemp -d /tmp/jumplens-statsmem.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/m"
cp tests/fixtures/tiny/gpt2/config.json tests/fixtures/tiny/gpt2/model.safetensors "$work/m/"
python3 - "$work" "$n2" <<'PY'
import json, sys
work, n = sys.argv[1], int(sys.argv[2])
vocab = {f"w{i}": i for i in range(100)}
tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
       "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
       "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}}
json.dump(tok, open(f"{work}/m/tokenizer.json", "w"))
with open(f"{work}/corpus.txt", "w") as f:
    for i in range(int(n * 1.3) + 100):
        f.write(" ".join(f"w{1 + (7 * i + 3 * j + i * j + i // 97) % 99}" for j in range(7)) + f" w{i % 89 + 1}\n")
PY
printf "%-12s %8s %10s %14s\n" form train examples peak_rss_MB
for mode in stats stored; do
    for n in "$n1" "$n2"; do
        extra=()
        [ "$mode" = stats ] && extra=(--stats-only --pairs all)
        /usr/bin/time -f "%M" -o "$work/rss" "$bin" collect "$work/m" --corpus "$work/corpus.txt" \
            --out "$work/run-$mode-$n" --train "$n" --val 200 --positions all --quiet "${extra[@]}" 2>/dev/null
        ex=$(python3 -c "import json;print(json.load(open('$work/run-$mode-$n/manifest.json'))['counts']['train']['examples'])")
        printf "%-12s %8s %10s %14.1f\n" "$mode" "$n" "$ex" "$(echo "$(cat "$work/rss") / 1024" | bc -l)"
    done
done
