"""Prototype, not used by the library: k = 2 kernels that walk the cycles of factor pairs in place.

Why it exists (docs/design.md, "Next direction: cycle walk"): the shipped kernels are bound
by moving (width, tile) rows through L2. For two consecutive 2×2 factors F1, F2 the blocks
form cycles (each F1 block feeds two F2 blocks and each F2 block reads two F1 blocks), so a
walk along a cycle applies *both* factors while reading each row once and writing it once,
in place: step i reads F1 block b_i's two input rows, forms its outputs in registers, and
completes the F2 block that needed one of them and the carried output of b_{i-1}, writing
its two outputs into the rows just read. Which slot holds which logical row afterwards is
bookkept by a schedule built once from the permutations. Backward walks the same cycles
and rebuilds each factor's input from its output through the 2×2 blocks' inverses (the
forward keeps its final (batch, width) activation), so there is neither a recompute pass
nor a depth-sized scratch.

Limits of the prototype: block size 2, even depth, one thread, no guard against
ill-conditioned blocks (the inverse rebuild amplifies rounding by the blocks' condition
numbers; a library version needs the recompute path as a fallback, as the dropped
"inverse backward" of docs/design.md had).

    python benchmarks/proto_cycle_walk.py [--batch 256] [--tiles 64 128] [--repeats 9]

Checks the prototype against the plain-PyTorch reference (float64, small odd shapes) and
against the shipped kernels (float32, the benchmark shape), then times the shipped forward
and backward kernels against the prototype's, one thread, interleaved, and prints a table
and one JSON line (milliseconds per call of the kernels alone, no autograd).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bornsparse.ops import _permuted_numba as shipped  # noqa: E402
from bornsparse.ops._parallel import _as_voidptr  # noqa: E402
from bornsparse.ops._permuted_numba import (  # noqa: E402
    _FASTMATH,
    _load_tile_transposed,
    _NoAliasCompiler,
)
from bornsparse.ops.permuted import permuted_block_diagonal_reference  # noqa: E402
from common import machine_tag, print_json_line, set_threads, time_interleaved  # noqa: E402

# Columns of one schedule step. RD0/RD1: slots of F1 block B1's two input rows (read, and
# overwritten by the outputs of the F2 block completed at this step); RIN: which output of
# B1 joins the previous step's carry in F2 block C2 (its other output is carried on); CC:
# the column of C2 that reads the carry; START: first step of a cycle (its RIN output is
# held "open" until the cycle closes); CLOSE: F2 block CL (carry in column CCL, open row in
# the other) completes after this step, into the cycle's first slots WR0/WR1.
RD0, RD1, B1, RIN, START, C2, CC, CLOSE, CL, CCL, WR0, WR1 = range(12)
STEP_FIELDS = 12
_JIT = {"cache": True, "nogil": True, "fastmath": _FASTMATH}


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
    steps = np.zeros((nb, STEP_FIELDS), np.int64)
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
    """(schedule (depth // 2, width // 2, STEP_FIELDS), final slot of each output row)."""
    depth, width = perms.shape
    sched = np.empty((depth // 2, width // 2, STEP_FIELDS), np.int64)
    loc = np.arange(width)
    for q in range(depth // 2):
        sched[q], loc = pair_schedule(perms[2 * q], perms[2 * q + 1], loc)
    return sched, loc


@numba.njit(inline="always")
def _row(base, i, row_bytes, ts, dtype):
    # raw views: numba's array views carry a refcount whose atomic updates, in these
    # per-step loops, measured ~40% of the time
    return numba.carray(_as_voidptr(base + i * row_bytes), (ts,), dtype)


@numba.njit(**_JIT, pipeline_class=_NoAliasCompiler)
def _walk_first(a0, a1, open_row, carry, x00, x01, x10, x11, ts):
    for s in range(ts):
        u = a0[s]
        v = a1[s]
        open_row[s] = x00 * u + x01 * v
        carry[s] = x10 * u + x11 * v


@numba.njit(**_JIT, pipeline_class=_NoAliasCompiler)
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


@numba.njit(**_JIT, pipeline_class=_NoAliasCompiler)
def _walk_close(d0, d1, carry, open_row, m00, m01, m10, m11, ts):
    for s in range(ts):
        c = carry[s]
        o = open_row[s]
        d0[s] = m00 * c + m01 * o
        d1[s] = m10 * c + m11 * o


@numba.njit(**_JIT, pipeline_class=_NoAliasCompiler)
def _forward_pair(buf, w1, w2, st, tmp, ts):
    """Both factors of one pair on one tile, in place."""
    dt = buf.dtype
    base = buf.ctypes.data
    rb = buf.shape[1] * buf.itemsize
    open_row = _row(tmp.ctypes.data, 0, rb, ts, dt)
    carry = _row(tmp.ctypes.data, 1, rb, ts, dt)
    for i in range(st.shape[0]):
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


@numba.njit(**_JIT)
def forward_kernel(x, weight, sched, final_loc, out, z, tile):
    """out = G x[:, :n_out] rows; z (batch, width) = the final activation in slot order."""
    batch, n_in = x.shape
    width = 2 * weight.shape[1]
    n_out = out.shape[1]
    buf = np.empty((width, tile), dtype=x.dtype)
    tmp = np.empty((2, tile), dtype=x.dtype)
    for s0 in range(0, batch, tile):
        ts = min(tile, batch - s0)
        buf[n_in:] = 0
        _load_tile_transposed(x, s0, ts, buf)
        for q in range(sched.shape[0]):
            _forward_pair(buf, weight[2 * q], weight[2 * q + 1], sched[q], tmp, ts)
        for i0 in range(0, n_out, 16):
            for s in range(ts):
                for i in range(i0, min(i0 + 16, n_out)):
                    out[s0 + s, i] = buf[final_loc[i], s]
        for i0 in range(0, width, 16):
            for s in range(ts):
                for i in range(i0, min(i0 + 16, width)):
                    z[s0 + s, i] = buf[i, s]


@numba.njit(**_JIT, pipeline_class=_NoAliasCompiler)
def _back_step(act, gbuf, tmp, r0, r1, q0, q1, n00, n01, n10, n11, m00, m01, m10, m11,
               y00, y01, y10, y11, z00, z01, z10, z11, ts):
    """Invert F2 block (outputs act rows r0, r1; n = its inverse, m = it) and backprop it
    (grads gbuf rows r0, r1); finish the previous F1 block (its joining output and grad in
    tmp rows 0, 1; y = its inverse, z = it), writing its inputs and their grads into rows
    q0, q1. Leaves this step's joining output and grad in tmp rows 0, 1. Returns the F2 and
    F1 weight-gradient sums."""
    a0, a1, g0r, g1r = act[r0], act[r1], gbuf[r0], gbuf[r1]
    pa0, pa1, pg0, pg1 = act[q0], act[q1], gbuf[q0], gbuf[q1]
    joins, gjoins = tmp[0], tmp[1]
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


@numba.njit(**_JIT, pipeline_class=_NoAliasCompiler)
def _back_f2(act, gbuf, tmp, r0, r1, n00, n01, n10, n11, m00, m01, m10, m11, ts):
    """Invert and backprop one F2 block alone: inputs to tmp rows 4 (carried), 5 (joining),
    their grads to 6, 7."""
    a0, a1, g0r, g1r = act[r0], act[r1], gbuf[r0], gbuf[r1]
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
        tmp[4, s] = p
        tmp[5, s] = j
        tmp[6, s] = m00 * g0 + m10 * g1
        tmp[7, s] = m01 * g0 + m11 * g1
    return d00, d01, d10, d11


@numba.njit(**_JIT, pipeline_class=_NoAliasCompiler)
def _back_f1(act, gbuf, tmp, iyi, iyo, igi, igo, q0, q1, y00, y01, y10, y11,
             z00, z01, z10, z11, ts):
    """Finish one F1 block from its outputs and grads in tmp rows; inputs and input grads
    into rows q0, q1."""
    yi_, yo_, gi_, go_ = tmp[iyi], tmp[iyo], tmp[igi], tmp[igo]
    pa0, pa1, pg0, pg1 = act[q0], act[q1], gbuf[q0], gbuf[q1]
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
    for i in range(st.shape[0]):
        if st[i, START]:
            i0 = i
        else:
            c, cc = st[i, C2], st[i, CC]
            n00, n01, n10, n11, m00, m01, m10, m11 = _f2_cols(w2, c, cc)
            if i - 1 != i0:
                bp, rinp = st[i - 1, B1], st[i - 1, RIN]
                y00, y01, y10, y11, z00, z01, z10, z11 = _f1_rows(w1, bp, rinp)
                d00, d01, d10, d11, e00, e01, e10, e11 = _back_step(
                    act, gbuf, tmp, st[i, RD0], st[i, RD1], st[i - 1, RD0], st[i - 1, RD1],
                    n00, n01, n10, n11, m00, m01, m10, m11,
                    y00, y01, y10, y11, z00, z01, z10, z11, ts)
                _add_f1(gw1, bp, rinp, e00, e01, e10, e11)
            else:  # the cycle's first block waits for the close
                d00, d01, d10, d11 = _back_f2(act, gbuf, tmp, st[i, RD0], st[i, RD1],
                                              n00, n01, n10, n11, m00, m01, m10, m11, ts)
                for s in range(ts):
                    tmp[2, s] = tmp[4, s]
                    tmp[3, s] = tmp[6, s]
                    tmp[0, s] = tmp[5, s]
                    tmp[1, s] = tmp[7, s]
            _add_f2(gw2, c, cc, d00, d01, d10, d11)
        if st[i, CLOSE]:
            c, cc = st[i, CL], st[i, CCL]
            n00, n01, n10, n11, m00, m01, m10, m11 = _f2_cols(w2, c, cc)
            d00, d01, d10, d11 = _back_f2(act, gbuf, tmp, st[i, WR0], st[i, WR1],
                                          n00, n01, n10, n11, m00, m01, m10, m11, ts)
            _add_f2(gw2, c, cc, d00, d01, d10, d11)
            b, rin = st[i, B1], st[i, RIN]
            y00, y01, y10, y11, z00, z01, z10, z11 = _f1_rows(w1, b, rin)
            if i == i0:  # a one-block cycle: both of b's outputs meet in the closing block
                e00, e01, e10, e11 = _back_f1(act, gbuf, tmp, 5, 4, 7, 6, st[i, RD0],
                                              st[i, RD1], y00, y01, y10, y11,
                                              z00, z01, z10, z11, ts)
                _add_f1(gw1, b, rin, e00, e01, e10, e11)
            else:
                e00, e01, e10, e11 = _back_f1(act, gbuf, tmp, 0, 4, 1, 6, st[i, RD0],
                                              st[i, RD1], y00, y01, y10, y11,
                                              z00, z01, z10, z11, ts)
                _add_f1(gw1, b, rin, e00, e01, e10, e11)
                b, rin = st[i0, B1], st[i0, RIN]
                y00, y01, y10, y11, z00, z01, z10, z11 = _f1_rows(w1, b, rin)
                e00, e01, e10, e11 = _back_f1(act, gbuf, tmp, 5, 2, 7, 3, st[i0, RD0],
                                              st[i0, RD1], y00, y01, y10, y11,
                                              z00, z01, z10, z11, ts)
                _add_f1(gw1, b, rin, e00, e01, e10, e11)


@numba.njit(**_JIT)
def backward_kernel(z, weight, sched, final_loc, grad_out, grad_x, gw, tile):
    """grad_x and gw (overwritten) from the final activation z and grad_out."""
    batch, width = z.shape
    n_in = grad_x.shape[1]
    n_out = grad_out.shape[1]
    act = np.empty((width, tile), dtype=z.dtype)
    gbuf = np.empty((width, tile), dtype=z.dtype)
    tmp = np.empty((8, tile), dtype=z.dtype)
    gw[:] = 0
    for s0 in range(0, batch, tile):
        ts = min(tile, batch - s0)
        _load_tile_transposed(z, s0, ts, act)
        for i in range(n_out, width):
            gbuf[final_loc[i], :ts] = 0
        for s in range(ts):
            for i in range(n_out):
                gbuf[final_loc[i], s] = grad_out[s0 + s, i]
        for q in range(sched.shape[0] - 1, -1, -1):
            _backward_pair(act, gbuf, weight[2 * q], weight[2 * q + 1], sched[q], tmp,
                           gw[2 * q], gw[2 * q + 1], ts)
        for s in range(ts):
            for i in range(n_in):
                grad_x[s0 + s, i] = gbuf[i, s]


def _operands(rng, batch, n_in, width, depth, dtype, noise=0.0):
    x = rng.standard_normal((batch, n_in)).astype(dtype)
    perms = np.stack([rng.permutation(width) for _ in range(depth)]).astype(np.int64)
    q, _ = np.linalg.qr(rng.standard_normal((depth * width // 2, 2, 2)))
    weight = q.reshape(depth, width // 2, 2, 2) + noise * rng.standard_normal(
        (depth, width // 2, 2, 2))
    return x, weight.astype(dtype), perms


def check_against_reference(rng) -> float:
    """Worst float64 error of output, grad_x and grad_w against autograd on the reference,
    over small shapes with odd sizes, tiles of 1 and 3, and non-orthogonal blocks."""
    worst = 0.0
    for batch, n_in, width, depth in [(5, 7, 10, 2), (9, 30, 40, 4), (33, 99, 202, 6)]:
        x, w, perms = _operands(rng, batch, n_in, width, depth, np.float64, noise=0.1)
        n_out = n_in - 2
        go = rng.standard_normal((batch, n_out))
        xt = torch.tensor(x, requires_grad=True)
        wt = torch.tensor(w, requires_grad=True)
        y_ref = permuted_block_diagonal_reference(xt, wt, torch.tensor(perms), out_features=n_out)
        y_ref.backward(torch.tensor(go))
        sched, final_loc = build_schedule(perms)
        for tile in (1, 3, 8):
            y, z = np.empty((batch, n_out)), np.empty((batch, width))
            gx, gw = np.empty_like(x), np.empty_like(w)
            forward_kernel(x, w, sched, final_loc, y, z, tile)
            backward_kernel(z, w, sched, final_loc, go, gx, gw, tile)
            for ours, ref in ((y, y_ref.detach()), (gx, xt.grad), (gw, wt.grad)):
                worst = max(worst, float(np.abs(ours - ref.numpy()).max()))
    return worst


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=20, help="even (default 20)")
    ap.add_argument("--tiles", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    if args.depth % 2 or args.width % 2:
        ap.error(f"--depth and --width must be even, got {args.depth} and {args.width}")
    set_threads(1, numba_threads=False)
    rng = np.random.default_rng(0)
    err64 = check_against_reference(rng)
    print(f"prototype vs reference, float64, worst abs error: {err64:.1e}")
    if err64 > 1e-10:
        raise SystemExit("prototype disagrees with the reference")

    x, w, perms = _operands(rng, args.batch, args.features, args.width, args.depth, np.float32)
    go = rng.standard_normal((args.batch, args.features)).astype(np.float32)
    sched, final_loc = build_schedule(perms)
    y, y_ref = np.empty_like(x), np.empty_like(x)
    z = np.empty((args.batch, args.width), np.float32)
    gx, gw = np.empty_like(x), np.empty_like(w)
    gx_ref, gw_ref = np.empty_like(x), np.empty_like(w)
    rows, ms = [], {}
    for tile in args.tiles:
        fns = {
            "shipped_fwd": lambda t=tile: shipped._forward_thread_kernel(
                x, w, perms, y_ref, t, 0, 1),
            "shipped_bwd": lambda t=tile: shipped._backward_thread_kernel(
                x, w, perms, go, gx_ref, gw_ref, t, 0, 1),
            "proto_fwd": lambda t=tile: forward_kernel(x, w, sched, final_loc, y, z, t),
            "proto_bwd": lambda t=tile: backward_kernel(z, w, sched, final_loc, go, gx, gw, t),
        }
        t = time_interleaved(fns, repeats=args.repeats)
        scale = float(np.abs(gw_ref).max())
        diff = {
            "y": float(np.abs(y - y_ref).max()),
            "grad_x": float(np.abs(gx - gx_ref).max()),
            "grad_w_rel": float(np.abs(gw - gw_ref).max()) / scale,
        }
        ms[str(tile)] = {k: round(v * 1e3, 4) for k, v in t.items()} | {"float32_diff": diff}
        shipped_fb = t["shipped_fwd"] + t["shipped_bwd"]
        proto_fb = t["proto_fwd"] + t["proto_bwd"]
        rows.append((tile, t, shipped_fb, proto_fb))
    print(f"kernels alone, 1 thread, float32, batch {args.batch}, {args.features} -> "
          f"{args.features}, width {args.width}, depth {args.depth} (ms)")
    print(" tile  shipped fwd  bwd    f+b  | prototype fwd  bwd    f+b  | f+b ratio")
    for tile, t, sfb, pfb in rows:
        print(f"{tile:5d}  {t['shipped_fwd'] * 1e3:9.3f} {t['shipped_bwd'] * 1e3:6.3f} "
              f"{sfb * 1e3:6.3f} | {t['proto_fwd'] * 1e3:11.3f} {t['proto_bwd'] * 1e3:6.3f} "
              f"{pfb * 1e3:6.3f} | {pfb / sfb:6.2f}")
    best_shipped = min(r[2] for r in rows)
    best_proto = min(r[3] for r in rows)
    print(f"best tile of each: prototype f+b / shipped f+b = {best_proto / best_shipped:.2f}")
    record = {
        "bench": "proto_cycle_walk",
        "config": {"batch": args.batch, "features": args.features, "width": args.width,
                   "depth": args.depth, "dtype": "float32", "threads": 1},
        "machine": machine_tag(),
        "float64_max_error_vs_reference": err64,
        "ms": ms,
        "best_fwdbwd_ratio": round(best_proto / best_shipped, 4),
    }
    print_json_line(record)
    return record


if __name__ == "__main__":
    main()
