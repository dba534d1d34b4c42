"""The autograd formula every kernel's backward op registers: there is no double backward
through the fused kernels, and the error says what to use instead."""

from __future__ import annotations

from collections.abc import Callable


def no_double_backward(op: str, kernel: str = "numba") -> Callable:
    """An autograd formula for the backward op of ``op``'s ``kernel`` ("numba" or "Triton")
    kernel, which has none of its own: it raises, pointing at ``backend='reference'``."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"double backward through the {kernel} kernel of {op} is not supported; use "
            f"backend='reference' (plain PyTorch, gradients of any order)"
        )

    return backward
