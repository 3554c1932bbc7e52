"""Checkpoint layout on disk, written by the ranks and committed by the driver.

    <checkpoint_dir>/step_000004/rank0.pt ... rankN.pt   every rank's chunks + optimizer state
    <checkpoint_dir>/step_000004/meta.json                written last: the checkpoint is complete

A rank file holds its stages' parameters, the optimizer state and the data position
(the next step index; batches are drawn per step from the seed, see :mod:`.data`).
A checkpoint without ``meta.json`` (a run killed while saving) is ignored by resume, which
takes the newest complete ``step_*`` directory.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

# What must match between the run that saved and the run that resumes.
COMPATIBLE = ("model", "pipeline")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def commit(root: str | Path, step: int, cfg_data: dict[str, Any]) -> Path:
    """Mark ``step``'s checkpoint complete (after every rank saved): ``meta.json`` is written last."""
    d = step_dir(root, step)
    meta = {"step": step, "data_position": step + 1, "time": time.time(),
            "config": {k: cfg_data[k] for k in COMPATIBLE}}
    tmp = d / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, d / "meta.json")  # atomic: a half-written meta.json never marks a checkpoint complete
    return d


def find_latest(root: str | Path, cfg_data: dict[str, Any]) -> tuple[Path, int]:
    """The newest complete checkpoint under ``root`` and its data position; raises ValueError
    with what to do when there is none or it belongs to a different model or pipeline."""
    root = Path(root)
    complete = sorted(p.parent for p in root.glob("step_*/meta.json"))
    if not complete:
        raise ValueError(
            f"--resume: no complete checkpoint under {root}; run with run.checkpoint_every=K first "
            "(or point run.checkpoint_dir at the directory that has one)"
        )
    latest = complete[-1]
    meta = json.loads((latest / "meta.json").read_text())
    for section in COMPATIBLE:
        if meta["config"][section] != cfg_data[section]:
            diff = sorted(k for k in cfg_data[section] if meta["config"][section].get(k) != cfg_data[section][k])
            raise ValueError(
                f"--resume: checkpoint {latest} was saved with a different {section} config ({', '.join(diff)}); "
                f"resume with the same {section} settings or use another run.checkpoint_dir"
            )
    return latest, int(meta["data_position"])
