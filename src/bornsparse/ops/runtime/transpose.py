"""Transposes between sample-major rows (batch, features) and feature-major columns
(features, batch) for the kernels that hold a run of samples as contiguous rows.

Both walk 8×8 blocks with one sample's 8 features held in registers: the contiguous side is
one vector load or store, the strided side 8 scalar ones. The plain loop nest, with the
sample range starting at a run-time offset, stayed scalar on both sides: measured 2–3×
slower (a (128, 4096) float32 block, one thread: 833 µs against 250 µs). The ragged edges
(features or samples not a multiple of 8) take the plain loops.

Callers pass distinct arrays; shapes are theirs to check.
"""

from __future__ import annotations

import numba

from bornsparse.ops.runtime.bodies import NoAliasCompiler

_JIT = dict(cache=True, nogil=True, fastmath=True, pipeline_class=NoAliasCompiler)


@numba.njit(**_JIT)
def rows_to_columns(src, s_src, dst_t, s_dst, n):
    """dst_t[i, s_dst + s] = src[s_src + s, i] for s < n and i < src.shape[1].

    src: (batch, d) rows; dst_t: (≥ d, ·) columns; rows of dst_t past d are left alone.
    """
    d = src.shape[1]
    d8 = d - d % 8
    n8 = n - n % 8
    # views from sample 0 on both sides: the loops then index as the un-offset loop nest did
    # (indexing with the offset added in the loop measured 10% slower)
    src = src[s_src:s_src + n]
    dst_t = dst_t[:, s_dst:s_dst + n]
    for i0 in range(0, d8, 8):
        for sb in range(0, n8, 8):
            for s in range(sb, sb + 8):
                v = src[s, i0:i0 + 8]
                a0, a1, a2, a3 = v[0], v[1], v[2], v[3]
                a4, a5, a6, a7 = v[4], v[5], v[6], v[7]
                dst_t[i0, s] = a0
                dst_t[i0 + 1, s] = a1
                dst_t[i0 + 2, s] = a2
                dst_t[i0 + 3, s] = a3
                dst_t[i0 + 4, s] = a4
                dst_t[i0 + 5, s] = a5
                dst_t[i0 + 6, s] = a6
                dst_t[i0 + 7, s] = a7
        for s in range(n8, n):
            for i in range(i0, i0 + 8):
                dst_t[i, s] = src[s, i]
    for s in range(n):
        for i in range(d8, d):
            dst_t[i, s] = src[s, i]


@numba.njit(**_JIT)
def columns_to_rows(src_t, s_src, dst, s_dst, n, accumulate):
    """dst[s_dst + s, i] = src_t[i, s_src + s] (``+=`` when ``accumulate``) for s < n and
    i < dst.shape[1].

    src_t: (≥ d, ·) columns; dst: (batch, d) rows.
    """
    d = dst.shape[1]
    d8 = d - d % 8
    src_t = src_t[:, s_src:s_src + n]  # views from sample 0, as in rows_to_columns
    dst = dst[s_dst:s_dst + n]
    for i0 in range(0, d8, 8):
        b0, b1, b2, b3 = src_t[i0], src_t[i0 + 1], src_t[i0 + 2], src_t[i0 + 3]
        b4, b5, b6, b7 = src_t[i0 + 4], src_t[i0 + 5], src_t[i0 + 6], src_t[i0 + 7]
        if accumulate:
            for s in range(n):
                o = dst[s, i0:i0 + 8]
                o[0] += b0[s]
                o[1] += b1[s]
                o[2] += b2[s]
                o[3] += b3[s]
                o[4] += b4[s]
                o[5] += b5[s]
                o[6] += b6[s]
                o[7] += b7[s]
        else:
            for s in range(n):
                o = dst[s, i0:i0 + 8]
                o[0] = b0[s]
                o[1] = b1[s]
                o[2] = b2[s]
                o[3] = b3[s]
                o[4] = b4[s]
                o[5] = b5[s]
                o[6] = b6[s]
                o[7] = b7[s]
    for s in range(n):
        for i in range(d8, d):
            if accumulate:
                dst[s, i] += src_t[i, s]
            else:
                dst[s, i] = src_t[i, s]
