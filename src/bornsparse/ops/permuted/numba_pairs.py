"""Fused numba CPU kernels for the permuted block-diagonal operator (see the package docstring).

Why the kernels look the way they do:

* The batch is split into tiles of ``tile`` samples and each tile is held *transposed*,
  ``(width, tile)``, so the gather ``h[perms[t, j]]`` fetches one contiguous row of ``tile``
  numbers and the innermost loops run over the batch tile, which LLVM vectorises.
* All ``depth`` factors are applied to one tile before the next tile is touched; three
  ``(width, tile)`` buffers (1.5 MiB at width 2048, tile 64, float32) stay in L2, so after the
  first factor nothing goes back to main memory. For k = 2 factors run in fused pairs.
* Backward recomputes the forward of each tile (keeping that tile's activations, every other
  factor's for k = 2, in a per-thread scratch buffer) instead of saving
  ``depth · batch · width`` activations between forward and backward: only ``x`` is saved,
  and the scratch does not grow with the batch. For k = 2 backward also runs in fused
  pairs: one pass over the tile per two factors.
* ...except for blocks of 16 and more that 4 divides, where a factor's recompute costs more
  than keeping its input: there forward keeps every factor's gathered input, (depth,
  width, batch), and ``_saved_backward_thread_kernel`` reads it (custom_ops.py,
  ``keeps_factor_inputs``).
* Work is split into chunks of whole tiles (chunk c: tiles c, c + nchunks, ...), each with
  its own buffers and partial weight gradient; the partials are summed afterwards in chunk
  order, so results depend on the chunk count (torch's thread count) only. The chunks run as
  a parallel region of torch's own OpenMP team (``ops/runtime/``, through the cfunc
  bodies at the end of this file): numba's ``parallel=True`` runs on a second copy of libgomp
  whose threads, and torch's, spin while the other works, and a Python thread pool fights
  torch's spinning threads the same way (2 threads ran slower than 1; docs/design.md).
* ``fastmath={"contract", "reassoc"}``: contraction lets LLVM emit FMAs and reassociation lets
  it vectorise the weight-gradient sums over the batch tile. Neither flag assumes away NaN,
  infinity or signed zeros; both only change rounding (summation order over the batch, which
  differs from PyTorch's anyway).
* Numba does no bounds checking: the public wrappers validate shapes, dtypes and that every
  row of ``perms`` is a permutation (``permutation_check.py``) before calling here.
"""

from __future__ import annotations

import numba
import numpy as np

from bornsparse.ops.permuted.numba_blocks import FASTMATH, SUB, block_grads, mix_blocks
from bornsparse.ops.runtime.bodies import NoAliasCompiler, claim_chunk, finish_chunk, region_body
from bornsparse.ops.runtime.intrinsics import header_address, prefetch, view
from bornsparse.ops.runtime.region import header_layout
from bornsparse.ops.runtime.transpose import columns_to_rows, rows_to_columns

# Blocks ahead at which the fused pair kernel prefetches its random source rows, and the
# tile-buffer size above which it does (a buffer that fits L2 never misses to DRAM).
PREFETCH_DISTANCE = 16
PREFETCH_MIN_BYTES = 4 << 20


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, pipeline_class=NoAliasCompiler)
def _apply_factor(src, dst, w, p, ts, n_rows, rows):
    """dst[b*k + r, :ts] = Σ_c w[b, r, c] · src[p[b*k + c], :ts] (one factor on one tile).

    Only the blocks holding rows < n_rows are computed (the last factor skips the rows that
    the output slice drops). ``rows``: the identity row map, np.arange(width), which the
    4×4 sub-block kernels take for rows read in order (allocated once per thread kernel).
    """
    k = w.shape[1]
    nb = (n_rows + k - 1) // k
    if k == 2:
        # each pair of source rows is read once and feeds both outputs of its block
        for b in range(nb):
            a0 = src[p[2 * b]]
            a1 = src[p[2 * b + 1]]
            d0 = dst[2 * b]
            d1 = dst[2 * b + 1]
            w00 = w[b, 0, 0]
            w01 = w[b, 0, 1]
            w10 = w[b, 1, 0]
            w11 = w[b, 1, 1]
            for s in range(ts):
                u = a0[s]
                v = a1[s]
                d0[s] = w00 * u + w01 * v
                d1[s] = w10 * u + w11 * v
    elif k % SUB == 0:
        mix_blocks(src, p, dst, rows, w, False, nb, 0, ts)
    else:
        for b in range(nb):
            for r in range(k):
                d = dst[b * k + r]
                a = src[p[b * k]]
                wc = w[b, r, 0]
                for s in range(ts):
                    d[s] = wc * a[s]
                for c in range(1, k):
                    a = src[p[b * k + c]]
                    wc = w[b, r, c]
                    for s in range(ts):
                        d[s] += wc * a[s]


