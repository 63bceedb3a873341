#!/usr/bin/env python3
"""Time the paper's fitting path on a file of hidden states: one scikit-learn
`LinearRegression(fit_intercept=False)` per pair (l, l'), as the authors' code does.

Usage:
    bench_fit_sklearn.py STATES.safetensors [--key train] [--pairs all|final]
                         [--max-pairs K] [--float64] [--val-key val] [--out RESULT.json]
                         [--save-coef COEF.safetensors --save-pairs "0,30;15,30"]

STATES.safetensors holds `train` ([S, N, d]) and optionally `val` ([S, Nval, d]). If the file
has a single tensor it is used whatever its name.

Precision: by default the states are passed as stored. scikit-learn keeps float32 input as
float32 (`LinearRegression` validates with dtype="numeric" and `scipy.linalg.lstsq` then runs
LAPACK's single-precision sgelsd), which is what the paper's code did with float32 states from
PyTorch. On ill-conditioned states that is far from the exact least-squares solution (on the
synthetic SmolLM2-sized benchmark: coefficients off by ~3% of their largest value). With
--float64 the states are cast to float64 first (the exact reference; slower).

stdout: one line, the wall-clock seconds of the fits alone (the sum over pairs of the
`LinearRegression.fit` calls; reading the file, the optional r^2 and outputs are not timed). With --max-pairs only the first K pairs are fitted and
the seconds are those of the K fits; the JSON then also gives the linear extrapolation to all.
Everything else goes to stderr and to --out (JSON: seconds, pairs, shapes, versions, and with
`val` the validation r^2 of every fitted pair, `r2_mat["l,l'"]`, and of the identity).

Threads: BLAS/LAPACK threads follow the usual environment variables (OMP_NUM_THREADS, ...);
the default uses every core.
"""

import argparse
import json
import sys
import time

import numpy as np
import scipy
import sklearn
from safetensors.numpy import load_file, save_file
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score


def pairs_for(kind, n_states):
    if kind == "all":
        return [(l, t) for l in range(n_states) for t in range(l + 1, n_states)]
    if kind == "final":
        return [(l, n_states - 1) for l in range(n_states - 1)]
    raise SystemExit(f"--pairs must be all or final, not {kind!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("states")
    ap.add_argument("--key", default="train")
    ap.add_argument("--val-key", default="val")
    ap.add_argument("--pairs", default="all")
    ap.add_argument("--max-pairs", type=int, default=0)
    ap.add_argument("--float64", action="store_true", help="cast the states to float64 first")
    ap.add_argument("--out")
    ap.add_argument("--save-coef")
    ap.add_argument("--save-pairs", default="")
    args = ap.parse_args()

    tensors = load_file(args.states)
    if args.key in tensors:
        train = tensors[args.key]
    elif len(tensors) == 1:
        train = next(iter(tensors.values()))
    else:
        raise SystemExit(f"{args.states}: no tensor {args.key!r} (has {sorted(tensors)})")
    if train.ndim != 3:
        raise SystemExit(f"{args.states}: {args.key} must be [S, N, d], got {train.shape}")
    val = tensors.get(args.val_key)
    if args.float64:
        train = train.astype(np.float64)
    n_states, n, d = train.shape
    pairs = pairs_for(args.pairs, n_states)
    n_all = len(pairs)
    if args.max_pairs > 0:
        pairs = pairs[: args.max_pairs]
    save_pairs = set()
    for item in filter(None, args.save_pairs.split(";")):
        a, b = item.split(",")
        save_pairs.add((int(a), int(b)))

    print(
        f"sklearn {sklearn.__version__}, scipy {scipy.__version__}, numpy {np.__version__}: "
        f"{len(pairs)} of {n_all} pairs, S={n_states} N={n} d={d}, {train.dtype}",
        file=sys.stderr,
    )
    coefs = {}
    r2_mat, r2_id = {}, {}
    seconds = 0.0
    for l, t in pairs:
        t0 = time.perf_counter()
        reg = LinearRegression(fit_intercept=False).fit(train[l], train[t])
        seconds += time.perf_counter() - t0
        # Not timed: validation r^2 (in float64) and saved coefficients.
        if val is not None:
            xv = val[l].astype(np.float64)
            yv = val[t].astype(np.float64)
            r2_mat[f"{l},{t}"] = float(r2_score(yv, xv @ reg.coef_.astype(np.float64).T))
            r2_id[f"{l},{t}"] = float(r2_score(yv, xv))
        if (l, t) in save_pairs:
            coefs[f"a.{l}.{t}"] = reg.coef_.copy()
    print(f"{seconds:.3f}")
    sys.stdout.flush()
    print(f"fit: {seconds:.3f} s ({seconds / len(pairs) * 1e3:.1f} ms per pair)", file=sys.stderr)

    result = {
        "seconds": seconds,
        "pairs": len(pairs),
        "pairs_total": n_all,
        "seconds_extrapolated_all": seconds / len(pairs) * n_all,
        "shape": [int(n_states), int(n), int(d)],
        "dtype": str(train.dtype),
        "versions": {"sklearn": sklearn.__version__, "scipy": scipy.__version__, "numpy": np.__version__},
    }
    if val is not None:
        result["r2_mat"] = r2_mat
        result["r2_id"] = r2_id
    if args.save_coef and coefs:
        save_file(coefs, args.save_coef)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
