"""Point-to-point transport between pipeline ranks: asynchronous sends and receives of
activations ``[B, S, n, C]`` and their gradients, with bounded waits.

Traffic is split over two process groups by direction: ``up`` carries every message
from a lower to a higher rank, ``down`` the rest. Each (src, dst) channel then lives
on one communicator in one direction only, so a receive posted early can never sit in
front of a send on the same NCCL stream (the cross-direction deadlock that
``batch_isend_irecv`` otherwise has to avoid). Messages on a channel are matched in
issue order; the executor posts receives in the sender's order (see
:class:`dualpipe_mhc.cluster.plan.MessagePlan`).

On CUDA every transfer is issued under a dedicated communication stream: a send first
makes that stream wait for the compute stream's event (the tensor is ready), a receive
is consumed by making the compute stream wait on the transfer. The host never blocks
on a CUDA transfer except through :meth:`Transport.wait` with a deadline.

With ``link`` shaping (:mod:`dualpipe_mhc.cluster.shaping`), sends are paced by a
background thread per destination; receives are posted as the same chunks.

Ranks that share a GPU cannot use NCCL ("Duplicate GPU detected"), and gloo has no
send/receive of CUDA tensors, so their messages are staged through host memory
(:mod:`dualpipe_mhc.cluster.staging`): the sender copies the tensor into a pinned host
buffer on the comm stream and a background thread sends that buffer with gloo once
the copy is done; the receiver posts the gloo receive into a pinned buffer and copies
it onto the device on its comm stream, which the compute stream then waits for.
:func:`pair_routes` is the one place that decides which pair goes which way.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .shaping import LinkShaper, chunk_bounds
from .staging import HostSendQueue, StagedWork, stage_to_host


class TransferError(RuntimeError):
    """A send or receive failed (the peer went away); the message names rank, peer and tensor."""


class TransferTimeout(TransferError):
    """A send or receive did not complete within the run's timeout."""


@dataclass
class RecvHandle:
    """A posted receive: ``tensor`` is valid once :meth:`Transport.wait` returned."""

    tensor: torch.Tensor
    works: list[Any]
    src: int
    what: str  # e.g. "activation F3.s1" for messages
    host: torch.Tensor | None = None  # the host buffer gloo receives into, for a staged pair


@dataclass
class SendHandle:
    tensor: torch.Tensor
    dst: int
    what: str
    works: list[Any] = field(default_factory=list)
    done: Any = None  # threading.Event when a shaper sends it


DIRECT = "direct"  # the tensor itself over the process group (NCCL between GPUs, gloo between CPUs)
HOST = "host"  # staged through host buffers, sent with gloo


def pair_routes(rank: int, devices: list[str], backend: str, host_staging: bool = False) -> dict[int, str]:
    """How ``rank`` reaches every other rank: {peer: DIRECT or HOST}.

    ``devices``: each rank's device identity ("cpu", or the GPU's UUID); ``backend``: the
    process groups' backend. ``host_staging`` stages every pair (tests of the staged path on
    CPU). Raises ValueError for a placement no transport can serve.
    """
    routes = {}
    mine = devices[rank]
    for peer, theirs in enumerate(devices):
        if peer == rank:
            continue
        on_gpu = mine != "cpu" or theirs != "cpu"
        if on_gpu and mine == theirs and backend == "nccl":
            raise ValueError(
                f"ranks {min(rank, peer)} and {max(rank, peer)} share GPU {mine} and NCCL refuses two ranks on one "
                "device; use cluster.backend=auto (gloo through host buffers) or give each rank its own GPU"
            )
        routes[peer] = HOST if host_staging or (on_gpu and backend != "nccl") else DIRECT
    return routes


def transport_groups(world: int) -> tuple[Any, Any]:
    """The (up, down) process groups over all ranks; collective: every rank calls it, in the same order."""
    return dist.new_group(list(range(world))), dist.new_group(list(range(world)))