@numba.njit(cache=True, nogil=True, inline="always")
def _prefetch_pair2(p1, p2, b, nb, pfd, base, rb, p1base):
    """Prefetch the four source rows block b + pfd of a fused pair reads, and the p1 entries
    block b + 2·pfd will look up (p2 itself is read in order: the hardware prefetches it)."""
    f = b + pfd
    if f < nb:
        for jj in (p2[2 * f], p2[2 * f + 1]):
            q = 2 * (jj // 2)
            prefetch(base + p1[q] * rb)
            prefetch(base + p1[q + 1] * rb)
    f2 = b + 2 * pfd
    if f2 < nb:
        prefetch(p1base + 8 * 2 * (p2[2 * f2] // 2))
        prefetch(p1base + 8 * 2 * (p2[2 * f2 + 1] // 2))


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, pipeline_class=NoAliasCompiler)
def _apply_factor_pair2(src, dst, w1, p1, w2, p2, ts, n_rows, pfd):
    """Two consecutive k = 2 factors in one pass: dst = F2(F1(src)), rows < n_rows.

    ``pfd`` > 0 prefetches what block b + pfd reads (and, at b + 2·pfd, the entries of p1
    that lead there): at widths whose tile buffers leave the cache every source row is a
    DRAM miss at a random address, reached through a second random read of p1.

    Each row of the intermediate is used by exactly one block of the second factor, so it is
    computed on demand, in registers, exactly once: no arithmetic is repeated and the
    intermediate never goes through memory (four source rows read and two rows written per
    output block, instead of four and four). Measured: 1.7x faster than two single factors
    in isolation, but only ~6% on the whole forward kernel (1.81 vs 1.93 ms, batch 256,
    depth 20, one thread).
    """
    nb = (n_rows + 1) // 2
    if pfd:
        base, rb = src.ctypes.data, src.strides[0]
        p1base = p1.ctypes.data
    for b in range(nb):
        if pfd:
            _prefetch_pair2(p1, p2, b, nb, pfd, base, rb, p1base)
        j0 = p2[2 * b]
        j1 = p2[2 * b + 1]
        b0 = j0 // 2
        r0 = j0 - 2 * b0
        b1 = j1 // 2
        r1 = j1 - 2 * b1
        a0 = src[p1[2 * b0]]
        a1 = src[p1[2 * b0 + 1]]
        c0 = src[p1[2 * b1]]
        c1 = src[p1[2 * b1 + 1]]
        u0 = w1[b0, r0, 0]
        u1 = w1[b0, r0, 1]
        v0 = w1[b1, r1, 0]
        v1 = w1[b1, r1, 1]
        w00 = w2[b, 0, 0]
        w01 = w2[b, 0, 1]
        w10 = w2[b, 1, 0]
        w11 = w2[b, 1, 1]
        d0 = dst[2 * b]
        d1 = dst[2 * b + 1]
        for s in range(ts):
            y = u0 * a0[s] + u1 * a1[s]
            z = v0 * c0[s] + v1 * c1[s]
            d0[s] = w00 * y + w01 * z
            d1[s] = w10 * y + w11 * z


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, pipeline_class=NoAliasCompiler)
def _factor_backward(gathered, g, gin, w, p, gw, ts, rows):
    """One factor's backward on one tile.

    gathered: the factor's input in gathered order, row j = input row p[j] (width, tile);
    g: gradient w.r.t. its output. Writes gin[p[b*k + c]] = Σ_r w[b, r, c] · g[b*k + r]
    (every row once, as p is a permutation) and adds
    gw[b, r, c] += Σ_s g[b*k + r, s] · gathered[b*k + c, s].
    """
    nb = w.shape[0]
    k = w.shape[1]
    # a literal 0.0 would make the accumulators float64 and the float32 loops convert
    zero = gw.dtype.type(0)
    if k == 2:
        for b in range(nb):
            i0 = p[2 * b]
            i1 = p[2 * b + 1]
            a0 = gathered[2 * b]
            a1 = gathered[2 * b + 1]
            g0 = g[2 * b]
            g1 = g[2 * b + 1]
            e0 = gin[i0]
            e1 = gin[i1]
            w00 = w[b, 0, 0]
            w01 = w[b, 0, 1]
            w10 = w[b, 1, 0]
            w11 = w[b, 1, 1]
            c00 = zero
            c01 = zero
            c10 = zero
            c11 = zero
            for s in range(ts):
                u = a0[s]
                v = a1[s]
                y0 = g0[s]
                y1 = g1[s]
                c00 += y0 * u
                c01 += y0 * v
                c10 += y1 * u
                c11 += y1 * v
                e0[s] = w00 * y0 + w10 * y1
                e1[s] = w01 * y0 + w11 * y1
            gw[b, 0, 0] += c00
            gw[b, 0, 1] += c01
            gw[b, 1, 0] += c10
            gw[b, 1, 1] += c11
    elif k % SUB == 0:
        mix_blocks(g, rows, gin, p, w, True, nb, 0, ts)
        block_grads(g, rows, 0, gathered, rows, 0, gw, nb, ts)
    else:
        for b in range(nb):
            for c in range(k):
                a = gathered[b * k + c]
                e = gin[p[b * k + c]]
                y = g[b * k]
                wc = w[b, 0, c]
                for s in range(ts):
                    e[s] = wc * y[s]
                for r in range(1, k):
                    y = g[b * k + r]
                    wc = w[b, r, c]
                    for s in range(ts):
                        e[s] += wc * y[s]
                for r in range(k):
                    y = g[b * k + r]
                    acc = zero
                    for s in range(ts):
                        acc += y[s] * a[s]
                    gw[b, r, c] += acc


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _forward_thread_kernel(x, weight, perms, out, saved, buf_in, buf_a, buf_b, tile, th,
                           nthreads):
    """Forward of tiles th, th + nthreads, ... of x (batch, n_in) into out (batch, n_out).
    buf_in, buf_a, buf_b (width, tile): this chunk's scratch (runtime/workspace.py),
    contents undefined on entry.

    With a non-empty ``saved`` (depth, width, batch), every factor's input is also kept
    there in gathered order (saved[t, j, s] = input row perms[t, j] of sample s), for a
    backward without recompute (``_saved_backward_thread_kernel``; only for the block
    sizes of custom_ops.keeps_factor_inputs).
    """
    batch = x.shape[0]
    depth = weight.shape[0]
    width = perms.shape[1]
    n_out = out.shape[1]
    k = weight.shape[2]
    ntiles = (batch + tile - 1) // tile
    # the input tile has its own buffer, so its padded rows are zeroed once per call
    buf_in[x.shape[1]:] = 0
    rows = np.arange(width)  # the identity row map of the 4×4 sub-block kernels
    # prefetch only where a tile buffer leaves L2: inside it, the hints are pure overhead
    pfd = PREFETCH_DISTANCE if width * tile * x.itemsize > PREFETCH_MIN_BYTES else 0
    for it in range(th, ntiles, nthreads):
        s0 = it * tile
        ts = min(tile, batch - s0)
        rows_to_columns(x, s0, buf_in, 0, ts)
        src, dst = buf_in, buf_a
        t = 0
        while t < depth:
            if k == 2 and t + 1 < depth:
                n_rows = n_out if t + 2 == depth else width
                _apply_factor_pair2(src, dst, weight[t], perms[t], weight[t + 1], perms[t + 1],
                                    ts, n_rows, pfd)
                t += 2
            else:
                if saved.shape[0]:
                    _gather_rows(src, perms[t], saved[t], s0, ts)
                n_rows = n_out if t + 1 == depth else width
                _apply_factor(src, dst, weight[t], perms[t], ts, n_rows, rows)
                t += 1
            src, dst = dst, (buf_b if dst is buf_a else buf_a)
        columns_to_rows(src, 0, out, s0, ts, False)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, pipeline_class=NoAliasCompiler)
def _gather_rows(src, p, gathered, s0, ts):
    """gathered[j, s0:s0 + ts] = src[p[j], :ts]."""
    for j in range(p.shape[0]):
        a = src[p[j]]
        q = gathered[j, s0:s0 + ts]
        for s in range(ts):
            q[s] = a[s]


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _saved_backward_thread_kernel(weight, perms, saved, grad_out, grad_x, gw, g_out, buf_a,
                                  buf_b, tile, th, nthreads):
    """Backward of tiles th, th + nthreads, ... from the factors' inputs kept in forward
    (``saved``, (depth, width, batch), gathered order), 4 | k: no recompute; writes the
    tiles' rows of grad_x and sets gw (their weight gradient). g_out, buf_a, buf_b (width,
    tile): this chunk's scratch, contents undefined on entry."""
    batch = grad_out.shape[0]
    depth = weight.shape[0]
    nb = weight.shape[1]
    width = perms.shape[1]
    ntiles = (batch + tile - 1) // tile
    rows = np.arange(width)
    g_out[grad_out.shape[1]:] = 0  # padded rows stay zero
    gw[:] = 0.0
    for it in range(th, ntiles, nthreads):
        s0 = it * tile
        ts = min(tile, batch - s0)
        rows_to_columns(grad_out, s0, g_out, 0, ts)
        g, gin = g_out, buf_a
        for t in range(depth - 1, -1, -1):
            mix_blocks(g, rows, gin, perms[t], weight[t], True, nb, 0, ts)
            block_grads(g, rows, 0, saved[t], rows, s0, gw[t], nb, ts)
            g, gin = gin, (buf_b if gin is buf_a else buf_a)
        columns_to_rows(g, 0, grad_x, s0, ts, False)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, pipeline_class=NoAliasCompiler)
def _pair_backward2(prev, w1, p1, w2, q2, g, gin, gw1, gw2, ts):
    """Backward of two consecutive k = 2 factors (F2 after F1) in one pass over the tile.

    prev: F1's saved gathered input (row j = input row p1[j]); q2: the inverse of F2's
    permutation (row i of F1's output is F2's gathered input row q2[i]); g: gradient w.r.t.
    F2's output. Writes gin (gradient w.r.t. F1's input, every row once) and adds both
    factors' weight gradients.

    The loop runs over F1's blocks, the mirror of _apply_factor_pair2: F1's two output rows
    (F2's inputs) are rebuilt in registers from the two saved rows, their gradients are
    formed on demand from the two g rows of the F2 block that reads each, and F1's input
    gradient rows are then complete, so they are written once with no read-modify-write.
    Per pair: the saved rows are read once, g twice and gin written once (4 row passes for
    two factors, instead of 7 for the two one-factor passes).
    """
    nb = w1.shape[0]
    zero = gw1.dtype.type(0)
    for b in range(nb):
        qa = q2[2 * b]
        qb = q2[2 * b + 1]
        ba = qa // 2
        ca = qa - 2 * ba
        bb = qb // 2
        cb = qb - 2 * bb
        a0 = prev[2 * b]
        a1 = prev[2 * b + 1]
        ga0 = g[2 * ba]
        ga1 = g[2 * ba + 1]
        gb0 = g[2 * bb]
        gb1 = g[2 * bb + 1]
        e0 = gin[p1[2 * b]]
        e1 = gin[p1[2 * b + 1]]
        x00 = w1[b, 0, 0]
        x01 = w1[b, 0, 1]
        x10 = w1[b, 1, 0]
        x11 = w1[b, 1, 1]
        ma0 = w2[ba, 0, ca]
        ma1 = w2[ba, 1, ca]
        mb0 = w2[bb, 0, cb]
        mb1 = w2[bb, 1, cb]
        da0 = zero
        da1 = zero
        db0 = zero
        db1 = zero
        c00 = zero
        c01 = zero
        c10 = zero
        c11 = zero
        for s in range(ts):
            u = a0[s]
            v = a1[s]
            h0 = x00 * u + x01 * v
            h1 = x10 * u + x11 * v
            y0 = ga0[s]
            y1 = ga1[s]
            z0 = gb0[s]
            z1 = gb1[s]
            da0 += y0 * h0
            da1 += y1 * h0
            db0 += z0 * h1
            db1 += z1 * h1
            f0 = ma0 * y0 + ma1 * y1
            f1 = mb0 * z0 + mb1 * z1
            c00 += f0 * u
            c01 += f0 * v
            c10 += f1 * u
            c11 += f1 * v
            e0[s] = x00 * f0 + x10 * f1
            e1[s] = x01 * f0 + x11 * f1
        gw2[ba, 0, ca] += da0
        gw2[ba, 1, ca] += da1
        gw2[bb, 0, cb] += db0
        gw2[bb, 1, cb] += db1
        gw1[b, 0, 0] += c00
        gw1[b, 0, 1] += c01
        gw1[b, 1, 0] += c10
        gw1[b, 1, 1] += c11


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _backward_thread_kernel(x, weight, perms, inv, grad_out, grad_x, gw, gathered, buf_in,
                            g_out, buf_a, buf_b, tile, th, nthreads):
    """Backward of tiles th, th + nthreads, ...: writes their rows of grad_x, sets gw (the
    weight gradient summed over those tiles). inv (depth, width): for k = 2 the inverse
    permutations, inv[t, perms[t, j]] = j (each factor's output row -> the position where
    the next factor reads it; read only there). gathered (nsaved, width, tile) and buf_in,
    g_out, buf_a, buf_b (width, tile): this chunk's scratch, contents undefined on entry.

    The forward of each tile is recomputed, saving factors' gathered inputs into a per-thread
    scratch; then the factors are walked backwards. For k = 2 only every other factor's input
    is saved ((depth + 1) // 2 slabs of (width, tile)), the forward runs in fused pairs and
    so does the backward (_pair_backward2 rebuilds the unsaved inputs on demand); with odd
    depth the last factor is done alone. Other block sizes save every factor's input.
    (Checkpointing every √depth factors keeps the scratch in L2 but costs one more forward
    pass; measured slower, see docs/design.md.)
    """
    batch = x.shape[0]
    depth = weight.shape[0]
    width = perms.shape[1]
    k = weight.shape[2]
    paired = k == 2
    ntiles = (batch + tile - 1) // tile
    buf_in[x.shape[1]:] = 0  # padded rows stay zero across tiles
    rows = np.arange(width)  # the identity row map of the 4×4 sub-block kernels
    g_out[grad_out.shape[1]:] = 0  # likewise for the output gradient
    gw[:] = 0.0
    pfd = PREFETCH_DISTANCE if width * tile * x.itemsize > PREFETCH_MIN_BYTES else 0
    for it in range(th, ntiles, nthreads):
        s0 = it * tile
        ts = min(tile, batch - s0)
        rows_to_columns(x, s0, buf_in, 0, ts)
        src, dst = buf_in, buf_a
        if paired:
            for t in range(0, depth, 2):
                _gather_rows(src, perms[t], gathered[t // 2], 0, ts)
                if t + 2 < depth:  # the next pair needs this pair's output
                    _apply_factor_pair2(src, dst, weight[t], perms[t], weight[t + 1],
                                        perms[t + 1], ts, width, pfd)
                    src, dst = dst, (buf_b if dst is buf_a else buf_a)
        else:
            for t in range(depth):
                # each factor's input saved in the order it is read, then the factor run
                # from that copy (identity rows): backward streams the depth-sized scratch
                # sequentially and every random access stays in the L2-sized tile buffers
                _gather_rows(src, perms[t], gathered[t], 0, ts)
                if t < depth - 1:  # the last factor's output is not needed
                    _apply_factor(gathered[t], dst, weight[t], rows, ts, width, rows)
                src, dst = dst, (buf_b if dst is buf_a else buf_a)
        rows_to_columns(grad_out, s0, g_out, 0, ts)
        g, gin = g_out, buf_a
        t = depth - 1
        while t >= 0:
            if paired and t % 2 == 1:
                _pair_backward2(gathered[t // 2], weight[t - 1], perms[t - 1], weight[t],
                                inv[t], g, gin, gw[t - 1], gw[t], ts)
                t -= 2
            else:
                _factor_backward(gathered[t // 2 if paired else t], g, gin, weight[t],
                                 perms[t], gw[t], ts, rows)
                t -= 1
            g, gin = gin, (buf_b if gin is buf_a else buf_a)
        columns_to_rows(g, 0, grad_x, s0, ts, False)


# ---------------------------------------------------------------------------------------
# One factor on the transposed layout, for PermutedTanhNetwork: there a bias and tanh (done
# in torch) sit between factors, so nothing is gained by keeping a tile across factors, but
# keeping the activations as (width, batch) spares two transposes per factor.


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, pipeline_class=NoAliasCompiler)
def _factor_columns_kernel(h, w, p, z, c0, c1):
    """z[b*k + r, c0:c1] = Σ_c w[b, r, c] · h[p[b*k + c], c0:c1]; h, z: (width, batch)."""
    nb = w.shape[0]
    k = w.shape[1]
    n = c1 - c0  # rows are sliced to the columns: see numba_blocks.py on range(c0, c1)
    if k == 2:
        for b in range(nb):
            a0 = h[p[2 * b], c0:c1]
            a1 = h[p[2 * b + 1], c0:c1]
            d0 = z[2 * b, c0:c1]
            d1 = z[2 * b + 1, c0:c1]
            w00 = w[b, 0, 0]
            w01 = w[b, 0, 1]
            w10 = w[b, 1, 0]
            w11 = w[b, 1, 1]
            for s in range(n):
                u = a0[s]
                v = a1[s]
                d0[s] = w00 * u + w01 * v
                d1[s] = w10 * u + w11 * v
    elif k % SUB == 0:
        mix_blocks(h, p, z, np.arange(nb * k), w, False, nb, c0, c1)
    else:
        for b in range(nb):
            for r in range(k):
                d = z[b * k + r, c0:c1]
                a = h[p[b * k], c0:c1]
                wc = w[b, r, 0]
                for s in range(n):
                    d[s] = wc * a[s]
                for c in range(1, k):
                    a = h[p[b * k + c], c0:c1]
                    wc = w[b, r, c]
                    for s in range(n):
                        d[s] += wc * a[s]


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, pipeline_class=NoAliasCompiler)
def _factor_columns_backward_kernel(h, w, p, gz, gh, gw, c0, c1):
    """Backward of _factor_columns_kernel on columns [c0, c1): writes gh there, and sets gw
    (nb, k, k) to Σ over those columns of gz[b*k + r] · h[p[b*k + c]]."""
    nb = w.shape[0]
    k = w.shape[1]
    n = c1 - c0  # rows are sliced to the columns: see numba_blocks.py on range(c0, c1)
    zero = gw.dtype.type(0)
    if k == 2:
        for b in range(nb):
            i0 = p[2 * b]
            i1 = p[2 * b + 1]
            a0 = h[i0, c0:c1]
            a1 = h[i1, c0:c1]
            g0 = gz[2 * b, c0:c1]
            g1 = gz[2 * b + 1, c0:c1]
            e0 = gh[i0, c0:c1]
            e1 = gh[i1, c0:c1]
            w00 = w[b, 0, 0]
            w01 = w[b, 0, 1]
            w10 = w[b, 1, 0]
            w11 = w[b, 1, 1]
            q00 = zero
            q01 = zero
            q10 = zero
            q11 = zero
            for s in range(n):
                u = a0[s]
                v = a1[s]
                y0 = g0[s]
                y1 = g1[s]
                q00 += y0 * u
                q01 += y0 * v
                q10 += y1 * u
                q11 += y1 * v
                e0[s] = w00 * y0 + w10 * y1
                e1[s] = w01 * y0 + w11 * y1
            gw[b, 0, 0] = q00
            gw[b, 0, 1] = q01
            gw[b, 1, 0] = q10
            gw[b, 1, 1] = q11
        return
    if k % SUB == 0:
        rows = np.arange(nb * k)
        mix_blocks(gz, rows, gh, p, w, True, nb, c0, c1)
        gw[:] = zero
        block_grads(gz, rows, c0, h, p, c0, gw, nb, n)
        return
    for b in range(nb):
        for c in range(k):
            ic = p[b * k + c]
            a = h[ic, c0:c1]
            e = gh[ic, c0:c1]
            y = gz[b * k, c0:c1]
            wc = w[b, 0, c]
            for s in range(n):
                e[s] = wc * y[s]
            for r in range(1, k):
                y = gz[b * k + r, c0:c1]
                wc = w[b, r, c]
                for s in range(n):
                    e[s] += wc * y[s]
            for r in range(k):
                y = gz[b * k + r, c0:c1]
                acc = zero
                for s in range(n):
                    acc += y[s] * a[s]
                gw[b, r, c] = acc


# ---------------------------------------------------------------------------------------
# Parallel-region bodies for ops/runtime/region.py: each reads its header by the named slots of
# its layout (slot ``code``: 0 float32, 1 float64; custom_ops.py fills them by name) and
# runs the kernel above on every chunk its thread claims. Chunk c of the batch kernels is
# "tiles c, c + nchunks, ...", so results are the same whichever thread runs which chunk.

_I64 = np.empty(0, np.int64)
ForwardSlot = header_layout(
    "PermutedForwardSlot",
    "batch n_in depth nb k width n_out tile x weight perms out saved work")
BackwardSlot = header_layout(
    "PermutedBackwardSlot",
    "batch n_in depth nb k width n_out tile slabs x weight perms inv grad_out grad_x partial "
    "saved work")
#: (width, tile) slabs of scratch (``work``) a chunk of the forward kernel takes
FORWARD_SLABS = 3


def backward_slabs(depth: int, k: int, saved: bool) -> int:
    """(width, tile) slabs of scratch a chunk of the backward kernels takes: three reading
    kept inputs, else the recomputed factors' inputs (every other one for k = 2) and four
    tile buffers."""
    if saved:
        return 3
    return ((depth + 1) // 2 if k == 2 else depth) + 4


FactorColumnsSlot = header_layout(
    "FactorColumnsSlot", "width batch nb k step h weight perm z")
FactorColumnsBackwardSlot = header_layout(
    "FactorColumnsBackwardSlot", "width batch nb k step h weight perm grad_z grad_h partial")


@numba.njit(cache=True, nogil=True)
def _forward_chunks(a, like):
    S = ForwardSlot
    hp = header_address(a)
    nchunks, batch, n_in, depth, nb, k, width, n_out, tile = (
        a[S.nchunks], a[S.batch], a[S.n_in], a[S.depth], a[S.nb], a[S.k], a[S.width],
        a[S.n_out], a[S.tile])
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        # no saved inputs: a zero-depth view (any valid address)
        saved = view(a[S.saved] if a[S.saved] else a[S.x],
                     (depth if a[S.saved] else 0, width, batch), like)
        work = view(a[S.work], (nchunks, 3, width, tile), like)[c]
        _forward_thread_kernel(
            view(a[S.x], (batch, n_in), like), view(a[S.weight], (depth, nb, k, k), like),
            view(a[S.perms], (depth, width), _I64), view(a[S.out], (batch, n_out), like),
            saved, work[0], work[1], work[2], tile, c, nchunks)
        finish_chunk(hp)


@numba.njit(cache=True, nogil=True)
def _backward_chunks(a, like):
    S = BackwardSlot
    hp = header_address(a)
    nchunks, batch, n_in, depth, nb, k, width, n_out, tile, slabs = (
        a[S.nchunks], a[S.batch], a[S.n_in], a[S.depth], a[S.nb], a[S.k], a[S.width],
        a[S.n_out], a[S.tile], a[S.slabs])
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        work = view(a[S.work], (nchunks, slabs, width, tile), like)[c]
        weight = view(a[S.weight], (depth, nb, k, k), like)
        perms = view(a[S.perms], (depth, width), _I64)
        grad_out = view(a[S.grad_out], (batch, n_out), like)
        grad_x = view(a[S.grad_x], (batch, n_in), like)
        partial = view(a[S.partial], (nchunks, depth, nb, k, k), like)[c]
        if a[S.saved]:
            _saved_backward_thread_kernel(
                weight, perms, view(a[S.saved], (depth, width, batch), like), grad_out,
                grad_x, partial, work[0], work[1], work[2], tile, c, nchunks)
        else:
            # the recomputed inputs first, then the four tile buffers (backward_slabs)
            n = slabs - 4
            _backward_thread_kernel(view(a[S.x], (batch, n_in), like), weight, perms,
                                    view(a[S.inv], (depth, width), _I64), grad_out, grad_x,
                                    partial, work[:n], work[n],
                                    work[n + 1], work[n + 2], work[n + 3], tile, c, nchunks)
        finish_chunk(hp)


@numba.njit(cache=True, nogil=True)
def _factor_columns_chunks(a, like):
    S = FactorColumnsSlot
    hp = header_address(a)
    nchunks, width, batch, nb, k, step = (
        a[S.nchunks], a[S.width], a[S.batch], a[S.nb], a[S.k], a[S.step])
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        _factor_columns_kernel(
            view(a[S.h], (width, batch), like), view(a[S.weight], (nb, k, k), like),
            view(a[S.perm], (width,), _I64), view(a[S.z], (width, batch), like),
            c * step, min((c + 1) * step, batch))
        finish_chunk(hp)


@numba.njit(cache=True, nogil=True)
def _factor_columns_backward_chunks(a, like):
    S = FactorColumnsBackwardSlot
    hp = header_address(a)
    nchunks, width, batch, nb, k, step = (
        a[S.nchunks], a[S.width], a[S.batch], a[S.nb], a[S.k], a[S.step])
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        _factor_columns_backward_kernel(
            view(a[S.h], (width, batch), like), view(a[S.weight], (nb, k, k), like),
            view(a[S.perm], (width,), _I64), view(a[S.grad_z], (width, batch), like),
            view(a[S.grad_h], (width, batch), like),
            view(a[S.partial], (nchunks, nb, k, k), like)[c],
            c * step, min((c + 1) * step, batch))
        finish_chunk(hp)


_forward_body = region_body(_forward_chunks, ForwardSlot)
_backward_body = region_body(_backward_chunks, BackwardSlot)
_factor_columns_body = region_body(_factor_columns_chunks, FactorColumnsSlot)
_factor_columns_backward_body = region_body(_factor_columns_backward_chunks,
                                            FactorColumnsBackwardSlot)
