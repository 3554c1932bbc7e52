"""The zero-bubble split of a stage's backward: B (input gradients) now, W (weight gradients) later.

    dinputs, groups = backward_input(outputs, output_grads, inputs, params)   # torch's stage_backward_input
    backward_weight(params, groups)                                           # W, from the saved groups

B is torch's own ``stage_backward_input`` (torch.distributed.pipelining, what its zero-bubble
schedules run). W is torch 2.13's ``stage_backward_weight``, kept here because torch 2.11's
version sums the gradients of all outputs of an intermediate autograd node into one tensor,
which fails for a node whose outputs differ in shape: the fused mHC pre op returns u [T, C],
H_pre and H_post [T, n] and H_res [T, n, n] (seen on an H200 with torch 2.11: "The size of
tensor a (6144) must match the size of tensor b (4)"). Here each output gets its own gradient
edge, as in torch 2.13.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.autograd.graph import GradientEdge

try:  # private torch API (the split backward of torch's own zero-bubble schedules); checked on torch 2.11 and 2.13
    from torch.distributed.pipelining._backward import _get_grad_fn_or_grad_acc
    from torch.distributed.pipelining._backward import stage_backward_input as backward_input
except ImportError as exc:
    raise ImportError(
        f"the pipeline runtime needs torch.distributed.pipelining._backward (stage_backward_input), "
        f"which torch {torch.__version__} does not have ({exc}); use a torch release that has it (2.11, 2.13 tested)"
    ) from None

__all__ = ["backward_input", "backward_weight"]


def backward_weight(weights: Iterable[torch.nn.Parameter], param_groups: list[dict[str, Any]]) -> None:
    """Accumulate the weight gradients of a B's ``param_groups`` (from :func:`backward_input`) into ``.grad``."""
    grad_acc_to_weight = {_get_grad_fn_or_grad_acc(w): w for w in weights}
    for group in param_groups:
        edges, grads = [], []
        for grads_tuple, intermediate in zip(group["grads"], group["intermediates"]):
            for i, grad in enumerate(grads_tuple):
                if grad is not None:
                    edges.append(GradientEdge(intermediate, i))
                    grads.append(grad)
        handles = []
        try:
            if len(group["intermediates"]) > 1:
                # the saved gradients stand for each intermediate's whole input: a descendant
                # intermediate must not add its share a second time
                for grads_tuple, intermediate in zip(group["grads"], group["intermediates"]):
                    handles.append(intermediate.register_prehook(lambda _outputs, saved=grads_tuple: saved))
            del group["intermediates"]  # breaks the hook -> group -> intermediates cycle
            if edges:
                params = list(group["params"])
                dweights = torch.autograd.grad(edges, tuple(GradientEdge(p, 0) for p in params), grad_outputs=grads)
                del group["grads"]
                for grad_acc, dw in zip(params, dweights):
                    weight = grad_acc_to_weight[grad_acc]
                    weight.grad = dw if weight.grad is None else weight.grad + dw
        finally:
            for handle in handles:
                handle.remove()
