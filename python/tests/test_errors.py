"""Bad input raises jumplens.Error (a RuntimeError) with the CLI's one-line message; Ctrl-C
during a collection raises KeyboardInterrupt and leaves it resumable."""

import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

import jumplens
from conftest import with_tokenizer, word_corpus


def cli_error(cli, *args) -> str:
    p = subprocess.run([str(cli), *map(str, args)], capture_output=True, text=True)
    assert p.returncode != 0
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line[len("error: "):]


def test_error_is_a_runtime_error_of_one_line():
    assert issubclass(jumplens.Error, RuntimeError)
    with pytest.raises(jumplens.Error) as e:
        jumplens._jumplens._raise_library_error("first line")
    assert str(e.value) == "first line"


def test_missing_model_is_the_cli_message(tmp_path, cli):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(jumplens.Error) as e:
        jumplens.Model(missing)
    assert str(e.value) == cli_error(cli, "inspect", missing)
    assert "nope.gguf" in str(e.value) and "\n" not in str(e.value)


def test_corrupt_model_is_the_cli_message(tmp_path, cli):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(jumplens.Error) as e:
        jumplens.Model(bad)
    assert str(e.value) == cli_error(cli, "inspect", bad)
    assert "bad.gguf" in str(e.value) and "\n" not in str(e.value)
    folder = with_tokenizer("llama", tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(jumplens.Error) as e:
        jumplens.Model(folder)
    assert str(e.value) == cli_error(cli, "inspect", folder)


def test_wrong_shapes_and_options(tmp_path):
    m = jumplens.Model(with_tokenizer("llama", tmp_path / "m"))
    run = jumplens.collect(m, word_corpus(tmp_path / "c.txt", 200), tmp_path / "run", train=80, val=20, progress=False)
    jumplens.fit(run, pairs="to-final", progress=False)
    lens = run.lens("mat", 1)
    with pytest.raises(jumplens.Error, match=r"^states: expected shape \[N, 64\] .*got \[3, 5\]$"):
        lens(np.zeros((3, 5), dtype=np.float32))
    with pytest.raises(jumplens.Error, match=r"got \[2, 3, 64\]"):
        lens(np.zeros((2, 3, 64), dtype=np.float32))
    # float64 input is converted, not refused.
    assert lens(np.zeros((2, 64))).shape == (2, 128)
    with pytest.raises(jumplens.Error, match="^lens 'tuned'"):
        run.lens("tuned", 1)
    with pytest.raises(jumplens.Error, match="^layer 9: the model has layers 0..=2$"):
        run.lens("mat", 9)
    with pytest.raises(jumplens.Error, match="maps_affine.safetensors"):
        run.lens("affine", 0)
    with pytest.raises(jumplens.Error, match="^dtype 'int8': expected"):
        jumplens.Model(tmp_path / "m", dtype="int8")
    with pytest.raises(jumplens.Error, match="no tap 'blocks.7.hook_resid_pre'"):
        m.run_with_cache("w3 w4", names=["blocks.7.hook_resid_pre"])
    with pytest.raises(jumplens.Error, match="^pairs 'some'"):
        jumplens.fit(run, pairs="some")
    with pytest.raises(jumplens.Error, match="^split 'test'"):
        run.activations("test")


def test_ctrl_c_during_collect_raises_keyboard_interrupt_and_resumes(tmp_path):
    m = jumplens.Model(with_tokenizer("llama", tmp_path / "m"))
    corpus = word_corpus(tmp_path / "c.txt", 25000)
    out = tmp_path / "run"
    kw = dict(train=20000, val=2000, seed=0, progress=False)
    parts_dir = out / "activations" / "parts"
    done = threading.Event()

    def interrupt_after_the_first_part():
        # SIGINT as Ctrl-C sends it, once a part is on disk (so there is something to resume).
        while not done.is_set():
            if parts_dir.is_dir() and any(parts_dir.glob("train.*.safetensors")):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=interrupt_after_the_first_part)
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            jumplens.collect(m, corpus, out, **kw)
    finally:
        done.set()
        watcher.join()
    parts = sorted((out / "activations" / "parts").glob("train.*.safetensors"))
    assert parts, "no finished part was kept"
    assert not (out / "activations" / "train.safetensors").exists()
    # The same call resumes (the kept parts are not recomputed) and finishes.
    run = jumplens.collect(m, corpus, out, **kw)
    assert run.manifest["counts"]["train"]["examples"] == 20000
