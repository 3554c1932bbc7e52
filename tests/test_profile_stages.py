"""profile-stages on the CPU: each distinct stage measured once, profiles the simulator reads, one-line errors."""

from __future__ import annotations

import json

import pytest

from dualpipe_mhc import cli
from dualpipe_mhc.cluster import stage_profile
from dualpipe_mhc.cluster.stage_profile import StageKind, stage_kinds
from dualpipe_mhc.config import load_config
from dualpipe_mhc.scheduler import Costs, build_schedule, simulate


def test_identical_stages_are_measured_once():
    cfg = load_config("paper-27b").model
    kinds = stage_kinds(cfg, 16)  # balanced: [3, 4 x 9, 3 x 5, 2]
    assert [k.layers for k, _ in kinds] == [3] + [4] * 9 + [3] * 5 + [2]
    assert {k for k, _ in kinds} == {StageKind(3, True, False), StageKind(4, False, False),
                                     StageKind(3, False, False), StageKind(2, False, True)}
    assert [s for _, s in kinds][1:11] == [1] * 9 + [10]  # every middle stage built as its first twin


def test_profile_stages_on_tiny(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["profile-stages", "--config", "tiny", "--schedule", "dualpipev,1f1b", "--repeats", "1",
                   "--warmup", "0", "--out", str(out), "--json", str(tmp_path / "r.json"), "--fit-hardware", "cpu-tiny"])
    assert rc == 0
    err = capsys.readouterr().err
    # tiny on 2 ranks: 1F1B cuts 2 stages (2 kinds), DualPipeV 4 (3 kinds); twice (n = 1, n = 4).
    assert err.count("] plain n=1") == 5 and err.count("] mhc n=4") == 5
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["device"] == "cpu" and {r["schedule"] for r in report["rows"]} == {"1f1b", "dualpipev"}
    for m in report["measurements"]:
        assert all(m[k] > 0 for k in ("f", "b", "w", "full_b", "fb_pair", "kept_bytes")), m
    kept = {(m["variant"], m["stage_kind"]): m["kept_bytes"] for m in report["measurements"]}
    assert kept[("mhc", "1 layers")] > kept[("plain", "1 layers")]  # n streams keep more than one
    for variant, n in (("plain", 1), ("mhc", 4)):
        for stages in (2, 4):
            costs = Costs.from_profile(out / f"profile_{variant}_{stages}st.json")
            assert costs.num_stages == stages and costs.meta["streams"] == n
            assert costs.act_bytes[-1] == 0 and costs.act_bytes[0] == 2 * 64 * n * 64 * 4  # T n C fp32
            assert costs.link_bandwidth == 3e9  # the config's link (gloo-cpu)
    # simulate --profile reads them: same step time as the command's row.
    sched = build_schedule("dualpipev", 2, 4)
    again = simulate(sched, Costs.from_profile(out / "profile_mhc_4st.json"))
    row = next(r for r in report["rows"] if r["schedule"] == "dualpipev" and r["streams"] == 4)
    assert again.step_time == pytest.approx(row["step_time_s"])
    assert row["overhead_vs_n1"] is not None
    assert (out / "stage_costs.png").stat().st_size > 0 and (out / "timeline_dualpipev_n4.png").exists()
    # The fitted preset loads as a config's hardware calibration and prices every stage count.
    fitted = load_config("tiny", [f"hardware.calibration={out / 'hardware_cpu-tiny.json'}"])
    from dualpipe_mhc.scheduler.analytic import costs_from_config

    costs = costs_from_config(fitted, 4)
    assert costs.meta["calibration"] == "cpu-tiny" and all(f > 0 for f in costs.f)
    assert report["hardware_fit"]["fit"]["observations"] == 2 * (2 + 4)


def test_a_stage_that_does_not_fit_fails_before_anything_is_built(monkeypatch, capsys):
    monkeypatch.setattr(stage_profile, "free_memory_bytes", lambda device: 2**20)

    def never(*a, **k):
        raise AssertionError("built a stage")

    monkeypatch.setattr(stage_profile, "build_stage", never)
    rc = cli.main(["profile-stages", "--config", "tiny", "--repeats", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "needs about" in err and "GiB free; use more pipeline.ranks" in err


def test_bad_arguments_are_one_line(capsys):
    assert cli.main(["profile-stages", "--config", "tiny", "--repeats", "0"]) == 2
    assert "repeats=0" in capsys.readouterr().err
    assert cli.main(["profile-stages", "--config", "tiny", "--schedule", "gpipe"]) == 2
    assert "--schedule 'gpipe' is unknown" in capsys.readouterr().err
    assert cli.main(["profile-stages", "--config", "tiny", "--fit-hardware", "../x"]) == 2
    assert "--fit-hardware '../x' is invalid" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_profile_stages_on_cuda_measures_allocator_memory(tmp_path):
    """On the GPU: CUDA-event timing, fused kernels, bf16; kept and B-peak from the allocator."""
    rc = cli.main(["profile-stages", "--config", "tiny", "--set", "run.dtype=bfloat16", "--schedule", "1f1b",
                   "--device", "cuda", "--repeats", "3", "--warmup", "1", "--out", str(tmp_path),
                   "--json", str(tmp_path / "r.json")])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["device"] != "cpu"
    for m in report["measurements"]:
        assert m["memory_source"] == "cuda allocator"
        assert 0 < m["kept_bytes"] <= m["peak_b_bytes"], m
        assert all(m[k] > 0 for k in ("f", "b", "w", "full_b", "fb_pair"))
