"""Cycle-walk kernels for the permuted block-diagonal operator with 2×2 blocks and even depth.

Why they exist: the one-factor-at-a-time kernels (``numba_pairs.py``) are bound by moving
(width, tile) rows through L2. For two consecutive 2×2 factors F1, F2 the blocks form cycles
(each F1 block feeds two F2 blocks and each F2 block reads two F1 blocks), so a walk along
a cycle applies *both* factors while reading each row once and writing it once, in place:
step i reads F1 block b_i's two input rows, forms its outputs in registers, and completes
the F2 block that needed one of them and the carried output of b_{i-1}, writing its two
outputs into the rows just read. Which buffer slot holds which logical row afterwards is
bookkept by a schedule built once per permutation tensor (``build_schedule``).

Backward walks the same cycles and rebuilds each factor's input from its output through the
2×2 blocks' inverses, starting from the final activation the forward kept (one (width,
tile) slab per tile: memory independent of depth). So there is neither a recompute pass nor
a depth-sized scratch. Rebuilding amplifies rounding by the blocks' condition numbers:
callers use these kernels only while ``worst_amplification(weight)`` is small and fall back
to the recompute kernels otherwise (``custom_ops.py``).

Layout, tiles, threads, fastmath and the ``noalias`` helpers are as in
``numba_pairs.py`` (its docstring says why); rows are addressed through raw pointer views
(``_row``): numba's array views carry a reference count whose atomic updates, in these
per-step loops, measured ~40% of the time.
"""

from __future__ import annotations

import numba
import numpy as np

from bornsparse.ops.permuted.numba_pairs import FASTMATH
from bornsparse.ops.runtime.bodies import NoAliasCompiler, claim_chunk, finish_chunk, region_body
from bornsparse.ops.runtime.intrinsics import as_voidptr, header_address, view
from bornsparse.ops.runtime.intrinsics import prefetch as _prefetch
from bornsparse.ops.runtime.intrinsics import prefetch_write as _prefetch_write
from bornsparse.ops.runtime.region import header_layout
from bornsparse.ops.runtime.transpose import rows_to_columns

_I32 = np.empty(0, np.int32)
_I64 = np.empty(0, np.int64)

# Columns of one schedule step. RD0/RD1: slots of F1 block B1's two input rows (read, and
# overwritten by the outputs of the F2 block completed at this step); RIN: which output of
# B1 joins the previous step's carry in F2 block C2 (its other output is carried on); CC:
# the column of C2 that reads the carry; START: first step of a cycle (its RIN output is
# held "open" until the cycle closes); CLOSE: F2 block CL (carry in column CCL, open row in
# the other) completes after this step, into the cycle's first slots WR0/WR1.
RD0, RD1, B1, RIN, START, C2, CC, CLOSE, CL, CCL, WR0, WR1 = range(12)
STEP_FIELDS = 12
# Steps ahead at which backward prefetches the rows and blocks a step will touch (at
# width 2048, batch 256, depth 20: f+b 3.0-3.2 ms with 2-4 vs 3.27 with none; at width
# 2^20, depth 40, batch 16 backward measured alike with 2, 3 and 6, ~2.0 s, and 2× that
# with rows alone prefetched), and at which forward does (8: forward 0.58-0.61 s at 2^20
# against 0.62 with 3 and 0.78 with none; 2 threads, Intel Xeon AVX-512).
PF = 3
PF_FORWARD = 8
_JIT = {"cache": True, "nogil": True, "fastmath": FASTMATH}


