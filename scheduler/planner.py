"""Recomputation planner: how many layers L_r per mHC recomputation block (docs/DESIGN.md §4).

Recomputing mHC's intermediates in blocks of L_r consecutive layers keeps only each
block's input, n*C per token, and rebuilds the block's intermediates during its backward.
docs/DESIGN.md's L counts hyper-connected sublayers; a layer here (as in ``model.layers`` and
``recompute.block_layers``) is an attention and an MLP sublayer, two of them. Per token
and micro-batch, with L and L_r in layers, the paper's count is

    n*C*ceil(L/L_r) + 2*(n+2)*C*L_r,   minimised at   L_r* = sqrt(n*L/(2*(n+2)))

which is docs/DESIGN.md's sqrt(n*L/(n+2)) in sublayers, halved back into layers (the closed
form). A pipeline rank holds several micro-batches at once, though, and only what F keeps
multiplies with them, while blocks are cut at stage boundaries; so the planner then
searches every L_r with the cost model: for each, the worst rank's peak (what F keeps for
its in-flight micro-batches, from the schedule, plus what one backward needs on top:
:func:`~dualpipe_mhc.scheduler.analytic.backward_transient_bytes`, plus parameters,
gradients and optimizer state) against the per-GPU budget, and the simulated step time.
It picks the fastest option that fits (no recomputation when that fits), ties going to
less memory. When nothing fits, it searches what a user would change (more ranks, fewer
tokens per micro-batch, another schedule, optimizer state sharded further) and names the
nearest option that fits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Protocol

GIB = 2**30
SUBLAYERS_PER_LAYER = 2  # attention + MLP, each wrapped by its own hyper-connection
# Bytes of state per parameter: bf16 weights + fp32 gradients with the optimizer state sharded
# over data-parallel replicas (ZeRO-1), the default; ZeRO-2 shards the gradients too.
STATE_BYTES = {"zero1": 6.0, "zero2": 2.0}


class PlanConfig(Protocol):
    """What the planner reads of a RunConfig (the scheduler does not import the config module)."""

    model: Any
    pipeline: Any
    link: Any
    hardware: Any
    recompute: Any
    run: Any

    def tokens_per_microbatch(self) -> int: ...


class InfeasiblePlan(ValueError):
    """No block size fits the budget; ``rows`` still holds the searched table, ``result`` the plan
    with its ``alternatives``."""

    def __init__(self, message: str, result: PlanResult) -> None:
        super().__init__(message)
        self.result = result
        self.rows = result.rows


@dataclass
class PlanRow:
    block_layers: int | None  # None: no recomputation
    activation_gib: float  # worst rank: in-flight activations + one backward's transient
    total_gib: float  # worst rank: activation_gib + parameters, gradients, optimizer state
    recompute_s: float  # recomputation time per step on the busiest rank
    step_time_s: float
    fits: bool


@dataclass
class Alternative:
    """A change a user can make (``changes``: config field -> value, or a plan flag) and its best row."""

    changes: dict[str, Any]
    choice: PlanRow

    def to_dict(self) -> dict[str, Any]:
        return {"changes": self.changes, **asdict(self.choice)}


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
    state_bytes_per_param: float
    choice: PlanRow
    rows: list[PlanRow] = field(default_factory=list)
    alternatives: list[Alternative] = field(default_factory=list)  # searched when nothing fits

    @property
    def feasible(self) -> bool:
        return self.choice.fits

    @property
    def block_layers(self) -> int | None:
        return self.choice.block_layers

    @property
    def enabled(self) -> bool:
        return self.choice.block_layers is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; an infeasible plan has no choice (null), its table and alternatives still there."""
        out = asdict(self)
        out["alternatives"] = [a.to_dict() for a in self.alternatives]
        out["feasible"] = self.feasible
        if not self.feasible:
            out["choice"] = None
        out["block_layers"] = self.block_layers if self.feasible else None
        out["enabled"] = self.enabled and self.feasible
        out["sharding"] = sharding_name(self.state_bytes_per_param)
        return out


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


@dataclass(frozen=True)
class _Setting:
    """Everything one plan evaluation depends on, as plain values."""

    shape: Any  # analytic.ModelShape
    schedule: str
    ranks: int
    microbatches: int
    hw: Any  # analytic.Hardware
    link_bandwidth: float
    link_latency: float
    budget_gib: float
    state_bytes_per_param: float
    traffic: str


