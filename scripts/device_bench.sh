#!/usr/bin/env bash
# GPU benchmark and GPU-vs-CPU agreement. Runs ON the GPU machine, from the repository root, with
# a CUDA build of jumplens (scripts/build_cuda.sh -> dist/jumplens-cuda.xz) and the test data
# prepared by scripts/prepare_device_data.sh (.device-data/: a 4-block SmolLM2 GGUF, the BERT MLM
# asset, the Wikipedia summaries). PyTorch + transformers must be installed there (the reference).
#
#   scripts/device_bench.sh [SECTION...]      (default: all)
#   JUMPLENS_FUSED_EPILOGUES=0 scripts/device_bench.sh fused bf16small   (without the LayerNorm and
#                                            bias/activation kernels, for an A/B: see src/model/fused.rs)
#
# Sections:
#   jit      first CUDA use on a fresh machine (kernel JIT), then a second one
#   agree    the same small study (collect 2,000/500, fit, r2, predict, early exit) on the CPU and
#            on the GPU for the truncated SmolLM2 and for BERT, compared number by number; also
#            the GPU fit of the CPU-collected states (fit alone) and one text's hidden states
#   fit      all-pairs fit on synthetic states: SmolLM2-shaped (31 x 576, 9,000) and
#            GPT-2-XL-shaped (49 x 1600, 100,000; FIT_CHUNKS="R ..." adds runs with R examples per
#            Gram chunk), float64 sufficient statistics on the GPU; the 8B shape's to-final fit
#            (33 x 4096, 100,000); PyTorch's float64 normal equations on the same problems
#   study    the whole study on a random SmolLM2-shaped model (real tokenizer, Wikipedia):
#            collect 9,000 + 3,000 sentences, fit all pairs, r2, predict, early exit
#   forward  forward throughput with all hidden states, jumplens vs PyTorch transformers on the
#            same GPU and token ids: SmolLM2, GPT-2 small/medium/XL, BERT-large shapes
#            (random weights; FORWARD_MODELS picks), batch 32/256/1024 x 24 tokens
#   bf16     research scale: a Llama-3-8B-shaped random model made in bf16 on the GPU, forward
#            with all 33 hidden states at 64 x 32, 16 x 512 and 64 x 512 tokens, jumplens
#            `--dtype bf16` vs PyTorch bf16 (sdpa) on the same ids, with each process's peak GPU
#            memory (nvidia-smi, sampled every 100 ms: CUDA context and allocator caches
#            included, for both); then SmolLM2 and GPT-2 shapes in bf16 at 32/256/1024 x 24
#   bf16small only the SmolLM2 and GPT-2 rows of bf16 (BF16_MODELS="gpt2" for one of them)
#   study8b  the whole study (collect 9,000 + 3,000 Wikipedia sentences with SmolLM2's tokenizer,
#            fit, r2, predict, early exit, sub-modules) on the 8B-shaped model in bf16
#   diag8b   the 8B model's load time (one text's hidden states, twice) and forward rates at the
#            shapes of the study's collect batches (115 x 142, 256 x 30)
#   report8b `jumplens report` (every stage in one process, 9,000 + 3,000 sentences, REPORT8B_TRAIN /
#            REPORT8B_VAL) on the 8B shape in bf16, with each stage's wall time from the manifest
#   agreefit the fit from to-final statistics solved on the GPU (cuSOLVER) and on the CPU from the
#            same statistics (the truncated SmolLM2), maps and r2 compared
#   agreesub the least-norm sub-module maps (fewer examples than coordinates) on the GPU (cuSOLVER)
#            and on the CPU from the same states, the sub-module results compared
#   profile  where a forward's time goes: the 8B shape cut to 4 blocks in bf16 at 16 x 512 and
#            64 x 32, jumplens `bench forward --profile` (time per block part) next to PyTorch's
#            profiler (device time per operator), and the plain forward rates of both
#   blocks   forward rates on the 8B shape cut to 4 blocks (the same per-block work in 2 GB, made
#            in seconds) in bf16 at 16 x 512, 64 x 32 and 64 x 512, jumplens vs PyTorch (sdpa)
#   fused    the fused GPU kernels (masked softmax, RMSNorm) against PyTorch on the same ids:
#            hidden states of jumplens on the GPU vs transformers' eager attention (the arithmetic
#            jumplens follows) and, as a yardstick, PyTorch's sdpa vs its eager; the 8B shape cut
#            to 4 blocks and SmolLM2's shape, bf16 and f32 (states h_0..h_{L-1}; transformers'
#            last state is after the final norm); FUSED_MODELS picks the models
#   shards   issue 17: the SmolLM2-shaped study (9,000 + 3,000) as two --stats-only shards run as
#            two processes on the one GPU at once, merged, fitted and compared with the single
#            GPU run (stored activations): maps, r2 and predict (scripts/compare_runs.py when
#            present, else a numpy comparison of the maps)
#   split    blocks split across two device handles on the ONE GPU (`--device cuda:0,cuda:0`, the
#            transfer path runs) vs `--device cuda:0`, on the random SmolLM2-shaped model: one
#            text's hidden states and a 500 + 200 collect compared (bytes and compare_runs.py),
#            and the forward tok/s of both (32 and 256 x 24)
#   split70b needs two GPUs (nvidia-h200-x2; unrun so far): a Llama-70B-shaped bf16 model (d 8192,
#            80 layers, ffn 28672, 64/8 heads) with random weights made on each GPU
#            (`bench --random-config`), forward with all 81 hidden states and a 500-sentence
#            re-collection across cuda:0,cuda:1 (tok/s, peak memory per GPU), next to PyTorch
#            `device_map="auto"` (scripts/bench_split_torch.py) on the same ids
#   tuned    issue 15: tuned-lens training speed, `jumplens tuned-lens` vs the tuned-lens 0.2.0
#            package's own training step (scripts/bench_tuned_torch.py, the package from
#            .device-data/pylib) on the random SmolLM2-shaped model, the same K steps (TUNED_STEPS,
#            20) of the same token ids (jumplens --ids-out), 32768 tokens per step as 16 x 2048,
#            first 2 steps untimed on both sides; f32 (no autocast) and bf16 (jumplens --dtype
#            bf16; the package as its train_loop.py runs on a GPU: bf16 weights, bf16 autocast)
#
# Results in $OUT (default ./device-out): tables.md (the tables, also printed after each section),
# log.txt, and raw.tgz with one JSON/text file per measurement (the device tool returns at most 8
# files, so the raw files are bundled).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/device-out}
DATA=${JUMPLENS_DEVICE_DATA:-$ROOT/.device-data}
W=${JUMPLENS_WORK:-/tmp/jumplens-device}
R_OUT=$W/raw
mkdir -p "$OUT" "$W" "$R_OUT"
# shellcheck source=device_env.sh
source "$ROOT/scripts/device_env.sh"
BIN=$W/jumplens
[ -x "$BIN" ] || { xz -dc "$ROOT/dist/jumplens-cuda.xz" >"$BIN" && chmod +x "$BIN"; } || exit 1
PY=${PYTHON:-python3}
SECTIONS=${*:-jit agree fit study forward}

