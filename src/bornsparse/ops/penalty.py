"""The orthogonality penalty of the permuted block-diagonal paper (eq. 2) as one op.

P(θ) = mean over every k×k block B of 2‖I − BᵀB‖²_F, for a weight (depth, width/k, k, k).
The reference is plain torch (closed form for 2×2 blocks, a batched matmul otherwise,
gradients of any order); ``torch.ops.bornsparse.orthogonality_penalty`` computes the value
and, when a gradient will be needed, the gradient (8/N)·B(BᵀB − I) in the same single pass
over the blocks (ops/_penalty_numba.py), so a training step reads the weight once for it.
"""

from __future__ import annotations

import torch

from bornsparse._checks import check_float_tensor
from bornsparse.ops.backends import check_backend, resolve_backend


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


@torch.library.custom_op("bornsparse::orthogonality_penalty", mutates_args=())
def _penalty_op(weight: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, ∂P/∂weight) for a CPU float32/float64 weight (..., k, k); the gradient is empty
    unless ``with_grad``."""
    from bornsparse.ops._penalty_numba import orthogonality_penalty_kernel

    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the penalty kernel needs a CPU float32/float64 weight, got "
                         f"{weight.dtype} on {weight.device}")
    if weight.dim() < 2 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"weight must have shape (..., k, k), got {tuple(weight.shape)}")
    w = weight.contiguous()
    grad = torch.empty_like(w) if with_grad else w.new_empty(0)
    value = orthogonality_penalty_kernel(w.numpy(), grad.numpy() if with_grad else None)
    return torch.tensor(value, dtype=w.dtype), grad


@_penalty_op.register_fake
def _(weight, with_grad):
    grad = torch.empty_like(weight, memory_format=torch.contiguous_format) if with_grad else (
        weight.new_empty(0))
    return weight.new_empty(()), grad


def _setup(ctx, inputs, output):
    # the weight is a parameter: saving it keeps nothing alive that is not alive anyway
    ctx.save_for_backward(inputs[0], output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_value, _grad_grad):
    weight, grad = ctx.saved_tensors
    if grad.numel() == 0:  # forward skipped the gradient: one more pass now
        grad = torch.ops.bornsparse.orthogonality_penalty(weight, True)[1]
    return grad * grad_value, None


_penalty_op.register_autograd(_backward, setup_context=_setup)


def orthogonality_penalty(weight: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """2·mean‖I − BᵀB‖²_F over the k×k blocks of ``weight`` (..., k, k); a 0-d tensor.

    ``backend`` (ops/backends.py): "auto"/"numba" run the fused one-pass op on CPU
    float32/float64 weights; "reference" is plain torch (gradients of any order). The op's
    gradient is first order: its backward scales the gradient the forward pass computed.
    """
    check_backend(backend, "permuted")
    check_float_tensor("weight", weight)
    if weight.dim() < 2 or weight.shape[-1] != weight.shape[-2] or weight.numel() == 0:
        raise ValueError(f"weight must have shape (..., k, k) with at least one block, got "
                         f"{tuple(weight.shape)}")
    if resolve_backend(backend, weight, "permuted") == "reference":
        return orthogonality_penalty_reference(weight)
    with_grad = torch.is_grad_enabled() and weight.requires_grad
    value, _ = torch.ops.bornsparse.orthogonality_penalty(weight, with_grad)
    return value
