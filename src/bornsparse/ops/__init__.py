"""Kernels and autograd Functions: each op has a plain-PyTorch reference beside its fast path."""

from bornsparse._lazy import lazy_module
from bornsparse.ops import _mkl_warmup  # noqa: F401  (before any op runs multi-threaded)

_TABLE = {
    "permuted_block_diagonal": "permuted",
    "permuted_block_diagonal_reference": "permuted",
    "permuted_block_diagonal_dense_reference": "permuted",
    "permuted_tanh_network": "permuted",
    "permuted_tanh_network_reference": "permuted",
    "dct": "discrete_cosine",
    "idct": "discrete_cosine",
    "sparse_matmul": "sparse_product",
    "sparse_matmul_reference": "sparse_product",
    "sparse_conv2d": "sparse_conv",
    "sparse_conv2d_reference": "sparse_conv",
    "build_conv_plan": "sparse_conv",
    "dct_matrix": "discrete_cosine",
    "dct_sparse_affine": "dct_sparse",
    "dct_sparse_affine_reference": "dct_sparse",
    "resolve_backend": "backends",
    "orthogonality_penalty": "penalty",
    "orthogonality_penalty_reference": "penalty",
    "BACKENDS": "backends",
}
__all__ = sorted(_TABLE)
__getattr__, __dir__ = lazy_module(__name__, _TABLE)
