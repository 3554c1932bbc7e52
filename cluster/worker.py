"""The stage-worker actor: one per pipeline rank, holding its model chunk(s).

A plain class; :mod:`dualpipe_mhc.cluster.launch` turns it into a Ray actor (threaded,
so :meth:`StageWorker.status` answers while a step runs). Every rank builds only the
chunks ``schedule.chunks_of(rank)`` names, straight on its device
(:func:`dualpipe_mhc.model.build_stage`), whose parameters are exactly the same slice
of the single-process model's: no process ever holds the whole model.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dualpipe_mhc.config import RunConfig
from dualpipe_mhc.model import build_stage
from dualpipe_mhc.scheduler.ir import Schedule

from .data import step_microbatches
from .executor import StepExecutor
from .nvml import NvmlSampler, nvml_device_for_torch
from .plan import stage_holders
from .shaping import LinkShaper
from .transport import Transport, pair_routes, transport_groups

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FULL_GC_EVERY = 50  # steps; as torchtitan does, the collector runs between steps, never inside one
REPORT_PERIOD_S = 0.01


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    """The run's optimizer; the single-process reference in the tests uses the same."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def recompute_layers(cfg: RunConfig) -> int | None:
    """L_r for this rank's chunks, or None: the driver resolved ``"auto"`` (``Pipeline.configure``)."""
    r = cfg.recompute
    if not r.enabled:
        return None
    if not isinstance(r.block_layers, int):
        raise RuntimeError(
            "recompute.block_layers='auto' reached a worker unresolved; the driver resolves it "
            "(dualpipe_mhc.scheduler.planner.resolve_block_layers) before configuring the ranks"
        )
    return r.block_layers


