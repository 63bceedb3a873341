"""The logit lens (id) against the linear shortcut (mat) on one sentence of the bundled
SmolLM2-135M: what every layer predicts for the next token at the last position.

    python python/examples/logit_vs_linear.py [--run RUN] [--text TEXT]

Without --run it collects a small run on the bundled Wikipedia summaries (400 training and 50
validation sentences, 10 positions each) and fits the to-final maps (2-3 minutes on 2 cores;
reused when run again); with --run it uses that run's maps (e.g. a `jumplens report` run).
"""

import argparse

import numpy as np

import jumplens

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--run", help="a run folder with fitted maps (default: collect and fit a small one)")
p.add_argument("--text", default="The capital of France is the city of")
p.add_argument("--out", default="runs/example-smollm2", help="where the small run goes")
args = p.parse_args()

assets = jumplens.default_assets()  # found under assets/, else fetched (pinned, sha256-checked)
model = jumplens.Model(assets["model"])
if args.run:
    run = jumplens.Run(args.run, model=model)
else:
    # 10 positions per sentence: 4000 training states for d = 576 at the cost of 400 forwards.
    run = jumplens.collect(model, assets["corpus"], args.out, train=400, val=50, seed=0, positions=10)
    jumplens.fit(run, pairs="to-final")

states = model.hidden_states(args.text)["hidden_states"][:, -1]  # [L+1, d] at the last token
last = model.info["n_layers"]
print(f"{args.text!r} -> next token, per layer (top-1 and its probability)")
print(f"{'layer':>5}  {'id (logit lens)':<22}{'mat (linear shortcut)':<22}")
for layer in range(last + 1):
    cells = []
    for kind in ["id", "mat"]:
        logits = run.lens(kind, layer)(states[layer])
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = int(logits.argmax())
        cells.append(f"{model.decode(top)!r} {probs[top]:.2f}")
    print(f"{layer:>5}  {cells[0]:<22}{cells[1]:<22}")
