"""Export reference fixtures for jumplens's prediction metrics (`predict::evaluate`) and early exit.

What it produces (deterministic: fixed seeds, CPU, one thread):

  tests/fixtures/lens/llama.safetensors     (tiny LlamaForCausalLM, tests/fixtures/tiny/llama)
  tests/fixtures/lens/bert_mlm.safetensors  (tiny BertForMaskedLM, tests/fixtures/tiny/bert_mlm)

For each model a small random "validation set" of N_VAL = 40 examples and a separate "train set"
of N_TRAIN = 200 examples are built (numpy RandomState, seed per model):

  * causal (llama): a sentence is 3..7 random ids in [3, 128) (no BOS); one position p is sampled
    uniformly; the model runs on the sentence cut after p and the state at p is read.  The gold
    token for cross-entropy is the sentence's next token s[p + 1]; examples with p at the
    sentence's end have none and are skipped by the CE mean.
  * masked (bert_mlm): a sentence is [CLS]=1, 1..5 random ids in [4, 128), [SEP]=2 (3..7 tokens);
    p is sampled among the inner tokens and replaced by id 3, used as [MASK] for this tiny
    model (it has no tokenizer; id 3 is never a real token of these sentences).  Gold = the
    original token s[p].

h_0..h_L are collected with PyTorch (transformers' `output_hidden_states` for 0..L-1, a forward
hook on the last block for h_L, i.e. BEFORE the final norm, as scripts/export_fixtures.py does).
Maps A_{l->L} (l < L) are fitted on the train set's states with numpy's minimum-norm least
squares (float64, no intercept), stored float32 [d, d] out x in (mapped = A @ h).

The expected metrics are computed in float64 with numpy from the stored float32 states and maps
and the model's weights, independently of jumplens (the readout is written out in numpy and
checked against the PyTorch modules):

  readout(x) = lm_head(RMSNorm(x))                    (llama, eps 1e-5)
             = cls(x) = decoder(LN(gelu(dense(x))))     (BERT MLM head, tied decoder + bias)
  lens in {mat, id}, layer l = 0..L:  z = readout(A_{l->L} h_l) (mat; A = identity at l = L)
                                      z = readout(h_l)          (id)
  model logits m = readout(h_L)
  p@k         = mean over examples of [argmax z is among the model's top-k tokens]
  surprisal   = mean of -log_softmax(m)[argmax z]
  kl          = mean of KL(softmax(m) || softmax(z))
  ce          = mean over examples with a gold token of -log_softmax(z)[gold]
  margin      = per example p_top1 - p_top2 of softmax(z)

Tensors of each file:

  hidden_states [S=L+1, N, d] f32, positions [N] i64, tokens [sum len] i64, offsets [N+1] i64
      (example i's sentence, unmasked, is tokens[offsets[i]:offsets[i+1]]), article [N] i64 (= i);
  mat.{l}.{L} [d, d] f32 for l < L;
  model_top1 [N] i64;  {lens}.top1 [S, N] i64;
  {lens}.p@1, {lens}.p@5, {lens}.p@10, {lens}.surprisal, {lens}.kl, {lens}.ce  [S] f64;
  {lens}.margin [S, N] f32.
  Header metadata: one key "info", a JSON object (model, attention, mask_id, sizes, versions).

The script prints the smallest gaps that decide p@k and the top-1 (near-ties), so a test that
compares p@k exactly knows whether it can.

Rerun from the repository root:  /root/refenv/bin/python scripts/export_lens_fixture.py
(torch / transformers / numpy pinned in scripts/requirements-reference.txt).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers import BertForMaskedLM, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny"
OUT = ROOT / "tests" / "fixtures" / "lens"

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()

N_VAL, N_TRAIN = 40, 200
VOCAB = 128
CLS_ID, SEP_ID, MASK_ID = 1, 2, 3  # tiny BERT: id 3 stands for [MASK]
SEEDS = {"llama": 11, "bert_mlm": 12}
KS = (1, 5, 10)


def sample_examples(rng, n, causal):
    """n (sentence, position) pairs; sentences are int64 arrays of 3..7 ids."""
    out = []
    for _ in range(n):
        length = int(rng.randint(3, 8))
        if causal:
            sent = rng.randint(3, VOCAB, size=length).astype(np.int64)
            pos = int(rng.randint(0, length))
        else:
            inner = rng.randint(4, VOCAB, size=length - 2).astype(np.int64)
            sent = np.concatenate([[CLS_ID], inner, [SEP_ID]]).astype(np.int64)
            pos = int(rng.randint(1, length - 1))
        out.append((sent, pos))
    return out


def collect(model, layers, examples, causal):
    """h_0..h_L [S, n, d] float32 at each example's position (h_L before any final norm)."""
    store = {}

    def hook(mod, args, out):
        store["last"] = (out[0] if isinstance(out, (tuple, list)) else out).detach().clone()

    handle = layers[-1].register_forward_hook(hook)
    rows = []
    try:
        for sent, pos in examples:
            if causal:
                ids = sent[: pos + 1].copy()
            else:
                ids = sent.copy()
                ids[pos] = MASK_ID
            inputs = {"input_ids": torch.from_numpy(ids)[None, :]}
            if not causal:
                inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
            with torch.no_grad():
                out = model(**inputs, output_hidden_states=True)
            hs = list(out.hidden_states[: len(layers)]) + [store["last"]]
            rows.append(torch.stack([h[0, pos] for h in hs]).numpy())
    finally:
        handle.remove()
    return np.stack(rows, axis=1).astype(np.float32)  # [S, n, d]


