"""y = x Sᵀ for a sparse S stored as values plus integer indices (COO, sorted row-major).

Conventions shared by every backend:

* ``S`` has dense shape ``(rows, cols)`` = (out_features, in_features); ``x`` is
  ``(..., cols)`` and the result ``(..., rows)``, like ``F.linear(x, S)``.
* ``indices`` is int64 of shape (2, nnz): ``indices[0]`` row, ``indices[1]`` column, in
  strictly increasing row-major order (so unique); ``values`` has shape (nnz,).
* A :class:`SparsePlan` holds what is derived from the support only: row pointers, and the
  column-sorted permutation used by the input gradient. Layers build one per support and
  cache it; building validates the support in O(nnz).

Backends: ``"reference"`` (plain PyTorch index_add, any device, differentiable twice),
``"numba"`` (CPU kernels in ``_sparse_numba``), ``"torch_sparse"`` (torch.sparse CSR
matmuls and sampled_addmm). ``"auto"`` picks numba for CPU float32/float64 — it measured
faster than torch.sparse, see docs/results.md — and the reference elsewhere.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from bornsparse._checks import check_float_tensor

BACKENDS = ("auto", "reference", "numba", "torch_sparse")
_NUMBA_DTYPES = (torch.float32, torch.float64)


def check_shape_pair(name: str, shape: object) -> tuple[int, int]:
    if (
        not isinstance(shape, tuple | list)
        or len(shape) != 2
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)
    ):
        raise ValueError(f"{name} must be a pair of positive ints (rows, cols), got {shape!r}")
    return int(shape[0]), int(shape[1])


def check_indices(indices: object, shape: tuple[int, int], *, nnz: int | None = None) -> None:
    """Raise unless ``indices`` is a valid sorted, unique (2, nnz) int64 support of ``shape``."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must have dtype torch.int64, got {indices.dtype}")
    if indices.dim() != 2 or indices.shape[0] != 2:
        raise ValueError(f"indices must have shape (2, nnz), got {tuple(indices.shape)}")
    if nnz is not None and indices.shape[1] != nnz:
        raise ValueError(f"indices must hold exactly nnz = {nnz} entries, got {indices.shape[1]}")
    if indices.shape[1] == 0:
        raise ValueError("indices must hold at least one entry, got an empty support")
    rows, cols = shape
    r, c = indices[0], indices[1]
    if int(r.min()) < 0 or int(r.max()) >= rows:
        raise ValueError(
            f"indices[0] (rows) must lie in [0, {rows}), got range "
            f"[{int(r.min())}, {int(r.max())}]"
        )
    if int(c.min()) < 0 or int(c.max()) >= cols:
        raise ValueError(
            f"indices[1] (columns) must lie in [0, {cols}), got range "
            f"[{int(c.min())}, {int(c.max())}]"
        )
    lin = r * cols + c
    if lin.numel() > 1 and not bool((lin[1:] > lin[:-1]).all()):
        raise ValueError(
            "indices must be sorted row-major without duplicates (sort_support() does this)"
        )


