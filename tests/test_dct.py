import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bornsparse.ops.discrete_cosine import dct, dct_matrix, idct

LENGTHS = [1, 2, 3, 4, 5, 7, 8, 9, 16, 31, 64, 100, 127]


@pytest.mark.parametrize("n", LENGTHS)
def test_dct_matches_scipy_float64(n):
    x = torch.randn(3, n, dtype=torch.float64)
    want = scipy.fft.dct(x.numpy(), norm="ortho", axis=-1)
    np.testing.assert_allclose(dct(x).numpy(), want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("n", LENGTHS)
def test_idct_matches_scipy_float64(n):
    x = torch.randn(2, n, dtype=torch.float64)
    want = scipy.fft.idct(x.numpy(), norm="ortho", axis=-1)
    np.testing.assert_allclose(idct(x).numpy(), want, rtol=0, atol=1e-13)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    data=st.data(),
)
def test_dct_any_dim_roundtrip(shape, data):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = torch.randn(*shape, dtype=torch.float64)
    y = dct(x, dim=dim)
    want = scipy.fft.dct(x.numpy(), norm="ortho", axis=dim)
    np.testing.assert_allclose(y.numpy(), want, atol=1e-12)
    torch.testing.assert_close(idct(y, dim=dim), x, atol=1e-12, rtol=0)


def test_float32_error_is_comparable_to_scipy():
    x = torch.randn(4, 1000, dtype=torch.float64)
    exact = scipy.fft.dct(x.numpy(), norm="ortho")
    ours = dct(x.float()).double().numpy()
    theirs = scipy.fft.dct(x.float().numpy(), norm="ortho").astype(np.float64)
    # a fair tolerance: a small multiple of scipy's own float32 error
    assert np.abs(ours - exact).max() <= 4 * np.abs(theirs - exact).max() + 1e-7


def test_half_dtypes_keep_dtype():
    x = torch.randn(2, 12)
    for dt in (torch.float16, torch.bfloat16):
        y = dct(x.to(dt))
        assert y.dtype == dt
        torch.testing.assert_close(y.float(), dct(x), atol=0.05, rtol=0.05)


def test_dct_is_orthonormal():
    n = 17
    m = dct(torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(m @ m.T, torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_gradcheck(n):
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dct, (x,))
    assert torch.autograd.gradcheck(idct, (x,))
    assert torch.autograd.gradcheck(lambda t: dct(t, dim=0), (x,))


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (7, 3), (10, 10), (5, 12)])
def test_dct_matrix_matches_scipy_eye(rows, cols):
    q = max(rows, cols)
    want = scipy.fft.dct(np.eye(q), norm="ortho")[:rows, :cols]
    got = dct_matrix(rows, cols, dtype=torch.float64).numpy()
    np.testing.assert_allclose(got, want, atol=1e-14)
    # and it is what dct() of the zero-padded input computes
    x = torch.randn(4, rows, dtype=torch.float64)
    padded = torch.nn.functional.pad(x, (0, q - rows))
    torch.testing.assert_close(dct(padded)[:, :cols], x @ torch.from_numpy(want))


def test_dct_matrix_float32_large_is_accurate():
    got = dct_matrix(300, 4096, dtype=torch.float32).double()
    want = dct_matrix(300, 4096, dtype=torch.float64)
    assert (got - want).abs().max() < 1e-7


def test_bad_input():
    with pytest.raises(TypeError, match="x must have a real floating dtype"):
        dct(torch.arange(4))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        idct([1.0, 2.0])
    with pytest.raises(ValueError, match="dim must lie in"):
        dct(torch.randn(3, 4), dim=2)
    with pytest.raises(TypeError, match="dim must be an int"):
        dct(torch.randn(3), dim=0.0)
    with pytest.raises(ValueError, match="0-d"):
        idct(torch.tensor(1.0))
    with pytest.raises(ValueError, match="length must be at least"):
        dct_matrix(4, 5, length=4)
    with pytest.raises(ValueError, match="rows must be a positive integer"):
        dct_matrix(0, 5)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 9, 100, 1001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_twiddle_matches_torch_reference(monkeypatch, n, dtype):
    import bornsparse.ops.discrete_cosine.transform as D

    x = torch.randn(7, n, dtype=dtype)
    monkeypatch.setattr(D, "_NUMBA_MIN_SIZE", 1 << 62)
    ref_fwd, ref_inv = dct(x), idct(x)
    monkeypatch.setattr(D, "_NUMBA_MIN_SIZE", 0)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(dct(x), ref_fwd, **tol)
    torch.testing.assert_close(idct(x), ref_inv, **tol)
    if dtype == torch.float64 and n <= 9:  # gradcheck costs 2·numel kernel calls
        xg = x[:2].clone().requires_grad_()
        assert torch.autograd.gradcheck(dct, (xg,))
        assert torch.autograd.gradcheck(idct, (xg,))


