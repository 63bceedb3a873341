#!/usr/bin/env python3
"""Reference outputs of the real assets, computed with transformers/PyTorch.

Writes tests/fixtures/real/<asset>.safetensors for smollm2, gemma3, bert_mlm and
minilm, and tests/fixtures/real/meta.json, from the sentences in
tests/fixtures/real/sentences.txt (one per line; the two characters "\\n" in a
line stand for a newline).

Per sentence i (all tensors little-endian, f32 / int64):
  ids.{i}          [T]      token ids as the HF tokenizer gives them with its
                            defaults (add_special_tokens=True)
  hidden.{i}       [3, d]   hidden state at the LAST token position for the
                            layers in `hidden_layers`
  hidden_layers    [3]      0, L//2, L: layer 0 is the embedding output (the
                            input of block 0, for Gemma already scaled by
                            sqrt(d)), layer k the output of block k-1; layer L
                            is the last block's output BEFORE any final norm
                            (captured with forward hooks, not taken from
                            output_hidden_states)
causal models (smollm2, gemma3):
  top5.{i}         [T, 5]   top-5 next-token ids at every position (best first)
  top5_logits.{i}  [T, 5]   their logits (f32; Gemma 3's final soft-capping is
                            whatever transformers applies, see meta.json)
bert_mlm:
  mask_pos.{i}     [1]      position replaced by [MASK] (the middle token, T//2)
  masked_ids.{i}   [T]      ids.{i} with that position set to the [MASK] id
  top5.{i}         [1, 5]   top-5 ids at mask_pos (from the masked input)
  top5_logits.{i}  [1, 5]   their logits
  hidden.{i} is from the masked input too (the same forward pass).
minilm (BertModel): ids and hidden only.

GGUF models are loaded with transformers' own GGUF loader (dequantized to f32):
  AutoModelForCausalLM.from_pretrained(folder, gguf_file=..., dtype=torch.float32)

bf16 (`--bf16 [ASSET...]`, smollm2 and gemma3): tests/fixtures/real/<asset>_bf16.safetensors,
the same GGUF dequantized to f32 by transformers, then cast to bfloat16 in PyTorch
(model.to(torch.bfloat16)) and run with eager attention, one sentence at a time:
  sketch           [K, d]        f32, K = 4 Gaussian directions / sqrt(K) (numpy seed 0)
  states.{i}       [L+1, T, K]   f32, the bf16 run's h_0..h_L (h_L before the final norm) at
                                 every position, upcast to f32 and multiplied by sketch^T in f64:
                                 the normwise error per layer is estimated from the sketch
                                 (E||S x||^2 = ||x||^2; 4 x T x 20 projections per layer)
  top5.{i}, top5_logits.{i} [T, 5]  the bf16 run's top-5 ids / logits (upcast to f32)
meta.json "bf16".<asset> records the exact normwise distance of PyTorch's bf16 run from its
f32 run per layer and what the sketch estimates for the same pair (the sketch's accuracy).

Usage: /root/refenv/bin/python scripts/export_real_reference.py [ASSET...]
       /root/refenv/bin/python scripts/export_real_reference.py --bf16 [smollm2 gemma3]
Needs torch, transformers, gguf, safetensors, numpy (+ sentencepiece).
Assets come from scripts/fetch_assets.sh (JUMPLENS_ASSETS overrides the folder).
"""
import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, BertForMaskedLM, BertModel

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("JUMPLENS_ASSETS", REPO / "assets"))
OUT = REPO / "tests/fixtures/real"

ASSET_FILES = {
    "smollm2": ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3": ("gemma3", "gemma-3-270m-q4_k_m.gguf"),
    "bert_mlm": ("bert_mlm", "model.safetensors"),
    "minilm": ("minilm", "model.safetensors"),
}


CONVENTIONS = {
    "ids": "ids.{i}: int64 [T], HF tokenizer defaults (add_special_tokens=True); gemma3 starts with <bos>=2, smollm2 adds nothing, BERT adds [CLS]/[SEP]",
    "hidden": "hidden.{i}: f32 [3, d] at the last token position for hidden_layers = [0, L//2, L]; layer 0 = input of block 0 (embeddings; Gemma's already multiplied by sqrt(d)), layer k = output of block k-1, layer L = output of the last block BEFORE the final norm (forward hooks); for Llama/Gemma output_hidden_states[L] is AFTER the final norm (see hidden_state_checks)",
    "causal": "top5.{i}: int64 [T, 5] top-5 next-token ids at every position, best first; top5_logits.{i}: f32 [T, 5] their logits",
    "bert_mlm": "mask_pos.{i}: int64 [1] = T//2; masked_ids.{i}: ids with that position set to [MASK]; top5/top5_logits: [1, 5] at mask_pos; hidden from the same (masked) forward pass",
    "minilm": "ids and hidden only (BertModel, no pooling)",
    "gguf": "GGUF models are dequantized to f32 by transformers' GGUF loader ('Converting and de-quantizing GGUF tensors...'), so the reference is the quantized model's weights in f32",
}


