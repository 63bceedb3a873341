"""Shared fixtures of the jumplens Python tests: tiny models with a word-level tokenizer
(w0..w{n-1}, as tests/cli.rs builds them), corpora of such words, and the CLI binary.

A missing CLI binary or asset skips its tests, unless JUMPLENS_REQUIRE_ASSETS=1 (CI), where it
fails.
"""

import os
import random
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny"


def require(what: str):
    """Skip (or fail under JUMPLENS_REQUIRE_ASSETS=1) because `what` is missing."""
    if os.environ.get("JUMPLENS_REQUIRE_ASSETS") == "1":
        pytest.fail(f"missing {what} (JUMPLENS_REQUIRE_ASSETS=1)")
    pytest.skip(f"missing {what}")


@pytest.fixture(scope="session")
def cli() -> Path:
    """The jumplens CLI: $JUMPLENS_BIN, else the release build of the repository."""
    candidates = [os.environ.get("JUMPLENS_BIN")]
    target = os.environ.get("CARGO_TARGET_DIR")
    if target:
        candidates.append(str(Path(target) / "release" / "jumplens"))
    candidates.append(str(REPO / "target" / "release" / "jumplens"))
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    require("the jumplens CLI (cargo build --release, or set JUMPLENS_BIN)")


def with_tokenizer(fixture: str, to: Path, n: int = 128) -> Path:
    """A copy of tests/fixtures/tiny/<fixture> with a word-level tokenizer: 'w7' is token 7."""
    to.mkdir(parents=True, exist_ok=True)
    for p in (TINY / fixture).iterdir():
        shutil.copy(p, to / p.name)
    vocab = ",".join(f'"w{i}": {i}' for i in range(n))
    (to / "tokenizer.json").write_text(
        '{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,'
        '"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,'
        f'"model":{{"type":"WordLevel","vocab":{{{vocab}}},"unk_token":"w0"}}}}'
    )
    return to


def word_corpus(path: Path, lines: int, seed: int = 0) -> Path:
    """`lines` random sentences of 4..12 words w3..w127 (distinct with high probability)."""
    rng = random.Random(seed)
    text = "\n".join(
        " ".join(f"w{rng.randrange(3, 128)}" for _ in range(rng.randrange(4, 13))) for _ in range(lines)
    )
    path.write_text(text + "\n")
    return path
