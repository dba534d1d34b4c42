"""Numba kernels fusing the DCT's twiddle with its output reordering; see ops/discrete_cosine.py.

In plain torch the twiddle is a broadcast complex multiply, then a conjugation and a gather:
three passes over the spectrum, each as slow as the FFT itself on CPU. Here each is one
pass, parallel over rows.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _twiddle_take_kernel(spec: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out[b, k] = Re(spec[b,k]·w[k]) for k <= N/2, out[b, N-k] = -Im(spec[b,k]·w[k]).

    spec: (B, N//2 + 1, 2) interleaved rfft output; w: (N//2 + 1, 2); out: (B, N).
    """
    n = out.shape[1]
    half = spec.shape[1]
    for b in numba.prange(out.shape[0]):
        for k in range(half):
            a = spec[b, k, 0]
            c = spec[b, k, 1]
            re = a * w[k, 0] - c * w[k, 1]
            im = a * w[k, 1] + c * w[k, 0]
            out[b, k] = re
            if 0 < k and n - k >= half:
                out[b, n - k] = -im


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _untake_twiddle_kernel(coef: np.ndarray, w_inv: np.ndarray, spec: np.ndarray) -> None:
    """spec[b, j] = (coef[b, j] - i·coef[b, N-j])·w_inv[j], coef[b, N] = 0; j <= N/2.

    coef: (B, N); w_inv: (N//2 + 1, 2); spec: (B, N//2 + 1, 2) interleaved.
    """
    n = coef.shape[1]
    for b in numba.prange(coef.shape[0]):
        for j in range(spec.shape[1]):
            a = coef[b, j]
            c = -coef[b, n - j] if j > 0 else coef[b, 0] * 0
            spec[b, j, 0] = a * w_inv[j, 0] - c * w_inv[j, 1]
            spec[b, j, 1] = a * w_inv[j, 1] + c * w_inv[j, 0]


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _affine_take_kernel(
    spec: np.ndarray, w: np.ndarray, n: int, alpha: float, y: np.ndarray, bias: np.ndarray,
    out: np.ndarray,
) -> None:
    """out[b, k] = y[b, k] + α·X[b, k] + bias[k] for k < m = out.shape[1].

    X is the length-n DCT whose reordered rfft is spec (B, n//2 + 1, 2); ``bias`` has
    length 0 for none. Fuses the twiddle, the output gather, the truncation to m, α, the
    bias and the sum with the sparse part: one pass instead of five.
    """
    m = out.shape[1]
    half = spec.shape[1]
    has_bias = bias.shape[0] > 0
    for b in numba.prange(out.shape[0]):
        for k in range(half):
            a = spec[b, k, 0]
            c = spec[b, k, 1]
            if k < m:
                v = alpha * (a * w[k, 0] - c * w[k, 1]) + y[b, k]
                out[b, k] = v + bias[k] if has_bias else v
            j = n - k
            if 0 < k and j >= half and j < m:
                v = y[b, j] - alpha * (a * w[k, 1] + c * w[k, 0])
                out[b, j] = v + bias[j] if has_bias else v


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _padded_untake_kernel(g: np.ndarray, n: int, w_inv: np.ndarray, spec: np.ndarray) -> None:
    """As _untake_twiddle_kernel for coefficients g (B, m) zero-padded to length n >= m."""
    m = g.shape[1]
    for b in numba.prange(g.shape[0]):
        for j in range(spec.shape[1]):
            a = g[b, j] if j < m else g[b, 0] * 0
            c = -g[b, n - j] if (j > 0 and n - j < m) else g[b, 0] * 0
            spec[b, j, 0] = a * w_inv[j, 0] - c * w_inv[j, 1]
            spec[b, j, 1] = a * w_inv[j, 1] + c * w_inv[j, 0]


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _gather_scale_dot_kernel(
    v: np.ndarray, unorder: np.ndarray, x: np.ndarray, alpha: float, gx: np.ndarray,
    dots: np.ndarray,
) -> None:
    """u = v[:, unorder][:, :d]; gx = α·u; dots[b] = ⟨u[b], x[b]⟩ (d = x.shape[1]).

    The backward of α·T(x): u = Tᵀ(grad) gives both grad_x = α·u and grad_α = Σ ⟨u, x⟩.
    """
    d = x.shape[1]
    for b in numba.prange(x.shape[0]):
        acc = dots[b] * 0
        for i in range(d):
            u = v[b, unorder[i]]
            gx[b, i] = alpha * u
            acc += u * x[b, i]
        dots[b] = acc


