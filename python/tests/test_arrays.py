"""Arrays from the bindings against the CLI's files (bit-identical) and against transformers'
values in tests/fixtures/tiny/*/expected.safetensors (within 1e-4 * max(1, max |reference|),
over real tokens, the tolerance of tests/tiny_models.rs)."""

import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

import jumplens
from conftest import TINY, with_tokenizer

FIXTURES = [
    "llama",
    "llama_tied",
    "qwen2",
    "mistral",
    "gemma3",
    "gpt2",
    "bert_mlm",
    "bert",
    "mistral_sliding",
    "qwen2_sliding",
    "llama_rope_linear",
    "llama_rope_llama3",
]


def test_hidden_states_and_taps_equal_the_cli_bit_for_bit(tmp_path, cli):
    model = with_tokenizer("gpt2", tmp_path / "m")
    text = "w5 w17 w3 w99 w42"
    taps = ["blocks.0.hook_resid_mid", "blocks.1.attn.hook_pattern", "blocks.1.mlp.hook_post"]
    out = tmp_path / "h.safetensors"
    args = [str(cli), "hidden-states", str(model), "--text", text, "--out", str(out)]
    for t in taps:
        args += ["--tap", t]
    subprocess.run(args, check=True, capture_output=True)
    ref = load_file(str(out))

    m = jumplens.Model(model)
    got = m.hidden_states(text)
    assert got["hidden_states"].dtype == np.float32
    assert got["hidden_states"].shape == (3, 5, 32)
    np.testing.assert_array_equal(got["input_ids"], ref["input_ids"])
    assert np.array_equal(got["hidden_states"], ref["hidden_states"])
    assert np.array_equal(got["logits"], ref["logits"])
    ids, cache = m.run_with_cache(text, names=taps)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    for t in taps:
        assert cache[t].shape == ref[t].shape, t
        assert np.array_equal(cache[t], ref[t]), t
    assert m.tokenize(text) == [5, 17, 3, 99, 42]


@pytest.mark.parametrize("name", FIXTURES)
def test_hidden_states_match_transformers(tmp_path, name):
    expected = load_file(str(TINY / name / "expected.safetensors"))
    m = jumplens.Model(with_tokenizer(name, tmp_path / name))
    info = m.info
    assert info["n_layers"] + 1 == expected["hidden_states"].shape[0]
    assert info["d_model"] == expected["hidden_states"].shape[-1]
    lengths = expected["attention_mask"].sum(axis=1)
    texts = [" ".join(f"w{t}" for t in row[:n]) for row, n in zip(expected["input_ids"], lengths)]
    batch = m.hidden_states(texts)
    np.testing.assert_array_equal(batch["mask"], expected["attention_mask"].astype(bool))
    for i, (text, n) in enumerate(zip(texts, lengths)):
        one = m.hidden_states(text)
        np.testing.assert_array_equal(one["input_ids"], expected["input_ids"][i, :n])
        ref = expected["hidden_states"][:, i, :n]
        tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
        assert np.abs(one["hidden_states"] - ref).max() <= tol, (name, i)
        if "logits" in expected:
            ref_logits = expected["logits"][i, :n]
            tol = 1e-4 * max(1.0, float(np.abs(ref_logits).max()))
            assert np.abs(one["logits"] - ref_logits).max() <= tol, (name, i)
        else:
            assert one["logits"] is None
        # The padded list holds the same values as the single text, zeros after it.
        assert np.array_equal(batch["hidden_states"][i, :, :n], one["hidden_states"])
        assert not batch["hidden_states"][i, :, n:].any()


def test_arrays_are_writeable_and_contiguous_for_torch_from_numpy(tmp_path):
    """What torch.from_numpy needs to share (not copy) the buffer: C-contiguous, writeable,
    aligned, native float32; the array owns the library's buffer (`base` holds it)."""
    m = jumplens.Model(with_tokenizer("llama", tmp_path / "m"))
    out = m.hidden_states("w4 w5 w6")
    for key in ["hidden_states", "logits"]:
        a = out[key]
        assert a.dtype == np.dtype("float32") and a.dtype.isnative
        assert a.flags["C_CONTIGUOUS"] and a.flags["WRITEABLE"] and a.flags["ALIGNED"], key


def test_bf16_equals_the_cli_with_dtype_bf16_bit_for_bit(tmp_path, cli):
    """dtype= reaches the library as the CLI's --dtype: bf16 states and logits are the CLI's,
    bit for bit, and differ from f32's (the dtype took effect)."""
    model = with_tokenizer("llama", tmp_path / "m")
    text = "w5 w17 w3 w99 w42"
    out = tmp_path / "h.safetensors"
    subprocess.run(
        [str(cli), "hidden-states", str(model), "--text", text, "--out", str(out), "--dtype", "bf16"],
        check=True,
        capture_output=True,
    )
    ref = load_file(str(out))
    m = jumplens.Model(model, dtype="bf16")
    assert m.info["dtype"] == "bf16"
    got = m.hidden_states(text)
    assert got["hidden_states"].dtype == np.float32
    assert np.array_equal(got["hidden_states"], ref["hidden_states"])
    assert np.array_equal(got["logits"], ref["logits"])
    f32 = jumplens.Model(model, dtype="f32").hidden_states(text)
    assert not np.array_equal(f32["hidden_states"], got["hidden_states"])
    # torch's name for it loads the same.
    assert np.array_equal(jumplens.Model(model, dtype="bfloat16").hidden_states(text)["logits"], got["logits"])


def test_collect_with_dtype_equals_the_cli_collect(tmp_path, cli):
    """collect(path, ..., dtype="bf16") writes the activations `jumplens collect --dtype bf16`
    writes (same bytes) and records the dtype in the manifest."""
    from conftest import word_corpus

    model = with_tokenizer("llama", tmp_path / "m")
    corpus = word_corpus(tmp_path / "c.txt", 200)
    subprocess.run(
        [str(cli), "collect", str(model), "--corpus", str(corpus), "--out", str(tmp_path / "cli"),
         "--train", "40", "--val", "20", "--dtype", "bf16", "--quiet"],
        check=True,
        capture_output=True,
    )
    run = jumplens.collect(model, corpus, tmp_path / "py", train=40, val=20, dtype="bf16", progress=False)
    assert run.manifest["model"]["dtype"] == "bf16"
    for split in ["train", "val"]:
        a = (tmp_path / "cli" / "activations" / f"{split}.safetensors").read_bytes()
        b = (tmp_path / "py" / "activations" / f"{split}.safetensors").read_bytes()
        assert a == b, split
