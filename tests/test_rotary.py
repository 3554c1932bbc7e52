"""model.rotary (cached tables, the rotation as one autograd.Function) against the spelled-out formula it
replaced: the same bits, forward and input gradient, fp32 and bf16, odd sequence lengths included."""

from __future__ import annotations

import math

import pytest
import torch

from dualpipe_mhc import model


def rotary_formula(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """The previous model.rotary: float64 angles on every call, stack of the rotated pairs."""
    s, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d))
    angles = torch.arange(s, device=x.device, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq,head_dim", [(1, 8), (7, 64), (333, 32), (128, 2)])
def test_rotary_equals_formula_bitwise(dtype: torch.dtype, seq: int, head_dim: int) -> None:
    torch.manual_seed(seq)
    heads = 3
    # q as Attention takes it: a permuted view of the qkv projection, [B, H, S, D] not contiguous
    qkv = torch.randn(2, seq, 3, heads, head_dim, dtype=dtype) * 4
    x_ref = qkv.permute(2, 0, 3, 1, 4)[0].detach().requires_grad_()
    x_new = x_ref.detach().clone().requires_grad_()
    want, got = rotary_formula(x_ref), model.rotary(x_new)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got, want)
    grad = torch.randn_like(want).transpose(-1, -2).contiguous().transpose(-1, -2)  # strided too
    want.backward(grad)
    got.backward(grad)
    assert torch.equal(x_new.grad, x_ref.grad)


def test_rotary_tables_are_built_once_and_usable_after_inference_mode() -> None:
    model._cached_rotary_table.cache_clear()
    x = torch.randn(1, 2, 5, 8)
    with torch.inference_mode():  # the first call builds the tables; autograd must still accept them later
        model.rotary(x)
    y = x.clone().requires_grad_()
    model.rotary(y).sum().backward()
    assert model._cached_rotary_table.cache_info().hits >= 1
    assert model._cached_rotary_table.cache_info().currsize == 1
    assert torch.equal(y.grad, torch.autograd.grad(rotary_formula(y).sum(), y)[0])


def test_rotary_rotates_interleaved_pairs_by_position_angles() -> None:
    """The semantics, from the definition: pair (2i, 2i+1) at position p turns by p * base^(-2i/D)."""
    s, d, base = 5, 6, 10000.0
    x = torch.randn(1, 1, s, d, dtype=torch.float64)
    got = model.rotary(x, base)
    for p in range(s):
        for i in range(d // 2):
            a = p * base ** (-2 * i / d)
            x1, x2 = x[0, 0, p, 2 * i].item(), x[0, 0, p, 2 * i + 1].item()
            assert got[0, 0, p, 2 * i].item() == pytest.approx(x1 * math.cos(a) - x2 * math.sin(a), abs=1e-12)
            assert got[0, 0, p, 2 * i + 1].item() == pytest.approx(x1 * math.sin(a) + x2 * math.cos(a), abs=1e-12)