# gpu_peak FILE CMD...: runs CMD while sampling the GPU's used memory; writes the peak (MiB) to FILE.
gpu_peak() {
  local file=$1
  shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$file.samples" &
  local smi=$!
  "$@"
  local rc=$?
  kill $smi 2>/dev/null
  wait $smi 2>/dev/null
  sort -n "$file.samples" | tail -1 >"$file"
  return $rc
}

# gpu_peaks FILE CMD...: like gpu_peak, one line per GPU ("gpu I: PEAK MiB").
gpu_peaks() {
  local file=$1
  shift
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 100 >"$file.samples" &
  local smi=$!
  "$@"
  local rc=$?
  kill $smi 2>/dev/null
  wait $smi 2>/dev/null
  awk -F', *' '{ if ($2 + 0 > m[$1] + 0) m[$1] = $2 } END { for (i in m) print "gpu " i ": " m[i] " MiB" }' \
    "$file.samples" | sort >"$file"
  return $rc
}

log() { echo "== $*" | tee -a "$OUT/log.txt" >&2; }
# timed NAME CMD...: runs CMD, appends {name, seconds, rc} to $OUT/times.jsonl
timed() {
  local name=$1
  shift
  local t0 t1 rc
  t0=$(date +%s.%N)
  "$@" 2>>"$OUT/log.txt"
  rc=$?
  t1=$(date +%s.%N)
  echo "{\"name\": \"$name\", \"seconds\": $(awk "BEGIN {print $t1 - $t0}"), \"rc\": $rc}" >>"$R_OUT/times.jsonl"
  [ $rc -eq 0 ] || log "FAILED ($rc): $name"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$R_OUT/gpu.txt"
[ -f "$W/wiki.json" ] || xz -dc "$DATA/wiki/summaries_en-us.json.xz" >"$W/wiki.json"

tables() {
  $PY - "$R_OUT" >"$OUT/tables.md" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
def j(p):
    try:
        return json.load(open(p))
    except Exception:
        return None
gpu = open(os.path.join(out, "gpu.txt")).read().strip()
print(f"GPU: {gpu}\n")
times = [json.loads(l) for l in open(os.path.join(out, "times.jsonl"))] if os.path.exists(os.path.join(out, "times.jsonl")) else []
if times:
    print("| step | wall s | rc |\n|---|---|---|")
    for t in times:
        print(f"| {t['name']} | {t['seconds']:.2f} | {t['rc']} |")
    study = [t for t in times if t["name"].startswith("study ")]
    if study:
        print(f"\nwhole study (collect, fit, r2, predict, early exit; process wall times): {sum(t['seconds'] for t in study):.1f} s")
fits = sorted(p for p in glob.glob(os.path.join(out, "fit-*.json")))
if fits:
    print("\n| fit (synthetic, all pairs) | states x d | N | pairs | jumplens s | Gram s | factor s | products s | TFLOP/s | train r2 l->L | PyTorch s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in fits:
        f = j(p)
        r = j(p.replace("fit-", "fitref-"))
        if f:
            ref = f"| {r['seconds']:.2f} | {r['seconds'] / f['seconds']:.2f}x |" if r else "| - | - |"
            print(f"| {os.path.basename(p)[4:-5]} | {f['states']} x {f['d']} | {f['n']} | {f['pairs']} | {f['seconds']:.2f} | {f['seconds_gram']:.2f} | {f['seconds_factor']:.2f} | {f['seconds_products']:.2f} | {f['tflops']:.1f} | {f['train_r2_to_last']:.4f} {ref}")
fw = sorted(glob.glob(os.path.join(out, "fwd-*-jumplens.json")))
if fw:
    print("\n| forward, all hidden states | batch x 24 | jumplens tok/s | PyTorch tok/s | ratio |\n|---|---|---|---|---|")
    rows = []
    for p in fw:
        name = os.path.basename(p)[4:-len("-jumplens.json")]
        m, b = name.rsplit("-", 1)
        a, t = j(p), j(p.replace("-jumplens.json", "-torch.json"))
        rows.append((m, int(b), a, t))
    order = ["smollm2", "gpt2", "gpt2-medium", "gpt2-xl", "bert-large"]
    rows.sort(key=lambda r: (order.index(r[0]) if r[0] in order else 99, r[1]))
    for m, b, a, t in rows:
        ja = f"{a['tokens_per_s']:.0f}" if a else "failed"
        jt = f"{t['tokens_per_s']:.0f}" if t else "failed"
        ratio = f"{a['tokens_per_s'] / t['tokens_per_s']:.2f}x" if a and t else "-"
        print(f"| {m} | {b} | {ja} | {jt} | {ratio} |")
def mem(p):
    try:
        return float(open(p).read().strip()) / 1024
    except Exception:
        return None
f8 = sorted(glob.glob(os.path.join(out, "fwd8b-*-jumplens.json")))
if f8:
    print("\n| Llama-3-8B shape, bf16, all 33 hidden states | tokens | jumplens tok/s | PyTorch tok/s | ratio | jumplens peak GiB | PyTorch peak GiB (nvidia-smi / allocator) |\n|---|---|---|---|---|---|---|")
    for p in sorted(f8, key=lambda p: [int(x) for x in os.path.basename(p)[6:-len("-jumplens.json")].split("x")]):
        shape = os.path.basename(p)[6:-len("-jumplens.json")]
        a, t = j(p), j(p.replace("-jumplens.json", "-torch.json"))
        ma, mt = mem(os.path.join(out, f"mem-8b-{shape}-jumplens.txt")), mem(os.path.join(out, f"mem-8b-{shape}-torch.txt"))
        ja = f"{a['tokens_per_s']:.0f}" if a else "failed"
        jt = f"{t['tokens_per_s']:.0f}" if t else "failed"
        ratio = f"{a['tokens_per_s'] / t['tokens_per_s']:.2f}x" if a and t else "-"
        fm = lambda v: f"{v:.1f}" if v is not None else "-"
        tp = f"{t['peak_gib']:.1f}" if t and t.get("peak_gib") else "-"
        print(f"| 8B | {shape} | {ja} | {jt} | {ratio} | {fm(ma)} | {fm(mt)} / {tp} |")
fb = sorted(glob.glob(os.path.join(out, "fwdbf16-*-jumplens.json")))
if fb:
    print("\n| bf16 forward, all hidden states | batch x 24 | jumplens tok/s | PyTorch tok/s | ratio |\n|---|---|---|---|---|")
    rows = []
    for p in fb:
        m, b = os.path.basename(p)[8:-len("-jumplens.json")].rsplit("-", 1)
        rows.append((m, int(b), j(p), j(p.replace("-jumplens.json", "-torch.json"))))
    rows.sort(key=lambda r: (r[0], r[1]))
    for m, b, a, t in rows:
        ja = f"{a['tokens_per_s']:.0f}" if a else "failed"
        jt = f"{t['tokens_per_s']:.0f}" if t else "failed"
        ratio = f"{a['tokens_per_s'] / t['tokens_per_s']:.2f}x" if a and t else "-"
        print(f"| {m} | {b} | {ja} | {jt} | {ratio} |")
for p in sorted(glob.glob(os.path.join(out, "agree-*.json"))):
    r = j(p)
    print(f"\n{os.path.basename(p)}:")
    for k, v in r["tensors"].items():
        print(f"  {k}: worst rel {v['worst']:.2e} ({v['worst_name']}), median {v['median']:.2e}")
    for k, v in r["json"].items():
        print(f"  {k}: max |diff| {v['max_abs_diff']:.2e} at {v['where']}")
tl = [(dt, j(os.path.join(out, f"tuned-{dt}-jumplens.json")), j(os.path.join(out, f"tuned-{dt}-torch.json"))) for dt in ["f32", "bf16"]]
if any(a or t for _, a, t in tl):
    print("\n| tuned lens training, jumplens vs tuned-lens package | dtype | steps timed (of K) x tokens | jumplens s/step | package s/step | ratio (package s / jumplens s) | last loss jumplens / package |")
    print("|---|---|---|---|---|---|---|")
    for dt, a, t in tl:
        if not (a or t):
            continue
        js = f"{a['s_per_step']:.3f}" if a else "failed"
        ts = f"{t['s_per_step']:.3f}" if t else "failed"
        ratio = f"{t['s_per_step'] / a['s_per_step']:.2f}x" if a and t else "-"
        steps = f"{a['steps_timed']} (of {a['steps']}) x {a['options']['tokens_per_step']}" if a else f"{t['steps']} x {t['rows'] * t['seq_len']}"
        loss = f"{a['last_loss']:.4f} / {t['last_loss']:.4f}" if a and t else "-"
        how = "bf16, package with bf16 autocast" if dt == "bf16" else "f32, no autocast"
        print(f"| SmolLM2 shape (random) | {how} | {steps} | {js} | {ts} | {ratio} | {loss} |")
PY
  tar czf "$OUT/raw.tgz" -C "$R_OUT" .
}

for section in $SECTIONS; do
  case $section in
  jit)
    log "jit"
    timed "first CUDA use (JIT)" "$BIN" --device cuda bench fit --states 3 --n 4096 --d 64 >"$R_OUT/jit1.json"
    timed "second CUDA use" "$BIN" --device cuda bench fit --states 3 --n 4096 --d 64 >"$R_OUT/jit2.json"
    ;;
  agree)
    # AGREE_MODELS picks the models (default both).
    for name in ${AGREE_MODELS:-smollm2-4blk bert_mlm}; do
      case $name in
      smollm2-4blk) M=$DATA/smollm2-4blk.gguf mask="" ;;
      bert_mlm) M=$DATA/bert_mlm mask="--mask-position 4" ;;
      esac
      log "agree $name"
      for dev in cpu cuda; do
        R=$W/agree-$name-$dev
        rm -rf "$R"
        # shellcheck disable=SC2086
        timed "agree $name $dev hidden-states" "$BIN" --device $dev --dtype f32 hidden-states "$M" $mask \
          --text "The quick brown fox jumps over the lazy dog near the river bank." --out "$W/hs-$name-$dev.safetensors"
        timed "agree $name $dev collect" "$BIN" --device $dev --dtype f32 collect "$M" --corpus "$W/wiki.json" --out "$R" \
          --train 2000 --val 500 --quiet
        for stage in fit r2 predict early-exit; do
          timed "agree $name $dev $stage" "$BIN" --device $dev --dtype f32 $stage "$R" >/dev/null
        done
      done
      # The GPU fit of the CPU's states: the fit alone, same inputs.
      F=$W/agree-$name-cpu-states-gpu-fit
      rm -rf "$F" && mkdir -p "$F" && cp -r "$W/agree-$name-cpu/manifest.json" "$W/agree-$name-cpu/activations" "$F/"
      timed "agree $name gpu fit of cpu states" "$BIN" --device cuda --dtype f32 fit "$F" >/dev/null
      timed "agree $name gpu r2 of cpu states" "$BIN" --device cuda --dtype f32 r2 "$F" >/dev/null
      $PY "$ROOT/scripts/compare_runs.py" --states "$W/hs-$name-cuda.safetensors" "$W/hs-$name-cpu.safetensors" \
        >"$R_OUT/agree-$name-hidden.txt" || log "AGREEMENT FAILED: $name hidden states"
      $PY "$ROOT/scripts/compare_runs.py" "$W/agree-$name-cuda" "$W/agree-$name-cpu" --json "$R_OUT/agree-$name.json" \
        >"$R_OUT/agree-$name.txt" || log "AGREEMENT FAILED: $name study"
      $PY "$ROOT/scripts/compare_runs.py" "$F" "$W/agree-$name-cpu" --same-states --json "$R_OUT/agree-$name-fit.json" \
        >"$R_OUT/agree-$name-fit.txt" || log "AGREEMENT FAILED: $name fit of the same states"
      cat "$R_OUT/agree-$name-hidden.txt" "$R_OUT/agree-$name.txt" "$R_OUT/agree-$name-fit.txt"
    done
    ;;
  fit)
    log "fit"
    timed "fit smollm2-shaped" "$BIN" --device cuda bench fit --states 31 --n 9000 --d 576 >"$R_OUT/fit-smollm2.json"
    timed "fit gpt2-xl-shaped" "$BIN" --device cuda bench fit --states 49 --n 100000 --d 1600 >"$R_OUT/fit-gpt2xl.json"
    timed "fit smollm2-shaped (PyTorch)" $PY "$ROOT/scripts/bench_fit_torch.py" 31 9000 576 cuda >"$R_OUT/fitref-smollm2.json"
    timed "fit gpt2-xl-shaped (PyTorch)" $PY "$ROOT/scripts/bench_fit_torch.py" 49 100000 1600 cuda >"$R_OUT/fitref-gpt2xl.json"
    # FIT_CHUNKS: more chunk sizes (examples per chunk of the Gram) for the GPT-2-XL shape.
    for c in ${FIT_CHUNKS:-}; do
      timed "fit gpt2-xl-shaped chunk $c" "$BIN" --device cuda bench fit --states 49 --n 100000 --d 1600 --chunk-rows $c \
        >"$R_OUT/fit-gpt2xl-chunk$c.json"
    done
    # The 8B shape's to-final fit (33 states x 4096, N = 100,000: 65 Gram blocks) from states.
    timed "fit 8b-shaped to-final" "$BIN" --device cuda bench fit --states 33 --n 100000 --d 4096 --pairs to-final >"$R_OUT/fit-8b.json"
    timed "fit 8b-shaped to-final (PyTorch)" $PY "$ROOT/scripts/bench_fit_torch.py" 33 100000 4096 cuda to-final >"$R_OUT/fitref-8b.json"
    cat "$R_OUT"/fit-*.json "$R_OUT"/fitref-*.json
    ;;
  study)
    log "study"
    [ -f "$W/models/smollm2/model.safetensors" ] || $PY "$ROOT/scripts/make_random_models.py" "$W/models" smollm2
    "$BIN" inspect "$DATA/smollm2-4blk.gguf" --save-tokenizer "$W/models/smollm2/tokenizer.json" >/dev/null
    R=$W/study
    rm -rf "$R"
    timed "study collect 9000+3000" "$BIN" --device cuda collect "$W/models/smollm2" --corpus "$W/wiki.json" \
      --out "$R" --train 9000 --val 3000 --quiet
    for stage in fit r2 predict early-exit; do
      timed "study $stage" "$BIN" --device cuda $stage "$R" >/dev/null
    done
    cp "$R/manifest.json" "$R_OUT/study-manifest.json"
    ;;
  forward)
    log "forward"
    for m in ${FORWARD_MODELS:-smollm2 gpt2 gpt2-medium gpt2-xl bert-large}; do
      [ -f "$W/models/$m/model.safetensors" ] || $PY "$ROOT/scripts/make_random_models.py" "$W/models" $m >>"$OUT/log.txt"
      for b in 32 256 1024; do
        "$BIN" --device cuda bench forward "$W/models/$m" --batch $b --seq 24 --iters 10 \
          --ids-out "$W/ids.safetensors" >"$R_OUT/fwd-$m-$b-jumplens.json" 2>>"$OUT/log.txt" || log "FAILED jumplens forward $m $b"
        $PY "$ROOT/scripts/bench_torch.py" forward "$W/models/$m" "$W/ids.safetensors" 10 cuda \
          >"$R_OUT/fwd-$m-$b-torch.json" 2>>"$OUT/log.txt" || log "FAILED torch forward $m $b"
      done
      rm -rf "${W:?}/models/$m"
    done
    ;;
  bf16)
    log "bf16 (8B shape)"
    M8=$W/models/llama3-8b
    [ -f "$M8/config.json" ] || timed "make llama3-8b bf16" $PY "$ROOT/scripts/make_random_models.py" --dtype bf16 --device cuda "$W/models" llama3-8b >>"$OUT/log.txt"
    for shape in 64x32 16x512 64x512; do
      b=${shape%x*} t=${shape#*x}
      gpu_peak "$R_OUT/mem-8b-$shape-jumplens.txt" "$BIN" --device cuda --dtype bf16 bench forward "$M8" --batch $b --seq $t --iters 10 \
        --ids-out "$W/ids.safetensors" >"$R_OUT/fwd8b-$shape-jumplens.json" 2>>"$OUT/log.txt" || log "FAILED jumplens 8b $shape"
      gpu_peak "$R_OUT/mem-8b-$shape-torch.txt" $PY "$ROOT/scripts/bench_torch.py" forward "$M8" "$W/ids.safetensors" 10 cuda bf16 \
        >"$R_OUT/fwd8b-$shape-torch.json" 2>>"$OUT/log.txt" || log "FAILED torch 8b $shape"
    done
    ;;&
  bf16 | bf16small)
    # BF16_MODELS picks the small shapes (default: both).
    for m in ${BF16_MODELS:-smollm2 gpt2}; do
      [ -f "$W/models/$m/model.safetensors" ] || $PY "$ROOT/scripts/make_random_models.py" --dtype bf16 "$W/models" $m >>"$OUT/log.txt"
      for b in 32 256 1024; do
        "$BIN" --device cuda --dtype bf16 bench forward "$W/models/$m" --batch $b --seq 24 --iters 10 \
          --ids-out "$W/ids.safetensors" >"$R_OUT/fwdbf16-$m-$b-jumplens.json" 2>>"$OUT/log.txt" || log "FAILED jumplens bf16 $m $b"
        $PY "$ROOT/scripts/bench_torch.py" forward "$W/models/$m" "$W/ids.safetensors" 10 cuda bf16 \
          >"$R_OUT/fwdbf16-$m-$b-torch.json" 2>>"$OUT/log.txt" || log "FAILED torch bf16 $m $b"
      done
    done
    ;;
  study8b)
    log "study8b"
    M8=$W/models/llama3-8b
    [ -f "$M8/config.json" ] || timed "make llama3-8b bf16" $PY "$ROOT/scripts/make_random_models.py" --dtype bf16 --device cuda "$W/models" llama3-8b >>"$OUT/log.txt"
    # SmolLM2's tokenizer (49,152 ids < the model's 128,256): the text is real, the weights random.
    "$BIN" inspect "$DATA/smollm2-4blk.gguf" --save-tokenizer "$M8/tokenizer.json" >/dev/null
    R=$W/study8b
    rm -rf "$R"
    # Statistics instead of stored training states: at d = 4096 the stored form writes 4.9 GB of f32
    # states that the fit then reads back (55 s of a 207 s study); the sums are formed on the GPU.
    timed "study8b collect 9000+3000 (stats-only, to-final)" "$BIN" --device cuda --dtype bf16 collect "$M8" --corpus "$W/wiki.json" \
      --out "$R" --train 9000 --val 3000 --stats-only --pairs to-final --quiet
    # The tables (and raw.tgz) after every stage: a call cut off by its time limit still brings
    # back the stage times it reached.
    # The manifest after every stage: its phase times (counts.*.phases_s of collect, stages.fit.phases_s,
    # stages.submodules.parts_s) come back even when a later stage is cut off.
    cp "$R/manifest.json" "$R_OUT/study8b-manifest.json"
    tables
    for stage in fit r2 predict early-exit; do
      timed "study8b $stage" "$BIN" --device cuda --dtype bf16 $stage "$R" >"$R_OUT/study8b-$stage.txt"
      cp "$R/manifest.json" "$R_OUT/study8b-manifest.json"
      tables
    done
    # Sub-modules last (they fit the short jumps alternation needs and replay their training sample).
    # STUDY8B_SUBMODULES=0 stops before them (their time is measured on its own, ~220 s in 2026-12).
    [ "${STUDY8B_SUBMODULES:-1}" = 0 ] && continue
    timed "study8b submodules" timeout 240 "$BIN" --device cuda --dtype bf16 submodules "$R" >"$R_OUT/study8b-submodules.txt"
    cp "$R/manifest.json" "$R_OUT/study8b-manifest.json"
    ;;
  diag8b)
    # Where the 8B study's collect time goes beyond the forward: one process that only loads the
    # model and runs one text, and the forward rate at the shapes collect's batches have
    # (Wikipedia sentences of ~30 tokens, the longest 142: batches of ~115 x 142 and 256 x 30).
    log "diag8b"
    M8=$W/models/llama3-8b
    [ -f "$M8/config.json" ] || timed "make llama3-8b bf16" $PY "$ROOT/scripts/make_random_models.py" --dtype bf16 --device cuda "$W/models" llama3-8b >>"$OUT/log.txt"
    timed "load + one text (hidden-states)" "$BIN" --device cuda --dtype bf16 hidden-states "$M8" --text "The capital of France is" --out "$W/one.safetensors"
    timed "load + one text again" "$BIN" --device cuda --dtype bf16 hidden-states "$M8" --text "The capital of France is" --out "$W/one.safetensors"
    for shape in 115x142 256x30; do
      b=${shape%x*} t=${shape#*x}
      "$BIN" --device cuda --dtype bf16 bench forward "$M8" --batch $b --seq $t --iters 5 >"$R_OUT/diag8b-fwd-$shape.json" 2>>"$OUT/log.txt" || log "FAILED diag8b $shape"
      log "diag8b forward $shape: $(cat "$R_OUT/diag8b-fwd-$shape.json" | tr -d '\n' | cut -c1-300)"
    done
    ;;
  report8b)
    # Issue 13 item 4 and the whole-study target: `jumplens report` on the 8B shape, every stage
    # in one process (one model load; on a GPU the report collects the to-final statistics for a
    # model this size). REPORT8B_TRAIN / REPORT8B_VAL: the sizes (default the paper's 9,000 / 3,000).
    log "report8b"
    M8=$W/models/llama3-8b
    [ -f "$M8/config.json" ] || timed "make llama3-8b bf16" $PY "$ROOT/scripts/make_random_models.py" --dtype bf16 --device cuda "$W/models" llama3-8b >>"$OUT/log.txt"
    "$BIN" inspect "$DATA/smollm2-4blk.gguf" --save-tokenizer "$M8/tokenizer.json" >/dev/null
    rm -rf "$W/report8b"
    n_tr=${REPORT8B_TRAIN:-9000} n_va=${REPORT8B_VAL:-3000}
    timed "report8b ($n_tr + $n_va)" timeout "${REPORT8B_LIMIT:-900}" "$BIN" --device cuda --dtype bf16 report "$M8" --corpus "$W/wiki.json" \
      --out "$W/report8b" --train "$n_tr" --val "$n_va" >"$R_OUT/report8b.txt" 2>&1
    cp "$W/report8b/manifest.json" "$R_OUT/report8b-manifest.json" 2>/dev/null
    tail -30 "$R_OUT/report8b.txt" | tr '\r' '\n' | grep -v '^ *$' | tail -20
    $PY - "$W/report8b/manifest.json" <<'STAGES' 2>&1 | tee "$R_OUT/report8b-stages.txt"
