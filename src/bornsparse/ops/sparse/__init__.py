"""The sparse-support family: y = x Sᵀ and the direct sparse 2-D convolution, for a sparse
S stored as values plus sorted (2, nnz) integer indices.

* ``plan``: the support checks (``check_indices``, ``sort_support``) and ``SparsePlan``,
  what the products derive from a support once (``build_plan``).
* ``matmul``: ``sparse_matmul`` (the ``torch.ops.bornsparse.sparse_matmul`` custom op, +
  ``_backward``; torch.sparse for comparison) and its reference.
* ``conv``: ``sparse_conv2d`` (``torch.ops.bornsparse.sparse_conv2d``, + ``_backward``), its
  ``ConvPlan`` and reference.
* ``numba_matmul``, ``numba_conv``: their numba kernels; ``triton_matmul``: the product's
  Triton kernels (imported only by the "triton" backend).

Importing the package registers the numba path's custom ops; the names below are
re-exported from the modules that define them (``bornsparse.ops.sparse_product`` and
``bornsparse.ops.sparse_conv`` re-export ``plan`` + ``matmul`` and ``conv``).
"""

from bornsparse.ops.sparse.conv import (
    ConvPlan,
    build_conv_plan,
    sparse_conv2d,
    sparse_conv2d_reference,
)
from bornsparse.ops.sparse.matmul import sparse_matmul, sparse_matmul_reference
from bornsparse.ops.sparse.plan import (
    SparsePlan,
    build_plan,
    check_indices,
    index_dtype,
    sort_support,
)

__all__ = [
    "ConvPlan",
    "SparsePlan",
    "build_conv_plan",
    "build_plan",
    "check_indices",
    "index_dtype",
    "sort_support",
    "sparse_conv2d",
    "sparse_conv2d_reference",
    "sparse_matmul",
    "sparse_matmul_reference",
]
