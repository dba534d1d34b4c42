"""One thread runtime for every CPU kernel: the DCT passes
(ops/discrete_cosine/numba_kernels.py) and the sparse products (ops/sparse/numba_matmul.py)
run as chunks on torch's OpenMP team through ops/runtime/region.py, like the permuted
operator, and never start numba's own parallel runtime.

Each kernel is checked against plain numpy on odd shapes, batch 1 and an empty batch, in
float32 and float64; its result must not depend on the chunking (every output row is
computed alike whichever chunk holds it) nor on the threads that run the chunks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from bornsparse.ops.discrete_cosine import numba_kernels as kd
from bornsparse.ops.sparse import numba_matmul as ks

DTYPES = [np.float32, np.float64]
CHUNKS = [1, 2, 5]  # 1: the chunk function called directly; more: a region via launch()


def _tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)


@pytest.fixture
def force_chunks(monkeypatch):
    """Make every kernel wrapper split its work into ``c`` chunks on 2 threads."""

    def force(c):
        plan = lambda units, work, *_: (max(1, min(c, units)), 2)  # noqa: E731
        monkeypatch.setattr(kd, "chunk_plan", plan)
        monkeypatch.setattr(ks, "chunk_plan", plan)

    return force


# ---- sparse products ------------------------------------------------------------------


def _csr(n_out, n_in, density, seed, dtype, itype=np.int64):
    rng = np.random.default_rng(seed)
    mask = rng.random((n_out, n_in)) < density
    if n_out > 2:
        mask[n_out // 2] = False  # an empty row: still zeroed
    dense = np.where(mask, rng.standard_normal((n_out, n_in)), 0).astype(dtype)
    r, c = np.nonzero(dense)
    ptr = np.zeros(n_out + 1, np.int64)
    ptr[1:] = np.cumsum(np.bincount(r, minlength=n_out))
    return dense, ptr.astype(itype), r.astype(itype), c.astype(itype), dense[r, c]


SPARSE_SHAPES = [(1, 1, 1), (7, 5, 3), (37, 23, 9), (64, 50, 0), (16, 31, 33)]


def _sparse_all(n_out, n_in, batch, dtype, itype, seed=0):
    """(outputs, references) of the three sparse kernels on one random case."""
    dense, ptr, r, c, vals = _csr(n_out, n_in, 0.3, seed, dtype, itype)
    rng = np.random.default_rng(seed + 1)
    x_t = rng.standard_normal((n_in, batch)).astype(dtype)
    gy_t = rng.standard_normal((n_out, batch)).astype(dtype)
    y_t = np.full((n_out, batch), np.nan, dtype)
    ks._spmm_t_kernel(ptr, c, vals, x_t, y_t)
    gv = np.ones(len(r), dtype)  # accumulates onto what is there
    ks._sampled_dot_kernel(r, c, gy_t, x_t, gv)
    # the fused backward walks S's columns: compressed-column arrays of the same S
    order = np.argsort(c, kind="stable")
    colptr = np.zeros(n_in + 1, np.int64)
    colptr[1:] = np.cumsum(np.bincount(c, minlength=n_in))
    gx_t = np.full((n_in, batch), np.nan, dtype)
    gv_csc = np.ones(len(r), dtype)
    ks._spmm_t_sampled_dot_kernel(colptr.astype(itype), r[order], vals[order], gy_t, x_t,
                                  gx_t, gv_csc)
    d64, x64, g64 = dense.astype(np.float64), x_t.astype(np.float64), gy_t.astype(np.float64)
    want_gv = 1 + np.einsum("eb,eb->e", g64[r], x64[c])
    got = [y_t, gv, gx_t, gv_csc]
    want = [d64 @ x64, want_gv, d64.T @ g64, want_gv[order]]
    return got, want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("itype", [np.int64, np.int32])
def test_sparse_kernels_match_numpy_for_any_chunking(force_chunks, dtype, itype):
    for n_out, n_in, batch in SPARSE_SHAPES:
        runs = []
        for c in CHUNKS:
            force_chunks(c)
            got, want = _sparse_all(n_out, n_in, batch, dtype, itype)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g, w, **_tol(dtype))
            runs.append(got)
        for other in runs[1:]:  # bitwise: the chunking never changes a result
            for a, b in zip(runs[0], other, strict=True):
                assert np.array_equal(a, b)


def test_sparse_index_dtypes_agree_bitwise(force_chunks):
    force_chunks(3)
    a, _ = _sparse_all(37, 23, 9, np.float32, np.int64, seed=4)
    b, _ = _sparse_all(37, 23, 9, np.float32, np.int32, seed=4)
    for u, v in zip(a, b, strict=True):
        assert np.array_equal(u, v)


def test_sparse_serial_twins_match():
    dense, ptr, r, c, vals = _csr(40, 30, 0.2, 3, np.float64)
    x_t = np.random.default_rng(0).standard_normal((30, 6))
    out = np.empty((40, 6))
    ks._spmm_t_serial_kernel(ptr, c, vals, x_t, out)
    np.testing.assert_allclose(out, dense @ x_t, rtol=1e-12, atol=1e-12)
    gv = np.zeros(len(r))
    ks._sampled_dot_serial_kernel(r, c, out, x_t, gv)
    np.testing.assert_allclose(gv, np.einsum("eb,eb->e", out[r], x_t[c]), rtol=1e-12)


def test_region_path_copies_back_into_strided_outputs(force_chunks):
    force_chunks(3)
    dense, ptr, r, c, vals = _csr(20, 10, 0.4, 1, np.float64)
    x_t = np.random.default_rng(1).standard_normal((10, 5))
    big = np.zeros((20, 10))
    out = big[:, ::2]  # not contiguous: the body writes a copy, copied back
    ks._spmm_t_kernel(ptr, c, vals, x_t, out)
    np.testing.assert_allclose(big[:, ::2], dense @ x_t, rtol=1e-12, atol=1e-12)
    assert not big[:, 1::2].any()


def test_region_path_rejects_mixed_dtypes(force_chunks):
    force_chunks(2)
    _, ptr, _, c, vals = _csr(8, 8, 0.5, 2, np.float64)
    with pytest.raises(TypeError, match="one dtype"):
        ks._spmm_t_kernel(ptr, c, vals, np.ones((8, 3), np.float32), np.empty((8, 3)))
    with pytest.raises(ValueError, match="out_t must have shape"):
        ks._spmm_t_kernel(ptr, c, vals, np.ones((8, 3)), np.empty((7, 3)))


# ---- DCT passes -----------------------------------------------------------------------


def _makhoul(q):
    """Makhoul's reorder for length q and its inverse (as ops/discrete_cosine._tables)."""
    reorder = np.concatenate([np.arange(0, q, 2), np.arange(1, q, 2)[::-1]])
    unorder = np.empty(q, np.int64)
    unorder[reorder] = np.arange(q)
    return reorder, unorder


