"""Ranks that share a GPU (``cluster.share_gpus``): the placement decision, its config, the
host-staged transport in a real pipeline (two CPU Ray actors, gloo, every message staged),
NVML energy counted once per GPU; the zero-bubble B/W split through the fused autograd
Functions (Triton's interpreter on the CPU, compiled on a GPU); and on a GPU host the
one-GPU pipeline script.

The GPU tests here are the quick ones; ``benchmarks/run_pipeline_1gpu.py`` is the full run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import small_config
from test_kernels import _kernel_mode, fused_cpu, fused_gpu  # noqa: F401  (fixtures: interpreter / compiled kernels)
from dualpipe_mhc.cluster import runtime
from dualpipe_mhc.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def _placement(monkeypatch, nodes: list[int], ranks: int, **cluster):
    monkeypatch.setattr(runtime, "gpus_available", lambda: sum(nodes))
    monkeypatch.setattr(runtime, "gpus_per_node", lambda: list(nodes))
    sets = [f"pipeline.ranks={ranks}", f"model.layers={2 * ranks}", "pipeline.schedule=1f1b",
            f"pipeline.microbatches={2 * ranks}"] + [f"cluster.{k}={v}" for k, v in cluster.items()]
    return runtime.plan_placement(load_config(None, sets))


def test_auto_shares_the_gpus_of_a_one_host_cluster_with_a_note(monkeypatch):
    p = _placement(monkeypatch, [1], 2)
    assert (p.use_gpu, p.backend, p.ranks_per_gpu, p.gpus_per_rank, p.shared) == (True, "gloo", 2, 0.5, True)
    assert "step times measure no real link" in p.note and "\n" not in p.note
    p = _placement(monkeypatch, [2], 4)
    assert (p.ranks_per_gpu, p.gpus_per_rank) == (2, 0.5)
    p = _placement(monkeypatch, [2], 3)
    assert (p.ranks_per_gpu, p.gpus_per_rank) == (2, 0.5)
    assert _placement(monkeypatch, [1], 3).gpus_per_rank == 0.3333  # 3 x 0.3333 fits in Ray's one GPU


def test_enough_gpus_or_no_sharing_keep_one_gpu_per_rank(monkeypatch):
    p = _placement(monkeypatch, [4], 4)
    assert (p.use_gpu, p.backend, p.ranks_per_gpu, p.note) == (True, "nccl", 1, None)
    # two hosts of one GPU for 4 ranks: auto shares only within one host, so CPU
    for nodes, kw in (([1], {"share_gpus": "no"}), ([1, 1], {}), ([0], {}), ([1], {"use_gpus": "no"})):
        p = _placement(monkeypatch, nodes, 4, **kw)
        assert (p.use_gpu, p.backend, p.shared) == (False, "gloo", False), (nodes, kw)


def test_share_gpus_yes_shares_even_with_enough(monkeypatch):
    p = _placement(monkeypatch, [8], 4, share_gpus="yes")
    assert (p.use_gpu, p.backend, p.ranks_per_gpu) == (True, "gloo", 2)
    assert _placement(monkeypatch, [1], 4, share_gpus="yes").ranks_per_gpu == 4
    # several nodes: the ranks go to the node with the most GPUs
    assert _placement(monkeypatch, [1, 2], 4, share_gpus="yes").ranks_per_gpu == 2


@pytest.mark.parametrize("nodes,kw,match", [
    ([0], {"share_gpus": "yes"},
     r"cluster.share_gpus=yes needs GPUs but the Ray cluster has no GPUs; use cluster.share_gpus=auto"),
    ([2], {"share_gpus": "yes", "use_gpus": "no"}, r"needs GPUs but cluster.use_gpus=no"),
    ([1], {"backend": "nccl"}, r"cluster.backend=nccl cannot serve 2 ranks on one GPU .*cluster.backend=auto"),
    ([1, 1], {"use_gpus": "yes", "share_gpus": "no"}, r"has 2 GPUs for 4 ranks; .*cluster.share_gpus=yes"),
])
def test_impossible_placements_fail_in_one_line_naming_the_fix(monkeypatch, nodes, kw, match):
    with pytest.raises(ValueError, match=match) as info:
        _placement(monkeypatch, nodes, 2 if kw.get("backend") else 4, **kw)
    assert "\n" not in str(info.value)


def test_calibrate_link_refuses_ranks_that_share_a_gpu(monkeypatch):
    monkeypatch.setattr(runtime, "gpus_available", lambda: 1)
    monkeypatch.setattr(runtime, "gpus_per_node", lambda: [1])
    with pytest.raises(ValueError, match="no link to measure"):
        runtime.resolve_placement(small_config("1f1b", 2, 4))


@pytest.mark.parametrize("value", ["maybe", "2", "shared"])
def test_share_gpus_rejects_bad_values(value):
    expected = rf"cluster.share_gpus='?{value}'? is invalid: Input should be 'auto', 'yes' or 'no'"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [f"cluster.share_gpus={value}"])
    assert load_config(None, []).cluster.share_gpus == "auto"


def test_cli_rejects_a_bad_share_gpus_before_any_work():
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    out = subprocess.run([sys.executable, "-m", "dualpipe_mhc.cli", "run", "--set", "cluster.share_gpus=maybe"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cluster.share_gpus='maybe' is invalid" in lines[0], out.stderr


def test_energy_of_a_shared_gpu_is_counted_once():
    from dualpipe_mhc.cluster.profile import measurement, run_report

    cfg = small_config("1f1b", 2, 4)
    from dualpipe_mhc.cluster.train import pipeline_schedule

    sched = pipeline_schedule(cfg)

    def rank(r: int, gpu: str, energy: float) -> dict:
        return {"actions": [], "peak_memory_bytes": 1,
                "nvml": {"gpu": gpu, "energy_j": energy, "mean_power_w": energy / 0.5, "nvlink_tx_bytes": 0.0}}

    def results(gpus: list[str]) -> list:
        return [SimpleNamespace(step_time=0.5, loss=1.0, ranks=[rank(r, g, 100.0 + r) for r, g in enumerate(gpus)],
                                busy=lambda: [0.4, 0.4], waiting=lambda: [0.0, 0.0]) for _ in range(2)]

    shared = measurement(run_report(cfg, sched, results(["GPU-a", "GPU-a"]), [], "H200"), warmup_steps=0)
    assert shared["energy_j_per_step"] == 100.0 and shared["energy_j_per_step_per_gpu"] == [100.0]
    own = measurement(run_report(cfg, sched, results(["GPU-a", "GPU-b"]), [], "H200"), warmup_steps=0)
    assert own["energy_j_per_step"] == 201.0


@pytest.fixture(scope="module")
def staged2(ray_cluster):
    """Two CPU ranks whose every message goes through the host-staged route."""
    from dualpipe_mhc.cluster.train import pipeline_schedule

    cfg = small_config("1f1b", 2, 4)
    pipe = runtime.Pipeline.start(cfg, pipeline_schedule(cfg), host_staging=True)
    yield pipe
    pipe.close()


STAGED_CASES = [("dualpipe", 4, False), ("zb1p", 3, False), ("dualpipev", 4, True)]


@pytest.mark.ray
@pytest.mark.parametrize("schedule,microbatches,shaped", STAGED_CASES,
                         ids=[f"{s}-{m}mb{'-shaped' if sh else ''}" for s, m, sh in STAGED_CASES])
def test_staged_pipeline_equals_single_process(staged2, schedule, microbatches, shaped):
    """The shared-GPU transport between two CPU actors: loss and every gradient as one process
    (DualPipe also sums replicated gradients, ZB1P defers W, DualPipeV on a shaped link)."""
    from test_runtime import assert_stage_tensors_close, reference

    from dualpipe_mhc.cluster.train import pipeline_schedule

    assert all("host transfers" in d for d in staged2.group.descriptions), staged2.group.descriptions
    cfg = small_config(schedule, 2, microbatches)
    if shaped:
        cfg = cfg.model_copy(update={"link": cfg.link.model_copy(update={"bandwidth_gbps": 0.2, "shape": True})})
    sched = pipeline_schedule(cfg)
    staged2.configure(cfg, sched)
    ref_losses, ref_grads, _ = reference(cfg, sched.num_stages, 2)
    first = staged2.step(0)
    assert first.loss == pytest.approx(ref_losses[0], rel=1e-6)
    assert_stage_tensors_close(staged2.gradients(), ref_grads[0], f"staged {schedule} step 0 gradient")
    assert staged2.step(1).loss == pytest.approx(ref_losses[1], rel=1e-5)


@pytest.mark.ray
def test_calibrate_link_measures_the_staged_route(staged2):
    """calibrate-link's ping-pong runs over the host-staged route (the workers pass their routes)."""
    from dualpipe_mhc.cluster.calibration import calibrate

    raw = calibrate(staged2.group, {}, [1 << 20, 4 << 20], repeats=2)["raw"]
    assert raw["link"]["bandwidth_gbps"] > 0.05 and all(p["one_way_s"] > 0 for p in raw["points"])


