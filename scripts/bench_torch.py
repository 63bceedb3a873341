"""PyTorch references for `scripts/bench.sh` (not tests).

  forward MODEL IDS.safetensors ITERS [cuda] [f32|bf16|f16]
      transformers (float32 unless a dtype is given; sdpa attention; 2 CPU threads, or the GPU with
      `cuda`) forward pass of the base model with output_hidden_states=True on the same token ids
      jumplens used; prints JSON {tokens, seconds (median), tokens_per_s, peak_gib (GPU: the
      allocator's peak, weights included)}. MODEL is a .gguf file or a Hugging Face folder.
  profile MODEL IDS.safetensors cuda [f32|bf16|f16]
      where the time of one forward goes on the GPU: torch.profiler over 3 forwards (after a
      warm-up), the 25 operators with the most device time, as JSON lines {op, cuda_ms, calls}.
  states MODEL IDS.safetensors OUT.safetensors [cuda] [f32|bf16|f16] [eager|sdpa]
      the hidden states of one forward on the ids, as `hidden_states` [L+1, B, T, d] in f32
      (transformers' eager attention by default: the arithmetic jumplens follows).
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


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def load(model_path, device="cpu", dtype=torch.float32, attn="sdpa"):
    if device == "cpu":
        torch.set_num_threads(2)
    if os.path.isdir(model_path):
        from transformers import AutoConfig, AutoModelForMaskedLM

        config = AutoConfig.from_pretrained(model_path)
        auto = AutoModelForMaskedLM if config.model_type == "bert" else AutoModelForCausalLM
        model = auto.from_pretrained(model_path, dtype=dtype, attn_implementation=attn,
                                     device_map=device if device != "cpu" else None)
    else:
        folder, name = os.path.split(os.path.abspath(model_path))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    model.to(device).eval()
    return model


@torch.inference_mode()
def forward(model_path, ids_path, iters, device="cpu", dtype="f32"):
    model = load(model_path, device, DTYPES[dtype])
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    ids = load_file(ids_path)["ids"].to(device)
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        out = model.base_model(input_ids=ids, output_hidden_states=True)
        out.hidden_states[-1].sum().item()
        if i > 0:
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    n = ids.numel()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else None
    print(json.dumps({"what": "forward, all hidden states (PyTorch)", "tokens": n, "seconds": s, "tokens_per_s": n / s,
                      "torch": torch.__version__, "device": device, "dtype": dtype, "peak_gib": peak}))


@torch.inference_mode()
def profile(model_path, ids_path, device="cuda", dtype="bf16"):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = load(model_path, device, DTYPES[dtype])
    ids = load_file(ids_path)["ids"].to(device)
    model.base_model(input_ids=ids, output_hidden_states=True)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            model.base_model(input_ids=ids, output_hidden_states=True)
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    rows.sort(key=lambda e: -e.self_device_time_total)
    for e in rows[:25]:
        print(json.dumps({"op": e.key[:90], "cuda_ms_per_forward": e.self_device_time_total / 3e3,
                          "calls_per_forward": e.count / 3}))


@torch.inference_mode()
def states(model_path, ids_path, out_path, device="cuda", dtype="bf16", attn="eager"):
    from safetensors.torch import save_file

    model = load(model_path, device, DTYPES[dtype], attn)
    ids = load_file(ids_path)["ids"].to(device)
    out = model.base_model(input_ids=ids, output_hidden_states=True)
    hs = torch.stack([h.float() for h in out.hidden_states]).cpu().contiguous()
    save_file({"hidden_states": hs}, out_path)


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
        forward(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else "cpu",
                sys.argv[6] if len(sys.argv) > 6 else "f32")
    elif cmd == "profile":
        profile(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "cuda",
                sys.argv[5] if len(sys.argv) > 5 else "bf16")
    elif cmd == "states":
        a = sys.argv[5:]
        states(sys.argv[2], sys.argv[3], sys.argv[4], *(a + ["cuda", "bf16", "eager"][len(a):]))
    elif cmd == "collect":
        collect(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown command {cmd}")
