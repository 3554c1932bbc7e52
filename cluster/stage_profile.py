"""Measured stage costs on one device, placed on the cluster by the simulator (issue 12).

    report = profile_stages(cfg, ["dualpipev"], repeats=5)   # builds and times each distinct stage
    report["variants"]["mhc"]["profiles"][16]         # dualpipe-mhc-profile/1 object, 16 stages

For the plain residual (n = 1) and the configured residual at n (:func:`.profile.variant_configs`),
and for every stage count the swept schedules need (DualPipeV cuts 2 x ranks stages, the others
ranks), each *distinct* stage is built alone on the local device (:func:`dualpipe_mhc.model.build_stage`:
the kernels, dtype and recomputation ``run`` would use) and timed per micro-batch:

    f        forward
    b        backward for the input gradient (torch's ``stage_backward_input``, as the runtime's split B)
    w        the deferred weight gradients (``stage_backward_weight``; the embedding's own backward)
    full_b   one unsplit backward (what a B with no W costs; compare with b + w)
    fb_pair  F of one micro-batch then B of another, issued together as the runtime's FB does
    recompute  the part of b spent replaying mHC intermediates: b - (b with recomputation off)
    kept     bytes F allocates and holds until B, its output included (the received input exists
             before F and is not counted); CUDA allocator, the saved-tensor meter on CPU
    peak_b   bytes above that baseline at the peak of B (CUDA only)

Stages are identical when they hold the same number of layers and the same ends (embedding,
head); where recomputation is on, the stage's recompute-block phase is ignored (its time and
memory differ by at most one kept block input). Timing: CUDA events around each piece after
``warmup`` untimed rounds, median over ``repeats``; ``perf_counter`` on CPU
(:mod:`.stage_timing`). :func:`fit_hardware` calibrates the analytic model to a report.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dualpipe_mhc.config import RunConfig, dump_config
from dualpipe_mhc.model import build_stage, stage_layer_ranges
from dualpipe_mhc.scheduler import Costs, build_schedule
from dualpipe_mhc.scheduler.analytic import costs_from_config, shape_from_config, stage_params

from .profile import variant_configs
from .stage_timing import DTYPES, measure_stage

GIB = 2**30
# Planned device memory per stage: parameters and their gradients, and this many micro-batches
# of the analytic model's kept activations (two in flight in the F&B round, plus B's peak; the
# analytic figure runs low on real layers, docs/DESIGN.md §6).
ACTIVATION_MARGIN = 4.0

Progress = Callable[[str], None]


@dataclass(frozen=True)
class StageKind:
    """What makes two stages cost the same: their layer count and whether they hold the ends."""

    layers: int
    first: bool
    last: bool

    @property
    def label(self) -> str:
        ends = [e for e, on in (("embedding", self.first), ("head", self.last)) if on]
        return f"{self.layers} layers" + (" + " + " + ".join(ends) if ends else "")


def stage_kinds(model_cfg: Any, num_stages: int) -> list[tuple[StageKind, int]]:
    """Each stage's kind and, for each, the index of a stage of that kind to build."""
    ranges = stage_layer_ranges(model_cfg, num_stages)
    kinds = [StageKind(b - a, s == 0, s == num_stages - 1) for s, (a, b) in enumerate(ranges)]
    first_of = {}
    for s, kind in enumerate(kinds):
        first_of.setdefault(kind, s)
    return [(kind, first_of[kind]) for kind in kinds]


