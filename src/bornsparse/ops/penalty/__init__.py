"""The orthogonality penalty of the permuted block-diagonal paper (eq. 2),
2·mean‖I − BᵀB‖²_F over k×k blocks.

* ``functional``: ``orthogonality_penalty`` (the ``torch.ops.bornsparse.orthogonality_penalty``
  custom op on CPU float32/float64, + ``_backward``) and its plain-PyTorch reference.
* ``numba_kernels``: the fused one-pass numba kernel of the value and its gradient.

Importing the package registers the custom ops; the names below are re-exported from
``functional``.
"""

from bornsparse.ops.penalty.functional import (
    orthogonality_penalty,
    orthogonality_penalty_reference,
)

__all__ = ["orthogonality_penalty", "orthogonality_penalty_reference"]
