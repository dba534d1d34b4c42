"""Numba kernels for y = x Sᵀ with S in compressed-row form; see matmul.py.

Every kernel works on *transposed* activations, shape (features, batch), C-contiguous: one
nonzero then touches two contiguous rows of length batch, which LLVM turns into packed
SIMD, instead of a strided gather per sample. Chunks split the output rows (or, for the
values' gradient, the entries), so no two chunks ever write the same row and no atomics are
needed; every output row is computed the same way whichever chunk holds it, so results do
not even depend on the chunking.

The chunks run as a parallel region of torch's own OpenMP team (ops/runtime/region.py): the
Python-callable kernels below build an int64 header (named slots, runtime/region.header_layout:
``code`` bit 0 float64, bit 1 int32 indices; then sizes and data pointers) and launch a
cfunc body over it. Numba's
``parallel=True`` would start a second OpenMP runtime whose threads, and torch's, spin while
the other works (docs/design.md). Below PARALLEL_MIN_WORK multiply-adds, or with one torch
thread, a kernel runs as one chunk on the calling thread (its chunk loop called directly,
no region); the ``_serial`` twins always do.
"""

from __future__ import annotations

import numba
import numpy as np

from bornsparse.ops.runtime.bodies import (
    NoAliasCompiler,
    chunk_plan,
    claim_chunk,
    finish_chunk,
    region_body,
)
from bornsparse.ops.runtime.intrinsics import header_address, view
from bornsparse.ops.runtime.region import header_layout, launch, pack_header

# the headers: sizes, then pointers (runtime/region.header_layout)
SpmmSlot = header_layout("SpmmSlot", "n_out n_in batch nnz ptr idx vals x_t out_t")
SampledDotSlot = header_layout(
    "SampledDotSlot", "nnz n_rows n_cols batch rows cols gy_t x_t out")
BackwardSlot = header_layout(
    "BackwardSlot", "n_cols n_rows batch nnz colptr csc_rows vals_csc gy_t x_t gx_t gv_csc")
_INT32_MAX = np.iinfo(np.int32).max


# ---- the work of one chunk ------------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def _u(i):
    """An index as unsigned: numba then skips the negative-index wraparound, whose extra
    live values made LLVM spill registers in the inner loops (the indices are validated
    non-negative when a plan is built)."""
    return np.uint64(i)


@numba.njit(cache=True, nogil=True, fastmath=True, pipeline_class=NoAliasCompiler)
def _spmm_t_rows(ptr, idx, vals, x_t, out_t, r0, r1):
    """out_t[r, :] = Σ_{e in ptr[r]:ptr[r+1]} vals[e] · x_t[idx[e], :] for r0 <= r < r1."""
    batch = x_t.shape[1]
    for r in range(r0, r1):
        o = out_t[r]
        # zeroing here, row by row, saves a separate memory pass over the output
        o[:] = 0
        for e in range(ptr[r], ptr[r + 1]):
            v = vals[e]
            xr = x_t[_u(idx[e])]
            for j in range(batch):
                o[j] += v * xr[j]


@numba.njit(cache=True, nogil=True, fastmath=True, pipeline_class=NoAliasCompiler)
def _sampled_dot_entries(rows, cols, gy_t, x_t, out, e0, e1):
    """out[e] += ⟨gy_t[rows[e]], x_t[cols[e]]⟩ for e0 <= e < e1."""
    batch = x_t.shape[1]
    for e in range(e0, e1):
        g = gy_t[_u(rows[e])]
        xr = x_t[_u(cols[e])]
        acc = out[e]
        for j in range(batch):
            acc += g[j] * xr[j]
        out[e] = acc


@numba.njit(cache=True, nogil=True, fastmath=True, pipeline_class=NoAliasCompiler)
def _spmm_t_sampled_dot_cols(colptr, csc_rows, vals_csc, gy_t, x_t, gx_t, gv_csc, c0, c1):
    """Both backward products for the columns c0 <= c < c1 (see _spmm_t_sampled_dot_kernel)."""
    batch = x_t.shape[1]
    for c in range(c0, c1):
        o = gx_t[c]
        o[:] = 0
        xc = x_t[c]
        for e in range(colptr[c], colptr[c + 1]):
            v = vals_csc[e]
            g = gy_t[_u(csc_rows[e])]
            acc = gv_csc[e]
            for j in range(batch):
                o[j] += v * g[j]
                acc += g[j] * xc[j]
            gv_csc[e] = acc