# (b, n, m): the twiddle passes branch on m against n and n//2 + 1: m == n, m <= n//2 + 1,
# n//2 + 1 < m < n (60 of 100, 70 of 101), m just below and at n//2 + 1 for odd n
@pytest.mark.parametrize("b,n,m", [(1, 1, 1), (3, 5, 3), (4, 3, 7), (2, 8, 8), (6, 100, 37),
                                   (2, 37, 100), (3, 100, 60), (2, 101, 70), (2, 101, 50),
                                   (2, 101, 51)])
@pytest.mark.parametrize("use_y,use_bias", [(True, True), (False, False), (True, False)])
def test_fused_dct_affine_matches_reference(monkeypatch, b, n, m, use_y, use_bias):
    import bornsparse.ops.discrete_cosine.transform as D

    monkeypatch.setattr(D, "_NUMBA_MIN_SIZE", 0)
    g = torch.Generator().manual_seed(n * m)
    ts = [torch.randn(s, dtype=torch.float64, generator=g) for s in [(b, n), (), (b, m), (m,)]]
    a = [t.clone().requires_grad_() for t in ts]
    r = [t.clone().requires_grad_() for t in ts]

    def pick(v):
        return (v[0], m, v[1], v[2] if use_y else None, v[3] if use_bias else None)

    out = D.dct_project_affine(*pick(a))
    ref = D.dct_project_affine_reference(*pick(r))
    torch.testing.assert_close(out, ref)
    # and the reference is x @ D (zero-padded DCT, truncated) as in scipy
    q = max(n, m)
    dmat = torch.from_numpy(scipy.fft.dct(np.eye(q), norm="ortho")[:n, :m])
    want = ts[1] * ts[0] @ dmat + (ts[2] if use_y else 0) + (ts[3] if use_bias else 0)
    torch.testing.assert_close(ref, want)
    gy = torch.randn(b, m, dtype=torch.float64, generator=g)
    out.backward(gy)
    ref.backward(gy)
    for p, q_ in zip(a, r, strict=True):
        if q_.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q_.grad)


def test_fused_dct_affine_gradcheck(monkeypatch):
    import bornsparse.ops.discrete_cosine.transform as D

    monkeypatch.setattr(D, "_NUMBA_MIN_SIZE", 0)
    for n, m in [(3, 5), (5, 3), (4, 4)]:
        args = [torch.randn(s, dtype=torch.float64, requires_grad=True)
                for s in [(2, n), (), (2, m), (m,)]]
        assert torch.autograd.gradcheck(
            lambda x, al, y, bi, m=m: D.dct_project_affine(x, m, al, y, bi), args
        )


def test_empty_batch():
    x = torch.zeros(0, 6, requires_grad=True)
    assert dct(x).shape == (0, 6) and idct(x).shape == (0, 6)
    dct(x).sum().backward()
    assert x.grad.shape == (0, 6)


