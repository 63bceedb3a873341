"""train_tuned_lens through the bindings on a tiny model: the same lens, bit for bit, as
`jumplens tuned-lens` on a copy of the same run (both are the one library call), predict then
scores it as `tuned` (and `mat+kl` after init="mat"), and bad options raise jumplens.Error."""

import shutil
import subprocess

import pytest

import jumplens
from conftest import with_tokenizer, word_corpus


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tuned")
    m = jumplens.Model(with_tokenizer("llama", tmp / "m"))
    corpus = word_corpus(tmp / "c.txt", 400)
    run = jumplens.collect(m, corpus, tmp / "run", train=200, val=60, seed=0, progress=False)
    jumplens.fit(run, pairs="to-final", progress=False)
    return tmp, m, run


def test_training_equals_the_cli_and_predict_scores_it(tiny_run, cli):
    tmp, m, run = tiny_run
    copy = tmp / "run_cli"
    shutil.copytree(run.path, copy)
    args = dict(steps=3, tokens_per_step=16, seq_len=8, seed=1)
    r = jumplens.train_tuned_lens(run, progress=False, ids_out=tmp / "ids_py.safetensors", **args)
    assert len(r["losses"]) == 3 and r["tokens_per_step"] == 16
    assert all(x > 0 for x in r["losses"])
    subprocess.run(
        [str(cli), "tuned-lens", str(copy), "--steps", "3", "--tokens-per-step", "16", "--seq-len", "8",
         "--seed", "1", "--ids-out", str(tmp / "ids_cli.safetensors"), "-q"],
        check=True,
        capture_output=True,
    )
    for f in ["params.pt", "lens.safetensors", "config.json"]:
        assert (run.path / "tuned" / f).read_bytes() == (copy / "tuned" / f).read_bytes(), f
    # The token ids of every step, as the CLI writes them (3 steps x 2 sequences of 8).
    ids_py = (tmp / "ids_py.safetensors").read_bytes()
    assert len(ids_py) > 3 * 2 * 8 * 8 and ids_py == (tmp / "ids_cli.safetensors").read_bytes()
    r_mat = jumplens.train_tuned_lens(run, init="mat", progress=False, **args)
    assert r_mat["out"].endswith("tuned-mat")
    p = jumplens.predict(run, progress=False)
    assert {"mat", "id", "tuned", "mat+kl"} <= set(p["lenses"])
    # Started from mat and trained 3 steps: mat+kl stays near mat, unlike the logit-lens start.
    layers = p["layers"]
    assert len(p["lenses"]["tuned"]["kl"]) == layers + 1


def test_bad_options_raise(tiny_run):
    _, _, run = tiny_run
    with pytest.raises(jumplens.Error, match="init 'affine'"):
        jumplens.train_tuned_lens(run, init="affine", progress=False)
    with pytest.raises(jumplens.Error, match="--steps must be at least 1"):
        jumplens.train_tuned_lens(run, steps=0, progress=False)
