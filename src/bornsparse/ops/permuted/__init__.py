"""Permuted block-diagonal multiply: y = G x with G = Π_t B(θ_t) P_t (Liao's permuted
block-diagonal paper, eq. 1), and its tanh network (eq. 3-5).

Layout and conventions (shared by the reference and every fast path):

* ``x`` has shape ``(..., n_in)`` with ``n_in <= width``; it is zero-padded to ``width``
  (implicitly: the fused kernel never materialises the padding). Rows are samples.
* ``weight`` has shape ``(depth, width // k, k, k)``; ``weight[t, b]`` is block ``b`` of the
  factor applied ``t``-th. Factors are stored in *application order*: ``weight[0]`` and
  ``perms[0]`` are the paper's ``B(θ_N)`` and ``P_N`` (applied first, as the product is
  written), ``weight[depth - 1]`` is ``B(θ_1)``.
* ``perms`` has shape ``(depth, width)``, int64, each row a permutation of ``range(width)``;
  it is a gather, ``(P_t h)[j] = h[perms[t, j]]``.
* One factor maps ``h -> z`` with ``z[b*k + r] = Σ_c weight[t, b, r, c] · h[perms[t, b*k + c]]``.
* The result keeps the first ``out_features`` entries (all ``width`` by default).

Modules, top to bottom:

* ``functional``: ``permuted_block_diagonal`` and ``permuted_tanh_network``, which validate
  and dispatch through ops/backends.py.
* ``reference``: the plain-PyTorch references (any device, autograd of any order).
* ``operands``: the operand checks and constants every backend shares;
  ``permutation_check`` the numba kernel that checks a permutation on the CPU.
* ``custom_ops``: the ``torch.ops.bornsparse.permuted_block_diagonal`` (+ ``_backward``)
  and ``permuted_factor_columns`` (+ ``_backward``) custom ops that launch the numba
  kernels, with their fake kernels, autograd formulas and tile plans.
* ``batched_gemm``: blocks of 128 and more on the CPU (32 and more where 4 does not divide
  k), one row gather and one ``torch.bmm`` per factor on feature-major activations (what
  "auto" runs there), as custom ops.
* ``numba_pairs``: numba kernels for any block size, one factor or a fused pair per pass,
  backward by recompute; ``numba_blocks`` what they run when 4 divides k (4×4
  sub-blocks). ``numba_cycles``: 2×2 blocks and even depth, both factors of a pair per
  pass in place, backward through the blocks' inverses while they are well
  conditioned.
* ``triton_kernels``: the Triton kernels and their custom ops (imported only by the
  "triton" backend).

Importing the package registers the numba path's custom ops, as importing the functional
does; the names below are re-exported from the modules that define them.
"""

from bornsparse.ops.permuted.batched_gemm import (
    BMM_MIN_BLOCK,
    BMM_MIN_RAGGED_BLOCK,
    takes_batched_gemm,
)
from bornsparse.ops.permuted.custom_ops import (
    BACKWARD_TILE,
    CYCLE_MIN_TILE,
    CYCLE_TILE,
    FORWARD_TILE,
    L2_BYTES,
    inverse_backward_is_safe,
)
from bornsparse.ops.permuted.functional import permuted_block_diagonal, permuted_tanh_network
from bornsparse.ops.permuted.operands import INVERSE_MAX_AMPLIFICATION
from bornsparse.ops.permuted.reference import (
    permuted_block_diagonal_dense_reference,
    permuted_block_diagonal_reference,
    permuted_tanh_network_reference,
)

__all__ = [
    "BACKWARD_TILE",
    "BMM_MIN_BLOCK",
    "BMM_MIN_RAGGED_BLOCK",
    "CYCLE_MIN_TILE",
    "CYCLE_TILE",
    "FORWARD_TILE",
    "INVERSE_MAX_AMPLIFICATION",
    "L2_BYTES",
    "inverse_backward_is_safe",
    "permuted_block_diagonal",
    "permuted_block_diagonal_dense_reference",
    "permuted_block_diagonal_reference",
    "permuted_tanh_network",
    "permuted_tanh_network_reference",
    "takes_batched_gemm",
]
