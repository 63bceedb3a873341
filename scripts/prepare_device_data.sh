#!/usr/bin/env bash
# Prepares .device-data/ (git-ignored) for scripts/device_bench.sh: what travels to the GPU
# machine must fit in 64 MiB with the repository and the binary, so it holds a 4-block cut of the
# SmolLM2 GGUF (embeddings re-quantized to Q4_0, scripts/truncate_gguf.py), the BERT MLM asset
# and the Wikipedia summaries xz-compressed (about 45 MB in all). Needs the assets
# (scripts/fetch_assets.sh smollm2 bert_mlm wiki) and `pip install gguf`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
A=${JUMPLENS_ASSETS:-$ROOT/assets}
D=$ROOT/.device-data
mkdir -p "$D/wiki"
# `prepare_device_data.sh pylib`: only the tuned-lens package (below), the rest kept.
if [ "${1:-}" != pylib ]; then
python3 "$ROOT/scripts/truncate_gguf.py" "$A/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$D/smollm2-4blk.gguf" 4 --q4-embeddings
rm -rf "$D/bert_mlm" && cp -r "$A/bert_mlm" "$D/bert_mlm"
xz -9 -c "$A/wiki/summaries_en-us.json" >"$D/wiki/summaries_en-us.json.xz"
fi
# The `tuned` section runs the tuned-lens 0.2.0 package (pure Python; the GPU machine has torch and
# transformers but not it): its package and the two it imports, from the venv it is installed in
# (TUNED_VENV, default /work/venv-tuned), without bytecode caches (about 2 MB).
TV=${TUNED_VENV:-/work/venv-tuned}
rm -rf "$D/pylib" && mkdir -p "$D/pylib"
for p in tuned_lens simple_parsing docstring_parser; do
  src=$(compgen -G "$TV/lib/python3*/site-packages/$p" | head -1 || true)
  [ -n "$src" ] && [ -d "$src" ] || { echo "$TV: no $p (pip install tuned-lens==0.2.0 there)" >&2; exit 1; }
  cp -r "$src" "$D/pylib/"
done
find "$D/pylib" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$D"