@numba.njit(cache=True, nogil=True)
def _row_split(ptr, c, nchunks):
    """First row of chunk c (c = nchunks: the row count): rows are split so that every chunk
    has about the same nonzeros plus rows (a row costs its zeroing even when empty)."""
    n = ptr.shape[0] - 1
    if c >= nchunks:
        return n
    if c <= 0:
        return 0
    target = (ptr[n] - ptr[0] + n) * c // nchunks
    lo = 0
    hi = n
    while lo < hi:  # the first row r with ptr[r] - ptr[0] + r >= target
        mid = (lo + hi) // 2
        if ptr[mid] - ptr[0] + mid < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


# ---- chunk loops: unpack the header, run every chunk this thread claims ----------------


@numba.njit(cache=True, nogil=True)
def _spmm_t_chunks(a, like, ilike):
    hp = header_address(a)
    S = SpmmSlot
    nchunks, n_out, n_in, batch, nnz = a[S.nchunks], a[S.n_out], a[S.n_in], a[S.batch], a[S.nnz]
    ptr = view(a[S.ptr], (n_out + 1,), ilike)
    idx = view(a[S.idx], (nnz,), ilike)
    vals = view(a[S.vals], (nnz,), like)
    x_t = view(a[S.x_t], (n_in, batch), like)
    out_t = view(a[S.out_t], (n_out, batch), like)
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        _spmm_t_rows(ptr, idx, vals, x_t, out_t, _row_split(ptr, c, nchunks),
                     _row_split(ptr, c + 1, nchunks))
        finish_chunk(hp)


