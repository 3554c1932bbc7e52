"""The pipeline proves itself against one process (docs/DESIGN.md §8).

For every schedule on 2 and 4 ranks: the loss and every parameter gradient after one
step equal the single-process model's on the same micro-batches (fp32), and three
AdamW steps give the same losses and parameters. DualPipe holds each stage on two
ranks; its gradients are summed across them before the step, so the check covers that.
"""

from __future__ import annotations

import pytest
import torch

from conftest import small_config
from dualpipe_mhc.cluster.data import step_microbatches
from dualpipe_mhc.cluster.worker import make_optimizer
from dualpipe_mhc.model import build_model

pytestmark = pytest.mark.ray

CASES = [  # (schedule, ranks, micro-batches)
    ("1f1b", 2, 4), ("zb1p", 2, 3), ("dualpipe", 2, 4), ("dualpipev", 2, 6), ("dualpipev", 2, 5),
    ("1f1b", 4, 6), ("zb1p", 4, 6), ("dualpipe", 4, 8), ("dualpipev", 4, 8),
]
STEPS = 3


def reference(cfg, num_stages: int, steps: int):
    """Single process: mean of micro-batch losses, AdamW; per step the loss and the per-stage grads."""
    model = build_model(cfg.model, cfg.run.seed, kernels=cfg.run.kernels)
    chunks = model.stage_chunks(num_stages)
    opt = make_optimizer(model.parameters(), cfg.run.lr)
    losses, grads = [], []
    m = cfg.pipeline.microbatches
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for tokens, targets in step_microbatches(cfg.run.seed, step, m, cfg.pipeline.microbatch_size,
                                                 cfg.model.seq_len, cfg.model.vocab_size):
            loss = model(tokens, targets) / m
            loss.backward()
            total += loss.item()
        losses.append(total)
        grads.append({s: {n: p.grad.clone() for n, p in c.named_parameters()} for s, c in enumerate(chunks)})
        opt.step()
    params = {s: {n: p.detach().clone() for n, p in c.named_parameters()} for s, c in enumerate(chunks)}
    return losses, grads, params


def assert_stage_tensors_close(got, want, what: str, rtol: float = 1e-5, atol_scale: float = 2e-6, atol_min: float = 1e-9) -> None:
    assert sorted(got) == sorted(want), f"{what}: stages {sorted(got)} != {sorted(want)}"
    for s in want:
        assert sorted(got[s]) == sorted(want[s]), f"{what}: stage {s} parameter names differ"
        for name, ref in want[s].items():
            atol = max(atol_scale * float(ref.abs().max()), atol_min)
            torch.testing.assert_close(got[s][name], ref, rtol=rtol, atol=atol, msg=lambda m: f"{what} stage {s} {name}: {m}")


@pytest.mark.parametrize("schedule,ranks,microbatches", CASES, ids=[f"{s}-{r}r-{m}mb" for s, r, m in CASES])
def test_pipeline_equals_single_process(schedule, ranks, microbatches, request):
    from dualpipe_mhc.cluster.train import pipeline_schedule

    pipe = request.getfixturevalue(f"pipeline{ranks}")
    cfg = small_config(schedule, ranks, microbatches)
    sched = pipeline_schedule(cfg)
    pipe.configure(cfg, sched)
    ref_losses, ref_grads, ref_params = reference(cfg, sched.num_stages, STEPS)

    first = pipe.step(0)
    assert first.loss == pytest.approx(ref_losses[0], rel=1e-6)
    assert sorted(first.losses) == list(range(microbatches))
    assert_stage_tensors_close(pipe.gradients(), ref_grads[0], f"{schedule} step 0 gradient")
    losses = [first.loss] + [pipe.step(step).loss for step in range(1, STEPS)]
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    # AdamW turns gradient round-off (summation order differs) into update differences of
    # order lr * 1e-3 at most; a real error moves a parameter by ~lr per step.
    assert_stage_tensors_close(pipe.parameters(), ref_params, f"{schedule} parameters after {STEPS} steps",
                               atol_min=5e-3 * cfg.run.lr)