def make_readout(model, name):
    """numpy float64 readout (final norm + unembedding / MLM head) from the model's weights."""
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    if name == "llama":
        w_norm, w_out, eps = sd["model.norm.weight"], sd["lm_head.weight"], cfg.rms_norm_eps

        def readout(x):
            x = np.asarray(x, dtype=np.float64)
            normed = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w_norm
            return normed @ w_out.T

        torch_readout = lambda h: model.lm_head(model.model.norm(h))  # noqa: E731
    else:
        p = "cls.predictions."
        dw, db = sd[p + "transform.dense.weight"], sd[p + "transform.dense.bias"]
        g, b, eps = sd[p + "transform.LayerNorm.weight"], sd[p + "transform.LayerNorm.bias"], cfg.layer_norm_eps
        dec, bias = sd["bert.embeddings.word_embeddings.weight"], sd[p + "bias"]
        erf = np.vectorize(math.erf)

        def readout(x):
            x = np.asarray(x, dtype=np.float64)
            y = x @ dw.T + db
            y = 0.5 * y * (1.0 + erf(y / math.sqrt(2.0)))
            mu = y.mean(-1, keepdims=True)
            var = ((y - mu) ** 2).mean(-1, keepdims=True)
            y = (y - mu) / np.sqrt(var + eps) * g + b
            return y @ dec.T + bias

        torch_readout = lambda h: model.cls(h)  # noqa: E731
    return readout, torch_readout


