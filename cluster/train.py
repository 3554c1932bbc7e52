"""The training loop over a :class:`Pipeline`: steps, checkpoints, resume.

    outcome = train(cfg, resume=False, on_step=print)
    outcome.results        # one StepResult per step run
    outcome.start_step     # 0, or the resumed data position

Everything that can be checked without workers (schedule, checkpoint to resume, verified
file by file) is checked before any actor starts, so a bad config costs nothing. Each save
and the resume are announced in one line through ``on_note`` (default: print).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dualpipe_mhc.config import RunConfig, dump_config
from dualpipe_mhc.scheduler import ScheduleError, add_comms, build_schedule, validate
from dualpipe_mhc.scheduler.ir import Schedule

from . import checkpoint
from .runtime import Pipeline, PipelineError, StepResult


@dataclass
class TrainOutcome:
    sched: Schedule
    start_step: int
    results: list[StepResult] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    resumed_from: str | None = None
    device: str = "cpu"


def pipeline_schedule(cfg: RunConfig) -> Schedule:
    """The config's schedule with explicit transfers, validated (ValueError on a bad one)."""
    p = cfg.pipeline
    try:
        sched = add_comms(build_schedule(p.schedule, p.ranks, p.microbatches))
        validate(sched)
    except ScheduleError as exc:
        raise ValueError(str(exc)) from None
    return sched


def train(
    cfg: RunConfig,
    resume: bool = False,
    on_step: Callable[[StepResult], None] | None = None,
    pipe: Pipeline | None = None,
    on_start: Callable[[Pipeline, int], None] | None = None,
    on_note: Callable[[str], None] = print,
) -> TrainOutcome:
    """Run steps up to ``cfg.run.steps`` (from the newest checkpoint that verifies, with ``resume``).

    ``pipe``: an already started pipeline of the right size to reuse (it is reconfigured
    and left open); otherwise one is started and closed here.
    ``on_note``: receives one line per checkpoint saved and for the resume.
    """
    sched = pipeline_schedule(cfg)
    cfg_data = dump_config(cfg)
    # Absolute: the workers resolve paths in their own working directory, which is not the
    # driver's when it joins a cluster started elsewhere (cluster.address).
    root = Path(cfg.run.checkpoint_dir).absolute()
    resume_dir, start = None, 0
    if resume:
        point = checkpoint.find_latest(root, cfg_data)
        resume_dir, start = point.path, point.data_position
        on_note(point.describe())
    own = pipe is None
    if own:
        pipe = Pipeline.start(cfg, sched)
    else:
        pipe.configure(cfg, sched)
    outcome = TrainOutcome(sched, start, resumed_from=str(resume_dir) if resume_dir else None,
                           device="gpu" if pipe.group.use_gpu else "cpu")
    try:
        if resume_dir is not None:
            pipe.load_checkpoint(str(resume_dir))
        if on_start is not None:
            on_start(pipe, start)
        every = cfg.run.checkpoint_every
        for step in range(start, cfg.run.steps):
            res = pipe.step(step)
            outcome.results.append(res)
            if every and (step + 1) % every == 0:
                d = checkpoint.step_dir(root, step)
                files = pipe.save_checkpoint(str(d), step)
                checkpoint.commit(root, step, cfg_data, files)
                outcome.checkpoints.append(str(d))
                size = sum(Path(f).stat().st_size for f in files)
                on_note(f"saved checkpoint {d} after step {step} ({len(files)} rank files, {size / 2**20:.1f} MiB)")
            if on_step is not None:
                on_step(res)
    except PipelineError as exc:
        exc.outcome = outcome  # type: ignore[attr-defined]  # the steps that did run, for the report
        raise
    finally:
        if own:
            pipe.close()
    return outcome


