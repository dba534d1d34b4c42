"""The DCT family: the orthonormal DCT-II and its inverse through one real FFT, and the
fused DCT-plus-sparse layer W = α·DCT + S of the DCTpS paper (Price & Tanner).

* ``transform``: ``dct``, ``idct`` (the ``torch.ops.bornsparse.dct`` custom op, O(q log q)),
  ``dct_matrix`` and the DCT projection the layer's reference uses.
* ``plus_sparse``: ``dct_sparse_affine``, out = α·T(x) + x Sᵀ + bias as one op
  (``torch.ops.bornsparse.dct_sparse_affine`` + ``_backward``), and its reference.
* ``numba_kernels``: the numba passes of both (the twiddle fused with the reorderings, the
  layer's blocks with the transposes the sparse kernels need).
* ``triton_plus_sparse``: the layer's Triton kernels (imported only by the "triton" backend).

Importing the package registers the numba path's custom ops; the names below are
re-exported from the modules that define them (``bornsparse.ops.dct_sparse`` re-exports
``plus_sparse``).
"""

from bornsparse.ops.discrete_cosine.plus_sparse import (
    dct_sparse_affine,
    dct_sparse_affine_reference,
)
from bornsparse.ops.discrete_cosine.transform import (
    dct,
    dct_matrix,
    dct_project_affine,
    dct_project_affine_reference,
    dct_tables,
    idct,
    use_numba_twiddle,
)

__all__ = [
    "dct",
    "dct_matrix",
    "dct_project_affine",
    "dct_project_affine_reference",
    "dct_sparse_affine",
    "dct_sparse_affine_reference",
    "dct_tables",
    "idct",
    "use_numba_twiddle",
]