def log_softmax(z):
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def export(name):
    causal = name == "llama"
    cls = LlamaForCausalLM if causal else BertForMaskedLM
    model = cls.from_pretrained(TINY / name)
    model.set_attn_implementation("eager")
    model.eval()
    layers = list(model.model.layers) if causal else list(model.bert.encoder.layer)
    L = len(layers)
    S = L + 1
    rng = np.random.RandomState(SEEDS[name])
    val = sample_examples(rng, N_VAL, causal)
    train = sample_examples(rng, N_TRAIN, causal)
    h_val = collect(model, layers, val, causal)
    h_train = collect(model, layers, train, causal)

    # Maps A_{l->L}: minimum-norm least squares, float64, no intercept; stored float32 out x in.
    maps = {}
    y = h_train[L].astype(np.float64)
    for l in range(L):
        coef, *_ = np.linalg.lstsq(h_train[l].astype(np.float64), y, rcond=None)
        maps[l] = np.ascontiguousarray(coef.T).astype(np.float32)

    readout, torch_readout = make_readout(model, name)
    with torch.no_grad():
        ref32 = torch_readout(torch.from_numpy(h_val[L])).double().numpy()
    ours = readout(h_val[L])
    err = np.abs(ours - ref32).max() / max(1.0, np.abs(ref32).max())
    assert err < 1e-5, f"{name}: numpy readout differs from PyTorch's by {err}"

    # Gold tokens.
    gold = []
    for sent, pos in val:
        if causal:
            gold.append(int(sent[pos + 1]) if pos + 1 < len(sent) else None)
        else:
            gold.append(int(sent[pos]))

    m = readout(h_val[L])  # [N, V] float64
    m_logp = log_softmax(m)
    m_p = np.exp(m_logp)
    order = np.argsort(-m, axis=-1, kind="stable")
    model_top1 = order[:, 0]
    ms = np.sort(m, axis=-1)
    gaps_model_top1 = float((ms[:, -1] - ms[:, -2]).min())
    tensors = {}
    gaps = {"top1": math.inf, **{f"p@{k}": math.inf for k in KS}}
    for lens in ("mat", "id"):
        res = {k: np.zeros(S) for k in ("p@1", "p@5", "p@10", "surprisal", "kl", "ce")}
        margin = np.zeros((S, N_VAL), dtype=np.float32)
        top1 = np.zeros((S, N_VAL), dtype=np.int64)
        for l in range(S):
            h = h_val[l].astype(np.float64)
            if lens == "mat" and l < L:
                h = h @ maps[l].astype(np.float64).T
            z = readout(h)
            logp = log_softmax(z)
            p = np.exp(logp)
            arg = z.argmax(-1)
            top1[l] = arg
            rows = np.arange(N_VAL)
            for k in KS:
                res[f"p@{k}"][l] = np.mean([arg[i] in order[i, :k] for i in rows])
            # p@k is decided by the chosen token's model logit against the k-th largest other one.
            for i in rows:
                others = np.sort(np.delete(m[i], arg[i]))[::-1]
                for k in KS:
                    gaps[f"p@{k}"] = min(gaps[f"p@{k}"], float(abs(m[i, arg[i]] - others[k - 1])))
            res["surprisal"][l] = np.mean(-m_logp[rows, arg])
            res["kl"][l] = np.mean((m_p * (m_logp - logp)).sum(-1))
            ce = [-logp[i, g] for i, g in enumerate(gold) if g is not None]
            res["ce"][l] = np.mean(ce)
            ps = np.sort(p, axis=-1)
            margin[l] = (ps[:, -1] - ps[:, -2]).astype(np.float32)
            zs = np.sort(z, axis=-1)
            gaps["top1"] = min(gaps["top1"], float((zs[:, -1] - zs[:, -2]).min()))
        for k, v in res.items():
            tensors[f"{lens}.{k}"] = v.astype(np.float64)
        tensors[f"{lens}.margin"] = margin
        tensors[f"{lens}.top1"] = top1

    positions = np.array([pos for _, pos in val], dtype=np.int64)
    tokens = np.concatenate([s for s, _ in val]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s, _ in val])]).astype(np.int64)
    tensors.update(
        hidden_states=np.ascontiguousarray(h_val),
        positions=positions,
        tokens=tokens,
        offsets=offsets,
        article=np.arange(N_VAL, dtype=np.int64),
        model_top1=model_top1.astype(np.int64),
    )
    for l in range(L):
        tensors[f"mat.{l}.{L}"] = maps[l]
    meta = {
        "model": f"tests/fixtures/tiny/{name}",
        "attention": "causal" if causal else "bidirectional",
        "mask_id": "" if causal else str(MASK_ID),
        "n_val": str(N_VAL),
        "n_train": str(N_TRAIN),
        "n_layers": str(L),
        "note": "see scripts/export_lens_fixture.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.safetensors"
    # One metadata key: safetensors writes a multi-key metadata map in hash order (not reproducible).
    save_file(tensors, str(path), metadata={"info": json.dumps(meta, sort_keys=True)})
    n_gold = sum(g is not None for g in gold)
    summary = {k: [round(float(x), 4) for x in v] for k, v in tensors.items() if v.ndim == 1 and v.dtype == np.float64}
    print(f"{name}: {path.relative_to(ROOT)} ({path.stat().st_size} bytes), N={N_VAL}, gold={n_gold}, "
          f"readout err {err:.1e}")
    print(f"  smallest deciding logit gaps: lens top1-top2 {gaps['top1']:.2e}, model top1-top2 "
          f"{gaps_model_top1:.2e}, chosen token's model logit vs the k-th largest other: "
          + ", ".join(f"p@{k} {gaps[f'p@{k}']:.2e}" for k in KS))
    print("  margins min/max:", {lens: (float(tensors[f"{lens}.margin"][1:].min()),
                                         float(tensors[f"{lens}.margin"][1:].max())) for lens in ("mat", "id")})
    print("  " + json.dumps(summary))


def main():
    for name in ("llama", "bert_mlm"):
        export(name)


if __name__ == "__main__":
    main()
