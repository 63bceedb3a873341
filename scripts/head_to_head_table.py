"""The head-to-head table (README, "Tuned lens against least squares") from runs made by
scripts/head_to_head.sh: for each run, P@1, KL and CE of every lens predict scored at every 5th
layer and the mean over layers 0..L-1, and each lens's cost from the manifest.

    python3 scripts/head_to_head_table.py runs/h2h/smollm2 runs/h2h/gemma3 runs/h2h/bert_mlm
"""

import json
import sys

ORDER = ["id", "mat", "affine", "tuned", "mat+kl"]


def cost(manifest, lens):
    stages = manifest.get("stages", {})
    pick = {
        "id": None,
        "mat": "fit",
        "affine": "fit_affine",
        "tuned": "tuned-lens.tuned",
        "mat+kl": "tuned-lens.tuned-mat",
    }[lens]
    if pick is None:
        return "none"
    rec = stages.get(pick)
    if not rec or "wall_s" not in rec:
        return "?"
    s = f"{rec['wall_s']:.0f} s"
    opts = rec.get("options", {})
    if "steps" in opts:
        s += f" ({opts['steps']} steps x {opts['tokens_per_step']} tokens)"
    if lens == "mat+kl":
        s += " + fit"
    return s


for run in sys.argv[1:]:
    p = json.load(open(f"{run}/predict.json"))
    m = json.load(open(f"{run}/manifest.json"))
    layers = p["layers"]
    shown = list(range(0, layers, 5))
    lenses = [k for k in ORDER if k in p["lenses"]]
    print(f"\n**{run}** ({m['model'].get('arch', '?')}, {layers} layers, {p['n_val']} validation examples)\n")
    head = "| lens | cost | " + " | ".join(f"ℓ={l}" for l in shown) + " | mean 0..L-1 |"
    print(head)
    print("|" + "---|" * (len(shown) + 3))
    for lens in lenses:
        met = p["lenses"][lens]
        cells = []
        for l in shown + ["mean"]:
            vals = []
            for key in ["p@1", "kl", "ce"]:
                v = met[key]
                x = sum(v[:layers]) / layers if l == "mean" else v[l]
                vals.append(f"{x:.2f}" if key != "p@1" else f"{x:.3f}")
            cells.append(" / ".join(vals))
        print(f"| {lens} | {cost(m, lens)} | " + " | ".join(cells) + " |")
    print("\nCells: P@1 / KL (nats) / CE (nats).")
