"""``dualpipe-mhc profile``: the comparison on a synthetic runner, then the real thing on 2 CPU ranks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from dualpipe_mhc.cluster import profile as prof
from dualpipe_mhc.config import load_config


def _fake_run(step: float, streams: int, nvml: bool = True) -> dict:
    """A run report of run_report()'s shape: the first step is a slow warm-up."""
    steps = [
        {
            "step_time_s": t,
            "bubble_s": [0.1 * t, 0.2 * t],
            "input_wait_s": [0.05 * t, 0.05 * t],
            "exposed_comm_s": [0.01 * streams * t, 0.02 * t],
            "comm_s": [0.05 * streams * t] * 2,
            "peak_memory_bytes": [2**20 * streams] * 2,
            "loss": 5.0,
        }
        for t in (step * 3, step, step, step)
    ]
    gpus = [
        {"steps": [{"energy_j": 100.0 * step, "mean_power_w": 100.0, "nvlink_tx_bytes": 1e6 * streams,
                    "energy_source": "counter"}] * 4}
        for _ in range(2)
    ]
    return {"device": "cpu", "on_gpu": False, "steps": steps, "nvml": gpus if nvml else []}


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
    assert mhc["bubble_s"] == pytest.approx([0.105, 0.21]) and mhc["peak_memory_bytes"] == [4 * 2**20] * 2
    assert mhc["energy_j_per_step"] == pytest.approx(2 * 105.0)
    assert report["delta_vs_plain"]["mhc"]["energy_pct"] == pytest.approx(5.0)
    assert "within the paper's +6.7 % and the +5 % stretch goal" in report["verdict"] and "CPU run" in report["verdict"]
    assert report["variants"]["mhc"]["step_time_range_s"] == pytest.approx([1.05, 1.05])
    assert "\n" not in report["verdict"]
    json.dumps(report)


def test_energy_unavailable_without_nvml(tmp_path):
    runner, _ = _runner(nvml=False)
    report = prof.profile(load_config("tiny"), runner=runner)
    assert report["variants"]["mhc"]["energy_j_per_step"] == "unavailable"
    assert "energy_pct" not in report["delta_vs_plain"]["mhc"]
    from dualpipe_mhc.cluster.profile_plot import plot

    png = plot(report, tmp_path / "p.png")
    assert png.stat().st_size > 1000


def test_exposed_comm_is_the_wait_after_the_producer_finished():
    from dualpipe_mhc.scheduler import build_schedule

    sched = build_schedule("1f1b", ranks=2, microbatches=2)

    def act(kind, stage, wait_start, start, seconds):
        return {"wait_start": wait_start, "start": start,
                "halves": [{"kind": kind, "stage": stage, "microbatch": 0, "seconds": seconds}]}

    ranks = [
        {"actions": [act("F", 0, 0.0, 0.0, 1.0), act("B", 0, 2.0, 3.5, 1.0)]},  # B0 waits for rank 1's gradient
        {"actions": [act("F", 1, 0.2, 1.5, 1.0), act("B", 1, 2.5, 2.5, 0.5)]},  # F1 waits 1.3 s, 0.5 s after F0 ended
    ]
    from dualpipe_mhc.scheduler.measured import exposed_comm

    assert exposed_comm(sched, ranks) == pytest.approx([3.5 - 3.0, 1.5 - 1.0])


def test_worker_side_nvml_summaries_are_preferred():
    from dualpipe_mhc.scheduler import build_schedule

    cfg = load_config("tiny")
    sched = build_schedule("dualpipev", ranks=2, microbatches=4)
    act = {"kind": "W", "wait_start": 0.0, "start": 0.0, "end": 1.0,
           "halves": [{"kind": "W", "stage": 0, "microbatch": 0, "seconds": 1.0, "full": False}]}
    res = SimpleNamespace(
        step_time=1.0, loss=1.0, busy=lambda: [1.0, 1.0], waiting=lambda: [0.0, 0.0],
        ranks=[{"actions": [act], "peak_memory_bytes": 5.0, "nvml": {"energy_j": 10.0 * (r + 1)}} for r in range(2)],
    )
    run = prof.run_report(cfg, sched, [res, res], [], "NVIDIA H200")
    assert run["on_gpu"] and run["nvml"] == [{"steps": [{"energy_j": 10.0}] * 2}, {"steps": [{"energy_j": 20.0}] * 2}]
    assert prof.measurement(run)["energy_j_per_step"] == 30.0
    assert run["nvml_note"] == prof.WORKER_NVML_NOTE  # not the driver's single-host note


