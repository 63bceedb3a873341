"""Random-initialised models of real shapes, as Hugging Face folders (config.json +
model.safetensors), for GPU benchmarks where real weights cannot be carried.

  python3 scripts/make_random_models.py OUT_DIR [NAME ...]

Names: smollm2 (SmolLM2-135M), gpt2 (124M), gpt2-medium, gpt2-xl, bert-large (BertForMaskedLM).
Each folder is OUT_DIR/NAME. Weights are float32, initialised by transformers (seed 0) on the GPU
when there is one. Speed does not depend on the values; the correctness checks use real weights.
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
    "bert-large": lambda: tf.BertForMaskedLM(
        tf.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    ),
}


def main():
    out = sys.argv[1]
    names = sys.argv[2:] or list(SHAPES)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in names:
        t0 = time.time()
        torch.manual_seed(0)
        with torch.device(device):
            model = SHAPES[name]()
        model = model.to(torch.float32).eval()
        path = os.path.join(out, name)
        model.save_pretrained(path, safe_serialization=True)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name}: {n / 1e6:.0f}M parameters -> {path} ({time.time() - t0:.1f} s)", flush=True)
        del model


if __name__ == "__main__":
    main()