import json, sys
m = json.load(open(sys.argv[1]))
tot = 0.0
for name, rec in m.get("stages", {}).items():
    w = rec.get("wall_s") if isinstance(rec, dict) else None
    if isinstance(w, (int, float)):
        tot += w
        print(f"{name:12s} {w:8.1f} s")
print(f"{'stages':12s} {tot:8.1f} s")
# Where each stage's time went: its record's timings, and the collect's phases per split.
def timings(v, at=""):
    if isinstance(v, dict):
        for k, x in v.items():
            yield from timings(x, f"{at}.{k}" if at else k)
    elif isinstance(v, (int, float)) and not isinstance(v, bool) and ("_s" in at or "seconds" in at or "phases" in at):
        yield at, v
for name, rec in m.get("stages", {}).items():
    print(name, " ".join(f"{k}={v:.1f}" for k, v in timings(rec) if k != "wall_s"))
for split, c in m.get("counts", {}).items():
    print("collect", split, " ".join(f"{k}={v:.1f}" for k, v in timings(c)))
STAGES
    ;;
  agreefit)
    # The fit from statistics solved on the GPU (cuSOLVER Cholesky inverse where the statistics
    # are, the host's decisions) vs on the CPU (faer) from the same statistics: the truncated
    # SmolLM2 (d = 576) collected once as to-final statistics on the GPU, fitted and scored with
    # r2 on each device, maps / r2.json compared.
    log "agreefit"
    M=$DATA/smollm2-4blk.gguf
    A=$W/agreefit-cuda
    rm -rf "$A" "$W/agreefit-cpu"
    timed "agreefit collect --stats-only (cuda)" "$BIN" --device cuda --dtype f32 collect "$M" --corpus "$W/wiki.json" \
      --out "$A" --train 600 --val 200 --stats-only --pairs to-final --quiet
    cp -r "$A" "$W/agreefit-cpu"
    for dev in cuda cpu; do
      { "$BIN" --device $dev fit "$W/agreefit-$dev" --pairs to-final && "$BIN" --device $dev r2 "$W/agreefit-$dev"; } \
        >"$R_OUT/agreefit-$dev.txt" 2>&1 || log "FAILED agreefit fit/r2 $dev"
      grep -i "warn\|layer" "$R_OUT/agreefit-$dev.txt" | head -5
    done
    $PY "$ROOT/scripts/compare_runs.py" "$A" "$W/agreefit-cpu" --same-states --json "$R_OUT/agreefit.json" \
      >"$R_OUT/agreefit.txt" || log "AGREEMENT FAILED: the fit from statistics cpu vs cuda"
    cat "$R_OUT/agreefit.txt"
    ;;
  agreesub)
    # The sub-module maps from fewer examples than coordinates (the least-norm path: on the GPU
    # the examples' Gram's eigendecomposition by cuSOLVER, on the CPU the host factorisation) on
    # the same states: the truncated SmolLM2 (d = 576) collected once on the CPU, sub-modules
    # fitted on 400 examples on each device, submodules.json / alternation.json compared.
    log "agreesub"
    M=$DATA/smollm2-4blk.gguf
    A=$W/agreesub-cpu
    rm -rf "$A" "$W/agreesub-cuda"
    timed "agreesub collect (cpu)" "$BIN" --device cpu --dtype f32 collect "$M" --corpus "$W/wiki.json" --out "$A" \
      --train 600 --val 200 --quiet
    "$BIN" --device cpu fit "$A" >/dev/null && "$BIN" --device cpu r2 "$A" >/dev/null || log "FAILED agreesub fit/r2"
    cp -r "$A" "$W/agreesub-cuda"
    for dev in cpu cuda; do
      timed "agreesub submodules $dev" "$BIN" --device $dev --dtype f32 submodules "$W/agreesub-$dev" --train 400 --val 100 \
        >"$R_OUT/agreesub-$dev.txt" 2>&1 || log "FAILED agreesub submodules $dev"
    done
    $PY "$ROOT/scripts/compare_runs.py" "$W/agreesub-cuda" "$A" --same-states --json "$R_OUT/agreesub.json" \
      >"$R_OUT/agreesub.txt" || log "AGREEMENT FAILED: sub-modules (least-norm maps) cpu vs cuda"
    cat "$R_OUT/agreesub.txt"
    ;;
  profile)
    # PROFILE_MODEL (default llama3-8b-4l) and PROFILE_SHAPES (default "16x512 64x32") pick what.
    log "profile"
    PM=${PROFILE_MODEL:-llama3-8b-4l}
    M4=$W/models/$PM
    [ -f "$M4/config.json" ] || $PY "$ROOT/scripts/make_random_models.py" --dtype bf16 "$W/models" "$PM" >>"$OUT/log.txt"
    for shape in ${PROFILE_SHAPES:-16x512 64x32}; do
      b=${shape%x*} t=${shape#*x}
      "$BIN" --device cuda --dtype bf16 bench forward "$M4" --batch $b --seq $t --iters 5 --profile \
        --ids-out "$W/ids.safetensors" >"$R_OUT/profile-$PM-$shape-jumplens.json" 2>>"$OUT/log.txt" || log "FAILED jumplens profile $shape"
      $PY "$ROOT/scripts/bench_torch.py" forward "$M4" "$W/ids.safetensors" 5 cuda bf16 \
        >"$R_OUT/profile-$PM-$shape-torch-forward.json" 2>>"$OUT/log.txt" || log "FAILED torch forward $shape"
      $PY "$ROOT/scripts/bench_torch.py" profile "$M4" "$W/ids.safetensors" cuda bf16 \
        >"$R_OUT/profile-$PM-$shape-torch.jsonl" 2>>"$OUT/log.txt" || log "FAILED torch profile $shape"
      # Kernel by kernel (Nsight Compute reads the durations where the runtime lets it): one
      # forward after the warm-up, summed by kernel name.
      if command -v ncu >/dev/null 2>&1; then
        timeout 240 ncu --clock-control none --csv --metrics gpu__time_duration.sum \
          "$BIN" --device cuda --dtype bf16 bench forward "$M4" --batch $b --seq $t --iters 1 \
          >"$R_OUT/ncu-$PM-$shape.csv" 2>>"$OUT/log.txt" || log "ncu failed or timed out ($shape)"
        $PY - "$R_OUT/ncu-$PM-$shape.csv" <<'NCU' >"$R_OUT/ncu-$PM-$shape.txt" 2>&1
import csv, collections, sys
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
head, body = rows[0], rows[1:]
ki, vi, ui = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
tot, cnt = collections.Counter(), collections.Counter()
for r in body:
    v = float(r[vi].replace(",", ""))
    v *= {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3, "s": 1e3}.get(r[ui], 1e-6)
    k = r[ki][:90]
    tot[k] += v
    cnt[k] += 1
print(f"total {sum(tot.values()):.2f} ms over {sum(cnt.values())} kernels (2 forwards: warm-up + 1)")
for k, v in tot.most_common(25):
    print(f"{v:9.2f} ms {cnt[k]:5d} x  {k}")
NCU
        cat "$R_OUT/ncu-$PM-$shape.txt"
      fi
      echo "--- $shape jumplens"; cat "$R_OUT/profile-$PM-$shape-jumplens.json"
      echo "--- $shape torch"; cat "$R_OUT/profile-$PM-$shape-torch-forward.json" "$R_OUT/profile-$PM-$shape-torch.jsonl"
    done
    ;;
  blocks)
    log "blocks"
    M4=$W/models/llama3-8b-4l
    [ -f "$M4/config.json" ] || $PY "$ROOT/scripts/make_random_models.py" --dtype bf16 --device cuda "$W/models" llama3-8b-4l >>"$OUT/log.txt"
    for shape in 16x512 64x32 64x512; do
      b=${shape%x*} t=${shape#*x}
      "$BIN" --device cuda --dtype bf16 bench forward "$M4" --batch $b --seq $t --iters 10 \
        --ids-out "$W/ids.safetensors" >"$R_OUT/fwd8b4l-$shape-jumplens.json" 2>>"$OUT/log.txt" || log "FAILED jumplens 8b-4l $shape"
      JUMPLENS_ATTENTION=materialized "$BIN" --device cuda --dtype bf16 bench forward "$M4" --batch $b --seq $t --iters 10 \
        >"$R_OUT/fwd8b4l-$shape-materialized.json" 2>>"$OUT/log.txt" || log "FAILED jumplens materialized 8b-4l $shape"
      $PY "$ROOT/scripts/bench_torch.py" forward "$M4" "$W/ids.safetensors" 10 cuda bf16 \
        >"$R_OUT/fwd8b4l-$shape-torch.json" 2>>"$OUT/log.txt" || log "FAILED torch 8b-4l $shape"
      cat "$R_OUT/fwd8b4l-$shape-jumplens.json" "$R_OUT/fwd8b4l-$shape-materialized.json" "$R_OUT/fwd8b4l-$shape-torch.json"
    done
    ;;
  fused)
    log "fused"
    # Ragged rows (lengths 200, 137, 64, 1 would need ids of varying length: bench pads none), so
    # the default equal-length batch plus a causal check on every row; f16 and bf16 run the fused
    # attention (flash kernel), f32 and JUMPLENS_ATTENTION=materialized the materialising path.
    for m in ${FUSED_MODELS:-llama3-8b-4l smollm2 gpt2}; do
      [ -f "$W/models/$m/config.json" ] || $PY "$ROOT/scripts/make_random_models.py" --dtype bf16 "$W/models" $m >>"$OUT/log.txt"
      for dt in bf16 f16 f32; do
        "$BIN" --device cuda --dtype $dt bench forward "$W/models/$m" --batch 4 --seq 200 --iters 1 \
          --ids-out "$W/ids.safetensors" --states-out "$W/st-j.safetensors" >/dev/null 2>>"$OUT/log.txt" || log "FAILED jumplens states $m $dt"
        JUMPLENS_ATTENTION=materialized "$BIN" --device cuda --dtype $dt bench forward "$W/models/$m" --batch 4 --seq 200 --iters 1 \
          --ids-out "$W/ids-m.safetensors" --states-out "$W/st-m.safetensors" >/dev/null 2>>"$OUT/log.txt" || log "FAILED jumplens materialized states $m $dt"
        $PY "$ROOT/scripts/bench_torch.py" states "$W/models/$m" "$W/ids.safetensors" "$W/st-e.safetensors" cuda $dt eager 2>>"$OUT/log.txt"
        $PY "$ROOT/scripts/bench_torch.py" states "$W/models/$m" "$W/ids.safetensors" "$W/st-s.safetensors" cuda $dt sdpa 2>>"$OUT/log.txt"
        $PY - "$W" "$m" "$dt" <<'CMP' | tee "$R_OUT/fused-$m-$dt.txt"
