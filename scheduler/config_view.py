"""What scheduler code may read of a run config, as Protocols.

The scheduler must not import ``dualpipe_mhc.config`` (pydantic, and the dependency would
point the wrong way), yet some of its functions take the validated config. They are typed
with these views instead: ``dualpipe_mhc.config.RunConfig`` satisfies :class:`ConfigView`
(tests/test_measured.py checks it), and a test can pass any object of the same shape.
Only the fields scheduler code reads are listed; add one here when a function needs it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class ModelView(Protocol):
    width: int  # C
    streams: int  # n
    seq_len: int
    layers: int
    residual: str


class PipelineView(Protocol):
    schedule: str
    ranks: int
    microbatches: int
    microbatch_size: int  # sequences per micro-batch


class LinkView(Protocol):
    @property
    def bandwidth(self) -> float: ...  # bytes/s, one way

    @property
    def latency(self) -> float: ...  # s


class RunView(Protocol):
    dtype: str  # "bfloat16" or "float32"


@runtime_checkable
class ConfigView(Protocol):
    model: ModelView
    pipeline: PipelineView
    link: LinkView
    run: RunView
