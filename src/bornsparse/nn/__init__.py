"""nn.Modules built only on bornsparse.ops: the layers users put in models."""

from bornsparse._lazy import lazy_module

_TABLE = {
    "PermutedBlockDiagonal": "permuted",
    "PermutedTanhNetwork": "permuted",
    "SparseLinear": "sparse_linear",
    "DCTPlusSparseLinear": "dct_plus_sparse",
    "SparseConv2d": "sparse_conv",
    "DCTPlusSparseConv2d": "sparse_conv",
    "PermutedOffsetSparseLinear": "permuted_offset",
    "LowRankLinear": "structured",
    "MonarchLinear": "structured",
}
__all__ = sorted(_TABLE)
__getattr__, __dir__ = lazy_module(__name__, _TABLE)
