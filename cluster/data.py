"""Deterministic micro-batches: the same (seed, step) gives the same tokens on every rank.

Windows of the bundled corpus (:mod:`dualpipe_mhc.corpus`, byte tokens) when the
model's vocabulary holds bytes, else uniform random tokens. Each step draws from its own
generator seeded with ``(seed, step)``, so the data position is just the step index and
a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CORPUS = None


def step_microbatches(
    seed: int, step: int, microbatches: int, microbatch_size: int, seq_len: int, vocab_size: int
) -> list[tuple[Tensor, Tensor]]:
    """``microbatches`` pairs ``(tokens [b, S], targets [b, S])`` (int64, CPU) for ``step``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    corpus = _corpus() if vocab_size >= 256 else None
    out = []
    for _ in range(microbatches):
        if corpus is not None:
            out.append(corpus.batch(microbatch_size, seq_len, gen))
        else:
            window = torch.randint(0, vocab_size, (microbatch_size, seq_len + 1), generator=gen)
            out.append((window[:, :-1], window[:, 1:]))
    return out


def _corpus():
    global _CORPUS
    if _CORPUS is None:
        try:
            from dualpipe_mhc.corpus import Corpus
        except ImportError:  # the corpus module is optional for the runtime
            return None
        _CORPUS = Corpus()
    return _CORPUS
