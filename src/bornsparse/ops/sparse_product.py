"""Re-exports, under this module's import path, the sparse product y = x Sᵀ, whose code
lives in ``ops/sparse/``: ``plan.py`` (support checks, ``SparsePlan``, ``build_plan``) and
``matmul.py`` (``sparse_matmul`` and its custom ops, the reference, the CPU helpers the
DCT-plus-sparse layer shares)."""

from bornsparse.ops.runtime.autograd import no_double_backward
from bornsparse.ops.sparse.matmul import (
    PARALLEL_MIN_WORK,
    csr_matmul_t,
    sampled_dot_t,
    sparse_matmul,
    sparse_matmul_reference,
)
from bornsparse.ops.sparse.plan import (
    SparsePlan,
    build_plan,
    check_indices,
    check_plan_tensors,
    check_shape_pair,
    index_dtype,
    sort_support,
)

__all__ = [
    "PARALLEL_MIN_WORK",
    "SparsePlan",
    "build_plan",
    "check_indices",
    "check_plan_tensors",
    "check_shape_pair",
    "csr_matmul_t",
    "index_dtype",
    "no_double_backward",
    "sampled_dot_t",
    "sort_support",
    "sparse_matmul",
    "sparse_matmul_reference",
]
