"""Numba kernels fusing the DCT's twiddle with its output reordering; see ops/dct.py.

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