def _full_take(spec, w, n):
    """The length-n output of the twiddle-and-take: X[k] = Re z_k (k <= n/2), X[n-k] =
    -Im z_k, z = spec·w."""
    z = (spec[..., 0] + 1j * spec[..., 1]) * (w[:, 0] + 1j * w[:, 1])
    half = spec.shape[1]
    out = np.empty((spec.shape[0], n))
    out[:, :half] = z.real[:, : min(half, n)]
    for k in range(1, half):
        if n - k >= half:
            out[:, n - k] = -z.imag[:, k]
    return out


def _untake(coef, w_inv, half):
    """spec[b, j] = (coef[b, j] - i·coef[b, n-j])·w_inv[j], coef[:, n] = 0."""
    n = coef.shape[1]
    c = np.zeros((coef.shape[0], half), complex)
    for j in range(half):
        c[:, j] = coef[:, j] - 1j * (coef[:, n - j] if j > 0 else 0)
    z = c * (w_inv[:, 0] + 1j * w_inv[:, 1])
    return np.stack([z.real, z.imag], axis=-1)


# (batch, n, m): batch 1, an empty batch, odd sizes, m < n, batches over several 16-tiles
DCT_SHAPES = [(1, 1, 1), (0, 6, 6), (3, 5, 3), (17, 8, 8), (33, 37, 20), (20, 12, 7)]


