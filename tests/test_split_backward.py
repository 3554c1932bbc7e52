"""The zero-bubble split's W through a node whose outputs differ in shape (the fused mHC pre op's)."""

from __future__ import annotations

import torch

from dualpipe_mhc.cluster.split_backward import backward_input, backward_weight


class _TwoShapes(torch.autograd.Function):
    """x [T, C], w [C] -> (x * w [T, C], (x * w).sum(-1) [T]): two outputs of different shapes, like
    mhc_pre's u [T, C] and H_post [T, n]."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        y = x * w
        return y, y.sum(-1)

    @staticmethod
    def backward(ctx, dy, ds):
        x, w = ctx.saved_tensors
        g = dy + ds[:, None]
        return g * w, (g * x).sum(0)


def test_weight_gradients_through_a_node_with_outputs_of_two_shapes():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6))
    v = torch.nn.Parameter(torch.randn(6))
    x0 = torch.randn(5, 6)

    def stage(x):
        y, s = _TwoShapes.apply(x, w)
        return (y * v) + s[:, None]

    grad = torch.randn(5, 6)
    x = x0.clone().requires_grad_()
    stage(x).backward(grad)
    ref = (x.grad, w.grad.clone(), v.grad.clone())

    w.grad = v.grad = None
    x = x0.clone().requires_grad_()
    (dx,), groups = backward_input([stage(x)], [grad], [x], iter([w, v]))
    assert w.grad is None and v.grad is None  # B leaves the weight gradients to W
    backward_weight(iter([w, v]), groups)
    torch.testing.assert_close(dx, ref[0])
    torch.testing.assert_close(w.grad, ref[1])
    torch.testing.assert_close(v.grad, ref[2])
