"""y = x Sᵀ for a sparse S stored as values plus integer indices (COO, sorted row-major).

Conventions shared by every backend:

* ``S`` has dense shape ``(rows, cols)`` = (out_features, in_features); ``x`` is
  ``(..., cols)`` and the result ``(..., rows)``, like ``F.linear(x, S)``.
* ``indices`` is int32 or int64 of shape (2, nnz): ``indices[0]`` row, ``indices[1]`` column, in
  strictly increasing row-major order (so unique); ``values`` has shape (nnz,).
* A :class:`~bornsparse.ops.sparse.plan.SparsePlan` (plan.py) holds what is derived from
  the support only: row pointers, and the column-sorted permutation used by the input
  gradient. Layers build one per support and cache it; building validates the support in
  O(nnz).

Backends: ``"reference"`` (plain PyTorch index_add, any device, differentiable twice),
``"numba"`` (CPU kernels in ``numba_matmul``), ``"torch_sparse"`` (torch.sparse CSR
matmuls and sampled_addmm), ``"triton"`` (GPU kernels in ``triton_matmul``; CPU tensors
only under ``TRITON_INTERPRET=1``). ``"auto"`` picks triton for CUDA tensors when it
imports, numba for CPU float32/float64 — it measured faster than torch.sparse, see
docs/results.md — and the reference elsewhere.
"""

from __future__ import annotations

import warnings

import torch

from bornsparse._checks import check_float_tensor
from bornsparse.ops.backends import resolve_backend
from bornsparse.ops.runtime.autograd import no_double_backward
from bornsparse.ops.sparse.fake_kernels import sparse_matmul_backward_fake, sparse_matmul_fake
from bornsparse.ops.sparse.plan import (
    SparsePlan,
    build_plan,
    check_kernel_values,
    check_plan_tensors,
    check_shape_pair,
)


