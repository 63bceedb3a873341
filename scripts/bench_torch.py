"""PyTorch references for `scripts/bench.sh` (not tests).

  forward MODEL.gguf IDS.safetensors ITERS
      transformers (float32, 2 threads) forward pass with output_hidden_states=True on the same
      token ids jumplens used; prints JSON {tokens, seconds (median), tokens_per_s}.
  collect MODEL.gguf ACTIVATIONS.safetensors
      the paper's pipeline: one forward pass per example over the sentence cut after its sampled
      position (batch 1, output_hidden_states), timing the whole split; prints the same JSON.

Runs with the reference environment (scripts/requirements-reference.txt).
"""
import json
import os
import statistics
import sys
import time

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def load(model_path):
    torch.set_num_threads(2)
    folder, name = os.path.split(os.path.abspath(model_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    return model


@torch.inference_mode()
def forward(model_path, ids_path, iters):
    model = load(model_path)
    ids = load_file(ids_path)["ids"]
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        out = model.model(input_ids=ids, output_hidden_states=True)
        out.hidden_states[-1].sum().item()
        if i > 0:
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    n = ids.numel()
    print(json.dumps({"what": "forward, all hidden states (PyTorch)", "tokens": n, "seconds": s, "tokens_per_s": n / s}))


@torch.inference_mode()
def collect(model_path, act_path):
    model = load(model_path)
    t = load_file(act_path)
    tokens, offsets, positions = t["tokens"], t["offsets"], t["positions"]
    n_tokens = 0
    t0 = time.perf_counter()
    for i in range(len(positions)):
        sentence = tokens[offsets[i] : offsets[i + 1]]
        prefix = sentence[: positions[i] + 1].unsqueeze(0)
        n_tokens += prefix.numel()
        out = model.model(input_ids=prefix, output_hidden_states=True)
        [h[0, -1] for h in out.hidden_states]
    s = time.perf_counter() - t0
    print(json.dumps({"what": "collect, paper pipeline (PyTorch)", "tokens": n_tokens, "seconds": s, "tokens_per_s": n_tokens / s}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "forward":
        forward(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif cmd == "collect":
        collect(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown command {cmd}")
