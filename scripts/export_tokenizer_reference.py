#!/usr/bin/env python3
"""Token ids that transformers' own GGUF loader gives for the GGUF assets.

    AutoTokenizer.from_pretrained(folder, gguf_file=name)

is the reference for src/tokenizer/gguf.rs.  Writes
tests/fixtures/real/gguf_tokenizer_ids.json:
  {"transformers": version, "models": {asset: [{"text", "ids", "decoded"}...]}}
for the sentences of tests/fixtures/real/sentences.txt (a literal "\\n" in a
line stands for a newline) and a few extra strings (special tokens, emoji,
tabs, empty string).

SmolLM2 (`tokenizer.ggml.pre = "smollm"`): transformers' GGUF loader ignores
`pre` and uses the plain GPT-2 byte-level split, while the model's own
tokenizer.json and llama.cpp's "smollm" pre-tokenizer first split every digit
on its own.  The two differ only where whitespace runs meet digits; for such a
row "ids_model_tokenizer" holds the ids with the model's own pre-tokenizer
(Digits(individual_digits=True) + ByteLevel), which is what
src/tokenizer/gguf.rs reproduces.  Needs transformers + gguf + sentencepiece; assets from
scripts/fetch_assets.sh.
"""
import json
import os
import sys
from pathlib import Path

import transformers
from tokenizers import pre_tokenizers
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
        own = None
        if name == "smollm2":
            own = AutoTokenizer.from_pretrained(str(ASSETS / folder), gguf_file=fn)
            own.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
                ]
            )
        rows = []
        for t in texts:
            ids = tok(t)["input_ids"]
            row = {"text": t, "ids": ids, "decoded": tok.decode(ids)}
            if own is not None:
                own_ids = own(t)["input_ids"]
                if own_ids != ids:
                    row["ids_model_tokenizer"] = own_ids
            rows.append(row)
        models[name] = rows
        print(name, type(tok).__name__, "ok", file=sys.stderr)
    out = {"transformers": transformers.__version__, "num_sentences": len(texts) - len(EXTRA), "models": models}
    # one row per line: readable diffs, small file
    lines = ['{"transformers": %s, "num_sentences": %d, "models": {' % (json.dumps(out["transformers"]), out["num_sentences"])]
    for k, (name, rows) in enumerate(models.items()):
        lines.append(" %s: [" % json.dumps(name))
        lines.append(",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in rows))
        lines.append(" ]" + ("," if k + 1 < len(models) else ""))
    lines.append("}}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == out
    (OUT / "gguf_tokenizer_ids.json").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
