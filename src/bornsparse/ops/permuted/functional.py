"""The functionals ``permuted_block_diagonal`` and ``permuted_tanh_network``: validate the
operands (operands.py), resolve the backend (ops/backends.py) and run the reference
(reference.py), the numba custom ops (custom_ops.py) or the Triton ones (triton_kernels.py,
imported only when chosen)."""

from __future__ import annotations

import torch

from bornsparse._checks import check_float_tensor
from bornsparse.ops.backends import resolve_backend
from bornsparse.ops.permuted.batched_gemm import permuted_block_diagonal_bmm, takes_batched_gemm
from bornsparse.ops.permuted.custom_ops import cycle_plan
from bornsparse.ops.permuted.operands import check_operands as _check_operands
from bornsparse.ops.permuted.operands import check_permutations as _check_permutations
from bornsparse.ops.permuted.reference import (
    permuted_block_diagonal_reference,
    permuted_tanh_network_reference,
)
from bornsparse.ops.runtime.validated import check_once


def _check_reference_perms(perms: torch.Tensor) -> None:
    # the reference's index_select bounds-checks by itself, so a compiled graph skips this
    # (its answer is data, which would break the graph); eagerly a non-permutation is an error
    if not torch.compiler.is_compiling():
        check_once("permutations", (perms,), lambda: _check_permutations(perms))


def permuted_block_diagonal(
    x: torch.Tensor,
    weight: torch.Tensor,
    perms: torch.Tensor,
    *,
    out_features: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """G [x, 0] for ``x`` of shape (..., n_in); returns (..., out_features).

    The layout is in the package docstring (``bornsparse.ops.permuted``). ``backend``
    (ops/backends.py): "auto" runs ``torch.ops.bornsparse.permuted_block_diagonal`` (the
    fused numba kernel) on CPU float32/float64 tensors — for blocks of 128 and more (32
    and more where 4 does not divide k) ``torch.ops.bornsparse.permuted_block_diagonal_bmm``,
    one batched GEMM per factor (batched_gemm.py) — and the reference otherwise;
    "reference" forces plain PyTorch (any device, gradients of any order); "numba" forces
    the kernel and raises if the tensors do not suit it; "triton" runs the Triton kernels
    (CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``; "auto" picks them on CUDA when
    triton imports). The kernels support first-order gradients (``x`` and ``weight``);
    double backward through them raises, so use ``backend="reference"`` for higher-order
    derivatives.
    """
    _, out_features = _check_operands(x, weight, perms, out_features, backend)
    kind = resolve_backend(backend, x, "permuted", has_triton=True)
    if kind == "reference":
        _check_reference_perms(perms)
        return permuted_block_diagonal_reference(x, weight, perms, out_features=out_features)
    if kind == "triton":
        from bornsparse.ops.permuted.triton_kernels import permuted_block_diagonal_triton

        return permuted_block_diagonal_triton(x, weight, perms, out_features)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if backend == "auto" and takes_batched_gemm(weight.shape[2]):
        # large blocks: one batched GEMM per factor beats the fused kernels (batched_gemm.py)
        y = permuted_block_diagonal_bmm(x2, weight, perms, out_features)
        return y if x.dim() == 2 else y.reshape(*lead, out_features)
    plan = cycle_plan(weight, x2.shape[0])
    # whether a backward can follow decides whether the cycle walk keeps its final
    # activation; it is decided here, where grad mode is visible
    keep_final = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    y, _ = torch.ops.bornsparse.permuted_block_diagonal(
        x2, weight, perms, out_features, 0 if plan is None else plan[0], keep_final
    )
    return y if x.dim() == 2 else y.reshape(*lead, out_features)


def permuted_tanh_network(
    x: torch.Tensor,
    weight: torch.Tensor,
    perms: torch.Tensor,
    biases: torch.Tensor,
    *,
    out_features: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The tanh network h_θ(x) (the permuted block-diagonal paper, eq. 3-5) for ``x`` (..., n_in);
    returns (..., out_features). ``weight``/``perms`` as for ``permuted_block_diagonal``,
    ``biases`` (depth, width). The numba path keeps activations as (width, batch), so the
    per-factor op ``torch.ops.bornsparse.permuted_factor_columns`` gathers contiguous rows and only
    the ends are transposed; bias and tanh run in torch. "triton" (and "auto" on CUDA)
    runs the whole network as one op, ``torch.ops.bornsparse.permuted_tanh_network_triton``
    (bias and tanh fused into each factor's kernel, permuted/triton_kernels.py). Double
    backward: use ``backend="reference"``.
    """
    width, out_features = _check_operands(x, weight, perms, out_features, backend)
    check_float_tensor("biases", biases)
    if tuple(biases.shape) != (weight.shape[0], width):
        raise ValueError(
            f"biases must have shape (depth, width) = {(weight.shape[0], width)}, "
            f"got {tuple(biases.shape)}"
        )
    if biases.dtype != x.dtype or biases.device != x.device:
        raise TypeError(
            f"biases must match x's dtype and device, got {biases.dtype} on {biases.device}"
        )
    kind = resolve_backend(backend, x, "permuted", has_triton=True)
    if kind == "reference":
        _check_reference_perms(perms)
        return permuted_tanh_network_reference(
            x, weight, perms, biases, out_features=out_features
        )
    if kind == "triton":
        from bornsparse.ops.permuted.triton_kernels import permuted_tanh_network_triton

        return permuted_tanh_network_triton(x, weight, perms, biases, out_features)
    lead = x.shape[:-1]
    h = x.reshape(-1, x.shape[-1])
    if h.shape[1] < width:
        h = torch.nn.functional.pad(h, (0, width - h.shape[1]))
    h = h.T.contiguous()  # (width, batch)
    depth = weight.shape[0]
    for t in range(depth):
        h = torch.ops.bornsparse.permuted_factor_columns(h, weight[t], perms[t])
        h = h + biases[t].unsqueeze(1)
        if t < depth - 1:
            h = torch.tanh(h)
    return h[:out_features].T.reshape(*lead, out_features)
