"""Numba kernels fusing the DCT's twiddle with its output reordering; see transform.py.

In plain torch the twiddle is a broadcast complex multiply, then a conjugation and a gather:
three passes over the spectrum, each as slow as the FFT itself on CPU. Here each is one
pass, parallel over rows.

Each kernel is a function of a range of rows (or of _TILE-sample tiles), run over chunks of
the batch as a parallel region of torch's own OpenMP team (ops/runtime/region.py): the
Python-callable ``*_kernel`` functions at the end build the int64 header (named slots:
``code`` 0 float32, 1 float64; then sizes, α as float64 bits, data pointers) and launch the cfunc
body. Numba's ``parallel=True`` would start a second OpenMP runtime whose threads, and
torch's, spin while the other works (docs/design.md). Every row is computed the same way
whichever chunk holds it, so results depend neither on the chunking nor on the threads.
Below _MIN_ELEMENTS elements, or with one torch thread, a pass runs as one chunk on the
calling thread (its chunk function called directly). α is rounded to the arrays' dtype, so
float32 passes stay float32 throughout.
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
from bornsparse.ops.runtime.region import float_slot, header_layout, launch, pack_header
from bornsparse.ops.runtime.transpose import columns_to_rows, rows_to_columns

_I64 = np.empty(0, np.int64)
_JIT = dict(cache=True, nogil=True, fastmath=True, pipeline_class=NoAliasCompiler)
# Below this many elements a pass runs as one chunk on the calling thread. Lower than the
# sparse products' PARALLEL_MIN_WORK (multiply-adds): an element here costs several of those
# (a strided or transposed load and store), and torch's team, still spinning after the FFT
# just before, starts a region in a few µs.
_MIN_ELEMENTS = 1 << 14


# ---- one row: the loops every pass shares ----------------------------------------------
# Spectra (..., N//2 + 1, 2) and twiddles (N//2 + 1, 2) are read through flat views (re, im,
# re, ...): indexed (k, 0) and (k, 1) the same loops measured 1.35–1.7× slower. Makhoul's
# reorder and unorder are computed in closed form as one loop over the (even, odd) pairs
# that reads or writes the batch-major row in order: one strided loop per half measured
# 2–3× slower (a (128, 4096) float32 block, one thread, AMD EPYC Zen 4). Where the layer is
# square or narrows to at most n//2 + 1 outputs the loops are branch-free (truncation and
# padding move their bounds); between those, one pass testing each element beat split
# loops.


@numba.njit(**_JIT, inline="always")
def _take_row(sb, wf, n, alpha, ob):
    """ob[k] = α·Re(X_k) for k < min(n//2 + 1, m), ob[j] = -α·Im(X_{n-j}) for
    n//2 + 1 <= j < m (m = len(ob) <= n), X_k = spec[k]·w[k]; sb, wf flat."""
    m = ob.shape[0]
    half = sb.shape[0] // 2
    if m == n:
        for k in range(half):
            ob[k] = alpha * (sb[2 * k] * wf[2 * k] - sb[2 * k + 1] * wf[2 * k + 1])
        # bounded by n, not m: with m (equal here) LLVM left this loop 3× slower
        for j in range(half, n):
            k = n - j
            ob[j] = -alpha * (sb[2 * k] * wf[2 * k + 1] + sb[2 * k + 1] * wf[2 * k])
    elif m <= half:
        for k in range(m):
            ob[k] = alpha * (sb[2 * k] * wf[2 * k] - sb[2 * k + 1] * wf[2 * k + 1])
    else:
        # half < m < n: a split loop over [half, m) ran slower than this one pass, each k
        # writing ob[k] and, where it falls below m, ob[n-k]
        for k in range(half):
            a = sb[2 * k]
            c = sb[2 * k + 1]
            ob[k] = alpha * (a * wf[2 * k] - c * wf[2 * k + 1])
            j = n - k
            if 0 < k and j >= half and j < m:
                ob[j] = -alpha * (a * wf[2 * k + 1] + c * wf[2 * k])


@numba.njit(**_JIT, inline="always")
def _untake_row(gb, n, wf, sb):
    """sb[j] = (c[j] - i·c[n-j])·w_inv[j] for j <= n/2 (flat), c = gb zero-padded from
    m = len(gb) <= n to length n (c[n] = 0)."""
    m = gb.shape[0]
    half = sb.shape[0] // 2
    zero = sb.dtype.type(0)
    a = gb[0] if m > 0 else zero
    sb[0] = a * wf[0]
    sb[1] = a * wf[1]
    if m == n:  # no padding: one pass
        for j in range(1, half):
            a = gb[j]
            c = -gb[n - j]
            sb[2 * j] = a * wf[2 * j] - c * wf[2 * j + 1]
            sb[2 * j + 1] = a * wf[2 * j + 1] + c * wf[2 * j]
        return
    if m >= half:  # every c[j] term there, some c[n-j]: one pass (a split one ran slower)
        for j in range(1, half):
            a = gb[j]
            c = -gb[n - j] if n - j < m else zero
            sb[2 * j] = a * wf[2 * j] - c * wf[2 * j + 1]
            sb[2 * j + 1] = a * wf[2 * j + 1] + c * wf[2 * j]
        return
    # m < half: the c[j] terms where j < m, zeros past them; no c[n-j] term is in range
    # (n - j >= n - n//2 >= m for every j < half)
    for j in range(1, m):
        a = gb[j]
        sb[2 * j] = a * wf[2 * j]
        sb[2 * j + 1] = a * wf[2 * j + 1]
    for j in range(max(1, m), half):
        sb[2 * j] = zero
        sb[2 * j + 1] = zero


@numba.njit(**_JIT, inline="always")
def _reorder_row(xb, vb):
    """vb[p] = xp[2p], vb[q-1-p] = xp[2p+1] (Makhoul's reorder, q = len(vb)), xp = xb
    zero-padded to q."""
    n = xb.shape[0]
    q = vb.shape[0]
    h = n // 2
    for p in range(h):
        vb[p] = xb[2 * p]
        vb[q - 1 - p] = xb[2 * p + 1]
    if n % 2:
        vb[h] = xb[n - 1]
    for p in range((n + 1) // 2, (q + 1) // 2):
        vb[p] = 0
    for p in range(h, q // 2):
        vb[q - 1 - p] = 0


@numba.njit(**_JIT, inline="always")
def _unorder_scale_dot_row(vb, xb, alpha, gb):
    """gb[i] = α·u[i] for i < d = len(xb), u[2p] = vb[p], u[2p+1] = vb[q-1-p] (Makhoul's
    unorder, q = len(vb)); returns ⟨u[:d], xb⟩."""
    d = xb.shape[0]
    q = vb.shape[0]
    acc = gb.dtype.type(0)  # a literal 0.0 would make a float32 accumulator float64
    h = d // 2
    for p in range(h):
        u = vb[p]
        u1 = vb[q - 1 - p]
        gb[2 * p] = alpha * u
        gb[2 * p + 1] = alpha * u1
        acc += u * xb[2 * p] + u1 * xb[2 * p + 1]
    if d % 2:
        u = vb[h]
        gb[2 * h] = alpha * u
        acc += u * xb[2 * h]
    return acc


# ---- the work of one chunk: rows b0 <= b < b1 (or tiles t0 <= ti < t1) -----------------


@numba.njit(**_JIT)
def _twiddle_take_rows(spec, w, out, b0, b1):
    """out[b, k] = Re(spec[b,k]·w[k]) for k <= N/2, out[b, N-k] = -Im(spec[b,k]·w[k]).

    spec: (B, N//2 + 1, 2) interleaved rfft output; w: (N//2 + 1, 2); out: (B, N).
    """
    n = out.shape[1]
    half = spec.shape[1]
    wf = w.reshape(2 * half)
    one = out.dtype.type(1)
    for b in range(b0, b1):
        _take_row(spec[b].reshape(2 * half), wf, n, one, out[b])


@numba.njit(**_JIT)
def _untake_twiddle_rows(coef, w_inv, spec, b0, b1):
    """spec[b, j] = (coef[b, j] - i·coef[b, N-j])·w_inv[j], coef[b, N] = 0; j <= N/2.

    coef: (B, N); w_inv: (N//2 + 1, 2); spec: (B, N//2 + 1, 2) interleaved.
    """
    n = coef.shape[1]
    half = spec.shape[1]
    wf = w_inv.reshape(2 * half)
    for b in range(b0, b1):
        _untake_row(coef[b], n, wf, spec[b].reshape(2 * half))


@numba.njit(**_JIT)
def _affine_take_rows(spec, w, n, alpha, y, bias, out, b0, b1):
    """out[b, k] = y[b, k] + α·X[b, k] + bias[k] for k < m = out.shape[1].

    X is the length-n DCT whose reordered rfft is spec (B, n//2 + 1, 2); ``bias`` has
    length 0 for none. Fuses the twiddle, the output gather, the truncation to m, α, the
    bias and the sum with the sparse part: one pass instead of five.
    """
    m = out.shape[1]
    half = spec.shape[1]
    has_bias = bias.shape[0] > 0
    wf = w.reshape(2 * half)
    for b in range(b0, b1):
        ob = out[b]
        yb = y[b]
        _take_row(spec[b].reshape(2 * half), wf, n, alpha, ob)
        if has_bias:
            for k in range(m):
                ob[k] += yb[k] + bias[k]
        else:
            for k in range(m):
                ob[k] += yb[k]


@numba.njit(**_JIT)
def _padded_untake_rows(g, n, w_inv, spec, b0, b1):
    """As _untake_twiddle_rows for coefficients g (B, m) zero-padded to length n >= m."""
    half = spec.shape[1]
    wf = w_inv.reshape(2 * half)
    for b in range(b0, b1):
        _untake_row(g[b], n, wf, spec[b].reshape(2 * half))


@numba.njit(**_JIT)
def _gather_scale_dot_rows(v, unorder, x, alpha, gx, dots, b0, b1):
    """u = v[:, unorder][:, :d]; gx = α·u; dots[b] = ⟨u[b], x[b]⟩ (d = x.shape[1]).

    The backward of α·T(x): u = Tᵀ(grad) gives both grad_x = α·u and grad_α = Σ ⟨u, x⟩.
    ``unorder`` (Makhoul's, for length q = v.shape[1]) is only documentation here: the loop
    computes it in closed form.
    """
    for b in range(b0, b1):
        dots[b] = _unorder_scale_dot_row(v[b], x[b], alpha, gx[b])


# ---- DCT plus sparse, fused (plus_sparse.py: dct_sparse_affine) ----------------------
# The sparse kernels (sparse/numba_matmul.py) want activations transposed, (features, batch). A
# separate transpose costs as much as the FFT, so each transpose rides along a pass that
# reads or writes the same array anyway. These passes walk tiles of _TILE samples: within a
# tile one feature of every sample is one contiguous run of the transposed array (a cache
# line for float32), and the tile's rows of the batch-major arrays stay in L2. Chunks are
# runs of whole tiles.
_TILE = 16


@numba.njit(**_JIT)
def _reorder_transpose_tiles(x, v, x_t, t0, t1):
    """v[b, i] = xp[b, reorder[i]] with xp = x zero-padded to q = v.shape[1]; x_t = xᵀ.

    x: (B, n); v: (B, q); x_t: (n, B). Makhoul's permutation ``reorder`` for length q
    (transform.py) is computed in closed form.
    """
    nb = x.shape[0]
    for ti in range(t0, t1):
        b0 = ti * _TILE
        b1 = min(nb, b0 + _TILE)
        for b in range(b0, b1):
            _reorder_row(x[b], v[b])
        rows_to_columns(x, b0, x_t, b0, b1 - b0)


@numba.njit(**_JIT)
def _affine_take_t_tiles(spec, w, n, alpha, y_t, bias, out, t0, t1):
    """As _affine_take_rows, but the sparse part comes transposed: y_t (m, B)."""
    nb, m = out.shape
    half = spec.shape[1]
    has_bias = bias.shape[0] > 0
    wf = w.reshape(2 * half)
    for ti in range(t0, t1):
        b0 = ti * _TILE
        b1 = min(nb, b0 + _TILE)
        for b in range(b0, b1):
            ob = out[b]
            _take_row(spec[b].reshape(2 * half), wf, n, alpha, ob)
            if has_bias:
                for k in range(m):
                    ob[k] += bias[k]
        columns_to_rows(y_t, b0, out, b0, b1 - b0, True)


@numba.njit(**_JIT)
def _padded_untake_t_tiles(g, n, w_inv, spec, g_t, t0, t1):
    """_padded_untake_rows, and g_t = gᵀ (m, B) when g_t has rows (else skipped)."""
    nb = g.shape[0]
    half = spec.shape[1]
    wf = w_inv.reshape(2 * half)
    for ti in range(t0, t1):
        b0 = ti * _TILE
        b1 = min(nb, b0 + _TILE)
        for b in range(b0, b1):
            _untake_row(g[b], n, wf, spec[b].reshape(2 * half))
        if g_t.shape[0] > 0:
            rows_to_columns(g, b0, g_t, b0, b1 - b0)


@numba.njit(**_JIT)
def _gather_scale_dot_t_tiles(v, x, alpha, gs_t, gx, dots, t0, t1):
    """_gather_scale_dot_rows, plus gx += gs_tᵀ when gs_t (d, B) has rows (else skipped).

    gs_t is the sparse part's input gradient Sᵀ gᵀ, so gx is the layer's whole grad_x.
    Makhoul's ``unorder`` (length q = v.shape[1]) is computed in closed form.
    """
    nb = x.shape[0]
    for ti in range(t0, t1):
        b0 = ti * _TILE
        b1 = min(nb, b0 + _TILE)
        for b in range(b0, b1):
            dots[b] = _unorder_scale_dot_row(v[b], x[b], alpha, gx[b])
        if gs_t.shape[0] > 0:
            columns_to_rows(gs_t, b0, gx, b0, b1 - b0, True)


# ---- chunk loops: unpack the header, run every chunk this thread claims ----------------
# Headers: one named layout per loop (below), read here and filled by _launch by name: the
# sizes, α (float64 bits) where the kernel has one, and the data pointers, outputs last.


@numba.njit(cache=True, nogil=True, inline="always")
def _alpha(a, slot, like):
    """The float64 in header slot ``slot``, rounded to like's dtype."""
    return like.dtype.type(a.view(np.float64)[slot])


@numba.njit(cache=True, nogil=True, inline="always")
def _span(units, c, nchunks):
    """The units (rows or tiles) [u0, u1) of chunk c: contiguous, sizes differing by <= 1."""
    return units * c // nchunks, units * (c + 1) // nchunks


# The headers (runtime/region.header_layout): sizes, α as float64 bits, then pointers.
TwiddleTakeSlot = header_layout("TwiddleTakeSlot", "nb half n spec w out")
UntakeTwiddleSlot = header_layout("UntakeTwiddleSlot", "nb n half coef w_inv spec")
AffineTakeSlot = header_layout("AffineTakeSlot", "nb half n m nbias alpha spec w y bias out")
PaddedUntakeSlot = header_layout("PaddedUntakeSlot", "nb m n half g w_inv spec")
GatherScaleDotSlot = header_layout("GatherScaleDotSlot", "nb q d alpha v unorder x gx dots")
ReorderTransposeSlot = header_layout("ReorderTransposeSlot", "nb n q x v x_t")
PaddedUntakeTSlot = header_layout("PaddedUntakeTSlot", "nb m n half mt g w_inv spec g_t")
GatherScaleDotTSlot = header_layout("GatherScaleDotTSlot", "nb q d alpha ds v x gs_t gx dots")


@numba.njit(cache=True, nogil=True)
def _twiddle_take_chunks(a, like):
    S = TwiddleTakeSlot
    hp = header_address(a)
    nchunks, nb, half, n = a[S.nchunks], a[S.nb], a[S.half], a[S.n]
    spec = view(a[S.spec], (nb, half, 2), like)
    w = view(a[S.w], (half, 2), like)
    out = view(a[S.out], (nb, n), like)
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        b0, b1 = _span(nb, c, nchunks)
        _twiddle_take_rows(spec, w, out, b0, b1)
        finish_chunk(hp)


@numba.njit(cache=True, nogil=True)
def _untake_twiddle_chunks(a, like):
    S = UntakeTwiddleSlot
    hp = header_address(a)
    nchunks, nb, n, half = a[S.nchunks], a[S.nb], a[S.n], a[S.half]
    coef = view(a[S.coef], (nb, n), like)
    w_inv = view(a[S.w_inv], (half, 2), like)
    spec = view(a[S.spec], (nb, half, 2), like)
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        b0, b1 = _span(nb, c, nchunks)
        _untake_twiddle_rows(coef, w_inv, spec, b0, b1)
        finish_chunk(hp)


@numba.njit(cache=True, nogil=True)
def _affine_take_chunks(a, like):
    S = AffineTakeSlot
    hp = header_address(a)
    nchunks, nb, half, n, m, nbias = a[S.nchunks], a[S.nb], a[S.half], a[S.n], a[S.m], a[S.nbias]
    alpha = _alpha(a, S.alpha, like)
    spec = view(a[S.spec], (nb, half, 2), like)
    w = view(a[S.w], (half, 2), like)
    y = view(a[S.y], (nb, m), like)
    bias = view(a[S.bias], (nbias,), like)
    out = view(a[S.out], (nb, m), like)
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        b0, b1 = _span(nb, c, nchunks)
        _affine_take_rows(spec, w, n, alpha, y, bias, out, b0, b1)
        finish_chunk(hp)


@numba.njit(cache=True, nogil=True)
def _padded_untake_chunks(a, like):
    S = PaddedUntakeSlot
    hp = header_address(a)
    nchunks, nb, m, n, half = a[S.nchunks], a[S.nb], a[S.m], a[S.n], a[S.half]
    g = view(a[S.g], (nb, m), like)
    w_inv = view(a[S.w_inv], (half, 2), like)
    spec = view(a[S.spec], (nb, half, 2), like)
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        b0, b1 = _span(nb, c, nchunks)
        _padded_untake_rows(g, n, w_inv, spec, b0, b1)
        finish_chunk(hp)


@numba.njit(cache=True, nogil=True)
def _gather_scale_dot_chunks(a, like):
    S = GatherScaleDotSlot
    hp = header_address(a)
    nchunks, nb, q, d = a[S.nchunks], a[S.nb], a[S.q], a[S.d]
    alpha = _alpha(a, S.alpha, like)
    v = view(a[S.v], (nb, q), like)
    unorder = view(a[S.unorder], (q,), _I64)
    x = view(a[S.x], (nb, d), like)
    gx = view(a[S.gx], (nb, d), like)
    dots = view(a[S.dots], (nb,), like)
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        b0, b1 = _span(nb, c, nchunks)
        _gather_scale_dot_rows(v, unorder, x, alpha, gx, dots, b0, b1)
        finish_chunk(hp)


@numba.njit(cache=True, nogil=True)
def _reorder_transpose_chunks(a, like):
    S = ReorderTransposeSlot
    hp = header_address(a)
    nchunks, nb, n, q = a[S.nchunks], a[S.nb], a[S.n], a[S.q]
    x = view(a[S.x], (nb, n), like)
    v = view(a[S.v], (nb, q), like)
    x_t = view(a[S.x_t], (n, nb), like)
    ntiles = (nb + _TILE - 1) // _TILE
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        t0, t1 = _span(ntiles, c, nchunks)
        _reorder_transpose_tiles(x, v, x_t, t0, t1)
        finish_chunk(hp)


@numba.njit(cache=True, nogil=True)
def _affine_take_t_chunks(a, like):
    S = AffineTakeSlot  # as _affine_take_chunks, with y_t (m, nb) in the ``y`` slot
    hp = header_address(a)
    nchunks, nb, half, n, m, nbias = a[S.nchunks], a[S.nb], a[S.half], a[S.n], a[S.m], a[S.nbias]
    alpha = _alpha(a, S.alpha, like)
    spec = view(a[S.spec], (nb, half, 2), like)
    w = view(a[S.w], (half, 2), like)
    y_t = view(a[S.y], (m, nb), like)
    bias = view(a[S.bias], (nbias,), like)
    out = view(a[S.out], (nb, m), like)
    ntiles = (nb + _TILE - 1) // _TILE
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        t0, t1 = _span(ntiles, c, nchunks)
        _affine_take_t_tiles(spec, w, n, alpha, y_t, bias, out, t0, t1)
        finish_chunk(hp)


@numba.njit(cache=True, nogil=True)
def _padded_untake_t_chunks(a, like):
    S = PaddedUntakeTSlot
    hp = header_address(a)
    nchunks, nb, m, n, half, mt = a[S.nchunks], a[S.nb], a[S.m], a[S.n], a[S.half], a[S.mt]
    g = view(a[S.g], (nb, m), like)
    w_inv = view(a[S.w_inv], (half, 2), like)
    spec = view(a[S.spec], (nb, half, 2), like)
    g_t = view(a[S.g_t], (mt, nb), like)
    ntiles = (nb + _TILE - 1) // _TILE
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        t0, t1 = _span(ntiles, c, nchunks)
        _padded_untake_t_tiles(g, n, w_inv, spec, g_t, t0, t1)
        finish_chunk(hp)


@numba.njit(cache=True, nogil=True)
def _gather_scale_dot_t_chunks(a, like):
    S = GatherScaleDotTSlot
    hp = header_address(a)
    nchunks, nb, q, d, ds = a[S.nchunks], a[S.nb], a[S.q], a[S.d], a[S.ds]
    alpha = _alpha(a, S.alpha, like)
    v = view(a[S.v], (nb, q), like)
    x = view(a[S.x], (nb, d), like)
    gs_t = view(a[S.gs_t], (ds, nb), like)
    gx = view(a[S.gx], (nb, d), like)
    dots = view(a[S.dots], (nb,), like)
    ntiles = (nb + _TILE - 1) // _TILE
    while True:
        c = claim_chunk(hp, nchunks)
        if c < 0:
            break
        t0, t1 = _span(ntiles, c, nchunks)
        _gather_scale_dot_t_tiles(v, x, alpha, gs_t, gx, dots, t0, t1)
        finish_chunk(hp)


# The region bodies: slot ``code`` picks the dtype (0 float32, 1 float64).
_twiddle_take_body = region_body(_twiddle_take_chunks, TwiddleTakeSlot)
_untake_twiddle_body = region_body(_untake_twiddle_chunks, UntakeTwiddleSlot)
_affine_take_body = region_body(_affine_take_chunks, AffineTakeSlot)
_padded_untake_body = region_body(_padded_untake_chunks, PaddedUntakeSlot)
_gather_scale_dot_body = region_body(_gather_scale_dot_chunks, GatherScaleDotSlot)
_reorder_transpose_body = region_body(_reorder_transpose_chunks, ReorderTransposeSlot)
_affine_take_t_body = region_body(_affine_take_t_chunks, AffineTakeSlot)
_padded_untake_t_body = region_body(_padded_untake_t_chunks, PaddedUntakeTSlot)
_gather_scale_dot_t_body = region_body(_gather_scale_dot_t_chunks, GatherScaleDotTSlot)


# ---- Python side: operand checks, headers, launch ---------------------------------------


def _launch(body, units: int, work: int, n_outputs: int, **fields: int | np.ndarray) -> None:
    """Check dtypes, make the array ``fields`` C-contiguous and run the region body ``body``
    over ``units`` rows or tiles, chunked by chunk_plan, with a header of ``body.layout``
    holding the dtype code and ``fields`` by name (ints, float64 bits, arrays).

    The last ``n_outputs`` arrays are written: where one is not contiguous the body writes a
    contiguous copy, copied back afterwards.
    """
    arrays = {k: v for k, v in fields.items() if isinstance(v, np.ndarray)}
    floats = [a for a in arrays.values() if a.dtype.kind == "f"]
    dtype = floats[0].dtype
    if dtype not in (np.float32, np.float64) or any(a.dtype != dtype for a in floats):
        raise TypeError(
            "the DCT kernels need float32 or float64 arrays of one dtype, got "
            f"{[str(a.dtype) for a in floats]}"
        )
    bufs = {k: np.ascontiguousarray(a) for k, a in arrays.items()}
    nchunks, nthreads = chunk_plan(units, work, _MIN_ELEMENTS)
    header = pack_header(body.layout, nchunks, int(dtype == np.float64), **{**fields, **bufs})
    launch(body.address, header, nthreads)
    for k in list(arrays)[len(arrays) - n_outputs:]:
        if bufs[k] is not arrays[k]:
            arrays[k][...] = bufs[k]


def _check_shapes(**named: tuple[np.ndarray, tuple[int, ...]]) -> None:
    """Raise unless each array has its shape: the bodies index bare memory."""
    for name, (a, shape) in named.items():
        if a.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {a.shape}")


def _tiles(nb: int) -> int:
    return (nb + _TILE - 1) // _TILE


# The Python-callable kernels. With one thread (small work, or one torch thread) the body
# runs on the calling thread, not as a region (runtime/region.launch).


def _twiddle_take_kernel(spec: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out[b, k] = Re(spec[b,k]·w[k]) for k <= N/2, out[b, N-k] = -Im(spec[b,k]·w[k]).

    spec: (B, N//2 + 1, 2) interleaved rfft output; w: (N//2 + 1, 2); out: (B, N).
    """
    nb, n = out.shape
    half = spec.shape[1]
    _check_shapes(spec=(spec, (nb, half, 2)), w=(w, (half, 2)))
    _launch(_twiddle_take_body, nb, nb * n, 1, nb=nb, half=half, n=n, spec=spec, w=w,
            out=out)


def _untake_twiddle_kernel(coef: np.ndarray, w_inv: np.ndarray, spec: np.ndarray) -> None:
    """spec[b, j] = (coef[b, j] - i·coef[b, N-j])·w_inv[j], coef[b, N] = 0; j <= N/2.

    coef: (B, N); w_inv: (N//2 + 1, 2); spec: (B, N//2 + 1, 2) interleaved.
    """
    nb, n = coef.shape
    half = spec.shape[1]
    _check_shapes(spec=(spec, (nb, half, 2)), w_inv=(w_inv, (half, 2)))
    _launch(_untake_twiddle_body, nb, nb * n, 1, nb=nb, n=n, half=half, coef=coef,
            w_inv=w_inv, spec=spec)


def _affine_take_kernel(
    spec: np.ndarray, w: np.ndarray, n: int, alpha: float, y: np.ndarray, bias: np.ndarray,
    out: np.ndarray,
) -> None:
    """out[b, k] = y[b, k] + α·X[b, k] + bias[k] for k < m = out.shape[1].

    X is the length-n DCT whose reordered rfft is spec (B, n//2 + 1, 2); w (n//2 + 1, 2);
    y, out (B, m); ``bias`` (m,), or length 0 for none. Fuses the twiddle, the output
    gather, the truncation to m, α, the bias and the sum with the sparse part: one pass
    instead of five.
    """
    nb, m = out.shape
    half = spec.shape[1]
    _check_shapes(spec=(spec, (nb, half, 2)), w=(w, (half, 2)), y=(y, (nb, m)))
    if bias.shape[0]:
        _check_shapes(bias=(bias, (m,)))
    _launch(_affine_take_body, nb, nb * max(m, half), 1, nb=nb, half=half, n=n, m=m,
            nbias=bias.shape[0], alpha=float_slot(alpha), spec=spec, w=w, y=y, bias=bias,
            out=out)


def _padded_untake_kernel(g: np.ndarray, n: int, w_inv: np.ndarray, spec: np.ndarray) -> None:
    """As _untake_twiddle_kernel for coefficients g (B, m) zero-padded to length n >= m;
    w_inv (n//2 + 1, 2); spec (B, n//2 + 1, 2)."""
    nb, m = g.shape
    half = spec.shape[1]
    _check_shapes(spec=(spec, (nb, half, 2)), w_inv=(w_inv, (half, 2)))
    _launch(_padded_untake_body, nb, nb * half * 2, 1, nb=nb, m=m, n=n, half=half, g=g,
            w_inv=w_inv, spec=spec)


def _gather_scale_dot_kernel(
    v: np.ndarray, unorder: np.ndarray, x: np.ndarray, alpha: float, gx: np.ndarray,
    dots: np.ndarray,
) -> None:
    """u = v[:, unorder][:, :d]; gx = α·u; dots[b] = ⟨u[b], x[b]⟩ (d = x.shape[1]).

    v: (B, q); unorder: (q,) integer; x, gx: (B, d); dots: (B,). The backward of α·T(x):
    u = Tᵀ(grad) gives both grad_x = α·u and grad_α = Σ ⟨u, x⟩.
    """
    nb, d = x.shape
    q = v.shape[1]
    _check_shapes(v=(v, (nb, q)), unorder=(unorder, (q,)), gx=(gx, (nb, d)),
                  dots=(dots, (nb,)))
    unorder = unorder.astype(np.int64, copy=False)
    _launch(_gather_scale_dot_body, nb, nb * d, 2, nb=nb, q=q, d=d,
            alpha=float_slot(alpha), v=v, unorder=unorder, x=x, gx=gx, dots=dots)


def _reorder_transpose_kernel(
    x: np.ndarray, reorder: np.ndarray, v: np.ndarray, x_t: np.ndarray
) -> None:
    """v[b, i] = xp[b, reorder[i]] with xp = x zero-padded to q = v.shape[1]; x_t = xᵀ.

    x: (B, n); v: (B, q); x_t: (n, B). ``reorder`` (Makhoul's permutation for length q,
    transform.py) is only documentation here: the loops compute it in closed form.
    """
    nb, n = x.shape
    q = v.shape[1]
    _check_shapes(v=(v, (nb, q)), x_t=(x_t, (n, nb)))
    _launch(_reorder_transpose_body, _tiles(nb), nb * (q + n), 2, nb=nb, n=n, q=q, x=x,
            v=v, x_t=x_t)


def _affine_take_t_kernel(
    spec: np.ndarray, w: np.ndarray, n: int, alpha: float, y_t: np.ndarray, bias: np.ndarray,
    out: np.ndarray,
) -> None:
    """As _affine_take_kernel, but the sparse part comes transposed: y_t (m, B)."""
    nb, m = out.shape
    half = spec.shape[1]
    _check_shapes(spec=(spec, (nb, half, 2)), w=(w, (half, 2)), y_t=(y_t, (m, nb)))
    if bias.shape[0]:
        _check_shapes(bias=(bias, (m,)))
    _launch(_affine_take_t_body, _tiles(nb), nb * max(m, half), 1, nb=nb, half=half, n=n,
            m=m, nbias=bias.shape[0], alpha=float_slot(alpha), spec=spec, w=w, y=y_t,
            bias=bias, out=out)


def _padded_untake_t_kernel(
    g: np.ndarray, n: int, w_inv: np.ndarray, spec: np.ndarray, g_t: np.ndarray
) -> None:
    """_padded_untake_kernel, and g_t = gᵀ (m, B) when g_t has rows (else skipped)."""
    nb, m = g.shape
    half = spec.shape[1]
    _check_shapes(spec=(spec, (nb, half, 2)), w_inv=(w_inv, (half, 2)))
    if g_t.shape[0]:
        _check_shapes(g_t=(g_t, (m, nb)))
    _launch(_padded_untake_t_body, _tiles(nb), nb * (half * 2 + g_t.shape[0]), 2, nb=nb,
            m=m, n=n, half=half, mt=g_t.shape[0], g=g, w_inv=w_inv, spec=spec, g_t=g_t)


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
    _check_shapes(v=(v, (nb, q)), gx=(gx, (nb, d)), dots=(dots, (nb,)))
    if gs_t.shape[0]:
        _check_shapes(gs_t=(gs_t, (d, nb)))
    _launch(_gather_scale_dot_t_body, _tiles(nb), nb * (d + gs_t.shape[0]), 2, nb=nb, q=q,
            d=d, alpha=float_slot(alpha), ds=gs_t.shape[0], v=v, x=x, gs_t=gs_t, gx=gx,
            dots=dots)