def stage_counts(cfg: RunConfig, schedules: list[str]) -> tuple[dict[int, list[str]], list[str]]:
    """Stage count -> the schedules that cut the model into it; and notes on schedules skipped."""
    counts: dict[int, list[str]] = {}
    notes = []
    for name in schedules:
        sched = build_schedule(name, cfg.pipeline.ranks, cfg.pipeline.microbatches)
        if sched.num_stages > cfg.model.layers:
            notes.append(f"{name} skipped: {sched.num_stages} stages on {cfg.pipeline.ranks} ranks, "
                         f"more than model.layers={cfg.model.layers}")
            continue
        counts.setdefault(sched.num_stages, []).append(name)
    return counts, notes


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible here; use --device cpu or auto")
    return torch.device("cuda", 0) if name == "cuda" else torch.device("cpu")


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(variants: dict[str, RunConfig], counts: list[int], device: torch.device) -> None:
    """One-line ValueError, before anything is built, for a stage the device cannot hold."""
    free = free_memory_bytes(device)
    for name, vcfg in variants.items():
        bytes_per = 2 if vcfg.run.dtype == "bfloat16" else 4
        for num_stages in counts:
            params = stage_params(shape_from_config(vcfg), num_stages)
            kept = costs_from_config(vcfg, num_stages).act_mem_bytes
            for (kind, s) in stage_kinds(vcfg.model, num_stages):
                need = 2 * params[s] * bytes_per + ACTIVATION_MARGIN * kept[s]
                if need > free:
                    raise ValueError(
                        f"stage {s} of {num_stages} ({kind.label}, {name}) needs about {need / GIB:.1f} GiB "
                        f"(parameters, gradients, {ACTIVATION_MARGIN:g} micro-batches of activations) but {device} "
                        f"has {free / GIB:.1f} GiB free; use more pipeline.ranks, a smaller pipeline.microbatch_size "
                        "or recompute.enabled=true"
                    )


def profile_stages(
    cfg: RunConfig,
    schedules: list[str],
    repeats: int = 5,
    warmup: int = 2,
    device: str = "auto",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measure every distinct stage of every variant; returns the measurements and, per variant and
    stage count, a ``dualpipe-mhc-profile/1`` object (link: the config's)."""
    from dualpipe_mhc.scheduler.planner import resolve_block_layers

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats}, warmup={warmup}: use repeats >= 1 and warmup >= 0")
    dev = resolve_device(device)
    counts, notes = stage_counts(cfg, schedules)
    if not counts:
        raise ValueError(f"no schedule of {schedules} fits model.layers={cfg.model.layers}; use more layers or fewer ranks")
    variants = variant_configs(cfg)
    variants = {"plain": variants["plain"], "mhc": variants["mhc"]}  # n = 1 first: the overhead's baseline
    check_fits(variants, sorted(counts), dev)
    blocks = {name: resolve_block_layers(vcfg) for name, vcfg in variants.items()}  # L_r, resolved once
    say = progress or (lambda line: None)
    todo = {(name, num_stages, kind): s for name, vcfg in variants.items() for num_stages in sorted(counts)
            for kind, s in stage_kinds(vcfg.model, num_stages)}
    jobs: dict[tuple[str, StageKind], tuple[int, int]] = {}
    for (name, num_stages, kind), s in todo.items():
        jobs.setdefault((name, kind), (num_stages, s))  # a kind seen under two stage counts is built once
    measured: dict[tuple[str, StageKind], dict[str, Any]] = {}
    for k, ((name, kind), (num_stages, s)) in enumerate(jobs.items(), 1):
        vcfg = variants[name]
        started = time.perf_counter()
        chunk = build_stage(
            vcfg.model, s, num_stages, vcfg.run.seed, vcfg.run.kernels, DTYPES[vcfg.run.dtype],
            recompute_layers=blocks[name], device=dev,
        )
        m = measure_stage(chunk, vcfg, dev, repeats, warmup)
        del chunk
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        m.update(variant=name, streams=vcfg.model.streams, stage_kind=kind.label, built_as=f"stage {s} of {num_stages}",
                 seconds=time.perf_counter() - started)
        measured[(name, kind)] = m
        say(f"[{k}/{len(jobs)}] {name} n={vcfg.model.streams}, {kind.label}: F {1e3 * m['f']:.2f} ms, "
            f"B {1e3 * m['b']:.2f} ms, W {1e3 * m['w']:.2f} ms, full B {1e3 * m['full_b']:.2f} ms, "
            f"kept {m['kept_bytes'] / GIB:.3f} GiB ({m['seconds']:.1f} s)")
    out_variants: dict[str, Any] = {}
    for name, vcfg in variants.items():
        profiles = {}
        analytic = {}
        for num_stages in sorted(counts):
            costs = _costs(vcfg, num_stages, measured, name, dev)
            profiles[num_stages] = costs.to_profile()
            analytic[num_stages] = costs_from_config(vcfg, num_stages, recompute_block=blocks[name]).to_profile()
        out_variants[name] = {"streams": vcfg.model.streams, "residual": vcfg.model.residual,
                              "profiles": profiles, "analytic": analytic}
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "repeats": repeats,
        "warmup": warmup,
        "stage_counts": {n: names for n, names in sorted(counts.items())},
        "measurements": [m for m in measured.values()],
        "variants": out_variants,
        "skipped": notes,
        "config": dump_config(cfg),
    }


