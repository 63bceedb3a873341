"""Random-initialised models of real shapes, as Hugging Face folders (config.json +
model.safetensors), for GPU benchmarks where real weights cannot be carried.

  python3 scripts/make_random_models.py OUT_DIR [NAME ...]

  python3 scripts/make_random_models.py --dtype bf16 OUT_DIR llama3-8b

Names: smollm2 (SmolLM2-135M), gpt2 (124M), gpt2-medium, gpt2-xl, bert-large (BertForMaskedLM),
llama3-8b (Llama-3-8B shape: 32 layers, d 4096, ffn 14336, 32/8 heads, vocabulary 128,256; 8.03B
parameters, 16 GB in bf16), llama3-8b-4l (the same cut to 4 blocks, for profiling). Each folder is OUT_DIR/NAME. Weights are initialised by transformers
(seed 0) on the GPU when there is one, in float32 unless `--dtype bf16|f16` (then created in that
dtype directly, so an 8B model never needs 32 GB of host memory), and saved as safetensors shards
of at most 5 GB. Speed does not depend on the values; the correctness checks use real weights.
"""
import os
import sys
import time

import torch
import transformers as tf

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
    "bert-large": lambda: tf.BertForMaskedLM(
        tf.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    ),
}


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def main():
    args = sys.argv[1:]
    dtype = torch.float32
    if args[:1] == ["--dtype"]:
        dtype = DTYPES[args[1]]
        args = args[2:]
    out = args[0]
    names = args[1:] or list(SHAPES)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in names:
        t0 = time.time()
        torch.manual_seed(0)
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = SHAPES[name]()
        torch.set_default_dtype(torch.float32)
        model = model.to(dtype).eval()
        path = os.path.join(out, name)
        model.save_pretrained(path, safe_serialization=True, max_shard_size="5GB")
        n = sum(p.numel() for p in model.parameters())
        print(f"{name}: {n / 1e6:.0f}M parameters -> {path} ({time.time() - t0:.1f} s)", flush=True)
        del model


if __name__ == "__main__":
    main()
