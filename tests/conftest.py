"""Shared fixtures.

``ray_cluster``: one local, CPU-only Ray cluster for the whole test session. Any test
that needs Ray takes this fixture instead of calling ``ray.init``; the cluster starts on
first use (~5 s on the 2-core box) and is shut down when the session ends. It advertises
8 logical CPUs so several groups of half-CPU actors fit on a 2-core machine at once.

``pipeline2`` / ``pipeline4``: running 2- and 4-rank stage-worker groups (CPU, gloo) for
the session, started on first use. Starting actors is the slow part of a pipeline test
(~8 s for 2, ~18 s for 4 on 2 cores), so tests reconfigure these with
``pipe.configure(cfg, schedule)`` instead of starting their own. A test that breaks a
group on purpose (tests/test_failures.py) starts its own.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=8, num_gpus=0, include_dashboard=False, log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


def small_config(schedule: str = "1f1b", ranks: int = 2, microbatches: int = 4, **run):
    """A model small enough for 8 CPU stages: 8 layers, C=32, n=4, 2x16 tokens per micro-batch."""
    from dualpipe_mhc.config import load_config

    overrides = [
        "model.layers=8", "model.width=32", "model.heads=2", "model.seq_len=16", "model.vocab_size=256",
        f"pipeline.schedule={schedule}", f"pipeline.ranks={ranks}", f"pipeline.microbatches={microbatches}",
        "pipeline.microbatch_size=2", "run.timeout_s=30", "link.preset=gloo-cpu",
    ] + [f"run.{k}={v}" for k, v in run.items()]
    return load_config(None, overrides)


def _start(ranks: int):
    from dualpipe_mhc.cluster.runtime import Pipeline
    from dualpipe_mhc.cluster.train import pipeline_schedule

    cfg = small_config("1f1b", ranks, 2 * ranks)
    return Pipeline.start(cfg, pipeline_schedule(cfg))


@pytest.fixture(scope="session")
def pipeline2(ray_cluster):
    pipe = _start(2)
    yield pipe
    pipe.close()


@pytest.fixture(scope="session")
def pipeline4(ray_cluster):
    pipe = _start(4)
    yield pipe
    pipe.close()