def _setting(cfg: PlanConfig, schedule, budget_gib, state_bytes_per_param, traffic) -> _Setting:
    from .analytic import Hardware, shape_from_config

    if budget_gib is None:
        budget_gib = cfg.recompute.memory_budget_gib or cfg.hardware.memory_gib
    return _Setting(
        shape_from_config(cfg), schedule or cfg.pipeline.schedule, cfg.pipeline.ranks, cfg.pipeline.microbatches,
        Hardware(cfg.hardware.flops, cfg.hardware.bandwidth), cfg.link.bandwidth, cfg.link.latency,
        float(budget_gib), float(state_bytes_per_param), traffic,
    )  # fmt: skip


def _rows(st: _Setting) -> tuple[list[PlanRow], float]:
    """One row per candidate L_r (None first), and the worst rank's state bytes."""
    from .analytic import analytic_costs, backward_transient_bytes, shape_stage_layers, stage_params
    from .builders import build_schedule
    from .simulate import simulate

    sched = build_schedule(st.schedule, st.ranks, st.microbatches)
    shape = st.shape
    params = stage_params(shape, sched.num_stages)
    state = [sum(params[s] for s in sched.chunks_of(r).values()) * st.state_bytes_per_param for r in range(sched.ranks)]
    counts = shape_stage_layers(shape, sched.num_stages)
    max_block = min(shape.layers, max(8, 3 * math.ceil(closed_form(shape.n, shape.layers))))
    candidates: list[int | None] = [None, *range(1, max_block + 1)] if shape.residual != "plain" else [None]
    rows = []
    for lr in candidates:
        costs = analytic_costs(shape, st.hw, sched.num_stages, st.traffic, recompute_block=lr)
        costs = costs.with_link(st.link_bandwidth, st.link_latency)
        result = simulate(sched, costs, record_events=False)
        act, total = [], []
        for r in range(sched.ranks):
            stages = list(sched.chunks_of(r).values())
            transient = max(backward_transient_bytes(shape, counts[s], lr) for s in stages)
            act.append(result.peak_activation_bytes[r] + transient)
            total.append(act[-1] + state[r])
        recompute = max(sum(costs.recompute[s] for s in _stages_run(sched, r)) for r in range(sched.ranks))
        rows.append(
            PlanRow(lr, max(act) / GIB, max(total) / GIB, recompute, result.step_time, max(total) / GIB <= st.budget_gib)
        )
    return rows, max(state)


def _choose(rows: list[PlanRow]) -> PlanRow:
    """The fastest row that fits, ties to less memory; when none fits, the least memory."""
    fitting = [row for row in rows if row.fits]
    if fitting:
        return min(fitting, key=lambda row: (round(row.step_time_s, 9), row.total_gib))
    return min(rows, key=lambda row: (row.total_gib, row.block_layers or 0))


def _buildable(st: _Setting) -> bool:
    """The builders' own rules, and no more stages than layers."""
    from .builders import build_schedule
    from .ir import ScheduleError

    try:
        sched = build_schedule(st.schedule, st.ranks, st.microbatches)
    except ScheduleError:
        return False
    return sched.num_stages <= st.shape.layers


Change = tuple[dict[str, Any], Callable[[_Setting], _Setting]]