def _dct_all(nb, n, m, dtype, seed=0):
    """(outputs, references) of the nine DCT passes; n is the transform length q >= m."""
    rng = np.random.default_rng(seed)

    def rnd(*shape):
        return rng.standard_normal(shape).astype(dtype)

    half = n // 2 + 1
    reorder, unorder = _makhoul(n)
    spec, w, w_inv = rnd(nb, half, 2), rnd(half, 2), rnd(half, 2)
    alpha = 0.7
    y, bias, g, coef = rnd(nb, m), rnd(m), rnd(nb, m), rnd(nb, n)
    v, d = rnd(nb, n), max(1, m - 1)
    x, gs_t = rnd(nb, d), rnd(d, nb)
    xin = rnd(nb, m)  # the sparse-affine input, zero-padded to n by the pass
    got, want = [], []
    f64 = [a.astype(np.float64) for a in (spec, w, w_inv, y, bias, g, coef, v, x, gs_t, xin)]
    spec6, w6, winv6, y6, bias6, g6, coef6, v6, x6, gs6, xin6 = f64
    alpha_d = float(np.dtype(dtype).type(alpha))
    take = _full_take(spec6, w6, n)
    gpad = np.pad(g6, ((0, 0), (0, n - m)))

    out = np.empty((nb, n), dtype)
    kd._twiddle_take_kernel(spec, w, out)
    got.append(out)
    want.append(take)

    out = np.empty((nb, half, 2), dtype)
    kd._untake_twiddle_kernel(coef, w_inv, out)
    got.append(out)
    want.append(_untake(coef6, winv6, half))

    out = np.empty((nb, m), dtype)
    kd._affine_take_kernel(spec, w, n, alpha, y, bias, out)
    got.append(out)
    want.append(y6 + alpha_d * take[:, :m] + bias6)
    out = np.empty((nb, m), dtype)
    kd._affine_take_kernel(spec, w, n, alpha, y, np.empty(0, dtype), out)
    got.append(out)
    want.append(y6 + alpha_d * take[:, :m])

    out = np.empty((nb, half, 2), dtype)
    kd._padded_untake_kernel(g, n, w_inv, out)
    got.append(out)
    want.append(_untake(gpad, winv6, half))

    gx, dots = np.empty((nb, d), dtype), np.empty(nb, dtype)
    kd._gather_scale_dot_kernel(v, unorder, x, alpha, gx, dots)
    u = v6[:, unorder][:, :d]
    got += [gx, dots]
    want += [alpha_d * u, (u * x6).sum(1)]

    vv, x_t = np.empty((nb, n), dtype), np.empty((m, nb), dtype)
    kd._reorder_transpose_kernel(xin, reorder, vv, x_t)
    got += [vv, x_t]
    want += [np.pad(xin6, ((0, 0), (0, n - m)))[:, reorder], xin6.T]

    out = np.empty((nb, m), dtype)
    kd._affine_take_t_kernel(spec, w, n, alpha, y.T.copy(), bias, out)
    got.append(out)
    want.append(y6 + alpha_d * take[:, :m] + bias6)

    for with_t in (True, False):
        out, g_t = np.empty((nb, half, 2), dtype), np.empty((m if with_t else 0, nb), dtype)
        kd._padded_untake_t_kernel(g, n, w_inv, out, g_t)
        got.append(out)
        want.append(_untake(gpad, winv6, half))
        if with_t:
            got.append(g_t)
            want.append(g6.T)

    for with_s in (True, False):
        gx, dots = np.empty((nb, d), dtype), np.empty(nb, dtype)
        kd._gather_scale_dot_t_kernel(v, unorder, x, alpha, gs_t if with_s else
                                      np.empty((0, nb), dtype), gx, dots)
        got += [gx, dots]
        want += [alpha_d * u + (gs6.T if with_s else 0), (u * x6).sum(1)]
    return got, want


