"""The permuted operator's batched-GEMM path (blocks of 32 and more on the CPU): against the
dense matrix and the reference in float64 on odd shapes, gradcheck, opcheck, compile,
export, and which path "auto" takes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bornsparse.nn import PermutedBlockDiagonal
from bornsparse.ops.permuted import (
    BMM_MIN_BLOCK,
    BMM_MIN_RAGGED_BLOCK,
    permuted_block_diagonal,
    permuted_block_diagonal_dense_reference,
    permuted_block_diagonal_reference,
    takes_batched_gemm,
)
from test_permuted_kernels import make_operands


@st.composite
def cases(draw, k):
    nblocks = draw(st.integers(1, 5))
    width = k * nblocks
    depth = draw(st.integers(1, 4))
    n_in = draw(st.integers(1, width))
    n_out = draw(st.integers(1, width))
    batch = draw(st.sampled_from([1, 2, 7, 33]))
    lead = draw(st.sampled_from([(), (3,)]))
    return nblocks, depth, n_in, n_out, lead + (batch,), draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("k", [33, 50, BMM_MIN_BLOCK])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_bmm_path_matches_the_dense_matrix_and_the_reference(k, data):
    nblocks, depth, n_in, n_out, batch_shape, seed = data.draw(cases(k))
    weight, perms = make_operands(depth, nblocks, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*batch_shape, n_in, generator=g, dtype=torch.float64)
    gy = torch.randn(*batch_shape, n_out, generator=g, dtype=torch.float64)
    dense = permuted_block_diagonal_dense_reference(weight, perms)[:n_out, :n_in]
    grads = {}
    for backend in ("reference", "auto"):
        xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = permuted_block_diagonal(xr, wr, perms, out_features=n_out, backend=backend)
        torch.testing.assert_close(y, x @ dense.T, rtol=1e-10, atol=1e-10)
        y.backward(gy)
        grads[backend] = (xr.grad, wr.grad, y.grad_fn.name())
    if len(batch_shape) == 1:  # (else the last node is the reshape to the lead dims)
        assert "bmm" in grads["auto"][2]
    for a, b in zip(grads["auto"][:2], grads["reference"][:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_bmm_gradcheck_float64():
    weight, perms = make_operands(2, 2, 33, seed=0)
    x = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    w = weight.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w: permuted_block_diagonal(x, w, perms, out_features=37), (x, w))


def test_float32_error_is_within_a_small_multiple_of_the_references():
    weight, perms = make_operands(3, 4, 33, seed=1)
    x = torch.randn(64, 128, dtype=torch.float64)
    exact = permuted_block_diagonal_reference(x, weight, perms)
    ref32 = permuted_block_diagonal_reference(x.float(), weight.float(), perms)
    ours = permuted_block_diagonal(x.float(), weight.float(), perms)
    err_ref = (ref32.double() - exact).abs().max()
    assert (ours.double() - exact).abs().max() <= 4 * err_ref + 1e-7


def test_auto_takes_bmm_for_large_or_ragged_blocks_and_numba_keeps_its_kernels():
    x = torch.randn(4, 64, requires_grad=True)
    for k, bmm in ((8, False), (16, False), (32, False), (64, False), (BMM_MIN_BLOCK, True),
                   (6, False), (BMM_MIN_RAGGED_BLOCK + 1, True), (33, True)):
        width = k * -(-64 // k)
        layer = PermutedBlockDiagonal(64, 64, width=width, depth=2, block_size=k, seed=0)
        name = layer(x).grad_fn.name()
        assert "permuted_block_diagonal" in name and ("bmm" in name) == bmm, (k, name)
        assert takes_batched_gemm(k) == bmm
    layer = PermutedBlockDiagonal(64, 128, width=128, depth=2, block_size=128, seed=0,
                                  backend="numba")
    assert "bmm" not in layer(x).grad_fn.name()
    torch.testing.assert_close(layer(x), PermutedBlockDiagonal(
        64, 128, width=128, depth=2, block_size=128, seed=0)(x), rtol=1e-5, atol=1e-6)


def test_opcheck_both_ops():
    weight, perms = make_operands(2, 1, 32, seed=2, dtype=torch.float32)
    x = torch.randn(3, 20, requires_grad=True)
    torch.library.opcheck(torch.ops.bornsparse.permuted_block_diagonal_bmm.default,
                          (x, weight.clone().requires_grad_(), perms, 25))
    _, saved = torch.ops.bornsparse.permuted_block_diagonal_bmm(x.detach(), weight, perms, 25)
    torch.library.opcheck(torch.ops.bornsparse.permuted_block_diagonal_bmm_backward.default,
                          (torch.randn(3, 25), weight, perms, saved, 20))


def test_compile_export_empty_batch_and_double_backward():
    layer = PermutedBlockDiagonal(48, 40, width=66, depth=2, block_size=33, seed=3)
    x = torch.randn(6, 48)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    exported = torch.export.export(layer, (x,))
    assert "permuted_block_diagonal_bmm" in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), layer(x))
    assert layer(torch.randn(0, 48)).shape == (0, 40)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(layer(xr).pow(2).sum(), xr, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through the batched-GEMM kernel"):
        g.sum().backward()
