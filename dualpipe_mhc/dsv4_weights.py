"""DeepSeek-V4 mHC weights in and out of a ``residual = "dsv4"`` model.

Two namings exist for the same tensors (n = hc_mult streams, D = hidden size, M = (2 + n) n):

    release (DeepSeek's checkpoint)       transformers (DeepseekV4ForCausalLM)      shape
    layers.{i}.hc_attn_{fn,base,scale}    model.layers.{i}.attn_hc.{fn,base,scale}  [M, nD], [M], [3]
    layers.{i}.hc_ffn_{fn,base,scale}     model.layers.{i}.ffn_hc.{fn,base,scale}   [M, nD], [M], [3]
    hc_head_{fn,base,scale}               model.hc_head.hc_{fn,base,scale}          [n, nD], [n], [1]

(transformers' ``DeepseekV4Model`` drops the ``model.`` prefix; both are accepted.) Here ``fn`` is
``phi`` transposed (F.linear layout against the kernels' ``x @ phi``), ``base`` is ``bias`` and
``scale`` is ``alpha`` of :class:`~dualpipe_mhc.mhc.HyperConnection`; the head's are
:class:`~dualpipe_mhc.mhc.HyperHead`'s ``phi``/``base``/``scale``. Only these tensors are read:
attention, MoE and embeddings of a V4 checkpoint have no counterpart in this project's model.
Exported tensors are fp32, as V4 keeps them. hc_sinkhorn_iters and hc_eps are not in a state dict:
the model's ``sinkhorn_iters`` must match the checkpoint's config (20 for the release), and hc_eps
is :data:`kernels.reference.HC_EPS` (1e-6, the release value).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

NAMINGS = ("release", "transformers")
_SITES = {"release": ("hc_attn_", "hc_ffn_"), "transformers": ("attn_hc.", "ffn_hc.")}


class Dsv4WeightsError(ValueError):
    """A DeepSeek-V4 tensor is missing or has the wrong shape; the message names the key and the fix."""


def _keys(naming: str, prefix: str, layers: int) -> dict[tuple, str]:
    """``{(layer or None, site, field): key}`` for every mHC tensor of a ``layers``-layer model."""
    keys: dict[tuple, str] = {}
    for i in range(layers):
        for site, stem in zip(("attn", "mlp"), _SITES[naming]):
            for field in ("fn", "base", "scale"):
                keys[(i, site, field)] = f"{prefix}layers.{i}.{stem}{field}"
    head = "hc_head_" if naming == "release" else "hc_head.hc_"
    for field in ("fn", "base", "scale"):
        keys[(None, "head", field)] = f"{prefix}{head}{field}"
    return keys


def _targets(model: nn.Module) -> dict[tuple, tuple[nn.Parameter, bool]]:
    """``{(layer or None, site, field): (parameter, transposed)}`` of a dsv4 model."""
    if model.cfg.residual != "dsv4":
        raise Dsv4WeightsError(
            f"DeepSeek-V4 weights need model.residual='dsv4', this model is {model.cfg.residual!r}; "
            "build it with model.residual='dsv4'"
        )
    out: dict[tuple, tuple[nn.Parameter, bool]] = {}
    for i, block in enumerate(model.blocks):
        for site in ("attn", "mlp"):
            hc = getattr(block, site)
            out[(i, site, "fn")] = (hc.phi, True)
            out[(i, site, "base")] = (hc.bias, False)
            out[(i, site, "scale")] = (hc.alpha, False)
    head = model.head.reduce
    out[(None, "head", "fn")] = (head.phi, True)
    out[(None, "head", "base")] = (head.base, False)
    out[(None, "head", "scale")] = (head.scale, False)
    return out


def detect_naming(state: Mapping[str, Tensor]) -> tuple[str, str]:
    """``(naming, prefix)`` of a state dict, from its head tensor's key."""
    for prefix in ("", "model."):
        if f"{prefix}hc_head.hc_fn" in state:
            return "transformers", prefix
    if "hc_head_fn" in state:
        return "release", ""
    raise Dsv4WeightsError(
        "no DeepSeek-V4 head tensor in the state dict (looked for 'hc_head_fn', 'hc_head.hc_fn', "
        "'model.hc_head.hc_fn'); pass a DeepSeek-V4 checkpoint's state dict"
    )


def load_dsv4_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> str:
    """Copy a DeepSeek-V4 state dict's mHC tensors (either naming) into a dsv4 ``MhcLM``; return the naming.

    Every tensor is checked before any is copied, so a bad checkpoint leaves the model untouched.
    The checkpoint must hold exactly the model's number of layers.
    """
    targets = _targets(model)
    naming, prefix = detect_naming(state)
    keys = _keys(naming, prefix, len(model.blocks))
    extra = f"{prefix}layers.{len(model.blocks)}.{_SITES[naming][0]}fn"
    if extra in state:
        raise Dsv4WeightsError(
            f"the checkpoint has more layers than the model ({extra} exists, model.layers={len(model.blocks)}); "
            "set model.layers to the checkpoint's num_hidden_layers"
        )
    staged = []
    for where, (param, transposed) in targets.items():
        key = keys[where]
        expected = tuple(param.shape[::-1]) if transposed else tuple(param.shape)
        if key not in state:
            raise Dsv4WeightsError(f"{key} is missing from the state dict (expected shape {list(expected)})")
        tensor = state[key]
        if tuple(tensor.shape) != expected:
            raise Dsv4WeightsError(f"{key} has shape {list(tensor.shape)}, expected {list(expected)}")
        staged.append((param, tensor.t() if transposed else tensor))
    with torch.no_grad():
        for param, tensor in staged:
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
    return naming


def export_dsv4_state_dict(model: nn.Module, naming: str = "release", prefix: str | None = None) -> dict[str, Tensor]:
    """The mHC tensors of a dsv4 ``MhcLM`` under DeepSeek-V4's names, fp32, on the CPU.

    ``prefix`` (transformers naming only): ``"model."`` (DeepseekV4ForCausalLM, the default) or ``""``
    (DeepseekV4Model).
    """
    if naming not in NAMINGS:
        raise Dsv4WeightsError(f"naming {naming!r} is unknown; use one of {NAMINGS}")
    if prefix is None:
        prefix = "model." if naming == "transformers" else ""
    keys = _keys(naming, prefix, len(model.blocks))
    return {
        keys[where]: (param.t() if transposed else param).detach().to("cpu", torch.float32).contiguous()
        for where, (param, transposed) in _targets(model).items()
    }
