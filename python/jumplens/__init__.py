"""jumplens: linear shortcuts through transformer layers ("Jump to Conclusions").

A thin Python layer over the Rust library the ``jumplens`` CLI uses::

    import jumplens
    m = jumplens.Model("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    out = m.hidden_states("The capital of France is")      # numpy, [L+1, T, d]
    run = jumplens.collect(m, "corpus.txt", "runs/demo", train=2000, val=500)
    jumplens.fit(run, pairs="to-final")
    logits = run.lens("mat", 10)(out["hidden_states"][10])  # [T, V]

Arrays are numpy arrays that own the buffer the library produced (no copy at the boundary);
``torch.from_numpy(a)`` shares it with torch. Long calls release the GIL, draw progress on
stderr (in a terminal) and stop on Ctrl-C with ``KeyboardInterrupt`` (a collection resumes
when called again). Library errors raise :class:`jumplens.Error` (a ``RuntimeError``) with the
CLI's one-line message.
"""

from ._jumplens import (
    Error,
    Lens,
    Model,
    Run,
    __version__,
    collect,
    merge,
    default_assets,
    early_exit,
    fit,
    predict,
    r2,
    report,
    train_tuned_lens,
)

__all__ = [
    "Error",
    "Lens",
    "Model",
    "Run",
    "__version__",
    "collect",
    "merge",
    "default_assets",
    "early_exit",
    "fit",
    "predict",
    "r2",
    "report",
    "train_tuned_lens",
]
