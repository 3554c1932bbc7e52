"""Host staging for ranks that share a GPU: their messages travel through host memory.

NCCL refuses two ranks on one device and gloo cannot send CUDA tensors, so a send to
such a peer is copied into a pinned host buffer on the comm stream and sent with gloo
once the copy is done (:func:`stage_to_host`, called from a :class:`HostSendQueue`
thread, or from the link shaper's thread on a shaped link). The receiving side lives in
:class:`dualpipe_mhc.cluster.transport.Transport`. On the CPU the same path runs with a
plain copy, so the CPU suite exercises it (``host_staging``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .shaping import SendThreads


def stage_to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of ``tensor`` that is complete when this returns.

    CUDA: pinned, copied on the current stream (the comm stream of the calling thread), and
    waited for with an event, so only this thread waits. CPU: a plain copy, which keeps the
    staged path (a separate buffer handed to gloo) the same as on a GPU.
    """
    if tensor.device.type != "cuda":
        return tensor.detach().clone()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    copied.synchronize()
    return host


class StagedWork:
    """A gloo send of a staged buffer; holds the buffer until the send is waited for."""

    def __init__(self, work: Any, host: torch.Tensor) -> None:
        self.work = work
        self.host = host

    def wait(self, *args: Any) -> Any:
        return self.work.wait(*args)

    def is_completed(self) -> bool:
        return self.work.is_completed()


class HostSendQueue(SendThreads):
    """Staged sends, unshaped: one thread per destination calls ``send(tensor, dst)`` (which stages
    through host memory) in submission order, once the tensor exists on the compute stream. The
    link shaper does the same with pacing."""

    name = "host"

    def __init__(self, send: Callable[[torch.Tensor, int], Any], device: torch.device) -> None:
        super().__init__(send, device)