def test_implicit_transfers_match_explicit(pipeline2):
    """Without SEND/RECV actions the runtime derives the transfers from the paths: same numbers."""
    from dualpipe_mhc.scheduler import build_schedule

    cfg = small_config("dualpipev", 2, 4)
    sched = build_schedule("dualpipev", 2, 4)
    pipeline2.configure(cfg, sched)
    ref_losses, ref_grads, _ = reference(cfg, sched.num_stages, 1)
    res = pipeline2.step(0)
    assert res.loss == pytest.approx(ref_losses[0], rel=1e-6)
    assert_stage_tensors_close(pipeline2.gradients(), ref_grads[0], "implicit transfers gradient")


def test_step_records_every_action_with_timings(pipeline2):
    from dualpipe_mhc.cluster.measure import measured_costs, measured_result
    from dualpipe_mhc.cluster.train import pipeline_schedule
    from dualpipe_mhc.scheduler import simulate

    cfg = small_config("zb1p", 2, 4)
    sched = pipeline_schedule(cfg)
    pipeline2.configure(cfg, sched)
    results = [pipeline2.step(s) for s in range(2)]
    res = results[-1]
    for rank, rec in enumerate(res.ranks):
        labels = [a["label"] for a in rec["actions"]]
        assert labels == [a.label for a in sched.compute_actions(rank)]
        for a in rec["actions"]:
            assert 0 <= a["wait_start"] <= a["start"] <= a["end"] <= res.step_time + 1e-9
    assert 0 <= res.bubble_fraction < 1
    costs = measured_costs(cfg, sched, results)
    assert all(v > 0 for v in costs.f) and all(v > 0 for v in costs.w)
    predicted = simulate(sched, costs)
    assert predicted.step_time > 0
    observed = measured_result(sched, res)
    assert len([e for e in observed.events if e.stream == "compute"]) == sum(len(sched.compute_actions(r)) for r in range(2))


def test_resumed_run_matches_uninterrupted(pipeline2, tmp_path, monkeypatch):
    from dualpipe_mhc.cluster.train import train

    full = train(small_config("dualpipev", 2, 4, steps=4), pipe=pipeline2)
    # A relative directory, and the driver in another working directory than the workers (as
    # when it joins a cluster started elsewhere): the checkpoint must still land in one place.
    monkeypatch.chdir(tmp_path)
    ckpt = "ckpt"
    first = train(small_config("dualpipev", 2, 4, steps=2, checkpoint_every=2, checkpoint_dir=ckpt), pipe=pipeline2)
    assert len(first.checkpoints) == 1
    assert sorted(p.name for p in (tmp_path / "ckpt" / "step_000001").iterdir()) == ["meta.json", "rank0.pt", "rank1.pt"]
    resumed = train(small_config("dualpipev", 2, 4, steps=4, checkpoint_every=2, checkpoint_dir=ckpt),
                    resume=True, pipe=pipeline2)
    assert resumed.start_step == 2
    assert [r.step for r in resumed.results] == [2, 3]
    uninterrupted = [r.loss for r in full.results]
    assert [r.loss for r in first.results] + [r.loss for r in resumed.results] == uninterrupted


def test_resume_without_checkpoint_fails_before_launch(tmp_path):
    from dualpipe_mhc.cluster.train import train

    cfg = small_config("dualpipev", 2, 4, checkpoint_dir=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(cfg, resume=True)


def test_every_worker_runs_with_nvlink_multicast_off(pipeline2):
    """NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 must be
    set in each worker's own process (docs/DESIGN.md §6), not only in the driver's environment."""
    import os

    import ray

    from dualpipe_mhc.cluster.launch import ACTOR_ENV

    envs = ray.get([a.__ray_call__.remote(lambda _self: dict(os.environ)) for a in pipeline2.group.actors])
    assert len(envs) == 2
    for env in envs:
        assert {k: env.get(k) for k in ACTOR_ENV} == {
            "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
