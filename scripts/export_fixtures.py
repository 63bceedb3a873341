"""Export small PyTorch/`transformers` reference fixtures for the jumplens Rust tests.

What it produces (all deterministic, fixed seeds, CPU, one thread):

  tests/fixtures/tiny/<name>/{config.json, model.safetensors, expected.safetensors}
      for name in llama, llama_tied, qwen2, mistral, gemma3, gpt2, bert_mlm,
      bert_mlm_legacy, bert.  Tiny randomly initialised float32 models (no
      Hugging Face hub access: every model is built from a config object),
      saved with `save_pretrained(safe_serialization=True)`, plus the inputs,
      per-layer hidden states, logits, TransformerLens-style sub-module taps and
      "replaced sub-module" runs recorded with forward hooks.
  tests/fixtures/tiny/README.md
      names, shapes, conventions and the measured float32-vs-float64 error
      (used to choose the Rust test tolerances); regenerated on every run.
  tests/fixtures/lstsq/cases.safetensors (+ README.md)
      least-squares cases solved with scikit-learn's LinearRegression.
  tests/fixtures/tiny/<name>/expected_{bf16,f16}.safetensors   (only with --half)
      the same inputs through the SAME model.safetensors loaded with transformers in
      bfloat16 / float16 (eager attention): hidden states and logits, stored as float32
      upcasts of the 16-bit values. Only these files are written; the float32 fixtures
      are left untouched.

How to rerun (from the repository root):

    python -m venv /root/refenv
    /root/refenv/bin/pip install -r scripts/requirements-reference.txt
    /root/refenv/bin/python scripts/export_fixtures.py

The outputs are byte-identical between runs with the pinned versions
(scripts/requirements-reference.txt).  Other versions of torch/transformers may
change the random initialisation or the config.json layout.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file

import scipy
import sklearn
import transformers
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny"
LSTSQ = ROOT / "tests" / "fixtures" / "lstsq"

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()

B, T = 3, 7
LENGTHS = [7, 4, 6]  # right padding
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # causal models
CLS_ID, SEP_ID = 1, 2  # BERT
VOCAB = 128
INIT_RANGE = 0.15  # larger than the 0.02 default so attention patterns are not uniform
WINDOW = 5  # sliding window of mistral_sliding / qwen2_sliding: shorter than T


# ----------------------------------------------------------------------------------------------
# model construction
# ----------------------------------------------------------------------------------------------

def llama_like_kwargs():
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        initializer_range=INIT_RANGE,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def build_config(name):
    if name in ("llama", "llama_tied"):
        return LlamaConfig(**llama_like_kwargs(), tie_word_embeddings=(name == "llama_tied"))
    if name == "qwen2":
        return Qwen2Config(**llama_like_kwargs(), tie_word_embeddings=False, use_sliding_window=False)
    if name == "mistral":
        return MistralConfig(**llama_like_kwargs(), tie_word_embeddings=False, sliding_window=None)
    if name == "mistral_sliding":  # a real window, shorter than rows 0 and 2 (lengths 7, 6)
        return MistralConfig(**llama_like_kwargs(), tie_word_embeddings=False, sliding_window=WINDOW)
    if name == "qwen2_sliding":  # layer 0 full, layer 1 sliding (max_window_layers=1)
        return Qwen2Config(**llama_like_kwargs(), tie_word_embeddings=False, use_sliding_window=True,
                           sliding_window=WINDOW, max_window_layers=1)
    if name in ("llama_rope_linear", "llama_rope_llama3"):
        kw = llama_like_kwargs()
        theta = kw.pop("rope_theta")
        if name == "llama_rope_linear":
            rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": theta}
        else:  # wavelengths 6.3 (< 16: kept), 20 and 63 (smoothed), >= 199 (> 64: divided by 8)
            rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64, "rope_theta": theta}
        return LlamaConfig(**kw, rope_parameters=rope, tie_word_embeddings=False)
    if name == "gemma3":
        return Gemma3TextConfig(
            vocab_size=VOCAB,
            hidden_size=48,  # != num_heads * head_dim (64) on purpose
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            query_pre_attn_scalar=16,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            initializer_range=INIT_RANGE,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        )
    if name == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_head=4,
            n_layer=2,
            n_positions=32,
            n_inner=None,  # 4 * n_embd
            activation_function="gelu_new",
            layer_norm_epsilon=1e-5,
            tie_word_embeddings=True,
            initializer_range=INIT_RANGE,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        )
    if name in ("bert", "bert_mlm"):
        return BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            hidden_act="gelu",
            type_vocab_size=2,
            max_position_embeddings=32,
            layer_norm_eps=1e-12,
            initializer_range=INIT_RANGE,
            pad_token_id=PAD_ID,
            cls_token_id=CLS_ID,  # extra fields, serialised into config.json
            sep_token_id=SEP_ID,
        )
    if name in ("neox_parallel", "neox_sequential"):
        return GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="gelu",
            rotary_pct=0.25 if name == "neox_parallel" else 0.5,  # partial rotary: 4 or 8 of 16 dims
            max_position_embeddings=64,
            layer_norm_eps=1e-5,
            use_parallel_residual=(name == "neox_parallel"),
            attention_bias=True,
            tie_word_embeddings=False,
            initializer_range=INIT_RANGE,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        )
    if name in ("qwen3", "qwen3_tied"):  # head_dim 24 != 64 / 4
        return Qwen3Config(**llama_like_kwargs(), head_dim=24, tie_word_embeddings=(name == "qwen3_tied"))
    if name == "olmo2":
        return Olmo2Config(**llama_like_kwargs(), tie_word_embeddings=False)
    if name == "mixtral":  # top-2 of 4 experts, window shorter than rows 0 and 2
        return MixtralConfig(**llama_like_kwargs(), num_local_experts=4, num_experts_per_tok=2,
                             sliding_window=WINDOW, tie_word_embeddings=False)
    if name in ("phi3_longrope", "phi3_short"):
        # partial rotary (8 of 16 dims, 4 frequencies); original_max 4 < T = 7 picks the long
        # factors for the fixture batch, 16 > T keeps the short ones.
        orig = 4 if name == "phi3_longrope" else 16
        kw = llama_like_kwargs()
        theta = kw.pop("rope_theta")
        rope = {"rope_type": "longrope", "rope_theta": theta, "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.3, 2.1, 3.7], "long_factor": [1.5, 2.9, 5.3, 11.0],
                "original_max_position_embeddings": orig}
        return Phi3Config(**kw, original_max_position_embeddings=orig, rope_parameters=rope,
                          tie_word_embeddings=False)
    if name == "gemma2":
        return Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,  # != head_dim, so the scale matters
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            attn_logit_softcapping=GEMMA2_ATTN_CAP,
            final_logit_softcapping=GEMMA2_FINAL_CAP,
            initializer_range=INIT_RANGE,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        )
    raise KeyError(name)


GEMMA2_ATTN_CAP = 1.0  # small enough to bite (checked in export_model)
GEMMA2_FINAL_CAP = 1.5

MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "llama_tied": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "mistral": MistralForCausalLM,
    "mistral_sliding": MistralForCausalLM,
    "qwen2_sliding": Qwen2ForCausalLM,
    "llama_rope_linear": LlamaForCausalLM,
    "llama_rope_llama3": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "bert_mlm": BertForMaskedLM,
    "bert": BertModel,
    "neox_parallel": GPTNeoXForCausalLM,
    "neox_sequential": GPTNeoXForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "qwen3_tied": Qwen3ForCausalLM,
    "gemma2": Gemma2ForCausalLM,
    "olmo2": Olmo2ForCausalLM,
    "phi3_longrope": Phi3ForCausalLM,
    "phi3_short": Phi3ForCausalLM,
    "mixtral": MixtralForCausalLM,
}
SEEDS = {"llama": 11, "llama_tied": 12, "qwen2": 13, "mistral": 14, "gemma3": 15, "gpt2": 16, "bert_mlm": 17, "bert": 18,
         "mistral_sliding": 19, "qwen2_sliding": 20, "llama_rope_linear": 21, "llama_rope_llama3": 22}
SEEDS.update({"neox_parallel": 23, "neox_sequential": 24, "qwen3": 25, "qwen3_tied": 26, "gemma2": 27, "olmo2": 28,
              "phi3_longrope": 29, "phi3_short": 30, "mixtral": 31})
NEW_NAMES = ["mistral_sliding", "qwen2_sliding", "llama_rope_linear", "llama_rope_llama3"]
# Issue 14's architectures: exported with `--only` into new folders (the older fixtures are not
# regenerated, see docs/adding-an-architecture.md); their tolerances go to ARCHS.md.
ARCH_NAMES = ["neox_parallel", "neox_sequential", "qwen3", "qwen3_tied", "gemma2", "olmo2", "phi3_longrope",
              "phi3_short", "mixtral"]
GEMMA_LIKE = ("gemma3", "gemma2")  # (1 + w) RMSNorms
POST_NORMED = ("gemma3", "gemma2", "olmo2")  # norms on the attention / MLP outputs


def is_norm(module):
    return isinstance(module, torch.nn.LayerNorm) or "RMSNorm" in type(module).__name__


def perturb(model, gen, gemma):
    """Make norm weights/biases and all biases non-trivial (HF init gives 1/0, Gemma gives 0)."""
    done = set()
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            if is_norm(module):
                w = module.weight
                if gemma:  # Gemma RMSNorm scales by (1 + w)
                    w.copy_(torch.randn(w.shape, generator=gen) * 0.5)
                else:
                    w.copy_(1.0 + torch.randn(w.shape, generator=gen) * 0.3)
                done.add(id(w))
        for pname, p in model.named_parameters():  # named_parameters() de-duplicates tied tensors
            if pname.endswith("bias") and id(p) not in done:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                done.add(id(p))


def build_model(name):
    cfg = build_config(name)
    torch.manual_seed(SEEDS[name])
    model = MODEL_CLASSES[name](cfg)
    model.set_attn_implementation("eager")
    if name == "mixtral":  # the per-expert loop (grouped_mm has no float64 kernel)
        model.set_experts_implementation("eager")
    gen = torch.Generator().manual_seed(1000 + SEEDS[name])
    perturb(model, gen, gemma=(name in GEMMA_LIKE))
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------
# architecture description for hooks
# ----------------------------------------------------------------------------------------------

class Arch:
    def __init__(self, model, name):
        self.name = name
        self.kind = "bert" if name.startswith("bert") else "prenorm"
        self.gemma = name in POST_NORMED  # taps ln{1,2}_post.hook_in, attn/mlp_out after the post-norms
        self.no_prenorm = name == "olmo2"  # OLMo 2 has only post-norms
        self.parallel = name == "neox_parallel"
        self.moe = name == "mixtral"
        if name == "gpt2":
            base = model.transformer
            self.layers = list(base.h)
            self.final_norm = base.ln_f
            self.ln1, self.attn, self.ln2, self.mlp = "ln_1", "attn", "ln_2", "mlp"
        elif name.startswith("neox"):
            base = model.gpt_neox
            self.layers = list(base.layers)
            self.final_norm = base.final_layer_norm
            self.ln1, self.attn, self.ln2, self.mlp = "input_layernorm", "attention", "post_attention_layernorm", "mlp"
        elif name == "olmo2":
            base = model.model
            self.layers = list(base.layers)
            self.final_norm = base.norm
            self.ln1, self.attn, self.ln2, self.mlp = None, "self_attn", None, "mlp"
        elif False:
            base = model.transformer
            self.layers = list(base.h)
            self.final_norm = base.ln_f
            self.ln1, self.attn, self.ln2, self.mlp = "ln_1", "attn", "ln_2", "mlp"
        elif self.kind == "prenorm":
            base = model.model
            self.layers = list(base.layers)
            self.final_norm = base.norm
            self.ln1, self.attn, self.mlp = "input_layernorm", "self_attn", "mlp"
            self.ln2 = "pre_feedforward_layernorm" if self.gemma else "post_attention_layernorm"
        else:
            base = model.bert if hasattr(model, "bert") else model
            self.layers = list(base.encoder.layer)
            self.final_norm = None
        self.base = base
        self.n_layers = len(self.layers)


def first_arg(args, kwargs):
    return args[0] if len(args) > 0 else kwargs["hidden_states"]


def first_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def install_taps(arch, store):
    """Forward hooks recording TransformerLens-style taps into `store` (dict name -> tensor)."""
    hs = []

    def rec(key, fn):
        def hook(mod, args, kwargs, out):
            store[key] = fn(args, kwargs, out).detach().clone()
        return hook

    def rec_pre(key):
        def hook(mod, args, kwargs):
            store[key] = first_arg(args, kwargs).detach().clone()
        return hook

    out_fn = lambda a, k, o: first_out(o)  # noqa: E731
    pattern_fn = lambda a, k, o: o[1]  # noqa: E731  eager attention returns (output, probabilities)
    in_fn = lambda a, k, o: first_arg(a, k)  # noqa: E731

    def expanded(a, k, o):  # position embeddings come out [1, T, d]; taps are [B, T, d]
        return o.expand(B, o.shape[-2], o.shape[-1])

    b = arch.base
    if arch.name == "gpt2":
        hs.append(b.wte.register_forward_hook(rec("hook_embed", out_fn), with_kwargs=True))
        hs.append(b.wpe.register_forward_hook(rec("hook_pos_embed", expanded), with_kwargs=True))
    elif arch.name.startswith("neox"):
        hs.append(b.embed_in.register_forward_hook(rec("hook_embed", out_fn), with_kwargs=True))
    elif arch.kind == "prenorm":
        hs.append(b.embed_tokens.register_forward_hook(rec("hook_embed", out_fn), with_kwargs=True))
    else:
        e = b.embeddings
        hs.append(e.word_embeddings.register_forward_hook(rec("hook_embed", out_fn), with_kwargs=True))
        hs.append(e.position_embeddings.register_forward_hook(rec("hook_pos_embed", expanded), with_kwargs=True))
        hs.append(e.token_type_embeddings.register_forward_hook(rec("hook_token_type_embed", out_fn),
                                                                with_kwargs=True))
    for l, layer in enumerate(arch.layers):
        p = f"blocks.{l}."
        hs.append(layer.register_forward_pre_hook(rec_pre(p + "hook_resid_pre"), with_kwargs=True))
        if arch.kind == "prenorm":
            sub = lambda n: getattr(layer, n)  # noqa: E731
            if arch.no_prenorm:  # the "normalised" inputs are the raw residual stream
                hs.append(sub(arch.attn).register_forward_pre_hook(rec_pre(p + "ln1.hook_normalized"), with_kwargs=True))
            else:
                hs.append(sub(arch.ln1).register_forward_hook(rec(p + "ln1.hook_normalized", out_fn),
                                                              with_kwargs=True))
            hs.append(sub(arch.attn).register_forward_hook(rec(p + "attn.hook_pattern", pattern_fn), with_kwargs=True))
            if arch.name == "gpt2":
                down = sub(arch.mlp).c_proj
            elif arch.name.startswith("neox"):
                down = sub(arch.mlp).dense_4h_to_h
            else:
                down = None if arch.moe else sub(arch.mlp).down_proj
            if down is not None:  # MoE: no single MLP activation
                hs.append(down.register_forward_hook(rec(p + "mlp.hook_post", in_fn), with_kwargs=True))
            if arch.gemma:
                hs.append(sub(arch.attn).register_forward_hook(rec(p + "ln1_post.hook_in", out_fn), with_kwargs=True))
                hs.append(layer.post_attention_layernorm.register_forward_hook(
                    rec(p + "hook_attn_out", out_fn), with_kwargs=True))
                hs.append(sub(arch.mlp).register_forward_hook(rec(p + "ln2_post.hook_in", out_fn), with_kwargs=True))
                hs.append(layer.post_feedforward_layernorm.register_forward_hook(
                    rec(p + "hook_mlp_out", out_fn), with_kwargs=True))
            else:
                hs.append(sub(arch.attn).register_forward_hook(rec(p + "hook_attn_out", out_fn), with_kwargs=True))
                hs.append(sub(arch.mlp).register_forward_hook(rec(p + "hook_mlp_out", out_fn), with_kwargs=True))
            if arch.no_prenorm:
                hs.append(sub(arch.mlp).register_forward_pre_hook(rec_pre(p + "hook_resid_mid"), with_kwargs=True))
                hs.append(sub(arch.mlp).register_forward_pre_hook(rec_pre(p + "ln2.hook_normalized"), with_kwargs=True))
            else:
                if not arch.parallel:  # parallel blocks have no resid_mid (ln2 reads the block input)
                    hs.append(sub(arch.ln2).register_forward_pre_hook(rec_pre(p + "hook_resid_mid"), with_kwargs=True))
                hs.append(sub(arch.ln2).register_forward_hook(rec(p + "ln2.hook_normalized", out_fn),
                                                              with_kwargs=True))
            hs.append(layer.register_forward_hook(rec(p + "hook_resid_post", out_fn), with_kwargs=True))
        else:  # BERT, post-LN: names say what the values are (see src/model/arch/bert.rs)
            so, oo = layer.attention.output, layer.output
            hs.append(layer.attention.self.register_forward_hook(rec(p + "attn.hook_pattern", pattern_fn),
                                                                 with_kwargs=True))
            hs.append(so.dense.register_forward_hook(rec(p + "hook_attn_out", out_fn), with_kwargs=True))
            hs.append(so.LayerNorm.register_forward_pre_hook(rec_pre(p + "ln1.hook_in"), with_kwargs=True))
            hs.append(so.LayerNorm.register_forward_hook(rec(p + "ln1.hook_normalized", out_fn), with_kwargs=True))
            hs.append(oo.dense.register_forward_pre_hook(rec_pre(p + "mlp.hook_post"), with_kwargs=True))
            hs.append(oo.dense.register_forward_hook(rec(p + "hook_mlp_out", out_fn), with_kwargs=True))
            hs.append(oo.LayerNorm.register_forward_pre_hook(rec_pre(p + "ln2.hook_in"), with_kwargs=True))
            hs.append(oo.LayerNorm.register_forward_hook(rec(p + "ln2.hook_normalized", out_fn), with_kwargs=True))
            hs.append(layer.register_forward_hook(rec(p + "hook_resid_post", out_fn), with_kwargs=True))
    if arch.final_norm is not None:
        hs.append(arch.final_norm.register_forward_hook(rec("ln_final.hook_normalized", out_fn), with_kwargs=True))
    return hs


def install_replacement(arch, which, W):
    """From block 1 on, replace the attention (or MLP) sub-module output by W @ (its input)."""
    hs = []
    for layer in arch.layers[1:]:
        if arch.kind == "prenorm":
            mod = getattr(layer, arch.attn if which == "attn" else arch.mlp)

            def hook(m, args, kwargs, out):
                x = first_arg(args, kwargs)
                y = x @ W.T
                if isinstance(out, tuple):
                    return (y,) + tuple(out[1:])
                return y

            hs.append(mod.register_forward_hook(hook, with_kwargs=True))
        else:
            stash = {}
            if which == "attn":
                # attention sub-module input = block input; output = attention.output.dense output
                src, dst = layer, layer.attention.output.dense
            else:
                # MLP input = ln1-normalised (intermediate's input); output = output.dense output
                src, dst = layer.intermediate, layer.output.dense

            def pre(m, args, kwargs, stash=stash):
                stash["x"] = first_arg(args, kwargs)

            def post(m, args, kwargs, out, stash=stash):
                return stash["x"] @ W.T

            hs.append(src.register_forward_pre_hook(pre, with_kwargs=True))
            hs.append(dst.register_forward_hook(post, with_kwargs=True))
    return hs


# ----------------------------------------------------------------------------------------------
# float64 reference (patch the float32 up-casts inside transformers so the f64 run is really f64)
# ----------------------------------------------------------------------------------------------

def make_f64(model, name):
    m = copy.deepcopy(model).double()
    cfg = m.config
    for mod in m.modules():
        cls = type(mod).__name__
        if "RMSNorm" in cls and "Olmo2" in cls:  # OLMo 2 casts to the input dtype before the weight
            def fwd(x, mod=mod):
                return mod.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon))
            mod.forward = fwd
        elif "RMSNorm" in cls:
            if "Gemma" in cls:
                def fwd(x, mod=mod):
                    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.eps) * (1.0 + mod.weight)
            else:
                def fwd(x, mod=mod):
                    return mod.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon))
            mod.forward = fwd
        elif "RotaryEmbedding" in cls:
            def inv_freq(theta, dim):
                return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))

            def cos_sin(position_ids, inv):
                freqs = position_ids[..., None].double() * inv
                emb = torch.cat((freqs, freqs), dim=-1)
                return emb.cos(), emb.sin()

            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            rot_dim = int(head_dim * cfg.rope_parameters.get("partial_rotary_factor", 1.0)) \
                if "Gemma3" not in cls else head_dim
            if cfg.rope_parameters.get("rope_type") == "longrope":
                continue  # transformers' own forward: picks the factors and scales cos/sin
            if "Gemma3" in cls:
                def fwd(x, position_ids, layer_type):
                    return cos_sin(position_ids, inv_freq(cfg.rope_parameters[layer_type]["rope_theta"], head_dim))
            elif cfg.rope_parameters.get("rope_type", "default") != "default":
                # scaled frequencies: transformers' own (float32) table, applied in float64
                def fwd(x, position_ids, mod=mod):
                    return cos_sin(position_ids, mod.inv_freq.double())
            else:
                def fwd(x, position_ids, rot_dim=rot_dim):
                    return cos_sin(position_ids, inv_freq(cfg.rope_parameters["rope_theta"], rot_dim))
            mod.forward = fwd
        elif cls in ("Gemma3TextScaledWordEmbedding", "Gemma2ScaledWordEmbedding"):
            mod.embed_scale = torch.tensor(math.sqrt(cfg.hidden_size), dtype=torch.float64)
    return m


class SoftmaxF64:
    """Eager attention calls softmax(..., dtype=torch.float32); keep float64 inputs in float64."""

    def __enter__(self):
        self.orig = torch.nn.functional.softmax

        def sm(input, dim=None, _stacklevel=3, dtype=None):
            if dtype == torch.float32 and input.dtype == torch.float64:
                dtype = torch.float64
            return self.orig(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

        torch.nn.functional.softmax = sm
        return self

    def __exit__(self, *exc):
        torch.nn.functional.softmax = self.orig


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------

def make_inputs(name, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((B, T), PAD_ID, dtype=torch.int64)
    mask = torch.zeros((B, T), dtype=torch.int64)
    for b, n in enumerate(LENGTHS):
        ids[b, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        if name.startswith("bert"):
            ids[b, 0] = CLS_ID
            ids[b, n - 1] = SEP_ID
        mask[b, :n] = 1
    return ids, mask


def forward(model, arch, inputs, replace=None):
    """Returns (taps dict, hidden_states [L+1,B,T,d], logits or None, transformers' own hidden_states)."""
    store = {}
    hooks = []
    if replace is not None:
        hooks += install_replacement(arch, *replace)  # before the taps, so taps see replaced values
    hooks += install_taps(arch, store)
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    L = arch.n_layers
    outs = [store[f"blocks.{l}.hook_resid_post"] for l in range(L)]
    if arch.kind == "bert":
        for l in range(L):
            assert torch.equal(outs[l], store[f"blocks.{l}.ln2.hook_normalized"])
    hidden = torch.stack([store["blocks.0.hook_resid_pre"]] + outs)
    logits = out.logits.detach().clone() if hasattr(out, "logits") else None
    return store, hidden, logits, out.hidden_states


def rel_err(a32, a64):
    a64 = a64.double()
    err = (a32.double() - a64).abs().max().item()
    scale = a64.abs().max().item()
    return err, scale


def export_model(name, report, conv_notes):
    model = build_model(name)
    arch = Arch(model, name)
    cfg = model.config
    d = cfg.hidden_size
    L = arch.n_layers
    is_bert = name.startswith("bert")
    ids, mask = make_inputs(name, 2000 + SEEDS[name])
    inputs = {"input_ids": ids, "attention_mask": mask}
    if is_bert:
        inputs["token_type_ids"] = torch.zeros_like(ids)

    taps, hidden, logits, hf_hidden = forward(model, arch, inputs)

    # --- sanity checks against transformers' own hidden_states and internal consistency ---
    assert len(hf_hidden) == L + 1
    for l in range(L):
        assert torch.equal(hf_hidden[l], hidden[l]), (name, l)
    last_is_normed = None
    if arch.final_norm is not None:
        if torch.equal(hf_hidden[L], taps["ln_final.hook_normalized"]):
            last_is_normed = True
        elif torch.equal(hf_hidden[L], hidden[L]):
            last_is_normed = False
        else:
            raise AssertionError(f"{name}: hidden_states[L] is neither pre- nor post-final-norm")
        assert not torch.allclose(hidden[L], taps["ln_final.hook_normalized"])
    else:
        assert torch.equal(hf_hidden[L], hidden[L])
    conv_notes[name] = last_is_normed
    for l in range(L):
        p = f"blocks.{l}."
        if is_bert:
            torch.testing.assert_close(taps[p + "ln1.hook_in"], taps[p + "hook_resid_pre"] + taps[p + "hook_attn_out"])
            torch.testing.assert_close(taps[p + "ln2.hook_in"],
                                       taps[p + "ln1.hook_normalized"] + taps[p + "hook_mlp_out"])
        elif arch.parallel:
            torch.testing.assert_close(taps[p + "hook_resid_post"],
                                       taps[p + "hook_resid_pre"] + taps[p + "hook_attn_out"] + taps[p + "hook_mlp_out"])
        else:
            torch.testing.assert_close(taps[p + "hook_resid_mid"], taps[p + "hook_resid_pre"] + taps[p + "hook_attn_out"])
            torch.testing.assert_close(taps[p + "hook_resid_post"], taps[p + "hook_resid_mid"] + taps[p + "hook_mlp_out"])
        if l + 1 < L:
            assert torch.equal(hidden[l + 1], taps[f"blocks.{l + 1}.hook_resid_pre"])

    expected = {"input_ids": ids, "attention_mask": mask, "hidden_states": hidden}
    if is_bert:
        expected["token_type_ids"] = inputs["token_type_ids"]
    if logits is not None:
        expected["logits"] = logits
    for k, v in taps.items():
        expected[k] = v

    # --- replaced sub-module runs ---
    reps = {}
    if name != "bert":
        g = torch.Generator().manual_seed(3000 + SEEDS[name])
        for which in ("attn", "mlp"):
            W = (torch.randn((d, d), generator=g) / math.sqrt(d)).contiguous()
            rtaps, rhidden, rlogits, _ = forward(model, arch, inputs, replace=(which, W))
            # block 0 runs normally; the replacement changes everything from block 1's output on
            assert torch.equal(rhidden[:2], hidden[:2]) and not torch.allclose(rhidden[2], hidden[2])
            # the replaced sub-module output is W @ input in block 1
            if is_bert:
                src = "hook_resid_pre" if which == "attn" else "ln1.hook_normalized"
                dst = "hook_attn_out" if which == "attn" else "hook_mlp_out"
            else:
                src = "ln1.hook_normalized" if which == "attn" else "ln2.hook_normalized"
                if arch.gemma:
                    dst = "ln1_post.hook_in" if which == "attn" else "ln2_post.hook_in"
                else:
                    dst = "hook_attn_out" if which == "attn" else "hook_mlp_out"
            assert torch.equal(rtaps["blocks.1." + dst], rtaps["blocks.1." + src] @ W.T)
            expected[f"replace.{which}.weight"] = W
            expected[f"replace.{which}.hidden_states"] = rhidden
            expected[f"replace.{which}.logits"] = rlogits
            reps[which] = W

    # issue 14 variants: the feature under test must change the outputs for these inputs
    def rerun(**changes):
        cfg2 = copy.deepcopy(cfg)
        for k, v in changes.items():
            setattr(cfg2, k, v)
        torch.manual_seed(0)
        m2 = type(model)(cfg2)
        m2.set_attn_implementation("eager")
        if name == "mixtral":
            m2.set_experts_implementation("eager")
        m2.load_state_dict(model.state_dict())
        m2.eval()
        with torch.no_grad():
            return m2(**inputs).logits

    if name == "gemma2":
        assert not torch.allclose(rerun(attn_logit_softcapping=None), logits), "attention soft-cap had no effect"
        assert not torch.allclose(rerun(final_logit_softcapping=None), logits), "final soft-cap had no effect"
        assert logits.abs().max() < GEMMA2_FINAL_CAP
        l2 = rerun(layer_types=["full_attention"] * L)
        assert not torch.allclose(l2[0], logits[0]), "sliding window had no effect"
        assert torch.equal(l2[1, :4], logits[1, :4]), "real tokens of the length-4 row must be unaffected"
    if name == "mixtral":
        l2 = rerun(sliding_window=None)
        assert not torch.allclose(l2[0], logits[0]), "sliding window had no effect"
        assert torch.equal(l2[1, :4], logits[1, :4]), "real tokens of the length-4 row must be unaffected"
        assert not torch.allclose(rerun(num_experts_per_tok=1), logits), "top-2 routing equals top-1"
    if name.startswith("neox"):
        l2 = rerun(use_parallel_residual=not cfg.use_parallel_residual)
        assert not torch.allclose(l2, logits), "parallel and sequential residuals agree"

    # gemma3: make sure the sliding window actually matters for these inputs
    if name == "gemma3":
        cfg2 = copy.deepcopy(cfg)
        cfg2.sliding_window = 64
        torch.manual_seed(0)
        m2 = Gemma3ForCausalLM(cfg2)
        m2.set_attn_implementation("eager")
        m2.load_state_dict(model.state_dict())
        m2.eval()
        with torch.no_grad():
            l2 = m2(**inputs).logits
        assert not torch.allclose(l2[0], logits[0]), "sliding window had no effect"
        assert torch.equal(l2[1, :4], logits[1, :4]), "real tokens of the length-4 row must be unaffected"

    # sliding-window llama-likes: the window must matter for rows 0 and 2, not for row 1 (length 4)
    if name in ("mistral_sliding", "qwen2_sliding"):
        cfg2 = copy.deepcopy(cfg)
        if name == "mistral_sliding":
            cfg2.sliding_window = None
        else:
            cfg2.layer_types = ["full_attention"] * L
        torch.manual_seed(0)
        m2 = type(model)(cfg2)
        m2.set_attn_implementation("eager")
        m2.load_state_dict(model.state_dict())
        m2.eval()
        with torch.no_grad():
            l2 = m2(**inputs).logits
        assert not torch.allclose(l2[0], logits[0]), "sliding window had no effect"
        assert not torch.allclose(l2[2], logits[2]), "sliding window had no effect"
        assert torch.equal(l2[1, :4], logits[1, :4]), "real tokens of the length-4 row must be unaffected"

    # --- float64 reference for tolerances ---
    m64 = make_f64(model, name)
    a64 = Arch(m64, name)
    with SoftmaxF64():
        t64, h64, lg64, _ = forward(m64, a64, inputs)
        rep64 = {w: forward(m64, a64, inputs, replace=(w, W.double())) for w, W in reps.items()}
    groups = {"hidden_states": [], "taps": [], "logits": [], "replace": []}
    groups["hidden_states"].append(rel_err(hidden, h64))
    if logits is not None:
        groups["logits"].append(rel_err(logits, lg64))
    for k in taps:
        groups["taps"].append(rel_err(taps[k], t64[k]))
    for w, (_, rh, rl, _) in rep64.items():
        groups["replace"].append(rel_err(expected[f"replace.{w}.hidden_states"], rh))
        groups["replace"].append(rel_err(expected[f"replace.{w}.logits"], rl))
    report[name] = {
        g: {"max_abs_err": max(e for e, _ in v), "max_rel_err": max(e / s for e, s in v),
            "max_abs_value": max(s for _, s in v)}
        for g, v in groups.items() if v
    }

    # --- write ---
    out = TINY / name
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    for f in os.listdir(out):
        if f not in ("config.json", "model.safetensors"):
            os.remove(out / f)
    # the saved checkpoint must reproduce the expected outputs
    extra = {"experts_implementation": "eager"} if name == "mixtral" else {}
    reloaded = type(model).from_pretrained(out, attn_implementation="eager", **extra).eval()
    with torch.no_grad():
        o2 = reloaded(**inputs)
    if logits is not None:
        assert torch.equal(o2.logits, logits), name
    else:
        assert torch.equal(o2.last_hidden_state, hidden[L]), name
    saved = load_file(out / "model.safetensors")
    if name == "llama_tied":
        assert "lm_head.weight" not in saved
    if name == "llama":
        assert "lm_head.weight" in saved
    expected = {k: v.contiguous() for k, v in expected.items()}
    # one metadata key only: safetensors writes the metadata map in hash order (not reproducible)
    save_file(expected, out / "expected.safetensors", metadata={"format": "pt"})
    return model, inputs, expected


def export_bert_legacy(inputs, logits):
    src, dst = TINY / "bert_mlm", TINY / "bert_mlm_legacy"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copyfile(src / "config.json", dst / "config.json")
    shutil.copyfile(src / "expected.safetensors", dst / "expected.safetensors")
    tensors = load_file(src / "model.safetensors")
    renamed = {}
    n = 0
    for k, v in tensors.items():
        if ".LayerNorm." in k and (k.endswith(".weight") or k.endswith(".bias")):
            k = k[: -len("weight")] + "gamma" if k.endswith(".weight") else k[: -len("bias")] + "beta"
            n += 1
        renamed[k] = v
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    # does transformers itself still accept the legacy names?
    try:
        m = BertForMaskedLM.from_pretrained(dst, attn_implementation="eager").eval()
        with torch.no_grad():
            ok = torch.equal(m(**inputs).logits, logits)
    except Exception as e:  # pragma: no cover - informational only
        ok = f"error: {type(e).__name__}"
    return n, ok


# ----------------------------------------------------------------------------------------------
# least squares fixtures
# ----------------------------------------------------------------------------------------------

def lstsq_cases():
    rng = np.random.default_rng(1234)
    cases = {}

    def targets(x, d2, noise=0.1):
        A = rng.standard_normal((d2, x.shape[1])) / math.sqrt(x.shape[1])
        return x @ A.T + noise * rng.standard_normal((x.shape[0], d2))

    # well-conditioned, N >> d
    d = 16
    x = rng.standard_normal((160, d))
    xv = rng.standard_normal((40, d))
    A = rng.standard_normal((d, d)) / math.sqrt(d)
    cases["well"] = (x, x @ A.T + 0.1 * rng.standard_normal((160, d)), xv, xv @ A.T + 0.1 * rng.standard_normal((40, d)))

    # outlier dimensions (hidden states have a few dims in the thousands)
    d = 20
    scale = np.ones(d)
    scale[[3, 11, 17]] = [1000.0, 2500.0, 800.0]
    mean = 5.0 * scale * (rng.random(d) - 0.5)
    x = rng.standard_normal((200, d)) * scale + mean
    xv = rng.standard_normal((50, d)) * scale + mean
    A = rng.standard_normal((d, d)) / math.sqrt(d)
    A[:, [3, 11, 17]] *= 1e-3  # keep targets O(1)-ish apart from their own outlier dims
    yscale = np.ones(d)
    yscale[[3, 11]] = [1000.0, 2500.0]
    cases["outlier"] = (x, (x @ A.T) * yscale + 0.1 * rng.standard_normal((200, d)),
                        xv, (xv @ A.T) * yscale + 0.1 * rng.standard_normal((50, d)))

    # N < d
    d = 24
    x = rng.standard_normal((12, d))
    xv = rng.standard_normal((30, d))
    A = rng.standard_normal((d, d)) / math.sqrt(d)
    cases["rank_deficient_n_lt_d"] = (x, x @ A.T + 0.1 * rng.standard_normal((12, d)),
                                      xv, xv @ A.T + 0.1 * rng.standard_normal((30, d)))

    # duplicated rows: 10 unique rows, each repeated 1-8 times -> N = 45 > d = 20 but rank 10
    d = 20
    u = rng.standard_normal((10, d))
    A = rng.standard_normal((d, d)) / math.sqrt(d)
    yu = u @ A.T + 0.1 * rng.standard_normal((10, d))
    reps = np.array([1, 2, 3, 4, 8, 5, 6, 7, 4, 5])
    idx = rng.permutation(np.repeat(np.arange(10), reps))
    xv = rng.standard_normal((30, d))
    cases["duplicated_rows"] = (u[idx], yu[idx], xv, xv @ A.T + 0.1 * rng.standard_normal((30, d)))

    # collinear columns: dyadic values so the linear combinations are exact in float32 and float64
    d, n = 16, 100
    x = np.round(rng.standard_normal((n + 40, d)) * 64.0) / 64.0
    x[:, 12] = x[:, 0] + x[:, 1]
    x[:, 13] = 2.0 * x[:, 2] - x[:, 3]
    x[:, 14] = 0.5 * x[:, 4]
    x[:, 15] = x[:, 5] - x[:, 6] + x[:, 7]
    y = targets(x, d)
    cases["collinear_cols"] = (x[:n], y[:n], x[n:], y[n:])
    return cases


def export_lstsq():
    LSTSQ.mkdir(parents=True, exist_ok=True)
    out = {}
    info = {}
    for c, (x, y, xv, yv) in lstsq_cases().items():
        x32, y32, xv32, yv32 = (np.ascontiguousarray(a, dtype=np.float32) for a in (x, y, xv, yv))
        X, Y, XV, YV = (a.astype(np.float64) for a in (x32, y32, xv32, yv32))
        lr = LinearRegression(fit_intercept=False).fit(X, Y)
        lri = LinearRegression(fit_intercept=True).fit(X, Y)
        coef = lr.coef_
        pred = XV @ coef.T
        out[f"{c}.x_train"] = x32
        out[f"{c}.y_train"] = y32
        out[f"{c}.x_val"] = xv32
        out[f"{c}.y_val"] = yv32
        out[f"{c}.coef"] = np.ascontiguousarray(coef, dtype=np.float64)
        out[f"{c}.coef_intercept"] = np.ascontiguousarray(lri.coef_, dtype=np.float64)
        out[f"{c}.intercept"] = np.ascontiguousarray(lri.intercept_, dtype=np.float64)
        out[f"{c}.r2_val"] = np.array([r2_score(YV, pred)], dtype=np.float64)
        if X.shape[1] == Y.shape[1]:
            out[f"{c}.r2_val_id"] = np.array([r2_score(YV, XV)], dtype=np.float64)
        out[f"{c}.pred_val"] = np.ascontiguousarray(pred, dtype=np.float64)
        # diagnostics for the README
        sv = np.linalg.svd(X, compute_uv=False)
        rank = int(np.linalg.matrix_rank(X))
        pinv = np.linalg.pinv(X, rcond=1e-10)
        coef_pinv = (pinv @ Y).T
        cond_gram = float(sv[0] ** 2 / sv[rank - 1] ** 2)
        info[c] = {
            "N": X.shape[0], "d": X.shape[1], "d2": Y.shape[1], "Nval": XV.shape[0], "rank": rank,
            "sklearn_rank": int(lr.rank_),
            "cond_gram_nonzero": cond_gram,
            "cond_gram_full": float(sv[0] ** 2 / max(sv[-1] ** 2, 1e-300)) if X.shape[0] >= X.shape[1] else float("inf"),
            "max_abs_coef": float(np.abs(coef).max()),
            "rel_diff_vs_pinv": float(np.abs(coef - coef_pinv).max() / np.abs(coef_pinv).max()),
            "rel_diff_normal_eq": (float(np.abs(coef - np.linalg.solve(X.T @ X, X.T @ Y).T).max() / np.abs(coef).max())
                                   if rank == X.shape[1] else None),
            "r2_val": float(out[f"{c}.r2_val"][0]),
            "r2_val_id": float(out[f"{c}.r2_val_id"][0]) if f"{c}.r2_val_id" in out else None,
        }
    # a single metadata key: safetensors writes the metadata map in hash order (not byte-reproducible otherwise)
    meta = {"generator": f"scripts/export_fixtures.py; sklearn {sklearn.__version__} LinearRegression -> "
                         f"scipy {scipy.__version__} linalg.lstsq(gelsd, cond=1e-6); numpy {np.__version__}"}
    save_np(out, str(LSTSQ / "cases.safetensors"), metadata=meta)
    return info


# ----------------------------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------------------------

def fmt(x):
    return f"{x:.1e}"


def write_tiny_readme(report, conv_notes, legacy, shapes):
    lines = []
    w = lines.append
    w("# Tiny reference fixtures (PyTorch `transformers`)")
    w("")
    w(f"Generated by `scripts/export_fixtures.py` with torch {torch.__version__.split('+')[0]}, transformers "
      f"{transformers.__version__} (pins in `scripts/requirements-reference.txt`); rerun with "
      "`/root/refenv/bin/python scripts/export_fixtures.py` (byte-identical output). Each folder holds a tiny "
      "randomly initialised float32 model built from a config object (no hub download; `torch.manual_seed`), "
      f"with `initializer_range={INIT_RANGE}` so attention is not uniform, every norm weight perturbed "
      "(`1 + 0.3*randn` for LayerNorm/RMSNorm, `0.5*randn` for Gemma's `(1 + w)` RMSNorm incl. q_norm/k_norm) and every "
      "bias (LayerNorm and Linear/Conv1D, incl. Qwen2's q/k/v biases) set to `0.2*randn`, eager attention, "
      "eval mode, saved with `save_pretrained(safe_serialization=True)` (`config.json` + `model.safetensors`; "
      "`generation_config.json` removed). The saved checkpoint is reloaded by the script and checked to reproduce "
      "the logits bit-for-bit. `expected.safetensors` holds the inputs and the outputs recorded with PyTorch "
      "forward hooks.")
    w("")
    w("## Models")
    w("")
    w("| folder | class | d | layers | heads / kv heads | head_dim | vocab | notes |")
    w("|---|---|---|---|---|---|---|---|")
    rows = {
        "llama": ("LlamaForCausalLM", 64, 2, "4 / 2", 16, "untied lm_head, rms_norm_eps 1e-5, rope_theta 1e4, silu, intermediate 128"),
        "llama_tied": ("LlamaForCausalLM", 64, 2, "4 / 2", 16, "tie_word_embeddings=true, no `lm_head.weight` in the file"),
        "qwen2": ("Qwen2ForCausalLM", 64, 2, "4 / 2", 16, "q/k/v biases (non-zero), untied"),
        "mistral": ("MistralForCausalLM", 64, 2, "4 / 2", 16, "sliding_window=null, untied"),
        "gemma3": ("Gemma3ForCausalLM (gemma3_text)", 48, 3, "4 / 1", 16,
                   "layer_types [sliding, full, sliding], sliding_window 4, rope 1e6 (full) / 1e4 (sliding), "
                   "query_pre_attn_scalar 16, gelu_pytorch_tanh, tied, rms_norm_eps 1e-6, intermediate 96"),
        "gpt2": ("GPT2LMHeadModel", 32, 2, "4 / 4", 8, "gelu_new, n_positions 32, n_inner 128, tied"),
        "bert_mlm": ("BertForMaskedLM", 32, 2, "4 / 4", 8, "intermediate 64, gelu (erf), type_vocab 2, max_pos 32, eps 1e-12"),
        "bert_mlm_legacy": ("BertForMaskedLM", 32, 2, "4 / 4", 8,
                            "same weights as bert_mlm, LayerNorm `.weight/.bias` renamed `.gamma/.beta`; "
                            "expected.safetensors is a byte copy of bert_mlm's"),
        "bert": ("BertModel", 32, 2, "4 / 4", 8, "no head (pooler weights present but unused); no logits"),
        "mistral_sliding": ("MistralForCausalLM", 64, 2, "4 / 2", 16,
                            f"sliding_window={WINDOW} (< T={T}: rows 0 and 2 are longer than the window), untied"),
        "qwen2_sliding": ("Qwen2ForCausalLM", 64, 2, "4 / 2", 16,
                          f"use_sliding_window=true, sliding_window={WINDOW}, max_window_layers=1 "
                          "(layer_types [full, sliding]), q/k/v biases, untied"),
        "llama_rope_linear": ("LlamaForCausalLM", 64, 2, "4 / 2", 16, "rope_parameters linear, factor 2, untied"),
        "llama_rope_llama3": ("LlamaForCausalLM", 64, 2, "4 / 2", 16,
                              "rope_parameters llama3: factor 8, low_freq_factor 1, high_freq_factor 4, "
                              "original_max_position_embeddings 64 (frequencies kept, smoothed and divided), untied"),
    }
    for k, (cls, d, L, h, hd, note) in rows.items():
        w(f"| `{k}` | {cls} | {d} | {L} | {h} | {hd} | {VOCAB} | {note} |")
    w("")
    w("## Inputs")
    w("")
    w(f"`input_ids` and `attention_mask` are [B={B}, T={T}] int64, right-padded, row lengths {LENGTHS}; padded "
      f"slots have id {PAD_ID} (`pad_token_id=0` in every config). Real tokens are random ids in [3, {VOCAB}). "
      f"BERT rows start with [CLS]={CLS_ID} and end with [SEP]={SEP_ID} (also written as `cls_token_id` / "
      "`sep_token_id` in its config.json) and `token_type_ids` (all zero) is stored too. Position ids are the "
      "default `0..T-1` for every row (no left padding). Values at padded positions are stored as transformers "
      "computes them (causal models: padded queries attend to the real keys before them; BERT: padded keys are "
      "masked out for every query), but tests may restrict comparisons to `attention_mask == 1`.")
    w("")
    w("## Tensors in `expected.safetensors`")
    w("")
    w("All activations float32; `l` is the 0-based block index; `d` = hidden size; `L` = number of blocks.")
    w("")
    w("- `input_ids`, `attention_mask` [B,T] int64; `token_type_ids` [B,T] int64 (BERT only).")
    w("- `hidden_states` [L+1,B,T,d]: index 0 = embedding output (block 0 input; Gemma3: embedding already "
      "multiplied by `sqrt(d)` (the float32-rounded value, as transformers' `hidden_states[0]`); GPT-2: wte+wpe; "
      "BERT: embeddings LayerNorm output), index l+1 = output of block l. Index L is the last block output "
      "BEFORE the final norm (see conventions below).")
    w("- `logits` [B,T,V] (BERT MLM: MLM head logits; absent for `bert`).")
    w("- `ln_final.hook_normalized` [B,T,d]: final norm output (`model.norm` / `ln_f`); absent for BERT.")
    w("- Per block, [B,T,d]: `blocks.{l}.hook_resid_pre`, `blocks.{l}.ln1.hook_normalized`, "
      "`blocks.{l}.hook_attn_out`, `blocks.{l}.hook_resid_mid`, `blocks.{l}.ln2.hook_normalized`, "
      "`blocks.{l}.hook_mlp_out`, `blocks.{l}.hook_resid_post`; Gemma3 also `blocks.{l}.ln1_post.hook_in` and "
      "`blocks.{l}.ln2_post.hook_in`. BERT has `ln1.hook_in` / `ln2.hook_in` instead of `hook_resid_mid` (below).")
    w("- `hook_embed` [B,T,d]: token embedding lookup (`embed_tokens` output, Gemma3: scaled by sqrt(d), so it "
      "equals hidden_states[0] for the Llama-likes; GPT-2: `wte`; BERT: `word_embeddings`, before the sum and the "
      "embedding LayerNorm). `hook_pos_embed` [B,T,d] (GPT-2 `wpe`, BERT `position_embeddings`, expanded over the "
      "batch) and `hook_token_type_embed` [B,T,d] (BERT).")
    w("- Per block: `blocks.{l}.attn.hook_pattern` [B,H,T,T]: attention probabilities (the eager attention's "
      "returned weights; query x key; padded keys get 0), and `blocks.{l}.mlp.hook_post` [B,T,d_ff]: the input of "
      "the MLP's down projection (`down_proj` / GPT-2 `mlp.c_proj` / BERT `output.dense`), i.e. "
      "`act(gate) * up` for the gated MLPs and `act(fc)` for GPT-2 and BERT.")
    w("  - pre-norm (llama, qwen2, mistral, gpt2, gemma3): resid_pre = block input; ln1 = input_layernorm / ln_1 "
      "output; attn_out = self-attention output after o_proj / c_proj (Gemma3: after post_attention_layernorm, "
      "i.e. what is added to the residual; the raw o_proj output is `ln1_post.hook_in`); resid_mid = resid_pre + "
      "attn_out; ln2 = post_attention_layernorm (llama family) / ln_2 (gpt2) / pre_feedforward_layernorm "
      "(gemma3) output; mlp_out = MLP output (Gemma3: after post_feedforward_layernorm; raw down_proj output is "
      "`ln2_post.hook_in`); resid_post = resid_mid + mlp_out = block output.")
    w("  - BERT (post-LN; names say what the values are, see src/model/arch/bert.rs): attn_out = "
      "attention.output.dense output (before add & LN); `ln1.hook_in` = resid_pre + attn_out (input of "
      "attention.output.LayerNorm); ln1 = attention.output.LayerNorm output; mlp_out = output.dense output; "
      "`ln2.hook_in` = ln1 + mlp_out (input of output.LayerNorm); ln2 = output.LayerNorm output = resid_post = "
      "block output = hidden_states[l+1] (so resid_post of block l = resid_pre of block l+1, as for every model).")
    w("- Replaced sub-module runs (every arch except `bert`), for `which` in {attn, mlp}: "
      "`replace.{which}.weight` [d,d] float32 (out x in, y = W @ x; entries randn/sqrt(d)), "
      "`replace.{which}.hidden_states` [L+1,B,T,d], `replace.{which}.logits` [B,T,V]. In every block l >= 1 "
      "(block 0 runs normally) the sub-module output is replaced by W applied position-wise to the sub-module "
      "input: attn: input = ln1-normalised state (BERT: block input), output = o_proj/c_proj output (Gemma3: "
      "before post_attention_layernorm, which is still applied; BERT: attention.output.dense output, before "
      "add & LN); mlp: input = ln2-normalised state (BERT: ln1-normalised, i.e. intermediate's input), output = "
      "raw MLP output (Gemma3: before post_feedforward_layernorm; BERT: output.dense output).")
    w("")
    w("Shapes per folder:")
    w("")
    for k, s in shapes.items():
        w(f"- `{k}`: " + ", ".join(f"{n} {v}" for n, v in s.items()))
    w("")
    w(f"## Conventions found in transformers {transformers.__version__}")
    w("")
    post = [k for k, v in conv_notes.items() if v]
    w(f"- `output_hidden_states=True` returns L+1 entries; for {', '.join(post)} the LAST entry is the output "
      "AFTER the final norm (`capture_outputs(tie_last_hidden_states=True)` overwrites it with "
      "`last_hidden_state`). The fixtures instead store the pre-final-norm block output at index L (captured with "
      "a forward hook on the last block); entries 0..L-1 equal transformers' own bit-for-bit. For BERT there is no "
      "final norm and all entries match.")
    w("- Decoder layers return a plain tensor (not a tuple) in this version; attention modules return "
      "`(attn_output, attn_weights)`.")
    w("- Config files use `rope_parameters` (Llama family: `{\"rope_theta\": 10000.0, \"rope_type\": \"default\"}`; "
      "Gemma3: one dict per layer type, `{\"full_attention\": {rope_theta 1e6}, \"sliding_attention\": "
      "{rope_theta 1e4}}`) instead of top-level `rope_theta` / `rope_local_base_freq`; Gemma3 has an explicit "
      "`layer_types` list (the legacy `sliding_window_pattern` kwarg is still accepted by the config class but "
      "not written). Real checkpoints on the hub usually have the older layout, so the Rust loader should accept "
      "both.")
    w("- Gemma3 sliding window: key j is visible to query i iff `i - sliding_window < j <= i` (window of 4 "
      "includes the query itself: 4 keys). The script checks that with `sliding_window=64` row 0 (length 7) "
      "changes and row 1 (length 4) does not. Attention scale is `query_pre_attn_scalar ** -0.5` = 0.25; "
      "q_norm/k_norm (Gemma RMSNorm over head_dim) are applied before RoPE; `embed_scale` = `sqrt(hidden_size)` "
      "rounded to float32; attn/final logit softcapping are null.")
    w("- Gemma3's config.json ALSO contains a stale `\"_sliding_window_pattern\": 6` (the class default) next to "
      "`layer_types`; with 3 layers that pattern would make every layer sliding. `layer_types` is authoritative.")
    w("- Checkpoint names: llama family `model.embed_tokens`, `model.layers.{l}.{input_layernorm,self_attn.{q,k,v,o}_proj,"
      "post_attention_layernorm,mlp.{gate,up,down}_proj}`, `model.norm`, `lm_head` (absent when tied); Gemma3 adds "
      "`pre_feedforward_layernorm`, `post_feedforward_layernorm`, `self_attn.{q,k}_norm`. GPT-2 keys carry the "
      "`transformer.` prefix (`transformer.wte/wpe/h.{l}.ln_1/attn.c_attn/attn.c_proj/ln_2/mlp.c_fc/mlp.c_proj/ln_f`), "
      "its Conv1D weights are stored [in, out] (transposed w.r.t. nn.Linear; c_attn is [d, 3d] = q|k|v), there is "
      "no `lm_head.weight` and no `attn.bias` mask buffer. BertForMaskedLM keys are `bert.` prefixed, have no pooler, "
      "and the MLM decoder is tied: no `cls.predictions.decoder.weight`/`.bias`, the output bias is "
      "`cls.predictions.bias`. Plain BertModel keys have no prefix and include `pooler.dense`.")
    w("- Padding token rows of the embedding matrices are zero (transformers' init zeroes `padding_idx` rows).")
    w(f"- bert_mlm_legacy: {legacy[0]} LayerNorm tensors renamed. Loading it with "
      f"`BertForMaskedLM.from_pretrained` reproduces the logits exactly: {legacy[1]}.")
    w("")
    w("## Tolerances (float32 vs float64 re-run)")
    w("")
    w("Each model was re-run in float64 (a copy cast with `.double()`, with transformers' internal float32 "
      "up-casts in RMSNorm, RoPE and the eager softmax patched out so the reference is truly float64). "
      "`rel` = max|f32 - f64| / max|f64| over a tensor (max over tensors of the group); `abs` = max|f32 - f64|; "
      "`max|x|` = largest magnitude in the group.")
    w("")
    w("| model | hidden_states rel / abs | taps rel / abs | logits rel / abs | replace.* rel / abs | max abs value |")
    w("|---|---|---|---|---|---|")
    worst = 0.0
    for k, r in report.items():
        def cell(g):
            if g not in r:
                return "-"
            return f"{fmt(r[g]['max_rel_err'])} / {fmt(r[g]['max_abs_err'])}"
        mx = max(v["max_abs_value"] for v in r.values())
        worst = max(worst, max(v["max_rel_err"] for v in r.values()))
        w(f"| `{k}` | {cell('hidden_states')} | {cell('taps')} | {cell('logits')} | {cell('replace')} | {fmt(mx)} |")
    w("")
    w(f"The worst normwise relative error of the float32 fixtures is {fmt(worst)}. A float32 Rust implementation "
      "with a different operation order should land within a few times that of the fixtures, so the suggested "
      "check is `max|rust - expected| <= 1e-4 * max(1, max|expected|)` per tensor (about 100x headroom; still far "
      "below any real bug, which shows up at 1e-2..1e0). Element-wise `rtol` alone is not suitable: small entries "
      "have large relative error.")
    w("")
    w("The least-squares fixtures for the fit stage (scikit-learn, minimum-norm answers) are described in "
      "`../lstsq/README.md`.")
    (TINY / "README.md").write_text("\n".join(lines) + "\n")


def write_lstsq_readme(info):
    lines = []
    w = lines.append
    w("# Least-squares fixtures (scikit-learn)")
    w("")
    w(f"Generated by `scripts/export_fixtures.py` with scikit-learn {sklearn.__version__}, scipy {scipy.__version__}, "
      f"numpy {np.__version__} (numpy `default_rng(1234)`). `cases.safetensors` holds, per case `c`:")
    w("")
    w("- `c.x_train` [N,d], `c.y_train` [N,d2], `c.x_val` [Nval,d], `c.y_val` [Nval,d2]: float32 (the fits use "
      "these float32 values cast to float64).")
    w("- `c.coef` [d2,d] f64: `LinearRegression(fit_intercept=False).fit(x, y).coef_`.")
    w("- `c.coef_intercept` [d2,d] f64, `c.intercept` [d2] f64: `LinearRegression(fit_intercept=True)` "
      "(sklearn centres x and y, solves, then `intercept = mean(y) - mean(x) @ coef.T`).")
    w("- `c.pred_val` [Nval,d2] f64 = `x_val @ coef.T`; `c.r2_val` [1] f64 = `r2_score(y_val, pred_val)` "
      "(multioutput='uniform_average', i.e. mean of per-column R^2); `c.r2_val_id` [1] f64 = "
      "`r2_score(y_val, x_val)` (all cases have d == d2).")
    w("")
    w("Solver: in this sklearn version `LinearRegression` on dense data calls "
      "`scipy.linalg.lstsq(X, y, cond=self.tol)` with the default `tol=1e-6` (new in 1.9: singular values below "
      "`1e-6 * s_max` are treated as zero; LAPACK gelsd). In the rank-deficient cases the expected answer is "
      "therefore the MINIMUM-NORM least-squares solution (pseudo-inverse); `rel_diff_vs_pinv` below compares "
      "`coef` with `pinv(X, rcond=1e-10) @ Y`. A Rust solver should use an SVD / complete orthogonal "
      "decomposition (or pseudo-inverse) with a relative singular-value cutoff (anything in ~1e-6..1e-10 gives "
      "the same answer for all cases here). Plain float64 normal equations are fine on the full-rank cases "
      "(including `outlier`, see the table) but singular on the other three; in float32 the `outlier` Gram "
      "(cond ~6e7 > 1/eps_f32) is numerically singular too.")
    w("")
    w("| case | N | d | d2 | Nval | rank | cond(X^T X) (nonzero part) | max abs coef | coef vs pinv (rel) | "
      "f64 normal equations vs coef (rel) | r2_val | r2_val_id |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c, i in info.items():
        ne = "singular" if i["rel_diff_normal_eq"] is None else fmt(i["rel_diff_normal_eq"])
        w(f"| `{c}` | {i['N']} | {i['d']} | {i['d2']} | {i['Nval']} | {i['rank']} | {fmt(i['cond_gram_nonzero'])} | "
          f"{i['max_abs_coef']:.3g} | {fmt(i['rel_diff_vs_pinv'])} | {ne} | {i['r2_val']:.6f} | "
          f"{'-' if i['r2_val_id'] is None else format(i['r2_val_id'], '.6f')} |")
    w("")
    w("Cases: `well` (N=160 >> d=16, Gaussian); `outlier` (columns 3, 11, 17 scaled by 1000/2500/800 with "
      "non-zero means, targets with two outlier columns, so X^T X is badly conditioned); `rank_deficient_n_lt_d` "
      "(N=12 < d=24); `duplicated_rows` (10 unique rows repeated to N=45, d=20, so rank 10 < d); `collinear_cols` "
      "(columns 12..15 exact linear combinations of columns 0..7; values are multiples of 1/64 so the "
      "combinations are exact in float32, rank 12). Suggested tolerances for a float64 solve: `coef`, "
      "`coef_intercept`, `intercept`, `pred_val` within ~1e-8 of their max magnitude (measured differences between "
      "solvers are 1e-15..5e-13), `r2_val`/`r2_val_id` within ~1e-9 absolute.")
    (LSTSQ / "README.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------

def write_archs_readme(report, shapes):
    lines = [f"# Issue 14 architectures (transformers {transformers.__version__}, torch {torch.__version__})", "",
             "Exported by `scripts/export_fixtures.py --only " + ",".join(ARCH_NAMES) + "`; same inputs, tensors "
             "and conventions as README.md, with these differences: GPT-NeoX `neox_parallel` has no "
             "`hook_resid_mid` (both sub-layers read the block input; resid_post = resid_pre + attn_out + "
             "mlp_out); OLMo 2 has no pre-norms, so `ln1.hook_normalized` / `ln2.hook_normalized` are the raw "
             "attention / MLP inputs (= resid_pre / resid_mid) and, as for Gemma, `hook_attn_out` / "
             "`hook_mlp_out` are after the post-norms with the raw outputs in `ln1_post.hook_in` / "
             "`ln2_post.hook_in`; Mixtral has no `mlp.hook_post` (no single MLP activation: the sparse MoE "
             "block is the MLP sub-module, and `replace.mlp` replaces the whole block, router included). "
             "`replace.attn` on `neox_parallel` replaces the attention of the parallel block only; the MLP "
             "still reads the block input.", "",
             "Variants: `neox_parallel` (use_parallel_residual, rotary_pct 0.25), `neox_sequential` (0.5); "
             "`qwen3` / `qwen3_tied` (head_dim 24 != 64/4); `gemma2` (attention soft-cap "
             f"{GEMMA2_ATTN_CAP}, final soft-cap {GEMMA2_FINAL_CAP}, both checked to change the logits; sliding "
             "window 4 on layers 0 and 2, query_pre_attn_scalar 24); `olmo2`; `phi3_longrope` "
             "(original_max_position_embeddings 4 < T = 7: transformers uses the long factors for the whole "
             "padded batch, chosen by the largest position id; partial_rotary_factor 0.5) and `phi3_short` "
             "(16 > T: short factors); `mixtral` (top-2 of 4 experts, sliding window 5, checked to differ "
             "from top-1 and from no window).", "",
             "| model | hidden_states rel | taps rel | logits rel | replace.* rel |", "|---|---|---|---|---|"]
    for k, r in report.items():
        cell = lambda g: fmt(r[g]["max_rel_err"]) if g in r else "-"  # noqa: E731
        lines.append(f"| `{k}` | {cell('hidden_states')} | {cell('taps')} | {cell('logits')} | {cell('replace')} |")
    lines += ["", "(`phi3_*`: the float64 re-run keeps transformers' own float32 longrope table.)", "",
              "Shapes per folder:", ""]
    for k, s in shapes.items():
        lines.append(f"- `{k}`: " + ", ".join(f"{n} {v}" for n, v in s.items()))
    (TINY / "ARCHS.md").write_text("\n".join(lines) + "\n")


HALF_NAMES = ["llama", "qwen2", "gemma3", "gpt2", "bert_mlm"]


def export_half():
    """expected_{bf16,f16}.safetensors from the committed checkpoints (nothing else is written)."""
    from safetensors import safe_open

    summary = {}
    for name in HALF_NAMES:
        folder = TINY / name
        ref = load_file(folder / "expected.safetensors")
        inputs = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
        if "token_type_ids" in ref:
            inputs["token_type_ids"] = ref["token_type_ids"]
        for tag, dt in (("bf16", torch.bfloat16), ("f16", torch.float16)):
            model = MODEL_CLASSES[name].from_pretrained(folder, dtype=dt, attn_implementation="eager").eval()
            arch = Arch(model, name)
            _, hidden, logits, _ = forward(model, arch, inputs)
            assert hidden.dtype == dt, (name, tag, hidden.dtype)
            out = {"hidden_states": hidden.float().contiguous()}
            if logits is not None:
                out["logits"] = logits.float().contiguous()
            # The 16-bit run's own distance from the float32 run (normwise, per layer), for the README.
            err = [((hidden[l].float() - ref["hidden_states"][l]).norm() / ref["hidden_states"][l].norm()).item()
                   for l in range(hidden.shape[0])]
            summary[f"{name}.{tag}"] = {"max_normwise_vs_f32": max(err), "logits_dtype": str(logits.dtype) if logits is not None else None}
            save_file(out, folder / f"expected_{tag}.safetensors",
                      metadata={"format": "pt", "dtype": tag, "torch": torch.__version__,
                                "transformers": transformers.__version__})
    print(json.dumps(summary, indent=1))


def main():
    if sys.argv[1:] == ["--half"]:
        return export_half()
    TINY.mkdir(parents=True, exist_ok=True)
    if len(sys.argv) == 3 and sys.argv[1] == "--only":
        report, conv, shapes = {}, {}, {}
        for name in sys.argv[2].split(","):
            print(f"[tiny] {name}", flush=True)
            _, _, expected = export_model(name, report, conv)
            shapes[name] = {k: list(v.shape) for k, v in expected.items()
                            if not k.startswith("blocks.") or k.startswith("blocks.0.hook_resid_pre")}
        if sorted(report) == sorted(ARCH_NAMES):
            write_archs_readme(report, shapes)
        print(json.dumps(report, indent=1))
        return 0
    report, conv, shapes = {}, {}, {}
    legacy = None
    for name in ["llama", "llama_tied", "qwen2", "mistral", "gemma3", "gpt2", "bert_mlm", "bert"] + NEW_NAMES:
        print(f"[tiny] {name}", flush=True)
        model, inputs, expected = export_model(name, report, conv)
        shapes[name] = {k: list(v.shape) for k, v in expected.items()
                        if not k.startswith("blocks.") or k.startswith("blocks.0.hook_resid_pre")}
        if name == "bert_mlm":
            legacy = export_bert_legacy(inputs, expected["logits"])
            shapes["bert_mlm_legacy"] = shapes["bert_mlm"]
    shapes = {k: shapes[k] for k in ["llama", "llama_tied", "qwen2", "mistral", "gemma3", "gpt2", "bert_mlm",
                                     "bert_mlm_legacy", "bert"] + NEW_NAMES}
    write_tiny_readme(report, conv, legacy, shapes)
    print("[lstsq]", flush=True)
    info = export_lstsq()
    write_lstsq_readme(info)
    print(json.dumps({"tolerances": report, "last_hidden_state_is_post_norm": conv, "bert_legacy": legacy,
                      "lstsq": info}, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
