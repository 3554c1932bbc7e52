"""Calibrating the analytic model: parts sum to the analytic costs; a fit recovers known efficiencies."""

from __future__ import annotations

import json

import pytest

from dualpipe_mhc.config import ConfigError, load_config
from dualpipe_mhc.scheduler.analytic import Hardware, analytic_costs, costs_from_config, shape_from_config
from dualpipe_mhc.scheduler.calibrate import (
    Calibration,
    Observation,
    calibrated_costs,
    fit_calibration,
    read_calibration,
    stage_parts,
)

HW = Hardware(790e12, 4.27e12)
TRUE = {"f.fixed": 2e-4, "b.fixed": 3e-4, "f.layer": 1.42, "f.mhc": 2.1, "f.head": 1.15, "f.embed": 3.0, "b.layer": 1.3, "b.mhc": 1.8,
        "b.head": 1.2, "b.embed": 2.0, "w.layer": 1.25, "w.head": 1.1, "w.embed": 1.5,
        "mem.base": 1.62, "mem.head": 1.3, "mem.mhc": 1.28}


def _shapes(**over):
    cfg = load_config("paper-27b", [f"{k}={v}" for k, v in over.items()])
    return cfg, shape_from_config(cfg, 1), shape_from_config(cfg)


@pytest.mark.parametrize("stages,recompute", [(8, None), (16, None), (16, 2)])
def test_parts_sum_to_the_analytic_costs(stages, recompute):
    _, _, shape = _shapes()
    costs = analytic_costs(shape, HW, stages, recompute_block=recompute)
    for s, st in enumerate(stage_parts(shape, HW, stages, recompute_block=recompute)):
        for k in ("f", "b", "w"):
            assert st[k].pop("fixed") == 1.0  # one second per action: its multiplier is the overhead
            assert sum(st[k].values()) == pytest.approx(getattr(costs, k)[s], rel=1e-12)
        assert sum(st["mem"].values()) == pytest.approx(costs.act_mem_bytes[s], rel=1e-12)
        assert (st["f"]["head"] > 0) == (s == stages - 1) and (st["f"]["embed"] > 0) == (s == 0)


def test_fit_recovers_a_synthetic_calibration(tmp_path):
    """Measurements drawn from known multipliers (n = 1 and n = 4, 8 and 16 stages): the fit finds them."""
    _, plain, mhc = _shapes()
    truth = Calibration("truth", HW.flops, HW.hbm, TRUE)
    obs = [Observation(shape, stages, calibrated_costs(shape, truth, stages)) for shape in (plain, mhc) for stages in (8, 16)]
    fitted = fit_calibration("h200-test", HW, obs, meta={"device": "synthetic"})
    for key, want in TRUE.items():
        assert fitted.scale(key) == pytest.approx(want, rel=1e-6), key
    assert max(fitted.fit["max_rel_error"].values()) < 1e-9
    assert fitted.fit["max_rel_error_uncalibrated"]["f"] > 0.2  # the plain preset was far off
    # Round trip through the file, and the config uses it.
    path = fitted.write(tmp_path / "h200-test.json")
    assert read_calibration(path).scales == fitted.scales
    cfg = load_config("paper-27b", [f"hardware.calibration={path}"])
    got = costs_from_config(cfg, 16)
    want = calibrated_costs(mhc, truth, 16).with_link(cfg.link.bandwidth, cfg.link.latency)
    assert got.f == pytest.approx(want.f) and got.act_mem_bytes == pytest.approx(want.act_mem_bytes)
    assert got.meta["source"] == "calibrated"


def test_fit_within_ten_percent_under_noise():
    """±5 % multiplicative noise on every measured figure: calibrated stages still land within 10 %."""
    import random

    rng = random.Random(0)
    _, plain, mhc = _shapes()
    truth = Calibration("truth", HW.flops, HW.hbm, TRUE)
    obs = []
    for shape in (plain, mhc):
        for stages in (8, 16):
            c = calibrated_costs(shape, truth, stages)
            noisy = [[v * (1 + rng.uniform(-0.05, 0.05)) for v in getattr(c, k)] for k in ("f", "b", "w", "act_mem_bytes")]
            c.f, c.b, c.w, c.act_mem_bytes = noisy
            obs.append(Observation(shape, stages, c))
    fitted = fit_calibration("noisy", HW, obs)
    assert max(fitted.fit["max_rel_error"].values()) < 0.10


def test_bad_calibration_files_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "dualpipe-mhc-hardware/1", "matmul_tflops": 1, "hbm_tbps": 1,
                               "scales": {"f.laye": 1.0}}))
    with pytest.raises(ConfigError, match=r"scales.f.laye is unknown"):
        load_config("tiny", [f"hardware.calibration={bad}"])
    bad.write_text(json.dumps({"format": "dualpipe-mhc-hardware/1", "matmul_tflops": -1, "hbm_tbps": 1}))
    with pytest.raises(ConfigError, match=r"matmul_tflops=-1 is invalid"):
        load_config("tiny", [f"hardware.calibration={bad}"])