def test_local_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert prof.local_gpus(2) == [0, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    assert prof.local_gpus(2) == [3, 5]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa,GPU-bbb")
    assert prof.local_gpus(2) == ["GPU-aaa", "GPU-bbb"]


def test_verdict_above_target():
    line = prof.verdict(12.3, 4, "dualpipev, 2 ranks", on_gpu=True)
    assert line.startswith("mHC n=4 costs +12.3 %") and "above the paper's +6.7 %" in line and "CPU" not in line


def test_command_rejects_bad_warmup(tmp_path):
    from dualpipe_mhc.commands import profile as cmd

    args = SimpleNamespace(with_hc=False, warmup_steps=5, no_plot=True, out=str(tmp_path))
    with pytest.raises(ValueError, match="run.steps"):
        cmd.main(load_config("tiny", ["run.steps=3"]), args)


@pytest.mark.ray
def test_profile_on_two_cpu_ranks(ray_cluster, tmp_path):
    """The real runtime, as a new user runs it: the tiny config on 2 CPU ranks over gloo, mHC / plain / HC,
    JSON + PNG."""
    from dualpipe_mhc.cli import main

    out = tmp_path / "prof"
    rc = main(["profile", "--with-hc", "--steps", "2", "--set", "model.layers=4", "--set", "model.width=32",
               "--set", "model.seq_len=16", "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["variants"]) == {"mhc", "plain", "hc"}
    for v in report["variants"].values():
        assert v["step_time_s"] > 0 and len(v["bubble_s"]) == 2 and len(v["exposed_comm_s"]) == 2
        assert v["energy_j_per_step"] == "unavailable"
        assert v["loss"] == pytest.approx(v["loss"]) and 0 < v["loss"] < 10
    assert report["variants"]["mhc"]["streams"] == 4 and report["variants"]["plain"]["streams"] == 1
    assert set(report["overhead_pct"]) == {"mhc", "hc"}
    assert isinstance(report["overhead_pct"]["mhc"], float)
    assert report["verdict"].startswith("mHC n=4 costs") and "CPU run" in report["verdict"]
    assert (out / "profile_report.json").exists() and (out / "profile.png").stat().st_size > 1000


@pytest.mark.ray
def test_recompute_in_the_pipeline_changes_no_number(pipeline2):
    """DualPipeV on 2 CPU ranks (zero-bubble B/W split), mHC with and without L_r=1 recomputation:
    the losses of both steps (the second after an optimizer step on the first's gradients) are bitwise equal."""
    base = ["model.layers=4", "model.width=32", "model.seq_len=16", "run.steps=2"]
    runner = prof.PipelineRunner(pipe=pipeline2)  # the session's 2-rank workers, reconfigured
    try:
        off = runner(load_config("tiny", base))
        on = runner(load_config("tiny", base + ["recompute.enabled=true", "recompute.block_layers=1"]))
    finally:
        runner.close()
    assert on["recompute_block_layers"] == 1 and off["recompute_block_layers"] is None
    assert [s["loss"] for s in on["steps"]] == [s["loss"] for s in off["steps"]]


def test_gpu_name_comes_from_a_worker_when_the_driver_has_no_nvml(monkeypatch):
    ray = pytest.importorskip("ray")
    from dualpipe_mhc.cluster import nvml

    class NoNvml:
        name = None

        def __init__(self, *_a, **_k):
            pass

        def start(self):
            return self

    actor = SimpleNamespace(device_name=SimpleNamespace(remote=lambda: "ref"))
    pipe = SimpleNamespace(group=SimpleNamespace(use_gpu=True, actors=[actor, actor]))
    monkeypatch.setattr(nvml, "NvmlSampler", NoNvml)
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: {"ref": "NVIDIA H100 80GB HBM3"}[ref])
    runner = prof.PipelineRunner(pipe=pipe)
    assert runner.device == "NVIDIA H100 80GB HBM3"


def test_the_n_stream_variant_is_the_configured_constrained_kind():
    from dualpipe_mhc import load_config
    from dualpipe_mhc.cluster.profile import variant_configs

    for residual, measured in (("dsv4", "dsv4"), ("mhc", "mhc"), ("hc", "mhc"), ("plain", "mhc")):
        streams = 1 if residual == "plain" else 4
        cfg = load_config("tiny", [f"model.residual={residual}", f"model.streams={streams}"])
        variants = variant_configs(cfg)
        assert variants["mhc"].model.residual == measured and variants["plain"].model.streams == 1
