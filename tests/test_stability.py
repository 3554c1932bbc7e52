"""The stability report: a seconds-long run is finite and uniform across kinds; the random demo shows the bound."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dualpipe_mhc import cli
from dualpipe_mhc.corpus import VOCAB_SIZE, Corpus, decode, encode
from dualpipe_mhc.kernels.reference import sinkhorn
from dualpipe_mhc.model import build_model
from dualpipe_mhc.stability import (
    KINDS,
    DemoSettings,
    TrainSettings,
    collect_h_res,
    composite_gains,
    random_demo,
    run_report,
)

TINY = TrainSettings(steps=3, layers=2, width=16, heads=2, streams=4, seq_len=16, batch_size=2, warmup=1, eval_batch=2)


def _numbers(value):
    """Every number inside a nested report (None is allowed only where nothing happened, e.g. no divergence)."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.fixture(scope="module")
def short_report():
    return run_report(TINY, DemoSettings(depth=40, trials=4, depths_reported=(1, 40)))


def test_short_run_is_finite_with_the_same_fields_for_every_kind(short_report):
    runs = short_report["kinds"]
    assert tuple(runs) == KINDS
    fields = set(runs["plain"])
    for kind, run in runs.items():
        assert set(run) == fields, kind
        assert all(math.isfinite(x) for x in _numbers(run)), kind
        assert run["diverged_at_step"] is None
        assert len(run["loss"]) == len(run["grad_norm"]) == TINY.steps
        depth = 2 * TINY.layers
        for key in ("layer_forward_gain", "composite_forward_gain", "composite_backward_gain", "identity_distance"):
            assert len(run[key]) == depth, (kind, key)
    assert runs["plain"]["streams"] == 1 and runs["mhc"]["streams"] == runs["hc"]["streams"] == 4
    assert runs["plain"]["composite_forward_gain"] == [1.0] * 4  # a 1x1 identity has gain 1
    # mHC rows are stochastic (float32 Sinkhorn in the model): forward gain 1 up to float32 rounding
    assert max(runs["mhc"]["composite_forward_gain"]) < 1 + 1e-5
    assert all(math.isfinite(x) for x in _numbers(short_report["random_demo"]))
    json.dumps(short_report)  # a plain, serialisable object


def test_same_seed_same_data_same_result():
    corpus = Corpus()
    first = run_report(TINY, DemoSettings(depth=5, trials=2), kinds=("mhc",))["kinds"]["mhc"]
    from dualpipe_mhc.stability import train_kind

    second = train_kind("mhc", TINY, corpus)
    assert first["loss"] == second["loss"]


def test_random_demo_mhc_forward_gain_is_bounded_and_hc_grows():
    demo = random_demo(DemoSettings(depth=300, trials=16, sigmas=(0.05, 0.2)))
    for family in ("mhc", "mhc_wide"):
        for key, curves in demo[family].items():
            assert max(curves["forward"]) <= 1 + 1e-9, (family, key)
            assert max(curves["backward"]) <= demo["streams"] + 1e-9  # row-stochastic, non-negative: col sums <= n
    for sigma, curves in demo["hc"].items():
        fwd, med = curves["forward"], curves["forward_median"]
        assert fwd[-1] > 1.5 * fwd[0] and med[-1] > 1.5 * med[0], sigma
        assert med[299] > med[99] > med[9], sigma  # grows with depth, not only at the end
    assert demo["hc"]["0.2"]["forward"][-1] > demo["hc"]["0.05"]["forward"][-1]


def test_composite_gains_of_doubly_stochastic_products_stay_one():
    logits = torch.randn(12, 5, 4, 4, dtype=torch.float64)
    h = sinkhorn(logits, 200)  # converged: doubly stochastic to rounding
    gains = composite_gains(h)
    for key in gains:
        assert max(abs(g - 1) for g in gains[key]) < 1e-9, key


def test_collect_h_res_shapes_follow_depth_and_tokens():
    model = build_model(TINY.model_config("mhc"), seed=0, kernels="reference")
    tokens = torch.randint(0, VOCAB_SIZE, (2, 16))
    h = collect_h_res(model, tokens)
    assert h.shape == (2 * TINY.layers, 2 * 16, 4, 4) and h.dtype == torch.float64
    assert (h.sum(-1) - 1).abs().max() < 1e-5


def test_corpus_is_bundled_text_and_round_trips():
    corpus = Corpus()
    assert len(corpus.train) > 300_000 and len(corpus.val) > 30_000
    assert int(corpus.train.max()) < VOCAB_SIZE
    assert decode(encode("The “if” statement")) == "The “if” statement"
    tokens, targets = corpus.batch(3, 32, torch.Generator().manual_seed(0))
    assert tokens.shape == targets.shape == (3, 32) and torch.equal(tokens[:, 1:], targets[:, :-1])
    with pytest.raises(ValueError, match="is not bundled; use one of"):
        Corpus("missing.txt")


def test_cli_writes_json_and_png(tmp_path, capsys):
    args = [
        "stability", "--steps", "2", "--depth", "1", "--batch-size", "2", "--demo-depth", "12", "--demo-trials", "2",
        "--set", "model.width=16", "--set", "model.heads=2", "--set", "model.seq_len=16",
        "--out", str(tmp_path), "--json", str(tmp_path / "report.json"),
    ]
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"settings", "kinds", "random_demo", "verdict", "files"} <= set(report)
    assert (tmp_path / "stability.png").stat().st_size > 10_000
    assert (tmp_path / "stability.json").exists()
    out = capsys.readouterr().out
    assert "lr 0.003" in out and "1 layers (2 sublayers)" in out and "random matrices" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--kinds", "plain,dense"], "--kinds 'plain,dense' is invalid"),
        (["--steps", "0"], "--steps=0 is invalid"),
        (["--demo-sigmas", "0.1,x"], "--demo-sigmas '0.1,x' is invalid"),
        (["--demo-sigmas", "0.1,nan"], "--demo-sigmas '0.1,nan' is invalid"),
        (["--lr", "nan"], "--lr=nan"),
        (["--clip", "nan"], "--clip=nan"),
        (["--set", "model.heads=5"], "model.heads=5 does not divide model.width=64"),
    ],
)
def test_cli_bad_input_is_one_line(extra, message, capsys):
    assert cli.main(["stability", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
