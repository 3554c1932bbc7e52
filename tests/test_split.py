"""The stage split: one torch-free function for the model, the simulator and the runtime."""

from __future__ import annotations

import itertools

import pytest

from dualpipe_mhc.config import load_config
from dualpipe_mhc.scheduler.analytic import costs_from_config, edge_costs, model_stage_layers, shape_from_config
from dualpipe_mhc.scheduler.split import stage_layers


def _times(counts, head, embed):
    t = [float(c) for c in counts]
    t[0] += embed
    t[-1] += head
    return t


@pytest.mark.parametrize("layers,stages", [(4, 1), (4, 4), (7, 3), (56, 8), (56, 16), (10, 2)])
def test_even_is_the_classic_split(layers, stages):
    counts = stage_layers(layers, stages, head_cost=3.0, mode="even")
    assert sum(counts) == layers and max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


@pytest.mark.parametrize("layers,stages,head,embed", [(12, 4, 1.6, 0.01), (9, 3, 2.4, 0.5), (10, 2, 1.0, 0.0), (7, 5, 0.3, 0.0)])
def test_balanced_is_the_best_whole_layer_split(layers, stages, head, embed):
    """Brute force over every composition: no split has a faster slowest stage, nor a smaller spread at that."""
    got = stage_layers(layers, stages, head_cost=head, embed_cost=embed)
    assert sum(got) == layers and min(got) >= 1
    t = _times(got, head, embed)
    for cuts in itertools.combinations(range(1, layers), stages - 1):
        counts = [b - a for a, b in zip((0, *cuts), (*cuts, layers))]
        other = _times(counts, head, embed)
        assert max(t) <= max(other) + 1e-9
        if abs(max(t) - max(other)) < 1e-9:
            assert max(t) - min(t) <= max(other) - min(other) + 1e-9


def test_balanced_without_edge_costs_is_even():
    for layers, stages in [(56, 8), (56, 16), (7, 3)]:
        assert stage_layers(layers, stages) == stage_layers(layers, stages, mode="even")


def test_bad_split_is_one_line():
    with pytest.raises(ValueError, match="model.split='odd' is unknown"):
        stage_layers(8, 2, mode="odd")
    with pytest.raises(ValueError, match="cannot split 2 layers into 3 stages"):
        stage_layers(2, 3)


def test_paper_head_weighs_about_one_and_a_half_layers():
    # 2TCV per pass against 2T(4C² + 3CH) + attention: V = 129280, C = 6144, H = 16384, S = 4096.
    embed, head = edge_costs(shape_from_config(load_config("paper-27b")))
    assert 1.3 < head < 1.9 and 0 < embed < 0.05


def test_simulator_prices_the_split_the_model_builds():
    cfg = load_config("paper-27b", ["pipeline.schedule=1f1b"])
    counts = model_stage_layers(cfg.model, 8)
    assert counts == [7, 8, 7, 7, 7, 7, 7, 6]
    costs = costs_from_config(cfg, 8)
    per_layer = costs.w[2] / 7
    assert costs.w[1] == pytest.approx(8 * per_layer) and costs.w[3] == pytest.approx(7 * per_layer)
    even = costs_from_config(load_config("paper-27b", ["pipeline.schedule=1f1b", "model.split=even"]), 8)
    total = [f + b + w for f, b, w in zip(costs.f, costs.b, costs.w)]
    total_even = [f + b + w for f, b, w in zip(even.f, even.b, even.w)]
    assert max(total) < max(total_even)