import sys, numpy as np
from safetensors.numpy import load_file
w, m, dt = sys.argv[1:]
j, mt, e, s = (load_file(f"{w}/st-{k}.safetensors")["hidden_states"].astype(np.float64) for k in "jmes")
rel = lambda a, b: [float(np.linalg.norm(a[l] - b[l]) / np.linalg.norm(b[l])) for l in range(b.shape[0] - 1)]
rj, rm, rs = rel(j, e), rel(mt, e), rel(s, e)
print(f"{m} {dt}: jumplens vs eager worst {max(rj):.2e} (layer {int(np.argmax(rj))}), last {rj[-1]:.2e}; "
      f"jumplens materialized vs eager worst {max(rm):.2e}; PyTorch sdpa vs eager worst {max(rs):.2e}, last {rs[-1]:.2e}; "
      f"finite {bool(np.isfinite(j).all())}")
CMP
      done
    done
    # Real text in padded, length-grouped batches (the masks of ragged rows): a bf16 collect of the
    # truncated SmolLM2 with the fused attention vs the materialising path, and vs the CPU in f32.
    # FUSED_COLLECT=0 skips it.
    [ "${FUSED_COLLECT:-1}" = 0 ] && continue
    for how in fused materialized; do
      rm -rf "$W/flash-$how"
      JUMPLENS_ATTENTION=$how timed "fused collect bf16 ($how)" "$BIN" --device cuda --dtype bf16 collect "$DATA/smollm2-4blk.gguf" \
        --corpus "$W/wiki.json" --out "$W/flash-$how" --train 500 --val 200 --quiet
    done
    rm -rf "$W/flash-cpu"
    timed "fused collect f32 (cpu)" "$BIN" --device cpu --dtype f32 collect "$DATA/smollm2-4blk.gguf" \
      --corpus "$W/wiki.json" --out "$W/flash-cpu" --train 500 --val 200 --quiet
    { echo "fused vs materialized (both bf16 on the GPU):"
      $PY "$ROOT/scripts/compare_runs.py" "$W/flash-fused" "$W/flash-materialized"
      echo "fused bf16 GPU vs f32 CPU:"
      $PY "$ROOT/scripts/compare_runs.py" "$W/flash-fused" "$W/flash-cpu"
      echo "materialized bf16 GPU vs f32 CPU:"
      $PY "$ROOT/scripts/compare_runs.py" "$W/flash-materialized" "$W/flash-cpu"; } 2>&1 | tee "$R_OUT/fused-collect.txt"
    ;;
  shards)
    log "shards"
    [ -f "$W/models/smollm2/model.safetensors" ] || $PY "$ROOT/scripts/make_random_models.py" "$W/models" smollm2
    "$BIN" inspect "$DATA/smollm2-4blk.gguf" --save-tokenizer "$W/models/smollm2/tokenizer.json" >/dev/null
    S=$W/shards
    rm -rf "$S"
    mkdir -p "$S"
    one() { "$BIN" --device cuda collect "$W/models/smollm2" --corpus "$W/wiki.json" --train 9000 --val 3000 --quiet "$@"; }
    timed "shards single collect 9000+3000" one --out "$S/single"
    # Two shards as two processes sharing the GPU.
    t0=$(date +%s.%N)
    one --out "$S/s0" --stats-only --pairs all --shard 0/2 2>>"$OUT/log.txt" &
    p0=$!
    one --out "$S/s1" --stats-only --pairs all --shard 1/2 2>>"$OUT/log.txt" &
    p1=$!
    wait $p0; r0=$?
    wait $p1; r1=$?
    t1=$(date +%s.%N)
    echo "{\"name\": \"shards 2 processes collect --stats-only\", \"seconds\": $(awk "BEGIN {print $t1 - $t0}"), \"rc\": $((r0 + r1))}" >>"$R_OUT/times.jsonl"
    timed "shards merge" "$BIN" merge "$S/merged" "$S/s0" "$S/s1"
    for R in "$S/single" "$S/merged"; do
      for stage in fit r2 predict; do
        timed "shards $stage $(basename "$R")" "$BIN" --device cuda $stage "$R" >/dev/null
      done
    done
    $PY - "$S/single" "$S/merged" >"$R_OUT/shards-compare.txt" 2>&1 <<'PY' || log "SHARDS COMPARISON FAILED"
