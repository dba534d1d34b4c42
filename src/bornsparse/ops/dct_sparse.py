"""Re-exports, under this module's import path, the fused DCT-plus-sparse layer, whose code
lives in ``ops/discrete_cosine/plus_sparse.py`` (its numba passes in
``ops/discrete_cosine/numba_kernels.py``, its Triton kernels in
``ops/discrete_cosine/triton_plus_sparse.py``)."""

from bornsparse.ops.discrete_cosine.plus_sparse import (
    dct_sparse_affine,
    dct_sparse_affine_reference,
)

__all__ = ["dct_sparse_affine", "dct_sparse_affine_reference"]