class Transport:
    """Async P2P between this rank and its neighbours, with optional link shaping."""

    def __init__(
        self,
        rank: int,
        world: int,
        device: torch.device,
        timeout_s: float,
        shaper: LinkShaper | None = None,
        groups: tuple[Any, Any] | None = None,
        routes: dict[int, str] | None = None,
    ) -> None:
        """``groups``: the (up, down) process groups of an earlier transport to reuse; a new
        transport per link setting would otherwise leave NCCL communicators behind.
        ``routes``: :func:`pair_routes` of this rank (default: every peer DIRECT)."""
        self.rank = rank
        self.world = world
        self.device = device
        self.timeout_s = timeout_s
        self.groups = groups if groups is not None else transport_groups(world)
        self.up, self.down = self.groups
        self.cuda = device.type == "cuda"
        self.comm_stream = torch.cuda.Stream(device=device) if self.cuda else None
        self.host_peers = {p for p, how in (routes or {}).items() if how == HOST}
        self.shaper = shaper
        if shaper is not None:
            shaper.start(self._raw_isend)
        # Unshaped staged sends still need a thread: the gloo send may only start once the
        # device-to-host copy is done, and the compute thread must not wait for that.
        self._host_queue = HostSendQueue(self._raw_isend, device) if self.host_peers else None
        self._connected: set[int] = set()

    def connect(self, peers: set[int] | list[int]) -> None:
        """Open the channels to ``peers`` now, with one small message each way.

        NCCL creates a two-rank communicator on the first send or receive between a pair of
        ranks, and that creation blocks the calling thread until the peer arrives too. The
        executor posts receives ahead, so without this a rank could block creating a receive's
        communicator while its peer waits for an activation this rank has yet to send
        (DualPipeV's turn at the last rank): a hang on the first GPU step. Every rank calls
        this with the peers it exchanges messages with (a symmetric relation) and opens them
        in ascending peer order, which is the order of (low rank, high rank) on both ends of
        every pair, so these blocking meetings cannot wait on each other in a cycle.
        """
        for peer in sorted(set(peers) - self._connected - {self.rank}):
            host = peer in self.host_peers
            probe = torch.zeros(1, device="cpu" if host else self.device)
            what = f"channel opening with rank {peer}"
            if self.rank < peer:  # up carries low -> high, down high -> low: open both
                order = [(self.up, "send"), (self.down, "recv")]
            else:
                order = [(self.up, "recv"), (self.down, "send")]
            for group, op in order:
                fn = dist.isend if op == "send" else dist.irecv
                self._wait_works([fn(probe, peer, group=group)], f"rank {self.rank}: {what}", "configure", host)
            self._connected.add(peer)

    def _group(self, src: int, dst: int):
        return self.up if src < dst else self.down

    def _raw_isend(self, tensor: torch.Tensor, dst: int) -> Any:
        """Send now (from the shaper's or the host queue's thread for staged and shaped sends)."""
        if dst in self.host_peers:
            host = stage_to_host(tensor)  # returns once the copy is done: gloo reads the buffer at once
            return StagedWork(dist.isend(host, dst, group=self._group(self.rank, dst)), host)
        return dist.isend(tensor, dst, group=self._group(self.rank, dst))

    def isend(self, tensor: torch.Tensor, dst: int, what: str) -> SendHandle:
        """Start sending ``tensor`` (contiguous) to ``dst``; never blocks the caller."""
        tensor = tensor.contiguous()
        handle = SendHandle(tensor, dst, what)
        ready = None
        if self.cuda:
            ready = torch.cuda.current_stream(self.device).record_event()
        if self.shaper is not None:
            handle.done = self.shaper.submit(tensor, dst, ready, self.comm_stream)
            return handle
        if dst in self.host_peers:
            assert self._host_queue is not None
            handle.done = self._host_queue.submit(tensor, dst, ready, self.comm_stream)
            return handle
        if self.cuda:
            assert self.comm_stream is not None and ready is not None
            self.comm_stream.wait_event(ready)
            with torch.cuda.stream(self.comm_stream):
                tensor.record_stream(self.comm_stream)
                handle.works.append(self._raw_isend(tensor, dst))
        else:
            handle.works.append(self._raw_isend(tensor, dst))
        return handle

    def irecv(
        self, shape: tuple[int, ...], dtype: torch.dtype, src: int, what: str, out: torch.Tensor | None = None
    ) -> RecvHandle:
        """Post a receive of a ``shape`` tensor from ``src`` (chunked like the sender's shaper),
        into ``out`` (contiguous) if given, else a new buffer."""
        group = self._group(src, self.rank)
        if self.cuda:
            with torch.cuda.stream(self.comm_stream):
                buf = out if out is not None else torch.empty(shape, dtype=dtype, device=self.device)
        else:
            buf = out if out is not None else torch.empty(shape, dtype=dtype, device=self.device)
        if src in self.host_peers:
            # Pinned, so that the copy onto the device in wait_recv is asynchronous.
            host = torch.empty(shape, dtype=dtype, pin_memory=self.cuda)
            return RecvHandle(buf, self._post_recv(host, src, group), src, what, host)
        if self.cuda:
            with torch.cuda.stream(self.comm_stream):
                works = self._post_recv(buf, src, group)
        else:
            works = self._post_recv(buf, src, group)
        return RecvHandle(buf, works, src, what)

    def _post_recv(self, buf: torch.Tensor, src: int, group) -> list[Any]:
        if self.shaper is None:
            return [dist.irecv(buf, src, group=group)]
        flat = buf.view(-1)
        elem = buf.element_size()
        return [
            dist.irecv(flat[a // elem : b // elem], src, group=group)
            for a, b in chunk_bounds(buf.numel() * elem, self.shaper.chunk_bytes_for(buf.numel() * elem), elem)
        ]

    def wait_recv(self, handle: RecvHandle, context: str) -> torch.Tensor:
        """Block until ``handle`` arrived (CPU) or make the compute stream wait for it (CUDA);
        raise :class:`TransferTimeout` naming ``context`` after ``timeout_s``."""
        staged = handle.host is not None
        label = f"rank {self.rank}: receive of {handle.what} from rank {handle.src}"
        self._wait_works(handle.works, label, context, staged)
        if staged and self.cuda:
            assert self.comm_stream is not None
            with torch.cuda.stream(self.comm_stream):
                handle.tensor.copy_(handle.host, non_blocking=True)  # the host allocator keeps `host` until done
            torch.cuda.current_stream(self.device).wait_stream(self.comm_stream)
        elif staged:
            handle.tensor.copy_(handle.host)
        if self.cuda:
            handle.tensor.record_stream(torch.cuda.current_stream(self.device))
        return handle.tensor

    def wait_send(self, handle: SendHandle, context: str) -> None:
        label = f"rank {self.rank}: send of {handle.what} to rank {handle.dst}"
        if handle.done is not None:
            if not handle.done.wait(self.timeout_s):
                raise TransferTimeout(f"{label} did not complete within {self.timeout_s:g} s ({context})")
            handle.works = handle.done.works
            if handle.done.error is not None:
                raise TransferError(f"{label} failed ({context}): {handle.done.error}")
        self._wait_works(handle.works, label, context, handle.dst in self.host_peers)

    def _wait_works(self, works: list[Any], label: str, context: str, host: bool = False) -> None:
        """``host``: gloo works on host buffers, waited for with a timeout like any CPU work."""
        deadline = time.monotonic() + self.timeout_s
        for work in works:
            if self.cuda and not host:
                # NCCL's wait() only orders streams; poll for completion to bound the wait.
                while not work.is_completed():
                    if time.monotonic() > deadline:
                        raise TransferTimeout(f"{label} did not complete within {self.timeout_s:g} s ({context})")
                    time.sleep(0.0002)
                work.wait()
                continue
            left = max(deadline - time.monotonic(), 0.001)
            try:
                work.wait(datetime.timedelta(seconds=left))
            except RuntimeError as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if "imeout" in msg or "timed out" in msg.lower():
                    raise TransferTimeout(f"{label} did not complete within {self.timeout_s:g} s ({context})") from None
                raise TransferError(f"{label} failed ({context}): {msg}") from None

    def close(self) -> None:
        if self.shaper is not None:
            self.shaper.stop()
        if self._host_queue is not None:
            self._host_queue.stop()