import json, sys
import numpy as np
from safetensors.numpy import load_file
a, b = sys.argv[1], sys.argv[2]
ma, mb = load_file(f"{a}/maps.safetensors"), load_file(f"{b}/maps.safetensors")
assert sorted(ma) == sorted(mb), "other pairs"
worst = max(float(np.abs(ma[k].astype(np.float64) - mb[k]).max() / np.abs(ma[k]).max()) for k in ma)
print(f"maps: {len(ma)} tensors, max |diff| / max |A| = {worst:.3e}")
def nums(v, out):
    if isinstance(v, dict):
        for k, x in v.items():
            if "wall" not in k and "seconds" not in k and not k.endswith("_s"):
                nums(x, out)
    elif isinstance(v, list):
        for x in v:
            nums(x, out)
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        out.append(float(v))
for f in ["r2.json", "predict.json"]:
    x, y = [], []
    nums(json.load(open(f"{a}/{f}")), x)
    nums(json.load(open(f"{b}/{f}")), y)
    assert len(x) == len(y), f
    d = max((abs(p - q) / max(abs(p), abs(q), 1.0) for p, q in zip(x, y)), default=0.0)
    print(f"{f}: {len(x)} numbers, max relative diff {d:.3e}")
# Single = stored f32 Gram (GPU fit); merged = float64 statistics: agreement is bounded by the
# float32 fit's error, not by 1e-9.
assert worst < 1e-3, worst
PY
    cat "$R_OUT/shards-compare.txt" | tee -a "$OUT/log.txt"
    ;;
  split)
    log "split"
    M=$W/models/smollm2
    [ -f "$M/model.safetensors" ] || $PY "$ROOT/scripts/make_random_models.py" "$W/models" smollm2 >>"$OUT/log.txt"
    "$BIN" inspect "$DATA/smollm2-4blk.gguf" --save-tokenizer "$M/tokenizer.json" >/dev/null
    "$BIN" --device cuda:0,cuda:0 inspect "$M" | tee "$R_OUT/split-inspect.txt"
    text="The quick brown fox jumps over the lazy dog near the river bank."
    for dev in cuda:0 cuda:0,cuda:0; do
      tag=${dev//[:,]/_}
      timed "split $dev hidden-states" "$BIN" --device $dev hidden-states "$M" --text "$text" --out "$W/hs-split-$tag.safetensors"
      rm -rf "$W/split-$tag"
      timed "split $dev collect 500+200" "$BIN" --device $dev collect "$M" --corpus "$W/wiki.json" --out "$W/split-$tag" \
        --train 500 --val 200 --quiet
      for b in 32 256; do
        "$BIN" --device $dev bench forward "$M" --batch $b --seq 24 --iters 10 >"$R_OUT/split-fwd-$tag-$b.json" \
          2>>"$OUT/log.txt" || log "FAILED split forward $dev $b"
      done
    done
    # Bit-identical bytes are expected (the same kernels on the same GPU); compare_runs.py gives
    # the size of any difference.
    bad=0
    { for f in hs-split-cuda_0_cuda_0.safetensors split-cuda_0_cuda_0/activations/train.safetensors \
        split-cuda_0_cuda_0/activations/val.safetensors; do
        if cmp -s "$W/$f" "$W/${f//cuda_0_cuda_0/cuda_0}"; then echo "identical bytes: $f"; else echo "DIFFERENT bytes: $f"; bad=1; fi
      done
      $PY "$ROOT/scripts/compare_runs.py" --states "$W/hs-split-cuda_0_cuda_0.safetensors" "$W/hs-split-cuda_0.safetensors" || bad=1
      $PY "$ROOT/scripts/compare_runs.py" "$W/split-cuda_0_cuda_0" "$W/split-cuda_0" || bad=1
      for f in "$R_OUT"/split-fwd-*.json; do echo "$(basename "$f"): $(cat "$f")"; done
    } >"$R_OUT/split.txt" 2>&1
    [ $bad -eq 0 ] || log "SPLIT AGREEMENT FAILED (see split.txt)"
    cat "$R_OUT/split.txt"
    ;;
  split70b)
    log "split70b (needs two GPUs)"
    M70=$W/models/llama-70b
    mkdir -p "$M70"
    # The shape only: the weights are made on the GPUs by jumplens (and by the PyTorch script).
    cat >"$M70/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192,
 "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
 "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": false,
 "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}