@pytest.mark.parametrize("dtype", DTYPES)
def test_dct_kernels_match_numpy_for_any_chunking(force_chunks, dtype):
    for nb, n, m in DCT_SHAPES:
        runs = []
        for c in CHUNKS:
            force_chunks(c)
            got, want = _dct_all(nb, n, m, dtype, seed=nb + n)
            for i, (a, b) in enumerate(zip(got, want, strict=True)):
                np.testing.assert_allclose(a, b, **_tol(dtype), err_msg=f"output {i}")
            runs.append(got)
        for other in runs[1:]:
            for a, b in zip(runs[0], other, strict=True):
                assert np.array_equal(a, b)


# ---- threads --------------------------------------------------------------------------


def _with_threads(n, fn):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(before)


def test_one_and_two_threads_agree_bitwise(monkeypatch):
    """Big enough to take the region path with 2 threads: first with the chunking forced
    to be the same, then as planned (1 thread: one chunk on the caller; 2 threads: a
    region of several chunks)."""

    def both():
        return (_sparse_all(300, 200, 64, np.float32, np.int64)[0]
                + _dct_all(160, 512, 512, np.float32)[0])

    planned = [_with_threads(t, both) for t in (1, 2)]
    plan = ks.chunk_plan  # the same function object in both modules
    forced_plan = lambda u, w, *m: (min(u, 6), plan(u, w, *m)[1])  # noqa: E731
    monkeypatch.setattr(ks, "chunk_plan", forced_plan)
    monkeypatch.setattr(kd, "chunk_plan", forced_plan)
    forced = [_with_threads(t, both) for t in (1, 2)]
    for a, b, c, d in zip(*planned, *forced, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c) and np.array_equal(a, d)


def test_chunk_plan_sizes():
    from bornsparse.ops.runtime.bodies import CHUNKS_PER_THREAD, PARALLEL_MIN_WORK, chunk_plan

    assert chunk_plan(1000, PARALLEL_MIN_WORK - 1) == (1, 1)
    assert chunk_plan(1, 1 << 30) == (1, 1)
    assert chunk_plan(0, 0) == (1, 1)
    threads = _with_threads(2, lambda: chunk_plan(1000, 1 << 30))
    assert threads == (2 * CHUNKS_PER_THREAD, 2)
    assert _with_threads(2, lambda: chunk_plan(3, 1 << 30)) == (3, 2)
    assert _with_threads(1, lambda: chunk_plan(1000, 1 << 30)) == (1, 1)


_NO_NUMBA_RUNTIME = textwrap.dedent("""
    import numba
    import numba.np.ufunc.parallel as npp
    import torch

    import bornsparse.ops.runtime.region as P

    launches = []
    launch = P.launch
    # before the kernel modules import it, so that theirs is this one
    P.launch = lambda *a: (launches.append(a[2]), launch(*a))
    from bornsparse.nn import DCTPlusSparseLinear, SparseLinear
    from bornsparse.ops import dct, idct

    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.randn(128, 512, requires_grad=True)
    for layer in (DCTPlusSparseLinear(512, 512, density=1e-2, init="normal"),
                  DCTPlusSparseLinear(512, 300, density=1e-2, init="normal"),
                  SparseLinear(512, 512, density=1e-2)):
        layer(x).square().sum().backward()
    idct(dct(x.detach()))
    assert max(launches) > 1, launches  # the kernels did run as parallel regions
    assert not npp._is_initialized
    try:
        numba.threading_layer()
    except ValueError as err:
        assert "not initialized" in str(err)
    else:
        raise AssertionError("numba's threading layer is initialized")
    npp._launch_threads()  # and the probe does see a started runtime
    assert npp._is_initialized and numba.threading_layer()
    print("ok")
""")


def test_numba_parallel_runtime_is_never_started():
    # a fresh process: anything else in this test session may have started it already
    import bornsparse

    src = os.path.dirname(os.path.dirname(bornsparse.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [src, *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("BORNSPARSE_OPENMP_BRIDGE", None)
    res = subprocess.run([sys.executable, "-c", _NO_NUMBA_RUNTIME], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr
