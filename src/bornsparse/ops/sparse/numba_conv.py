"""Numba CPU kernels of the direct sparse convolution (see ``conv.py``).

The stored weights are entries e = (o, l) of the (out_channels, L) kernel matrix, l the
flattened (c_local, kh, kw) patch index (F.unfold order). Output channel o of group
g = o // (out/groups) reads input channel c = g·(in/groups) + c_local, so entry e adds
``v_e · x[n, c, i·sh - ph + kh·dh, j·sw - pw + kw·dw]`` to ``y[n, o, i, j]``: a shifted
(strided) input plane times a scalar. Nothing dense of the kernel's size is ever formed.

* Forward: one unit per output plane (n, o). The plane is written in tiles of output rows
  (sized from the L1 data cache, read from sysfs at import): a tile is set to the bias,
  then every entry of row o adds its shifted input rows, so the tile stays in L1 across
  entries and each output element is written to memory once. Valid rows and columns are
  computed per entry (no per-element test for the zero padding).
* Backward: one unit per (batch block, input channel c). For each sample of the block the
  input-gradient plane of c is built in tiles of input rows: zeroed, then every entry
  reading channel c scatters ``v_e · gy[n, o_e]`` into it (the transposed scatter), and in
  the same pass the values' gradient gets ``Σ gy[n, o_e, i, j] · x[n, c, ih, iw]`` (the x
  and gy rows are in registers already). Partial sums go to ``partial[block, e]``, summed
  over blocks afterwards in block order; the block size follows from the sizes only.
* Every unit is computed the same way whichever chunk holds it and no two units write the
  same memory, so results do not depend on the chunking (nor on the threads).

Chunks (contiguous ranges of units) run as a parallel region of torch's OpenMP team through
``runtime/region.launch``; below a work threshold, or with one torch thread, the same body
runs as one chunk on the calling thread. The headers' slots are named once
(``ForwardSlot``, ``BackwardSlot``) for the packing and the chunk loops alike. numba's
``parallel=True`` is never used (it would start a second OpenMP runtime, docs/design.md).
``fastmath`` contraction and reassociation let LLVM use FMAs and vectorise the dot
products; numba does no bounds checks, so ``conv.py`` validates every index
tensor before calling here.
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
from bornsparse.ops.runtime.hardware import cache_bytes
from bornsparse.ops.runtime.intrinsics import header_address, view
from bornsparse.ops.runtime.region import header_layout, launch, pack_header

_FASTMATH = {"contract", "reassoc"}
_I64 = np.empty(0, np.int64)


L1D_BYTES = cache_bytes(1, 32 << 10)  # read at import: the tiles follow the machine


def tile_rows(row_elems: int, itemsize: int) -> int:
    """Rows per tile: the accumulated tile takes half of L1, the rows streamed into it the
    rest; at least one row."""
    return max(1, (L1D_BYTES // 2) // max(1, row_elems * itemsize))


@numba.njit(cache=True, nogil=True, inline="always")
def _span(lo_in, hi_in, off, stride, n_out):
    """Output indices t in [0, n_out) with lo_in <= t·stride + off < hi_in, as (t0, t1)."""
    t0 = max(0, -((off - lo_in) // stride))  # ceil((lo_in - off) / stride)
    t1 = min(n_out, -((off - hi_in) // stride))
    return t0, max(t0, t1)


# ---- the work of one unit --------------------------------------------------------------


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, pipeline_class=NoAliasCompiler)
def _forward_plane(xn, vals, cols, e0, e1, c_base, out, bias_v, kh_, kw_, sh, sw, ph, pw,
                   dh, dw, rows_per_tile):
    """out (Ho, Wo) = bias_v + Σ_{e0 <= e < e1} vals[e] · (shifted plane of xn (C, H, W))."""
    h = xn.shape[1]
    w = xn.shape[2]
    ho = out.shape[0]
    wo = out.shape[1]
    kk = kh_ * kw_
    for r0 in range(0, ho, rows_per_tile):
        r1 = min(ho, r0 + rows_per_tile)
        for i in range(r0, r1):
            orow = out[i]
            for j in range(wo):
                orow[j] = bias_v
        for e in range(e0, e1):
            lc = cols[e]
            cl = lc // kk
            m = lc - cl * kk
            ki = m // kw_
            kj = m - ki * kw_
            oh = ki * dh - ph
            ow = kj * dw - pw
            i0, i1 = _span(0, h, oh, sh, ho)
            i0 = max(i0, r0)
            i1 = min(i1, r1)
            j0, j1 = _span(0, w, ow, sw, wo)
            v = vals[e]
            xc = xn[c_base + cl]
            nj = j1 - j0
            for i in range(i0, i1):
                # views starting at the first valid column: loop indices from 0 are
                # provably non-negative, so numba emits no wraparound select and LLVM
                # vectorises the loop (an index j + ow defeated both)
                orow = out[i, j0:]
                xr = xc[i * sh + oh, j0 * sw + ow:]
                if sw == 1:
                    for j in range(nj):
                        orow[j] += v * xr[j]
                else:
                    for j in range(nj):
                        orow[j] += v * xr[j * sw]


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, pipeline_class=NoAliasCompiler)
def _backward_plane(xc, gyn, gxc, vals, rows, cols, perm, k0, k1, acc, kh_, kw_, sh, sw,
                    ph, pw, dh, dw, rows_per_tile, need_x, need_v):
    """Input channel c of one sample: gxc (H, W) = Σ_e vals[e] · (gy plane of o_e scattered
    back), and acc[k - k0] += ⟨gy[o_e] rows, the xc (H, W) rows entry e read⟩, for the
    entries e = perm[k], k0 <= k < k1, that read channel c. gyn is (O, Ho, Wo)."""
    h = xc.shape[0]
    w = xc.shape[1]
    ho = gyn.shape[1]
    wo = gyn.shape[2]
    kk = kh_ * kw_
    zero = xc.dtype.type(0)
    for r0 in range(0, h, rows_per_tile):
        r1 = min(h, r0 + rows_per_tile)
        if need_x:
            for ih in range(r0, r1):
                grow = gxc[ih]
                for iw in range(w):
                    grow[iw] = zero
        for k in range(k0, k1):
            e = perm[k]
            lc = cols[e]
            m = lc - (lc // kk) * kk
            ki = m // kw_
            kj = m - ki * kw_
            oh = ki * dh - ph
            ow = kj * dw - pw
            # output rows i whose input row i·sh + oh lies in this tile
            i0, i1 = _span(r0, r1, oh, sh, ho)
            j0, j1 = _span(0, w, ow, sw, wo)
            v = vals[e]
            gp = gyn[rows[e]]
            nj = j1 - j0
            s = zero
            for i in range(i0, i1):
                ih = i * sh + oh
                gr = gp[i, j0:]  # views from the first valid column, as in _forward_plane
                if need_x and need_v:
                    xr = xc[ih, j0 * sw + ow:]
                    grow = gxc[ih, j0 * sw + ow:]
                    if sw == 1:
                        for j in range(nj):
                            g = gr[j]
                            grow[j] += v * g
                            s += g * xr[j]
                    else:
                        for j in range(nj):
                            g = gr[j]
                            grow[j * sw] += v * g
                            s += g * xr[j * sw]
                elif need_x:
                    grow = gxc[ih, j0 * sw + ow:]
                    if sw == 1:
                        for j in range(nj):
                            grow[j] += v * gr[j]
                    else:
                        for j in range(nj):
                            grow[j * sw] += v * gr[j]
                else:
                    xr = xc[ih, j0 * sw + ow:]
                    if sw == 1:
                        for j in range(nj):
                            s += gr[j] * xr[j]
                    else:
                        for j in range(nj):
                            s += gr[j] * xr[j * sw]
            acc[k - k0] += s


# ---- chunk loops: unpack the header, run every chunk this thread claims ----------------

# the headers (runtime/region.header_layout; code 1: float64): sizes, then pointers
ForwardSlot = header_layout(
    "ConvForwardSlot",
    "n c h w o ho wo kh kw sh sw ph pw dh dw groups nnz tile has_bias x vals cols rowptr bias out",
)
BackwardSlot = header_layout(
    "ConvBackwardSlot",
    "n c h w o ho wo kh kw sh sw ph pw dh dw nnz tile block need_x need_v "
    "x gy vals rows cols perm ptr gx part",
)


@numba.njit(cache=True, nogil=True)
def _forward_chunks(a, like):
    F = ForwardSlot
    hp = header_address(a)
    nchunks = a[F.nchunks]
    n, c, h, w, o, ho, wo = a[F.n], a[F.c], a[F.h], a[F.w], a[F.o], a[F.ho], a[F.wo]
    groups, nnz = a[F.groups], a[F.nnz]
    x = view(a[F.x], (n, c, h, w), like)
    vals = view(a[F.vals], (nnz,), like)
    cols = view(a[F.cols], (nnz,), _I64)
    rowptr = view(a[F.rowptr], (o + 1,), _I64)
    bias = view(a[F.bias], (o,), like)
    out = view(a[F.out], (n, o, ho, wo), like)
    units = n * o
    cg = c // groups
    og = o // groups
    zero = like.dtype.type(0)
    while True:
        ch = claim_chunk(hp, nchunks)
        if ch < 0:
            break
        for u in range(units * ch // nchunks, units * (ch + 1) // nchunks):
            s = u // o
            oc = u - s * o
            b = bias[oc] if a[F.has_bias] else zero
            _forward_plane(x[s], vals, cols, rowptr[oc], rowptr[oc + 1], (oc // og) * cg,
                           out[s, oc], b, a[F.kh], a[F.kw], a[F.sh], a[F.sw], a[F.ph],
                           a[F.pw], a[F.dh], a[F.dw], a[F.tile])
        finish_chunk(hp)


@numba.njit(cache=True, nogil=True)
def _backward_chunks(a, like):
    B = BackwardSlot
    hp = header_address(a)
    nchunks = a[B.nchunks]
    n, c, h, w, o, ho, wo = a[B.n], a[B.c], a[B.h], a[B.w], a[B.o], a[B.ho], a[B.wo]
    nnz, block = a[B.nnz], a[B.block]
    need_x = a[B.need_x] != 0
    need_v = a[B.need_v] != 0
    nblocks = (n + block - 1) // block
    x = view(a[B.x], (n, c, h, w), like)
    gy = view(a[B.gy], (n, o, ho, wo), like)
    vals = view(a[B.vals], (nnz,), like)
    rows = view(a[B.rows], (nnz,), _I64)
    cols = view(a[B.cols], (nnz,), _I64)
    perm = view(a[B.perm], (nnz,), _I64)
    ptr = view(a[B.ptr], (c + 1,), _I64)
    # without need_x the gradient pointer is a 1-element dummy, viewed but never touched
    gx = view(a[B.gx], (n if need_x else 1, c if need_x else 1, h, w), like)
    part = view(a[B.part], (nblocks, nnz), like)
    units = nblocks * c
    while True:
        ch = claim_chunk(hp, nchunks)
        if ch < 0:
            break
        for u in range(units * ch // nchunks, units * (ch + 1) // nchunks):
            blk = u // c
            cc = u - blk * c
            k0 = ptr[cc]
            k1 = ptr[cc + 1]
            acc = part[blk, k0:k1]
            for s in range(blk * block, min(n, (blk + 1) * block)):
                gxc = gx[s, cc] if need_x else gx[0, 0]
                _backward_plane(x[s, cc], gy[s], gxc, vals, rows, cols, perm, k0, k1, acc,
                                a[B.kh], a[B.kw], a[B.sh], a[B.sw], a[B.ph], a[B.pw],
                                a[B.dh], a[B.dw], a[B.tile], need_x, need_v)
        finish_chunk(hp)


# The region bodies (compiled on first use): slot ``code`` picks the dtype.
_forward_body = region_body(_forward_chunks, ForwardSlot)
_backward_body = region_body(_backward_chunks, BackwardSlot)


def forward(x: np.ndarray, vals: np.ndarray, cols: np.ndarray, rowptr: np.ndarray,
            bias: np.ndarray | None, out: np.ndarray, kernel: tuple[int, int],
            stride: tuple[int, int], pad: tuple[int, int], dilation: tuple[int, int],
            groups: int) -> None:
    """out (N, O, Ho, Wo) = sparse conv of x (N, C, H, W) (+ bias (O,)); all C-contiguous,
    one float dtype, int64 indices already validated (ops/sparse_conv.check_conv_plan)."""
    n, c, h, w = x.shape
    _, o, ho, wo = out.shape
    nnz = vals.shape[0]
    b = bias if bias is not None else vals[:1]
    nchunks, nthreads = chunk_plan(n * o, n * ho * wo * (nnz + o))
    header = pack_header(
        ForwardSlot, nchunks, int(x.dtype == np.float64), n=n, c=c, h=h, w=w, o=o, ho=ho,
        wo=wo, kh=kernel[0], kw=kernel[1], sh=stride[0], sw=stride[1], ph=pad[0], pw=pad[1],
        dh=dilation[0], dw=dilation[1], groups=groups, nnz=nnz,
        tile=tile_rows(wo, x.itemsize), has_bias=int(bias is not None), x=x, vals=vals,
        cols=cols, rowptr=rowptr, bias=b, out=out,
    )
    launch(_forward_body.address, header, nthreads)


def batch_block(n: int, c: int) -> int:
    """Samples per backward unit: the whole batch when there are >= 64 input channels to
    split over, else fewer so that about 64 units exist. A function of the sizes alone, so
    the values' gradient (summed over blocks) never depends on the threads."""
    blocks = min(n, max(1, -(-64 // c)))
    return -(-n // blocks)


def backward(x: np.ndarray, gy: np.ndarray, vals: np.ndarray, rows: np.ndarray,
             cols: np.ndarray, perm: np.ndarray, chan_ptr: np.ndarray, gx: np.ndarray | None,
             part: np.ndarray, need_v: bool, kernel: tuple[int, int],
             stride: tuple[int, int], pad: tuple[int, int], dilation: tuple[int, int],
             block: int) -> None:
    """gx (N, C, H, W) = transposed sparse conv of gy (N, O, Ho, Wo) if gx is given, and,
    if need_v, part[b, k] (blocks, nnz; zeros in) += the values' gradient of entry perm[k]
    over batch block b."""
    n, c, h, w = x.shape
    _, o, ho, wo = gy.shape
    nnz = vals.shape[0]
    dummy = vals[:1]
    nblocks = -(-n // block)
    nchunks, nthreads = chunk_plan(nblocks * c, n * (nnz * ho * wo + c * h * w))
    header = pack_header(
        BackwardSlot, nchunks, int(x.dtype == np.float64), n=n, c=c, h=h, w=w, o=o, ho=ho,
        wo=wo, kh=kernel[0], kw=kernel[1], sh=stride[0], sw=stride[1], ph=pad[0], pw=pad[1],
        dh=dilation[0], dw=dilation[1], nnz=nnz, tile=tile_rows(w, x.itemsize), block=block,
        need_x=int(gx is not None), need_v=int(need_v), x=x, gy=gy, vals=vals, rows=rows,
        cols=cols, perm=perm, ptr=chan_ptr, gx=gx if gx is not None else dummy, part=part,
    )
    launch(_backward_body.address, header, nthreads)
