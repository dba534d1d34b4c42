"""The orthogonality penalty of the permuted block-diagonal paper (eq. 2) as one op.

P(θ) = mean over every k×k block B of 2‖I − BᵀB‖²_F, for a weight (depth, width/k, k, k).
The reference is plain torch (closed form for 2×2 blocks, a batched matmul otherwise,
gradients of any order); ``torch.ops.bornsparse.orthogonality_penalty`` reads the blocks
once for the value, and its backward op reads them once more and writes the gradient
g·(8/N)·B(BᵀB − I) already scaled by the incoming g (numba_kernels.py): three passes
over weight-sized memory per training step instead of dozens.
"""

from __future__ import annotations

import torch

from bornsparse._checks import check_float_tensor
from bornsparse.ops.backends import check_backend, resolve_backend
from bornsparse.ops.runtime.autograd import no_double_backward


def orthogonality_penalty_reference(weight: torch.Tensor) -> torch.Tensor:
    """2·mean‖I − BᵀB‖²_F over the blocks of ``weight`` (..., k, k); a scalar."""
    if weight.shape[-1] == 2:
        # closed form of BᵀB for B = [[a, b], [c, d]]: elementwise ops over all blocks at
        # once are ~10x faster than a batched 2×2 matmul and its backward
        a, b, c, d = weight.flatten(-2).unbind(-1)
        p, q, r = a * a + c * c - 1.0, a * b + c * d, b * b + d * d - 1.0
        return 2.0 * (p * p + 2.0 * q * q + r * r).mean()
    gram = weight.transpose(-1, -2) @ weight
    eye = torch.eye(weight.shape[-1], dtype=weight.dtype, device=weight.device)
    return 2.0 * ((gram - eye) ** 2).sum(dim=(-1, -2)).mean()


def _check_kernel_weight(weight: torch.Tensor) -> None:
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the penalty kernel needs a CPU float32/float64 weight, got "
                         f"{weight.dtype} on {weight.device}")
    if weight.dim() < 2 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"weight must have shape (..., k, k), got {tuple(weight.shape)}")


@torch.library.custom_op("bornsparse::orthogonality_penalty", mutates_args=())
def _penalty_op(weight: torch.Tensor) -> torch.Tensor:
    """P for a CPU float32/float64 weight (..., k, k): one read of the blocks."""
    from bornsparse.ops.penalty.numba_kernels import orthogonality_penalty_kernel

    _check_kernel_weight(weight)
    value = orthogonality_penalty_kernel(weight.contiguous().numpy(), None)
    return torch.tensor(value, dtype=weight.dtype)


@_penalty_op.register_fake
def _(weight):
    return weight.new_empty(())


@torch.library.custom_op("bornsparse::orthogonality_penalty_backward", mutates_args=())
def _penalty_backward_op(weight: torch.Tensor, grad_value: torch.Tensor) -> torch.Tensor:
    """grad_value · ∂P/∂weight in one pass (a read of the blocks, a write of the gradient)."""
    from bornsparse.ops.penalty.numba_kernels import orthogonality_penalty_kernel

    _check_kernel_weight(weight)
    w = weight.contiguous()
    grad = torch.empty_like(w)
    orthogonality_penalty_kernel(w.numpy(), grad.numpy(), float(grad_value))
    return grad


@_penalty_backward_op.register_fake
def _(weight, grad_value):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    # the weight is a parameter: saving it keeps nothing alive that is not alive anyway
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad_value):
    (weight,) = ctx.saved_tensors
    return torch.ops.bornsparse.orthogonality_penalty_backward(weight, grad_value)


_penalty_op.register_autograd(_backward, setup_context=_setup)
_penalty_backward_op.register_autograd(
    no_double_backward("orthogonality_penalty"),
    setup_context=lambda ctx, inputs, output: None,
)


def orthogonality_penalty(weight: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """2·mean‖I − BᵀB‖²_F over the k×k blocks of ``weight`` (..., k, k); a 0-d tensor.

    ``backend`` (ops/backends.py): "auto"/"numba" run the fused one-pass op on CPU
    float32/float64 weights; "reference" is plain torch (gradients of any order). The op
    differentiates once: its backward is a second op that writes the scaled gradient.
    """
    check_backend(backend, "permuted")
    check_float_tensor("weight", weight)
    if weight.dim() < 2 or weight.shape[-1] != weight.shape[-2] or weight.numel() == 0:
        raise ValueError(f"weight must have shape (..., k, k) with at least one block, got "
                         f"{tuple(weight.shape)}")
    if resolve_backend(backend, weight, "permuted") == "reference":
        return orthogonality_penalty_reference(weight)
    return torch.ops.bornsparse.orthogonality_penalty(weight)
