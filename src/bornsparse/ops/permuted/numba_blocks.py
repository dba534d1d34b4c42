"""Register-blocked numba kernels for the permuted operator's k×k blocks when 4 divides k.

One factor mixes each block's k rows: dst row r = Σ_c w[r, c] · src row c, every row a run
of samples. Written as one loop over (r, c) with the batch innermost, every multiply-add
loads a source row, loads an output row and stores it back (three memory operations per
FMA, the loop nest the generic path runs). Here the block is walked in 4×4 sub-blocks: the
16 weights sit in registers, four source rows are loaded once for four output rows, and an
output row is read and written once per four source rows (k / 4 times per factor instead
of k), so the loads and stores per FMA drop from 3 to 0.75 (0.5 at k = 4). The weight
gradient is the same 4×4 tiling of g · aᵀ: 16 dot products over the samples share eight
row loads.

Rows are named through index arrays (``src_rows``, ``dst_rows``: the permutation where the
factor gathers or scatters, the identity where it reads rows in order), so one kernel serves
the forward (gather from src), the backward's input gradient (the transposed block,
scattered to the gathered rows) and the saved-input variants. All arrays are distinct
buffers (the NoAliasCompiler contract); callers check shapes and that 4 divides k.

The rows are sliced to the sample range [s0, s1) before the loop, which then runs from 0:
numba's ``range(s0, s1)`` with a run-time start left these loops scalar (LLVM did not
vectorise them; ``range(n)`` over slices it does, checked in the assembly).
"""

from __future__ import annotations

import numba

from bornsparse.ops.runtime.bodies import NoAliasCompiler

#: the permuted kernels' fast-math flags (why these two: numba_pairs.py's docstring)
FASTMATH = {"contract", "reassoc"}
#: the sub-block edge: 4 source rows and 4 output rows held in registers at once
SUB = 4


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, pipeline_class=NoAliasCompiler)
def mix_blocks(src, src_rows, dst, dst_rows, w, transposed, nb, s0, s1):
    """dst[dst_rows[b*k + r], s0:s1] = Σ_c W_b[r, c] · src[src_rows[b*k + c], s0:s1] for
    blocks b < nb, with W_b = w[b] (k, k), or w[b]ᵀ when ``transposed``; 4 divides k."""
    k = w.shape[1]
    n = s1 - s0
    for b in range(nb):
        base = b * k
        wb = w[b]
        for r0 in range(0, k, SUB):
            d0 = dst[dst_rows[base + r0], s0:s1]
            d1 = dst[dst_rows[base + r0 + 1], s0:s1]
            d2 = dst[dst_rows[base + r0 + 2], s0:s1]
            d3 = dst[dst_rows[base + r0 + 3], s0:s1]
            for c0 in range(0, k, SUB):
                a0 = src[src_rows[base + c0], s0:s1]
                a1 = src[src_rows[base + c0 + 1], s0:s1]
                a2 = src[src_rows[base + c0 + 2], s0:s1]
                a3 = src[src_rows[base + c0 + 3], s0:s1]
                if transposed:
                    v = wb[c0:c0 + SUB, r0:r0 + SUB].T
                else:
                    v = wb[r0:r0 + SUB, c0:c0 + SUB]
                w00, w01, w02, w03 = v[0, 0], v[0, 1], v[0, 2], v[0, 3]
                w10, w11, w12, w13 = v[1, 0], v[1, 1], v[1, 2], v[1, 3]
                w20, w21, w22, w23 = v[2, 0], v[2, 1], v[2, 2], v[2, 3]
                w30, w31, w32, w33 = v[3, 0], v[3, 1], v[3, 2], v[3, 3]
                if c0 == 0:
                    for s in range(n):
                        u0, u1, u2, u3 = a0[s], a1[s], a2[s], a3[s]
                        d0[s] = w00 * u0 + w01 * u1 + w02 * u2 + w03 * u3
                        d1[s] = w10 * u0 + w11 * u1 + w12 * u2 + w13 * u3
                        d2[s] = w20 * u0 + w21 * u1 + w22 * u2 + w23 * u3
                        d3[s] = w30 * u0 + w31 * u1 + w32 * u2 + w33 * u3
                else:
                    for s in range(n):
                        u0, u1, u2, u3 = a0[s], a1[s], a2[s], a3[s]
                        d0[s] += w00 * u0 + w01 * u1 + w02 * u2 + w03 * u3
                        d1[s] += w10 * u0 + w11 * u1 + w12 * u2 + w13 * u3
                        d2[s] += w20 * u0 + w21 * u1 + w22 * u2 + w23 * u3
                        d3[s] += w30 * u0 + w31 * u1 + w32 * u2 + w33 * u3


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, pipeline_class=NoAliasCompiler)
def block_grads(g, g_rows, g0, a, a_rows, a0, gw, nb, n):
    """gw[b, r, c] += Σ_{s < n} g[g_rows[b*k + r], g0 + s] · a[a_rows[b*k + c], a0 + s] for
    blocks b < nb (the weight gradient of mix_blocks; g and a may start their samples at
    different columns); 4 divides k."""
    k = gw.shape[1]
    # a literal 0.0 would make the accumulators float64 and the float32 loops convert
    zero = gw.dtype.type(0)
    for b in range(nb):
        base = b * k
        for r0 in range(0, k, SUB):
            y0 = g[g_rows[base + r0], g0:g0 + n]
            y1 = g[g_rows[base + r0 + 1], g0:g0 + n]
            y2 = g[g_rows[base + r0 + 2], g0:g0 + n]
            y3 = g[g_rows[base + r0 + 3], g0:g0 + n]
            for c0 in range(0, k, SUB):
                x0 = a[a_rows[base + c0], a0:a0 + n]
                x1 = a[a_rows[base + c0 + 1], a0:a0 + n]
                x2 = a[a_rows[base + c0 + 2], a0:a0 + n]
                x3 = a[a_rows[base + c0 + 3], a0:a0 + n]
                q00 = q01 = q02 = q03 = zero
                q10 = q11 = q12 = q13 = zero
                q20 = q21 = q22 = q23 = zero
                q30 = q31 = q32 = q33 = zero
                for s in range(n):
                    u0, u1, u2, u3 = x0[s], x1[s], x2[s], x3[s]
                    e0, e1, e2, e3 = y0[s], y1[s], y2[s], y3[s]
                    q00 += e0 * u0
                    q01 += e0 * u1
                    q02 += e0 * u2
                    q03 += e0 * u3
                    q10 += e1 * u0
                    q11 += e1 * u1
                    q12 += e1 * u2
                    q13 += e1 * u3
                    q20 += e2 * u0
                    q21 += e2 * u1
                    q22 += e2 * u2
                    q23 += e2 * u3
                    q30 += e3 * u0
                    q31 += e3 * u1
                    q32 += e3 * u2
                    q33 += e3 * u3
                v = gw[b, r0:r0 + SUB, c0:c0 + SUB]
                v[0, 0] += q00
                v[0, 1] += q01
                v[0, 2] += q02
                v[0, 3] += q03
                v[1, 0] += q10
                v[1, 1] += q11
                v[1, 2] += q12
                v[1, 3] += q13
                v[2, 0] += q20
                v[2, 1] += q21
                v[2, 2] += q22
                v[2, 3] += q23
                v[3, 0] += q30
                v[3, 1] += q31
                v[3, 2] += q32
                v[3, 3] += q33
