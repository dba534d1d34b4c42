"""nn.Modules built only on bornsparse.ops: the layers users put in models."""

from bornsparse._lazy import lazy_module

__getattr__, __dir__, __all__ = lazy_module(__name__, {
    "permuted": ("PermutedBlockDiagonal", "PermutedTanhNetwork"),
    "sparse_linear": ("SparseLinear",),
    "dct_plus_sparse": ("DCTPlusSparseLinear",),
    "sparse_conv": ("SparseConv2d", "DCTPlusSparseConv2d"),
    "permuted_offset": ("PermutedOffsetSparseLinear",),
    "structured": ("LowRankLinear", "MonarchLinear"),
})
