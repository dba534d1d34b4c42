"""G(θ) in models (sparsify kind="permuted", from_dense), the permuted offset layer
(W = α·G₀ + S) and the low-rank / Monarch baselines."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bornsparse import sparsify
from bornsparse.nn import (
    DCTPlusSparseLinear,
    LowRankLinear,
    MonarchLinear,
    PermutedBlockDiagonal,
    PermutedOffsetSparseLinear,
)
from bornsparse.sparsity import IMP, SET, RigL, allocate_nnz, prune_at_init
from tiny_models import convnet, mlp

# ----------------------------------------------------------------------------- helpers


def factor_matrices(weight: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """G = F_{d-1} ⋯ F_0 (width × width) from the definition: F_t = B_t P_t with
    (P_t h)[j] = h[perms[t, j]] and B_t block-diagonal."""
    depth, nb, k, _ = weight.shape
    width = nb * k
    g = torch.eye(width, dtype=weight.dtype)
    for t in range(depth):
        p = torch.zeros(width, width, dtype=weight.dtype)
        p[torch.arange(width), perms[t]] = 1.0
        g = torch.block_diag(*weight[t]) @ p @ g
    return g


def stride_permutation(k: int, q: int) -> torch.Tensor:
    """The matrix P with (P z)[l·q + r] = z[r·k + l] on k·q entries."""
    p = torch.zeros(k * q, k * q, dtype=torch.float64)
    for l in range(k):
        for r in range(q):
            p[l * q + r, r * k + l] = 1.0
    return p


class LargestAllocation(TorchDispatchMode):
    """The largest tensor any op produces on a real (non-meta) device."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.largest = max(self.largest, t.numel())
        return out


def gradcheck_layer(layer: nn.Module, x: torch.Tensor) -> None:
    """float64 gradcheck of layer(x) in x and every trainable parameter."""
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    params = [layer.get_parameter(n).detach().clone().requires_grad_() for n in names]

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), *params))


# ----------------------------------------------------------------------------- low rank


def test_low_rank_is_u_v_transpose_with_linear_scale():
    layer = LowRankLinear(256, 128, 16, seed=0)
    w = layer.to_dense()
    torch.testing.assert_close(w, layer.u @ layer.v.T)
    assert w.shape == (128, 256)
    assert sum(p.numel() for p in layer.parameters()) == 16 * (256 + 128) + 128
    x = torch.randn(5, 2, 256)
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-5, atol=1e-5)
    # nn.Linear's weight variance 1/(3·in), bias inside U(±1/√in)
    assert abs(float(w.detach().var()) * 3 * 256 - 1) < 0.15
    assert float(layer.bias.detach().abs().max()) <= 1 / math.sqrt(256)
    assert LowRankLinear(8, 4, 2, bias=False).bias is None
    torch.testing.assert_close(LowRankLinear(8, 4, 2, seed=3).u, LowRankLinear(8, 4, 2, seed=3).u)


def test_low_rank_rejects_bad_arguments():
    with pytest.raises(ValueError,
                       match=r"rank must be at most min\(in_features, out_features\) = 4"):
        LowRankLinear(8, 4, 5)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LowRankLinear(8, 4, 0)
    with pytest.raises(ValueError, match=r"input must have shape \(\.\.\., 8\)"):
        LowRankLinear(8, 4, 2)(torch.randn(3, 7))


# ----------------------------------------------------------------------------- Monarch


@pytest.mark.parametrize("n_in, n_out, k", [(16, 16, 4), (16, 16, 2), (12, 20, 4), (20, 12, 4)])
def test_monarch_matches_its_definition(n_in, n_out, k):
    layer = MonarchLinear(n_in, n_out, k, seed=1, dtype=torch.float64)
    m, p, s = min(n_in, n_out), n_in // k, n_out // k
    q = m // k
    r = torch.block_diag(*layer.right.detach())  # (m, in)
    left = torch.block_diag(*layer.left.detach())  # (out, m)
    want = stride_permutation(k, s).T @ left @ stride_permutation(k, q) @ r
    torch.testing.assert_close(layer.to_dense().detach(), want)
    assert layer.right.shape == (k, q, p) and layer.left.shape == (k, s, q)
    assert sum(p.numel() for p in layer.parameters()) == m * (n_in + n_out) // k + n_out
    x = torch.randn(3, 2, n_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ want.T + layer.bias)


