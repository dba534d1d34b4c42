"""The support of a sparse matrix S (rows, cols): the checks on its (2, nnz) indices, and
the :class:`SparsePlan` derived from it once per support (compressed rows for S, compressed
columns for Sᵀ) that every sparse op receives. Conventions in matmul.py's docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bornsparse.ops.backends import INDEX_DTYPES, NUMBA_DTYPES
from bornsparse.ops.runtime.validated import check_once


def check_shape_pair(name: str, shape: object) -> tuple[int, int]:
    if (
        not isinstance(shape, tuple | list)
        or len(shape) != 2
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)
    ):
        raise ValueError(f"{name} must be a pair of positive ints (rows, cols), got {shape!r}")
    return int(shape[0]), int(shape[1])


def index_dtype(*extents: int) -> torch.dtype:
    """int32 where every index (and pointer) stays below ``max(extents)`` < 2³¹, else int64:
    a stored weight then costs 4 + 2·4 bytes in float32 instead of 4 + 2·8."""
    return torch.int32 if max(extents) < 2**31 else torch.int64


def check_indices(indices: object, shape: tuple[int, int], *, nnz: int | None = None) -> None:
    """Raise unless ``indices`` is a valid sorted, unique (2, nnz) int32/int64 support of
    ``shape``."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"indices must have dtype torch.int32 or torch.int64, got "
                        f"{indices.dtype}")
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
    lin = r.long() * cols + c.long()  # int64: rows · cols may pass 2³¹
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

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(rows, cols, rowptr, colptr, csc_perm, csc_rows): what the sparse ops receive."""
        return (self.rows, self.cols, self.rowptr, self.colptr, self.csc_perm, self.csc_rows)


def build_plan(indices: torch.Tensor, shape: tuple[int, int]) -> SparsePlan:
    """Validate ``indices`` (see matmul.py's docstring) and derive its :class:`SparsePlan`."""
    shape = check_shape_pair("shape", shape)
    check_indices(indices, shape)
    # every plan tensor in one dtype: the indices' own, unless pointers up to nnz need more
    dtype = torch.int64 if indices.shape[1] >= 2**31 else indices.dtype
    rows = indices[0].contiguous().to(dtype)
    cols = indices[1].contiguous().to(dtype)
    rowptr = torch.zeros(shape[0] + 1, dtype=dtype, device=rows.device)
    rowptr[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    # a stable sort keeps rows ascending inside each column: deterministic gradients
    if cols.device.type == "cpu":
        # numpy's single-threaded sort measured several times faster than torch.sort here
        csc_perm = torch.from_numpy(np.argsort(cols.numpy(), kind="stable")).to(dtype)
    else:
        csc_perm = torch.sort(cols, stable=True).indices.to(dtype)
    colptr = torch.zeros(shape[1] + 1, dtype=dtype, device=rows.device)
    colptr[1:] = torch.cumsum(torch.bincount(cols, minlength=shape[1]), 0)
    return SparsePlan(shape, rows, cols, rowptr, colptr, csc_perm, rows[csc_perm].contiguous())


def check_plan_tensors(shape: tuple[int, int], rows: torch.Tensor, cols: torch.Tensor,
                       rowptr: torch.Tensor, colptr: torch.Tensor, csc_perm: torch.Tensor,
                       csc_rows: torch.Tensor) -> None:
    """What the kernels trust about a plan's tensors, for ops that receive them (once per
    version of those tensors, runtime/validated.py): one index dtype (int32 or int64), CPU,
    consistent lengths, pointers that start at 0 and end at nnz, indices in range."""
    named = dict(rows=rows, cols=cols, rowptr=rowptr, colptr=colptr, csc_perm=csc_perm,
                 csc_rows=csc_rows)
    nnz = rows.numel()
    lengths = dict(rows=nnz, cols=nnz, rowptr=shape[0] + 1, colptr=shape[1] + 1,
                   csc_perm=nnz, csc_rows=nnz)
    for name, t in named.items():
        if t.dtype != rows.dtype or t.dtype not in INDEX_DTYPES or t.dim() != 1 or (
            t.device.type != "cpu"
        ):
            raise ValueError(f"{name} must be a 1-D CPU tensor of the plan's index dtype "
                             f"(int32 or int64, as rows: {rows.dtype}), got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
        if t.numel() != lengths[name]:
            raise ValueError(f"{name} must have {lengths[name]} entries for a {shape} support "
                             f"with nnz = {nnz}, got {t.numel()}")

    check_once("sparse plan", tuple(named.values()),
               lambda: check_plan_ranges(shape, rows, cols, rowptr, colptr, csc_perm, csc_rows))


def check_plan_ranges(shape: tuple[int, int], rows: torch.Tensor, cols: torch.Tensor,
                      rowptr: torch.Tensor, colptr: torch.Tensor, csc_perm: torch.Tensor,
                      csc_rows: torch.Tensor) -> None:
    """Pointers rise from 0 to nnz and every index lies in range (the kernels do no bounds
    checks); reads every entry, so callers run it once per tensor version."""
    nnz = rows.numel()
    for name, ptr in (("rowptr", rowptr), ("colptr", colptr)):
        if int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((ptr.diff() < 0).any()):
            raise ValueError(f"{name} must rise from 0 to nnz = {nnz}")
    for name, t, bound in (("rows", rows, shape[0]), ("cols", cols, shape[1]),
                           ("csc_rows", csc_rows, shape[0]), ("csc_perm", csc_perm, nnz)):
        if nnz and (int(t.min()) < 0 or int(t.max()) >= bound):
            raise ValueError(f"{name} must lie in [0, {bound}), got "
                             f"[{int(t.min())}, {int(t.max())}]")


def check_kernel_values(x: torch.Tensor, values: torch.Tensor) -> None:
    """What the numba kernels need of ``x`` and ``values``: CPU float32/float64 of one
    dtype, values 1-D (nnz,)."""
    if x.device.type != "cpu" or x.dtype not in NUMBA_DTYPES or values.dtype != x.dtype:
        raise ValueError(f"the kernel needs CPU float32/float64 x and values of one dtype, "
                         f"got {x.dtype} and {values.dtype} on {x.device}")
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D (nnz,), got shape {tuple(values.shape)}")
