"""dualpipe-mhc: simulate, run and profile DualPipe-style pipeline schedules for mHC transformers.

This file stays light: importing ``dualpipe_mhc.scheduler`` runs it first, and
the scheduler must import without torch, ray or triton. Names are exported lazily.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_config": "dualpipe_mhc.config",
    "RunConfig": "dualpipe_mhc.config",
    "ConfigError": "dualpipe_mhc.config",
    "build_model": "dualpipe_mhc.model",
    "MhcLM": "dualpipe_mhc.model",
    "HyperConnection": "dualpipe_mhc.mhc",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dualpipe_mhc' has no attribute {name!r}")
