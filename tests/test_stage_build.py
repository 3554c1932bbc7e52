"""Per-stage build: each chunk built alone equals the same slice of the whole model, bit for bit."""

from __future__ import annotations

import pytest
import torch

from dualpipe_mhc.config import load_config
from dualpipe_mhc.model import build_model, build_stage, stage_layer_ranges
from dualpipe_mhc.scheduler import build_schedule


def _schedule_splits(layers: int):
    """(schedule, ranks, stages) for every schedule and rank count whose stages fit ``layers``."""
    for name in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        for ranks in (1, 2, 3, 4):
            if name == "dualpipe" and ranks % 2:
                continue
            mb = max(2 * ranks, 2)
            sched = build_schedule(name, ranks=ranks, microbatches=mb)
            if sched.num_stages <= layers:
                yield name, ranks, sched.num_stages


@pytest.mark.parametrize("layers", [4, 7])
@pytest.mark.parametrize("split", ["even", "balanced"])
@pytest.mark.parametrize("residual", ["mhc", "plain"])
def test_every_stage_equals_its_slice_of_the_whole_model(layers, split, residual):
    streams = 1 if residual == "plain" else 4
    cfg = load_config("tiny", [f"model.layers={layers}", f"model.split={split}", f"model.residual={residual}",
                               f"model.streams={streams}"]).model
    whole = build_model(cfg, seed=11, kernels="reference")
    checked = set()
    for name, ranks, stages in _schedule_splits(layers):
        if stages in checked:  # the split depends on the stage count only
            continue
        checked.add(stages)
        want = whole.stage_chunks(stages)
        for s in range(stages):
            got = build_stage(cfg, s, stages, seed=11, kernels="reference")
            assert got.layer_range == want[s].layer_range, f"{name} on {ranks} ranks, stage {s}"
            got_p, want_p = dict(got.named_parameters()), dict(want[s].named_parameters())
            assert sorted(got_p) == sorted(want_p)
            for pname, ref in want_p.items():
                assert torch.equal(got_p[pname], ref), f"{name} on {ranks} ranks, stage {s}: {pname} differs"
    assert {1, 2, 3, 4} <= checked


def test_stage_build_in_bf16_matches_and_seeds_differ():
    cfg = load_config("tiny").model
    whole = build_model(cfg, seed=3, dtype=torch.bfloat16, kernels="reference")
    stage = build_stage(cfg, 1, 2, seed=3, dtype=torch.bfloat16, kernels="reference")
    for (name, p), (_, q) in zip(stage.named_parameters(), whole.stage_chunks(2)[1].named_parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q), name
    other = build_stage(cfg, 1, 2, seed=4, dtype=torch.bfloat16, kernels="reference")
    assert not torch.equal(other.head.proj.weight, stage.head.proj.weight)
    # Two layers of one model are drawn from different generators.
    assert not torch.equal(whole.blocks[0].attn.phi, whole.blocks[1].attn.phi)


def test_init_statistics_and_the_residual_start():
    """The drawn values have the intended scale: N(0, 0.02²) for linears, N(0, 1/(nC)) for phi."""
    cfg = load_config("tiny", ["model.width=128", "model.vocab_size=1024"]).model
    model = build_model(cfg, seed=0, kernels="reference").requires_grad_(False)
    w = model.embed.tok.weight
    assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.002
    phi = model.blocks[0].mlp.phi
    assert abs(float(phi.std()) * (cfg.streams * cfg.width) ** 0.5 - 1.0) < 0.05
    assert torch.equal(model.blocks[0].attn.sublayer.norm.weight, torch.ones(cfg.width))


def test_stage_ranges_follow_the_split():
    cfg = load_config("paper-27b").model
    assert [b - a for a, b in stage_layer_ranges(cfg, 8)] == [7, 8, 7, 7, 7, 7, 7, 6]
    even = load_config("paper-27b", ["model.split=even"]).model
    assert [b - a for a, b in stage_layer_ranges(even, 8)] == [7] * 8


def test_bad_stage_index_is_one_line():
    with pytest.raises(ValueError, match="stage 2 is not in 0..1"):
        build_stage(load_config("tiny").model, 2, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stage_build_on_cuda_matches_the_cpu_model():
    """Draws happen on the CPU: a stage built on the GPU holds the very weights of the CPU-built model."""
    cfg = load_config("tiny", ["model.layers=6"]).model
    whole = build_model(cfg, seed=5, dtype=torch.bfloat16, kernels="auto")
    for s, want in enumerate(whole.stage_chunks(3)):
        got = build_stage(cfg, s, 3, seed=5, dtype=torch.bfloat16, kernels="auto", device="cuda")
        for (name, p), (_, q) in zip(got.named_parameters(), want.named_parameters()):
            assert p.is_cuda and torch.equal(p.cpu(), q), f"stage {s} {name}"
