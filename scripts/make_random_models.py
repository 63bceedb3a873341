"""Random-initialised models of real shapes, as Hugging Face folders (config.json +
model.safetensors), for GPU benchmarks where real weights cannot be carried.

  python3 scripts/make_random_models.py OUT_DIR [NAME ...]

  python3 scripts/make_random_models.py --dtype bf16 OUT_DIR llama3-8b
  python3 scripts/make_random_models.py --dtype bf16 --device cuda OUT_DIR llama3-8b   (values drawn on the GPU: seconds, not minutes)

Names: smollm2 (SmolLM2-135M), gpt2 (124M), gpt2-medium, gpt2-xl, bert-large (BertForMaskedLM),
llama3-8b (Llama-3-8B shape: 32 layers, d 4096, ffn 14336, 32/8 heads, vocabulary 128,256; 8.03B
parameters, 16 GB in bf16), llama3-8b-4l (the same cut to 4 blocks, for profiling), llama3-1b (Llama-3.2-1B shape: 16 layers,
d 2048, ffn 8192, 32/8 heads, tied embeddings; 1.24B parameters, 2.5 GB in bf16). Each folder is
OUT_DIR/NAME.

Memory stays bounded whatever the size: transformers builds the model on the meta device (names,
shapes, tied weights; no storage), then each tensor is created on the host in the requested dtype
(float32 unless `--dtype bf16|f16`) and written shard by shard, so the peak is about one shard
(at most SHARD_BYTES = 2 GB) plus the process, not the model: the 8B shape in bf16 (16 GB on
disk) is written in ~2.5 GB of RAM. Values follow transformers' initialisation (normal(0,
initializer_range) for matrices and embeddings, ones for norm weights, zeros for biases), from
a generator seeded per tensor (seed 0 + its index): deterministic. Shards are
model-0000i-of-0000n.safetensors with model.safetensors.index.json, or one model.safetensors.
Speed does not depend on the values; the correctness checks use real weights.
"""
import json
import os
import sys
import time

import torch
import transformers as tf
from safetensors.torch import save_file

SHARD_BYTES = 2 * 1024**3

SHAPES = {
    "smollm2": lambda: tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
            rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
            bos_token_id=1, eos_token_id=2,
        )
    ),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=768, n_layer=12, n_head=12)),
    "gpt2-medium": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=1024, n_layer=24, n_head=16)),
    "gpt2-xl": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=1600, n_layer=48, n_head=25)),
    "llama3-8b": lambda: tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
            rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
            bos_token_id=128000, eos_token_id=128001,
        )
    ),
    # The 8B shape cut to 4 blocks: the same per-block work in 2 GB, for profiling a block.
    "llama3-8b-4l": lambda: tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
            rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
            bos_token_id=128000, eos_token_id=128001,
        )
    ),
    "llama3-1b": lambda: tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
            rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
            bos_token_id=128000, eos_token_id=128001,
        )
    ),
    "bert-large": lambda: tf.BertForMaskedLM(
        tf.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    ),
}


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def init_tensor(name, shape, dtype, std, seed, device="cpu"):
    """One tensor as transformers initialises it, created directly in `dtype` on `device` (a
    GPU draws an 8B model's values in seconds where the CPU takes minutes; the values then come
    from the GPU's generator, equally seeded) and returned on the CPU."""
    t = torch.empty(shape, dtype=dtype, device=device)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return t.zero_().cpu()
    if "norm" in name.lower() and len(shape) == 1:
        return t.fill_(1.0).cpu()
    g = torch.Generator(device=device).manual_seed(seed)
    return t.normal_(0.0, std, generator=g).cpu()


def write_streamed(model, path, dtype, device="cpu"):
    """Writes `model` (on the meta device) tensor by tensor; returns the parameter count."""
    os.makedirs(path, exist_ok=True)
    model.config.dtype = dtype
    model.config.save_pretrained(path)
    std = getattr(model.config, "initializer_range", 0.02)
    # Tied weights are one Parameter under several names: saved once, under the first name
    # (transformers' own save drops the tied copy, e.g. lm_head.weight).
    seen, entries = set(), []
    for name, p in model.state_dict(keep_vars=True).items():
        if id(p) in seen:
            continue
        seen.add(id(p))
        entries.append((name, tuple(p.shape)))
    size = lambda shape: int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
    shards, current, current_bytes = [], [], 0
    for name, shape in entries:
        if current and current_bytes + size(shape) > SHARD_BYTES:
            shards.append(current)
            current, current_bytes = [], 0
        current.append((name, shape))
        current_bytes += size(shape)
    shards.append(current)
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total_bytes, index = {}, 0, 0
    for fname, shard in zip(files, shards):
        tensors = {}
        for name, shape in shard:
            tensors[name] = init_tensor(name, shape, dtype, std, index, device)
            index += 1
            weight_map[name] = fname
            total_bytes += size(shape)
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=1)
    return sum(int(torch.Size(shape).numel()) for _, shape in entries)


def main():
    args = sys.argv[1:]
    dtype, device = torch.float32, "cpu"
    while args[:1] in (["--dtype"], ["--device"]):
        if args[0] == "--dtype":
            dtype = DTYPES[args[1]]
        else:
            device = args[1]
        args = args[2:]
    # Without OUT_DIR, or with an option it does not know (`--help`), say how to call it: taken as
    # the output folder, `--help` once started writing every shape (48 GB) into ./--help.
    if not args or args[0].startswith("-") or any(a.startswith("-") for a in args[1:]):
        sys.exit(__doc__.split("\n\n")[1] if args[:1] in (["-h"], ["--help"]) else
                 f"usage: make_random_models.py [--dtype f32|bf16|f16] [--device D] OUT_DIR [NAME ...] (got {' '.join(args) or 'nothing'})")
    out = args[0]
    names = args[1:] or list(SHAPES)
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        sys.exit(f"make_random_models.py: unknown shape {', '.join(unknown)} (known: {', '.join(SHAPES)})")
    for name in names:
        t0 = time.time()
        with torch.device("meta"):
            model = SHAPES[name]()
        path = os.path.join(out, name)
        n = write_streamed(model, path, dtype, device)
        print(f"{name}: {n / 1e6:.0f}M parameters -> {path} ({time.time() - t0:.1f} s)", flush=True)
        del model


if __name__ == "__main__":
    main()