def _sparse_case(b, n, m, nnz, seed):
    from bornsparse.ops.sparse_product import build_plan, sort_support

    g = torch.Generator().manual_seed(seed)
    lin = torch.randperm(n * m, generator=g)[:nnz]
    idx, _ = sort_support(torch.stack((lin // n, lin % n)), (m, n))
    ts = [torch.randn(s, dtype=torch.float64, generator=g) for s in [(b, n), (), (nnz,), (m,)]]
    return ts, idx, build_plan(idx, (m, n))


# (b, n, m): batch 1, odd sizes, n < m and n > m, batches spanning several blocks, and the
# twiddle passes' branches on m against q//2 + 1 (60 of 100, 70 and 50 of 101)
@pytest.mark.parametrize("b,n,m", [(1, 1, 1), (3, 5, 3), (37, 7, 12), (20, 12, 7),
                                   (17, 100, 37), (33, 37, 100), (5, 100, 60), (3, 101, 70),
                                   (3, 101, 50)])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("grads", ["all", "values_only", "x_only"])
def test_fused_dct_sparse_affine_matches_reference(monkeypatch, b, n, m, use_bias, grads):
    import bornsparse.ops.discrete_cosine.plus_sparse as A
    import bornsparse.ops.discrete_cosine.transform as D

    monkeypatch.setattr(D, "_NUMBA_MIN_SIZE", 0)
    monkeypatch.setattr(A, "_BLOCK_BYTES", 0)  # blocks of 16 samples: several per batch
    ts, idx, plan = _sparse_case(b, n, m, max(1, n * m // 3), seed=b + n + m)
    want_grad = {"all": [True] * 4, "values_only": [False, False, True, False],
                 "x_only": [True, False, False, False]}[grads]
    a = [t.clone().requires_grad_(w) for t, w in zip(ts, want_grad, strict=True)]
    r = [t.clone().requires_grad_(w) for t, w in zip(ts, want_grad, strict=True)]
    out = A.dct_sparse_affine(a[0], m, a[1], a[2], plan, a[3] if use_bias else None)
    ref = A.dct_sparse_affine_reference(r[0], m, r[1], r[2], idx, r[3] if use_bias else None)
    torch.testing.assert_close(out, ref)
    # the reference is α·x@D + x Sᵀ + bias with D from scipy
    q = max(n, m)
    dmat = torch.from_numpy(scipy.fft.dct(np.eye(q), norm="ortho")[:n, :m])
    s = torch.zeros(m, n, dtype=torch.float64)
    s[idx[0], idx[1]] = ts[2]
    want = ts[1] * ts[0] @ dmat + ts[0] @ s.T + (ts[3] if use_bias else 0)
    torch.testing.assert_close(ref, want)
    gy = torch.randn(b, m, dtype=torch.float64)
    out.backward(gy)
    ref.backward(gy)
    for p, q_ in zip(a, r, strict=True):
        if q_.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q_.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_dct_sparse_affine_unpatched_sizes(dtype):
    # large enough that the default thresholds take the fused path, several default blocks
    import bornsparse.ops.discrete_cosine.plus_sparse as A

    b, n, m = 150, 300, 257
    ts, idx, plan = _sparse_case(b, n, m, 500, seed=1)
    ts = [t.to(dtype).requires_grad_() for t in ts]
    out = A.dct_sparse_affine(ts[0], m, ts[1], ts[2], plan, ts[3])
    x, al, v, bi = (t.detach().double() for t in ts)
    ref = A.dct_sparse_affine_reference(x, m, al, v, idx, bi)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(out.double(), ref, **tol)
    out.sum().backward()
    assert all(t.grad is not None for t in ts)


def test_fused_dct_sparse_affine_gradcheck(monkeypatch):
    import bornsparse.ops.discrete_cosine.plus_sparse as A
    import bornsparse.ops.discrete_cosine.transform as D

    monkeypatch.setattr(D, "_NUMBA_MIN_SIZE", 0)
    monkeypatch.setattr(A, "_BLOCK_BYTES", 0)
    for b, n, m in [(2, 3, 5), (17, 5, 3), (1, 4, 4)]:
        ts, idx, plan = _sparse_case(b, n, m, max(1, n * m // 2), seed=n)
        args = [t.clone().requires_grad_() for t in ts]
        assert torch.autograd.gradcheck(
            lambda x, al, v, bi, m=m, plan=plan: A.dct_sparse_affine(x, m, al, v, plan, bi),
            args,
        )


def test_fused_dct_sparse_affine_rejects_mismatched_plan():
    import bornsparse.ops.discrete_cosine.plus_sparse as A

    ts, _, plan = _sparse_case(2, 5, 3, 4, seed=0)
    with pytest.raises(ValueError, match="plan and values must describe a"):
        A.dct_sparse_affine(ts[0], 4, ts[1], ts[2], plan, None)
    with pytest.raises(ValueError, match="plan and values must describe a"):
        A.dct_sparse_affine(ts[0], 3, ts[1], ts[2][:3], plan, None)
