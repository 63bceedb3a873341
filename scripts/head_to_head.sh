#!/usr/bin/env bash
# The head-to-head of issue 15 on this CPU: per layer P@1, KL and CE of id, mat, affine, tuned and
# mat+kl, and what each lens cost (fit seconds, training seconds, from RUN/manifest.json), for
# SmolLM2-135M, Gemma 3 270M and BERT MLM (BERT's tuned lenses train on its masked-LM
# distribution at the collected [MASK] positions, a step = TOKENS of those examples). The table (every 5th layer + the mean over layers) is printed by
# scripts/head_to_head_table.py and pasted into README.md ("Tuned lens against least squares").
#
#   bash scripts/head_to_head.sh                       # all three models, the sizes below
#   MODELS=smollm2 STEPS=40 bash scripts/head_to_head.sh   # what fits in the time at hand
#
# Environment: JUMPLENS_BIN (default target/release/jumplens), OUT (runs/h2h), TRAIN / VAL
# (2000 / 500 sentences), STEPS (250) and TOKENS (tokens per step, 0 = the device default: 32 on
# the CPU) of both trainings, BIG_TOKENS (unset: no larger-budget run; else a third training,
# RUN/tuned-big via a copy of the run, with that many tokens per step).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${JUMPLENS_BIN:-target/release/jumplens}
OUT=${OUT:-runs/h2h}
TRAIN=${TRAIN:-2000}
VAL=${VAL:-500}
STEPS=${STEPS:-250}
TOKENS=${TOKENS:-0}
MODELS=${MODELS:-"smollm2 gemma3 bert_mlm"}
CORPUS=assets/wiki/summaries_en-us.json
for m in $MODELS; do
    case $m in
        smollm2) model=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ;;
        gemma3) model=assets/gemma3/gemma-3-270m-q4_k_m.gguf ;;
        bert_mlm) model=assets/bert_mlm ;;
        *) echo "unknown model $m" >&2; exit 2 ;;
    esac
    run=$OUT/$m
    echo "== $m"
    [ -f "$run/activations/val.safetensors" ] || "$B" collect "$model" --corpus "$CORPUS" --out "$run" --train "$TRAIN" --val "$VAL" -q
    [ -f "$run/maps.safetensors" ] || "$B" fit "$run" --pairs to-final -q
    [ -f "$run/maps_affine.safetensors" ] || "$B" fit "$run" --pairs to-final --intercept -q
    [ -f "$run/tuned/params.pt" ] || "$B" tuned-lens "$run" --steps "$STEPS" --tokens-per-step "$TOKENS" -q
    [ -f "$run/tuned-mat/params.pt" ] || "$B" tuned-lens "$run" --init mat --steps "$STEPS" --tokens-per-step "$TOKENS" -q
    "$B" predict "$run" -q
done
python3 scripts/head_to_head_table.py $(for m in $MODELS; do echo "$OUT/$m"; done)
