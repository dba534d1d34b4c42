"""Kernels and autograd Functions: each op has a plain-PyTorch reference beside its fast path.

One package per op family (``permuted``, ``sparse``, ``discrete_cosine``, ``penalty``), the
one backend switch ``backends``, and ``runtime``, what every kernel shares. The names below
load lazily from the modules that define them.
"""

from bornsparse._lazy import lazy_module

# settles MKL VML's dispatch before any op runs multi-threaded (runtime/mkl_warmup.py)
from bornsparse.ops.runtime import mkl_warmup as _mkl_warmup  # noqa: F401

_TABLE = {
    "permuted_block_diagonal": "permuted.functional",
    "permuted_block_diagonal_reference": "permuted.reference",
    "permuted_block_diagonal_dense_reference": "permuted.reference",
    "permuted_tanh_network": "permuted.functional",
    "permuted_tanh_network_reference": "permuted.reference",
    "dct": "discrete_cosine.transform",
    "idct": "discrete_cosine.transform",
    "sparse_matmul": "sparse.matmul",
    "sparse_matmul_reference": "sparse.matmul",
    "sparse_conv2d": "sparse.conv",
    "sparse_conv2d_reference": "sparse.conv",
    "build_conv_plan": "sparse.conv",
    "dct_matrix": "discrete_cosine.transform",
    "dct_sparse_affine": "discrete_cosine.plus_sparse",
    "dct_sparse_affine_reference": "discrete_cosine.plus_sparse",
    "resolve_backend": "backends",
    "orthogonality_penalty": "penalty.functional",
    "orthogonality_penalty_reference": "penalty.functional",
    "BACKENDS": "backends",
}
__all__ = sorted(_TABLE)
__getattr__, __dir__ = lazy_module(__name__, _TABLE)