@pytest.mark.parametrize("n_in, n_out, k", [(12, 20, 4), (20, 12, 4), (16, 16, 4)])
def test_monarch_traced_path_equals_the_hand_written_one(n_in, n_out, k):
    # torch.compile / export trace _monarch_plain (no out= bmm): same values and gradients
    from bornsparse.nn.structured import _monarch_plain, _MonarchMultiply

    layer = MonarchLinear(n_in, n_out, k, seed=4, bias=False, dtype=torch.float64)
    x = torch.randn(5, n_in, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, n_out, dtype=torch.float64)
    params = (x, layer.right, layer.left)
    ya = _MonarchMultiply.apply(*params)
    ga = torch.autograd.grad(ya, params, g)
    yb = _monarch_plain(*params)
    gb = torch.autograd.grad(yb, params, g)
    torch.testing.assert_close(ya, yb)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b)


def test_monarch_square_root_blocks_is_the_papers_p_l_pt_r():
    # n = 16, 4 blocks of 4: M = P L Pᵀ R with P the transpose of a 4 × 4 grid (an involution)
    layer = MonarchLinear(16, 16, 4, dtype=torch.float64, seed=2)
    p = stride_permutation(4, 4)
    torch.testing.assert_close(p @ p, torch.eye(16, dtype=torch.float64))
    want = p @ torch.block_diag(*layer.left.detach()) @ p.T @ torch.block_diag(
        *layer.right.detach())
    torch.testing.assert_close(layer.to_dense().detach(), want)


