"""Numba kernels for y = x Sᵀ with S in compressed-row form; see ops/sparse_product.py.

Every kernel works on *transposed* activations, shape (features, batch), C-contiguous: one
nonzero then touches two contiguous rows of length batch, which LLVM turns into packed
SIMD, instead of a strided gather per sample. Threads split the output rows, so no two
threads ever write the same row and no atomics are needed. Each kernel also has a serial
twin: for small products the cost of waking the thread pool (and, on a busy machine,
waiting at its barrier) exceeds the work itself.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _spmm_t_kernel(
    ptr: np.ndarray, idx: np.ndarray, vals: np.ndarray, x_t: np.ndarray, out_t: np.ndarray
) -> None:
    """out_t[r, :] = Σ_{e in ptr[r]:ptr[r+1]} vals[e] · x_t[idx[e], :]   (out_t may be empty).

    With (rowptr, cols, vals) it computes yᵀ = S xᵀ; with the compressed-column arrays
    (colptr, rows[perm], vals[perm]) the same kernel computes grad_xᵀ = Sᵀ grad_yᵀ.
    """
    n_out = ptr.shape[0] - 1
    batch = x_t.shape[1]
    for r in numba.prange(n_out):
        o = out_t[r]
        # zeroing here, row by row, saves a separate memory pass over the output
        o[:] = 0
        for e in range(ptr[r], ptr[r + 1]):
            v = vals[e]
            xr = x_t[idx[e]]
            for j in range(batch):
                o[j] += v * xr[j]


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _sampled_dot_kernel(
    rows: np.ndarray, cols: np.ndarray, gy_t: np.ndarray, x_t: np.ndarray, out: np.ndarray
) -> None:
    """out[e] = ⟨gy_t[rows[e]], x_t[cols[e]]⟩: the gradient of S's values (out zeroed)."""
    batch = x_t.shape[1]
    for e in numba.prange(rows.shape[0]):
        g = gy_t[rows[e]]
        xr = x_t[cols[e]]
        acc = out[e]
        for j in range(batch):
            acc += g[j] * xr[j]
        out[e] = acc


# Serial twins: same bodies, no thread pool (separate functions so numba's on-disk cache
# keeps one entry per function).
@numba.njit(cache=True, nogil=True, fastmath=True)
def _spmm_t_serial_kernel(ptr, idx, vals, x_t, out_t):
    batch = x_t.shape[1]
    for r in range(ptr.shape[0] - 1):
        o = out_t[r]
        o[:] = 0
        for e in range(ptr[r], ptr[r + 1]):
            v = vals[e]
            xr = x_t[idx[e]]
            for j in range(batch):
                o[j] += v * xr[j]


@numba.njit(cache=True, nogil=True, fastmath=True)
def _sampled_dot_serial_kernel(rows, cols, gy_t, x_t, out):
    batch = x_t.shape[1]
    for e in range(rows.shape[0]):
        g = gy_t[rows[e]]
        xr = x_t[cols[e]]
        acc = out[e]
        for j in range(batch):
            acc += g[j] * xr[j]
        out[e] = acc


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _spmm_t_sampled_dot_kernel(
    colptr: np.ndarray, csc_rows: np.ndarray, vals_csc: np.ndarray, gy_t: np.ndarray,
    x_t: np.ndarray, gx_t: np.ndarray, gv_csc: np.ndarray,
) -> None:
    """Both backward products in one sweep over the compressed columns:

    gx_t[c, :] = Σ_{e in col c} vals_csc[e] · gy_t[csc_rows[e], :]   (grad_xᵀ = Sᵀ gyᵀ) and
    gv_csc[e] += ⟨gy_t[csc_rows[e]], x_t[c]⟩                      (grad of the values),
    entries in column-major order. Each row of gy_t is loaded once for both; threads split
    the columns, so writes never collide.
    """
    batch = x_t.shape[1]
    for c in numba.prange(colptr.shape[0] - 1):
        o = gx_t[c]
        o[:] = 0
        xc = x_t[c]
        for e in range(colptr[c], colptr[c + 1]):
            v = vals_csc[e]
            g = gy_t[csc_rows[e]]
            acc = gv_csc[e]
            for j in range(batch):
                o[j] += v * g[j]
                acc += g[j] * xc[j]
            gv_csc[e] = acc


@numba.njit(cache=True, nogil=True, fastmath=True)
def _spmm_t_sampled_dot_serial_kernel(colptr, csc_rows, vals_csc, gy_t, x_t, gx_t, gv_csc):
    batch = x_t.shape[1]
    for c in range(colptr.shape[0] - 1):
        o = gx_t[c]
        o[:] = 0
        xc = x_t[c]
        for e in range(colptr[c], colptr[c + 1]):
            v = vals_csc[e]
            g = gy_t[csc_rows[e]]
            acc = gv_csc[e]
            for j in range(batch):
                o[j] += v * g[j]
                acc += g[j] * xc[j]
            gv_csc[e] = acc
