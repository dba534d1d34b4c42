"""Cross-checks of the permuted block-diagonal op: dense matrix, PyTorch reference, numba kernel.

Float64 comparisons are tight (1e-12 relative); float32 results of the kernel are held to
a small multiple of the float32 reference's own error against float64.
"""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bornsparse.ops.permuted import (
    BACKWARD_TILE,
    FORWARD_TILE,
    permuted_block_diagonal,
    permuted_block_diagonal_dense_reference,
    permuted_block_diagonal_reference,
    permuted_tanh_network,
)


def make_operands(depth, nblocks, k, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    width = nblocks * k
    weight = torch.randn(depth, nblocks, k, k, generator=g, dtype=torch.float64) / k**0.5
    perms = torch.stack([torch.randperm(width, generator=g) for _ in range(depth)])
    return weight.to(dtype), perms


@st.composite
def cases(draw, block_sizes=(2, 3, 4)):
    k = draw(st.sampled_from(block_sizes))
    nblocks = draw(st.integers(1, 12))
    width = k * nblocks
    depth = draw(st.integers(1, 5))
    n_in = draw(st.integers(1, width))
    n_out = draw(st.integers(1, width))
    # batch sizes around the kernel tiles exercise full, partial and several tiles per thread
    batch = draw(st.sampled_from([1, 2, 7, 16, BACKWARD_TILE + 1, FORWARD_TILE + 3, 150]))
    lead = draw(st.sampled_from([(), (1,), (3,)]))
    seed = draw(st.integers(0, 2**31 - 1))
    return k, nblocks, depth, n_in, n_out, lead + (batch,), seed


@settings(max_examples=120, deadline=None)
@given(cases())
def test_dense_reference_numba_agree_forward_backward(case):
    check_against_dense_and_reference(case)


# 4 | k takes the register-blocked kernels (numba_blocks.py): 4×4 sub-blocks, one to sixteen
# of them per block; k = 5 and 6 stay on the generic loop nest beside them.
@pytest.mark.parametrize("k", [4, 5, 6, 8, 12, 16])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_every_block_size_agrees_with_dense_and_reference(k, data):
    check_against_dense_and_reference(data.draw(cases(block_sizes=(k,))))


def test_kept_factor_inputs_give_the_recomputed_backward_and_bad_ones_are_refused():
    # from k = KEEP_INPUTS_MIN_BLOCK forward keeps every factor's input; the backward op
    # given an empty `final` recomputes them instead: both must agree
    from bornsparse.ops.permuted.custom_ops import KEEP_INPUTS_MIN_BLOCK

    k = KEEP_INPUTS_MIN_BLOCK
    weight, perms = make_operands(3, 3, k, seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(FORWARD_TILE + 9, 3 * k - 5, generator=g, dtype=torch.float64)
    gy = torch.randn(x.shape[0], 3 * k - 2, generator=g, dtype=torch.float64)
    op = torch.ops.bornsparse
    y, kept = op.permuted_block_diagonal(x, weight, perms, gy.shape[1], 0, True)
    assert kept.shape == (3, 3 * k, x.shape[0])
    from_kept = op.permuted_block_diagonal_backward(gy, x, weight, perms, kept, 0)
    recomputed = op.permuted_block_diagonal_backward(gy, x, weight, perms, kept[:0], 0)
    for a, b in zip(from_kept, recomputed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"final must be empty.*\(3, 48, 73\)"):
        op.permuted_block_diagonal_backward(gy, x, weight, perms, kept[:, :, 1:], 0)
    w8, p8 = make_operands(2, 6, 8, seed=9)
    _, nothing = op.permuted_block_diagonal(x, w8, p8, 30, 0, True)
    assert nothing.numel() == 0  # k = 8 recomputes
    with pytest.raises(ValueError, match="got k = 8"):
        op.permuted_block_diagonal_backward(gy[:, :30], x, w8, p8,
                                            torch.zeros(2, 48, x.shape[0], dtype=x.dtype), 0)


def check_against_dense_and_reference(case):
    k, nblocks, depth, n_in, n_out, batch_shape, seed = case
    weight, perms = make_operands(depth, nblocks, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*batch_shape, n_in, generator=g, dtype=torch.float64)
    gy = torch.randn(*batch_shape, n_out, generator=g, dtype=torch.float64)

    dense = permuted_block_diagonal_dense_reference(weight, perms)[:n_out, :n_in]
    y_dense = x @ dense.T

    out = {}
    for backend in ("reference", "numba"):
        xr = x.clone().requires_grad_()
        wr = weight.clone().requires_grad_()
        y = permuted_block_diagonal(xr, wr, perms, out_features=n_out, backend=backend)
        y.backward(gy)
        out[backend] = (y.detach(), xr.grad, wr.grad)

    scale = 1e-12 * (1 + y_dense.abs().max().item())
    torch.testing.assert_close(out["reference"][0], y_dense, rtol=1e-12, atol=scale)
    torch.testing.assert_close(out["numba"][0], y_dense, rtol=1e-12, atol=scale)
    # gradient of <gy, G x> with respect to x is Gᵀ gy
    torch.testing.assert_close(out["numba"][1], gy @ dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["numba"][1], out["reference"][1], rtol=1e-12, atol=1e-12)
    gw_scale = 1e-12 * (1 + out["reference"][2].abs().max().item())
    torch.testing.assert_close(out["numba"][2], out["reference"][2], rtol=1e-11, atol=gw_scale)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6, 7])
