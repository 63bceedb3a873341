#!/usr/bin/env python3
"""Token ids that transformers' own GGUF loader gives for the GGUF assets.

    AutoTokenizer.from_pretrained(folder, gguf_file=name)

is the reference for src/model/gguf_tokenizer.rs.  Writes
tests/fixtures/real/gguf_tokenizer_ids.json:
  {"transformers": version, "models": {asset: [{"text", "ids", "decoded"}...]}}
for the sentences of tests/fixtures/real/sentences.txt (a literal "\\n" in a
line stands for a newline) and a few extra strings (special tokens, emoji,
tabs, empty string).  Needs transformers + gguf + sentencepiece; assets from
scripts/fetch_assets.sh.
"""
import json
import os
import sys
from pathlib import Path

import transformers
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("JUMPLENS_ASSETS", REPO / "assets"))
OUT = REPO / "tests/fixtures/real"

GGUF = {
    "smollm2": ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3": ("gemma3", "gemma-3-270m-q4_k_m.gguf"),
}
EXTRA = [
    "",
    "  ",
    "<bos>hello<eos>",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "Math: ℕ ≥ 0, emoji 😀, 日本語テキスト.",
    "tab\there\tand\n\n\nthree newlines",
    "xxxxx   1234567890 ¡¿",
    "Ünïcödé ﬁ ligature and non-breaking\u00a0space",
]


def sentences():
    lines = (OUT / "sentences.txt").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [l.replace("\\n", "\n") for l in lines]


def main():
    texts = sentences() + EXTRA
    models = {}
    for name, (folder, fn) in GGUF.items():
        tok = AutoTokenizer.from_pretrained(str(ASSETS / folder), gguf_file=fn)
        rows = []
        for t in texts:
            ids = tok(t)["input_ids"]
            rows.append({"text": t, "ids": ids, "decoded": tok.decode(ids)})
        models[name] = rows
        print(name, type(tok).__name__, "ok", file=sys.stderr)
    out = {"transformers": transformers.__version__, "num_sentences": len(texts) - len(EXTRA), "models": models}
    (OUT / "gguf_tokenizer_ids.json").write_text(json.dumps(out, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
