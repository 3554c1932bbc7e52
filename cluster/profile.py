"""The profiler: one config run twice — mHC (n streams) and the plain residual (n = 1), optionally HC —
on the same schedule, micro-batches and link, and the mHC overhead that results (docs/DESIGN.md §3).

    report = profile(cfg, with_hc=False)          # runs the variants through the runtime
    report["overhead_pct"]["mhc"]                 # +x.x % step time over plain
    report["verdict"]                             # one line against the paper's +6.7 %

Each variant is the same :class:`RunConfig` with only ``model.residual`` and
``model.streams`` changed, executed by a *runner*: ``runner(cfg) -> run report``,
by default a :class:`PipelineRunner`: the runtime's training loop (what ``dualpipe-mhc
run`` executes) on one group of stage workers reused for every variant. The run
report is reduced here to the numbers a comparison needs (see :func:`measurement`);
per-rank lists are kept per rank.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any, Callable

from dualpipe_mhc.scheduler.measured import analyse_step, incoming_transfer_seconds

from .nvml import UNAVAILABLE

if TYPE_CHECKING:
    from dualpipe_mhc.config import RunConfig
    from dualpipe_mhc.scheduler.ir import Schedule

    from .runtime import StepResult

PAPER_OVERHEAD_PCT = 6.7  # mHC n = 4 over the plain residual, training time (arXiv 2512.24880)
STRETCH_OVERHEAD_PCT = 5.0  # the stretch goal

WORKER_NVML_NOTE = "sampled by each worker on its own GPU, exact step edges"

Runner = Callable[["RunConfig"], dict[str, Any]]  # a config -> its run report (see run_report)


def variant_configs(cfg: RunConfig, with_hc: bool = False) -> dict[str, RunConfig]:
    """``{"mhc": cfg', "plain": cfg'', ["hc": ...]}``: the config with only the residual kind and n changed.

    mHC and HC take the config's n when it asks for a hyper-connected residual, else 4 (the paper's).
    The "mhc" variant is the config's manifold-constrained kind: ``mhc``, or ``dsv4`` when the config
    asks for DeepSeek-V4's (its report rows say which in ``residual``).
    """
    from dualpipe_mhc.config import config_from_dict, dump_config

    n = cfg.model.streams if cfg.model.residual != "plain" and cfg.model.streams > 1 else 4
    constrained = cfg.model.residual if cfg.model.residual in ("mhc", "dsv4") else "mhc"
    kinds = {"mhc": (constrained, n), "plain": ("plain", 1)}
    if with_hc:
        kinds["hc"] = ("hc", n)
    out = {}
    for name, (residual, streams) in kinds.items():
        data = dump_config(cfg)
        data["model"].update(residual=residual, streams=streams)
        data["run"].update(checkpoint_every=0)  # a profile measures steps, it does not keep them
        out[name] = config_from_dict(data)
    return out


def _median_per_rank(steps: list[dict[str, Any]], key: str) -> list[float] | str:
    rows = [s[key] for s in steps if isinstance(s.get(key), list)]
    if not rows:
        return UNAVAILABLE
    return [statistics.median(col) for col in zip(*rows)]


def measurement(run: dict[str, Any], warmup_steps: int = 1) -> dict[str, Any]:
    """The comparison's numbers from one run report (see :func:`run_report` for its shape).

    Everything is a median over the steps after ``warmup_steps`` (all of them if that
    leaves none): the step time, and per rank the bubble, the time blocked on inputs,
    the modelled transfer time and its exposed part, peak memory, energy.
    Hidden communication = transfer time - exposed, per rank.
    """
    steps = run["steps"]
    kept = steps[warmup_steps:] or steps
    step_time = statistics.median(s["step_time_s"] for s in kept)
    bubble = _median_per_rank(kept, "bubble_s")
    wait = _median_per_rank(kept, "input_wait_s")
    exposed = _median_per_rank(kept, "exposed_comm_s")
    comm = _median_per_rank(kept, "comm_s")
    ranks = len(bubble)
    out: dict[str, Any] = {
        "step_time_s": step_time,
        "step_time_range_s": [min(s["step_time_s"] for s in kept), max(s["step_time_s"] for s in kept)],
        "step_time_quartiles_s": quartiles([s["step_time_s"] for s in kept]),
        "step_times_s": [s["step_time_s"] for s in steps],
        "bubble_s": bubble,
        "bubble_fraction": sum(bubble) / (ranks * step_time) if step_time else 0.0,
        "busy_s": [max(0.0, step_time - b) for b in bubble],
        "input_wait_s": wait,
        "exposed_comm_s": exposed,
        "comm_s": comm,
        "hidden_comm_s": [max(0.0, c - e) for c, e in zip(comm, exposed)],
        "peak_memory_bytes": _median_per_rank(kept, "peak_memory_bytes"),
        "loss": kept[-1].get("loss"),
    }
    out["simulated"] = run.get("simulated", UNAVAILABLE)
    out.update(_energy(run.get("nvml"), warmup_steps))
    return out


def _energy(nvml: list[dict[str, Any]] | None, warmup_steps: int) -> dict[str, Any]:
    """Per-GPU median energy, power and NVLink bytes per step from NVML reports (one per GPU)."""
    out: dict[str, Any] = {
        "energy_j_per_step": UNAVAILABLE,
        "energy_j_per_step_per_gpu": UNAVAILABLE,
        "mean_power_w_per_gpu": UNAVAILABLE,
        "nvlink_tx_bytes_per_step_per_gpu": UNAVAILABLE,
        "energy_source": UNAVAILABLE,
    }
    if not nvml:
        return out

    def per_gpu(key: str) -> list[float] | str:
        values = []
        for gpu in nvml:
            steps = gpu.get("steps", [])
            got = [s[key] for s in (steps[warmup_steps:] or steps) if isinstance(s.get(key), (int, float))]
            if not got:
                return UNAVAILABLE
            values.append(statistics.median(got))
        return values

    energy = per_gpu("energy_j")
    out["energy_j_per_step_per_gpu"] = energy
    if energy != UNAVAILABLE:
        out["energy_j_per_step"] = float(sum(energy))
    out["mean_power_w_per_gpu"] = per_gpu("mean_power_w")
    out["nvlink_tx_bytes_per_step_per_gpu"] = per_gpu("nvlink_tx_bytes")
    sources = {s.get("energy_source") for g in nvml for s in g.get("steps", [])} - {None, UNAVAILABLE}
    out["energy_source"] = ",".join(sorted(sources)) if sources else UNAVAILABLE
    return out


def compare(variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Overhead of each hyper-connected variant over ``plain``, and where the extra time goes."""
    base = variants["plain"]
    overhead, breakdown = {}, {}
    for name, v in variants.items():
        if name == "plain":
            continue
        overhead[name] = 100.0 * (v["step_time_s"] / base["step_time_s"] - 1.0)

        def mean_delta(key: str) -> float:
            return statistics.fmean(v[key]) - statistics.fmean(base[key])

        breakdown[name] = {
            "step_time_s": v["step_time_s"] - base["step_time_s"],
            "busy_s": mean_delta("busy_s"),  # compute, recomputation included
            "bubble_s": mean_delta("bubble_s"),
            "exposed_comm_s": mean_delta("exposed_comm_s"),
        }
        if isinstance(v["energy_j_per_step"], float) and isinstance(base["energy_j_per_step"], float):
            breakdown[name]["energy_pct"] = 100.0 * (v["energy_j_per_step"] / base["energy_j_per_step"] - 1.0)
    return {"overhead_pct": overhead, "delta_vs_plain": breakdown}


