"""Compares two jumplens run folders made from the same model, corpus and options on different
devices (scripts/device_bench.sh: CPU vs GPU), or two hidden-states files.

  python3 scripts/compare_runs.py RUN_A RUN_B [--json OUT.json] [--same-states]
  python3 scripts/compare_runs.py --states A.safetensors B.safetensors

For every safetensors file both runs have (activations, maps) it reports the normwise relative
difference ||a - b|| / ||b|| per tensor (worst and median over tensors); for every JSON result
(r2, predict, early exit) the largest absolute difference of any number in it. Exits 1 when a
file is missing in one run, a tensor's shape differs, or a difference exceeds its tolerance
(TOLERANCES; `--same-states`: both runs fitted the same states, so the maps must agree to 1e-6:
float64 rounding of the Gram, amplified only by the minimum-norm solutions of singular layers,
measured 1e-8 there and 5e-11 elsewhere).
"""
import json
import os
import statistics
import sys

import numpy as np
from safetensors.numpy import load_file


def rel(a, b):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a))


def tensors(a_path, b_path):
    a, b = load_file(a_path), load_file(b_path)
    if set(a) != set(b):
        sys.exit(f"{a_path} and {b_path} hold different tensors")
    out = {}
    for k in sorted(a):
        if a[k].shape != b[k].shape:
            sys.exit(f"{k}: shapes differ {a[k].shape} vs {b[k].shape}")
        if a[k].dtype.kind == "f":
            if k == "hidden_states" and a[k].ndim == 3:
                # one value per layer: the states of different layers differ in scale by 100x
                for l in range(a[k].shape[0]):
                    out[f"{k}[{l}]"] = rel(a[k][l], b[k][l])
            else:
                out[k] = rel(a[k], b[k])
        else:
            out[k] = float(np.abs(a[k].astype(np.int64) - b[k].astype(np.int64)).max()) if a[k].size else 0.0
    return out


def numbers(x, path=""):
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return
    if isinstance(x, (int, float)):
        yield path, float(x)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from numbers(v, f"{path}.{k}")


SKIP_JSON = ("manifest.json",)
# Largest accepted difference per output (relative for tensors, absolute for JSON numbers).
TOLERANCES = {
    "hidden": 1e-5,
    "activations/": 1e-5,
    "maps.safetensors": 1e-3,  # the minimum-norm solutions of singular layers amplify state noise
    "predict_traces.safetensors": 1e-3,
    "r2.json": 1e-4,
    "predict.json": 1e-3,
    "early_exit.json": 1e-3,
    # Sub-module replacements and alternation scored on 100 examples (scripts/device_bench.sh
    # agreesub): a top-1 that flips on a near tie moves P@1 by 0.01; KL / cross-entropy are nats.
    "submodules.json": 2e-2,
    "alternation.json": 2e-2,
}


def tolerance(name, same_states):
    if same_states and name.startswith("maps"):
        return 1e-6
    for k, v in TOLERANCES.items():
        if name.startswith(k):
            return v
    return None
# Timings and other run facts that are meant to differ between devices.
SKIP_KEYS = ("seconds", "wall_s", "_s", "gflops", "tokens_per_s", "flops")


def json_diff(a_path, b_path):
    a = dict(numbers(json.load(open(a_path))))
    b = dict(numbers(json.load(open(b_path))))
    worst, where = 0.0, ""
    for k in a.keys() & b.keys():
        if any(s in k.rsplit(".", 1)[-1] for s in SKIP_KEYS):
            continue
        va, vb = a[k], b[k]
        if np.isnan(va) and np.isnan(vb):
            continue
        d = abs(va - vb)
        if d > worst or np.isnan(d):
            worst, where = d, k
    return worst, where, len(a.keys() & b.keys())


def main():
    args = sys.argv[1:]
    if args and args[0] == "--states":
        r = tensors(args[1], args[2])
        for k, v in r.items():
            print(f"{k:28s} {v:.2e}")
        worst = max(v for k, v in r.items() if k.startswith("hidden_states") or k == "logits")
        ok = worst <= TOLERANCES["hidden"]
        print(f"worst {worst:.2e} (tolerance {TOLERANCES['hidden']:.0e}: {'ok' if ok else 'EXCEEDED'})")
        sys.exit(0 if ok else 1)
    a, b = args[0], args[1]
    report = {"tensors": {}, "json": {}}
    for root, _, files in os.walk(a):
        for f in sorted(files):
            pa = os.path.join(root, f)
            rp = os.path.relpath(pa, a)
            pb = os.path.join(b, rp)
            if not os.path.exists(pb):
                if f.endswith((".safetensors", ".json")) and "parts" not in rp:
                    sys.exit(f"{rp} is in {a} but not in {b}")
                continue
            if f.endswith(".safetensors") and "parts" not in rp:
                r = tensors(pa, pb)
                vals = list(r.values())
                report["tensors"][rp] = {"n": len(vals), "worst": max(vals), "median": statistics.median(vals),
                                         "worst_name": max(r, key=r.get)}
            elif f.endswith(".json") and f not in SKIP_JSON:
                worst, where, n = json_diff(pa, pb)
                report["json"][rp] = {"numbers": n, "max_abs_diff": worst, "where": where}
    same = "--same-states" in args
    failed = []

    def verdict(rp, value):
        tol = tolerance(rp, same)
        if tol is None:
            return ""
        if not value <= tol:  # NaN fails too
            failed.append(rp)
            return f"  EXCEEDS {tol:.0e}"
        return f"  (tolerance {tol:.0e})"

    for rp, v in sorted(report["tensors"].items()):
        print(f"{rp:40s} {v['n']:5d} tensors  worst rel {v['worst']:.2e} ({v['worst_name']})  median {v['median']:.2e}"
              + verdict(rp, v["worst"]))
    for rp, v in sorted(report["json"].items()):
        print(f"{rp:40s} {v['numbers']:6d} numbers  max |diff| {v['max_abs_diff']:.2e}  at {v['where']}"
              + verdict(rp, v["max_abs_diff"]))
    if "--json" in args:
        with open(args[args.index("--json") + 1], "w") as f:
            json.dump(report, f, indent=1)
    if failed:
        print(f"differences above tolerance: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