# ---- DCT plus sparse, fused (ops/discrete_cosine.py: dct_sparse_affine) ----------------------
# The sparse kernels (_sparse_numba) want activations transposed, (features, batch). A
# separate transpose costs as much as the FFT, so each transpose rides along a pass that
# reads or writes the same array anyway. These passes walk tiles of _TILE samples: within a
# tile one feature of every sample is one contiguous run of the transposed array (a cache
# line for float32), and the tile's rows of the batch-major arrays stay in L2.
_TILE = 16


@numba.njit(cache=True, nogil=True, fastmath=True)
def _tile_to_t(src: np.ndarray, dst_t: np.ndarray, b0: int, b1: int) -> None:
    """dst_t[i, b] = src[b, i] for the samples b0:b1, in _TILE x _TILE blocks (both in L1)."""
    d = src.shape[1]
    for i0 in range(0, d, _TILE):
        i1 = min(d, i0 + _TILE)
        for i in range(i0, i1):
            for b in range(b0, b1):
                dst_t[i, b] = src[b, i]


@numba.njit(cache=True, nogil=True, fastmath=True)
def _tile_add_t(dst: np.ndarray, src_t: np.ndarray, b0: int, b1: int) -> None:
    """dst[b, i] += src_t[i, b] for the samples b0:b1, in _TILE x _TILE blocks."""
    d = dst.shape[1]
    for i0 in range(0, d, _TILE):
        i1 = min(d, i0 + _TILE)
        for b in range(b0, b1):
            for i in range(i0, i1):
                dst[b, i] += src_t[i, b]


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _reorder_transpose_kernel(
    x: np.ndarray, reorder: np.ndarray, v: np.ndarray, x_t: np.ndarray
) -> None:
    """v[b, i] = xp[b, reorder[i]] with xp = x zero-padded to q = v.shape[1]; x_t = xᵀ.

    x: (B, n); v: (B, q); x_t: (n, B). ``reorder`` (Makhoul's permutation for length q,
    ops/discrete_cosine.py) is only documentation here: the loops below compute it in closed form.
    """
    nb, n = x.shape
    q = v.shape[1]
    for ti in numba.prange((nb + _TILE - 1) // _TILE):
        b0 = ti * _TILE
        b1 = min(nb, b0 + _TILE)
        for b in range(b0, b1):
            # reorder written out, v[p] = xp[2p], v[q-1-p] = xp[2p+1], so that the loops
            # are branch-free strided copies LLVM vectorises, not a table gather
            xb = x[b]
            vb = v[b]
            for p in range((n + 1) // 2):
                vb[p] = xb[2 * p]
            for p in range((n + 1) // 2, (q + 1) // 2):
                vb[p] = 0
            for p in range(n // 2):
                vb[q - 1 - p] = xb[2 * p + 1]
            for p in range(n // 2, q // 2):
                vb[q - 1 - p] = 0
        _tile_to_t(x, x_t, b0, b1)


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _affine_take_t_kernel(
    spec: np.ndarray, w: np.ndarray, n: int, alpha: float, y_t: np.ndarray, bias: np.ndarray,
    out: np.ndarray,
) -> None:
    """As _affine_take_kernel, but the sparse part comes transposed: y_t (m, B)."""
    nb, m = out.shape
    half = spec.shape[1]
    has_bias = bias.shape[0] > 0
    for ti in numba.prange((nb + _TILE - 1) // _TILE):
        b0 = ti * _TILE
        b1 = min(nb, b0 + _TILE)
        for b in range(b0, b1):
            if m == n:
                # no truncation: the two halves as branch-free (vectorisable) loops
                ob = out[b]
                sb = spec[b]
                for k in range(half):
                    ob[k] = alpha * (sb[k, 0] * w[k, 0] - sb[k, 1] * w[k, 1])
                for k in range(1, n - half + 1):
                    ob[n - k] = -alpha * (sb[k, 0] * w[k, 1] + sb[k, 1] * w[k, 0])
                if has_bias:
                    for k in range(m):
                        ob[k] += bias[k]
                continue
            for k in range(half):
                a = spec[b, k, 0]
                c = spec[b, k, 1]
                if k < m:
                    v = alpha * (a * w[k, 0] - c * w[k, 1])
                    out[b, k] = v + bias[k] if has_bias else v
                j = n - k
                if 0 < k and j >= half and j < m:
                    v = -alpha * (a * w[k, 1] + c * w[k, 0])
                    out[b, j] = v + bias[j] if has_bias else v
        _tile_add_t(out, y_t, b0, b1)


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _padded_untake_t_kernel(
    g: np.ndarray, n: int, w_inv: np.ndarray, spec: np.ndarray, g_t: np.ndarray
) -> None:
    """_padded_untake_kernel, and g_t = gᵀ (m, B) when g_t has rows (else skipped)."""
    nb, m = g.shape
    for ti in numba.prange((nb + _TILE - 1) // _TILE):
        b0 = ti * _TILE
        b1 = min(nb, b0 + _TILE)
        for b in range(b0, b1):
            if m == n:
                # no padding: branch-free loop
                gb = g[b]
                sb = spec[b]
                sb[0, 0] = gb[0] * w_inv[0, 0]
                sb[0, 1] = gb[0] * w_inv[0, 1]
                for j in range(1, spec.shape[1]):
                    a = gb[j]
                    c = -gb[n - j]
                    sb[j, 0] = a * w_inv[j, 0] - c * w_inv[j, 1]
                    sb[j, 1] = a * w_inv[j, 1] + c * w_inv[j, 0]
                continue
            for j in range(spec.shape[1]):
                a = g[b, j] if j < m else 0
                c = -g[b, n - j] if (j > 0 and n - j < m) else 0
                spec[b, j, 0] = a * w_inv[j, 0] - c * w_inv[j, 1]
                spec[b, j, 1] = a * w_inv[j, 1] + c * w_inv[j, 0]
        if g_t.shape[0] > 0:
            _tile_to_t(g, g_t, b0, b1)


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _gather_scale_dot_t_kernel(
    v: np.ndarray, unorder: np.ndarray, x: np.ndarray, alpha: float, gs_t: np.ndarray,
    gx: np.ndarray, dots: np.ndarray,
) -> None:
    """_gather_scale_dot_kernel, plus gx += gs_tᵀ when gs_t (d, B) has rows (else skipped).

    gs_t is the sparse part's input gradient Sᵀ gᵀ, so gx is the layer's whole grad_x.
    ``unorder`` (length q = v.shape[1]) is only documentation: the loops compute it.
    """
    nb, d = x.shape
    q = v.shape[1]
    for ti in numba.prange((nb + _TILE - 1) // _TILE):
        b0 = ti * _TILE
        b1 = min(nb, b0 + _TILE)
        for b in range(b0, b1):
            # unorder in closed form (u[2p] = v[p], u[2p+1] = v[q-1-p]): strided, no gather
            vb = v[b]
            xb = x[b]
            gb = gx[b]
            acc = dots[b] * 0
            for p in range((d + 1) // 2):
                u = vb[p]
                gb[2 * p] = alpha * u
                acc += u * xb[2 * p]
            for p in range(d // 2):
                u = vb[q - 1 - p]
                gb[2 * p + 1] = alpha * u
                acc += u * xb[2 * p + 1]
            dots[b] = acc
        if gs_t.shape[0] > 0:
            _tile_add_t(gx, gs_t, b0, b1)
