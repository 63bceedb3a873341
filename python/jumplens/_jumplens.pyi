"""Type stubs of the extension module (see the docstrings of jumplens/__init__.py)."""

import os
import pathlib
from typing import Any, Dict, List, Literal, Optional, Tuple, Union, overload

import numpy as np
import numpy.typing as npt

_Path = Union[str, "os.PathLike[str]"]
_F32 = npt.NDArray[np.float32]
_I64 = npt.NDArray[np.int64]

__version__: str

_Dtype = Literal["auto", "f32", "bf16", "f16", "float32", "bfloat16", "float16"]

class Error(RuntimeError):
    """A jumplens error; the message is the CLI's one line."""

class Model:
    """A loaded model: a Hugging Face folder, a .gguf file or a hub id in the local cache."""

    def __init__(self, path: _Path, device: str = "cpu", dtype: _Dtype = "auto") -> None:
        """`dtype`: the compute dtype, as the CLI's --dtype ("auto" = f32 on the CPU, the
        checkpoint's float dtype on a GPU); arrays come back as float32 whatever it is."""
    @property
    def info(self) -> Dict[str, Any]:
        """arch, n_layers, d_model, n_heads, n_kv_heads, vocab_size, attention, has_lm_head,
        max_positions, n_params, block_params, path, format, storage, tokenizer, device."""
    @property
    def path(self) -> pathlib.Path: ...
    def tokenize(self, text: str) -> List[int]:
        """Token ids of `text`, with the tokenizer's special tokens."""
    def decode(self, ids: Union[int, List[int]]) -> str:
        """The text of token ids (special tokens dropped); one id gives its piece."""
    @overload
    def hidden_states(self, texts: str, mask_position: Optional[int] = None) -> Dict[str, Any]:
        """input_ids int64 [T], hidden_states float32 [L+1, T, d], logits float32 [T, V] or None."""
    @overload
    def hidden_states(self, texts: List[str], mask_position: Optional[int] = None) -> Dict[str, Any]:
        """input_ids [B, T], hidden_states [B, L+1, T, d], logits [B, T, V], mask bool [B, T],
        lengths [B]; right-padded with zeros, each text run alone."""
    @overload
    def run_with_cache(
        self, texts: str, names: List[str], mask_position: Optional[int] = None
    ) -> Tuple[_I64, Dict[str, _F32]]:
        """(input_ids, {tap name: float32 array without the batch dimension})."""
    @overload
    def run_with_cache(
        self, texts: List[str], names: List[str], mask_position: Optional[int] = None
    ) -> List[Tuple[_I64, Dict[str, _F32]]]: ...

class Lens:
    """One layer's lens: logits = readout(cast(states))."""

    @property
    def kind(self) -> str: ...
    @property
    def layer(self) -> int: ...
    def __call__(self, states: npt.ArrayLike) -> _F32:
        """states float32 [N, d] (or [d]) of this lens's layer -> logits [N, V] (or [V])."""

class Run:
    """A run folder made by `collect`."""

    def __init__(self, path: _Path, model: Union[Model, _Path, None] = None, device: str = "cpu") -> None: ...
    @property
    def path(self) -> pathlib.Path: ...
    @property
    def manifest(self) -> Dict[str, Any]: ...
    def activations(self, split: Literal["train", "val"]) -> Dict[str, npt.NDArray[Any]]:
        """hidden_states float32 [L+1, N, d], positions int64 [N], tokens int64, offsets int64 [N+1]."""
    @property
    def maps(self) -> Dict[Tuple[int, int], _F32]:
        """(l, l2) -> A [d, d] (out x in): h_l2 ≈ h_l @ A.T."""
    @property
    def maps_affine(self) -> Dict[Tuple[int, int], Tuple[_F32, _F32]]:
        """(l, l2) -> (A [d, d], b [d]): h_l2 ≈ h_l @ A.T + b."""
    def lens(self, kind: Literal["mat", "id", "affine"], layer: int) -> Lens: ...

def collect(
    model: Union[Model, _Path],
    corpus: _Path,
    out: _Path,
    train: int = 9000,
    val: int = 3000,
    seed: int = 0,
    positions: Union[int, Literal["all"], None] = None,
    text_field: str = "text",
    batch_tokens: int = 0,
    progress: bool = True,
    dtype: _Dtype = "auto",
    stats_only: bool = False,
    pairs: Literal["all", "to-final", "auto"] = "auto",
    shard: Optional[str] = None,
    part_sentences: int = 0,
) -> Run: ...
def merge(out: _Path, shards: List[_Path], partial: bool = False) -> Run: ...
def fit(
    run: Union[Run, _Path],
    pairs: Literal["all", "to-final"] = "all",
    intercept: bool = False,
    ridge: float = 0.0,
    precision: Literal["auto", "f32", "f64"] = "auto",
    device: str = "cpu",
    progress: bool = True,
) -> Dict[str, Any]: ...
def r2(run: Union[Run, _Path], device: str = "cpu") -> Dict[str, Any]: ...
def predict(
    run: Union[Run, _Path],
    model: Union[Model, _Path, None] = None,
    maps: Optional[_Path] = None,
    batch: int = 0,
    progress: bool = True,
) -> Dict[str, Any]: ...
def train_tuned_lens(
    run: Union[Run, _Path],
    steps: int = 250,
    tokens_per_step: int = 0,
    lr: float = 1.0,
    init: Literal["identity", "mat"] = "identity",
    seed: int = 0,
    seq_len: int = 128,
    model: Union[Model, _Path, None] = None,
    progress: bool = True,
    ids_out: Optional[_Path] = None,
) -> Dict[str, Any]:
    """`jumplens tuned-lens`: trains RUN/tuned/ (init="mat": RUN/tuned-mat/); returns the report.
    ids_out: write every step's token ids there first (as `--ids-out`)."""
    ...

def early_exit(
    run: Union[Run, _Path],
    rule: Literal["paper", "calm"] = "paper",
    measure: Literal["top1-top2", "max-prob", "cosine"] = "top1-top2",
) -> Dict[str, Any]: ...
def report(
    model: Optional[_Path] = None,
    corpus: Optional[_Path] = None,
    out: Optional[_Path] = None,
    quick: bool = False,
    train: Optional[int] = None,
    val: Optional[int] = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> pathlib.Path: ...
def default_assets(quiet: bool = False) -> Dict[str, pathlib.Path]: ...