@pytest.mark.parametrize("n_in, n_out, k", [(12, 20, 4), (20, 12, 4)])
def test_monarch_hand_written_backward_has_second_derivatives(n_in, n_out, k):
    # under create_graph the backward takes its differentiable-ops branch
    from bornsparse.nn.structured import _MonarchMultiply

    layer = MonarchLinear(n_in, n_out, k, seed=3, bias=False, dtype=torch.float64)
    x = torch.randn(3, n_in, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(_MonarchMultiply.apply, (x, layer.right, layer.left))


def test_monarch_scale_and_errors():
    layer = MonarchLinear(256, 256, 16, seed=0)
    y = (layer(torch.randn(4000, 256)) - layer.bias).detach()
    assert abs(float(y.var()) * 3 - 1) < 0.15  # nn.Linear's output variance 1/3
    with pytest.raises(ValueError, match="nblocks must divide out_features = 10, got nblocks=4"):
        MonarchLinear(16, 10, 4)
    with pytest.raises(TypeError, match="input must have the layer's dtype"):
        MonarchLinear(8, 8, 2)(torch.randn(2, 8, dtype=torch.float64))


# ----------------------------------------------------------------------------- offset layer


def test_permuted_offset_is_alpha_g0_plus_s_and_g0_is_fixed_orthogonal():
    layer = PermutedOffsetSparseLinear(24, 24, density=0.1, init="normal", alpha=0.7,
                                       seed=3, dtype=torch.float64)
    assert layer.offset_width == 24 and layer.offset_depth == 2 * math.ceil(math.log2(24))
    g0 = factor_matrices(layer.offset_weight, layer.offset_perms)[:24, :24]
    torch.testing.assert_close(layer.offset_dense(), g0)
    torch.testing.assert_close(g0 @ g0.T, torch.eye(24, dtype=torch.float64))
    s = layer.sparse_dense().detach()
    torch.testing.assert_close(layer.to_dense().detach(), 0.7 * g0 + s)
    x = torch.randn(6, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ (0.7 * g0 + s).T + layer.bias)
    # the same support as the DCTpS layer with the same seed and nnz
    dct = DCTPlusSparseLinear(24, 24, density=0.1, seed=3)
    assert torch.equal(layer.indices, dct.indices)
    # G₀ is state, not a parameter: training moves S, α and the bias only
    state = layer.state_dict()
    assert {"offset_weight", "offset_perms"} <= set(state)
    assert {n for n, _ in layer.named_parameters()} == {"values", "alpha", "bias"}
    before = layer.offset_weight.clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()
    opt.step()
    assert torch.equal(layer.offset_weight, before)
    assert layer.alpha.item() != 0.7


@pytest.mark.parametrize("n_in, n_out", [(13, 20), (20, 7)])
def test_permuted_offset_rectangular_pads_and_slices(n_in, n_out):
    layer = PermutedOffsetSparseLinear(n_in, n_out, nnz=15, offset_depth=3, init="normal",
                                       seed=4, dtype=torch.float64)
    assert layer.offset_width == 20 and layer.offset_depth == 3
    g = factor_matrices(layer.offset_weight, layer.offset_perms)
    torch.testing.assert_close(layer.offset_dense(), g[:n_out, :n_in])
    x = torch.randn(2, 3, n_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().detach().T + layer.bias)


def test_permuted_offset_backends_agree_and_reject_bad_arguments():
    ref = PermutedOffsetSparseLinear(64, 64, density=0.05, init="normal", seed=5,
                                     backend="reference")
    x = torch.randn(70, 64)
    y = ref(x)
    for backend in ("auto", "numba", "torch_sparse"):
        ref.backend = backend
        torch.testing.assert_close(ref(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="offset_width must be even and at least"):
        PermutedOffsetSparseLinear(8, 6, nnz=3, offset_width=9)
    with pytest.raises(ValueError, match="offset_depth must be a positive integer"):
        PermutedOffsetSparseLinear(8, 6, nnz=3, offset_depth=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        PermutedOffsetSparseLinear(8, 6, nnz=3, backend="fast")


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("make", [
    lambda: LowRankLinear(7, 5, 3, seed=0, dtype=torch.float64),
    lambda: MonarchLinear(8, 12, 4, seed=0, dtype=torch.float64),
    lambda: PermutedOffsetSparseLinear(9, 6, nnz=12, init="normal", seed=0,
                                       dtype=torch.float64),
    lambda: PermutedOffsetSparseLinear(9, 6, nnz=12, init="normal", seed=0,
                                       dtype=torch.float64, backend="reference"),
], ids=["lowrank", "monarch", "offset_numba", "offset_reference"])
def test_gradcheck_float64(make):
    layer = make()
    gradcheck_layer(layer, torch.randn(4, layer.in_features, dtype=torch.float64))


# ----------------------------------------------------------------------------- from_dense


@pytest.mark.parametrize("perturb, penalty, steps", [(0.0, 1.0, 400), (0.3, 0.0, 1000)])
def test_from_dense_recovers_a_permuted_target_with_the_same_permutations(perturb, penalty,
                                                                          steps):
    target = PermutedBlockDiagonal(16, 12, width=32, depth=4, seed=7)
    with torch.no_grad():  # blocks off orthogonal (the penalty would fight those: off)
        target.weight.add_(perturb * torch.randn(target.weight.shape,
                                                 generator=torch.Generator().manual_seed(0)))
    w = 2.5 * target.to_dense()  # a scale no orthogonal G has
    # the same seed draws the same permutations: only the blocks have to be found
    layer = PermutedBlockDiagonal.from_dense(w, depth=4, width=32, steps=steps, seed=7,
                                             penalty=penalty, progress=False)
    assert torch.equal(layer.perms, target.perms)
    assert layer.bias is None and layer.weight.dtype == w.dtype
    err = float(torch.linalg.norm(layer.to_dense() - w) / torch.linalg.norm(w))
    assert layer.fit_error == pytest.approx(err, rel=1e-4)
    assert layer.fit_error < 1e-3
    x = torch.randn(500, 16)
    with torch.no_grad():
        out_err = float(torch.linalg.norm(layer(x) - x @ w.T) / torch.linalg.norm(x @ w.T))
    assert out_err < 2 * layer.fit_error + 1e-5


def test_from_dense_other_permutations_reports_the_error_it_makes():
    w = PermutedBlockDiagonal(16, 16, width=32, depth=4, seed=1).to_dense()
    layer = PermutedBlockDiagonal.from_dense(w, depth=4, steps=30, seed=2, progress=False)
    err = float(torch.linalg.norm(layer.to_dense() - w) / torch.linalg.norm(w))
    assert layer.fit_error == pytest.approx(err, rel=1e-4)
    assert layer.width == 32 and layer.depth == 4


def test_from_dense_zero_matrix_and_errors():
    layer = PermutedBlockDiagonal.from_dense(torch.zeros(4, 6), depth=2, steps=3,
                                             progress=False)
    assert layer.fit_error == 0.0 and not layer.to_dense().any()
    with pytest.raises(ValueError, match=r"weight must be 2-D \(out_features, in_features\)"):
        PermutedBlockDiagonal.from_dense(torch.zeros(4))
    with pytest.raises(ValueError, match="meta device"):
        PermutedBlockDiagonal.from_dense(torch.zeros(4, 4, device="meta"))
    with pytest.raises(ValueError, match="weight must be finite"):
        PermutedBlockDiagonal.from_dense(torch.full((4, 4), math.nan))
    with pytest.raises(ValueError, match="steps must be at least 3"):
        PermutedBlockDiagonal.from_dense(torch.ones(4, 4), steps=2, progress=False)
    with pytest.raises(ValueError, match="lr must be a positive finite number, got -1"):
        PermutedBlockDiagonal.from_dense(torch.ones(4, 4), lr=-1, progress=False)


# ----------------------------------------------------------------------------- sparsify


@pytest.mark.parametrize("distribution", ["uniform", "epl", "erk"])
def test_sparsify_permuted_chooses_the_depth_nearest_the_budget(distribution):
    model = mlp()
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]
    biases = [m.bias for m in model.modules() if isinstance(m, nn.Linear)]
    report = sparsify(model, kind="permuted", density=0.3, distribution=distribution, seed=0)
    budgets = allocate_nnz(shapes, 0.3, distribution)
    layers = [m for m in model.modules() if isinstance(m, PermutedBlockDiagonal)]
    assert len(layers) == len(report.layers) == 3 and not report.left_dense
    for r, layer, budget, shape, b in zip(report.layers, layers, budgets, shapes, biases,
                                          strict=True):
        step = 2 * layer.width  # weights of one factor of 2×2 blocks
        assert layer.width == 2 * max(shape) and layer.block_size == 2
        assert r.nnz == layer.weight.numel() == layer.depth * step
        # nearest multiple of a factor, never below one factor
        assert abs(r.nnz - budget) <= step / 2 or (layer.depth == 1 and budget < step)
        assert layer.bias is b  # the dense layer's bias Parameter, moved over
        assert r.detail.startswith(f"depth {layer.depth} × width {layer.width}")
    assert "layer got" in str(report)
    y = model(torch.randn(3, 1, 8, 8))
    assert y.shape == (3, 10)


def test_sparsify_permuted_is_seeded_and_leaves_convolutions():
    a, b = convnet(), convnet()
    ra = sparsify(a, kind="permuted", density=0.5, seed=1)
    sparsify(b, kind="permuted", density=0.5, seed=1)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ra.left_dense == ["0", "3"]
    assert type(a[0]) is nn.Conv2d and type(a[3]) is nn.Conv2d
    assert [r.name for r in ra.layers] == ["6"] and isinstance(a[6], PermutedBlockDiagonal)
    assert "left dense (kind 'permuted' has no layer for them): 0, 3" in str(ra)
    assert a(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"nn.Linear \(and Conv1D\) layers only, and the "
                                         r"selected layers are all convolutions: \['0'\]"):
        sparsify(convnet(), kind="permuted_offset", density=0.5, include="0")


@pytest.mark.parametrize("kind", ["permuted", "permuted_offset"])
def test_sparsify_structured_on_meta_allocates_no_dense_weight(kind):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10, bias=False))
    with LargestAllocation() as seen:
        report = sparsify(model, kind=kind, density=0.1, distribution="uniform", seed=0)
    assert seen.largest < 300 * 200 // 4
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    bound = 1 / math.sqrt(300)  # nn.Linear's default bias init, drawn
    assert 0 < float(model[0].bias.detach().abs().max()) <= bound and model[2].bias is None
    y = model(torch.randn(4, 300))
    assert y.shape == (4, 10) and bool(torch.isfinite(y).all())
    assert report.layers[0].shape == (200, 300)