def quartiles(values: list[float]) -> list[float]:
    """[q1, median, q3] (inclusive method: defined for one value too)."""
    if len(values) == 1:
        return [values[0]] * 3
    return statistics.quantiles(values, n=4, method="inclusive")


def overhead_spread(variants: dict[str, dict[str, Any]], warmup_steps: int) -> dict[str, dict[str, Any]]:
    """Per-step overhead of each hyper-connected variant over plain, in %: step i of the variant over
    step i of plain (both after the warm-up; the variants run one after another, so step i of each
    has seen the same number of optimizer steps). min / q1 / median / q3 / max and the step count."""
    base = variants["plain"]["step_times_s"][warmup_steps:] or variants["plain"]["step_times_s"]
    out = {}
    for name, v in variants.items():
        if name == "plain":
            continue
        mine = v["step_times_s"][warmup_steps:] or v["step_times_s"]
        pct = [100.0 * (a / b - 1.0) for a, b in zip(mine, base) if b > 0]
        if not pct:
            continue
        q1, median, q3 = quartiles(pct)
        out[name] = {"min": min(pct), "q1": q1, "median": median, "q3": q3, "max": max(pct), "steps": len(pct)}
    return out


def spread_warnings(overhead_pct: dict[str, float], spread: dict[str, dict[str, Any]]) -> list[str]:
    """One line per variant whose per-step overhead spreads wider (q3 - q1) than the overhead itself."""
    out = []
    for name, s in spread.items():
        width = s["q3"] - s["q1"]
        if width > abs(overhead_pct[name]):
            out.append(
                f"{name}: the per-step overhead spreads over {width:.1f} points (q1 {s['q1']:+.1f} %, q3 "
                f"{s['q3']:+.1f} %, {s['steps']} steps), wider than the effect ({overhead_pct[name]:+.1f} %): "
                "measure more steps (--steps) on a quieter machine"
            )
    return out


