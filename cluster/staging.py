"""Host staging for ranks that share a GPU: their messages travel through host memory.

NCCL refuses two ranks on one device and gloo cannot send CUDA tensors, so a send to
such a peer is copied into a pinned host buffer on the comm stream and sent with gloo
once the copy is done (:func:`stage_to_host`, called from a :class:`HostSendQueue`
thread, or from the link shaper's thread on a shaped link). The receiving side lives in
:class:`dualpipe_mhc.cluster.transport.Transport`. On the CPU the same path runs with a
plain copy, so the CPU suite exercises it (``host_staging``).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import torch

from .shaping import _Done


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


class HostSendQueue:
    """One thread per destination issues staged sends in submission order (the order the
    receiver posts them in): it waits until the tensor exists on the compute stream, then
    calls ``send(tensor, dst)`` under the comm stream. The link shaper does the same with
    pacing; this is the unshaped case."""

    def __init__(self, send: Callable[[torch.Tensor, int], Any], device: torch.device) -> None:
        self._send = send
        self.device = device
        self._queues: dict[int, queue.Queue] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, tensor: torch.Tensor, dst: int, ready: Any, comm_stream: Any) -> _Done:
        """Queue ``tensor`` for ``dst``; returns an event set once its send is issued (``works``)."""
        done = _Done()
        with self._lock:
            if dst not in self._queues:
                q: queue.Queue = queue.Queue()
                self._queues[dst] = q
                t = threading.Thread(target=self._pump, args=(q, comm_stream), name=f"host->r{dst}", daemon=True)
                t.start()
                self._threads.append(t)
        self._queues[dst].put((tensor, dst, ready, done))
        return done

    def _pump(self, q: queue.Queue, comm_stream: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            item = q.get()
            if item is None:
                return
            tensor, dst, ready, done = item
            try:
                if ready is not None:
                    ready.synchronize()  # the tensor exists on the compute stream
                if comm_stream is not None:
                    with torch.cuda.stream(comm_stream):
                        done.works.append(self._send(tensor, dst))
                else:
                    done.works.append(self._send(tensor, dst))
            except BaseException as exc:  # reported to the waiting rank, never lost in the thread
                done.error = exc
            done.set()

    def stop(self) -> None:
        for q in self._queues.values():
            q.put(None)
        for t in self._threads:
            t.join(timeout=1.0)
        self._queues.clear()
        self._threads.clear()
