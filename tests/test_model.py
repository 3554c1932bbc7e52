"""The n-stream model: stage chunks reproduce the unsplit model; the layer starts as a residual block."""

from __future__ import annotations

import pytest
import torch

from dualpipe_mhc.config import ModelConfig
from dualpipe_mhc.mhc import HyperConnection
from dualpipe_mhc.model import build_model

F64 = torch.float64


def _cfg(kind: str, layers: int = 4) -> ModelConfig:
    return ModelConfig(
        vocab_size=64, width=16, heads=2, layers=layers, streams=1 if kind == "plain" else 4,
        residual=kind, seq_len=8, mlp_ratio=2.0,
    )


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (2, 8), generator=g)
    return tokens, torch.roll(tokens, -1, dims=1)


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _pipelined_loss_and_grads(model, stages: int, tokens, targets):
    """Run the chunks as a pipeline would: each boundary is a detached leaf, gradients flow back by hand."""
    model.zero_grad(set_to_none=True)
    chunks = model.stage_chunks(stages)
    assert chunks[0].is_first and chunks[-1].is_last
    assert sum(b - a for a, b in (c.layer_range for c in chunks)) == model.cfg.layers
    inputs, outputs, x = [], [], tokens
    for chunk in chunks:
        if not chunk.is_first:
            x = x.detach().requires_grad_(True)  # what a rank receives: a fresh leaf
        inputs.append(x)
        x = chunk(x, targets if chunk.is_last else None)
        outputs.append(x)
    loss = outputs[-1]
    loss.backward()
    for s in range(stages - 2, -1, -1):  # send each input gradient to the previous stage
        assert outputs[s].shape == inputs[s + 1].shape == (2, 8, model.cfg.streams, 16)
        outputs[s].backward(inputs[s + 1].grad)
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("kind", ["plain", "hc", "mhc"])
def test_stage_chunks_match_the_unsplit_model(kind):
    model = build_model(_cfg(kind), seed=3, kernels="reference", dtype=F64)
    tokens, targets = _batch()
    model.zero_grad(set_to_none=True)
    loss = model(tokens, targets)
    loss.backward()
    ref_loss, ref_grads = loss.detach(), _grads(model)
    for stages in (1, 2, 4):
        split_loss, split_grads = _pipelined_loss_and_grads(model, stages, tokens, targets)
        torch.testing.assert_close(split_loss, ref_loss, rtol=1e-13, atol=1e-13)
        assert split_grads.keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            torch.testing.assert_close(split_grads[name], grad, rtol=1e-10, atol=1e-13, msg=f"{stages} stages, {name}")


def test_every_parameter_gets_a_gradient():
    model = build_model(_cfg("mhc"), seed=0, kernels="reference", dtype=F64)
    model(*_batch()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_same_seed_same_weights_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a = build_model(_cfg("mhc"), seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_model(_cfg("mhc"), seed=7)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_split_errors_are_one_line():
    model = build_model(_cfg("mhc", layers=2), seed=0)
    with pytest.raises(ValueError, match="cannot split 2 layers into 3 stages; use model.layers>=3 or fewer ranks"):
        model.stage_chunks(3)
    with pytest.raises(ValueError, match="needs targets"):
        model.stage_chunks(1)[0](_batch()[0])


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_initial_mappings_are_close_to_a_residual_block(kind):
    """At step 0: H_pre ~ 1/n (F sees the stream mean), H_post ~ 1, H_res ~ I (docs/DESIGN.md §4 init)."""
    n, c = 4, 32
    layer = HyperConnection(torch.nn.Identity(), width=c, streams=n, kind=kind).double()
    x = torch.randn(64, n, c, dtype=F64)
    h_pre, h_post, h_res = layer.mappings(x)
    assert (h_pre - 1 / n).abs().max() < 0.01
    assert (h_post - 1).abs().max() < 0.02
    # Sinkhorn of 4*I: off-diagonals about 1/(e^4 + n - 1), so the diagonal misses 1 by n - 1 times that.
    off = 1 / (torch.e**4 + n - 1)
    assert (h_res - torch.eye(n, dtype=F64)).abs().max() < (1.2 * (n - 1) * off if kind == "mhc" else 0.02)


def test_identical_streams_at_init_track_a_plain_block():
    """With every stream equal, an n-stream mHC block at init stays close to x + F(x) (mean-reduced)."""
    torch.manual_seed(0)
    sub = torch.nn.Linear(16, 16, dtype=F64)
    plain = HyperConnection(sub, width=16, streams=1, kind="plain").double()
    mhc = HyperConnection(sub, width=16, streams=4, kind="mhc").double()
    e = torch.randn(10, 16, dtype=F64)
    wide = e.unsqueeze(-2).expand(10, 4, 16)
    torch.testing.assert_close(mhc(wide).mean(-2), plain(e.unsqueeze(-2)).squeeze(-2), rtol=0.05, atol=0.05)