def verdict(overhead_pct: float, streams: int, setting: str, on_gpu: bool) -> str:
    """One line against the paper's +6.7 %."""
    shown = round(overhead_pct, 1)  # the verdict agrees with the number it prints
    where = "within" if shown <= PAPER_OVERHEAD_PCT else "above"
    line = (
        f"mHC n={streams} costs {overhead_pct:+.1f} % step time over the plain residual ({setting}): "
        f"{where} the paper's +{PAPER_OVERHEAD_PCT} %"
    )
    if shown <= STRETCH_OVERHEAD_PCT:
        line += f" and the +{STRETCH_OVERHEAD_PCT:g} % stretch goal"
    if not on_gpu:
        line += " — a CPU run, not comparable to the paper's H800 figure"
    return line


def profile(
    cfg: RunConfig,
    with_hc: bool = False,
    runner: Runner | None = None,
    warmup_steps: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the variants one after another through ``runner`` (default: one :class:`PipelineRunner`
    whose workers serve every variant) and compare them; returns the report."""
    from dualpipe_mhc.config import dump_config

    own = runner is None
    runner = runner or PipelineRunner()
    configs = variant_configs(cfg, with_hc)
    variants, runs = {}, {}
    try:
        for name, vcfg in configs.items():
            if progress is not None:
                progress(name)
            runs[name] = runner(vcfg)
            variants[name] = measurement(runs[name], warmup_steps) | {
                "residual": vcfg.model.residual,
                "streams": vcfg.model.streams,
            }
    finally:
        if own:
            runner.close()
    cmp = compare(variants)
    spread = overhead_spread(variants, warmup_steps)
    link = cfg.link
    setting = (
        f"{cfg.pipeline.schedule}, {cfg.pipeline.ranks} ranks, {cfg.pipeline.microbatches} micro-batches, "
        f"link {link.preset or 'custom'} {link.bandwidth / 1e9:g} GB/s{' shaped' if link.shape else ''}"
    )
    first = next(iter(runs.values()))
    return {
        "format": "dualpipe-mhc-profile-report/1",
        "setting": setting,
        "device": first.get("device", "unknown"),
        "schedule": cfg.pipeline.schedule,
        "ranks": cfg.pipeline.ranks,
        "microbatches": cfg.pipeline.microbatches,
        "link": {"preset": link.preset, "bandwidth_gbps": link.bandwidth / 1e9,
                 "latency_us": link.latency * 1e6, "shaped": link.shape},
        "recompute_block_layers": first.get("recompute_block_layers"),
        "warmup_steps": warmup_steps,
        "nvml_note": first.get("nvml_note"),
        "variants": variants,
        **cmp,
        "overhead_spread_pct": spread,
        "warnings": spread_warnings(cmp["overhead_pct"], spread),
        "paper_overhead_pct": PAPER_OVERHEAD_PCT,
        "verdict": verdict(cmp["overhead_pct"]["mhc"], variants["mhc"]["streams"], setting,
                           bool(first.get("on_gpu"))),
        "config": dump_config(cfg),
    }


def run_report(cfg: RunConfig, sched: Schedule, results: list[StepResult], nvml: list[dict[str, Any]],
               device: str) -> dict[str, Any]:
    """One variant's run as :func:`measurement` reads it, per step and per rank, with the
    definitions of :mod:`dualpipe_mhc.scheduler.measured`:

    bubble_s        step time (slowest rank) - the rank's compute
    input_wait_s    time blocked on receives: upstream compute still running, or transfers
    exposed_comm_s  the part of that wait after every input's producer had finished
    comm_s          the modelled transfer time of the messages the rank receives (the link's figures)
    """
    comm = incoming_transfer_seconds(cfg, sched)
    steps = []
    for res in results:
        times = analyse_step(sched, res.ranks, res.step_time)
        peaks = [r.get("peak_memory_bytes") for r in res.ranks]
        steps.append({
            "step_time_s": res.step_time,
            "bubble_s": times.bubble,
            "input_wait_s": times.input_wait,
            "exposed_comm_s": times.exposed_comm,
            "comm_s": comm,
            "peak_memory_bytes": peaks if all(isinstance(p, (int, float)) for p in peaks) else UNAVAILABLE,
            "loss": res.loss,
        })
    if results and all(isinstance(r.get("nvml"), dict) for res in results for r in res.ranks):
        # The workers sampled their own GPU (NvmlSampler.end_step() per step): per rank, exact step edges.
        # Ranks that share a GPU read the same counters, so each GPU is kept once (its first rank).
        first_rank_of: dict[Any, int] = {}
        for r, rec in enumerate(results[0].ranks):
            first_rank_of.setdefault(rec["nvml"].get("gpu", r), r)
        nvml = [{"steps": [res.ranks[r]["nvml"] for res in results]} for r in sorted(first_rank_of.values())]
        note = WORKER_NVML_NOTE
    else:
        note = None
    return {"device": device, "on_gpu": device != "cpu", "steps": steps, "nvml": nvml, "nvml_note": note,
            "simulated": simulated_from_measured(cfg, sched, results)}


def simulated_from_measured(cfg: RunConfig, sched: Schedule, results: list[StepResult]) -> dict[str, Any]:
    """The simulator fed this run's median per-stage costs, on the config's link model: what the
    schedule should take with these op times, to set beside the measured step."""
    from dualpipe_mhc.scheduler import simulate

    from .measure import measured_costs

    sim = simulate(sched, measured_costs(cfg, sched, results), record_events=False)
    return {"step_time_s": sim.step_time, "bubble_s": sim.bubble, "input_wait_s": sim.input_wait,
            "exposed_comm_s": sim.exposed_comm}


def local_gpus(count: int) -> list[int | str]:
    """NVML identities of the first ``count`` GPUs this host lends to Ray: ``CUDA_VISIBLE_DEVICES``
    (indices or UUIDs) when set, since NVML numbers GPUs physically; else 0 .. count-1."""
    import os

    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return list(range(count))
    return [int(v) if v.isdigit() else v for v in visible[:count]]


class PipelineRunner:
    """Runs each variant config on one group of stage workers, started on first use and
    reconfigured (new chunks, optimizer and executor; same actors, same process group) after.

    NVML is sampled from this process for the first ``ranks`` GPUs of the local host,
    each step bracketed by the driver: a single-host measurement. Where the workers return
    their own per-step sampler summary (a ``"nvml"`` dict in each rank's step record), that
    is used instead.
    """

    def __init__(self, nvml_period_s: float = 0.02, pipe: Any = None) -> None:
        """``pipe``: an already started :class:`Pipeline` of the config's size to reuse (left open)."""
        self.nvml_period_s = nvml_period_s
        self.pipe: Any = pipe
        self.own_pipe = pipe is None
        self.samplers: list[Any] = []
        self.device = "cpu"
        self.nvml_note: str | None = None
        if pipe is not None:
            self._start_nvml(len(pipe.group.actors))

    def __call__(self, cfg: RunConfig) -> dict[str, Any]:
        """Train ``cfg`` for ``run.steps`` steps exactly as ``dualpipe-mhc run`` would; the run report."""
        from .runtime import Pipeline
        from .train import pipeline_schedule, train
        from dualpipe_mhc.scheduler.planner import resolve_block_layers

        sched = pipeline_schedule(cfg)
        if self.pipe is None:
            self.pipe = Pipeline.start(cfg, sched)
            self._start_nvml(cfg.pipeline.ranks)

        def begin(*_: Any) -> None:
            for s in self.samplers:
                s.begin_step()

        def end(*_: Any) -> None:
            for s in self.samplers:
                s.end_step()
            begin()

        outcome = train(cfg, pipe=self.pipe, on_start=begin, on_step=end)
        nvml = [s.report() for s in self.samplers]
        for s in self.samplers:
            s.steps.clear()
        report = run_report(cfg, outcome.sched, outcome.results, nvml, self.device)
        report["recompute_block_layers"] = resolve_block_layers(cfg)
        report["nvml_note"] = report["nvml_note"] or self.nvml_note  # the workers' own samples win
        return report

    def _start_nvml(self, ranks: int) -> None:
        from .nvml import NvmlSampler

        if not self.pipe.group.use_gpu:
            self.nvml_note = "CPU run: no GPU energy or NVLink counters"
            return
        placement = getattr(self.pipe.group, "placement", None)
        per_gpu = placement.ranks_per_gpu if placement is not None else 1
        gpus = local_gpus(-(-ranks // per_gpu))  # ranks that share a GPU: that GPU once
        self.samplers = [NvmlSampler(g, self.nvml_period_s).start() for g in gpus]
        self.nvml_note = f"sampled from the driver for local GPUs {gpus}, steps bracketed by the driver"
        # The GPU's name from NVML (the driver process never touches CUDA itself), else from a
        # worker: a driver on a head node without GPUs or NVML would otherwise report "cuda".
        self.device = self.samplers[0].name or self._worker_device_name()

    def _worker_device_name(self) -> str:
        import ray

        try:
            return str(ray.get(self.pipe.group.actors[0].device_name.remote(), timeout=60))
        except Exception:  # a name is not worth failing a profile for
            return "cuda"

    def close(self) -> None:
        for s in self.samplers:
            s.stop()
        self.samplers = []
        if self.pipe is not None and self.own_pipe:
            self.pipe.close()
        self.pipe = None