@numba.njit(cache=True)
def pair_schedule(p1, p2, loc):
    """Steps applying F2(F1(.)) in place, given loc[i] = slot of logical row i before the pair.

    Returns (steps (width // 2, STEP_FIELDS), loc after the pair).
    """
    width = p1.shape[0]
    nb = width // 2
    inv2 = np.empty(width, np.int64)
    for j in range(width):
        inv2[p2[j]] = j
    seen = np.zeros(nb, np.bool_)
    steps = np.zeros((nb, STEP_FIELDS), np.int32)
    new_loc = np.empty(width, np.int64)
    n = 0
    for b0 in range(nb):
        if seen[b0]:
            continue
        b, rin, start, prev_c, prev_cc = b0, 0, True, -1, -1
        while True:
            seen[b] = True
            st = steps[n]
            st[RD0] = loc[p1[2 * b]]
            st[RD1] = loc[p1[2 * b + 1]]
            st[B1] = b
            st[RIN] = rin
            st[START] = start
            if not start:
                st[C2] = prev_c
                st[CC] = prev_cc
                new_loc[2 * prev_c] = st[RD0]
                new_loc[2 * prev_c + 1] = st[RD1]
            j = inv2[2 * b + 1 - rin]  # where F2 reads b's carried output
            c, cc = j // 2, j % 2
            other = p2[2 * c + 1 - cc]  # c's other input, an F1 output row
            n += 1
            if other == 2 * b0:  # back at the open row: the cycle closes
                st[CLOSE] = 1
                st[CL] = c
                st[CCL] = cc
                st[WR0] = loc[p1[2 * b0]]
                st[WR1] = loc[p1[2 * b0 + 1]]
                new_loc[2 * c] = st[WR0]
                new_loc[2 * c + 1] = st[WR1]
                break
            b, rin, start, prev_c, prev_cc = other // 2, other % 2, False, c, cc
    return steps, new_loc


