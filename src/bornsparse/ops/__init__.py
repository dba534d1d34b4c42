"""Kernels and autograd Functions: each op has a plain-PyTorch reference beside its fast path.

One package per op family (``permuted``, ``sparse``, ``discrete_cosine``, ``penalty``), the
one backend switch ``backends``, and ``runtime``, what every kernel shares. The names below
load lazily from the modules that define them.
"""

from bornsparse._lazy import lazy_module

# settles MKL VML's dispatch before any op runs multi-threaded (runtime/mkl_warmup.py)
from bornsparse.ops.runtime import mkl_warmup as _mkl_warmup  # noqa: F401

__getattr__, __dir__, __all__ = lazy_module(__name__, {
    "permuted.functional": ("permuted_block_diagonal", "permuted_tanh_network"),
    "permuted.reference": ("permuted_block_diagonal_reference",
                           "permuted_block_diagonal_dense_reference",
                           "permuted_tanh_network_reference"),
    "discrete_cosine.transform": ("dct", "idct", "dct_matrix"),
    "sparse.matmul": ("sparse_matmul", "sparse_matmul_reference"),
    "sparse.conv": ("sparse_conv2d", "sparse_conv2d_reference", "build_conv_plan"),
    "discrete_cosine.plus_sparse": ("dct_sparse_affine", "dct_sparse_affine_reference"),
    "backends": ("resolve_backend", "BACKENDS"),
    "penalty.functional": ("orthogonality_penalty", "orthogonality_penalty_reference"),
})