def _costs(vcfg: RunConfig, num_stages: int, measured: dict, name: str, dev: torch.device) -> Costs:
    m = vcfg.model
    bytes_per = 2 if vcfg.run.dtype == "bfloat16" else 4
    act = float(vcfg.tokens_per_microbatch() * m.streams * m.width * bytes_per)
    rows = [measured[(name, kind)] for kind, _ in stage_kinds(m, num_stages)]
    overlap = statistics.median(r["fb_overlap"] for r in rows)
    return Costs(
        f=[r["f"] for r in rows],
        b=[r["b"] for r in rows],
        w=[r["w"] for r in rows],
        act_bytes=[act] * (num_stages - 1) + [0.0],
        act_mem_bytes=[float(r["kept_bytes"]) for r in rows],
        recompute=[r["recompute"] for r in rows],
        full_b=[r["full_b"] for r in rows],
        link_bandwidth=vcfg.link.bandwidth,
        link_latency=vcfg.link.latency,
        fb_overlap=min(1.5, max(1e-3, overlap)),
        meta={"source": "profile-stages", "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "variant": name, "streams": m.streams, "split": m.split, "stages": num_stages,
              "peak_b_bytes": [r["peak_b_bytes"] for r in rows],
              "date": time.strftime("%Y-%m-%d", time.gmtime())},
    )


def fit_hardware(cfg: RunConfig, report: dict[str, Any], name: str):
    """A :class:`~dualpipe_mhc.scheduler.calibrate.Calibration` of the config's hardware preset to this
    run's measurements (every variant and stage count), priced at the preset's rates."""
    from dualpipe_mhc.scheduler.planner import resolve_block_layers
    from dualpipe_mhc.scheduler.analytic import Hardware
    from dualpipe_mhc.scheduler.calibrate import Observation, fit_calibration

    variants = variant_configs(cfg)
    obs = []
    for vname, variant in report["variants"].items():
        vcfg = variants[vname]
        for num_stages, profile in variant["profiles"].items():
            obs.append(Observation(shape_from_config(vcfg), int(num_stages), Costs.from_profile(profile),
                                   resolve_block_layers(vcfg)))
    meta = {"device": report["device"], "torch": report["torch"], "fitted_from": "profile-stages",
            "model": {"layers": cfg.model.layers, "width": cfg.model.width, "hidden": cfg.model.hidden,
                      "heads": cfg.model.heads, "seq_len": cfg.model.seq_len, "vocab_size": cfg.model.vocab_size},
            "tokens_per_microbatch": cfg.tokens_per_microbatch(), "dtype": cfg.run.dtype,
            "preset": cfg.hardware.preset, "date": time.strftime("%Y-%m-%d", time.gmtime())}
    return fit_calibration(name, Hardware(cfg.hardware.flops, cfg.hardware.bandwidth), obs, meta)
