"""The pipeline through the bindings on a tiny model: collect, fit, r2, predict, early exit;
Run's arrays equal the files the library wrote (bit for bit), and Run.lens reproduces
predict.json's Precision@1 exactly."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import jumplens
from conftest import with_tokenizer, word_corpus


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    m = jumplens.Model(with_tokenizer("llama", tmp / "m"))
    corpus = word_corpus(tmp / "c.txt", 600)
    run = jumplens.collect(m, corpus, tmp / "run", train=300, val=120, seed=0, progress=False)
    return m, run


def test_stages_return_the_json_files(tiny_run):
    m, run = tiny_run
    s = jumplens.fit(run, pairs="all", progress=False)
    assert s["pairs"] == 3  # 0->1, 0->2, 1->2 for two blocks
    r = jumplens.r2(run)
    assert r == json.loads((run.path / "r2.json").read_text())
    p = jumplens.predict(run, progress=False)
    assert p == json.loads((run.path / "predict.json").read_text())
    e = jumplens.early_exit(run)
    assert e == json.loads((run.path / "early_exit.json").read_text())
    assert run.manifest["counts"]["val"]["examples"] == 120


def test_activations_and_maps_equal_the_files(tiny_run):
    m, run = tiny_run
    jumplens.fit(run, pairs="all", progress=False)
    for split in ["train", "val"]:
        act = run.activations(split)
        ref = load_file(str(run.path / "activations" / f"{split}.safetensors"))
        for key in ["hidden_states", "positions", "tokens", "offsets"]:
            assert act[key].shape == ref[key].shape, key
            assert np.array_equal(act[key], ref[key]), key
    ref = load_file(str(run.path / "maps.safetensors"))
    maps = run.maps
    assert sorted(maps) == [(0, 1), (0, 2), (1, 2)]
    for (l, l2), a in maps.items():
        assert a.shape == (64, 64)
        assert np.array_equal(a, ref[f"mat.{l}.{l2}"])


def test_lens_reproduces_predict_precision_at_1(tiny_run):
    m, run = tiny_run
    jumplens.fit(run, pairs="to-final", progress=False)
    report = jumplens.predict(run, progress=False)
    h = run.activations("val")["hidden_states"]
    last = m.info["n_layers"]
    model_top1 = run.lens("id", last)(h[last]).argmax(axis=1)
    for kind in ["mat", "id"]:
        for layer in range(last + 1):
            logits = run.lens(kind, layer)(h[layer])
            assert logits.shape == (h.shape[1], m.info["vocab_size"])
            p1 = float(np.mean(logits.argmax(axis=1) == model_top1))
            assert p1 == report["lenses"][kind]["p@1"][layer], (kind, layer)
    # mat = final norm + unembedding after h @ A.T: the same as the id lens on the mapped states.
    a = run.maps[(0, last)]
    mapped = run.lens("id", 0)(h[0] @ a.T)
    np.testing.assert_allclose(run.lens("mat", 0)(h[0]), mapped, rtol=1e-4, atol=1e-4)
    # One state [d] gives one row of logits [V].
    assert np.array_equal(run.lens("mat", 1)(h[1][3]), run.lens("mat", 1)(h[1][3:4])[0])


def test_affine_lens_and_a_reopened_run(tiny_run):
    m, run = tiny_run
    jumplens.fit(run, pairs="to-final", intercept=True, progress=False)
    a, b = run.maps_affine[(1, 2)]
    again = jumplens.Run(run.path)  # the model comes from the manifest
    h = again.activations("val")["hidden_states"]
    got = again.lens("affine", 1)(h[1])
    want = again.lens("id", 0)(h[1] @ a.T + b)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
