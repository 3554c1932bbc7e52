"""Opening the transport's channels (``Transport.connect``) cannot deadlock: NCCL blocks a rank
in the first send or receive of a pair until the peer arrives, so every rank must meet its
peers in an order that lets all meetings happen. Checked with a recording stand-in for
torch.distributed over every schedule's message pairs; no Ray, no process group."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dualpipe_mhc.cluster import transport as tp
from dualpipe_mhc.cluster.plan import build_plan
from dualpipe_mhc.scheduler import add_comms, build_schedule


class _Done:
    def wait(self, *_a, **_k):
        return True

    def is_completed(self):
        return True


def _meetings(monkeypatch, rank: int, world: int, peers: set[int]) -> list[tuple]:
    """The blocking meetings ``connect`` makes on ``rank``: (group, sender, receiver) in order."""
    calls: list[tuple] = []
    groups = iter(["up", "down"])
    fake = SimpleNamespace(
        new_group=lambda ranks: next(groups),
        isend=lambda t, dst, group: calls.append((group, rank, dst)) or _Done(),
        irecv=lambda t, src, group: calls.append((group, src, rank)) or _Done(),
    )
    monkeypatch.setattr(tp, "dist", fake)
    t = tp.Transport(rank, world, torch.device("cpu"), timeout_s=1.0)
    t.connect(peers)
    t.connect(peers)  # a second configure opens nothing again
    return calls


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_channel_opening_cannot_deadlock(monkeypatch, name, ranks):
    sched = add_comms(build_schedule(name, ranks, 2 * ranks))
    queues = {}
    for r in range(ranks):
        plan = build_plan(sched, r)
        queues[r] = _meetings(monkeypatch, r, ranks, set(plan.src_of.values()) | set(plan.dst_of.values()))
        for group, src, dst in queues[r]:
            assert (group == "up") == (src < dst), "up carries low -> high, down the rest"
    # Blocking semantics: a meeting happens once it is the next call of both its ranks.
    while any(queues.values()):
        heads = {r: q[0] for r, q in queues.items() if q}
        ready = [m for m in heads.values() if heads.get(m[1]) == m and heads.get(m[2]) == m]
        assert ready, f"{name} on {ranks} ranks: channel opening deadlocks at {heads}"
        for m in set(ready):
            queues[m[1]].pop(0)
            queues[m[2]].pop(0)


def test_reconfiguring_a_worker_creates_no_new_process_groups(monkeypatch):
    """Process groups (NCCL communicators on GPUs) are made once per worker, not per configure:
    profile's variants and the GPU benchmark's cases reconfigure the same workers many times."""
    from conftest import small_config
    from dualpipe_mhc.cluster import worker as wk
    from dualpipe_mhc.cluster.train import pipeline_schedule
    from dualpipe_mhc.config import dump_config

    made: list[list[int]] = []
    fake = SimpleNamespace(
        new_group=lambda ranks: made.append(list(ranks)) or f"group{len(made)}",
        isend=lambda *a, **k: _Done(),
        irecv=lambda *a, **k: _Done(),
    )
    monkeypatch.setattr(tp, "dist", fake)
    monkeypatch.setattr(wk, "dist", fake)
    cfg = small_config("dualpipe", 2, 4)
    shaped = cfg.model_copy(update={"link": cfg.link.model_copy(update={"shape": True})})
    w = wk.StageWorker(0, 2, use_gpu=False, threads=1)
    w.configure(dump_config(cfg), pipeline_schedule(cfg).to_dict())
    first = list(made)
    assert first == [[0, 1]] * 3  # up, down, and the gradient sum of both stages (each held by ranks 0 and 1)
    for c in (cfg, shaped, cfg):  # a new link setting makes a new transport, on the same groups
        w.configure(dump_config(c), pipeline_schedule(c).to_dict())
    assert made == first
    w.transport.close()
