"""PermutedBlockDiagonal and PermutedTanhNetwork: construction, init, penalty, state, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from bornsparse.nn import PermutedBlockDiagonal, PermutedTanhNetwork
from bornsparse.nn.permuted import default_depth, default_width, haar_orthogonal


def test_defaults_follow_the_paper_and_count_parameters():
    layer = PermutedBlockDiagonal(10, 7, seed=0)
    assert layer.width == 20 == default_width(10, 7, 2)
    assert layer.depth == 2 * math.ceil(math.log2(20)) == default_depth(20, 2)
    assert layer.weight.shape == (layer.depth, 10, 2, 2)
    assert layer.perms.shape == (layer.depth, 20) and layer.perms.dtype == torch.int64
    assert sum(p.numel() for p in layer.parameters()) == layer.depth * 20 * 2
    # width is rounded up to a multiple of the block size
    assert PermutedBlockDiagonal(5, 5, block_size=4, seed=0).width == 12
    assert default_depth(64, 4) == 6
    assert "width=20" in repr(layer)


@pytest.mark.parametrize("block_size", [2, 4])
def test_blocks_start_orthogonal_and_square_operator_is_orthogonal(block_size):
    layer = PermutedBlockDiagonal(12, 12, width=12, depth=5, block_size=block_size, seed=1,
                                  dtype=torch.float64)
    w = layer.weight.detach()
    eye = torch.eye(block_size, dtype=torch.float64)
    torch.testing.assert_close(w.transpose(-1, -2) @ w, eye.expand_as(w), atol=1e-12, rtol=0)
    g = layer.to_dense()
    torch.testing.assert_close(g.T @ g, torch.eye(12, dtype=torch.float64), atol=1e-12, rtol=0)
    assert layer.orthogonality_penalty().item() < 1e-20


def test_haar_init_2x2_has_uniform_angle_and_both_determinants():
    # Haar measure on O(2): det = ±1 with probability 1/2, rotation angle uniform on [0, 2π)
    q = haar_orthogonal(4000, 2, torch.Generator().manual_seed(0), torch.float64)
    det = torch.linalg.det(q)
    torch.testing.assert_close(det.abs(), torch.ones(4000, dtype=torch.float64))
    frac_pos = (det > 0).double().mean().item()
    assert abs(frac_pos - 0.5) < 0.05
    angle = torch.atan2(q[:, 1, 0], q[:, 0, 0]).remainder(2 * math.pi) / (2 * math.pi)
    assert stats.kstest(angle.numpy(), "uniform").pvalue > 1e-3


@pytest.mark.parametrize("k", [2, 3, 4])
def test_orthogonality_penalty_matches_formula_and_has_gradient(k):
    layer = PermutedBlockDiagonal(6, 6, width=4 * k, depth=3, block_size=k, seed=2,
                                  dtype=torch.float64)
    with torch.no_grad():
        layer.weight.add_(0.1 * torch.randn_like(layer.weight))
    w = layer.weight.detach().reshape(-1, k, k).requires_grad_(True)
    eye = torch.eye(k, dtype=torch.float64)
    expected = sum(2 * torch.linalg.matrix_norm(eye - b.T @ b) ** 2 for b in w) / w.shape[0]
    pen = layer.orthogonality_penalty()
    torch.testing.assert_close(pen, expected)
    pen.backward()
    expected.backward()
    torch.testing.assert_close(layer.weight.grad.reshape(-1, k, k), w.grad)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_forward_equals_dense_matrix_with_bias_and_leading_dims(backend):
    layer = PermutedBlockDiagonal(7, 5, width=12, depth=4, block_size=4, bias=True, seed=3,
                                  dtype=torch.float64)
    layer.backend = backend
    with torch.no_grad():
        layer.bias.copy_(torch.arange(5, dtype=torch.float64))
    w = layer.to_dense()
    assert w.shape == (5, 7)
    for shape in [(7,), (1, 7), (2, 3, 7)]:
        x = torch.randn(*shape, dtype=torch.float64)
        y = layer(x)
        assert y.shape == shape[:-1] + (5,)
        torch.testing.assert_close(y, x @ w.T + layer.bias)


def test_numba_and_reference_modules_agree_in_float32_training_step():
    layer = PermutedBlockDiagonal(33, 17, width=40, depth=6, seed=4)
    x = torch.randn(70, 33)
    grads = {}
    for backend in ("numba", "reference"):
        layer.backend = backend
        layer.zero_grad()
        layer(x).square().mean().backward()
        grads[backend] = layer.weight.grad.clone()
    torch.testing.assert_close(grads["numba"], grads["reference"], rtol=1e-4, atol=1e-6)


def test_state_dict_carries_permutations_and_reproduces_the_function():
    a = PermutedBlockDiagonal(9, 9, depth=4, seed=5)
    b = PermutedBlockDiagonal(9, 9, depth=4, seed=6)
    assert set(a.state_dict()) == {"weight", "perms"}
    x = torch.randn(4, 9)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x))


def test_seed_determines_the_layer():
    a = PermutedBlockDiagonal(9, 9, seed=7)
    b = PermutedBlockDiagonal(9, 9, seed=7)
    c = PermutedBlockDiagonal(9, 9, seed=8)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.perms, b.perms)
    assert not torch.equal(a.perms, c.perms)


def test_bfloat16_layer_runs_through_the_reference():
    layer = PermutedBlockDiagonal(6, 6, depth=3, seed=0, dtype=torch.bfloat16)
    y = layer(torch.randn(2, 6, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 6)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(in_features=0, out_features=4), ValueError,
     "in_features must be a positive integer, got 0"),
    (dict(in_features=4, out_features=-3), ValueError, "out_features must be .*got -3"),
    (dict(in_features=2.5, out_features=4), TypeError, "in_features must be .*got 2.5"),
    (dict(in_features=4, out_features=3, width=2), ValueError,
     r"width must be at least max\(in_features, out_features\) = 4, got 2"),
    (dict(in_features=4, out_features=4, width=10, block_size=4), ValueError,
     "width must be divisible by block_size = 4, got 10"),
    (dict(in_features=4, out_features=4, depth=0), ValueError, "depth must be .*got 0"),
    (dict(in_features=4, out_features=4, block_size=1), ValueError,
     "block_size must be at least 2, got 1"),
    (dict(in_features=4, out_features=4, dtype=torch.int32), TypeError,
     "dtype must be a real floating dtype, got torch.int32"),
    (dict(in_features=4, out_features=4, seed="x"), TypeError, "seed must be an int or None"),
])
@pytest.mark.parametrize("cls", [PermutedBlockDiagonal, PermutedTanhNetwork])
def test_bad_construction_arguments_are_named(cls, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [PermutedBlockDiagonal, PermutedTanhNetwork])
def test_bad_inputs_are_named(cls):
    layer = cls(5, 3, width=8, depth=2, seed=0)
    with pytest.raises(ValueError, match=r"input must have shape \(\.\.\., 5\), got \(2, 4\)"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"input must have shape \(\.\.\., 5\), got \(\)"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="input must have a real floating dtype.*torch.int64"):
        layer(torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="input must have a real floating dtype.*complex64"):
        layer(torch.ones(2, 5, dtype=torch.complex64))
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        layer([[1.0] * 5])
    with pytest.raises(ValueError, match="backend must be one of .*got 'gpu'"):
        layer.backend = "gpu"


@pytest.mark.parametrize("block_size", [2, 4])
def test_tanh_network_jacobian_at_zero_equals_linear_operator_at_init(block_size):
    net = PermutedTanhNetwork(6, 5, width=8, depth=4, block_size=block_size, seed=9,
                              dtype=torch.float64)
    lin = PermutedBlockDiagonal(6, 5, width=8, depth=4, block_size=block_size, seed=9,
                                dtype=torch.float64)
    assert torch.equal(net.weight, lin.weight) and torch.equal(net.perms, lin.perms)
    jac = torch.autograd.functional.jacobian(net, torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(jac, lin.to_dense(), rtol=1e-12, atol=1e-12)
    # the network is not linear: far from 0 the tanh saturates
    x = 3 * torch.ones(6, dtype=torch.float64)
    assert not torch.allclose(net(x), lin(x), atol=1e-3)


def test_tanh_network_numba_and_reference_agree_with_biases():
    net = PermutedTanhNetwork(7, 4, width=10, depth=3, seed=1, dtype=torch.float64)
    with torch.no_grad():
        net.biases.normal_()
    x = torch.randn(3, 7, dtype=torch.float64)
    out = {}
    for backend in ("numba", "reference"):
        net.backend = backend
        net.zero_grad()
        y = net(x)
        y.sum().backward()
        out[backend] = (y.detach(), net.weight.grad.clone(), net.biases.grad.clone())
    for a, b in zip(out["numba"], out["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # eq. 4: the last factor has a bias but no tanh
    h = torch.nn.functional.pad(x, (0, 3))
    for t in range(3):
        h = h.index_select(-1, net.perms[t]).unflatten(-1, (5, 2))
        h = torch.einsum("nbc,brc->nbr", h, net.weight[t]).flatten(-2) + net.biases[t]
        if t < 2:
            h = torch.tanh(h)
    torch.testing.assert_close(out["reference"][0], h[:, :4].detach())


@pytest.mark.parametrize("cls", [PermutedBlockDiagonal, PermutedTanhNetwork])
def test_perms_corrupted_after_first_call_are_caught(cls):
    # the layer skips re-checking unchanged perms; an in-place change must trigger the check
    layer = cls(6, 6, width=8, depth=3, seed=0)
    x = torch.randn(2, 6)
    layer(x)
    with torch.no_grad():
        layer.perms[2, 0] = layer.perms[2, 1]
    with pytest.raises(ValueError, match="permutation of range"):
        layer(x)
    state = cls(6, 6, width=8, depth=3, seed=1).state_dict()
    layer.load_state_dict(state)
    torch.testing.assert_close(layer(x), cls(6, 6, width=8, depth=3, seed=1)(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (3, 7, 2, 2), (2, 5, 3, 3), (4, 1, 5, 5),
                                   (6, 999, 2, 2)])
def test_fused_penalty_matches_reference(dtype, shape):
    from bornsparse.ops.penalty import orthogonality_penalty, orthogonality_penalty_reference

    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    a, r = w.clone().requires_grad_(), w.clone().requires_grad_()
    pa = orthogonality_penalty(a, backend="numba")
    pr = orthogonality_penalty_reference(r)
    (3.0 * pa).backward()
    (3.0 * pr).backward()
    # against float64: the fused pass accumulates in float64, so it is no worse than torch
    exact = orthogonality_penalty_reference(w.double())
    tol = 1e-12 if dtype == torch.float64 else 4 * max(abs(pr.item() - exact.item()), 1e-6)
    assert abs(pa.item() - exact.item()) <= tol * max(1.0, exact.item())
    torch.testing.assert_close(a.grad, r.grad, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=1e-6 if dtype == torch.float32 else 1e-13)
    assert pa.dtype == dtype and pa.dim() == 0


def test_fused_penalty_gradcheck_and_no_grad():
    from bornsparse.ops.penalty import orthogonality_penalty

    w = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: orthogonality_penalty(t, backend="numba"), (w,))
    w3 = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: orthogonality_penalty(t, backend="numba"), (w3,))
    with torch.no_grad():  # no gradient computed, same value
        torch.testing.assert_close(orthogonality_penalty(w, backend="numba"),
                                   orthogonality_penalty(w, backend="reference"))
