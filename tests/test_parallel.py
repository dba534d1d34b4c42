"""The parallel launcher of the fused kernels (ops/runtime/region.py): torch's OpenMP team, a
Python thread pool, or the calling thread must give bitwise the same results, whatever
number of threads actually runs the chunks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pytest
import torch
from numba import types

from bornsparse.ops.permuted import (
    FORWARD_TILE,
    permuted_block_diagonal,
    permuted_tanh_network,
)
from bornsparse.ops.runtime import region as _parallel
from bornsparse.ops.runtime.bodies import claim_chunk


def _operands(dtype, depth=5):
    """Odd depth runs the pair kernels; even depth the cycle walk (orthogonal blocks, so
    backward takes the inverse path)."""
    g = torch.Generator().manual_seed(5)
    width = 24
    weight = torch.randn(depth, width // 2, 2, 2, generator=g, dtype=dtype)
    if depth % 2 == 0:
        weight = torch.linalg.qr(weight)[0]
    perms = torch.stack([torch.randperm(width, generator=g) for _ in range(depth)])
    biases = torch.randn(depth, width, generator=g, dtype=dtype)
    x = torch.randn(3 * FORWARD_TILE + 5, 17, generator=g, dtype=dtype)
    return x, weight, perms, biases


def _run_all(x, weight, perms, biases):
    out = []
    for net in ("linear", "tanh"):
        xr = x.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        b = biases.clone().requires_grad_()
        if net == "linear":
            y = permuted_block_diagonal(xr, w, perms, out_features=11, backend="numba")
        else:
            y = permuted_tanh_network(xr, w, perms, b, out_features=11, backend="numba")
        y.backward(torch.sin(y.detach()))
        out += [y.detach(), xr.grad, w.grad]
    return out


@pytest.mark.parametrize("depth", [4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_openmp_pool_and_serial_launches_agree_bitwise(monkeypatch, dtype, depth):
    operands = _operands(dtype, depth)
    hows = ["threads", "serial"] + (["openmp"] if _parallel._torch_openmp() else [])
    before = torch.get_num_threads()
    results = {}
    try:
        torch.set_num_threads(3)
        for how in hows:
            monkeypatch.setattr(_parallel, "backend", lambda how=how: how)
            results[how] = _run_all(*operands)
    finally:
        torch.set_num_threads(before)
    for how in hows[1:]:
        for a, b in zip(results[hows[0]], results[how], strict=True):
            assert torch.equal(a, b), how


@pytest.mark.parametrize("how", ["threads", "openmp"])
def test_every_chunk_runs_once_when_fewer_threads_than_chunks(monkeypatch, how):
    if how == "openmp" and _parallel._torch_openmp() is None:
        pytest.skip("torch has no GNU OpenMP runtime here")
    from bornsparse.ops.permuted.numba_pairs import FORWARD_SLABS, _forward_body

    x, weight, perms, _ = _operands(torch.float64)
    depth, nb, k, _ = weight.shape
    # each chunk's scratch, filled with NaN: the kernel may assume nothing of it
    work = torch.full((7 * FORWARD_SLABS * nb * k * 16,), float("nan"), dtype=x.dtype)
    expected = permuted_block_diagonal(x, weight, perms, out_features=11, backend="reference")
    monkeypatch.setattr(_parallel, "backend", lambda: how)
    for nthreads in (2, 3):
        out = torch.full((x.shape[0], 11), float("nan"), dtype=x.dtype)
        # 7 chunks of 16 samples on 2 or 3 threads: each thread claims several
        header = _parallel.pack_header(
            _forward_body.layout, 7, 1, batch=x.shape[0], n_in=x.shape[1], depth=depth,
            nb=nb, k=k, width=nb * k, n_out=11, tile=16, x=x.data_ptr(),
            weight=weight.data_ptr(), perms=perms.data_ptr(), out=out.data_ptr(),
            saved=0, work=work.data_ptr())
        _parallel.launch(_forward_body.address, header, nthreads)
        assert header[1] == 7  # finished chunks: each exactly once
        assert header[0] == 7 + nthreads  # every thread's last claim found nothing left
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@numba.cfunc(types.void(types.voidptr))
def _body_that_gives_up(header):
    nchunks = numba.carray(header, (3,), np.int64)[2]
    while claim_chunk(header, nchunks) >= 0:
        pass  # claims every chunk, finishes none (as a body that hit an error would)


@pytest.mark.parametrize("nthreads", [1, 2])
def test_launch_raises_when_a_body_stops_before_its_chunks_are_done(nthreads):
    header = np.array([0, 0, 5], dtype=np.int64)
    with pytest.raises(RuntimeError, match="finished 0 of its 5 chunks"):
        _parallel.launch(_body_that_gives_up.address, header, nthreads)


@pytest.mark.parametrize("depth", [4, 5])
@pytest.mark.parametrize("how", ["threads", "openmp"])
def test_concurrent_calls_from_python_threads(monkeypatch, how, depth):
    if how == "openmp" and _parallel._torch_openmp() is None:
        pytest.skip("torch has no GNU OpenMP runtime here")
    monkeypatch.setattr(_parallel, "backend", lambda: how)
    x, weight, perms, _ = _operands(torch.float64, depth)
    expected = permuted_block_diagonal(x, weight, perms, backend="reference")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(
                lambda _: permuted_block_diagonal(x, weight, perms, backend="numba"), range(12)))
    finally:
        torch.set_num_threads(before)
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_backend_reports_serial_in_a_forked_child(monkeypatch):
    monkeypatch.setattr(_parallel, "in_forked_child", lambda: True)
    assert _parallel.backend() == "serial"
    monkeypatch.setattr(_parallel, "in_forked_child", lambda: False)
    assert _parallel.backend() in ("openmp", "threads")


def test_header_layout_names_every_slot_and_pack_header_checks_them():
    layout = _parallel.header_layout("ToySlot", "n alpha x y")
    assert [int(layout.nchunks), int(layout.code), int(layout.n), int(layout.y)] == [2, 3, 4, 7]
    assert len(layout) == 8
    x, y = np.zeros(3), np.ones(2)
    h = _parallel.pack_header(layout, 5, 1, n=3, alpha=7, x=x, y=y)
    assert h.tolist()[2:6] == [5, 1, 3, 7]
    assert h[layout.x] == x.ctypes.data and h[layout.y] == y.ctypes.data
    with pytest.raises(TypeError, match="no value for header field 'alpha'"):
        _parallel.pack_header(layout, 1, 0, n=3, x=x, y=y)
    with pytest.raises(TypeError, match=r"unknown header fields \['z'\]"):
        _parallel.pack_header(layout, 1, 0, n=3, alpha=0, x=x, y=y, z=1)
    with pytest.raises(TypeError, match="pointer fields must be consecutive"):
        _parallel.pack_header(layout, 1, 0, n=x, alpha=0, x=1, y=y)
    with pytest.raises(ValueError, match="repeated field"):
        _parallel.header_layout("Bad", "n n")


def test_region_bodies_from_one_template_run_their_own_chunk_loop():
    # two bodies built from the same template must not share code or on-disk cache entries
    from bornsparse.ops.discrete_cosine import numba_kernels as _dct_numba
    from bornsparse.ops.sparse import numba_matmul as _sparse_numba

    names = {b._pyfunc.__name__.rsplit("_", 1)[0] for b in (_dct_numba._twiddle_take_body,
                                                            _dct_numba._affine_take_t_body,
                                                            _sparse_numba._spmm_t_body)}
    assert names == {"_twiddle_take_chunks_body", "_affine_take_t_chunks_body",
                     "_spmm_t_chunks_body"}
    assert _dct_numba._twiddle_take_body._pyfunc.__code__.co_filename == _dct_numba.__file__
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):  # code 0 and 1 reach their own specialisation
        spec = rng.standard_normal((3, 5, 2)).astype(dtype)
        w = rng.standard_normal((5, 2)).astype(dtype)
        out = np.empty((3, 8), dtype)
        _dct_numba._twiddle_take_kernel(spec, w, out)
        z = (spec[..., 0] + 1j * spec[..., 1]) * (w[:, 0] + 1j * w[:, 1])
        np.testing.assert_allclose(out[:, :5], z.real, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[:, 5:], -z.imag[:, 3:0:-1], rtol=1e-5, atol=1e-5)
