"""The permuted operator through batched GEMM, for large blocks on the CPU.

Monarch's speed comes from running each block-diagonal factor as one batched GEMM; G(θ) can
do the same. Activations are kept *feature-major*, h of shape (width, batch): a factor is
then one row gather, ``h[perm]`` (the permutation: whole rows of ``batch`` numbers), seen as
(nblocks, k, batch), and one ``torch.bmm`` with the (nblocks, k, k) blocks, whose output is
already the next factor's (width, batch) input — no transposes between factors, one at each
end. Backward runs the factors in reverse: the blocks' gradient is ``bmm(dz, gᵀ)`` with the
gathered input g saved in forward, the input's ``bmm(Bᵀ, dz)`` scattered back through the
inverse permutation (a gather too). Memory: forward saves the depth gathered inputs,
depth · width · batch numbers (the k = 2 kernels keep O(width · batch) whatever the depth;
at these block sizes a budget allows few factors).

Which path "auto" takes (``takes_batched_gemm``) was measured against the fused numba
kernels, f+b over fly's Monarch at 1024 → 1024 and 65,536 parameters, 2 threads, batch 64
/ 256 (docs/results.md, AMD EPYC Zen 5 with AVX-512): k = 32 (width 1024, depth 2) numba's
4×4 sub-block kernels 0.52-0.79× / 0.63-0.74×, this path 0.65-0.74× / 0.96-1.08×; k = 64
(depth 1) 0.55× / 0.62× against 0.55× / 0.84×; k = 128 (depth 1) 0.81× / 1.00× against
0.71× / 1.12×, about a tie. So "auto" takes this path from k = 128 (``BMM_MIN_BLOCK``),
and from k = 32 (``BMM_MIN_RAGGED_BLOCK``) for the block sizes 4 does not divide, which
only the generic loop nest of the numba path would run.

``torch.ops.bornsparse.permuted_block_diagonal_bmm`` (+ ``_backward``) are custom ops with
fake kernels and a registered first-order autograd formula, like the numba path's.
"""

from __future__ import annotations

import torch

from bornsparse.ops.permuted.operands import check_operands as _check_operands
from bornsparse.ops.permuted.operands import check_permutations as _check_permutations
from bornsparse.ops.runtime.autograd import no_double_backward
from bornsparse.ops.runtime.validated import check_once

#: the smallest block size "auto" runs through batched GEMM on the CPU (above)...
BMM_MIN_BLOCK = 128
#: ...and the smallest for block sizes that 4 does not divide
BMM_MIN_RAGGED_BLOCK = 32


def takes_batched_gemm(k: int) -> bool:
    """Whether "auto" runs k×k blocks on the CPU through this path (measured above)."""
    return k >= BMM_MIN_BLOCK or (k >= BMM_MIN_RAGGED_BLOCK and k % 4 != 0)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


@torch.library.custom_op("bornsparse::permuted_block_diagonal_bmm", mutates_args=())
def _bmm_op(x: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor,
            out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(G x, the gathered input of every factor (depth, width, batch)) for x (batch, n_in)."""
    _check_operands(x, weight, perms, out_features, "numba")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (batch, n_in), got {tuple(x.shape)}")
    check_once("permutations", (perms,), lambda: _check_permutations(perms))
    depth, nb, k, _ = weight.shape
    width, batch = nb * k, x.shape[0]
    saved = torch.empty(depth, width, batch, dtype=x.dtype)
    h = x.new_zeros(width, batch)
    h[: x.shape[1]] = x.T
    for t in range(depth):
        torch.index_select(h, 0, perms[t], out=saved[t])
        h = torch.bmm(weight[t], saved[t].view(nb, k, batch)).view(width, batch)
    return h[:out_features].T.contiguous(), saved


@_bmm_op.register_fake
def _(x, weight, perms, out_features):
    torch._check(x.dim() == 2, lambda: f"x must have shape (batch, n_in), got {x.shape}")
    depth, nb, k, _ = weight.shape
    return (x.new_empty(x.shape[0], out_features),
            x.new_empty(depth, nb * k, x.shape[0]))


@torch.library.custom_op("bornsparse::permuted_block_diagonal_bmm_backward", mutates_args=())
def _bmm_backward_op(grad_out: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor,
                     saved: torch.Tensor, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂/∂x (batch, n_in), ∂/∂weight) of G x from the saved gathered inputs."""
    depth, nb, k, _ = weight.shape
    width, batch = nb * k, grad_out.shape[0]
    dh = grad_out.new_zeros(width, batch)
    dh[: grad_out.shape[1]] = grad_out.T
    grad_w = torch.empty_like(weight)
    for t in reversed(range(depth)):
        dz = dh.view(nb, k, batch)
        torch.bmm(dz, saved[t].view(nb, k, batch).transpose(1, 2), out=grad_w[t])
        dg = torch.bmm(weight[t].transpose(1, 2), dz).view(width, batch)
        dh = dg.index_select(0, _inverse(perms[t]))
    return dh[:n_in].T.contiguous(), grad_w


@_bmm_backward_op.register_fake
def _(grad_out, weight, perms, saved, n_in):
    return grad_out.new_empty(grad_out.shape[0], n_in), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, weight, perms, _ = inputs
    ctx.save_for_backward(weight, perms, output[1])
    ctx.n_in = x.shape[1]


def _backward(ctx, grad_out, _grad_saved):
    weight, perms, saved = ctx.saved_tensors
    grad_x, grad_w = torch.ops.bornsparse.permuted_block_diagonal_bmm_backward(
        grad_out.contiguous(), weight, perms, saved, ctx.n_in)
    return grad_x, grad_w, None, None


_bmm_op.register_autograd(_backward, setup_context=_setup)
_bmm_backward_op.register_autograd(
    no_double_backward("permuted_block_diagonal_bmm", kernel="batched-GEMM"))


def permuted_block_diagonal_bmm(x2: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor,
                                out_features: int) -> torch.Tensor:
    """G x through batched GEMM for x2 (batch, n_in) on the CPU; returns (batch, out)."""
    y, _ = torch.ops.bornsparse.permuted_block_diagonal_bmm(
        x2.contiguous(), weight.contiguous(), perms.contiguous(), out_features)
    return y
