"""The analytic cost model calibrated to a device: per-part efficiencies fitted to measured stages.

A stage's analytic F, B and W split into parts, each priced by :mod:`.analytic` from FLOPs and
bytes over the preset's achieved rates:

    layer   the stage's layers as plain-residual layers (GEMMs, attention, norms, residual)
    mhc     what n streams add on top (mHC mappings, wider residual traffic, recomputation in B)
    head    the vocabulary head and its cross-entropy (last stage)
    embed   the embedding gather and widening (first stage)
    fixed   1 s per action: its multiplier is the per-action overhead in seconds (launches, the
            host), which dominates small shapes and is ~0 at a 27B-class stage

and its kept memory into ``base`` (the layers' activations), ``head`` (the logits) and ``mhc``
(the n-stream intermediates, or the kept block inputs under recomputation). A calibration holds one
multiplier per (kind, part) -- ``f.layer``, ``b.mhc``, ``w.head``, ``mem.base`` ... -- fitted
by least squares on relative error over every measured stage of a ``profile-stages`` run (both
n = 1 and n), so calibrated costs are the analytic model with measured efficiencies:

    calibrated F = f.layer x layer + f.mhc x mhc + f.head x head + f.embed x embed

Stages of one model differ only in layer count and ends, so per-op-kind rates (GEMM vs memory)
cannot be told apart from them; per-part multipliers can, and they carry over to other stage
counts, splits, micro-batch sizes and n of the same layer shape. File (JSON)::

    {"format": "dualpipe-mhc-hardware/1", "name": "h200-fitted",
     "matmul_tflops": 790.0, "hbm_tbps": 4.27,           # the rates the parts are priced at
     "scales": {"f.layer": 1.41, "f.mhc": 1.9, ...},      # absent: 1
     "fit": {"max_rel_error": {"f": 0.03, ...}, "observations": 32}, "meta": {...}}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .analytic import (
    TRAFFIC, Hardware, ModelShape, analytic_costs, layer_cost, shape_stage_layers, stage_kept_bytes,
)  # fmt: skip
from .costs import Costs

HARDWARE_FORMAT = "dualpipe-mhc-hardware/1"
KINDS = ("f", "b", "w")
PARTS = ("layer", "mhc", "head", "embed", "fixed")
MEM_PARTS = ("base", "head", "mhc")


@dataclass
class Calibration:
    name: str
    flops: float  # FLOP/s the parts are priced at
    hbm: float  # bytes/s
    scales: dict[str, float] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def hardware(self) -> Hardware:
        return Hardware(self.flops, self.hbm)

    def scale(self, key: str) -> float:
        """The multiplier of ``kind.part``: 1 when not fitted, except the overhead's (0 s)."""
        return self.scales.get(key, 0.0 if key.endswith(".fixed") else 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"format": HARDWARE_FORMAT, "name": self.name, "matmul_tflops": self.flops / 1e12,
                "hbm_tbps": self.hbm / 1e12, "scales": self.scales, "fit": self.fit, "meta": self.meta}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @staticmethod
    def read(path: str | Path) -> Calibration:
        """One-line ValueError naming the file and the field for anything malformed."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"hardware calibration {path} does not exist; fit one with profile-stages --fit-hardware") from None
        except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as exc:
            raise ValueError(f"hardware calibration {path} is not a JSON file: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != HARDWARE_FORMAT:
            raise ValueError(f"hardware calibration {path}: format must be {HARDWARE_FORMAT!r}")
        scales = data.get("scales") or {}
        valid = {f"{k}.{p}" for k in KINDS for p in PARTS} | {f"mem.{p}" for p in MEM_PARTS}
        for key in ("matmul_tflops", "hbm_tbps"):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"hardware calibration {path}: {key}={value!r} is invalid; use a positive number")
        for key, value in scales.items():
            if key not in valid:
                raise ValueError(f"hardware calibration {path}: scales.{key} is unknown; use keys of {sorted(valid)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"hardware calibration {path}: scales.{key}={value!r} is invalid; use a number >= 0")
        return Calibration(str(data.get("name", Path(path).stem)), data["matmul_tflops"] * 1e12, data["hbm_tbps"] * 1e12,
                           {k: float(v) for k, v in scales.items()}, dict(data.get("fit") or {}), dict(data.get("meta") or {}))


def read_calibration(name: str | Path) -> Calibration:
    """A calibration by file path, or by the name of a fit bundled in ``dualpipe_mhc/configs/hardware/``."""
    if not Path(name).exists():
        from importlib import resources

        bundled = resources.files("dualpipe_mhc.configs").joinpath("hardware").joinpath(f"{name}.json")
        if bundled.is_file():
            return Calibration.read(str(bundled))
    return Calibration.read(name)


def stage_parts(
    shape: ModelShape, hw: Hardware, num_stages: int, traffic: str = "fused", recompute_block: int | None = None
) -> list[dict[str, dict[str, float]]]:
    """Per stage: ``{"f": {part: s}, "b": ..., "w": ..., "mem": {"base": bytes, "mhc": bytes}}``; the
    parts but ``fixed`` sum to :func:`.analytic.analytic_costs`' figures."""
    tr = TRAFFIC[traffic]
    layer = layer_cost(shape, hw, tr)
    plain_shape = replace(shape, residual="plain", streams=1)
    plain = layer_cost(plain_shape, hw, tr)
    full = analytic_costs(shape, hw, num_stages, traffic, recompute_block, include_head=True)
    headless = analytic_costs(shape, hw, num_stages, traffic, recompute_block, include_head=False)
    out = []
    for s, count in enumerate(shape_stage_layers(shape, num_stages)):
        parts: dict[str, dict[str, float]] = {}
        for k in KINDS:
            lay = count * getattr(plain, k)
            mhc = count * (getattr(layer, k) - getattr(plain, k)) + (full.recompute[s] if k == "b" else 0.0)
            head = getattr(full, k)[s] - getattr(headless, k)[s]
            embed = getattr(headless, k)[s] - lay - mhc
            parts[k] = {"layer": lay, "mhc": mhc, "head": head, "embed": embed, "fixed": 1.0}
        base = stage_kept_bytes(plain_shape, 0, count)  # what the plain residual keeps of these layers
        head = full.act_mem_bytes[s] - headless.act_mem_bytes[s]
        parts["mem"] = {"base": base, "head": head, "mhc": full.act_mem_bytes[s] - base - head}
        out.append(parts)
    return out


