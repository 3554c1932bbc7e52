"""Recomputation planner: how many layers L_r per mHC recomputation block (docs/DESIGN.md §4).

Recomputing mHC's intermediates in blocks of L_r consecutive layers keeps only each
block's input, n*C per token, and rebuilds one block's intermediates, (n+2)*C per
mHC-wrapped sublayer, during its backward. docs/DESIGN.md's L counts those sublayers; a
layer here (as in ``model.layers`` and ``recompute.block_layers``) is an attention
and an MLP sublayer, two of them. Per token and micro-batch, with L and L_r in layers:

    n*C*ceil(L/L_r) + 2*(n+2)*C*L_r,   minimised at   L_r* = sqrt(n*L/(2*(n+2)))

which is docs/DESIGN.md's sqrt(n*L/(n+2)) in sublayers, halved back into layers (the closed
form). A pipeline rank holds several micro-batches at once, though, and
only the kept inputs multiply with them, while blocks are cut at stage boundaries; so
the planner then searches every L_r with the cost model: for each, the worst rank's peak
(activations of its in-flight micro-batches from the schedule, plus one block being
rebuilt, plus parameters, gradients and optimizer state) against the per-GPU budget,
and the simulated step time. It picks the fastest option that fits (no recomputation
when that fits), ties going to less memory, and fails saying by how much the budget is
short when nothing fits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 2**30


class InfeasiblePlan(ValueError):
    """No block size fits the budget; ``rows`` still holds the searched table."""

    def __init__(self, message: str, rows: list[PlanRow]) -> None:
        super().__init__(message)
        self.rows = rows


@dataclass
class PlanRow:
    block_layers: int | None  # None: no recomputation
    activation_gib: float  # worst rank: in-flight activations + one block being rebuilt
    total_gib: float  # worst rank: activation_gib + parameters, gradients, optimizer state
    recompute_s: float  # recomputation time per step on the busiest rank
    step_time_s: float
    fits: bool


@dataclass
class PlanResult:
    """The plan; ``block_layers`` is what the runtime takes (None: recomputation off)."""

    schedule: str
    streams: int
    layers: int
    closed_form: float  # sqrt(n*L/(2(n+2))) layers, unrounded
    closed_form_block: int
    budget_gib: float
    state_gib: float  # worst rank's parameters + gradients + optimizer state
    choice: PlanRow
    rows: list[PlanRow] = field(default_factory=list)

    @property
    def block_layers(self) -> int | None:
        return self.choice.block_layers

    @property
    def enabled(self) -> bool:
        return self.choice.block_layers is not None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["block_layers"] = self.block_layers
        out["enabled"] = self.enabled
        return out


SUBLAYERS_PER_LAYER = 2  # attention + MLP, each wrapped by its own hyper-connection


def closed_form(streams: int, layers: int) -> float:
    """L_r* in layers: docs/DESIGN.md's sqrt(n*L/(n+2)) over sublayers, i.e. sqrt(n*L/(2(n+2))) over layers,
    the minimum of n*C*L/L_r + 2*(n+2)*C*L_r."""
    sublayers = SUBLAYERS_PER_LAYER * layers
    return math.sqrt(streams * sublayers / (streams + 2)) / SUBLAYERS_PER_LAYER


def closed_form_block(streams: int, layers: int) -> int:
    """The closed form rounded to the better neighbouring integer block size."""
    x = closed_form(streams, layers)
    candidates = {max(1, math.floor(x)), max(1, math.ceil(x))}

    def memory(lr: int) -> float:
        return streams * math.ceil(layers / lr) + SUBLAYERS_PER_LAYER * (streams + 2) * lr

    return min(min(candidates, key=lambda lr: (memory(lr), lr)), layers)


def plan_recompute(
    cfg,
    schedule: str | None = None,
    budget_gib: float | None = None,
    state_bytes_per_param: float = 6.0,
    traffic: str = "fused",
) -> PlanResult:
    """Plan L_r for ``cfg`` (a RunConfig, read duck-typed) on its pipeline schedule.

    ``budget_gib``: per-GPU memory; default ``recompute.memory_budget_gib``, else
    ``hardware.memory_gib``. ``state_bytes_per_param``: 6 = bf16 weights + fp32 gradients
    with the optimizer state sharded over data parallel (ZeRO-1); 18 without sharding.
    Raises :class:`InfeasiblePlan` (a ValueError) when no block size fits.
    """
    from .analytic import Hardware, analytic_costs, shape_from_config, stage_params
    from .builders import build_schedule
    from .simulate import simulate

    name = schedule or cfg.pipeline.schedule
    sched = build_schedule(name, cfg.pipeline.ranks, cfg.pipeline.microbatches)
    shape = shape_from_config(cfg)
    hw = Hardware(cfg.hardware.flops, cfg.hardware.bandwidth)
    if budget_gib is None:
        budget_gib = cfg.recompute.memory_budget_gib or cfg.hardware.memory_gib
    params = stage_params(shape, sched.num_stages)
    state = [sum(params[s] for s in sched.chunks_of(r).values()) * state_bytes_per_param for r in range(sched.ranks)]
    # one layer's mHC intermediates: (n+2)*C per token for each of its two sublayers
    block_bytes = shape.bytes_per_elem * shape.tokens * SUBLAYERS_PER_LAYER * (shape.n + 2) * shape.width

    rows = []
    max_block = min(shape.layers, max(8, 3 * math.ceil(closed_form(shape.n, shape.layers))))
    candidates: list[int | None] = [None, *range(1, max_block + 1)] if shape.residual != "plain" else [None]
    for lr in candidates:
        costs = analytic_costs(shape, hw, sched.num_stages, traffic, recompute_block=lr)
        costs = costs.with_link(cfg.link.bandwidth, cfg.link.latency)
        result = simulate(sched, costs, record_events=False)
        transient = block_bytes * lr if lr else 0.0
        act = [result.peak_activation_bytes[r] + transient for r in range(sched.ranks)]
        total = [a + s for a, s in zip(act, state)]
        recompute = max(
            sum(costs.recompute[s] for s in _stages_run(sched, r)) for r in range(sched.ranks)
        )
        rows.append(
            PlanRow(lr, max(act) / GIB, max(total) / GIB, recompute, result.step_time, max(total) / GIB <= budget_gib)
        )
    fitting = [row for row in rows if row.fits]
    if not fitting:
        best = min(rows, key=lambda row: row.total_gib)
        raise InfeasiblePlan(
            f"memory budget {budget_gib:g} GiB is infeasible for {name} on {sched.ranks} ranks: the best option "
            f"(L_r={best.block_layers}) needs {best.total_gib:.1f} GiB on the fullest rank, {best.total_gib - budget_gib:.1f} GiB "
            "over; raise recompute.memory_budget_gib or hardware.memory_gib, use more ranks, or shrink the micro-batch "
            "(pipeline.microbatch_size, model.seq_len)",
            rows,
        )
    choice = min(fitting, key=lambda row: (round(row.step_time_s, 9), row.total_gib))
    cf = closed_form(shape.n, shape.layers)
    return PlanResult(
        schedule=name, streams=shape.n, layers=shape.layers, closed_form=cf,
        closed_form_block=closed_form_block(shape.n, shape.layers), budget_gib=budget_gib,
        state_gib=max(state) / GIB, choice=choice, rows=rows,
    )


def optimal_block_layers(cfg) -> int:
    """L_r for a run that asked for recomputation with ``block_layers = "auto"``: the planned
    block on the config's schedule and budget. When recomputation is not needed to fit, or
    nothing fits, it is still the block with the least memory, so a run never fails here
    (``dualpipe-mhc plan`` says whether the budget holds)."""
    try:
        plan = plan_recompute(cfg)
        rows = plan.rows
        if plan.block_layers is not None:
            return plan.block_layers
    except InfeasiblePlan as exc:
        rows = exc.rows
    blocks = [r for r in rows if r.block_layers is not None]
    if not blocks:  # plain residual: nothing to recompute, any block size is a no-op
        return closed_form_block(1, cfg.model.layers)
    return min(blocks, key=lambda r: (r.total_gib, r.block_layers)).block_layers


def _stages_run(sched, rank: int) -> list[int]:
    """Every (stage) backward this rank runs in a step, once per micro-batch."""
    return [h.stage for a in sched.actions[rank] for h in a.halves() if h.kind == "B"]
