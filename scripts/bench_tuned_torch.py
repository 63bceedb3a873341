"""Training speed of the `tuned-lens` 0.2.0 package, for the H200 comparison with
`jumplens tuned-lens` (issue 15): N optimiser steps of the package's own training step (its
TunedLens, `Optimizer.create_optim` / `create_scheduler` defaults and train_loop.py's KL loss
backpropagated once per translator, as scripts/export_tuned_fixtures.py replays them), on a given
model and token ids, printing steps/s and tokens/s (after `--warmup` untimed steps, with the
device synchronised).

    /work/venv-tuned/bin/python scripts/bench_tuned_torch.py --model MODEL_DIR --device cuda \
        --steps 20 --tokens-per-step 32768 --seq-len 2048 [--ids ids.safetensors] [--autocast]

Compare with `jumplens tuned-lens RUN --device cuda --steps 20 --tokens-per-step 32768
--seq-len 2048` (its stage line prints the wall time; subtract its first step's warm-up the same
way, or compare wall time per step over many steps). --ids: a safetensors file with `ids`
[n, seq] (int64), e.g. `jumplens bench` ids; default: seeded random ids from the vocabulary.
--autocast: bf16 autocast as the package's train_loop.py runs it on a GPU (default: the model's
dtype, no autocast). --json FILE: also write {steps, warmup, rows, seq_len, seconds, s_per_step,
tokens_per_s, last_loss, dtype, autocast, device} there. With ids from `jumplens tuned-lens
--ids-out` (all K steps' batches in order), `--warmup W --steps K-W` trains on the same batches
with the same K-step schedule horizon as jumplens's K steps.
"""

import argparse
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_tuned_fixtures import _training_ingredients  # noqa: E402
from tuned_lens.nn import TunedLens  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tokens-per-step", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--ids")
    ap.add_argument("--autocast", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = torch.device(a.device)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype)).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    seq = min(a.seq_len, a.tokens_per_step)
    rows = max(1, -(-a.tokens_per_step // seq))
    total_steps = a.warmup + a.steps
    if a.ids:
        from safetensors.torch import load_file

        ids = load_file(a.ids)["ids"].long()
        need = total_steps * rows
        if ids.shape[0] < need or ids.shape[1] < seq:
            sys.exit(f"{a.ids}: ids {tuple(ids.shape)}, need at least [{need}, {seq}]")
        ids = ids[:need, :seq].reshape(total_steps, rows, seq)
    else:
        g = torch.Generator().manual_seed(a.seed)
        ids = torch.randint(3, model.config.vocab_size, (total_steps, rows, seq), generator=g)
    lens = TunedLens.from_model(model).to(dev)
    cfg = _training_ingredients()()
    params = [p for p in lens.parameters() if p.requires_grad]
    opt = cfg.create_optim(params)
    sched = cfg.create_scheduler(opt, total_steps)

    def step(batch):
        with torch.no_grad():
            out = model(input_ids=batch.to(dev), output_hidden_states=True)
        labels = out.logits.float().log_softmax(dim=-1)
        total = 0.0
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.autocast):
            for i, h in enumerate(out.hidden_states[:-1]):
                logits = lens(h, idx=i).float()
                loss = torch.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
                total += loss.detach()
                loss.backward()
        torch.nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        sched.step()
        return total

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for s in range(a.warmup):
        step(ids[s])
    sync()
    t0 = time.perf_counter()
    loss = None
    for s in range(a.warmup, total_steps):
        loss = step(ids[s])
    sync()
    wall = time.perf_counter() - t0
    print(
        f"tuned-lens 0.2.0: {a.steps} steps of {rows}x{seq} tokens in {wall:.2f} s: "
        f"{a.steps / wall:.3f} steps/s, {a.steps * rows * seq / wall:.0f} tokens/s "
        f"(last loss {float(loss):.4f}, device {dev}, dtype {a.dtype}, autocast {a.autocast})"
    )
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump(
                {
                    "steps": a.steps,
                    "warmup": a.warmup,
                    "rows": rows,
                    "seq_len": seq,
                    "seconds": wall,
                    "s_per_step": wall / a.steps,
                    "tokens_per_s": a.steps * rows * seq / wall,
                    "last_loss": float(loss),
                    "dtype": a.dtype,
                    "autocast": a.autocast,
                    "device": str(dev),
                },
                f,
            )


if __name__ == "__main__":
    main()
