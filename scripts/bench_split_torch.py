"""PyTorch reference for the `split70b` section of scripts/device_bench.sh (not a test): a model
too large for one GPU, split by accelerate's `device_map="auto"`, with random weights made in
place on each GPU (no checkpoint: 140 GB would not fit the disk).

  forward CONFIG.json IDS.safetensors ITERS

Builds the model from CONFIG.json on the meta device, lets `infer_auto_device_map` place its
decoder layers over the visible GPUs (as `from_pretrained(device_map="auto")` does), makes each
parameter directly on its GPU in bf16 (1-D weights ones, matrices uniform in +-1/sqrt(fan-in),
seed 0), and times the forward with output_hidden_states=True on the same ids jumplens used.
Prints JSON {tokens, seconds (median), tokens_per_s, peak_gib_per_gpu (the allocator's peaks),
device_map (layers per GPU)}.

Needs torch, transformers and accelerate (`pip install accelerate`; not in the reference
environment). Written for two H200s; not run yet (the two-GPU machine was not lent).
"""
import json
import math
import os
import statistics
import sys
import time
from collections import Counter

import torch
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM


def device_of(name, device_map):
    """The device accelerate's map gives a parameter (its longest matching module prefix)."""
    best = None
    for prefix, dev in device_map.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, dev)
    dev = best[1]
    return f"cuda:{dev}" if isinstance(dev, int) else dev


@torch.inference_mode()
def forward(config_path, ids_path, iters):
    config = AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(config_path)))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules, dtype=torch.bfloat16)
    torch.manual_seed(0)
    for name, p in list(model.named_parameters()):
        dev = device_of(name, device_map)
        t = torch.empty(p.shape, dtype=torch.bfloat16, device=dev)
        if p.ndim == 1:
            t.fill_(1.0)
        else:
            bound = 1.0 / math.sqrt(p.shape[-1])
            t.uniform_(-bound, bound)
        set_module_tensor_to_device(model, name, dev, value=t)
    model = dispatch_model(model, device_map=device_map)
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)
    ids = load_file(ids_path)["ids"].to("cuda:0")
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        out = model.model(input_ids=ids, output_hidden_states=True)
        out.hidden_states[-1].sum().item()
        if i > 0:
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    n = ids.numel()
    peaks = [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())]
    layers = Counter(str(d) for k, d in device_map.items() if ".layers." in k or k.endswith(".layers"))
    print(json.dumps({"what": "forward, all hidden states (PyTorch, device_map=auto)", "tokens": n, "seconds": s,
                      "tokens_per_s": n / s, "torch": torch.__version__, "peak_gib_per_gpu": peaks,
                      "layers_per_device": dict(layers)}))


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "forward":
        sys.exit(__doc__)
    forward(sys.argv[2], sys.argv[3], int(sys.argv[4]))