def sparse_matmul_reference(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """Plain-PyTorch x Sᵀ: gather the inputs each nonzero reads, scale, scatter-add.

    Any device and dtype, gradients of any order; O(batch·nnz) temporary memory.
    """
    contrib = x.index_select(-1, indices[1]) * values  # (..., nnz)
    out = x.new_zeros(*x.shape[:-1], shape[0])
    return out.index_add(-1, indices[0], contrib)


# below this many multiply-adds a kernel runs serially: waking threads costs more
PARALLEL_MIN_WORK = 1 << 16


def csr_matmul_t(ptr: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, x_t: torch.Tensor,
                 n_out: int) -> torch.Tensor:
    """out_t (n_out, batch) = S x_t for S in compressed rows (ptr, idx, vals), x_t (·, batch).

    With the compressed columns (colptr, csc_rows, values[csc_perm]) it computes Sᵀ x_t.
    CPU, contiguous, trusted indices (callers validated them).
    """
    from bornsparse.ops.sparse import numba_matmul as k

    out_t = torch.empty(n_out, x_t.shape[1], dtype=x_t.dtype)
    fn = k._spmm_t_kernel if idx.numel() * x_t.shape[1] >= PARALLEL_MIN_WORK else (
        k._spmm_t_serial_kernel
    )
    fn(ptr.numpy(), idx.numpy(), vals.numpy(), x_t.numpy(), out_t.numpy())
    return out_t


def sampled_dot_t(rows: torch.Tensor, cols: torch.Tensor, gy_t: torch.Tensor, x_t: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """out[e] += ⟨gy_t[rows[e]], x_t[cols[e]]⟩ (the values' gradient); zeros if ``out`` is
    None. CPU, contiguous, trusted indices."""
    from bornsparse.ops.sparse import numba_matmul as k

    if out is None:
        out = torch.zeros(rows.numel(), dtype=x_t.dtype)
    fn = k._sampled_dot_kernel if rows.numel() * x_t.shape[1] >= PARALLEL_MIN_WORK else (
        k._sampled_dot_serial_kernel
    )
    fn(rows.numpy(), cols.numpy(), gy_t.numpy(), x_t.numpy(), out.numpy())
    return out


@torch.library.custom_op("bornsparse::sparse_matmul", mutates_args=())
def _sparse_matmul_op(
    x: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
    rowptr: torch.Tensor, colptr: torch.Tensor, csc_perm: torch.Tensor,
    csc_rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x Sᵀ, x_t) for x (batch, cols) and S given by its plan tensors (see SparsePlan);
    x_t = xᵀ contiguous, which the values' gradient reads."""
    shape = (rowptr.numel() - 1, colptr.numel() - 1)
    _check_kernel_operands(x, values, shape)
    check_plan_tensors(shape, rows, cols, rowptr, colptr, csc_perm, csc_rows)
    x_t = x.t().clone(memory_format=torch.contiguous_format)  # (cols, batch), never a view
    y_t = csr_matmul_t(rowptr, cols, values.contiguous(), x_t, shape[0])
    # one explicit transpose copy: every consumer (bias add, the DCT sum, autograd's
    # gradient accumulation) is several times slower on a transposed view
    return y_t.t().contiguous(), x_t


_sparse_matmul_op.register_fake(sparse_matmul_fake)


@torch.library.custom_op("bornsparse::sparse_matmul_backward", mutates_args=())
def _sparse_matmul_backward_op(
    grad_y: torch.Tensor, x_t: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
    cols: torch.Tensor, rowptr: torch.Tensor, colptr: torch.Tensor, csc_perm: torch.Tensor,
    csc_rows: torch.Tensor, need_x: bool, need_values: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_values) of ``sparse_matmul``; a gradient not asked for is empty."""
    shape = (rowptr.numel() - 1, colptr.numel() - 1)
    _check_kernel_operands(x_t.t(), values, shape)
    check_plan_tensors(shape, rows, cols, rowptr, colptr, csc_perm, csc_rows)
    if grad_y.shape != (x_t.shape[1], shape[0]):
        raise ValueError(f"grad_y must have shape {(x_t.shape[1], shape[0])}, got "
                         f"{tuple(grad_y.shape)}")
    gy_t = grad_y.t().contiguous()  # (rows, batch)
    grad_x = grad_v = values.new_empty(0)
    if need_x:
        vals_csc = values.detach()[csc_perm]
        grad_x = csr_matmul_t(colptr, csc_rows, vals_csc, gy_t, shape[1]).t().contiguous()
    if need_values:
        grad_v = sampled_dot_t(rows, cols, gy_t, x_t.contiguous())
    return grad_x, grad_v


_sparse_matmul_backward_op.register_fake(sparse_matmul_backward_fake)


def _sparse_matmul_setup(ctx, inputs, output):
    x, values, *plan = inputs
    ctx.save_for_backward(output[1], values, *plan)
    ctx.mark_non_differentiable(output[1])
    # no zero-filled gradient for that saved-for-backward output (it is batch-sized): the
    # backward gets None for it, and for the main output when nothing used it
    ctx.set_materialize_grads(False)


def _sparse_matmul_backward(ctx, grad_y, _grad_x_t):
    x_t, values, *plan = ctx.saved_tensors
    if grad_y is None:  # the product itself was not used
        return (None,) * (2 + len(plan))
    need_x, need_v = ctx.needs_input_grad[:2]
    grad_x, grad_v = torch.ops.bornsparse.sparse_matmul_backward(
        grad_y, x_t, values, *plan, need_x, need_v
    )
    return (grad_x if need_x else None), (grad_v if need_v else None), *([None] * len(plan))


_sparse_matmul_op.register_autograd(_sparse_matmul_backward, setup_context=_sparse_matmul_setup)
_sparse_matmul_backward_op.register_autograd(
    no_double_backward("sparse_matmul"), setup_context=lambda ctx, inputs, output: None
)


def _check_kernel_operands(x: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
                           ) -> None:
    if x.dim() != 2 or x.shape[1] != shape[1]:
        raise ValueError(f"x must have shape (batch, {shape[1]}), got {tuple(x.shape)}")
    check_kernel_values(x, values)


def _csr(ptr, idx, vals, size):
    # the plan was validated once when built; torch's "beta" notice is not for our users
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(ptr, idx, vals, size, check_invariants=False)


class _TorchSparseMatmulFn(torch.autograd.Function):
    """The same product through torch.sparse CSR kernels, for comparison and other devices."""

    @staticmethod
    def forward(ctx, x, values, plan):
        rows, cols = plan.shape
        s = _csr(plan.rowptr, plan.cols, values.detach(), (rows, cols))
        y_t = torch.sparse.mm(s, x.detach().t())  # (rows, batch)
        ctx.save_for_backward(x, values)
        ctx.plan = plan
        return y_t.t()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, values = ctx.saved_tensors
        plan = ctx.plan
        rows, cols = plan.shape
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            s_t = _csr(plan.colptr, plan.csc_rows, values.detach()[plan.csc_perm], (cols, rows))
            grad_x = torch.sparse.mm(s_t, grad_y.t()).t()
        if ctx.needs_input_grad[1]:
            pattern = _csr(plan.rowptr, plan.cols, torch.zeros_like(values), (rows, cols))
            grad_v = torch.sparse.sampled_addmm(
                pattern, grad_y.t().contiguous(), x.detach(), beta=0.0
            ).values()
        return grad_x, grad_v, None


def sparse_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    shape: tuple[int, int],
    *,
    plan: SparsePlan | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """x Sᵀ for x (..., cols) and S (rows, cols) given by ``values``/``indices``; (..., rows).

    ``plan`` (from :func:`build_plan` on the same ``indices``) saves re-deriving the support
    structure every call; without it the support is validated and a plan built here.
    Differentiable in ``x`` and ``values``.
    """
    shape = check_shape_pair("shape", shape)
    check_float_tensor("x", x)
    check_float_tensor("values", values)
    if x.dim() == 0 or x.shape[-1] != shape[1]:
        raise ValueError(f"x must have shape (..., {shape[1]}), got {tuple(x.shape)}")
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D (nnz,), got shape {tuple(values.shape)}")
    if values.dtype != x.dtype or values.device != x.device:
        raise TypeError(
            f"values must match x's dtype and device ({x.dtype}, {x.device}), "
            f"got ({values.dtype}, {values.device})"
        )
    if plan is None:
        plan = build_plan(indices, shape)
    elif plan.shape != shape or plan.nnz != values.numel():
        raise ValueError(
            f"plan describes shape {plan.shape} with nnz {plan.nnz}, "
            f"got shape {shape} with nnz {values.numel()}"
        )
    if values.numel() != plan.nnz:
        raise ValueError(f"values must have shape ({plan.nnz},), got {tuple(values.shape)}")
    backend = resolve_backend(backend, x, "sparse", has_triton=True)
    lead = x.shape[:-1]
    if backend == "reference":
        return sparse_matmul_reference(x, values, indices, shape)
    x2 = x.reshape(-1, shape[1])
    if backend == "torch_sparse":
        return _TorchSparseMatmulFn.apply(x2, values, plan).reshape(*lead, shape[0])
    if backend == "triton":
        import bornsparse.ops.sparse.triton_matmul  # noqa: F401  (registers the op)

        y, _ = torch.ops.bornsparse.sparse_matmul_triton(x2, values, *plan.tensors())
        return y.reshape(*lead, shape[0])
    y, _ = torch.ops.bornsparse.sparse_matmul(x2, values, *plan.tensors())
    return y.reshape(*lead, shape[0])
