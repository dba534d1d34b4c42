"""bornsparse: neural networks that are trained sparse from the first step.

Public names are imported lazily so that ``import bornsparse`` stays cheap and optional
backends (Triton, numba's JIT) load only when a layer first needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

from bornsparse import _fork  # noqa: F401  (registers the at-fork hook, stdlib only)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "PermutedBlockDiagonal": "bornsparse.nn",
    "PermutedTanhNetwork": "bornsparse.nn",
    "SparseLinear": "bornsparse.nn",
    "DCTPlusSparseLinear": "bornsparse.nn",
    "SparseConv2d": "bornsparse.nn",
    "DCTPlusSparseConv2d": "bornsparse.nn",
    "PermutedOffsetSparseLinear": "bornsparse.nn",
    "LowRankLinear": "bornsparse.nn",
    "MonarchLinear": "bornsparse.nn",
    "prune_at_init": "bornsparse.sparsity",
    "IMP": "bornsparse.sparsity",
    "RigL": "bornsparse.sparsity",
    "SET": "bornsparse.sparsity",
    "dct": "bornsparse.ops",
    "idct": "bornsparse.ops",
    "sparsify": "bornsparse.models",
    "save": "bornsparse.models",
    "load": "bornsparse.models",
    "CheckpointError": "bornsparse.models",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bornsparse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