@numba.njit(cache=True, nogil=True)
def _sampled_dot_chunks(a, like, ilike):
    hp = header_address(a)
    S = SampledDotSlot
    nchunks, nnz, n_rows, n_cols, batch = (
        a[S.nchunks], a[S.nnz], a[S.n_rows], a[S.n_cols], a[S.batch])
    rows = view(a[S.rows], (nnz,), ilike)
    cols = view(a[S.cols], (nnz,), ilike)
    gy_t = view(a[S.gy_t], (n_rows, batch), like)
    x_t = view(a[S.x_t], (n_cols, batch), like)
    out = view(a[S.out], (nnz,), like)
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        _sampled_dot_entries(rows, cols, gy_t, x_t, out, nnz * c // nchunks,
                             nnz * (c + 1) // nchunks)
        finish_chunk(hp)


@numba.njit(cache=True, nogil=True)
def _spmm_t_sampled_dot_chunks(a, like, ilike):
    hp = header_address(a)
    S = BackwardSlot
    nchunks, n_cols, n_rows, batch, nnz = (
        a[S.nchunks], a[S.n_cols], a[S.n_rows], a[S.batch], a[S.nnz])
    colptr = view(a[S.colptr], (n_cols + 1,), ilike)
    csc_rows = view(a[S.csc_rows], (nnz,), ilike)
    vals_csc = view(a[S.vals_csc], (nnz,), like)
    gy_t = view(a[S.gy_t], (n_rows, batch), like)
    x_t = view(a[S.x_t], (n_cols, batch), like)
    gx_t = view(a[S.gx_t], (n_cols, batch), like)
    gv_csc = view(a[S.gv_csc], (nnz,), like)
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        _spmm_t_sampled_dot_cols(colptr, csc_rows, vals_csc, gy_t, x_t, gx_t, gv_csc,
                                 _row_split(colptr, c, nchunks),
                                 _row_split(colptr, c + 1, nchunks))
        finish_chunk(hp)


# The region bodies: slot ``code`` picks the dtypes (bit 0 float64, bit 1 int32 indices).
_spmm_t_body = region_body(_spmm_t_chunks, SpmmSlot, index_dtypes=True)
_sampled_dot_body = region_body(_sampled_dot_chunks, SampledDotSlot, index_dtypes=True)
_spmm_t_sampled_dot_body = region_body(_spmm_t_sampled_dot_chunks, BackwardSlot,
                                       index_dtypes=True)


# ---- Python side: operand checks, headers, launch ---------------------------------------


def _float_code(*arrays: np.ndarray) -> int:
    dtype = arrays[0].dtype
    if dtype not in (np.float32, np.float64) or any(a.dtype != dtype for a in arrays):
        raise TypeError(
            "the sparse kernels need float32 or float64 arrays of one dtype, got "
            f"{[str(a.dtype) for a in arrays]}"
        )
    return 1 if dtype == np.float64 else 0


def _index_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Both index arrays in one dtype (int32 or int64), and its code bit (2 for int32).

    A pointer array beside int32 indices is narrowed when its values fit (it is the short
    one, rows + 1); any other mix is widened to int64.
    """
    for t in (a, b):
        if t.dtype not in (np.int32, np.int64):
            raise TypeError(f"the sparse kernels need int32 or int64 index arrays, got {t.dtype}")
    if a.dtype != b.dtype:
        if b.dtype == np.int32 and (a.size == 0 or int(a.max()) <= _INT32_MAX):
            a = a.astype(np.int32)
        else:
            a, b = a.astype(np.int64), b.astype(np.int64)
    return np.ascontiguousarray(a), np.ascontiguousarray(b), 2 if b.dtype == np.int32 else 0


def _check_shapes(**named: tuple[np.ndarray, tuple[int, ...]]) -> None:
    """Raise unless each array has its shape: the bodies index bare memory (the index
    arrays' values stay the caller's to check, as plan.py's plans do)."""
    for name, (a, shape) in named.items():
        if a.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {a.shape}")


def _c(a: np.ndarray) -> np.ndarray:
    """``a`` C-contiguous (a copy only where it is not): the bodies get bare pointers."""
    return np.ascontiguousarray(a)


def _spmm_t_run(ptr, idx, vals, x_t, out_t, nchunks: int, nthreads: int) -> None:
    """_spmm_t_kernel as ``nchunks`` chunks on up to ``nthreads`` threads."""
    code = _float_code(vals, x_t, out_t)
    ptr, idx, icode = _index_pair(ptr, idx)
    vals, x_t, dst = _c(vals), _c(x_t), _c(out_t)
    n_out, nnz, batch = ptr.shape[0] - 1, idx.shape[0], x_t.shape[1]
    _check_shapes(vals=(vals, (nnz,)), out_t=(out_t, (n_out, batch)))
    header = pack_header(SpmmSlot, nchunks, code | icode, n_out=n_out, n_in=x_t.shape[0],
                         batch=batch, nnz=nnz, ptr=ptr, idx=idx, vals=vals, x_t=x_t,
                         out_t=dst)
    launch(_spmm_t_body.address, header, nthreads)
    if dst is not out_t:
        out_t[...] = dst


def _sampled_dot_run(rows, cols, gy_t, x_t, out, nchunks: int, nthreads: int) -> None:
    """_sampled_dot_kernel as ``nchunks`` chunks on up to ``nthreads`` threads."""
    code = _float_code(gy_t, x_t, out)
    rows, cols, icode = _index_pair(rows, cols)
    gy_t, x_t, dst = _c(gy_t), _c(x_t), _c(out)
    nnz, batch = rows.shape[0], x_t.shape[1]
    _check_shapes(cols=(cols, (nnz,)), out=(out, (nnz,)),
                  gy_t=(gy_t, (gy_t.shape[0], batch)))
    header = pack_header(SampledDotSlot, nchunks, code | icode, nnz=nnz,
                         n_rows=gy_t.shape[0], n_cols=x_t.shape[0], batch=batch, rows=rows,
                         cols=cols, gy_t=gy_t, x_t=x_t, out=dst)
    launch(_sampled_dot_body.address, header, nthreads)
    if dst is not out:
        out[...] = dst


def _spmm_t_sampled_dot_run(colptr, csc_rows, vals_csc, gy_t, x_t, gx_t, gv_csc,
                            nchunks: int, nthreads: int) -> None:
    """_spmm_t_sampled_dot_kernel as ``nchunks`` chunks on up to ``nthreads`` threads."""
    code = _float_code(vals_csc, gy_t, x_t, gx_t, gv_csc)
    colptr, csc_rows, icode = _index_pair(colptr, csc_rows)
    vals_csc, gy_t, x_t = _c(vals_csc), _c(gy_t), _c(x_t)
    gx_dst, gv_dst = _c(gx_t), _c(gv_csc)
    n_cols, nnz, batch = colptr.shape[0] - 1, csc_rows.shape[0], x_t.shape[1]
    _check_shapes(vals_csc=(vals_csc, (nnz,)), gv_csc=(gv_csc, (nnz,)),
                  x_t=(x_t, (n_cols, batch)), gx_t=(gx_t, (n_cols, batch)),
                  gy_t=(gy_t, (gy_t.shape[0], batch)))
    header = pack_header(BackwardSlot, nchunks, code | icode, n_cols=n_cols,
                         n_rows=gy_t.shape[0], batch=batch, nnz=nnz, colptr=colptr,
                         csc_rows=csc_rows, vals_csc=vals_csc, gy_t=gy_t, x_t=x_t,
                         gx_t=gx_dst, gv_csc=gv_dst)
    launch(_spmm_t_sampled_dot_body.address, header, nthreads)
    if gx_dst is not gx_t:
        gx_t[...] = gx_dst
    if gv_dst is not gv_csc:
        gv_csc[...] = gv_dst


# The Python-callable kernels. With one thread (small work, or one torch thread) the body
# runs on the calling thread, not as a region (runtime/region.launch).


def _spmm_t_kernel(ptr, idx, vals, x_t, out_t) -> None:
    """out_t[r, :] = Σ_{e in ptr[r]:ptr[r+1]} vals[e] · x_t[idx[e], :]   (out_t may be empty).

    ptr (n_out + 1,), idx and vals (nnz,), x_t (n_in, batch), out_t (n_out, batch). With
    (rowptr, cols, vals) it computes yᵀ = S xᵀ; with the compressed-column arrays
    (colptr, rows[perm], vals[perm]) the same kernel computes grad_xᵀ = Sᵀ grad_yᵀ.
    """
    _spmm_t_run(ptr, idx, vals, x_t, out_t,
                *chunk_plan(ptr.shape[0] - 1, idx.shape[0] * x_t.shape[1]))


def _sampled_dot_kernel(rows, cols, gy_t, x_t, out) -> None:
    """out[e] += ⟨gy_t[rows[e]], x_t[cols[e]]⟩: the gradient of S's values (out zeroed, or
    holding the previous blocks' sums). rows, cols, out (nnz,); gy_t (n_rows, batch);
    x_t (n_cols, batch)."""
    _sampled_dot_run(rows, cols, gy_t, x_t, out,
                     *chunk_plan(rows.shape[0], rows.shape[0] * x_t.shape[1]))


def _spmm_t_sampled_dot_kernel(colptr, csc_rows, vals_csc, gy_t, x_t, gx_t, gv_csc) -> None:
    """Both backward products in one sweep over the compressed columns:

    gx_t[c, :] = Σ_{e in col c} vals_csc[e] · gy_t[csc_rows[e], :]   (grad_xᵀ = Sᵀ gyᵀ) and
    gv_csc[e] += ⟨gy_t[csc_rows[e]], x_t[c]⟩                      (grad of the values),
    entries in column-major order. colptr (n_cols + 1,); gy_t (n_rows, batch); x_t, gx_t
    (n_cols, batch). Each row of gy_t is loaded once for both; chunks split the columns, so
    writes never collide.
    """
    _spmm_t_sampled_dot_run(colptr, csc_rows, vals_csc, gy_t, x_t, gx_t, gv_csc,
                            *chunk_plan(colptr.shape[0] - 1, csc_rows.shape[0] * x_t.shape[1]))


# Serial twins: one chunk on the calling thread, whatever the size.
def _spmm_t_serial_kernel(ptr, idx, vals, x_t, out_t) -> None:
    _spmm_t_run(ptr, idx, vals, x_t, out_t, 1, 1)


def _sampled_dot_serial_kernel(rows, cols, gy_t, x_t, out) -> None:
    _sampled_dot_run(rows, cols, gy_t, x_t, out, 1, 1)


def _spmm_t_sampled_dot_serial_kernel(colptr, csc_rows, vals_csc, gy_t, x_t, gx_t,
                                      gv_csc) -> None:
    _spmm_t_sampled_dot_run(colptr, csc_rows, vals_csc, gy_t, x_t, gx_t, gv_csc, 1, 1)
