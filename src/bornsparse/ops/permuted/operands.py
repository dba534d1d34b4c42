"""Operand checks and constants shared by every backend of the permuted operator.

Here, below ``functional.py`` and ``custom_ops.py`` (the numba ops) and
``triton_kernels.py`` (the Triton ops), so that neither imports the other.
"""

from __future__ import annotations

import torch

from bornsparse._checks import check_float_tensor, check_positive_int
from bornsparse.ops.backends import check_backend

# The cycle backward rebuilds every factor's input from its output through the blocks'
# inverses; it is used only while the product over factors of the worst block condition
# number stays at most this (rounding relative to the activations is magnified at most so
# much), else backward recomputes the forward like the other kernels.
INVERSE_MAX_AMPLIFICATION = 8.0


def check_operands(
    x: object, weight: object, perms: object, out_features: object, backend: object
) -> tuple[int, int]:
    """Validate the functional's arguments; return (width, out_features)."""
    check_backend(backend, "permuted")
    check_float_tensor("x", x)
    check_float_tensor("weight", weight)
    if not isinstance(perms, torch.Tensor):
        raise TypeError(f"perms must be a torch.Tensor, got {type(perms).__name__}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] < 1:
        raise ValueError(
            f"weight must have shape (depth, width // k, k, k), got {tuple(weight.shape)}"
        )
    depth, nblocks, k, _ = weight.shape
    width = nblocks * k
    if perms.dtype != torch.int64:
        raise TypeError(f"perms must have dtype torch.int64, got {perms.dtype}")
    if tuple(perms.shape) != (depth, width):
        raise ValueError(
            f"perms must have shape (depth, width) = {(depth, width)} to match weight, "
            f"got {tuple(perms.shape)}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must share a dtype, got {x.dtype} and {weight.dtype}")
    if x.device != weight.device or perms.device != weight.device:
        raise ValueError(
            f"x, weight and perms must be on one device, got {x.device}, {weight.device} "
            f"and {perms.device}"
        )
    if x.dim() == 0 or not 1 <= x.shape[-1] <= width:
        raise ValueError(f"x must have shape (..., n_in) with 1 <= n_in <= {width}, "
                         f"got {tuple(x.shape)}")
    if out_features is None:
        out_features = width
    out_features = check_positive_int("out_features", out_features)
    if out_features > width:
        raise ValueError(f"out_features must be at most width = {width}, got {out_features}")
    return width, out_features


def check_permutations(perms: torch.Tensor) -> None:
    # The numba kernels do no bounds checks, so a bad index would read outside memory.
    if perms.device.type == "cpu":
        from bornsparse.ops.permuted.permutation_check import _perms_are_permutations_kernel

        ok = _perms_are_permutations_kernel(perms.contiguous().numpy())
    else:
        arange = torch.arange(perms.shape[1], device=perms.device)
        ok = bool((perms.sort(dim=1).values == arange).all())
    if not ok:
        raise ValueError("perms must hold a permutation of range(width) in every row")
