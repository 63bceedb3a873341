"""Writes tests/fixtures/paper_maps/: matrices in the form of the paper's published i_j.pickle
files (each one torch.save'd float32 tensor A [d, d], the jump from state i to state j), for a
model of width 4 with 2 blocks, and the bad files the importer must refuse.

Run with the reference environment: /work/refenv/bin/python scripts/export_paper_maps_fixture.py
"""

import os
import pickle

import torch
from safetensors.torch import save_file

root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "paper_maps")
good = os.path.join(root, "good")
os.makedirs(good, exist_ok=True)
g = torch.Generator().manual_seed(0)
for i, j in [(0, 1), (0, 2), (1, 2)]:
    torch.save(torch.randn(4, 4, generator=g), os.path.join(good, f"{i}_{j}.pickle"))
# The values as the reference reads them back (torch.load), for the test to compare with.
save_file(
    {f"{i}_{j}": torch.load(os.path.join(good, f"{i}_{j}.pickle"), weights_only=True) for i, j in [(0, 1), (0, 2), (1, 2)]},
    os.path.join(root, "expected.safetensors"),
)
bad = {
    "shape": lambda p: torch.save(torch.zeros(4, 3), p),
    "layer": lambda p: torch.save(torch.zeros(4, 4), p),
    "plain": lambda p: open(p, "wb").write(pickle.dumps(torch.zeros(4, 4))),
    "dict": lambda p: torch.save({"w": torch.zeros(4, 4)}, p),
    "nan": lambda p: torch.save(torch.full((4, 4), float("nan")), p),
}
names = {"shape": "0_1.pickle", "layer": "1_3.pickle", "plain": "0_1.pickle", "dict": "0_1.pickle", "nan": "0_2.pickle"}
for case, write in bad.items():
    d = os.path.join(root, f"bad_{case}")
    os.makedirs(d, exist_ok=True)
    write(os.path.join(d, names[case]))
print("wrote", root)
