"""The masked-LM tuned-lens gradient reference (tests/fixtures/tuned/bert_mlm_grad.safetensors),
by PyTorch autograd on transformers' BertForMaskedLM (the tiny random model of
tests/fixtures/tiny/bert_mlm). The tuned-lens package cannot train on a masked LM, so this is
the loss jumplens trains BERT with, written out in plain torch:

    loss = sum_{l=0..L-1} mean_positions KL(p || q_l),  p = softmax(cls(h_L)),
    q_l = softmax(cls(h_l + h_l W_l^T + b_l))

(cls: the model's MLM head, `BertForMaskedLM.cls`; BERT has no final norm), at the fixture's
real-token states h_0..h_L (`expected.safetensors`, transformers' hidden states), for a lens with
seeded random W_l, b_l. Saved: `hidden_states` [L+1, n, d], `weights` [L, d, d], `biases` [L, d],
`loss` [1], `grad_weights` [L, d, d], `grad_biases` [L, d], all float64 except the states
(float32, as jumplens stores them); the model runs in float64 here, so the reference is exact to
rounding.

    /work/refenv/bin/python scripts/export_tuned_mlm_fixture.py
"""

import os

import torch
from safetensors.torch import load_file, save_file
from transformers import BertForMaskedLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny", "bert_mlm")
OUT = os.path.join(ROOT, "tests", "fixtures", "tuned", "bert_mlm_grad.safetensors")


def main():
    model = BertForMaskedLM.from_pretrained(TINY, dtype=torch.float64).eval()
    ex = load_file(os.path.join(TINY, "expected.safetensors"))
    mask = ex["attention_mask"].bool()
    hs = ex["hidden_states"]  # [L+1, B, T, d]
    states = torch.stack([h[mask] for h in hs])  # [L+1, n, d] float32
    n_layers, d = states.shape[0] - 1, states.shape[2]
    g = torch.Generator().manual_seed(15)
    weights = (0.2 * torch.randn(n_layers, d, d, generator=g, dtype=torch.float64)).requires_grad_(True)
    biases = (0.3 * torch.randn(n_layers, d, generator=g, dtype=torch.float64)).requires_grad_(True)
    h = states.double()
    with torch.no_grad():
        log_p = model.cls(h[n_layers]).log_softmax(-1)
    loss = 0.0
    for l in range(n_layers):
        z = model.cls(h[l] + h[l] @ weights[l].T + biases[l])
        loss = loss + torch.sum(log_p.exp() * (log_p - z.log_softmax(-1)), dim=-1).mean()
    loss.backward()
    save_file(
        {
            "hidden_states": states.contiguous(),
            "weights": weights.detach().contiguous(),
            "biases": biases.detach().contiguous(),
            "loss": loss.detach().reshape(1),
            "grad_weights": weights.grad.contiguous(),
            "grad_biases": biases.grad.contiguous(),
        },
        OUT,
    )
    print(f"{OUT}: {states.shape[1]} positions, loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
