"""bornsparse: neural networks that are trained sparse from the first step.

Public names are imported lazily so that ``import bornsparse`` stays cheap and optional
backends (Triton, numba's JIT) load only when a layer first needs them.
"""

from __future__ import annotations

from bornsparse import _fork  # noqa: F401  (registers the at-fork hook, stdlib only)
from bornsparse._lazy import lazy_module

__version__ = "0.1.0"

__getattr__, __dir__, _names = lazy_module(__name__, {
    "nn": ("PermutedBlockDiagonal", "PermutedTanhNetwork", "SparseLinear", "DCTPlusSparseLinear",
           "SparseConv2d", "DCTPlusSparseConv2d", "PermutedOffsetSparseLinear", "LowRankLinear",
           "MonarchLinear"),
    "sparsity": ("prune_at_init", "IMP", "RigL", "SET"),
    "ops": ("dct", "idct"),
    "models": ("sparsify", "save", "load", "CheckpointError"),
})
__all__ = ["__version__", *_names]