def sort_support(
    indices: torch.Tensor, shape: tuple[int, int], values: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sort a (2, nnz) support row-major (permuting ``values`` alike); raise on duplicates."""
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[0] != 2:
        got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"indices must be a tensor of shape (2, nnz), got {got}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
    indices = indices.to(torch.int64)
    lin = indices[0] * shape[1] + indices[1]
    order = torch.argsort(lin)
    lin = lin[order]
    if lin.numel() > 1 and not bool((lin[1:] != lin[:-1]).all()):
        raise ValueError("indices must not contain duplicate (row, column) pairs")
    return indices[:, order].contiguous(), None if values is None else values[order]


@dataclass(frozen=True)
class SparsePlan:
    """Support-derived structure: compressed rows, and compressed columns for Sᵀ."""

    shape: tuple[int, int]
    rows: torch.Tensor  # (nnz,) int64
    cols: torch.Tensor  # (nnz,) int64
    rowptr: torch.Tensor  # (rows + 1,) int64
    colptr: torch.Tensor  # (cols + 1,) int64
    csc_perm: torch.Tensor  # (nnz,) entries in column-major order
    csc_rows: torch.Tensor  # rows[csc_perm]

    @property
    def nnz(self) -> int:
        return self.rows.numel()

    @property
    def device(self) -> torch.device:
        return self.rows.device


def build_plan(indices: torch.Tensor, shape: tuple[int, int]) -> SparsePlan:
    """Validate ``indices`` (see module docstring) and derive its :class:`SparsePlan`."""
    shape = check_shape_pair("shape", shape)
    check_indices(indices, shape)
    rows = indices[0].contiguous()
    cols = indices[1].contiguous()
    rowptr = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    rowptr[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    # a stable sort keeps rows ascending inside each column: deterministic gradients
    if cols.device.type == "cpu":
        # numpy's single-threaded sort measured several times faster than torch.sort here
        csc_perm = torch.from_numpy(np.argsort(cols.numpy(), kind="stable"))
    else:
        csc_perm = torch.sort(cols, stable=True).indices
    colptr = torch.zeros(shape[1] + 1, dtype=torch.int64, device=rows.device)
    colptr[1:] = torch.cumsum(torch.bincount(cols, minlength=shape[1]), 0)
    return SparsePlan(shape, rows, cols, rowptr, colptr, csc_perm, rows[csc_perm].contiguous())


def sparse_matmul_reference(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """Plain-PyTorch x Sᵀ: gather the inputs each nonzero reads, scale, scatter-add.

    Any device and dtype; O(batch·nnz) temporary memory.
    """
    contrib = x.index_select(-1, indices[1]) * values  # (..., nnz)
    out = x.new_zeros(*x.shape[:-1], shape[0])
    return out.index_add(-1, indices[0], contrib)


# below this many multiply-adds a kernel runs serially: waking threads costs more
_PARALLEL_MIN_WORK = 1 << 16


def _numba_spmm_t(ptr, idx, vals, x_t, n_out):
    from bornsparse.ops import _sparse_numba as k

    out_t = torch.empty(n_out, x_t.shape[1], dtype=x_t.dtype)
    fn = k._spmm_t_kernel if idx.numel() * x_t.shape[1] >= _PARALLEL_MIN_WORK else (
        k._spmm_t_serial_kernel
    )
    fn(ptr.numpy(), idx.numpy(), vals.numpy(), x_t.numpy(), out_t.numpy())
    return out_t


def _numba_sampled_dot(rows, cols, gy_t, x_t):
    from bornsparse.ops import _sparse_numba as k

    out = torch.zeros(rows.numel(), dtype=x_t.dtype)
    fn = k._sampled_dot_kernel if rows.numel() * x_t.shape[1] >= _PARALLEL_MIN_WORK else (
        k._sampled_dot_serial_kernel
    )
    fn(rows.numpy(), cols.numpy(), gy_t.numpy(), x_t.numpy(), out.numpy())
    return out


class _NumbaSparseMatmulFn(torch.autograd.Function):
    """x (batch, cols) -> x Sᵀ (batch, rows) with the CPU kernels; inputs are detached views."""

    @staticmethod
    def forward(ctx, x, values, plan):
        x_t = x.detach().t().contiguous()  # (cols, batch)
        vals = values.detach().contiguous()
        y_t = _numba_spmm_t(plan.rowptr, plan.cols, vals, x_t, plan.shape[0])
        ctx.save_for_backward(x_t, values)
        ctx.plan = plan
        # one explicit transpose copy: every consumer (bias add, the DCT sum, autograd's
        # gradient accumulation) is several times slower on a transposed view
        return y_t.t().contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x_t, values = ctx.saved_tensors
        plan = ctx.plan
        gy_t = grad_y.t().contiguous()  # (rows, batch)
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            vals_csc = values.detach()[plan.csc_perm]
            grad_x = _numba_spmm_t(
                plan.colptr, plan.csc_rows, vals_csc, gy_t, plan.shape[1]
            ).t().contiguous()
        if ctx.needs_input_grad[1]:
            grad_v = _numba_sampled_dot(plan.rows, plan.cols, gy_t, x_t)
        return grad_x, grad_v, None


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


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "numba" if x.device.type == "cpu" and x.dtype in _NUMBA_DTYPES else "reference"
    if backend == "numba" and (x.device.type != "cpu" or x.dtype not in _NUMBA_DTYPES):
        raise ValueError(
            f"backend='numba' needs a CPU float32/float64 input, got {x.dtype} on {x.device}"
        )
    return backend


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
    backend = _resolve_backend(backend, x)
    lead = x.shape[:-1]
    if backend == "reference":
        return sparse_matmul_reference(x, values, indices, shape)
    x2 = x.reshape(-1, shape[1])
    fn = _NumbaSparseMatmulFn if backend == "numba" else _TorchSparseMatmulFn
    return fn.apply(x2, values, plan).reshape(*lead, shape[0])