class StageWorker:
    def __init__(self, rank: int, world: int, use_gpu: bool, threads: int, board: Any = None) -> None:
        self.rank = rank
        self.board = board  # ProgressBoard actor handle, or None
        self.world = world
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(self.device)
        torch.set_num_threads(max(1, threads))
        self.executor: StepExecutor | None = None
        self.transport: Transport | None = None
        self.backend = "nccl" if use_gpu else "gloo"  # init_distributed sets the real one
        self.routes: dict[int, str] = {}  # peer -> transport route, from init_distributed
        self.gpu_identity = "cpu"
        self._link: tuple[float, float] | None = None  # (bytes/s, s) the transport shapes to
        # Process groups live as long as the worker: a reconfigure (profile's variants, the GPU
        # benchmark's cases) that made new ones each time would leave NCCL communicators behind.
        self._p2p: tuple[Any, Any] | None = None
        self._sync_groups: dict[tuple[int, ...], Any] = {}
        self._reporter: threading.Thread | None = None
        # This rank's own GPU, sampled from its own process: per-step energy and NVLink bytes with
        # exact step edges, on any node (the driver can only see its local GPUs).
        self.nvml: NvmlSampler | None = None
        if use_gpu:
            self.nvml = NvmlSampler(nvml_device_for_torch(0), keep_history=False).start()
        self.step = -1

    # -- setup ---------------------------------------------------------------------------
    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a free TCP port for torch.distributed's store (rank 0 hosts it)."""
        ip = _node_ip()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def device_identity(self) -> str:
        """"cpu", or this rank's GPU as NVML names it (its UUID): ranks with equal identities share a GPU."""
        return str(nvml_device_for_torch(0)) if self.device.type == "cuda" else "cpu"

    def init_distributed(
        self, backend: str, init_method: str, timeout_s: float,
        devices: list[str] | None = None, host_staging: bool = False,
    ) -> str:
        """``devices``: every rank's :meth:`device_identity`, from which the transport picks
        each pair's route (:func:`~dualpipe_mhc.cluster.transport.pair_routes`)."""
        dist.init_process_group(
            backend, init_method=init_method, rank=self.rank, world_size=self.world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        self.timeout_s = timeout_s
        self.backend = backend
        if devices is None:  # each rank on a device of its own
            devices = [f"rank{r}" for r in range(self.world)]
            devices[self.rank] = self.device_identity()
        self.routes = pair_routes(self.rank, devices, backend, host_staging)
        self.gpu_identity = devices[self.rank]
        shared = [r for r, d in enumerate(devices) if d == self.gpu_identity and d != "cpu" and r != self.rank]
        via = "/".join(sorted(set(self.routes.values())))
        return (f"rank {self.rank} pid {os.getpid()} on {socket.gethostname()} ({self.device}"
                f"{f', GPU shared with ranks {shared}' if shared else ''}; {backend}, {via} transfers)")

    def configure(self, cfg_data: dict[str, Any], sched_data: dict[str, Any], recv_ahead: int | None = None) -> dict[str, Any]:
        """Build this rank's chunks, optimizer and executor for a config and schedule."""
        cfg = RunConfig.model_validate(cfg_data)
        sched = Schedule.from_dict(sched_data)
        self.cfg, self.sched = cfg, sched
        dtype = DTYPES[cfg.run.dtype]
        self.stage_of = sched.chunks_of(self.rank)  # chunk -> stage
        # A reconfigure drops the old chunks (and what holds them) before building the new ones.
        self.chunks, self.optimizer, self.executor = {}, None, None
        self.chunks = {
            c: build_stage(cfg.model, s, sched.num_stages, cfg.run.seed, cfg.run.kernels, dtype,
                           recompute_layers=recompute_layers(cfg), device=self.device)
            for c, s in self.stage_of.items()
        }
        params = [p for c in sorted(self.chunks) for p in self.chunks[c].parameters()]
        self.optimizer = make_optimizer(params, cfg.run.lr)
        link = (cfg.link.bandwidth, cfg.link.latency) if cfg.link.shape else None
        if self.transport is None or link != self._link:
            # A new link setting gets a new transport (its groups: collective, every rank is here too).
            if self.transport is not None:
                self.transport.close()
            shaper = LinkShaper(*link, device=self.device) if link else None
            self.transport = Transport(self.rank, self.world, self.device, cfg.run.timeout_s, shaper,
                                       self._p2p_groups(), self.routes)
            self._link = link
        self.transport.timeout_s = cfg.run.timeout_s
        # DualPipe holds every model stage on two ranks; their gradients are summed before the step.
        self.sync_groups: list[tuple[int, Any]] = []
        for stage, holders in stage_holders(sched).items():
            if len(holders) > 1:
                key = tuple(holders)
                if key not in self._sync_groups:  # collective: every rank creates every group
                    self._sync_groups[key] = dist.new_group(holders)
                group = self._sync_groups[key]
                if self.rank in holders:
                    self.sync_groups.append((stage, group))
        m = cfg.model
        if recv_ahead is None:
            recv_ahead = len(sched.actions[self.rank]) if self.device.type == "cpu" else 4
        self.executor = StepExecutor(
            self.rank, sched, self.chunks, self.transport,
            (cfg.pipeline.microbatch_size, m.seq_len, m.streams, m.width), dtype, self.device, recv_ahead,
        )
        plan = self.executor.plan
        self.transport.connect(set(plan.src_of.values()) | set(plan.dst_of.values()))
        if self.board is not None and self._reporter is None:
            self._reporter = threading.Thread(target=self._report_progress, name="progress", daemon=True)
            self._reporter.start()
        return {"rank": self.rank, "chunks": self.stage_of,
                "parameters": sum(p.numel() for p in params)}

    # -- training ------------------------------------------------------------------------
    def run_step(self, step: int, apply_optimizer: bool = True) -> dict[str, Any]:
        """One pipeline step over the step's micro-batches; returns losses and timings."""
        assert self.executor is not None, "configure() first"
        self.step = step
        cfg = self.cfg
        mbs = step_microbatches(cfg.run.seed, step, self.sched.microbatches, cfg.pipeline.microbatch_size,
                                cfg.model.seq_len, cfg.model.vocab_size)
        data = {mb: (t.to(self.device), y.to(self.device)) for mb, (t, y) in enumerate(mbs)}
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.executor.current = (-1, f"barrier before step {step}")
        # Every rank's clock starts the step together, so the timelines line up.
        dist.barrier(device_ids=[self.device.index or 0] if self.backend == "nccl" else None)
        # A generation-2 collection inside a step stalled it by ~170 ms on the CPU (the whole
        # pipeline waits for the paused rank), so automatic collection is off and it runs here.
        gc.disable()
        if self.nvml is not None:
            self.nvml.begin_step()
        rec = self.executor.run(step, data)
        self._sum_replicated_grads()
        if apply_optimizer:
            self.optimizer.step()
        out = {"rank": self.rank, "step": step, "losses": rec.losses, "actions": rec.actions,
               "step_time": rec.step_time, "peak_memory_bytes": None}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step's energy window ends when its kernels do
            out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        if self.nvml is not None:
            # Ranks that share a GPU read the same counters: "gpu" lets a report count each GPU once.
            out["nvml"] = self.nvml.end_step() | {"gpu": self.gpu_identity}
        gc.collect(2 if (step + 1) % FULL_GC_EVERY == 0 else 1)
        return out

    def _sum_replicated_grads(self) -> None:
        chunk_of = {s: c for c, s in self.stage_of.items()}
        for stage, group in self.sync_groups:
            self.executor.current = (-1, f"gradient sum of stage {stage}")
            params = list(self.chunks[chunk_of[stage]].parameters())
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            # Summed in float32 whatever the parameter dtype: a bf16 sum of two copies would add
            # a rounding the single-process accumulation does not have.
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            if self.device.type == "cuda" and self.backend != "nccl":  # ranks sharing a GPU sum on the host
                flat = flat.cpu()
            dist.all_reduce(flat, group=group)
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
                offset += n
        self.executor.current = (-1, "idle")

    def _report_progress(self) -> None:
        """Post this rank's current action to the progress board whenever it changed, at most
        every REPORT_PERIOD_S: off the action loop (a post costs ~0.25 ms), fresh enough to
        name the action a dying rank was in unless that action was shorter than the period."""
        last = None
        while True:
            time.sleep(REPORT_PERIOD_S)
            ex = self.executor
            if ex is None:
                continue
            now = (self.step, *ex.current)
            if now != last and now[1] >= 0:
                self.board.update.remote(self.rank, *now)  # fire and forget
                last = now

    def status(self) -> dict[str, Any]:
        idx, what = self.executor.current if self.executor else (-1, "not configured")
        return {"rank": self.rank, "step": self.step, "index": idx, "action": what}

    def inject_fault(self, step: int, index: int, mode: str) -> None:
        """Tests: at action ``index`` of ``step`` exit the process, raise, hang, or drop sends."""
        self.executor.fault = (step, index, mode)

    def gradients(self) -> dict[int, dict[str, torch.Tensor]]:
        return {s: {n: p.grad.detach().float().cpu() for n, p in self.chunks[c].named_parameters() if p.grad is not None}
                for c, s in self.stage_of.items()}

    def parameters(self) -> dict[int, dict[str, torch.Tensor]]:
        return {s: {n: p.detach().float().cpu() for n, p in self.chunks[c].named_parameters()}
                for c, s in self.stage_of.items()}

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def measure_link(self, bandwidth: float | None, latency: float, sizes: list[int], repeats: int) -> list[dict[str, Any]]:
        """Ping-pong one-way times with rank 0 (see :mod:`.linkbench`); both ranks call it."""
        from .linkbench import measure

        return measure(self.rank, self.world, self.device, self.timeout_s, bandwidth, latency, sizes, repeats,
                       groups=self._p2p_groups(), routes=self.routes)

    def _p2p_groups(self) -> tuple[Any, Any]:
        if self._p2p is None:
            self._p2p = transport_groups(self.world)
        return self._p2p

    # -- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self, directory: str, step: int) -> str:
        path = Path(directory) / f"rank{self.rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "rank": self.rank,
            "step": step,
            "data_position": step + 1,  # the next step's index: batches are drawn per step
            "chunks": {s: self.chunks[c].state_dict() for c, s in self.stage_of.items()},
            "optimizer": self.optimizer.state_dict(),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return str(path)

    def load_checkpoint(self, directory: str) -> int:
        state = torch.load(Path(directory) / f"rank{self.rank}.pt", map_location=self.device, weights_only=False)
        for c, s in self.stage_of.items():
            self.chunks[c].load_state_dict(state["chunks"][s])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["data_position"])

    def shutdown(self) -> None:
        if self.nvml is not None:
            self.nvml.stop()
            self.nvml = None
        if self.transport is not None:
            self.transport.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"