def test_sparsify_permuted_fit_keeps_the_function():
    # the dense layers ARE permuted operators on the permutations sparsify draws for seed 5
    # (the same seed draws the same layer seeds), with blocks moved off the drawn ones
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))
    drawn = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))
    sparsify(drawn, kind="permuted", density=0.5, seed=5)
    with torch.no_grad():
        for i in (0, 2):
            drawn[i].weight.mul_(1.5).add_(0.2 * torch.randn(drawn[i].weight.shape))
            model[i].weight.copy_(drawn[i].to_dense())
    dense = [nn.Linear(16, 16), nn.Linear(16, 8)]
    for d, i in zip(dense, (0, 2), strict=True):
        d.load_state_dict(model[i].state_dict())
    x = torch.randn(400, 16)
    want = model(x).detach()
    report = sparsify(model, kind="permuted", density=0.5, seed=5,
                      fit={"steps": 600, "penalty": 0.0, "progress": False})
    errors = [model[i].fit_error for i in (0, 2)]
    # EPL: 96 weights each, 1.5 factors of 64 rounded up
    assert [model[i].depth for i in (0, 2)] == [2, 2]
    assert max(errors) < 1e-2
    assert all(f"fit error {e:.3g}" in r.detail for e, r in zip(errors, report.layers,
                                                                 strict=True))
    with torch.no_grad():
        for d, i, e in zip(dense, (0, 2), errors, strict=True):
            # each layer keeps its function within the reported error (the bias is kept,
            # so the bias-free parts are compared)
            y, y_dense = model[i](x) - model[i].bias, d(x) - d.bias
            assert float(torch.linalg.norm(y - y_dense) / torch.linalg.norm(y_dense)) < 2 * e + 1e-6
            assert model[i].bias is not d.bias and torch.equal(model[i].bias, d.bias)
        rel = float(torch.linalg.norm(model(x) - want) / torch.linalg.norm(want))
    assert rel < 1e-2


