"""Tuned-lens reference fixtures (tests/fixtures/tuned), made by the `tuned-lens` package itself.

Environment: tuned-lens 0.2.0 installed with `pip install --no-deps tuned-lens==0.2.0` into a venv
whose site-packages also see the reference environment (torch 2.15, transformers 5.24):

    python3 -m venv /work/venv-tuned
    /work/venv-tuned/bin/pip install --no-deps tuned-lens==0.2.0
    echo /work/refenv/lib/python3.11/site-packages > /work/venv-tuned/lib/python3.11/site-packages/refenv.pth
    /work/venv-tuned/bin/python scripts/export_tuned_fixtures.py

(`tuned_lens.nn` needs only torch and transformers; its other dependencies are for its CLI.)

1. Forward (`llama_peer/`): for the tiny random Llama of tests/fixtures/tiny/llama, a lens made by
   `tuned_lens.nn.TunedLens.from_model` with random parameters (seeded), saved by its own
   `TunedLens.save` (`params.pt` + `config.json`); `forward.safetensors` holds the hidden states of
   the fixture's real tokens (`hidden_states` [L+1, n, d]) and `TunedLens.forward(h_l, idx=l)`
   for l = 0..L-1 (`logits` [L, n, V]), in float32.
2. Round trip (`llama_jumplens/`): a lens written by jumplens (`params.pt` + `config.json`, from
   `JUMPLENS_WRITE_TUNED_FIXTURE=1 cargo test --release --test tuned`) loaded by
   `TunedLens.from_model_and_pretrained` (`torch.load(..., weights_only=True)` checked too); its
   logits on the same states go to `llama_jumplens/peer_logits.safetensors`.
3. Training (`train.safetensors`): K optimiser steps of tuned-lens's own recipe on fixed batches
   (see `train_fixture`), for tests/tuned.rs to replay.
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tuned_lens.nn import TunedLens


def _training_ingredients():
    """tuned-lens's own `Optimizer` config (its `create_optim` / `create_scheduler`). Its module
    also imports the package's data loading (`datasets`, `torchdata.dataloader2`, which recent
    torchdata no longer has); those imports are satisfied by empty stand-ins, since the training
    step uses neither."""
    import types
    for name in ("datasets", "torchdata"):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.Dataset = stub.DatasetDict = stub.load_dataset = None
            stub.dataloader2 = types.SimpleNamespace(DataLoader2=None)
            stub.datapipes = types.SimpleNamespace()
            sys.modules[name] = stub
    from tuned_lens.scripts.ingredients import Optimizer
    return Optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny", "llama")
OUT = os.path.join(ROOT, "tests", "fixtures", "tuned")


def states(model):
    """Hidden states [L+1, n, d] at the real tokens of the tiny fixture's batch."""
    ex = load_file(os.path.join(TINY, "expected.safetensors"))
    mask = ex["attention_mask"].bool()
    hs = ex["hidden_states"]  # [L+1, B, T, d], index L before the final norm
    return torch.stack([h[mask] for h in hs]).float()


def lens_logits(lens, hs):
    with torch.no_grad():
        return torch.stack([lens(hs[l], idx=l) for l in range(len(lens))]).float()


def forward_fixture(model, hs):
    torch.manual_seed(15)
    lens = TunedLens.from_model(model)
    with torch.no_grad():
        for t in lens.layer_translators:
            t.weight.copy_(0.08 * torch.randn_like(t.weight))
            t.bias.copy_(0.3 * torch.randn_like(t.bias))
    peer = os.path.join(OUT, "llama_peer")
    lens.save(peer)
    logits = lens_logits(lens, hs)
    save_file({"hidden_states": hs.contiguous(), "logits": logits.contiguous()},
              os.path.join(OUT, "forward.safetensors"))
    # The saved lens reproduces them.
    back = TunedLens.from_model_and_pretrained(model, peer)
    assert torch.equal(lens_logits(back, hs), logits)
    print("forward: logits", tuple(logits.shape), "max |logit|", logits.abs().max().item())


def roundtrip_fixture(model, hs):
    mine = os.path.join(OUT, "llama_jumplens")
    if not os.path.exists(os.path.join(mine, "params.pt")):
        print("round trip: no", mine, "(run JUMPLENS_WRITE_TUNED_FIXTURE=1 cargo test --release --test tuned first)")
        return
    state = torch.load(os.path.join(mine, "params.pt"), weights_only=True)
    assert list(state.keys()) == [f"{i}.{k}" for i in range(model.config.num_hidden_layers)
                                  for k in ("weight", "bias")], list(state.keys())
    lens = TunedLens.from_model_and_pretrained(model, mine)
    logits = lens_logits(lens, hs)
    save_file({"logits": logits.contiguous()}, os.path.join(mine, "peer_logits.safetensors"))
    print("round trip: tuned_lens loaded the jumplens lens; logits", tuple(logits.shape))


def train_fixture(model, hs_unused):
    """K steps of tuned-lens's training step (tuned_lens/scripts/train_loop.py `execute`, KL loss,
    token shift 0, one batch per step) with its optimiser and schedule
    (tuned_lens/scripts/ingredients.py: SGD, lr = lr_scale * (1 - momentum), momentum 0.9,
    Nesterov, weight decay 1e-3, linear decay to 0 over num_steps, no warmup), in float32:
    train_loop.py runs the lens under bfloat16 autocast, which is left out here so the comparison
    measures the algorithm, not bf16 rounding."""
    torch.manual_seed(16)
    steps, batch, seq = 4, 2, 6
    num_steps = 10  # the schedule's horizon (lr factor (num_steps - step) / num_steps)
    ids = torch.randint(3, model.config.vocab_size, (steps, batch, seq))
    lens = TunedLens.from_model(model)
    with torch.no_grad():
        for t in lens.layer_translators:
            t.weight.copy_(0.05 * torch.randn_like(t.weight))
            t.bias.copy_(0.2 * torch.randn_like(t.bias))
    init = {k: v.clone() for k, v in lens.layer_translators.state_dict().items()}
    cfg = _training_ingredients()()  # the package's defaults
    params = [p for p in lens.parameters() if p.requires_grad]
    opt = cfg.create_optim(params)
    sched = cfg.create_scheduler(opt, num_steps)
    losses = []
    for step in range(steps):
        with torch.no_grad():
            out = model(input_ids=ids[step], output_hidden_states=True)
        labels = out.logits.float().log_softmax(dim=-1)
        total = 0.0
        for i, h in enumerate(out.hidden_states[:-1]):
            logits = lens(h, idx=i)
            loss = torch.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
            total += loss.item()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        sched.step()
        losses.append(total)
    tensors = {"input_ids": ids.contiguous(), "losses": torch.tensor(losses, dtype=torch.float64),
               "num_steps": torch.tensor([num_steps])}
    for k, v in init.items():
        tensors[f"init.{k}"] = v.contiguous()
    for k, v in lens.layer_translators.state_dict().items():
        tensors[f"final.{k}"] = v.contiguous()
    save_file(tensors, os.path.join(OUT, "train.safetensors"))
    print("train: losses per step", losses)


def main():
    os.makedirs(OUT, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    model.config.name_or_path = "tests/fixtures/tiny/llama"  # not this checkout's absolute path
    hs = states(model)
    forward_fixture(model, hs)
    roundtrip_fixture(model, hs)
    train_fixture(model, hs)
    print("versions:", json.dumps({"torch": torch.__version__, "tuned_lens": "0.2.0",
                                   "transformers": sys.modules["transformers"].__version__}))


if __name__ == "__main__":
    main()
