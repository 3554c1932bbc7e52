"""Link shaping: emulate a slower link (H800 NVLink, 400 Gb/s InfiniBand) on faster hardware.

A message of N bytes sent over a link of one-way bandwidth ``bw`` and latency ``L``
should arrive ``L + N / bw`` after it leaves, and the link carries one message at a
time per direction (the simulator's model, docs/DESIGN.md §5). The shaper cuts each message
into chunks and issues chunk k (of cumulative size b_k) at ``t0 + L + b_k / bw``, where
``t0`` is when the message may start (submitted and the previous message on that link
done). On a raw link much faster than ``bw`` the last chunk lands just after its
deadline, so the achieved time is ``L + N / bw`` plus one chunk at the raw rate;
``dualpipe-mhc calibrate-link`` measures how close that comes.

One background thread per destination does the pacing, so the compute thread never
sleeps. The receiver posts the same chunks (:func:`chunk_bounds`), so both sides must
agree on ``chunk_bytes_for``: it depends only on the link figures and the size.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterator

import torch

CHUNK_SECONDS = 1e-3  # pace in steps of about 1 ms of link time: coarse enough for sleep(), fine enough for accuracy
MIN_CHUNK = 64 * 1024
MAX_CHUNK = 64 * 1024 * 1024
ALIGN = 4096


def chunk_bounds(nbytes: int, chunk: int, elem: int) -> list[tuple[int, int]]:
    """Byte ranges ``[a, b)`` of the chunks of an ``nbytes`` message (chunk aligned to ``elem``)."""
    chunk = max(elem, chunk - chunk % elem)
    return [(a, min(a + chunk, nbytes)) for a in range(0, nbytes, chunk)] or [(0, 0)]


class _Done(threading.Event):
    """Set when every chunk of a message has been issued; ``works`` are their handles."""

    def __init__(self) -> None:
        super().__init__()
        self.works: list[Any] = []
        self.error: BaseException | None = None


class SendThreads:
    """One thread per destination issues the messages queued for it in submission order (the
    order the receiver posts its receives in): it waits until a message's tensor exists on the
    compute stream, then issues its pieces (:meth:`_pieces`) with ``send(piece, dst)`` under the
    comm stream. The compute thread never waits here; a failure reaches it through ``_Done``."""

    name = "send"

    def __init__(self, send: Callable[[torch.Tensor, int], Any] | None = None,
                 device: torch.device | None = None) -> None:
        self._send = send
        self.device = device
        self._queues: dict[int, queue.Queue] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, tensor: torch.Tensor, dst: int, ready: Any, comm_stream: Any) -> _Done:
        """Queue ``tensor`` (one message) for ``dst``; returns an event set once all its pieces are issued."""
        done = _Done()
        with self._lock:
            if dst not in self._queues:
                q: queue.Queue = queue.Queue()
                self._queues[dst] = q
                t = threading.Thread(target=self._pump, args=(q, comm_stream), name=f"{self.name}->r{dst}", daemon=True)
                t.start()
                self._threads.append(t)
        self._queues[dst].put((tensor, dst, ready, time.perf_counter(), done))
        return done

    def _pieces(self, tensor: torch.Tensor, submitted: float, state: dict[str, float]) -> Iterator[torch.Tensor]:
        """The pieces one message is sent as, each yielded when it is due; ``state`` lives as long as
        the destination's thread. Unshaped: the whole tensor, at once."""
        yield tensor

    def _pump(self, q: queue.Queue, comm_stream: Any) -> None:
        assert self._send is not None
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        state: dict[str, float] = {}
        while True:
            item = q.get()
            if item is None:
                return
            tensor, dst, ready, submitted, done = item
            try:
                if ready is not None:
                    ready.synchronize()  # the tensor exists on the compute stream
                for piece in self._pieces(tensor, submitted, state):
                    if comm_stream is not None:
                        with torch.cuda.stream(comm_stream):
                            done.works.append(self._send(piece, dst))
                    else:
                        done.works.append(self._send(piece, dst))
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


class LinkShaper(SendThreads):
    """Paces sends to ``bandwidth`` bytes/s one way plus ``latency`` s per message."""

    name = "link"

    def __init__(self, bandwidth: float, latency: float, chunk_bytes: int | None = None, device: torch.device | None = None) -> None:
        if bandwidth <= 0 or latency < 0:
            raise ValueError(f"link shaping needs bandwidth > 0 and latency >= 0, got {bandwidth}, {latency}")
        super().__init__(None, device)
        self.bandwidth = bandwidth
        self.latency = latency
        self.chunk_bytes = chunk_bytes

    def chunk_bytes_for(self, nbytes: int) -> int:
        if self.chunk_bytes is not None:
            return self.chunk_bytes
        chunk = int(self.bandwidth * CHUNK_SECONDS)
        chunk = min(max(chunk, MIN_CHUNK), MAX_CHUNK)
        return max(ALIGN, chunk - chunk % ALIGN)

    def start(self, isend: Callable[[torch.Tensor, int], Any]) -> None:
        self._send = isend

    def _pieces(self, tensor: torch.Tensor, submitted: float, state: dict[str, float]) -> Iterator[torch.Tensor]:
        nbytes = tensor.numel() * tensor.element_size()
        t0 = max(submitted, state.get("link_free", 0.0))  # one message at a time on the link
        state["link_free"] = t0 + nbytes / self.bandwidth
        flat = tensor.view(-1)
        elem = tensor.element_size()
        for a, b in chunk_bounds(nbytes, self.chunk_bytes_for(nbytes), elem):
            _sleep_until(t0 + self.latency + b / self.bandwidth)
            yield flat[a // elem : b // elem]


def _sleep_until(deadline: float) -> None:
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        # sleep() overshoots by ~0.1 ms; spin the last bit
        time.sleep(left - 2e-4 if left > 5e-4 else 0)
