"""Triton kernels of the sparse product y = x Sᵀ (matmul.py has the layout).

Imported only by the "triton" backend. Like the numba kernels they work on transposed,
contiguous activations (features, batch), so a program's loads run along the batch
(coalesced on a GPU):

* ``_compressed_kernel``: ``out_t[r, n] = Σ_{e in ptr[r]..ptr[r+1]} vals[e] · in_t[idx[e], n]``,
  one program per (output row, tile of BLOCK_N samples), the row's nonzeros BLOCK_E at a time
  as a (BLOCK_E, BLOCK_N) tile. With the CSR arrays (rowptr, cols, values) it is the
  forward; with the CSC arrays (colptr, csc_rows, values[csc_perm]) the input gradient. Each
  program owns its output row, so no atomics.
* ``_sampled_dot_kernel``: ``grad_values[e] = Σ_n gy_t[rows[e], n] · x_t[cols[e], n]``, one
  program per BLOCK_E nonzeros looping over the batch: no atomics.

Products accumulate in float32 (float64 for float64 tensors). Indices may be int32 or
int64; offsets are computed in int64.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from bornsparse.ops.backends import INDEX_DTYPES
from bornsparse.ops.runtime.autograd import no_double_backward
from bornsparse.ops.runtime.triton_support import acc_dtype, check_triton_tensor, jit_kernels
from bornsparse.ops.runtime.validated import check_once
from bornsparse.ops.sparse.fake_kernels import sparse_matmul_backward_fake, sparse_matmul_fake
from bornsparse.ops.sparse.plan import check_plan_ranges

BLOCK_N = 32  # samples per program
BLOCK_E = 16  # nonzeros per step


def _compressed_kernel(ptr_ptr, idx_ptr, vals_ptr, in_ptr, out_ptr, batch,
                       ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < batch
    start = tl.load(ptr_ptr + r)
    end = tl.load(ptr_ptr + r + 1)
    acc = tl.zeros((BLOCK_E, BLOCK_N), dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_ok = e < end
        c = tl.load(idx_ptr + e, mask=e_ok, other=0).to(tl.int64)
        v = tl.load(vals_ptr + e, mask=e_ok, other=0).to(ACC)
        xs = tl.load(in_ptr + c[:, None] * batch + n[None, :],
                     mask=e_ok[:, None] & n_ok[None, :], other=0).to(ACC)
        acc += v[:, None] * xs
    out = tl.sum(acc, axis=0)
    tl.store(out_ptr + r.to(tl.int64) * batch + n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def _sampled_dot_kernel(rows_ptr, cols_ptr, gy_ptr, x_ptr, out_ptr, nnz, batch,
                        ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < nnz
    r = tl.load(rows_ptr + e, mask=e_ok, other=0).to(tl.int64)
    c = tl.load(cols_ptr + e, mask=e_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_E, BLOCK_N), dtype=ACC)
    for n0 in range(0, batch, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        ok = e_ok[:, None] & (n < batch)[None, :]
        g = tl.load(gy_ptr + r[:, None] * batch + n[None, :], mask=ok, other=0).to(ACC)
        x = tl.load(x_ptr + c[:, None] * batch + n[None, :], mask=ok, other=0).to(ACC)
        acc += g * x
    tl.store(out_ptr + e, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=e_ok)


def kernels() -> SimpleNamespace:
    """The kernels, wrapped for the current TRITON_INTERPRET setting."""
    return jit_kernels(compressed=_compressed_kernel, sampled_dot=_sampled_dot_kernel)


def compressed_matmul_t(ptr: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor,
                        in_t: torch.Tensor, n_out: int) -> torch.Tensor:
    """out_t (n_out, batch) = S in_t for S in compressed rows (ptr, idx, vals) and in_t
    (·, batch) contiguous."""
    batch = in_t.shape[1]
    out_t = in_t.new_empty(n_out, batch)
    if batch:
        grid = (n_out, triton.cdiv(batch, BLOCK_N))
        kernels().compressed[grid](ptr, idx, vals, in_t, out_t, batch, ACC=acc_dtype(in_t),
                                   BLOCK_E=BLOCK_E, BLOCK_N=BLOCK_N)
    return out_t


def sampled_dot_t(rows: torch.Tensor, cols: torch.Tensor, gy_t: torch.Tensor,
                  x_t: torch.Tensor) -> torch.Tensor:
    """(nnz,) with entry e = ⟨gy_t[rows[e]], x_t[cols[e]]⟩; gy_t, x_t (·, batch) contiguous."""
    nnz = rows.numel()
    out = gy_t.new_empty(nnz)
    grid = (triton.cdiv(nnz, BLOCK_E),)
    kernels().sampled_dot[grid](rows, cols, gy_t, x_t, out, nnz, gy_t.shape[1],
                                ACC=acc_dtype(gy_t), BLOCK_E=BLOCK_E, BLOCK_N=BLOCK_N)
    return out


def _check_op_operands(x: torch.Tensor, values: torch.Tensor, plan: tuple[torch.Tensor, ...]
                       ) -> tuple[int, int]:
    """Validate what the kernels trust; return the (rows, cols) shape of S."""

    rows, cols, rowptr, colptr, csc_perm, csc_rows = plan
    shape = (rowptr.numel() - 1, colptr.numel() - 1)
    if x.dim() != 2 or x.shape[1] != shape[1]:
        raise ValueError(f"x must have shape (batch, {shape[1]}), got {tuple(x.shape)}")
    check_triton_tensor("x", x)
    if values.dtype != x.dtype or values.device != x.device or values.dim() != 1:
        raise ValueError(f"values must be 1-D with x's dtype and device ({x.dtype}, "
                         f"{x.device}), got {values.dtype} {tuple(values.shape)} on "
                         f"{values.device}")
    nnz = rows.numel()
    lengths = dict(rows=nnz, cols=nnz, rowptr=shape[0] + 1, colptr=shape[1] + 1,
                   csc_perm=nnz, csc_rows=nnz)
    for (name, length), t in zip(lengths.items(), plan, strict=True):
        if t.dtype not in INDEX_DTYPES or t.dim() != 1 or t.numel() != length or (
            t.device != x.device
        ):
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor of {length} entries "
                             f"on {x.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if values.numel() != nnz:
        raise ValueError(f"values must have shape ({nnz},), got {tuple(values.shape)}")

    # the kernels do no bounds checks: ranges and pointers once per tensor version
    check_once("sparse plan", plan, lambda: check_plan_ranges(shape, *plan))
    return shape


@torch.library.custom_op("bornsparse::sparse_matmul_triton", mutates_args=())
def _sparse_matmul_triton_op(
    x: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
    rowptr: torch.Tensor, colptr: torch.Tensor, csc_perm: torch.Tensor, csc_rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x Sᵀ (batch, rows), x_t (cols, batch)) for x (batch, cols); x_t is what the values'
    gradient reads."""
    plan = (rows, cols, rowptr, colptr, csc_perm, csc_rows)
    shape = _check_op_operands(x, values, plan)
    x_t = x.t().clone(memory_format=torch.contiguous_format)
    y_t = compressed_matmul_t(rowptr, cols, values.contiguous(), x_t, shape[0])
    return y_t.t().contiguous(), x_t


