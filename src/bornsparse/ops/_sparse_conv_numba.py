"""Numba CPU kernels of the direct sparse convolution (see ``ops/sparse_conv.py``).

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
``ops/_parallel.launch``; below a work threshold, or with one torch thread, the same chunk
loop is called directly on the calling thread. numba's ``parallel=True`` is never used (it
would start a second OpenMP runtime, docs/design.md). ``fastmath`` contraction and
reassociation let LLVM use FMAs and vectorise the dot products; numba does no bounds
checks, so ``ops/sparse_conv.py`` validates every index tensor before calling here.
"""

from __future__ import annotations

import functools
import glob
import os

import numba
import numpy as np
import torch
from numba import types
from numba.core.compiler import Compiler

from bornsparse.ops._parallel import _as_voidptr, claim_chunk, finish_chunk, launch

_FASTMATH = {"contract", "reassoc"}
# below this many multiply-adds plus written elements a kernel runs on the calling thread:
# waking torch's team costs more than the work
PARALLEL_MIN_WORK = 1 << 16
CHUNKS_PER_THREAD = 4  # a late thread leaves its chunks to the others

_F32 = np.empty(0, np.float32)
_F64 = np.empty(0, np.float64)
_I64 = np.empty(0, np.int64)


def _l1d_bytes() -> int:
    """The L1 data cache of CPU 0 from sysfs; 32 KiB where the system does not say."""
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(os.path.join(d, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(d, "size")) as f:
                size = f.read().strip()
        except OSError:
            continue
        if level == "1" and kind in ("Data", "Unified"):
            mult = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
            digits = size.rstrip("KM")
            if digits.isdigit():
                return int(digits) * mult
    return 32 << 10


L1D_BYTES = _l1d_bytes()


def tile_rows(row_elems: int, itemsize: int) -> int:
    """Rows per tile: the accumulated tile takes half of L1, the rows streamed into it the
    rest; at least one row."""
    return max(1, (L1D_BYTES // 2) // max(1, row_elems * itemsize))


class _NoAliasCompiler(Compiler):
    """numba's pipeline with array arguments marked ``noalias`` (the planes passed to one
    call never overlap), so LLVM vectorises the row loops without runtime overlap checks."""

    def define_pipelines(self):
        self.state.flags.noalias = True
        return super().define_pipelines()


@numba.njit(cache=True, nogil=True, inline="always")
def _view(address, shape, like):
    return numba.carray(_as_voidptr(address), shape, like.dtype)


@numba.njit(cache=True, nogil=True, inline="always")
def _span(lo_in, hi_in, off, stride, n_out):
    """Output indices t in [0, n_out) with lo_in <= t·stride + off < hi_in, as (t0, t1)."""
    t0 = max(0, -((off - lo_in) // stride))  # ceil((lo_in - off) / stride)
    t1 = min(n_out, -((off - hi_in) // stride))
    return t0, max(t0, t1)


# ---- the work of one unit --------------------------------------------------------------


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, pipeline_class=_NoAliasCompiler)
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


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, pipeline_class=_NoAliasCompiler)
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

# forward header: 0-2 chunk counters and count, 3 dtype (1: float64), then
_F_N, _F_C, _F_H, _F_W, _F_O, _F_HO, _F_WO, _F_KH, _F_KW = range(4, 13)
_F_SH, _F_SW, _F_PH, _F_PW, _F_DH, _F_DW, _F_G, _F_NNZ, _F_TILE, _F_BIAS = range(13, 23)
_F_X, _F_VALS, _F_COLS, _F_ROWPTR, _F_B, _F_OUT = range(23, 29)
_F_LEN = 29


@numba.njit(cache=True, nogil=True)
def _forward_chunks(a, like):
    hp = _as_voidptr(a.ctypes.data)
    nchunks = a[2]
    n, c, h, w, o, ho, wo = a[_F_N], a[_F_C], a[_F_H], a[_F_W], a[_F_O], a[_F_HO], a[_F_WO]
    groups, nnz = a[_F_G], a[_F_NNZ]
    x = _view(a[_F_X], (n, c, h, w), like)
    vals = _view(a[_F_VALS], (nnz,), like)
    cols = _view(a[_F_COLS], (nnz,), _I64)
    rowptr = _view(a[_F_ROWPTR], (o + 1,), _I64)
    bias = _view(a[_F_B], (o,), like)
    out = _view(a[_F_OUT], (n, o, ho, wo), like)
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
            b = bias[oc] if a[_F_BIAS] else zero
            _forward_plane(x[s], vals, cols, rowptr[oc], rowptr[oc + 1], (oc // og) * cg,
                           out[s, oc], b, a[_F_KH], a[_F_KW], a[_F_SH], a[_F_SW], a[_F_PH],
                           a[_F_PW], a[_F_DH], a[_F_DW], a[_F_TILE])
        finish_chunk(hp)


# backward header: 0-3 as forward, then
_B_N, _B_C, _B_H, _B_W, _B_O, _B_HO, _B_WO, _B_KH, _B_KW = range(4, 13)
_B_SH, _B_SW, _B_PH, _B_PW, _B_DH, _B_DW, _B_NNZ, _B_TILE, _B_BLOCK = range(13, 22)
_B_NEED_X, _B_NEED_V = 22, 23
_B_X, _B_GY, _B_VALS, _B_ROWS, _B_COLS, _B_PERM, _B_PTR, _B_GX, _B_PART = range(24, 33)
_B_LEN = 33


@numba.njit(cache=True, nogil=True)
def _backward_chunks(a, like):
    hp = _as_voidptr(a.ctypes.data)
    nchunks = a[2]
    n, c, h, w, o, ho, wo = a[_B_N], a[_B_C], a[_B_H], a[_B_W], a[_B_O], a[_B_HO], a[_B_WO]
    nnz, block = a[_B_NNZ], a[_B_BLOCK]
    need_x = a[_B_NEED_X] != 0
    need_v = a[_B_NEED_V] != 0
    nblocks = (n + block - 1) // block
    x = _view(a[_B_X], (n, c, h, w), like)
    gy = _view(a[_B_GY], (n, o, ho, wo), like)
    vals = _view(a[_B_VALS], (nnz,), like)
    rows = _view(a[_B_ROWS], (nnz,), _I64)
    cols = _view(a[_B_COLS], (nnz,), _I64)
    perm = _view(a[_B_PERM], (nnz,), _I64)
    ptr = _view(a[_B_PTR], (c + 1,), _I64)
    # without need_x the gradient pointer is a 1-element dummy, viewed but never touched
    gx = _view(a[_B_GX], (n if need_x else 1, c if need_x else 1, h, w), like)
    part = _view(a[_B_PART], (nblocks, nnz), like)
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
                                a[_B_KH], a[_B_KW], a[_B_SH], a[_B_SW], a[_B_PH], a[_B_PW],
                                a[_B_DH], a[_B_DW], a[_B_TILE], need_x, need_v)
        finish_chunk(hp)


# The region bodies (compiled on first use): header slot 3 picks the dtype.


def _forward_body(header):
    a = numba.carray(header, (_F_LEN,), np.int64)
    if a[3]:
        _forward_chunks(a, _F64)
    else:
        _forward_chunks(a, _F32)


def _backward_body(header):
    a = numba.carray(header, (_B_LEN,), np.int64)
    if a[3]:
        _backward_chunks(a, _F64)
    else:
        _backward_chunks(a, _F32)


@functools.cache
def _body_address(name: str) -> int:
    fn = {"forward": _forward_body, "backward": _backward_body}[name]
    return numba.cfunc(types.void(types.voidptr), cache=True)(fn).address


def _plan(units: int, work: int) -> tuple[int, int]:
    """(chunks, threads): one chunk on the calling thread for small work or one torch
    thread, else CHUNKS_PER_THREAD chunks per thread (only the chunk count could change
    a result, and here not even that)."""
    threads = max(1, torch.get_num_threads())
    if units <= 1 or work < PARALLEL_MIN_WORK or threads == 1:
        return 1, 1
    nchunks = min(units, threads * CHUNKS_PER_THREAD)
    return nchunks, min(threads, nchunks)


def _run(name: str, chunks, header: np.ndarray, like: np.ndarray, units: int,
         work: int) -> None:
    nchunks, nthreads = _plan(units, work)
    header[2] = nchunks
    if nthreads > 1:
        launch(_body_address(name), header, nthreads)
    else:
        header[0] = header[1] = 0
        chunks(header, like)


def _addr(a: np.ndarray) -> int:
    return a.ctypes.data


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
    header = np.zeros(_F_LEN, np.int64)
    header[3:] = (int(x.dtype == np.float64), n, c, h, w, o, ho, wo, *kernel, *stride, *pad,
                  *dilation, groups, nnz, tile_rows(wo, x.itemsize), int(bias is not None),
                  _addr(x), _addr(vals), _addr(cols), _addr(rowptr), _addr(b), _addr(out))
    like = _F64 if x.dtype == np.float64 else _F32
    _run("forward", _forward_chunks, header, like, n * o, n * ho * wo * (nnz + o))


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
    header = np.zeros(_B_LEN, np.int64)
    header[3:] = (int(x.dtype == np.float64), n, c, h, w, o, ho, wo, *kernel, *stride, *pad,
                  *dilation, nnz, tile_rows(w, x.itemsize), block, int(gx is not None),
                  int(need_v), _addr(x), _addr(gy), _addr(vals), _addr(rows), _addr(cols),
                  _addr(perm), _addr(chan_ptr), _addr(gx if gx is not None else dummy),
                  _addr(part))
    like = _F64 if x.dtype == np.float64 else _F32
    nblocks = -(-n // block)
    _run("backward", _backward_chunks, header, like, nblocks * c,
         n * (nnz * ho * wo + c * h * w))
