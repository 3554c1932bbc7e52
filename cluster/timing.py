"""Per-action timestamps: CUDA events on the compute stream on GPU, ``perf_counter`` on CPU.

``stamp()`` is cheap and never synchronises; ``resolve()`` turns a step's stamps into
seconds since its first stamp, once, after the step. On CUDA the wait for the last
event is bounded, so a transfer that never lands surfaces as a timeout, not a hang.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class StepClock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._stamps: list[Any] = []

    def stamp(self) -> int:
        """Record now (host time, or an event on the current stream); returns its index."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            self._stamps.append(ev)
        else:
            self._stamps.append(time.perf_counter())
        return len(self._stamps) - 1

    def reset(self) -> None:
        self._stamps = []

    def pending(self) -> int | None:
        """Index of the first stamp the device has not reached yet (None: all done)."""
        if not self.cuda:
            return None
        for i, ev in enumerate(self._stamps):
            if not ev.query():
                return i
        return None

    def resolve(self) -> list[float]:
        """Seconds of every stamp since stamp 0 (call after :meth:`pending` returned None)."""
        if not self._stamps:
            return []
        if self.cuda:
            first = self._stamps[0]
            return [first.elapsed_time(ev) / 1e3 for ev in self._stamps]
        t0 = self._stamps[0]
        return [t - t0 for t in self._stamps]
