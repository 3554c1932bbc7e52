"""The driver side of a pipeline run: launch, step, collect, fail cleanly.

    pipe = Pipeline.start(cfg, schedule)      # Ray + one StageWorker per rank + process group
    result = pipe.step(0)                     # every rank runs its action list once
    result.loss, result.step_time, result.bubble_fraction
    pipe.gradients()                          # {stage: {param name: grad}} after a step
    pipe.close()                              # actors killed, placement group removed

Failure handling: the driver waits on all ranks at once. A rank that raises ends the
step with its message (the executor names rank, step and action); a rank whose process
died ends it with the last action it reported; if no rank makes progress for
``run.timeout_s`` the run ends naming what each rank was doing. In every case the
actors are killed and the placement group removed before :class:`PipelineError` is
raised, so nothing is left behind.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from dualpipe_mhc.config import RunConfig, dump_config
from dualpipe_mhc.scheduler import measured
from dualpipe_mhc.scheduler.ir import Schedule

from .launch import WorkerGroup, connect, gpu_share, gpus_available, gpus_per_node

STATUS_POLL_S = 0.5
log = logging.getLogger("dualpipe_mhc")


class PipelineError(RuntimeError):
    """The run stopped: a rank died, raised, or stopped making progress. One-line message."""


@dataclass
class StepResult:
    step: int
    loss: float  # mean of the micro-batch losses
    losses: dict[int, float]
    step_time: float  # s, slowest rank's last compute end after the common start
    wall_time: float  # s, as the driver saw it
    ranks: list[dict[str, Any]] = field(default_factory=list)  # per-rank records from the workers

    def busy(self) -> list[float]:
        """Compute seconds per rank."""
        return measured.busy(self.ranks)

    def waiting(self) -> list[float]:
        """Input wait per rank: all the time spent waiting for inputs (upstream compute and
        transfers; the exposed communication is only its part after the producers finished,
        see :mod:`dualpipe_mhc.scheduler.measured`)."""
        return measured.input_wait(self.ranks)

    @property
    def bubble_fraction(self) -> float:
        if not self.step_time:
            return 0.0
        return sum(self.step_time - b for b in self.busy()) / (len(self.ranks) * self.step_time)


@dataclass(frozen=True)
class Placement:
    """Where the ranks run: ``gpus_per_rank`` < 1 when they share GPUs (``ranks_per_gpu`` each)."""

    use_gpu: bool
    backend: str
    ranks_per_gpu: int = 1
    note: str | None = None  # one line for the user when the placement changes what a run measures

    @property
    def gpus_per_rank(self) -> float:
        return gpu_share(self.ranks_per_gpu)

    @property
    def shared(self) -> bool:
        return self.use_gpu and self.ranks_per_gpu > 1


def plan_placement(cfg: RunConfig) -> Placement:
    """The placement of a config on the connected cluster; raises ValueError if impossible.

    One GPU per rank when there are enough. Otherwise, with ``cluster.share_gpus`` auto, ranks
    share the GPUs of a one-host cluster (ceil(ranks / GPUs) per GPU); ``yes`` shares even
    when there are enough (at least 2 ranks per GPU, as few as the GPUs of one node allow).
    """
    c, ranks = cfg.cluster, cfg.pipeline.ranks
    gpus, nodes = gpus_available(), gpus_per_node()
    node_gpus = max(nodes, default=0)
    if c.share_gpus == "yes" and (c.use_gpus == "no" or node_gpus == 0):
        why = "cluster.use_gpus=no" if c.use_gpus == "no" else "the Ray cluster has no GPUs"
        raise ValueError(f"cluster.share_gpus=yes needs GPUs but {why}; use cluster.share_gpus=auto or no")
    if c.share_gpus == "yes":
        per_gpu = min(ranks, max(2, -(-ranks // node_gpus)))
    elif c.use_gpus != "no" and gpus >= ranks:
        per_gpu = 1
    elif c.share_gpus == "auto" and c.use_gpus != "no" and len(nodes) == 1 and node_gpus >= 1:
        per_gpu = -(-ranks // node_gpus)
    elif c.use_gpus == "yes":
        raise ValueError(
            f"cluster.use_gpus=yes but the Ray cluster has {gpus} GPUs for {ranks} ranks; "
            "use fewer ranks, cluster.share_gpus=yes (ranks share GPUs) or cluster.use_gpus=no"
        )
    else:
        per_gpu = 0  # CPU workers
    use_gpu = per_gpu > 0
    backend = c.backend
    if backend == "auto":
        # NCCL refuses two ranks on one GPU; gloo through host buffers serves them.
        backend = "nccl" if use_gpu and per_gpu == 1 else "gloo"
    if backend == "nccl" and not use_gpu:
        raise ValueError("cluster.backend=nccl needs GPUs; use cluster.backend=gloo (or auto) on CPU")
    if backend == "nccl" and per_gpu > 1:
        raise ValueError(
            f"cluster.backend=nccl cannot serve {per_gpu} ranks on one GPU (NCCL refuses two ranks on one device); "
            "use cluster.backend=auto (gloo through host buffers) or cluster.share_gpus=no with one GPU per rank"
        )
    note = None
    if per_gpu > 1:
        note = (f"{ranks} ranks share {-(-ranks // per_gpu)} GPU(s), {per_gpu} per GPU: messages go through host "
                "memory and the ranks contend for one GPU, so step times measure no real link")
    return Placement(use_gpu, backend, max(per_gpu, 1), note)


def resolve_placement(cfg: RunConfig) -> tuple[bool, str]:
    """(use GPUs, backend) for a config that needs one GPU per rank (a link between two of them);
    raises ValueError if impossible, also when the ranks would have to share GPUs."""
    placement = plan_placement(cfg)
    if placement.shared:
        raise ValueError(
            f"the Ray cluster has {gpus_available()} GPU(s) for {cfg.pipeline.ranks} ranks and ranks that share a GPU "
            "have no link to measure; use a cluster with a GPU per rank or cluster.use_gpus=no"
        )
    return placement.use_gpu, placement.backend


class Pipeline:
    def __init__(self, group: WorkerGroup, timeout_s: float, started_ray: bool = False) -> None:
        self.group = group
        self.timeout_s = timeout_s
        self.started_ray = started_ray
        self.last_status: dict[int, dict[str, Any]] = {}
        self.sched: Schedule | None = None

    @staticmethod
    def start(cfg: RunConfig, sched: Schedule, recv_ahead: int | None = None, host_staging: bool = False) -> Pipeline:
        """``host_staging``: send every message through host buffers, as ranks that share a GPU
        do, also on CPU workers (tests of that path)."""
        started = connect(cfg.cluster.address, cfg.run.timeout_s)
        try:
            placement = plan_placement(cfg)
            if placement.note:
                log.warning(placement.note)
            group = WorkerGroup.launch(cfg.pipeline.ranks, placement.use_gpu, placement.backend, cfg.run.timeout_s,
                                       gpus_per_rank=placement.gpus_per_rank, host_staging=host_staging)
            group.placement = placement
        except BaseException:
            if started:
                import ray

                ray.shutdown()
            raise
        pipe = Pipeline(group, cfg.run.timeout_s, started)
        try:
            pipe.configure(cfg, sched, recv_ahead)
        except BaseException:
            pipe.close()
            raise
        return pipe

    @property
    def ranks(self) -> int:
        return len(self.group.actors)

    def configure(self, cfg: RunConfig, sched: Schedule, recv_ahead: int | None = None) -> list[dict[str, Any]]:
        """(Re)build every rank's chunks for ``cfg``/``sched`` on the running workers."""
        if sched.ranks != self.ranks:
            raise ValueError(f"schedule has {sched.ranks} ranks, the worker group {self.ranks}")
        self.sched = sched
        self.timeout_s = cfg.run.timeout_s
        data = dump_config(cfg)
        # recompute.block_layers = "auto" is the planner's to resolve, once, here: the ranks get the int
        from dualpipe_mhc.scheduler.planner import resolve_block_layers

        block = resolve_block_layers(cfg)
        data["recompute"].update(enabled=block is not None, block_layers=block or 1)
        return self._call_all("configure", (data, sched.to_dict(), recv_ahead), "configure")

    def step(self, step: int, apply_optimizer: bool = True) -> StepResult:
        t0 = time.perf_counter()
        recs = self._call_all("run_step", (step, apply_optimizer), f"step {step}", watch_progress=True)
        wall = time.perf_counter() - t0
        losses = {mb: v for r in recs for mb, v in r["losses"].items()}
        loss = sum(losses.values()) / len(losses) if losses else float("nan")
        step_time = max(r["step_time"] for r in recs)
        return StepResult(step, loss, dict(sorted(losses.items())), step_time, wall, recs)

    def gradients(self) -> dict[int, dict[str, Any]]:
        """{stage: {name: grad}}; a stage held twice (DualPipe) is reported once (both copies are equal)."""
        return self._per_stage("gradients")

    def parameters(self) -> dict[int, dict[str, Any]]:
        """{stage: {name: tensor}}, each stage once, as for :meth:`gradients`."""
        return self._per_stage("parameters")

    def _per_stage(self, method: str) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for per_rank in self._call_all(method, (), method):
            for stage, tensors in per_rank.items():
                out.setdefault(stage, tensors)
        return out

    def save_checkpoint(self, directory: str, step: int) -> list[str]:
        return self._call_all("save_checkpoint", (directory, step), "checkpoint")

    def load_checkpoint(self, directory: str) -> int:
        positions = self._call_all("load_checkpoint", (directory,), "resume")
        if len(set(positions)) != 1:
            raise PipelineError(f"checkpoint {directory} is inconsistent: ranks are at data positions {positions}")
        return positions[0]

    def inject_fault(self, rank: int, step: int, index: int, mode: str) -> None:
        import ray

        ray.get(self.group.actors[rank].inject_fault.remote(step, index, mode))

    def close(self) -> None:
        """Destroy the process groups (best effort), kill the actors, free the placement group."""
        import ray

        if self.group.actors:
            refs = [a.shutdown.remote() for a in self.group.actors]
            try:
                ray.wait(refs, num_returns=len(refs), timeout=5)
            except Exception:
                pass
        self.group.kill()
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- waiting on every rank with failure detection ------------------------------------
    def _call_all(self, method: str, args: tuple, what: str, watch_progress: bool = False) -> list[Any]:
        """Call ``method`` on every rank and wait for all. A rank that raises or dies ends the
        call at once; with ``watch_progress`` (steps) so does ``timeout_s`` without any rank
        moving to another action. Building chunks or saving checkpoints may take long: those
        calls are only ended by failures."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        actors = self.group.actors
        pending = {getattr(a, method).remote(*args): r for r, a in enumerate(actors)}
        results: list[Any] = [None] * len(actors)
        last_change = time.monotonic()
        seen: dict[int, tuple] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=STATUS_POLL_S)
            failures: list[tuple[int, str, bool]] = []  # (rank, message, died)
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                    last_change = time.monotonic()
                except RayTaskError as exc:
                    failures.append((rank, _cause(exc), False))
                except RayActorError:
                    failures.append((rank, "", True))
            if failures:
                self._fail(failures, pending, what)
            if ready or not watch_progress:
                continue
            statuses = self._poll(pending)
            for r, st in statuses.items():
                key = (st["step"], st["index"], st["action"])
                if seen.get(r) != key:
                    seen[r] = key
                    last_change = time.monotonic()
            if time.monotonic() - last_change > self.timeout_s:
                self._read_board()
                doing = "; ".join(f"rank {r} at {self._where(r)}" for r in sorted(pending.values()))
                self._abort()
                raise PipelineError(
                    f"{what}: no rank made progress for {self.timeout_s:g} s (run.timeout_s); {doing}. "
                    "Workers were killed; raise run.timeout_s if one action can legitimately take that long "
                    "(first-step kernel compilation)."
                )
        return results

    def _read_board(self, prefer: set[int] = frozenset()) -> None:
        """Merge the progress board into ``last_status``: always for ranks in ``prefer`` (dead
        ones), else only where no polled status names an action (a poll is more recent)."""
        import ray

        try:
            if self.group.board is not None:
                board = ray.get(self.group.board.snapshot.remote(), timeout=2.0)
                for r, st in board.items():
                    if r in prefer or r not in self.last_status or self.last_status[r].get("index", -1) < 0:
                        self.last_status[r] = st
        except Exception:
            pass

    def _poll(self, pending: dict) -> dict[int, dict[str, Any]]:
        import ray

        ranks = sorted(pending.values())
        refs = {self.group.actors[r].status.remote(): r for r in ranks}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=STATUS_POLL_S)
        out = {}
        for ref in ready:
            try:
                out[refs[ref]] = ray.get(ref)
            except Exception:
                continue
        self.last_status.update(out)
        return out

    def _where(self, rank: int) -> str:
        st = self.last_status.get(rank)
        if not st:
            return "an unknown action (no status reported)"
        if st["index"] >= 0:
            return f"step {st['step']} action {st['index']} {st['action']}"
        return f"step {st['step']} ({st['action']})"

    def _fail(self, failures: list[tuple[int, str, bool]], pending: dict, what: str) -> None:
        """Give the other ranks a moment to report, name the root cause, kill everything."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        died = {r for r, _m, d in failures if d}
        errors = {r: m for r, m, d in failures if not d}
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=1.0)
        for ref in ready:
            rank = pending.pop(ref)
            try:
                ray.get(ref)
            except RayActorError:
                died.add(rank)
            except RayTaskError as exc:
                errors[rank] = _cause(exc)
        self._read_board(prefer=died)  # the last action a dead rank posted before it went
        if died:
            r = min(died)
            others = "; ".join(f"rank {q}: {_short(m)}" for q, m in sorted(errors.items()))
            msg = f"{what}: rank {r} died (its process exited) at {self._where(r)}"
            if others:
                msg += f"; then {others}"
        else:
            # The first rank to fail by itself; peers often fail after it because a transfer broke.
            r = min(errors, key=lambda q: ("did not complete" in errors[q] or "failed (" in errors[q], q))
            msg = f"{what}: {errors[r]}"
        if pending:  # ranks that neither failed nor finished: say where they are stuck
            self._poll(pending)
            stuck = sorted(pending.values())
            msg += "; still running: " + ", ".join(f"rank {q} at {self._where(q)}" for q in stuck)
        self._abort()
        raise PipelineError(msg + ". Workers were killed.")

    def _abort(self) -> None:
        self.group.kill()
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False


def _short(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cause(exc: Any) -> str:
    cause = getattr(exc, "cause", None)
    text = str(cause) if cause is not None else str(exc)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__