def test_block_size_2_fused_pair_backward_every_depth_parity(depth):
    # k = 2 backward runs in fused factor pairs (odd depth: last factor alone), saving every
    # other factor's input; padded input rows, dropped output rows and a partial second tile
    weight, perms = make_operands(depth, 9, 2, seed=depth)
    g = torch.Generator().manual_seed(100 + depth)
    x = torch.randn(BACKWARD_TILE + 5, 11, generator=g, dtype=torch.float64)
    gy = torch.randn(BACKWARD_TILE + 5, 13, generator=g, dtype=torch.float64)
    out = {}
    for backend in ("reference", "numba"):
        xr = x.clone().requires_grad_()
        wr = weight.clone().requires_grad_()
        permuted_block_diagonal(xr, wr, perms, out_features=13, backend=backend).backward(gy)
        out[backend] = (xr.grad, wr.grad)
    for a, b in zip(out["numba"], out["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("k,nblocks,depth,n_in,n_out,batch", [
    (2, 6, 4, 12, 12, 70),
    (4, 5, 3, 13, 7, 40),
    (2, 512, 6, 1000, 1000, 33),
])
def test_float32_kernel_error_is_within_float32_reference_error(k, nblocks, depth, n_in, n_out,
                                                                 batch):
    weight, perms = make_operands(depth, nblocks, k, seed=3)
    x = torch.randn(batch, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    gy = torch.randn(batch, n_out, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def run(dtype, backend):
        xr = x.to(dtype).clone().requires_grad_()
        wr = weight.to(dtype).clone().requires_grad_()
        y = permuted_block_diagonal(xr, wr, perms, out_features=n_out, backend=backend)
        y.backward(gy.to(dtype))
        return [t.double() for t in (y.detach(), xr.grad, wr.grad)]

    exact = run(torch.float64, "reference")
    ref32 = run(torch.float32, "reference")
    fast32 = run(torch.float32, "numba")
    eps = torch.finfo(torch.float32).eps
    for e, r, f in zip(exact, ref32, fast32, strict=True):
        ref_err = (r - e).abs().max().item()
        fast_err = (f - e).abs().max().item()
        assert fast_err <= 4 * ref_err + 8 * eps * e.abs().max().item()


@pytest.mark.parametrize("k,nblocks,depth,n_in,n_out,batch", [
    (2, 3, 3, 5, 6, 1),
    (2, 4, 2, 3, 3, FORWARD_TILE + 5),
    (3, 3, 2, 7, 9, 4),
    (4, 2, 3, 6, 5, 3),
])
def test_numba_gradcheck_float64(k, nblocks, depth, n_in, n_out, batch):
    weight, perms = make_operands(depth, nblocks, k, seed=11)
    x = torch.randn(batch, n_in, dtype=torch.float64, requires_grad=True)
    w = weight.clone().requires_grad_()

    def f(x, w):
        return permuted_block_diagonal(x, w, perms, out_features=n_out, backend="numba")

    assert torch.autograd.gradcheck(f, (x, w))


def test_numba_partial_weight_gradients_sum_over_threads():
    # tiles are dealt to torch.get_num_threads() threads, each with its own weight-gradient
    # partial; the sums must agree with 1, 2 and 3 threads
    weight, perms = make_operands(4, 8, 2, seed=2)
    x = torch.randn(3 * FORWARD_TILE + 1, 16, dtype=torch.float64)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            xr = x.clone().requires_grad_()
            w = weight.clone().requires_grad_()
            y = permuted_block_diagonal(xr, w, perms, backend="numba")
            y.backward(torch.cos(y.detach()))
            results.append((y.detach(), xr.grad, w.grad))
    finally:
        torch.set_num_threads(before)
    xr = x.clone().requires_grad_()
    ref_w = weight.clone().requires_grad_()
    y_ref = permuted_block_diagonal_reference(xr, ref_w, perms)
    y_ref.backward(torch.cos(y_ref.detach()))
    for got in results:
        for a, b in zip(got, (y_ref.detach(), xr.grad, ref_w.grad), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_auto_dispatch_picks_numba_for_cpu_float32_and_float64_only():
    weight, perms = make_operands(2, 4, 2, seed=0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(3, 8, dtype=dtype, requires_grad=True)
        y = permuted_block_diagonal(x, weight.to(dtype), perms)
        assert "bornsparse" in type(y.grad_fn).__name__.lower() or (
            "permuted_block_diagonal" in y.grad_fn.name()
        )
        y_ref = permuted_block_diagonal(x, weight.to(dtype), perms, backend="reference")
        assert "permuted_block_diagonal" not in y_ref.grad_fn.name()
    xb = torch.randn(3, 8, dtype=torch.bfloat16)
    y16 = permuted_block_diagonal(xb, weight.to(torch.bfloat16), perms)
    expect = permuted_block_diagonal_reference(xb.double(), weight, perms)
    torch.testing.assert_close(y16.double(), expect, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="backend='numba' needs CPU float32/float64"):
        permuted_block_diagonal(xb, weight.to(torch.bfloat16), perms, backend="numba")


def test_double_backward_raises_on_numba_and_works_on_reference():
    weight, perms = make_operands(2, 3, 2, seed=1)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    w = weight.clone().requires_grad_()
    (gx,) = torch.autograd.grad(
        permuted_block_diagonal(x, w, perms, backend="numba").pow(2).sum(), x, create_graph=True
    )
    with pytest.raises(RuntimeError, match="double backward through the numba kernel"):
        gx.sum().backward()
    assert torch.autograd.gradgradcheck(
        lambda x, w: permuted_block_diagonal(x, w, perms, backend="reference"), (x, w)
    )


def test_empty_batch_and_noncontiguous_input():
    weight, perms = make_operands(3, 4, 2, seed=5)
    x0 = torch.zeros(0, 8, dtype=torch.float64, requires_grad=True)
    w = weight.clone().requires_grad_()
    y0 = permuted_block_diagonal(x0, w, perms, backend="numba")
    assert y0.shape == (0, 8)
    y0.sum().backward()
    assert x0.grad.shape == (0, 8)
    assert torch.equal(w.grad, torch.zeros_like(w))
    xt = torch.randn(8, 5, dtype=torch.float64).T  # (5, 8), not contiguous
    torch.testing.assert_close(
        permuted_block_diagonal(xt, weight, perms, backend="numba"),
        permuted_block_diagonal_reference(xt, weight, perms),
    )


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_perms_that_are_not_permutations_are_rejected(backend):
    weight, perms = make_operands(2, 4, 2, seed=0)
    x = torch.randn(2, 8, dtype=torch.float64)
    repeated = perms.clone()
    repeated[1, 0] = repeated[1, 1]
    out_of_range = perms.clone()
    out_of_range[0, 3] = 8
    negative = perms.clone()
    negative[0, 0] = -1
    for bad in (repeated, out_of_range, negative):
        with pytest.raises(ValueError, match="permutation of range"):
            permuted_block_diagonal(x, weight, bad, backend=backend)


def test_operand_validation_names_argument_value_and_expectation():
    weight, perms = make_operands(2, 4, 2, seed=0)
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cuda'"):
        permuted_block_diagonal(x, weight, perms, backend="cuda")
    with pytest.raises(TypeError, match="x must have a real floating dtype.*torch.int64"):
        permuted_block_diagonal(x.long(), weight, perms)
    with pytest.raises(TypeError, match="x must have a real floating dtype.*complex128"):
        permuted_block_diagonal(x.to(torch.complex128), weight, perms)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        permuted_block_diagonal(x, weight.numpy(), perms)
    with pytest.raises(ValueError, match=r"weight must have shape .*got \(2, 4, 2\)"):
        permuted_block_diagonal(x, weight[..., 0], perms)
    with pytest.raises(TypeError, match="perms must have dtype torch.int64, got torch.int32"):
        permuted_block_diagonal(x, weight, perms.int())
    with pytest.raises(ValueError, match=r"perms must have shape .*\(2, 8\).*got \(1, 8\)"):
        permuted_block_diagonal(x, weight, perms[:1])
    with pytest.raises(TypeError, match="share a dtype.*float32.*float64"):
        permuted_block_diagonal(x.float(), weight, perms)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., n_in\) with 1 <= n_in <= 8"):
        permuted_block_diagonal(torch.randn(2, 9, dtype=torch.float64), weight, perms)
    with pytest.raises(ValueError, match="out_features must be at most width = 8, got 9"):
        permuted_block_diagonal(x, weight, perms, out_features=9)
    with pytest.raises(ValueError, match="out_features must be a positive integer, got 0"):
        permuted_block_diagonal(x, weight, perms, out_features=0)


@settings(max_examples=60, deadline=None)
@given(cases(block_sizes=(2, 3, 4, 8, 16)))
def test_tanh_network_numba_matches_reference(case):
    k, nblocks, depth, n_in, n_out, batch_shape, seed = case
    weight, perms = make_operands(depth, nblocks, k, seed)
    g = torch.Generator().manual_seed(seed + 2)
    biases = torch.randn(depth, nblocks * k, generator=g, dtype=torch.float64)
    x = torch.randn(*batch_shape, n_in, generator=g, dtype=torch.float64)
    out = {}
    for backend in ("reference", "numba"):
        xr, wr, br = (t.clone().requires_grad_() for t in (x, weight, biases))
        y = permuted_tanh_network(xr, wr, perms, br, out_features=n_out, backend=backend)
        y.backward(torch.cos(y.detach()))
        out[backend] = (y.detach(), xr.grad, wr.grad, br.grad)
    for a, b in zip(out["numba"], out["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_tanh_network_numba_gradcheck_and_bias_validation():
    weight, perms = make_operands(3, 4, 2, seed=7)
    biases = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(37, 5, dtype=torch.float64, requires_grad=True)
    w = weight.clone().requires_grad_()

    def f(x, w, b):
        return permuted_tanh_network(x, w, perms, b, out_features=6, backend="numba")

    assert torch.autograd.gradcheck(f, (x, w, biases))
    with pytest.raises(ValueError, match=r"biases must have shape .*\(3, 8\).*got \(3, 7\)"):
        permuted_tanh_network(x, weight, perms, biases[:, :7])
    with pytest.raises(TypeError, match="biases must match x's dtype"):
        permuted_tanh_network(x, weight, perms, biases.float())


def _forward_in_child(args):
    from bornsparse.ops.runtime import region as _parallel

    x, weight, perms = args
    torch.set_num_threads(2)
    return permuted_block_diagonal(x, weight, perms, backend="numba"), _parallel.backend()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_kernels_survive_fork():
    # a forked child inherits libgomp's team (and any pool object) without their threads; the
    # op must not hang there
    weight, perms = make_operands(2, 8, 2, seed=3)
    x = torch.randn(2 * FORWARD_TILE + 3, 16, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        # starts the thread team
        expected = permuted_block_diagonal(x, weight, perms, backend="numba")
    finally:
        torch.set_num_threads(before)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got, how = pool.apply_async(_forward_in_child, ((x, weight, perms),)).get(timeout=120)
    torch.testing.assert_close(got, expected)
    assert how == "serial"  # the at-fork hook marked the child


def test_custom_op_called_directly_validates_what_the_kernel_trusts():
    weight, perms = make_operands(2, 4, 2, seed=0)
    x = torch.randn(3, 8, dtype=torch.float64)

    def apply(x, weight, perms, out_features):
        return torch.ops.bornsparse.permuted_block_diagonal(x, weight, perms, out_features, 0,
                                                            False)[0]

    with pytest.raises(TypeError, match="x and weight must share a dtype"):
        apply(x, weight.float(), perms, 8)
    with pytest.raises(TypeError, match="perms must have dtype torch.int64"):
        apply(x, weight, perms.int(), 8)
    bad = perms.clone()
    bad[1, 0] = bad[1, 1]
    with pytest.raises(ValueError, match="perms must hold a permutation"):
        apply(x, weight, bad, 8)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, n_in\)"):
        apply(x.unsqueeze(0), weight, perms, 8)
    with pytest.raises(ValueError, match="out_features must be at most width"):
        apply(x, weight, perms, 9)
    with pytest.raises(ValueError, match="needs CPU float32/float64"):
        apply(x.half(), weight.half(), perms, 8)
    torch.testing.assert_close(apply(x, weight, perms, 8),
                               permuted_block_diagonal_reference(x, weight, perms))