JSON
    # SmolLM2's tokenizer (49,152 ids < 128,256) for the re-collection of real sentences.
    "$BIN" inspect "$DATA/smollm2-4blk.gguf" --save-tokenizer "$M70/tokenizer.json" >/dev/null
    MS=$W/models/smollm2
    [ -f "$MS/model.safetensors" ] || $PY "$ROOT/scripts/make_random_models.py" "$W/models" smollm2 >>"$OUT/log.txt"
    cp "$M70/tokenizer.json" "$MS/tokenizer.json"
    rm -rf "$W/sentences500"
    # 500 sampled sentences (their examples are what bench collect re-collects on the 70B shape).
    "$BIN" --device cuda:0 collect "$MS" --corpus "$W/wiki.json" --out "$W/sentences500" --train 1 --val 500 --quiet
    for shape in 16x512 64x32; do
      b=${shape%x*} t=${shape#*x}
      gpu_peaks "$R_OUT/mem-70b-$shape-jumplens.txt" "$BIN" --device cuda:0,cuda:1 --dtype bf16 bench forward \
        --random-config "$M70/config.json" --batch $b --seq $t --iters 5 --ids-out "$W/ids.safetensors" \
        >"$R_OUT/fwd70b-$shape-jumplens.json" 2>>"$OUT/log.txt" || log "FAILED jumplens 70b $shape"
      gpu_peaks "$R_OUT/mem-70b-$shape-torch.txt" $PY "$ROOT/scripts/bench_split_torch.py" forward "$M70/config.json" \
        "$W/ids.safetensors" 5 >"$R_OUT/fwd70b-$shape-torch.json" 2>>"$OUT/log.txt" || log "FAILED torch 70b $shape"
    done
    gpu_peaks "$R_OUT/mem-70b-collect-jumplens.txt" "$BIN" --device cuda:0,cuda:1 --dtype bf16 bench collect \
      --random-config "$M70/config.json" --activations "$W/sentences500/activations/val.safetensors" \
      >"$R_OUT/collect70b-jumplens.json" 2>>"$OUT/log.txt" || log "FAILED jumplens 70b collect"
    cat "$R_OUT"/fwd70b-*.json "$R_OUT"/collect70b-*.json "$R_OUT"/mem-70b-*.txt
    ;;
  tuned)
    # Seconds per step of tuned-lens training (forward with all states, the loss and backward of
    # every translator, clip, SGD): jumplens's from its manifest (`step_s`, one entry per step),
    # the package's from bench_tuned_torch.py; both leave out the first TUNED_WARMUP steps.
    log "tuned"
    DEV=${TUNED_DEVICE:-cuda}
    K=${TUNED_STEPS:-20} WU=${TUNED_WARMUP:-2} TPS=${TUNED_TOKENS:-32768} SEQ=${TUNED_SEQ:-2048}
    M=$W/models/smollm2
    [ -f "$M/model.safetensors" ] || $PY "$ROOT/scripts/make_random_models.py" "$W/models" smollm2 >>"$OUT/log.txt"
    "$BIN" inspect "$DATA/smollm2-4blk.gguf" --save-tokenizer "$M/tokenizer.json" >/dev/null
    R=$W/tuned-run
    rm -rf "$R"
    timed "tuned collect ${TUNED_TRAIN:-1000}+100" "$BIN" --device $DEV collect "$M" --corpus "$W/wiki.json" --out "$R" \
      --train "${TUNED_TRAIN:-1000}" --val 100 --quiet
    for dt in ${TUNED_DTYPES:-f32 bf16}; do
      case $dt in
      f32) pdt=float32 ac="" ;;
      bf16) pdt=bfloat16 ac=--autocast ;;
      esac
      rm -rf "$R/tuned" "$W/tuned-ids.safetensors"
      timed "tuned jumplens $dt ($K steps x $TPS tokens)" "$BIN" --device $DEV --dtype $dt tuned-lens "$R" --steps "$K" \
        --tokens-per-step "$TPS" --seq-len "$SEQ" --ids-out "$W/tuned-ids.safetensors" --quiet
      $PY - "$R/manifest.json" "$WU" "$dt" >"$R_OUT/tuned-$dt-jumplens.json" <<'TUNED' || log "FAILED reading jumplens tuned $dt"
