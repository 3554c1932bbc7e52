"""Checkpoint layout on disk, written by the ranks and committed by the driver.

    <checkpoint_dir>/step_000004/rank0.pt ... rankN.pt   every rank's chunks + optimizer state
    <checkpoint_dir>/step_000004/meta.json                written last: the checkpoint is complete

A rank file holds its stages' parameters, the optimizer state and the data position
(the next step index; batches are drawn per step from the seed, see :mod:`.data`).
``meta.json`` records every rank file's size and sha256, so a resume verifies the whole
checkpoint on the driver before any worker starts, and names the file that is wrong.
Resume takes the newest checkpoint that verifies and says which ones it passed over; a
directory without ``meta.json`` (a run killed while saving) is skipped silently.

The driver reads the rank files back to hash them (one sequential pass per save): the
checkpoint directory is shared between driver and workers, as resume already needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What must match between the run that saved and the run that resumes.
COMPATIBLE = ("model", "pipeline")
META = "meta.json"
FORMAT = "dualpipe-mhc-checkpoint/2"  # /2: meta.json records each rank file's bytes and sha256


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from; the message is one line naming the file and what to do."""


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a resume starts from and the ones newer than it that failed verification."""

    path: Path
    data_position: int
    skipped: list[str] = field(default_factory=list)  # "step_000009: <why>", newest first

    def describe(self) -> str:
        """One line for the user: where the run resumes, and what it passed over."""
        line = f"resuming from checkpoint {self.path} at step {self.data_position}"
        if self.skipped:
            line += f"; skipped newer, incomplete: {'; '.join(self.skipped)}"
        return line


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def commit(root: str | Path, step: int, cfg_data: dict[str, Any], files: list[str]) -> Path:
    """Mark ``step``'s checkpoint complete once every rank saved ``files`` into it: their sizes and
    checksums go into ``meta.json``, which is written last and atomically."""
    d = step_dir(root, step)
    recorded = {}
    for name in sorted(Path(f).name for f in files):
        path = d / name
        recorded[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    meta = {"format": FORMAT, "step": step, "data_position": step + 1, "time": time.time(),
            "files": recorded, "config": {k: cfg_data[k] for k in COMPATIBLE}}
    tmp = d / f"{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, d / META)  # atomic: a half-written meta.json never marks a checkpoint complete
    return d


def verify(d: str | Path) -> dict[str, Any]:
    """``d``'s meta.json, after checking that it parses, that it records a file for each rank of
    the pipeline it was saved with, and that each file is present with the recorded size and
    sha256. Raises CheckpointError naming the first file that is wrong."""
    d = Path(d)
    meta_path = d / META
    text = meta_path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CheckpointError(f"{meta_path} is empty")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{meta_path} records no file sizes or checksums (saved before {FORMAT})")
    for key in ("data_position", "config"):
        if key not in meta:
            raise CheckpointError(f"{meta_path} lacks {key!r}")
    ranks = int(meta["config"]["pipeline"]["ranks"])
    expected = {f"rank{r}.pt" for r in range(ranks)}
    missing = sorted(expected - set(meta["files"]))
    if missing:
        raise CheckpointError(
            f"{meta_path} records no {missing[0]} ({len(meta['files'])} rank files for {ranks} ranks)"
        )
    for name, rec in sorted(meta["files"].items()):
        path = d / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise CheckpointError(f"{path} is {size} bytes, {META} recorded {rec['bytes']} (truncated or overwritten)")
        if _sha256(path) != rec["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in {META} (corrupt)")
    return meta


def find_latest(root: str | Path, cfg_data: dict[str, Any]) -> ResumePoint:
    """The newest checkpoint under ``root`` that verifies (:func:`verify`), with the newer ones it
    passed over. Raises CheckpointError (one line, naming the bad file and what to do) when
    none verifies, or when the newest good one belongs to a different model or pipeline."""
    root = Path(root)
    candidates = sorted((p.parent for p in root.glob(f"step_*/{META}")), reverse=True)
    if not candidates:
        raise CheckpointError(
            f"--resume: no complete checkpoint under {root}; run with run.checkpoint_every=K first "
            "(or point run.checkpoint_dir at the directory that has one)"
        )
    skipped, errors = [], []
    for d in candidates:
        try:
            meta = verify(d)
        except CheckpointError as exc:
            errors.append(str(exc))
            skipped.append(f"{d.name}: {exc}")
            continue
        _check_compatible(d, meta, cfg_data)
        return ResumePoint(d, int(meta["data_position"]), skipped)
    raise CheckpointError(
        f"--resume: no checkpoint under {root} verifies: {'; '.join(errors)}; "
        "delete the bad step_* directories or start without --resume"
    )


def _check_compatible(d: Path, meta: dict[str, Any], cfg_data: dict[str, Any]) -> None:
    for section in COMPATIBLE:
        saved = meta["config"].get(section, {})
        if saved != cfg_data[section]:
            diff = sorted(k for k in cfg_data[section] if saved.get(k) != cfg_data[section][k])
            raise CheckpointError(
                f"--resume: checkpoint {d} was saved with a different {section} config ({', '.join(diff)}); "
                f"resume with the same {section} settings or use another run.checkpoint_dir"
            )