def calibrated_costs(
    shape: ModelShape, cal: Calibration, num_stages: int, traffic: str = "fused", recompute_block: int | None = None
) -> Costs:
    """The analytic costs of ``shape`` with ``cal``'s rates and per-part multipliers (link unlimited)."""
    hw = cal.hardware
    base = analytic_costs(shape, hw, num_stages, traffic, recompute_block)
    parts = stage_parts(shape, hw, num_stages, traffic, recompute_block)
    priced = {k: [sum(cal.scale(f"{k}.{p}") * st[k][p] for p in PARTS) for st in parts] for k in KINDS}
    mem = [sum(cal.scale(f"mem.{p}") * st["mem"][p] for p in MEM_PARTS) for st in parts]
    return Costs(
        priced["f"], priced["b"], priced["w"], base.act_bytes, mem,
        [r * cal.scale("b.mhc") for r in base.recompute],
        meta={**base.meta, "source": "calibrated", "calibration": cal.name},
    )


@dataclass(frozen=True)
class Observation:
    """One measured stage set: the shape it ran, how it was cut, and what was measured."""

    shape: ModelShape
    num_stages: int
    measured: Costs
    recompute_block: int | None = None
    traffic: str = "fused"


def fit_calibration(name: str, hw: Hardware, observations: list[Observation], meta: dict | None = None) -> Calibration:
    """Per-part multipliers minimising the squared relative error of every stage's F, B, W and
    kept memory; a part no observation exercises keeps 1. Reports the fit's worst relative error
    per kind, before (the plain preset) and after."""
    rows: dict[str, list[tuple[dict[str, float], float]]] = {k: [] for k in (*KINDS, "mem")}
    for ob in observations:
        parts = stage_parts(ob.shape, hw, ob.num_stages, ob.traffic, ob.recompute_block)
        for s, st in enumerate(parts):
            for k in KINDS:
                rows[k].append((st[k], getattr(ob.measured, k)[s]))
            if ob.measured.act_mem_bytes[s] > 0:
                rows["mem"].append((st["mem"], ob.measured.act_mem_bytes[s]))
    scales: dict[str, float] = {}
    report: dict[str, Any] = {"max_rel_error": {}, "max_rel_error_uncalibrated": {}, "observations": len(rows["f"])}
    for k, data in rows.items():
        names = MEM_PARTS if k == "mem" else PARTS
        data = [(p, m) for p, m in data if m > 0]
        if not data:
            continue
        fitted = _nonneg_least_squares([[p[n] / m for n in names] for p, m in data], [1.0] * len(data))
        for n, x in zip(names, fitted):
            if x is not None:
                scales[f"{k}.{n}"] = x
        cal = Calibration(name, hw.flops, hw.hbm, scales)
        errs = [abs(sum(cal.scale(f"{k}.{n}") * p[n] for n in names) / m - 1.0) for p, m in data]
        raw = [abs(sum(v for n, v in p.items() if n != "fixed") / m - 1.0) for p, m in data]
        report["max_rel_error"][k] = max(errs)
        report["max_rel_error_uncalibrated"][k] = max(raw)
    return Calibration(name, hw.flops, hw.hbm, scales, report, dict(meta or {}))


def _nonneg_least_squares(a: list[list[float]], b: list[float]) -> list[float | None]:
    """min |A x - b|² with x >= 0 over the columns that are not all zero (others: None).

    Small and dense (four unknowns): normal equations by Gaussian elimination, dropping the most
    negative column until every coefficient is >= 0, as an active-set NNLS would end.
    """
    cols = len(a[0])
    scale = [max((abs(row[j]) for row in a), default=0.0) for j in range(cols)]
    # A column below 1e-6 of the largest contributes nothing measurable; fitting it would be noise.
    top = max(scale) if scale else 0.0
    active = [j for j in range(cols) if scale[j] > 1e-6 * top]
    while active:
        x = _solve([[row[j] / scale[j] for j in active] for row in a], b)
        if x is not None and min(x) >= 0:
            out: list[float | None] = [None] * cols
            for j, v in zip(active, x):
                out[j] = v / scale[j]
            return out
        worst = active[min(range(len(active)), key=lambda i: x[i]) if x is not None else -1]
        active.remove(worst)
    return [None] * cols


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    n = len(a[0])
    m = [[sum(r[i] * r[j] for r in a) for j in range(n)] + [sum(r[i] * y for r, y in zip(a, b))] for i in range(n)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) < 1e-12:
            return None  # collinear columns: the caller drops one
        m[c], m[p] = m[p], m[c]
        for r in range(n):
            if r != c:
                f = m[r][c] / m[c][c]
                m[r] = [x - f * y for x, y in zip(m[r], m[c])]
    return [m[i][n] / m[i][i] for i in range(n)]
