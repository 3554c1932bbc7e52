"""One-way link measurement between two ranks, with or without shaping (``calibrate-link``).

Clock-free ping-pong: rank 0 sends N bytes, rank 1 answers with a 4-byte message over
the same (shaped) link. ``one_way(N) = RTT(N) - RTT(tiny) / 2``, where RTT(tiny) is a
tiny message each way. Each point is the best of ``repeats`` round trips after one
warm-up: on a shared host, scheduling noise only ever adds time, and the difference of
two noisy medians can even go negative for small messages. A least-squares line ``one_way = latency + N / bandwidth`` through the points
gives the link figures the simulator reads (profile ``link`` object).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from .shaping import LinkShaper
from .transport import Transport

TINY = 4


def _round_trip(tp: Transport, rank: int, big: torch.Tensor, tiny: torch.Tensor) -> float:
    device = big.device
    nbytes = big.numel() * big.element_size()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    if rank == 0:
        send = tp.isend(big, 1, f"{nbytes} B probe")
        tp.wait_recv(tp.irecv(tiny.shape, tiny.dtype, 1, "reply", out=tiny), "calibration")
        tp.wait_send(send, "calibration")
    else:
        tp.wait_recv(tp.irecv(big.shape, big.dtype, 0, f"{nbytes} B probe", out=big), "calibration")
        tp.wait_send(tp.isend(tiny, 0, "reply"), "calibration")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure(
    rank: int,
    world: int,
    device: torch.device,
    timeout_s: float,
    bandwidth: float | None,
    latency: float,
    sizes: list[int],
    repeats: int,
    groups: tuple[Any, Any] | None = None,
    routes: dict[int, str] | None = None,
) -> list[dict[str, Any]]:
    """Points ``{"bytes", "one_way_s"}`` for one link setting (``bandwidth=None``: unshaped).

    Both ranks call this together; only rank 0's numbers are meaningful. ``groups``: the
    transport's process groups to reuse, ``routes`` its routes (see :class:`Transport`): ranks
    that share a GPU measure their host-staged route.
    """
    shaper = LinkShaper(bandwidth, latency, device=device) if bandwidth else None
    tp = Transport(rank, world, device, timeout_s, shaper, groups, routes)
    try:
        reply = torch.zeros(TINY // 4, dtype=torch.float32, device=device)

        def rtt(n: int) -> float:
            # One buffer per size, touched before timing: the link is measured, not page faults.
            big = torch.ones(max(1, n // 4), dtype=torch.float32, device=device)
            _round_trip(tp, rank, big, reply)  # warm-up: connections
            return min(_round_trip(tp, rank, big, reply) for _ in range(repeats))

        base = rtt(TINY)
        return [{"bytes": n, "one_way_s": max(rtt(n) - base / 2, 1e-9)} for n in sizes]
    finally:
        tp.close()


def fit_line(points: list[dict[str, Any]]) -> dict[str, float]:
    """Least squares ``one_way = latency + bytes / bandwidth`` -> ``{"bandwidth_gbps", "latency_us"}``."""
    xs = [p["bytes"] for p in points]
    ys = [p["one_way_s"] for p in points]
    if len(points) == 1:
        return {"bandwidth_gbps": xs[0] / ys[0] / 1e9, "latency_us": 0.0}
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    slope = max(slope, 1e-18)
    return {"bandwidth_gbps": 1.0 / slope / 1e9, "latency_us": max(0.0, my - slope * mx) * 1e6}
