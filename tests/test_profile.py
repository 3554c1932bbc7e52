"""``dualpipe-mhc profile``: the comparison on a synthetic runner, then the real thing on 2 CPU ranks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from dualpipe_mhc.cluster import profile as prof
from dualpipe_mhc.config import load_config


def _fake_run(step: float, streams: int, nvml: bool = True) -> dict:
    ranks = 2
    report = {
        "device": "cpu",
        "step_times_s": [step * 3, step, step, step],  # the first step is warm-up
        "bubble_s": [0.1 * step, 0.2 * step],
        "exposed_comm_s": [0.01 * streams * step, 0.02 * step],
        "comm_s": [0.05 * streams * step] * ranks,
        "peak_memory_bytes": [2**20 * streams, 2**20 * streams],
        "loss": 5.0,
    }
    if nvml:
        report["nvml"] = [
            {"steps": [{"energy_j": 100.0 * step, "mean_power_w": 100.0, "nvlink_tx_bytes": 1e6 * streams,
                        "energy_source": "counter"}] * 4}
            for _ in range(ranks)
        ]
    return report


def _runner(nvml: bool = True):
    seen = []

    def run(cfg):
        seen.append((cfg.model.residual, cfg.model.streams))
        step = {"plain": 1.0, "mhc": 1.05, "hc": 1.2}[cfg.model.residual]
        return _fake_run(step, cfg.model.streams, nvml)

    return run, seen


def test_variants_change_only_residual_and_streams():
    cfg = load_config("tiny", ["model.streams=2"])
    got = prof.variant_configs(cfg, with_hc=True)
    assert {k: (c.model.residual, c.model.streams) for k, c in got.items()} == {
        "mhc": ("mhc", 2), "plain": ("plain", 1), "hc": ("hc", 2)
    }
    for c in got.values():
        assert c.pipeline == cfg.pipeline and c.link == cfg.link and c.model.width == cfg.model.width
    plain_cfg = load_config("tiny", ["model.residual=plain", "model.streams=1"])
    assert prof.variant_configs(plain_cfg)["mhc"].model.streams == 4  # the paper's n


def test_overhead_breakdown_and_verdict():
    runner, seen = _runner()
    report = prof.profile(load_config("tiny"), with_hc=True, runner=runner)
    assert seen == [("mhc", 4), ("plain", 1), ("hc", 4)]
    assert report["overhead_pct"]["mhc"] == pytest.approx(5.0)
    assert report["overhead_pct"]["hc"] == pytest.approx(20.0)
    mhc = report["variants"]["mhc"]
    assert mhc["step_time_s"] == pytest.approx(1.05)  # median after the warm-up step
    assert mhc["hidden_comm_s"] == pytest.approx([0.2 * 1.05 - 0.04 * 1.05, 0.2 * 1.05 - 0.02 * 1.05])
    assert mhc["energy_j_per_step"] == pytest.approx(2 * 105.0)
    assert report["delta_vs_plain"]["mhc"]["energy_pct"] == pytest.approx(5.0)
    assert "within the paper's +6.7 %" in report["verdict"] and "CPU run" in report["verdict"]
    assert "\n" not in report["verdict"]
    json.dumps(report)


def test_energy_unavailable_without_nvml(tmp_path):
    runner, _ = _runner(nvml=False)
    report = prof.profile(load_config("tiny"), runner=runner)
    assert report["variants"]["mhc"]["energy_j_per_step"] == "unavailable"
    assert "energy_pct" not in report["delta_vs_plain"]["mhc"]
    png = prof.plot(report, tmp_path / "p.png")
    assert png.stat().st_size > 1000


def test_verdict_above_target():
    line = prof.verdict(12.3, 4, "dualpipev, 2 ranks", on_gpu=True)
    assert line.startswith("mHC n=4 costs +12.3 %") and "above the paper's +6.7 %" in line and "CPU" not in line


def test_command_rejects_bad_warmup(tmp_path):
    from dualpipe_mhc.commands import profile as cmd

    args = SimpleNamespace(with_hc=False, warmup_steps=5, no_plot=True, out=str(tmp_path))
    with pytest.raises(ValueError, match="run.steps"):
        cmd.main(load_config("tiny", ["run.steps=3"]), args)
