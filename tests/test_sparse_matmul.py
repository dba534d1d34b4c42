import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bornsparse.ops.backends import BACKENDS
from bornsparse.ops.sparse_product import (
    build_plan,
    check_indices,
    sort_support,
    sparse_matmul,
    sparse_matmul_reference,
)

FAST = ["numba", "torch_sparse"]


def random_support(rows, cols, nnz, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.randperm(rows * cols, generator=g)[:nnz].sort().values
    return torch.stack([lin // cols, lin % cols])


def dense_of(values, indices, shape):
    w = torch.zeros(shape, dtype=values.dtype)
    w[indices[0], indices[1]] = values
    return w


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    batch=st.integers(1, 19),
    frac=st.floats(0.01, 1.0),
    backend=st.sampled_from(FAST),
    seed=st.integers(0, 2**16),
)
def test_fast_paths_match_reference_float64(rows, cols, batch, frac, backend, seed):
    nnz = max(1, int(frac * rows * cols))
    idx = random_support(rows, cols, nnz, seed)
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(nnz, dtype=torch.float64, generator=g)
    x = torch.randn(batch, cols, dtype=torch.float64, generator=g)
    xa, va = x.clone().requires_grad_(), v.clone().requires_grad_()
    xb, vb = x.clone().requires_grad_(), v.clone().requires_grad_()
    ya = sparse_matmul(xa, va, idx, (rows, cols), backend=backend)
    yb = sparse_matmul_reference(xb, vb, idx, (rows, cols))
    torch.testing.assert_close(ya, yb)
    # and the reference is the dense product
    torch.testing.assert_close(yb, x @ dense_of(v, idx, (rows, cols)).T)
    gy = torch.randn_like(ya)
    ya.backward(gy)
    yb.backward(gy)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(va.grad, vb.grad)


@pytest.mark.parametrize("backend", FAST + ["reference"])
@pytest.mark.parametrize("rows,cols,nnz,batch", [(1, 1, 1, 1), (5, 7, 9, 3), (9, 4, 36, 2)])
def test_gradcheck(backend, rows, cols, nnz, batch):
    idx = random_support(rows, cols, nnz)
    x = torch.randn(batch, cols, dtype=torch.float64, requires_grad=True)
    v = torch.randn(nnz, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: sparse_matmul(a, b, idx, (rows, cols), backend=backend), (x, v)
    )


@pytest.mark.parametrize("backend", FAST)
def test_float32_error_is_comparable_to_dense(backend):
    rows, cols, batch = 300, 500, 33
    idx = random_support(rows, cols, 3000)
    v = torch.randn(3000, dtype=torch.float64)
    x = torch.randn(batch, cols, dtype=torch.float64)
    exact = x @ dense_of(v, idx, (rows, cols)).T
    ours = sparse_matmul(x.float(), v.float(), idx, (rows, cols), backend=backend).double()
    dense32 = (x.float() @ dense_of(v.float(), idx, (rows, cols)).T).double()
    assert (ours - exact).abs().max() <= 4 * (dense32 - exact).abs().max() + 1e-6


# "triton" runs on CPU tensors only under Triton's interpreter: tests/test_triton.py
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_leading_dims_and_plan_reuse(backend):
    idx = random_support(6, 5, 11)
    plan = build_plan(idx, (6, 5))
    v = torch.randn(11, dtype=torch.float64)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    y = sparse_matmul(x, v, idx, (6, 5), plan=plan, backend=backend)
    assert y.shape == (2, 3, 6)
    torch.testing.assert_close(y, x @ dense_of(v, idx, (6, 5)).T)


def test_batch_zero():
    idx = random_support(4, 3, 5)
    y = sparse_matmul(torch.zeros(0, 3), torch.ones(5), idx, (4, 3))
    assert y.shape == (0, 4)


def test_plan_structure():
    idx = torch.tensor([[0, 0, 2], [1, 3, 0]])
    plan = build_plan(idx, (3, 4))
    assert plan.rowptr.tolist() == [0, 2, 2, 3]
    assert plan.colptr.tolist() == [0, 1, 2, 2, 3]
    assert plan.csc_rows.tolist() == [2, 0, 0]


def test_sort_support_permutes_values():
    idx = torch.tensor([[2, 0, 1], [0, 3, 1]])
    s, v = sort_support(idx, (3, 4), torch.tensor([1.0, 2.0, 3.0]))
    assert s.tolist() == [[0, 1, 2], [3, 1, 0]]
    assert v.tolist() == [2.0, 3.0, 1.0]
    with pytest.raises(ValueError, match="duplicate"):
        sort_support(torch.tensor([[1, 1], [2, 2]]), (3, 4))
    with pytest.raises(TypeError, match="integer dtype"):
        sort_support(torch.tensor([[1.0], [2.0]]), (3, 4))


def test_bad_input():
    idx = random_support(4, 3, 5)
    v, x = torch.ones(5), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\)"):
        sparse_matmul(torch.ones(2, 4), v, idx, (4, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_matmul(x, v, idx, (4, 3), backend="cuda")
    with pytest.raises(ValueError, match="numba needs a CPU float32/float64|backend='numba'"):
        sparse_matmul(x.half(), v.half(), idx, (4, 3), backend="numba")
    with pytest.raises(TypeError, match="values must match x's dtype"):
        sparse_matmul(x, v.double(), idx, (4, 3))
    with pytest.raises(ValueError, match="values must be 1-D"):
        sparse_matmul(x, v[None], idx, (4, 3))
    with pytest.raises(ValueError, match="shape must be a pair"):
        sparse_matmul(x, v, idx, (4, 0))
    with pytest.raises(ValueError, match="plan describes"):
        sparse_matmul(x, v[:4], idx, (4, 3), plan=build_plan(idx, (4, 3)))
    with pytest.raises(TypeError, match="int32 or torch.int64"):
        check_indices(idx.short(), (4, 3))
    with pytest.raises(ValueError, match=r"indices\[0\] \(rows\) must lie in \[0, 4\)"):
        check_indices(torch.tensor([[4], [0]]), (4, 3))
    with pytest.raises(ValueError, match=r"indices\[1\] \(columns\) must lie in \[0, 3\)"):
        check_indices(torch.tensor([[0], [-1]]), (4, 3))
    with pytest.raises(ValueError, match="sorted row-major without duplicates"):
        check_indices(torch.tensor([[1, 0], [0, 0]]), (4, 3))
    with pytest.raises(ValueError, match="sorted row-major without duplicates"):
        check_indices(torch.tensor([[1, 1], [0, 0]]), (4, 3))
    with pytest.raises(ValueError, match="exactly nnz = 3"):
        check_indices(idx, (4, 3), nnz=3)
    with pytest.raises(ValueError, match=r"shape \(2, nnz\)"):
        check_indices(idx[0], (4, 3))


@pytest.mark.parametrize("min_work", [0, 1 << 62])
def test_parallel_and_serial_numba_kernels_agree(monkeypatch, min_work):
    import bornsparse.ops.sparse.matmul as sm

    monkeypatch.setattr(sm, "PARALLEL_MIN_WORK", min_work)
    for rows, cols, nnz, batch in [(1, 1, 1, 1), (17, 9, 40, 5), (64, 80, 900, 33)]:
        idx = random_support(rows, cols, nnz, seed=rows)
        v = torch.randn(nnz, dtype=torch.float64, requires_grad=True)
        x = torch.randn(batch, cols, dtype=torch.float64, requires_grad=True)
        y = sparse_matmul(x, v, idx, (rows, cols), backend="numba")
        gy = torch.randn_like(y)
        gx, gv = torch.autograd.grad(y, (x, v), gy)
        yr = sparse_matmul_reference(x, v, idx, (rows, cols))
        gxr, gvr = torch.autograd.grad(yr, (x, v), gy)
        torch.testing.assert_close(y, yr)
        torch.testing.assert_close(gx, gxr)
        torch.testing.assert_close(gv, gvr)


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 23), cols=st.integers(1, 23), batch=st.integers(1, 19),
    frac=st.floats(0.05, 1.0), seed=st.integers(0, 10_000), parallel=st.booleans(),
)
def test_fused_backward_kernel_matches_reference(rows, cols, batch, frac, seed, parallel):
    # grad_x and grad_values from one sweep (ops/sparse/numba_matmul.py), against plain torch
    from bornsparse.ops.sparse import numba_matmul as ks

    g = torch.Generator().manual_seed(seed)
    nnz = max(1, int(frac * rows * cols))
    lin = torch.randperm(rows * cols, generator=g)[:nnz].sort().values
    idx = torch.stack((lin // cols, lin % cols))
    plan = build_plan(idx, (rows, cols))
    vals = torch.randn(nnz, dtype=torch.float64, generator=g)
    x = torch.randn(batch, cols, dtype=torch.float64, generator=g, requires_grad=True)
    v = vals.clone().requires_grad_()
    gy = torch.randn(batch, rows, dtype=torch.float64, generator=g)
    sparse_matmul_reference(x, v, idx, (rows, cols)).backward(gy)
    gx_t = torch.empty(cols, batch, dtype=torch.float64)
    gv_csc = torch.zeros(nnz, dtype=torch.float64)
    fn = ks._spmm_t_sampled_dot_kernel if parallel else ks._spmm_t_sampled_dot_serial_kernel
    fn(plan.colptr.numpy(), plan.csc_rows.numpy(), vals[plan.csc_perm].numpy(),
       gy.t().contiguous().numpy(), x.detach().t().contiguous().numpy(), gx_t.numpy(),
       gv_csc.numpy())
    gv = torch.empty_like(gv_csc)
    gv[plan.csc_perm] = gv_csc
    torch.testing.assert_close(gx_t.t(), x.grad)
    torch.testing.assert_close(gv, v.grad)


def test_support_checks_run_once_per_support_version(monkeypatch):
    # a layer hands the op fresh views of its indices every call; the O(nnz) support check
    # must still run once per version of the buffer, not once per call
    import bornsparse.ops.runtime.validated as V
    from bornsparse.nn import SparseLinear

    calls = []
    real = V.check_once

    def counting(tag, tensors, check):
        return real(tag, tensors, lambda: (calls.append(tag), check()))

    monkeypatch.setattr("bornsparse.ops.sparse.plan.check_once", counting)
    layer = SparseLinear(30, 20, density=0.2, seed=0)
    x = torch.randn(4, 30, requires_grad=True)
    for _ in range(3):
        layer(x).sum().backward()
    assert calls == ["sparse plan"]  # forward and backward, three steps: checked once
    # a new support of the same size (written in place): checked again, then cached again
    g = torch.Generator().manual_seed(1)
    lin = torch.randperm(600, generator=g)[: layer.nnz]
    layer.update_support_(torch.stack((lin // 30, lin % 30)), layer.values.detach())
    for _ in range(2):
        layer(x).sum().backward()
    assert calls == ["sparse plan", "sparse plan"]