import json, sys
rec = json.load(open(sys.argv[1]))["stages"]["tuned-lens.tuned"]
w = int(sys.argv[2])
s = rec["step_s"][w:]
print(json.dumps({"steps": len(rec["step_s"]), "warmup": w, "steps_timed": len(s), "s_per_step": sum(s) / len(s),
                  "step_s": rec["step_s"], "last_loss": rec["final_loss"], "wall_s": rec["wall_s"],
                  "dtype": sys.argv[3], "options": rec["options"]}))
TUNED
      PYTHONPATH=$DATA/pylib${PYTHONPATH:+:$PYTHONPATH} timed "tuned tuned-lens package $dt ($K steps x $TPS tokens)" \
        $PY "$ROOT/scripts/bench_tuned_torch.py" --model "$M" --device $DEV --dtype $pdt $ac --steps $((K - WU)) \
        --warmup "$WU" --tokens-per-step "$TPS" --seq-len "$SEQ" --ids "$W/tuned-ids.safetensors" \
        --json "$R_OUT/tuned-$dt-torch.json"
      cat "$R_OUT/tuned-$dt-jumplens.json" "$R_OUT/tuned-$dt-torch.json" 2>/dev/null
    done
    ;;
  *) log "unknown section $section" ;;
  esac
  tables
done
cat "$OUT/tables.md"

