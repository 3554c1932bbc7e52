"""mHC ops: a float64-capable PyTorch reference and fused Triton kernels behind one dispatch point.

The layer calls :func:`get_ops` and never names an implementation, so a fused
kernel replaces the reference without touching the module. Triton is imported
only when the Triton backend is asked for.
"""

from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "DUALPIPE_MHC_KERNELS"
FUSED_KINDS = ("mhc", "dsv4")  # residual kinds the Triton kernels implement; the reference has them all


def _reference_ops() -> SimpleNamespace:
    from . import reference

    return SimpleNamespace(
        name="reference", pre=reference.mhc_pre, post_res=reference.post_res, aggregate=reference.pre_aggregate
    )


def _triton_ops() -> SimpleNamespace:
    from . import fused  # noqa: F401  (imports triton)

    return SimpleNamespace(name="triton", pre=fused.mhc_pre, post_res=fused.post_res, aggregate=fused.pre_aggregate)


def resolve_backend(requested: str | None, device_type: str, kind: str = "mhc") -> str:
    """'auto' -> 'triton' on CUDA for mHC and DeepSeek-V4's variant, else 'reference'. ``$DUALPIPE_MHC_KERNELS`` overrides 'auto'."""
    name = requested or "auto"
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto")
    if name not in BACKENDS:
        raise ValueError(f"kernels backend {name!r} is unknown; use one of {BACKENDS}")
    if name == "auto":
        return "triton" if device_type == "cuda" and kind in FUSED_KINDS and _fused_available() else "reference"
    return name


def _fused_available() -> bool:
    try:
        import triton  # noqa: F401

        from . import fused  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (a broken triton install must not take 'auto' down)
        if not isinstance(exc, ImportError):
            warnings.warn(f"fused mHC kernels unavailable ({type(exc).__name__}: {exc}); using the reference", stacklevel=2)
        return False
    return True


def get_ops(backend: str) -> SimpleNamespace:
    """The op table for a resolved backend name: ``.pre(x, phi, alpha, bias, iters, kind, return_h_pre=False)``,
    ``.post_res(x, y, h_post, h_res, next_phi=None)`` (``next_phi``: the phi of the pre op x_next feeds next,
    for the fused backend's cross-sublayer junction) and ``.aggregate(x, h_pre)`` (u = H_pre x, for
    recomputation)."""
    if backend == "triton":
        return _triton_ops()
    if backend == "reference":
        return _reference_ops()
    raise ValueError(f"kernels backend {backend!r} is unknown; use 'triton' or 'reference'")