def sentences():
    lines = (OUT / "sentences.txt").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [l.replace("\\n", "\n") for l in lines]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


class LayerTap:
    """Forward hooks: the input of block 0 and the output of every block."""

    def __init__(self, layers):
        self.layers = layers
        self.inputs0 = None
        self.outputs = [None] * len(layers)
        self.handles = [layers[0].register_forward_pre_hook(self._pre, with_kwargs=True)]
        for k, layer in enumerate(layers):
            self.handles.append(layer.register_forward_hook(self._post(k)))

    def _pre(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.inputs0 = x.detach().clone()

    def _post(self, k):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            self.outputs[k] = out.detach().clone()

        return hook

    def state(self, layer):
        """h_layer: 0 = input of block 0, k = output of block k-1; [T, d]."""
        h = self.inputs0 if layer == 0 else self.outputs[layer - 1]
        return h[0]

    def remove(self):
        for h in self.handles:
            h.remove()


def top5(logits):
    v, i = torch.topk(logits.float(), 5, dim=-1)
    return i.to(torch.int64).numpy(), v.to(torch.float32).numpy()


def capture_logs(fn):
    """Runs fn, returning (result, what transformers logged/printed)."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    tlog = logging.getLogger("transformers")
    tlog.addHandler(handler)
    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_info()
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            result = fn()
    finally:
        transformers.logging.set_verbosity(old)
        tlog.removeHandler(handler)
    text = buf.getvalue() + err.getvalue() + out.getvalue()
    sys.stderr.write(text)
    return result, text


def interesting_log_lines(text):
    keys = ("gguf", "dequant", "quantiz", "not initialized", "newly initialized", "unexpected", "missing")
    seen = []
    for line in text.replace("\r", "\n").splitlines():
        l = line.strip()
        if "%|" in l and "100%" not in l:
            continue  # progress bar frames: keep the final one only
        if l and any(k in l.lower() for k in keys) and l not in seen:
            seen.append(l[:400])
    return seen[:40]


def export_causal(name, sents):
    folder, fn = ASSET_FILES[name]
    path = ASSETS / folder
    tok = AutoTokenizer.from_pretrained(str(path), gguf_file=fn)
    model, log = capture_logs(
        lambda: AutoModelForCausalLM.from_pretrained(str(path), gguf_file=fn, dtype=torch.float32)
    )
    model.eval()
    cfg = model.config
    layers = model.model.layers
    L = len(layers)
    d = cfg.hidden_size
    which = [0, L // 2, L]
    tensors = {"hidden_layers": np.array(which, dtype=np.int64)}
    checks = {"max_abs_hook_vs_output_hidden_states": {}, "last_hidden_state_is_after_final_norm": None}
    tap = LayerTap(layers)
    try:
        for i, s in enumerate(sents):
            ids = tok(s, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = model(input_ids=ids, output_hidden_states=True)
            logits = out.logits[0]
            t_ids, t_vals = top5(logits)
            tensors[f"ids.{i}"] = ids[0].to(torch.int64).numpy()
            tensors[f"top5.{i}"] = t_ids
            tensors[f"top5_logits.{i}"] = t_vals
            tensors[f"hidden.{i}"] = np.stack([tap.state(k)[-1].float().numpy() for k in which]).astype(np.float32)
            # How output_hidden_states relates to the hooks (recorded once per sentence, worst case kept).
            hs = out.hidden_states
            for k in range(L + 1):
                diff = float((hs[k][0] - tap.state(k)).abs().max())
                prev = checks["max_abs_hook_vs_output_hidden_states"].get(k, 0.0)
                checks["max_abs_hook_vs_output_hidden_states"][k] = max(prev, diff)
            with torch.no_grad():
                normed = model.model.norm(tap.state(L).unsqueeze(0))[0]
            after = float((hs[L][0] - normed).abs().max())
            before = float((hs[L][0] - tap.state(L)).abs().max())
            checks.setdefault("hs_L_minus_norm(h_L)", 0.0)
            checks.setdefault("hs_L_minus_h_L", 0.0)
            checks["hs_L_minus_norm(h_L)"] = max(checks["hs_L_minus_norm(h_L)"], after)
            checks["hs_L_minus_h_L"] = max(checks["hs_L_minus_h_L"], before)
            # logits really are lm_head(norm(h_L)) (+ soft-capping where the model has it)
    finally:
        tap.remove()
    checks["last_hidden_state_is_after_final_norm"] = checks["hs_L_minus_norm(h_L)"] < 1e-4 < checks["hs_L_minus_h_L"]
    checks["max_abs_hook_vs_output_hidden_states"] = {
        str(k): v for k, v in checks["max_abs_hook_vs_output_hidden_states"].items() if v > 0 or k in (0, L)
    }
    info = {
        "loader": f"AutoModelForCausalLM.from_pretrained(folder, gguf_file={fn!r}, dtype=torch.float32)",
        "tokenizer": type(tok).__name__,
        "model_class": type(model).__name__,
        "num_layers": L,
        "d": d,
        "vocab_size": cfg.vocab_size,
        "hidden_layers": which,
        "config": config_summary(cfg),
        "hidden_state_checks": checks,
        "load_log": interesting_log_lines(log),
    }
    return tensors, info


def config_summary(cfg):
    keys = [
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_local_base_freq",
        "rope_parameters", "rope_scaling", "sliding_window", "sliding_window_pattern", "layer_types",
        "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping",
        "hidden_activation", "hidden_act", "tie_word_embeddings", "max_position_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "vocab_size", "layer_norm_eps",
        "attention_bias", "mlp_bias", "use_bidirectional_attention",
    ]
    out = {}
    for k in keys:
        if hasattr(cfg, k):
            v = getattr(cfg, k)
            try:
                json.dumps(v)
            except TypeError:
                v = repr(v)
            out[k] = v
    return out


def export_bert(name, sents):
    folder, _ = ASSET_FILES[name]
    path = ASSETS / folder
    tok = AutoTokenizer.from_pretrained(str(path))
    cls = BertForMaskedLM if name == "bert_mlm" else BertModel
    model, log = capture_logs(lambda: cls.from_pretrained(str(path), dtype=torch.float32))
    model.eval()
    bert = model.bert if name == "bert_mlm" else model
    layers = bert.encoder.layer
    L = len(layers)
    d = model.config.hidden_size
    which = [0, L // 2, L]
    tensors = {"hidden_layers": np.array(which, dtype=np.int64)}
    max_diff = {}
    tap = LayerTap(layers)
    try:
        for i, s in enumerate(sents):
            enc = tok(s, return_tensors="pt")
            ids = enc["input_ids"]
            tensors[f"ids.{i}"] = ids[0].to(torch.int64).numpy()
            run_ids = ids.clone()
            if name == "bert_mlm":
                pos = ids.shape[1] // 2
                run_ids[0, pos] = tok.mask_token_id
                tensors[f"mask_pos.{i}"] = np.array([pos], dtype=np.int64)
                tensors[f"masked_ids.{i}"] = run_ids[0].to(torch.int64).numpy()
            with torch.no_grad():
                out = model(
                    input_ids=run_ids,
                    attention_mask=torch.ones_like(run_ids),
                    token_type_ids=torch.zeros_like(run_ids),
                    output_hidden_states=True,
                )
            if name == "bert_mlm":
                t_ids, t_vals = top5(out.logits[0, pos : pos + 1])
                tensors[f"top5.{i}"] = t_ids
                tensors[f"top5_logits.{i}"] = t_vals
            tensors[f"hidden.{i}"] = np.stack([tap.state(k)[-1].float().numpy() for k in which]).astype(np.float32)
            for k in range(L + 1):
                diff = float((out.hidden_states[k][0] - tap.state(k)).abs().max())
                max_diff[str(k)] = max(max_diff.get(str(k), 0.0), diff)
    finally:
        tap.remove()
    info = {
        "loader": f"{cls.__name__}.from_pretrained(folder, dtype=torch.float32)",
        "tokenizer": type(tok).__name__,
        "mask_token_id": tok.mask_token_id if name == "bert_mlm" else None,
        "num_layers": L,
        "d": d,
        "vocab_size": model.config.vocab_size,
        "hidden_layers": which,
        "config": config_summary(model.config),
        "hidden_state_checks": {"max_abs_hook_vs_output_hidden_states": max_diff},
        "load_log": interesting_log_lines(log),
    }
    return tensors, info


SKETCH_K = 4


def all_states(model, tap, ids):
    """h_0..h_L at every position of one sentence: [L+1, T, d] (float64) and the logits [T, V]."""
    with torch.no_grad():
        out = model(input_ids=ids)
    L = len(tap.layers)
    return torch.stack([tap.state(k).double() for k in range(L + 1)]), out.logits[0]


def export_causal_bf16(name, sents):
    folder, fn = ASSET_FILES[name]
    path = ASSETS / folder
    tok = AutoTokenizer.from_pretrained(str(path), gguf_file=fn)
    f32 = AutoModelForCausalLM.from_pretrained(
        str(path), gguf_file=fn, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(
        str(path), gguf_file=fn, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    bf16.to(torch.bfloat16)
    d = bf16.config.hidden_size
    sketch = np.random.default_rng(0).standard_normal((SKETCH_K, d)) / np.sqrt(SKETCH_K)
    s64 = torch.from_numpy(sketch)
    tensors = {"sketch": sketch.astype(np.float32)}
    taps = LayerTap(f32.model.layers), LayerTap(bf16.model.layers)
    L = len(f32.model.layers)
    num, den, num_s, den_s = (np.zeros(L + 1) for _ in range(4))
    top1_same, positions = 0, 0
    try:
        for i, s in enumerate(sents):
            ids = tok(s, return_tensors="pt")["input_ids"]
            h32, logits32 = all_states(f32, taps[0], ids)
            h16, logits16 = all_states(bf16, taps[1], ids)
            assert taps[1].state(0).dtype == torch.bfloat16
            proj16 = h16 @ s64.T
            tensors[f"states.{i}"] = proj16.float().numpy()
            t_ids, t_vals = top5(logits16)
            tensors[f"top5.{i}"] = t_ids
            tensors[f"top5_logits.{i}"] = t_vals
            diff = h16 - h32
            num += (diff**2).sum(dim=(1, 2)).numpy()
            den += (h32**2).sum(dim=(1, 2)).numpy()
            num_s += ((diff @ s64.T) ** 2).sum(dim=(1, 2)).numpy()
            den_s += ((h32 @ s64.T) ** 2).sum(dim=(1, 2)).numpy()
            top1_same += int((logits16.float().argmax(-1) == logits32.argmax(-1)).sum())
            positions += ids.shape[1]
    finally:
        for t in taps:
            t.remove()
    info = {
        "loader": f"AutoModelForCausalLM.from_pretrained(folder, gguf_file={fn!r}, dtype=torch.float32, attn_implementation='eager').to(torch.bfloat16)",
        "sketch_k": SKETCH_K,
        "torch_bf16_vs_f32_normwise_per_layer": [float(x) for x in np.sqrt(num / den)],
        "torch_bf16_vs_f32_sketch_estimate_per_layer": [float(x) for x in np.sqrt(num_s / den_s)],
        "torch_bf16_vs_f32_top1_same": f"{top1_same}/{positions}",
    }
    return tensors, info


def main_bf16(names):
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sents = sentences()
    meta_path = OUT / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("bf16", {})
    for name in names or ["smollm2", "gemma3"]:
        if name not in ("smollm2", "gemma3"):
            sys.exit(f"--bf16: unknown asset {name!r}; known: smollm2, gemma3")
        print(f"== {name} bf16", file=sys.stderr)
        tensors, info = export_causal_bf16(name, sents)
        out = OUT / f"{name}_bf16.safetensors"
        save_file(tensors, str(out), metadata={"source": f"{name} bf16; transformers {transformers.__version__}"})
        out.chmod(0o644)
        info["fixture_bytes"] = out.stat().st_size
        info["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
        meta["bf16"][name] = info
        print(json.dumps(info, indent=1), file=sys.stderr)
    meta_path.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main():
    if sys.argv[1:2] == ["--bf16"]:
        return main_bf16(sys.argv[2:])
    names = sys.argv[1:] or list(ASSET_FILES)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sents = sentences()
    meta_path = OUT / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    import gguf

    meta["versions"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "safetensors": _dist_version("safetensors"),
        "numpy": np.__version__,
    }
    meta["sentences_file"] = "sentences.txt (one per line; a literal \\n stands for a newline)"
    meta["sentences"] = sents
    meta["conventions"] = CONVENTIONS
    meta.setdefault("assets", {})
    for name in names:
        if name not in ASSET_FILES:
            sys.exit(f"unknown asset {name!r}; known: {list(ASSET_FILES)}")
        folder, fn = ASSET_FILES[name]
        print(f"== {name}", file=sys.stderr)
        if name in ("smollm2", "gemma3"):
            tensors, info = export_causal(name, sents)
        else:
            tensors, info = export_bert(name, sents)
        files = {fn: sha256(ASSETS / folder / fn)}
        for extra in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            if (ASSETS / folder / extra).exists():
                files[extra] = sha256(ASSETS / folder / extra)
        info["sha256"] = files
        out = OUT / f"{name}.safetensors"
        # one metadata entry: safetensors writes the header map in no fixed order
        save_file(tensors, str(out), metadata={"source": f"{name}; transformers {transformers.__version__}"})
        out.chmod(0o644)
        info["fixture_bytes"] = out.stat().st_size
        meta["assets"][name] = info
        print(f"   wrote {out} ({out.stat().st_size} bytes)", file=sys.stderr)
    meta_path.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _dist_version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
