"""Ray placement of the stage workers and the torch.distributed rendezvous between them.

    connect(address, timeout_s)     -> joins the Ray cluster at ``address`` (``cluster.address``)
                                       or starts a local one; True when this call started Ray
    WorkerGroup.launch(ranks, ...)  -> placement group (one bundle per rank, PACK; STRICT_PACK
                                       with fractional GPUs when ranks share them) and one
                                       StageWorker actor per bundle; process group inside
    group.kill()                    -> actors killed, placement group removed

Nothing here runs at import time. Token authentication stays on: a local cluster gets the
token ``ray.init`` generates, a remote one is joined with the token in ``RAY_AUTH_TOKEN`` or
``~/.ray/auth_token`` as Ray documents. ``connect`` states the mode (``RAY_AUTH_MODE``) where
Ray would otherwise pick it and print a warning about having done so on every command.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Always set in every actor (docs/DESIGN.md §6): NVLink SHARP / multicast paths stay off.
ACTOR_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# Set in the driver, read in the workers.
FORWARDED_ENV = ("DUALPIPE_MHC_KERNELS", "TRITON_INTERPRET")


class ClusterUnreachable(ValueError):
    """``cluster.address`` names no Ray cluster this driver can join; the message is one line."""


# Ray's own variables for an explicit auth mode and a token given by value or by file.
_AUTH_MODE, _TOKEN_VARS = "RAY_AUTH_MODE", ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _token_available() -> bool:
    return any(os.environ.get(v) for v in _TOKEN_VARS) or (Path.home() / ".ray" / "auth_token").is_file()


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``host:port`` or ``ray://host:port`` address; None for ``auto``/``local``."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail in one line, within ``timeout_s``, when nothing listens at ``address``: without
    this, ``ray.init`` retries for minutes and ends in a long traceback."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClusterUnreachable(
            f"cluster.address={address}: no Ray cluster answers there ({reason}); start one with "
            f"'ray start --head --port={hp[1]}' on that host, or unset cluster.address to start a local one"
        ) from None


def connect(address: str | None, timeout_s: float = 60.0, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` (or an already-initialised one), else start a local one.

    ``address``: ``host:port``, ``ray://host:port`` or ``auto`` (``cluster.address``); None starts
    a local cluster with ``num_cpus`` logical CPUs (default: the machine's, at least 4).
    ``timeout_s``: how long to wait for ``address`` to answer (``run.timeout_s``); an address
    nobody answers at raises :class:`ClusterUnreachable` (a ValueError, one line).
    Returns True when this call started Ray (the caller then shuts it down).
    """
    # Ray reads the mode once, at its first import; after that a changed variable would disagree
    # with Ray's cached config, so it is only stated while Ray is not yet imported. A new local
    # cluster gets token auth, which Ray would pick itself and warn about on every command; a
    # remote cluster is joined with token auth when a token is at hand.
    if "ray" not in sys.modules and (not address or _token_available()):
        os.environ.setdefault(_AUTH_MODE, "token")
    import ray

    if ray.is_initialized():
        return False
    if address:
        _check_reachable(address, timeout_s)
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ClusterUnreachable(
                f"cluster.address={address}: could not join the Ray cluster ({first}); check the address "
                "(ray status on the head node prints it) or unset cluster.address to start a local one"
            ) from None
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
