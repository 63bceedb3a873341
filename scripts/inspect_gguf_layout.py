#!/usr/bin/env python3
"""How the GGUF assets' tensors relate to the weights transformers loads.

For smollm2 and gemma3: dequantizes tensors straight from the file (gguf
package) and compares them with the same weights after transformers' GGUF
loader has converted them, answering:
  * are Q/K rows permuted by llama.cpp (the interleaved-RoPE layout) relative to
    the HF layout?  (llama.cpp's convert does this for "llama" models)
  * are RMSNorm weights stored as 1 + w (Gemma's zero-centred norms)?
  * is token_embd the same as embed_tokens (no sqrt(d) folded in)?
Prints a report and stores it in tests/fixtures/real/meta.json under
"gguf_layout".  Usage: /root/refenv/bin/python scripts/inspect_gguf_layout.py
"""
import json
import os
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("JUMPLENS_ASSETS", REPO / "assets"))
META = REPO / "tests/fixtures/real/meta.json"


def gguf_tensors(path):
    r = GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        out[t.name] = (t.tensor_type.name, t)
    return r, out


def deq(entry):
    qtype, t = entry
    a = dequantize(t.data, t.tensor_type)
    return np.asarray(a, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])


def llama_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute (HF -> GGUF rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def maxdiff(a, b):
    return float(np.abs(a - b).max())


def inspect(name, fn, heads, kv_heads):
    path = ASSETS / name / fn
    _, tens = gguf_tensors(path)
    model = AutoModelForCausalLM.from_pretrained(str(ASSETS / name), gguf_file=fn, dtype=torch.float32)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    rep = {"tensor_types": {}}
    for k, (qt, _) in tens.items():
        rep["tensor_types"][qt] = rep["tensor_types"].get(qt, 0) + 1

    q_g, k_g = deq(tens["blk.0.attn_q.weight"]), deq(tens["blk.0.attn_k.weight"])
    q_h = sd["model.layers.0.self_attn.q_proj.weight"]
    k_h = sd["model.layers.0.self_attn.k_proj.weight"]
    rep["q_proj"] = {
        "gguf_shape": list(q_g.shape),
        "hf_shape": list(q_h.shape),
        "max_abs(gguf - hf)": maxdiff(q_g, q_h),
        "max_abs(gguf - llama_permute(hf))": maxdiff(q_g, llama_permute(q_h, heads)),
    }
    rep["k_proj"] = {
        "max_abs(gguf - hf)": maxdiff(k_g, k_h),
        "max_abs(gguf - llama_permute(hf))": maxdiff(k_g, llama_permute(k_h, kv_heads)),
    }
    rep["qk_permuted_by_llama_cpp"] = (
        rep["q_proj"]["max_abs(gguf - llama_permute(hf))"] == 0.0 and rep["q_proj"]["max_abs(gguf - hf)"] > 0.0
    )
    v_g = deq(tens["blk.0.attn_v.weight"])
    rep["v_proj_max_abs(gguf - hf)"] = maxdiff(v_g, sd["model.layers.0.self_attn.v_proj.weight"])
    emb_g = deq(tens["token_embd.weight"])
    rep["token_embd_max_abs(gguf - hf embed_tokens)"] = maxdiff(emb_g, sd["model.embed_tokens.weight"])
    if "lm_head.weight" in sd:
        rep["lm_head_is_embed_tokens"] = maxdiff(sd["lm_head.weight"], sd["model.embed_tokens.weight"]) == 0.0

    norms = {
        "output_norm.weight": "model.norm.weight",
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.0.ffn_norm.weight": ("model.layers.0.pre_feedforward_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"),
        "blk.0.post_attention_norm.weight": "model.layers.0.post_attention_layernorm.weight",
        "blk.0.post_ffw_norm.weight": "model.layers.0.post_feedforward_layernorm.weight",
        "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
        "blk.0.attn_k_norm.weight": "model.layers.0.self_attn.k_norm.weight",
    }
    rep["norms"] = {}
    for g, h in norms.items():
        if g not in tens:
            continue
        cands = h if isinstance(h, tuple) else (h,)
        h = next((c for c in cands if c in sd), None)
        if h is None:
            continue
        if name == "smollm2" and g == "blk.0.ffn_norm.weight":
            h = "model.layers.0.post_attention_layernorm.weight"
        a, b = deq(tens[g]), sd[h]
        rep["norms"][g] = {
            "hf": h,
            "gguf_mean": float(a.mean()),
            "hf_mean": float(b.mean()),
            "max_abs(gguf - hf)": maxdiff(a, b),
            "max_abs(gguf - (1 + hf))": maxdiff(a, 1.0 + b),
        }
    rep["norms_stored_as_1_plus_w"] = all(v["max_abs(gguf - (1 + hf))"] < 1e-6 for v in rep["norms"].values())
    del model
    return rep


def main():
    out = {
        "smollm2": inspect("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", heads=9, kv_heads=3),
        "gemma3": inspect("gemma3", "gemma-3-270m-q4_k_m.gguf", heads=4, kv_heads=1),
    }
    print(json.dumps(out, indent=1))
    meta = json.loads(META.read_text()) if META.exists() else {}
    meta["gguf_layout"] = out
    META.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
