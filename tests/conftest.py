"""Shared fixtures. ``ray_cluster``: one local, CPU-only Ray cluster for the whole test session.

Any test that needs Ray takes this fixture instead of calling ``ray.init``; the cluster
starts on first use (~5 s on the 2-core box) and is shut down when the session ends.
It advertises 4 logical CPUs so four fractional-CPU actors fit on a 2-core machine.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()
