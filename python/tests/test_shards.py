"""Streaming statistics, shards and merge through the bindings (issue 17): two stats-only shards
merged give the maps of the single stats-only run (float64 sums added in another order, maps
stored in float32: within one float32 rounding step) and the same validation activations."""

import numpy as np
import pytest
from safetensors.numpy import load_file

import jumplens
from conftest import with_tokenizer, word_corpus


def test_two_shards_merge_to_the_single_run(tmp_path):
    m = jumplens.Model(with_tokenizer("llama", tmp_path / "m"))
    corpus = word_corpus(tmp_path / "c.txt", 400)
    kw = dict(train=60, val=20, seed=3, progress=False, stats_only=True, pairs="all", part_sentences=10)
    single = jumplens.collect(m, corpus, tmp_path / "single", **kw)
    shards = [jumplens.collect(m, corpus, tmp_path / f"s{i}", shard=f"{i}/2", **kw) for i in range(2)]
    merged = jumplens.merge(tmp_path / "merged", [s.path for s in shards])
    assert not (merged.path / "activations" / "train.safetensors").exists()
    a = load_file(str(single.path / "activations" / "val.safetensors"))
    b = load_file(str(merged.path / "activations" / "val.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    jumplens.fit(single, progress=False)
    jumplens.fit(merged, progress=False)
    for (l, l2), x in single.maps.items():
        y = merged.maps[(l, l2)]
        scale = np.abs(x).max()
        assert np.abs(x - y).max() <= 1e-9 * scale + np.spacing(np.float32(scale)) * 4, (l, l2)


def test_merge_refuses_a_missing_shard(tmp_path):
    m = jumplens.Model(with_tokenizer("llama", tmp_path / "m"))
    corpus = word_corpus(tmp_path / "c.txt", 400)
    kw = dict(train=60, val=20, seed=3, progress=False, stats_only=True, part_sentences=10)
    s0 = jumplens.collect(m, corpus, tmp_path / "s0", shard="0/2", **kw)
    with pytest.raises(jumplens.Error, match="shard"):
        jumplens.merge(tmp_path / "merged", [s0.path])
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())
