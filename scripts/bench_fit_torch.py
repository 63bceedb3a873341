"""PyTorch reference for the GPU all-pairs fit (scripts/device_bench.sh; a benchmark, not a test).

  python3 scripts/bench_fit_torch.py STATES N D [cuda|cpu] [all|to-final]

Synthetic states of the recipe jumplens uses (`jumplens bench fit`), made with torch's random
numbers, then every pair l < l' fitted by least squares the direct way a PyTorch user would
write it on a GPU: float64 normal equations, `G = X_l^T X_l` factorised once per source layer
(Cholesky) and `A^T = G^-1 X_l^T X_l'` per pair. Prints JSON {seconds, tflops, ...}.
"""
import json
import sys
import time

import torch


def synthetic(s, n, d, device):
    g = torch.Generator(device=device).manual_seed(0)
    f = max(d // 8, 1)
    z = torch.randn(n, f, device=device, generator=g)
    b = torch.randn(f, d, device=device, generator=g) * (2.0 / f**0.5)
    r = z @ b + 0.1 * torch.randn(n, d, device=device, generator=g)
    mask = torch.zeros(d, device=device)
    for k in (7, 63, 300, 511):
        mask[k % d] = 1.0
    out = []
    for i in range(s):
        if i > 0:
            w = torch.randn(d, d, device=device, generator=g) * (1.5 / d**0.5)
            r = r + 0.5 * torch.tanh(r @ w) + 0.05 * torch.randn(n, d, device=device, generator=g)
        out.append(r + mask * (1000.0 + 199.0 * r))
    return torch.stack(out)  # [S, N, d]


def fit_all_pairs(h, to_final=False):
    s, n, d = h.shape
    maps = {}
    if to_final:
        # Each state to float64 once, the last one kept (the 8B shape's [33, 1e5, 4096] in float64
        # alone would be 108 GB).
        y = h[s - 1].double()
        for l in range(s - 1):
            x = h[l].double()
            chol = torch.linalg.cholesky(x.T @ x)
            maps[(l, s - 1)] = torch.cholesky_solve(x.T @ y, chol).T.float()
        return maps
    h = h.double()  # [S, N, d] float64
    for l in range(s - 1):
        x = h[l]
        chol = torch.linalg.cholesky(x.T @ x)
        for t in range(l + 1, s):
            maps[(l, t)] = torch.cholesky_solve(x.T @ h[t], chol).T.float()  # A = (G^-1 X_l^T X_t)^T
    return maps


def main():
    s, n, d = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    device = sys.argv[4] if len(sys.argv) > 4 else "cuda"
    to_final = len(sys.argv) > 5 and sys.argv[5] == "to-final"
    fit_all_pairs(synthetic(3, 512, min(d, 64), device))  # warm-up: libraries, handles
    h = synthetic(s, n, d, device)
    torch.cuda.synchronize() if device == "cuda" else None
    t0 = time.perf_counter()
    maps = fit_all_pairs(h, to_final)
    torch.cuda.synchronize() if device == "cuda" else None
    sec = time.perf_counter() - t0
    # As jumplens counts model flops: d^2 N per source's Gram block (symmetric), 2 d^2 N per
    # pair's cross block ((S^2 - 1) d^2 N for all pairs).
    flops = d * d * n * ((s - 1) + 2 * len(maps))
    print(json.dumps({"what": "all-pairs fit (PyTorch, float64 normal equations)", "states": s, "n": n, "d": d,
                      "pairs": len(maps), "seconds": sec, "tflops": flops / sec / 1e12, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