_sparse_matmul_triton_op.register_fake(sparse_matmul_fake)


@torch.library.custom_op("bornsparse::sparse_matmul_triton_backward", mutates_args=())
def _sparse_matmul_triton_backward_op(
    grad_y: torch.Tensor, x_t: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
    cols: torch.Tensor, rowptr: torch.Tensor, colptr: torch.Tensor, csc_perm: torch.Tensor,
    csc_rows: torch.Tensor, need_x: bool, need_values: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_values) of ``sparse_matmul_triton``; a gradient not asked for is empty."""
    plan = (rows, cols, rowptr, colptr, csc_perm, csc_rows)
    shape = _check_op_operands(x_t.t(), values, plan)
    if grad_y.shape != (x_t.shape[1], shape[0]):
        raise ValueError(f"grad_y must have shape {(x_t.shape[1], shape[0])}, got "
                         f"{tuple(grad_y.shape)}")
    gy_t = grad_y.t().contiguous()  # (rows, batch)
    x_t = x_t.contiguous()
    grad_x = grad_v = values.new_empty(0)
    if need_x:
        vals_csc = values.detach()[csc_perm].contiguous()
        grad_x = compressed_matmul_t(colptr, csc_rows, vals_csc, gy_t, shape[1]).t().contiguous()
    if need_values:
        grad_v = sampled_dot_t(rows, cols, gy_t, x_t)
    return grad_x, grad_v


_sparse_matmul_triton_backward_op.register_fake(sparse_matmul_backward_fake)


def _setup(ctx, inputs, output):
    x, values, *plan = inputs
    ctx.save_for_backward(output[1], values, *plan)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the saved x_t


def _backward(ctx, grad_y, _grad_x_t):
    x_t, values, *plan = ctx.saved_tensors
    if grad_y is None:  # the product itself was not used
        return (None,) * (2 + len(plan))
    need_x, need_v = ctx.needs_input_grad[:2]
    grad_x, grad_v = torch.ops.bornsparse.sparse_matmul_triton_backward(
        grad_y, x_t, values, *plan, need_x, need_v
    )
    return (grad_x if need_x else None), (grad_v if need_v else None), *([None] * len(plan))


_sparse_matmul_triton_op.register_autograd(_backward, setup_context=_setup)
_sparse_matmul_triton_backward_op.register_autograd(
    no_double_backward("sparse_matmul", "Triton"),
    setup_context=lambda ctx, inputs, output: None,
)
