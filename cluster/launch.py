"""Ray placement of the stage workers and the torch.distributed rendezvous between them.

    connect(cluster_cfg)            -> joins ``cluster.address`` or starts a local Ray
    WorkerGroup.launch(ranks, ...)  -> placement group (one bundle per rank, PACK; STRICT_PACK
                                       with fractional GPUs when ranks share them) and one
                                       StageWorker actor per bundle; process group inside
    group.kill()                    -> actors killed, placement group removed

Nothing here runs at import time. Ray's token authentication (on by default for local
clusters in Ray >= 2.5x) needs nothing from us: ``ray.init`` generates the token for a
local cluster, and a remote one is joined with the token in ``RAY_AUTH_TOKEN`` or
``~/.ray/auth_token`` as Ray documents.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

# Always set in every actor (DESIGN.md §6, KINDS.md): NVLink SHARP / multicast paths stay off.
ACTOR_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# Set in the driver, read in the workers.
FORWARDED_ENV = ("DUALPIPE_MHC_KERNELS", "TRITON_INTERPRET")


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` (or an already-initialised one), else start a local one.

    Returns True when this call started Ray (the caller then shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    cpus = num_cpus or max(os.cpu_count() or 1, 4)  # logical CPUs: small fractional actors on small boxes
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return True


def gpus_available() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def gpus_per_node() -> list[int]:
    """GPUs of every alive node of the Ray cluster (0 for a node without any)."""
    import ray

    return [int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]


def gpu_share(ranks_per_gpu: int) -> float:
    """Each rank's fraction of a GPU when ``ranks_per_gpu`` ranks share one: rounded down to
    Ray's resource precision (1e-4), so that the ranks' fractions never add up to more than 1."""
    return math.floor(10_000 / ranks_per_gpu) / 10_000


class ProgressBoard:
    """Where each rank last was (step, action index, action): every worker's progress thread
    posts to it without waiting, so a rank whose process dies can still be named with the
    action it was running. A tiny actor outside the placement group, zero CPUs."""

    def __init__(self) -> None:
        self.where: dict[int, dict] = {}

    def update(self, rank: int, step: int, index: int, action: str) -> None:
        self.where[rank] = {"rank": rank, "step": step, "index": index, "action": action}

    def snapshot(self) -> dict[int, dict]:
        return dict(self.where)


@dataclass
class WorkerGroup:
    """One actor per rank with an initialised process group."""

    actors: list[Any]
    placement_group: Any
    use_gpu: bool
    backend: str
    descriptions: list[str]
    board: Any = None
    placement: Any = None  # the runtime's Placement that launched it, when it did

    @staticmethod
    def launch(
        ranks: int,
        use_gpu: bool,
        backend: str,
        timeout_s: float,
        cpus_per_rank: float | None = None,
        extra_env: dict[str, str] | None = None,
        gpus_per_rank: float = 1.0,
        host_staging: bool = False,
    ) -> WorkerGroup:
        """``gpus_per_rank`` < 1: ranks share GPUs (see :func:`gpu_share`), all on one node.
        ``host_staging``: every message goes through host buffers, even between CPU ranks (tests
        of the shared-GPU transport on CPU); the transport otherwise picks per rank pair."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .transport import pair_routes
        from .worker import StageWorker

        total_cpus = float(ray.cluster_resources().get("CPU", 1))
        if cpus_per_rank is None:
            # CPU actors reserve half a logical CPU each, so a few groups fit on a small box.
            cpus_per_rank = 1.0 if use_gpu else min(0.5, total_cpus / ranks)
        bundle: dict[str, float] = {"CPU": cpus_per_rank}
        shared = use_gpu and gpus_per_rank < 1
        if use_gpu:
            bundle["GPU"] = gpus_per_rank
        # Ranks that share GPUs are on one node: their transport is host memory, not a network.
        pg = placement_group([dict(bundle) for _ in range(ranks)], strategy="STRICT_PACK" if shared else "PACK")
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except Exception:
            remove_placement_group(pg)
            raise RuntimeError(
                f"could not place {ranks} workers with {bundle} each within {timeout_s:g} s; "
                f"the cluster has {ray.cluster_resources()}; use fewer ranks or free resources"
            ) from None
        threads = 1 if not use_gpu else 4
        if not use_gpu:
            threads = max(1, int((os.cpu_count() or 1) // ranks))
        env = dict(ACTOR_ENV, OMP_NUM_THREADS=str(threads))
        # The driver's kernel choice travels with the workers, also to a remote cluster.
        env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
        env.update(extra_env or {})
        board = ray.remote(ProgressBoard).options(num_cpus=0).remote()
        remote_cls = ray.remote(StageWorker)
        actors = [
            remote_cls.options(
                num_cpus=cpus_per_rank,
                num_gpus=gpus_per_rank if use_gpu else 0,
                max_concurrency=2,  # status() answers while run_step() runs
                max_restarts=0,
                runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=r
                ),
                name=None,
            ).remote(r, ranks, use_gpu, threads, board)
            for r in range(ranks)
        ]
        group = WorkerGroup(actors, pg, use_gpu, backend, [], board)
        try:
            devices = ray.get([a.device_identity.remote() for a in actors], timeout=timeout_s + 60)
            for r in range(ranks):  # a pair no transport can serve fails here, before any process group
                pair_routes(r, devices, backend, host_staging)
            ip, port = ray.get(actors[0].rendezvous_address.remote(), timeout=timeout_s + 60)
            init = f"tcp://{ip}:{port}"
            group.descriptions = ray.get(
                [a.init_distributed.remote(backend, init, timeout_s, devices, host_staging) for a in actors],
                timeout=timeout_s + 60,
            )
        except BaseException:
            group.kill()
            raise
        return group

    def kill(self) -> None:
        """Kill every actor (no restart) and free the placement group; safe to call twice."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors + ([self.board] if self.board is not None else []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []
        self.board = None
        if self.placement_group is not None:
            try:
                remove_placement_group(self.placement_group)
            except Exception:
                pass
            self.placement_group = None