@numba.njit(cache=True)
def build_schedule(perms):
    """(schedule (depth // 2, width // 2, STEP_FIELDS) int32, final slot of each logical row
    (width,) int64) for ``perms`` (depth, width) with even depth and width."""
    depth, width = perms.shape
    sched = np.empty((depth // 2, width // 2, STEP_FIELDS), np.int32)
    loc = np.arange(width)
    for q in range(depth // 2):
        sched[q], loc = pair_schedule(perms[2 * q], perms[2 * q + 1], loc)
    return sched, loc


@numba.njit(inline="always")
def _prefetch_row(base, i, row_bytes, nbytes):
    start = base + i * row_bytes
    for o in range(0, nbytes, 64):
        _prefetch(start + o)


@numba.njit(inline="always")
def _prefetch_row_write(base, i, row_bytes, nbytes):
    start = base + i * row_bytes
    for o in range(0, nbytes, 64):
        _prefetch_write(start + o)


@numba.njit(inline="always")
def _row(base, i, row_bytes, ts, dtype):
    # raw views: numba's array views carry a refcount whose atomic updates, in these
    # per-step loops, measured ~40% of the time
    return numba.carray(as_voidptr(base + i * row_bytes), (ts,), dtype)


@numba.njit(**_JIT, pipeline_class=NoAliasCompiler)
def _walk_first(a0, a1, open_row, carry, x00, x01, x10, x11, ts):
    for s in range(ts):
        u = a0[s]
        v = a1[s]
        open_row[s] = x00 * u + x01 * v
        carry[s] = x10 * u + x11 * v


@numba.njit(**_JIT, pipeline_class=NoAliasCompiler)
def _walk_step(a0, a1, carry, x00, x01, x10, x11, m00, m01, m10, m11, ts):
    for s in range(ts):
        u = a0[s]
        v = a1[s]
        joins = x00 * u + x01 * v
        carried = x10 * u + x11 * v
        c = carry[s]
        a0[s] = m00 * c + m01 * joins
        a1[s] = m10 * c + m11 * joins
        carry[s] = carried


@numba.njit(**_JIT, pipeline_class=NoAliasCompiler)
def _walk_close(d0, d1, carry, open_row, m00, m01, m10, m11, ts):
    for s in range(ts):
        c = carry[s]
        o = open_row[s]
        d0[s] = m00 * c + m01 * o
        d1[s] = m10 * c + m11 * o


@numba.njit(**_JIT, pipeline_class=NoAliasCompiler)
def _forward_pair(buf, w1, w2, st, tmp, ts):
    """Both factors of one pair on one tile, in place."""
    dt = buf.dtype
    base = buf.ctypes.data
    rb = buf.shape[1] * buf.itemsize
    open_row = _row(tmp.ctypes.data, 0, rb, ts, dt)
    carry = _row(tmp.ctypes.data, 1, rb, ts, dt)
    nbytes = ts * buf.itemsize
    bb = 4 * w1.itemsize
    w1b, w2b = w1.ctypes.data, w2.ctypes.data
    nsteps = st.shape[0]
    for i in range(nsteps):
        if i + PF_FORWARD < nsteps:
            j = i + PF_FORWARD
            _prefetch_row(base, st[j, RD0], rb, nbytes)
            _prefetch_row(base, st[j, RD1], rb, nbytes)
            _prefetch(w1b + st[j, B1] * bb)
            _prefetch(w2b + st[j, C2] * bb)
        b, rin = st[i, B1], st[i, RIN]
        ro = 1 - rin
        a0 = _row(base, st[i, RD0], rb, ts, dt)
        a1 = _row(base, st[i, RD1], rb, ts, dt)
        if st[i, START]:
            _walk_first(a0, a1, open_row, carry,
                        w1[b, rin, 0], w1[b, rin, 1], w1[b, ro, 0], w1[b, ro, 1], ts)
        else:
            c, cc = st[i, C2], st[i, CC]
            _walk_step(a0, a1, carry, w1[b, rin, 0], w1[b, rin, 1], w1[b, ro, 0], w1[b, ro, 1],
                       w2[c, 0, cc], w2[c, 0, 1 - cc], w2[c, 1, cc], w2[c, 1, 1 - cc], ts)
        if st[i, CLOSE]:
            c, cc = st[i, CL], st[i, CCL]
            _walk_close(_row(base, st[i, WR0], rb, ts, dt), _row(base, st[i, WR1], rb, ts, dt),
                        carry, open_row,
                        w2[c, 0, cc], w2[c, 0, 1 - cc], w2[c, 1, cc], w2[c, 1, 1 - cc], ts)


@numba.njit(**_JIT, pipeline_class=NoAliasCompiler)
def _load_tile_scattered(src, s0, ts, rows, buf):
    """buf[rows[i], s] = src[s0 + s, i] for i < src.shape[1] (16 features at a time)."""
    n = src.shape[1]
    for i0 in range(0, n, 16):
        i1 = min(i0 + 16, n)
        for s in range(ts):
            for i in range(i0, i1):
                buf[rows[i], s] = src[s0 + s, i]


@numba.njit(**_JIT, pipeline_class=NoAliasCompiler)
def _store_tile_gathered(buf, rows, s0, ts, out):
    """out[s0 + s, i] = buf[rows[i], s] for i < out.shape[1]."""
    n = out.shape[1]
    for i0 in range(0, n, 16):
        i1 = min(i0 + 16, n)
        for s in range(ts):
            for i in range(i0, i1):
                out[s0 + s, i] = buf[rows[i], s]


@numba.njit(**_JIT)
def forward_tiles(x, weight, sched, final_loc, out, z, scratch, tile, c, nchunks):
    """Forward of tiles c, c + nchunks, ... of x (batch, n_in) into out (batch, n_out).

    Unless z is empty (no backward to come), each tile is walked in its own slab z[it] of
    z (ntiles, width, tile), which is left holding the tile's final activation in slot
    order for backward (no copy); otherwise in ``scratch`` (width, tile), this chunk's own
    (allocated by the caller, who can ask for huge pages)."""
    batch, n_in = x.shape
    keep = z.shape[0] > 0
    tmp = np.empty((2, tile), dtype=x.dtype)
    for it in range(c, (batch + tile - 1) // tile, nchunks):
        s0 = it * tile
        ts = min(tile, batch - s0)
        buf = z[it] if keep else scratch
        buf[n_in:] = 0  # padding rows: the walk overwrites them in place
        rows_to_columns(x, s0, buf, 0, ts)
        for q in range(sched.shape[0]):
            _forward_pair(buf, weight[2 * q], weight[2 * q + 1], sched[q], tmp, ts)
        _store_tile_gathered(buf, final_loc, s0, ts, out)


@numba.njit(**_JIT, pipeline_class=NoAliasCompiler)
def _back_step(a0, a1, g0r, g1r, pa0, pa1, pg0, pg1, joins, gjoins,
               n00, n01, n10, n11, m00, m01, m10, m11,
               y00, y01, y10, y11, z00, z01, z10, z11, ts):
    """Invert F2 block (outputs in rows a0, a1; n = its inverse, m = it) and backprop it
    (grads g0r, g1r); finish the previous F1 block (its joining output and grad in joins,
    gjoins; y = its inverse, z = it), writing its inputs and their grads into rows pa0, pa1,
    pg0, pg1. Leaves this step's joining output and grad in joins, gjoins. Returns the F2
    and F1 weight-gradient sums. Rows come as raw views (``_row``), as in forward.

    This is _back_f2 followed by _back_f1, fused on purpose: one pass over the rows with
    the F2 block's rebuilt inputs in registers, where the two (kept for the cycle ends:
    2-7 cycles per pair of 1024 blocks at width 2048) would pass twice and go through tmp."""
    zero = n00 - n00
    d00 = d01 = d10 = d11 = e00 = e01 = e10 = e11 = zero
    for s in range(ts):
        o0 = a0[s]
        o1 = a1[s]
        p = n00 * o0 + n01 * o1  # the carried input of F2 block
        j = n10 * o0 + n11 * o1  # its joining input
        g0 = g0r[s]
        g1 = g1r[s]
        d00 += g0 * p
        d01 += g0 * j
        d10 += g1 * p
        d11 += g1 * j
        gp = m00 * g0 + m10 * g1
        gj = m01 * g0 + m11 * g1
        yi = joins[s]
        gi = gjoins[s]
        u = y00 * yi + y01 * p
        v = y10 * yi + y11 * p
        e00 += gi * u
        e01 += gi * v
        e10 += gp * u
        e11 += gp * v
        pa0[s] = u
        pa1[s] = v
        pg0[s] = z00 * gi + z10 * gp
        pg1[s] = z01 * gi + z11 * gp
        joins[s] = j
        gjoins[s] = gj
    return d00, d01, d10, d11, e00, e01, e10, e11


@numba.njit(**_JIT, pipeline_class=NoAliasCompiler)
def _back_f2(a0, a1, g0r, g1r, t4, t5, t6, t7, n00, n01, n10, n11, m00, m01, m10, m11, ts):
    """Invert and backprop one F2 block alone: inputs to t4 (carried), t5 (joining), their
    grads to t6, t7 (rows 4-7 of tmp)."""
    zero = n00 - n00
    d00 = d01 = d10 = d11 = zero
    for s in range(ts):
        o0 = a0[s]
        o1 = a1[s]
        p = n00 * o0 + n01 * o1
        j = n10 * o0 + n11 * o1
        g0 = g0r[s]
        g1 = g1r[s]
        d00 += g0 * p
        d01 += g0 * j
        d10 += g1 * p
        d11 += g1 * j
        t4[s] = p
        t5[s] = j
        t6[s] = m00 * g0 + m10 * g1
        t7[s] = m01 * g0 + m11 * g1
    return d00, d01, d10, d11


@numba.njit(**_JIT, pipeline_class=NoAliasCompiler)
def _back_f1(yi_, yo_, gi_, go_, pa0, pa1, pg0, pg1, y00, y01, y10, y11,
             z00, z01, z10, z11, ts):
    """Finish one F1 block from its outputs yi_, yo_ and grads gi_, go_ (tmp rows); inputs
    and input grads into rows pa0, pa1, pg0, pg1."""
    zero = y00 - y00
    e00 = e01 = e10 = e11 = zero
    for s in range(ts):
        yi = yi_[s]
        yo = yo_[s]
        gi = gi_[s]
        go = go_[s]
        u = y00 * yi + y01 * yo
        v = y10 * yi + y11 * yo
        e00 += gi * u
        e01 += gi * v
        e10 += go * u
        e11 += go * v
        pa0[s] = u
        pa1[s] = v
        pg0[s] = z00 * gi + z10 * go
        pg1[s] = z01 * gi + z11 * go
    return e00, e01, e10, e11


@numba.njit(inline="always")
def _inverse2(one, a, b, c, d):
    r = one / (a * d - b * c)
    return d * r, -b * r, -c * r, a * r


@numba.njit(inline="always")
def _f1_rows(w1, b, rin):
    """F1 block b with rows ordered (joining output, carried output), and its inverse."""
    ro = 1 - rin
    z00, z01, z10, z11 = w1[b, rin, 0], w1[b, rin, 1], w1[b, ro, 0], w1[b, ro, 1]
    y00, y01, y10, y11 = _inverse2(w1.dtype.type(1), z00, z01, z10, z11)
    return y00, y01, y10, y11, z00, z01, z10, z11


@numba.njit(inline="always")
def _f2_cols(w2, c, cc):
    """F2 block c with columns ordered (carried input, joining input), and its inverse."""
    m00, m01, m10, m11 = w2[c, 0, cc], w2[c, 0, 1 - cc], w2[c, 1, cc], w2[c, 1, 1 - cc]
    n00, n01, n10, n11 = _inverse2(w2.dtype.type(1), m00, m01, m10, m11)
    return n00, n01, n10, n11, m00, m01, m10, m11


@numba.njit(inline="always")
def _add_f1(gw1, b, rin, e00, e01, e10, e11):
    gw1[b, rin, 0] += e00
    gw1[b, rin, 1] += e01
    gw1[b, 1 - rin, 0] += e10
    gw1[b, 1 - rin, 1] += e11


@numba.njit(inline="always")
def _add_f2(gw2, c, cc, d00, d01, d10, d11):
    gw2[c, 0, cc] += d00
    gw2[c, 0, 1 - cc] += d01
    gw2[c, 1, cc] += d10
    gw2[c, 1, 1 - cc] += d11


@numba.njit(**_JIT, error_model="numpy")
def _backward_pair(act, gbuf, w1, w2, st, tmp, gw1, gw2, ts):
    """One pair backwards on one tile, in place: act holds F2's outputs and gbuf their grads
    in the slots the forward wrote; leaves F1's inputs and their grads in the slots they
    were read from. tmp rows: 0-1 the running joining output and grad, 2-3 the first
    block's carried output and grad (parked until the cycle closes), 4-7 scratch."""
    i0 = 0
    dt = act.dtype
    ab, gb = act.ctypes.data, gbuf.ctypes.data
    rb = act.strides[0]  # act and gbuf rows interleave (see backward_tiles)
    tb, trb = tmp.ctypes.data, tmp.strides[0]
    t0, t1, t2, t3 = (_row(tb, 0, trb, ts, dt), _row(tb, 1, trb, ts, dt),
                      _row(tb, 2, trb, ts, dt), _row(tb, 3, trb, ts, dt))
    t4, t5, t6, t7 = (_row(tb, 4, trb, ts, dt), _row(tb, 5, trb, ts, dt),
                      _row(tb, 6, trb, ts, dt), _row(tb, 7, trb, ts, dt))
    nbytes = ts * act.itemsize
    nsteps = st.shape[0]
    bb = 4 * w1.itemsize  # bytes of one 2×2 block
    w1b, w2b, g1b, g2b = w1.ctypes.data, w2.ctypes.data, gw1.ctypes.data, gw2.ctypes.data
    for i in range(nsteps):
        if i + PF < nsteps:
            j = i + PF
            _prefetch_row_write(ab, st[j, RD0], rb, nbytes)
            _prefetch_row_write(ab, st[j, RD1], rb, nbytes)
            _prefetch_row_write(gb, st[j, RD0], rb, nbytes)
            _prefetch_row_write(gb, st[j, RD1], rb, nbytes)
            # the blocks step j reads and the gradient blocks it adds into: at wide
            # layers as random as the rows
            _prefetch(w1b + st[j, B1] * bb)
            _prefetch(w2b + st[j, C2] * bb)
            _prefetch_write(g1b + st[j, B1] * bb)
            _prefetch_write(g2b + st[j, C2] * bb)
        if st[i, START]:
            i0 = i
        else:
            c, cc = st[i, C2], st[i, CC]
            n00, n01, n10, n11, m00, m01, m10, m11 = _f2_cols(w2, c, cc)
            r0, r1 = st[i, RD0], st[i, RD1]
            a0, a1 = _row(ab, r0, rb, ts, dt), _row(ab, r1, rb, ts, dt)
            g0, g1 = _row(gb, r0, rb, ts, dt), _row(gb, r1, rb, ts, dt)
            if i - 1 != i0:
                bp, rinp = st[i - 1, B1], st[i - 1, RIN]
                q0, q1 = st[i - 1, RD0], st[i - 1, RD1]
                y00, y01, y10, y11, z00, z01, z10, z11 = _f1_rows(w1, bp, rinp)
                d00, d01, d10, d11, e00, e01, e10, e11 = _back_step(
                    a0, a1, g0, g1, _row(ab, q0, rb, ts, dt), _row(ab, q1, rb, ts, dt),
                    _row(gb, q0, rb, ts, dt), _row(gb, q1, rb, ts, dt), t0, t1,
                    n00, n01, n10, n11, m00, m01, m10, m11,
                    y00, y01, y10, y11, z00, z01, z10, z11, ts)
                _add_f1(gw1, bp, rinp, e00, e01, e10, e11)
            else:  # the cycle's first block waits for the close
                d00, d01, d10, d11 = _back_f2(a0, a1, g0, g1, t4, t5, t6, t7,
                                              n00, n01, n10, n11, m00, m01, m10, m11, ts)
                for s in range(ts):
                    t2[s] = t4[s]
                    t3[s] = t6[s]
                    t0[s] = t5[s]
                    t1[s] = t7[s]
            _add_f2(gw2, c, cc, d00, d01, d10, d11)
        if st[i, CLOSE]:
            c, cc = st[i, CL], st[i, CCL]
            n00, n01, n10, n11, m00, m01, m10, m11 = _f2_cols(w2, c, cc)
            w0, w1r = st[i, WR0], st[i, WR1]
            d00, d01, d10, d11 = _back_f2(
                _row(ab, w0, rb, ts, dt), _row(ab, w1r, rb, ts, dt),
                _row(gb, w0, rb, ts, dt), _row(gb, w1r, rb, ts, dt), t4, t5, t6, t7,
                n00, n01, n10, n11, m00, m01, m10, m11, ts)
            _add_f2(gw2, c, cc, d00, d01, d10, d11)
            b, rin = st[i, B1], st[i, RIN]
            y00, y01, y10, y11, z00, z01, z10, z11 = _f1_rows(w1, b, rin)
            q0, q1 = st[i, RD0], st[i, RD1]
            p0, p1 = _row(ab, q0, rb, ts, dt), _row(ab, q1, rb, ts, dt)
            h0, h1 = _row(gb, q0, rb, ts, dt), _row(gb, q1, rb, ts, dt)
            if i == i0:  # a one-block cycle: both of b's outputs meet in the closing block
                e00, e01, e10, e11 = _back_f1(t5, t4, t7, t6, p0, p1, h0, h1,
                                              y00, y01, y10, y11, z00, z01, z10, z11, ts)
                _add_f1(gw1, b, rin, e00, e01, e10, e11)
            else:
                e00, e01, e10, e11 = _back_f1(t0, t4, t1, t6, p0, p1, h0, h1,
                                              y00, y01, y10, y11, z00, z01, z10, z11, ts)
                _add_f1(gw1, b, rin, e00, e01, e10, e11)
                b, rin = st[i0, B1], st[i0, RIN]
                y00, y01, y10, y11, z00, z01, z10, z11 = _f1_rows(w1, b, rin)
                q0, q1 = st[i0, RD0], st[i0, RD1]
                e00, e01, e10, e11 = _back_f1(
                    t5, t2, t7, t3, _row(ab, q0, rb, ts, dt), _row(ab, q1, rb, ts, dt),
                    _row(gb, q0, rb, ts, dt), _row(gb, q1, rb, ts, dt),
                    y00, y01, y10, y11, z00, z01, z10, z11, ts)
                _add_f1(gw1, b, rin, e00, e01, e10, e11)


@numba.njit(**_JIT)
def backward_tiles(z, weight, sched, final_loc, grad_out, grad_x, gw, rows, tile, c, nchunks):
    """Backward of tiles c, c + nchunks, ...: their rows of grad_x (batch, n_in), and gw
    (depth, width // 2, 2, 2) set to the weight gradient summed over those tiles. z is
    left unchanged (a retained graph can run backward twice): each slab is first copied into
    a per-thread buffer, where the walk rebuilds the inputs in place. Measured at batch 256,
    width 2048, depth 20, 2 threads: the copy costs ~0.1–0.15 ms of a ~1.8 ms backward, about
    what copying all of z before the kernel cost; consuming z in place would save it but
    break a second backward."""
    batch, n_in = grad_x.shape
    width = 2 * weight.shape[1]
    n_out = grad_out.shape[1]
    # rows (width, 2, tile), this chunk's (from the caller): slot i's activation row and
    # gradient row side by side. The walk reads and writes both at every step, so at wide
    # layers one random slot is one place in memory (one cache line at 8 float32 samples a
    # tile) instead of two
    act = rows[:, 0]
    gbuf = rows[:, 1]
    tmp = np.empty((8, tile), dtype=z.dtype)
    gw[:] = 0
    for it in range(c, (batch + tile - 1) // tile, nchunks):
        s0 = it * tile
        ts = min(tile, batch - s0)
        act[:, :] = z[it]
        for i in range(n_out, width):  # rows the output slice dropped get no gradient
            gbuf[final_loc[i], :ts] = 0
        _load_tile_scattered(grad_out, s0, ts, final_loc, gbuf)
        for q in range(sched.shape[0] - 1, -1, -1):
            _backward_pair(act, gbuf, weight[2 * q], weight[2 * q + 1], sched[q], tmp,
                           gw[2 * q], gw[2 * q + 1], ts)
        # after the first pair's backward, logical row i of the input sits in slot i
        for i0 in range(0, n_in, 16):
            i1 = min(i0 + 16, n_in)
            for s in range(ts):
                for i in range(i0, i1):
                    grad_x[s0 + s, i] = gbuf[i, s]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def worst_amplification(weight):
    """Product over factors of the largest 2×2 block condition number (inf if a block is
    singular or not finite): a bound on how much rebuilding inputs through the inverses can
    magnify relative rounding error over the whole depth."""
    total = 1.0
    for t in range(weight.shape[0]):
        # κ = cond² of a block B satisfies κ + 1/κ = tr(BᵀB)² / det(BᵀB) - 2, increasing in
        # κ >= 1: each factor's worst block without a root per block. A singular block gives
        # inf, a zero block or a NaN or infinite weight NaN: either ends the search.
        worst = 2.0
        for b in range(weight.shape[1]):
            a = np.float64(weight[t, b, 0, 0])
            bb = np.float64(weight[t, b, 0, 1])
            c = np.float64(weight[t, b, 1, 0])
            d = np.float64(weight[t, b, 1, 1])
            tr = a * a + bb * bb + c * c + d * d
            det = a * d - bb * c
            v = tr * tr / (det * det)
            if not v < np.inf:
                return np.inf
            if v > worst:
                worst = v
        r = worst - 2.0  # κ + 1/κ
        kappa = (r + np.sqrt(max(r * r - 4.0, 0.0))) / 2.0
        total *= np.sqrt(kappa)
    return total


# ---------------------------------------------------------------------------------------
# Parallel-region bodies (ops/runtime/), as at the end of numba_pairs.py: named
# header slots (code 0 float32, 1 float64), filled by name in custom_ops.py.

ForwardSlot = header_layout(
    "CycleForwardSlot",
    "batch n_in depth nb n_out tile x weight sched final_loc out final scratch")
BackwardSlot = header_layout(
    "CycleBackwardSlot",
    "batch n_in depth nb n_out tile final weight sched final_loc grad_out grad_x grad_weight "
    "partial rows")


@numba.njit(cache=True, nogil=True)
def _forward_chunks(a, like):
    S = ForwardSlot
    hp = header_address(a)
    nchunks, batch, n_in, depth, nb, n_out, tile = (
        a[S.nchunks], a[S.batch], a[S.n_in], a[S.depth], a[S.nb], a[S.n_out], a[S.tile])
    width = 2 * nb
    ntiles = (batch + tile - 1) // tile
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        forward_tiles(
            view(a[S.x], (batch, n_in), like), view(a[S.weight], (depth, nb, 2, 2), like),
            view(a[S.sched], (depth // 2, nb, STEP_FIELDS), _I32),
            view(a[S.final_loc], (width,), _I64), view(a[S.out], (batch, n_out), like),
            view(a[S.final], (ntiles if a[S.final] else 0, width, tile), like),
            # this chunk's walk buffer where no final activation is kept (else never read)
            view(a[S.scratch] + c * (width * tile * like.itemsize), (width, tile), like),
            tile, c, nchunks)
        finish_chunk(hp)


@numba.njit(cache=True, nogil=True, inline="always")
def _weight_gradient_slot(grad_weight, partial, shape, like, c):
    """Where chunk c sums its weight gradient: chunk 0 into the result itself, chunk c > 0
    into partial[c - 1] (added to the result afterwards): one weight-sized buffer fewer to
    allocate and fault in than a partial per chunk and their sum."""
    if c == 0:
        return view(grad_weight, shape, like)
    return view(partial + (c - 1) * (shape[0] * shape[1] * 4) * like.itemsize, shape, like)


@numba.njit(cache=True, nogil=True)
def _backward_chunks(a, like):
    S = BackwardSlot
    hp = header_address(a)
    nchunks, batch, n_in, depth, nb, n_out, tile = (
        a[S.nchunks], a[S.batch], a[S.n_in], a[S.depth], a[S.nb], a[S.n_out], a[S.tile])
    width = 2 * nb
    ntiles = (batch + tile - 1) // tile
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        backward_tiles(
            view(a[S.final], (ntiles, width, tile), like),
            view(a[S.weight], (depth, nb, 2, 2), like),
            view(a[S.sched], (depth // 2, nb, STEP_FIELDS), _I32),
            view(a[S.final_loc], (width,), _I64), view(a[S.grad_out], (batch, n_out), like),
            view(a[S.grad_x], (batch, n_in), like),
            _weight_gradient_slot(a[S.grad_weight], a[S.partial], (depth, nb, 2, 2), like, c),
            view(a[S.rows] + c * (width * 2 * tile * like.itemsize), (width, 2, tile), like),
            tile, c, nchunks)
        finish_chunk(hp)


_forward_body = region_body(_forward_chunks, ForwardSlot)
_backward_body = region_body(_backward_chunks, BackwardSlot)
