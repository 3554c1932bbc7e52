"""Recomputation planner: the closed form, the budget search, infeasible budgets, the CLI."""

from __future__ import annotations

import json
import math

import pytest

from dualpipe_mhc import load_config
from dualpipe_mhc.cli import main
from dualpipe_mhc.scheduler.planner import (
    InfeasiblePlan, closed_form, closed_form_block, describe_change, plan_recompute,
)  # fmt: skip


def _per_token_memory(n: int, layers: int, lr: int) -> float:
    """docs/DESIGN.md §4, in units of C: kept block inputs + one block's intermediates, (n+2)*C for each
    of a layer's two mHC sublayers."""
    return n * math.ceil(layers / lr) + 2 * (n + 2) * lr


@pytest.mark.parametrize("n, layers", [(4, 24), (4, 48), (4, 56), (4, 61), (2, 32), (8, 40), (1, 12)])
def test_closed_form_is_sqrt_nl_over_n_plus_2_and_near_the_discrete_optimum(n, layers):
    # docs/DESIGN.md's sqrt(nL/(n+2)) counts mHC sublayers; two per layer, so in layers it is halved.
    assert closed_form(n, layers) == pytest.approx(math.sqrt(n * 2 * layers / (n + 2)) / 2)
    assert closed_form(n, layers) == pytest.approx(math.sqrt(n * layers / (2 * (n + 2))))
    block = closed_form_block(n, layers)
    assert abs(block - closed_form(n, layers)) < 1
    best = min(_per_token_memory(n, layers, lr) for lr in range(1, layers + 1))
    assert _per_token_memory(n, layers, block) <= 1.1 * best
    if (n, layers) == (4, 48):  # sqrt(4*48/12) = 4 exactly, and 4 is the discrete optimum
        assert block == 4 and _per_token_memory(4, 48, 4) == best


@pytest.fixture(scope="module")
def paper():
    return load_config("paper-27b")


@pytest.fixture(scope="module")
def table(paper):
    return plan_recompute(paper, budget_gib=1e6).rows


def test_plan_searches_every_block_size_and_recomputation_trades_time_for_memory(table):
    off, *recomputed = table
    assert off.block_layers is None and [r.block_layers for r in recomputed] == list(range(1, len(recomputed) + 1))
    assert all(r.recompute_s > 0 and r.step_time_s > off.step_time_s for r in recomputed)
    assert all(r.activation_gib < off.activation_gib for r in recomputed)
    assert off.recompute_s == 0


def test_a_roomy_budget_needs_no_recomputation(paper, table):
    plan = plan_recompute(paper, budget_gib=table[0].total_gib + 1)
    assert not plan.enabled and plan.block_layers is None


def test_a_tight_budget_picks_a_block_that_fits(paper, table):
    best = min(table, key=lambda r: r.total_gib)
    budget = (best.total_gib + table[0].total_gib) / 2
    plan = plan_recompute(paper, budget_gib=budget)
    assert plan.enabled and plan.choice.total_gib <= budget
    # The fastest block that fits wins: smaller blocks skip more of the post/res rebuilds (each
    # block's last one is never needed), so recomputation costs differ by L_r.
    fitting = [r for r in table if r.block_layers and r.total_gib <= budget]
    assert plan.choice == min(fitting, key=lambda r: (round(r.step_time_s, 9), r.total_gib))
    assert len({round(r.recompute_s, 9) for r in fitting}) > 1


def test_an_infeasible_budget_says_by_how_much(paper, table):
    best = min(table, key=lambda r: r.total_gib)
    with pytest.raises(InfeasiblePlan, match=rf"\(L_r={best.block_layers}\) needs {best.total_gib:.1f} GiB .* 1\.5 GiB over"):
        plan_recompute(paper, budget_gib=best.total_gib - 1.5, state_bytes_per_param=6.0)


def test_the_default_plan_answers_and_an_infeasible_one_names_the_nearest_change(tmp_path, capsys):
    """paper-27b does not fit 80 GiB under ZeRO-1 at any L_r; left to choose, the planner shards the
    gradients too (ZeRO-2) and fits. Pinned to ZeRO-1 it exits 2 naming the nearest change that fits."""
    out = tmp_path / "plan.json"
    assert main(["plan", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["feasible"] and report["sharding"] == "zero2" and report["enabled"]
    assert report["choice"]["total_gib"] <= report["budget_gib"] == 80
    capsys.readouterr()
    assert main(["plan", "--state-bytes-per-param", "6", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    report = json.loads(out.read_text())
    assert not report["feasible"] and {"choice", "block_layers", "enabled", "state_gib"} <= report.keys()
    alternatives = report["alternatives"]
    assert alternatives and all(a["fits"] and a["total_gib"] <= 80 for a in alternatives)
    assert {"--state-bytes-per-param": 2.0} in [a["changes"] for a in alternatives]
    nearest = describe_change(alternatives[0]["changes"])
    assert f"nearest change that fits: {nearest}" in err and err.count("\n") == 1


def test_plain_residual_has_nothing_to_recompute(paper):
    plan = plan_recompute(load_config("paper-27b", ["model.streams=1", "model.residual=plain"]), budget_gib=1e6)
    assert [r.block_layers for r in plan.rows] == [None] and not plan.enabled


def test_plan_cli_json_and_errors(tmp_path, capsys, table):
    out = tmp_path / "plan.json"
    budget = min(r.total_gib for r in table) + 0.5
    assert main(["plan", "--budget-gib", str(budget), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"block_layers", "enabled", "closed_form", "closed_form_block", "budget_gib", "state_gib", "choice", "rows"} <= report.keys()
    assert report["enabled"] and report["block_layers"] == report["choice"]["block_layers"]
    assert "chosen" in capsys.readouterr().out
    assert main(["plan", "--budget-gib", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dualpipe-mhc plan: error: memory budget 10 GiB is infeasible") and err.count("\n") == 1


def test_the_runtime_hook_returns_the_planned_block(paper, table):
    from dualpipe_mhc.scheduler.planner import optimal_block_layers

    best = min((r for r in table if r.block_layers), key=lambda r: r.total_gib)
    budget = best.total_gib + 0.5
    cfg = load_config("paper-27b", ["recompute.enabled=true", f"recompute.memory_budget_gib={budget}"])
    plan = plan_recompute(cfg)
    assert optimal_block_layers(cfg) == plan.block_layers and plan.choice.fits and plan.block_layers is not None
    tight = load_config("paper-27b", ["recompute.enabled=true", "recompute.memory_budget_gib=10"])
    assert optimal_block_layers(tight) == best.block_layers  # infeasible: still the least memory, no raise


@pytest.mark.parametrize("option", [["--budget-gib", "-1"], ["--budget-gib", "nan"], ["--budget-gib", "inf"],
                                    ["--state-bytes-per-param", "-1"], ["--state-bytes-per-param", "nan"]])
def test_plan_refuses_a_negative_or_non_finite_option(capsys, option):
    assert main(["plan", *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dualpipe-mhc plan: error: {option[0]} ") and "is invalid" in err and err.count("\n") == 1