def _changes(st: _Setting, microbatch_size: int) -> list[Change]:
    """Single changes a user would try: (what to set, how it changes a setting)."""
    out: list[Change] = []
    for factor in (2, 4):

        def more_ranks(s: _Setting, factor: int = factor) -> _Setting:
            ranks = s.ranks * factor
            least = 2 * ranks if s.schedule in ("dualpipe", "dualpipev") else ranks
            return replace(s, ranks=ranks, microbatches=max(s.microbatches, least))

        changed = more_ranks(st)
        changes: dict[str, Any] = {"pipeline.ranks": changed.ranks}
        if changed.microbatches != st.microbatches:
            changes["pipeline.microbatches"] = changed.microbatches
        out.append((changes, more_ranks))
    if microbatch_size > 1:
        out.append((
            {"pipeline.microbatch_size": microbatch_size // 2},
            lambda s: replace(s, shape=replace(s.shape, tokens=s.shape.tokens // 2)),
        ))  # fmt: skip
    for name in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        if name != st.schedule:
            out.append(({"pipeline.schedule": name}, lambda s, name=name: replace(s, schedule=name)))
    for per_param in STATE_BYTES.values():
        if per_param < st.state_bytes_per_param:
            out.append((
                {"--state-bytes-per-param": per_param},
                lambda s, per_param=per_param: replace(s, state_bytes_per_param=per_param),
            ))  # fmt: skip
    return out


def _alternatives(st: _Setting, microbatch_size: int) -> list[Alternative]:
    """Every single change that makes the plan fit, nearest first (fewest changes, then the fastest
    step); if no single change does, the pairs that do."""
    singles = _changes(st, microbatch_size)
    candidates = [(c, f(st)) for c, f in singles]
    found = _fitting(candidates)
    if not found:
        pairs = [
            ({**c1, **c2}, f2(f1(st)))
            for i, (c1, f1) in enumerate(singles)
            for c2, f2 in singles[i + 1 :]
            if not set(c1) & set(c2)
        ]
        found = _fitting(pairs)
    return sorted(found, key=lambda a: (len(a.changes), round(a.choice.step_time_s, 6), a.choice.total_gib))


def _fitting(candidates: list[tuple[dict[str, Any], _Setting]]) -> list[Alternative]:
    found = []
    for changes, setting in candidates:
        if not _buildable(setting):
            continue
        best = _choose(_rows(setting)[0])
        if best.fits:
            found.append(Alternative(changes, best))
    return found


def plan_recompute(
    cfg: PlanConfig,
    schedule: str | None = None,
    budget_gib: float | None = None,
    state_bytes_per_param: float | None = None,
    traffic: str = "fused",
) -> PlanResult:
    """Plan L_r for ``cfg`` on its pipeline schedule (or ``schedule``).

    ``budget_gib``: per-GPU memory; default ``recompute.memory_budget_gib``, else
    ``hardware.memory_gib``. ``state_bytes_per_param``: parameter, gradient and optimizer
    bytes per parameter on a rank (6: bf16 weights + fp32 gradients, optimizer state sharded
    over data parallel, ZeRO-1; 2: gradients sharded too, ZeRO-2; 18 unsharded). Left out,
    the planner takes ZeRO-1 and moves to ZeRO-2 only when nothing fits under ZeRO-1.
    Raises :class:`InfeasiblePlan` (a ValueError) when no block size fits; its ``result``
    holds the nearest changes that do fit.
    """
    levels = [state_bytes_per_param] if state_bytes_per_param is not None else list(STATE_BYTES.values())
    for per_param in levels:
        st = _setting(cfg, schedule, budget_gib, per_param, traffic)
        rows, state = _rows(st)
        if _choose(rows).fits:
            break
    shape = st.shape
    result = PlanResult(
        schedule=st.schedule, streams=shape.n, layers=shape.layers, closed_form=closed_form(shape.n, shape.layers),
        closed_form_block=closed_form_block(shape.n, shape.layers), budget_gib=st.budget_gib, state_gib=state / GIB,
        state_bytes_per_param=st.state_bytes_per_param, choice=_choose(rows), rows=rows,
    )  # fmt: skip
    if not result.feasible:
        result.alternatives = _alternatives(st, cfg.pipeline.microbatch_size)
        best = result.choice
        hint = (
            "nearest change that fits: " + describe_change(result.alternatives[0].changes)
            if result.alternatives
            else "no change of ranks, micro-batch size, schedule or state sharding, alone or in pairs, fits"
        )
        raise InfeasiblePlan(
            f"memory budget {st.budget_gib:g} GiB is infeasible for {st.schedule} on {st.ranks} ranks at "
            f"{st.state_bytes_per_param:g} state bytes per parameter: the best option (L_r={best.block_layers}) needs "
            f"{best.total_gib:.1f} GiB on the fullest rank, {best.total_gib - st.budget_gib:.1f} GiB over; {hint}",
            result,
        )
    return result


def sharding_name(state_bytes_per_param: float) -> str:
    """'zero1' / 'zero2' for the planner's levels, else the bytes per parameter."""
    names = {v: k for k, v in STATE_BYTES.items()}
    return names.get(state_bytes_per_param, f"{state_bytes_per_param:g} B/param")


def describe_change(changes: dict[str, Any]) -> str:
    """The command-line form of a change: ``--set a.b=v`` for config fields, the flag itself for the rest."""
    parts = []
    for key, value in changes.items():
        if key == "--state-bytes-per-param":
            parts.append(f"{key} {value:g} ({sharding_name(value)})")
        else:
            parts.append(f"--set {key}={value}")
    return " ".join(parts)


def resolve_block_layers(cfg: PlanConfig) -> int | None:
    """The L_r a run of ``cfg`` uses: None when recomputation is off, the configured block, or, for
    ``block_layers = "auto"``, the planned one. Call it once, on the driver."""
    if not cfg.recompute.enabled:
        return None
    block = cfg.recompute.block_layers
    return block if isinstance(block, int) else optimal_block_layers(cfg)


def optimal_block_layers(cfg: PlanConfig) -> int:
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