# -- GPU: one device shared by the ranks (run on a GPU host; benchmarks/run_pipeline_1gpu.py is the full check)


def check_weight_split(device: str, dtype: torch.dtype, recompute: int | None, width: int) -> None:
    """The zero-bubble split (backward_input, later backward_weight: what the
    executor runs) gives the full backward's input and weight gradients through the fused
    autograd Functions, with or without mHC recomputation inside the stage. A fused stage ends
    in the post/res Function, whose output is no view (stage_backward_input detaches it in place)."""
    from dualpipe_mhc.cluster.split_backward import backward_input, backward_weight

    from dualpipe_mhc.model import build_model

    cfg = small_config("zb1p", 2, 4).model.model_copy(update={"width": width, "heads": 4})
    model = build_model(cfg, 0, kernels="triton", dtype=dtype, recompute_layers=recompute).to(device)
    middle = model.stage_chunks(4)[1]
    torch.manual_seed(0)
    x = torch.randn(2, cfg.seq_len, cfg.streams, cfg.width, device=device, dtype=dtype)
    grad_out = torch.randn_like(x)

    def run(split: bool):
        middle.zero_grad(set_to_none=True)
        xin = x.clone().requires_grad_()
        out = middle(xin)
        if split:
            (dx,), groups = backward_input([out], [grad_out], [xin], middle.parameters())
            assert all(p.grad is None for p in middle.parameters()), "B must leave the weight gradients to W"
            backward_weight(middle.parameters(), groups)
        else:
            out.backward(grad_out)
            dx = xin.grad
        return dx.float(), {n: p.grad.float().clone() for n, p in middle.named_parameters()}

    full_dx, full = run(False)
    again_dx, again = run(False)  # the kernels' own run-to-run noise (atomic reductions)
    split_dx, split = run(True)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]

    def check(name: str, got: torch.Tensor, want: torch.Tensor, twin: torch.Tensor) -> None:
        # A scalar such as alpha sums terms that cancel: there the bound is the noise between two
        # full backwards, not a relative error of the (tiny) result.
        err, noise = float((got - want).norm()), float((twin - want).norm())
        assert err <= max(tol * float(want.norm()), 4 * noise), (
            f"{name}: split vs full backward differ by {err:.2e} (|full| {float(want.norm()):.2e}, "
            f"two full backwards {noise:.2e})")

    check("input gradient", split_dx, full_dx, again_dx)
    assert sorted(split) == sorted(full)
    for name, g in full.items():
        check(name, split[name], g, again[name])


@pytest.mark.slow
def test_weight_split_with_fused_kernels_interpreted(fused_cpu):
    """The same on the CPU, the fused kernels in Triton's interpreter (~35 s on 2 cores)."""
    check_weight_split("cpu", torch.float32, 2, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recompute", [None, 2], ids=["no-recompute", "recompute2"])
def test_weight_split_with_fused_kernels_gpu(fused_gpu, dtype, recompute):
    check_weight_split("cuda", dtype, recompute, 256)


@pytest.mark.gpu
@pytest.mark.slow
def test_one_gpu_pipeline_script_quick():
    """benchmarks/run_pipeline_1gpu.py --quick on this host's one GPU: 2 ranks share it, every
    schedule equals one process in fp32 and bf16 with the fused kernels and recomputation."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("ray")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_pipeline_1gpu.py"), "--quick",
                          "--out", str(ROOT / "out" / "test_1gpu")], capture_output=True, text=True, timeout=600,
                         env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