def test_sparsify_permuted_offset_budget_and_depth():
    model = mlp()
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]
    report = sparsify(model, kind="permuted_offset", density=0.05, offset_depth=4, seed=0)
    layers = [m for m in model.modules() if isinstance(m, PermutedOffsetSparseLinear)]
    assert [r.nnz for r in report.layers] == allocate_nnz(shapes, 0.05, "epl")
    assert [m.nnz for m in layers] == [r.nnz for r in report.layers]
    assert [m.offset_depth for m in layers] == [4, 4, 4]
    assert [m.offset_width for m in layers] == [128, 128, 64]
    model2 = mlp()
    sparsify(model2, kind="permuted_offset", density=0.05, seed=0)
    assert [m.offset_depth for m in model2.modules() if hasattr(m, "offset_depth")] == [
        14, 14, 12]  # 2·⌈log2 n⌉
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_sparsify_structured_option_errors():
    with pytest.raises(ValueError, match="offset_depth is an option of kind='permuted_offset'"):
        sparsify(mlp(), kind="permuted", density=0.1, offset_depth=3)
    with pytest.raises(ValueError, match="fit is an option of kind='permuted', got kind='dctps'"):
        sparsify(mlp(), kind="dctps", density=0.1, fit=True)
    with pytest.raises(ValueError, match="fit must be a bool or a dict with keys among"):
        sparsify(mlp(), kind="permuted", density=0.1, fit={"depth": 3})
    with pytest.raises(ValueError, match="offset_depth must be a positive integer"):
        sparsify(mlp(), kind="permuted_offset", density=0.1, offset_depth=0)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(ValueError, match="fit needs the dense weights, but the layer's weight "
                                         "is on the meta device"):
        sparsify(meta, kind="permuted", density=0.5, fit=True)


# ----------------------------------------------------------------------------- rejections


@pytest.mark.parametrize("kind", ["permuted", "permuted_offset"])
def test_support_methods_reject_the_structured_kinds(kind):
    msg = f"kind='{kind}' is a layer kind of bornsparse.sparsify only"
    model = mlp()
    with pytest.raises(ValueError, match=msg):
        prune_at_init(model, "snip", 0.1, data=(torch.randn(4, 1, 8, 8), torch.arange(4)),
                      kind=kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=msg):
        IMP(model, opt, rounds=2, density=0.5, kind=kind)
    for cls in (RigL, SET):
        with pytest.raises(ValueError, match=msg):
            cls(model, opt, density=0.1, total_steps=100, kind=kind)
    # nothing was swapped before the refusal
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def test_sparsify_permuted_never_puts_a_layer_far_over_its_budget():
    """A 256 → 10 classifier's smallest G(θ) (depth 1, width 512) holds 1,024 weights: at a
    budget of 256 it is left as it is and listed with the reason."""
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    report = sparsify(model, kind="permuted", density=1 / 8, distribution="uniform", seed=0)
    assert [r.name for r in report.layers] == ["0"]
    assert isinstance(model[0], PermutedBlockDiagonal) and type(model[2]) is nn.Linear
    assert list(report.over_budget) == ["2"]
    assert "1,024 weights, 3.2× its budget of 320" in report.over_budget["2"]
    assert "left dense (2): its smallest G(θ)" in str(report)
    for r in report.layers:  # what was swapped stays near its budget
        assert r.nnz <= 1.5 * round(r.numel / 8)
    with pytest.raises(ValueError, match="every selected layer's smallest G"):
        sparsify(nn.Sequential(nn.Linear(64, 4)), kind="permuted", density=0.05)
