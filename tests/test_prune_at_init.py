"""Pruning at initialisation: score formulas, selection, invariants, digits training, errors."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bornsparse.sparsity import PruneReport, prune_at_init
from bornsparse.sparsity import scores as S
from bornsparse.sparsity.swap import (
    DCTOffset,
    dense_targets,
    sparse_targets,
    swap_in_sparse_layers,
)
from tiny_models import convnet, mlp

METHODS = ["snip", "grasp", "synflow", "force"]


def batches(x, y, size=128):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def train(model, x, y, xt, yt, *, epochs=6, lr=0.01):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            j = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[j]), y[j]).backward()
            opt.step()
    with torch.no_grad():
        return (model(xt).argmax(1) == yt).float().mean().item()


def check_support(layer):
    rows, cols = layer.dense_shape
    idx = layer.indices
    assert idx.dtype == torch.int32 and idx.shape == (2, layer.nnz)
    assert int(idx[0].min()) >= 0 and int(idx[0].max()) < rows
    assert int(idx[1].min()) >= 0 and int(idx[1].max()) < cols
    flat = idx[0] * cols + idx[1]
    assert torch.equal(flat, torch.unique(flat))  # unique and row-major sorted


# ----------------------------------------------------------------------------- score formulas


def test_snip_scores_match_autograd(digits):
    x, y, *_ = digits
    model = mlp()
    sc = S.snip_scores(model, dense_targets(model), (x[:200], y[:200]))
    F.cross_entropy(model(x[:200]), y[:200]).backward()
    for s, (_, mod) in zip(sc, dense_targets(model), strict=True):
        torch.testing.assert_close(s, (mod.weight.grad * mod.weight).abs())


def test_grasp_scores_match_hessian_vector_product(digits):
    x, y, *_ = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()
    xb, yb = x[:50].flatten(1).double(), y[:50]
    targets = dense_targets(model)
    sc = S.grasp_scores(model, targets, (xb, yb), temperature=3.0)
    w1 = model[0].weight.detach().clone().requires_grad_()
    w2 = model[2].weight.detach().clone().requires_grad_()

    def loss(a, b):
        h = torch.tanh(xb @ a.T + model[0].bias)
        return F.cross_entropy((h @ b.T + model[2].bias) / 3.0, yb)

    g = torch.autograd.grad(loss(w1, w2), [w1, w2])
    _, hg = torch.autograd.functional.hvp(loss, (w1, w2), tuple(t.detach() for t in g))
    torch.testing.assert_close(sc[0], w1.detach() * hg[0])
    torch.testing.assert_close(sc[1], w2.detach() * hg[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grasp_scores_through_the_dct_offset(dtype):
    # GraSP on DCTpS differentiates twice through α·T(x): compare with dense α·D matrices
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 5)).to(dtype)
    x, y = torch.randn(30, 12, dtype=dtype), torch.randint(5, (30,))
    targets = dense_targets(model)
    hooks = DCTOffset(targets)
    sc = S.grasp_scores(model, targets, (x, y), temperature=3.0)
    offsets = [hooks.offsets[n].to_dense().detach() for n, _ in targets]  # α·D (S = 0)
    hooks.remove()
    w = [m.weight.detach().clone().requires_grad_() for _, m in targets]

    def loss(a, b):
        h = torch.tanh(x @ (a + offsets[0]).T + model[0].bias)
        return F.cross_entropy((h @ (b + offsets[1]).T + model[2].bias) / 3.0, y)

    g = torch.autograd.grad(loss(*w), w)
    _, hg = torch.autograd.functional.hvp(loss, tuple(w), tuple(t.detach() for t in g))
    for s_, wi, h in zip(sc, w, hg, strict=True):
        torch.testing.assert_close(s_, wi.detach() * h)


def test_synflow_round_is_path_count_of_linear_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 3, bias=False))
    targets = dense_targets(model)
    masks = [torch.ones_like(m.weight, dtype=torch.bool) for _, m in targets]
    masks[0][0, 0] = False
    sc = S.synflow_round(model, targets, masks, (5,))
    a1 = (model[0].weight.detach().abs() * masks[0]).double()
    a2 = model[2].weight.detach().abs().double()
    # R = 1ᵀ|W2||W1|1: ∂R/∂W1[i,j] = Σ_k |W2|[k,i], ∂R/∂W2[k,i] = Σ_j |W1|[i,j]
    torch.testing.assert_close(sc[0], a1 * a2.sum(0)[:, None])
    torch.testing.assert_close(sc[1], a2 * a1.sum(1)[None, :])
    assert sc[0][0, 0] == 0


def test_force_round_lets_pruned_weights_come_back(digits):
    x, y, *_ = digits
    model = mlp()
    targets = dense_targets(model)
    full = [torch.ones_like(m.weight, dtype=torch.bool) for _, m in targets]
    batch = (x[:100], y[:100])
    # with nothing pruned, FORCE's saliency is SNIP's
    for a, b in zip(S.force_round(model, targets, full, batch),
                    S.snip_scores(model, targets, batch), strict=True):
        torch.testing.assert_close(a, b)
    half = [torch.rand(m.shape, generator=torch.Generator().manual_seed(3)) < 0.5 for m in full]
    sc = S.force_round(model, targets, half, batch)
    assert all((s[~m] > 0).any() for s, m in zip(sc, half, strict=True))


def test_scoring_leaves_model_untouched(digits):
    x, y, *_ = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                          nn.Linear(32, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = dense_targets(model)
    S.snip_scores(model, targets, (x[:64], y[:64]))
    S.synflow_round(model, targets, [torch.ones_like(m.weight, dtype=torch.bool)
                                     for _, m in targets], (1, 8, 8))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("net", [mlp, convnet])
def test_dct_offset_hook_is_the_dctps_layer(net, digits):
    # the dense stand-in scored for kind="dctps" computes α·T(x) + S x + b, exactly what
    # DCT-plus-sparse layers holding every entry of S compute
    x, *_ = digits
    dense = net()
    full = {n: torch.stack(torch.meshgrid(torch.arange(m.weight.shape[0]),
                                          torch.arange(m.weight[0].numel()), indexing="ij"))
            .reshape(2, -1) for n, m in dense_targets(dense)}
    hooks = DCTOffset(dense_targets(dense))
    with torch.no_grad():
        hooked = dense(x[:16])
    hooks.remove()
    with torch.no_grad():
        plain = dense(x[:16])
    swap_in_sparse_layers(dense, full, kind="dctps")
    with torch.no_grad():
        torch.testing.assert_close(dense(x[:16]), hooked, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, hooked)


# ----------------------------------------------------------------------------- selection


def test_exponential_schedule():
    ks = S.exponential_schedule(10_000, 10, 100)
    assert len(ks) == 100 and ks[-1] == 10 and ks[0] < 10_000
    assert all(a >= b for a, b in zip(ks, ks[1:], strict=False))
    assert S.exponential_schedule(100, 7, 1) == [7]


def test_select_global_floor_moves_weakest_entries():
    scores = [torch.tensor([9.0, 8.0, 7.0, 6.0]), torch.tensor([0.1, 0.2]), torch.tensor([5.0])]
    sel, moved = S.select_global(scores, 4, min_per_layer=1)
    # top-4 alone is layer 0 only; the floor moves layer 0's weakest two to layers 1 and 2
    assert moved == 2
    assert [s.tolist() for s in sel] == [[0, 1], [1], [0]]
    sel, moved = S.select_global(scores, 4, min_per_layer=1)
    assert sum(s.numel() for s in sel) == 4
    with pytest.raises(ValueError, match="at least 1"):
        S.select_global(scores, 2)


def test_select_global_without_floor_need_is_plain_topk():
    scores = [torch.tensor([1.0, 5.0]), torch.tensor([4.0, 2.0, 3.0])]
    sel, moved = S.select_global(scores, 3)
    assert moved == 0 and [s.tolist() for s in sel] == [[1], [0, 2]]


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["sparse", "dctps"])
def test_invariants_and_determinism(method, kind, digits):
    x, y, *_ = digits
    data = batches(x[:512], y[:512])
    density = 0.05
    runs = []
    for _ in range(2):
        model = convnet()
        report = prune_at_init(model, method, density, data=data, kind=kind, rounds=8)
        runs.append((model, report))
    model, report = runs[0]
    layers = sparse_targets(model)
    assert len(layers) == 3 and not any(isinstance(m, (nn.Linear, nn.Conv2d))
                                        for m in model.modules())
    expected = "DCTPlus" if kind == "dctps" else "Sparse"
    assert all(type(l).__name__.startswith(expected) for _, l in layers)
    total = sum(l.dense_shape[0] * l.dense_shape[1] for _, l in layers)
    assert sum(l.nnz for _, l in layers) == report.nnz == round(density * total)
    for (name, layer), lr in zip(layers, report.layers, strict=True):
        assert name == lr.name and layer.nnz == lr.nnz >= 1
        check_support(layer)
    assert not any(m._forward_hooks for m in model.modules())  # DCT offset hooks removed
    for (_, a), (_, b) in zip(layers, sparse_targets(runs[1][0]), strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)


def test_kept_values_are_the_initial_weights(digits):
    x, y, *_ = digits
    dense = mlp()
    w = [m.weight.detach().clone() for _, m in dense_targets(dense)]
    model = dense
    prune_at_init(model, "snip", 0.1, data=(x[:256], y[:256]))
    for wi, (_, layer) in zip(w, sparse_targets(model), strict=True):
        torch.testing.assert_close(layer.to_dense(), wi * (layer.to_dense() != 0))
        assert torch.equal(layer.values.detach(), wi[layer.indices[0], layer.indices[1]])


def test_same_after_save_and_load(digits):
    x, y, *_ = digits
    model = mlp()
    report = prune_at_init(model, "force", 0.05, data=(x[:256], y[:256]), rounds=5)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    # a skeleton with the same counts on other supports, then load the checkpoint into it
    other = mlp(seed=1)
    g = torch.Generator().manual_seed(5)
    supports = {}
    for (name, mod), lr in zip(dense_targets(other), report.layers, strict=True):
        flat = torch.sort(torch.randperm(mod.weight.numel(), generator=g)[:lr.nnz]).values
        supports[name] = torch.stack([flat // mod.in_features, flat % mod.in_features])
    swap_in_sparse_layers(other, supports)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    for (_, a), (_, b) in zip(sparse_targets(model), sparse_targets(other), strict=True):
        assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(other(x[:32]), model(x[:32]))


def test_distribution_fixes_per_layer_counts(digits):
    from bornsparse.sparsity import allocate_nnz

    x, y, *_ = digits
    dense = mlp()
    shapes = [tuple(m.weight.shape) for _, m in dense_targets(dense)]
    model = dense
    report = prune_at_init(model, "snip", 0.1, data=(x[:256], y[:256]), distribution="erk")
    assert [l.nnz for l in report.layers] == list(allocate_nnz(shapes, 0.1, "erk"))
    # equal per filter: every row of every layer holds the same count (give or take one)
    model = mlp()
    report = prune_at_init(model, "force", 0.1, data=(x[:256], y[:256]), distribution="epf",
                           rounds=4)
    assert [l.nnz for l in report.layers] == list(allocate_nnz(shapes, 0.1, "epf"))
    for _, layer in sparse_targets(model):
        per_row = torch.bincount(layer.indices[0], minlength=layer.dense_shape[0])
        assert int(per_row.max() - per_row.min()) <= 1


def test_accepts_a_dataloader(digits):
    x, y, *_ = digits
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:200], y[:200]),
                                         batch_size=64)
    # FORCE cycles through the loader (4 batches) for 10 rounds; SNIP reads it once
    m1, m2, m3 = mlp(), mlp(), mlp()
    r1 = prune_at_init(m1, "force", 0.05, data=loader, rounds=10)
    r2 = prune_at_init(m2, "snip", 0.05, data=loader)
    r3 = prune_at_init(m3, "snip", 0.05, data=batches(x[:200], y[:200], 64))
    assert r1.nnz == r2.nnz == r3.nnz
    for (_, a), (_, b) in zip(sparse_targets(m2), sparse_targets(m3), strict=True):
        assert torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("method", ["synflow", "force"])
def test_no_layer_collapse_at_density_1e_3(method, digits):
    x, y, *_ = digits
    model = mlp()
    report = prune_at_init(model, method, 1e-3, data=batches(x[:512], y[:512]))
    assert report.rounds == 100
    counts = [l.nnz for l in report.layers]
    assert all(c >= 1 for c in counts) and sum(counts) == round(1e-3 * report.total)
    assert [l.nnz for _, l in sparse_targets(model)] == counts


@pytest.mark.parametrize("method", METHODS)
def test_trains_digits_above_chance(method, digits):
    x, y, xt, yt = digits
    model = mlp()
    prune_at_init(model, method, 0.1, data=batches(x[:512], y[:512]), rounds=20)
    acc = train(model, x, y, xt, yt)
    assert acc > 0.6, f"{method}: test accuracy {acc:.3f}"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_rejects_density_outside_unit_interval(density, digits):
    x, y, *_ = digits
    with pytest.raises(ValueError, match="density must lie in"):
        prune_at_init(mlp(), "snip", density, data=(x[:8], y[:8]))


def test_rejects_bad_arguments(digits):
    x, y, *_ = digits
    data = (x[:8], y[:8])
    with pytest.raises(ValueError, match="method must be one of"):
        prune_at_init(mlp(), "magic", 0.1, data=data)
    with pytest.raises(ValueError, match="no prunable layers"):
        prune_at_init(nn.Sequential(nn.ReLU()), "snip", 0.1, data=data)
    with pytest.raises(ValueError, match="needs data"):
        prune_at_init(mlp(), "force", 0.1)
    with pytest.raises(ValueError, match="input_shape or data"):
        prune_at_init(mlp(), "synflow", 0.1)
    with pytest.raises(ValueError, match=r"input_shape\[1\] must be a positive integer"):
        prune_at_init(mlp(), "synflow", 0.1, input_shape=(1, 0, 8))
    report = prune_at_init(mlp(), "synflow", 0.1, input_shape=64, rounds=2)
    assert report.nnz == round(0.1 * report.total)
    with pytest.raises(ValueError, match="kind must be one of"):
        prune_at_init(mlp(), "snip", 0.1, data=data, kind="dense")
    with pytest.raises(TypeError, match="data must be"):
        prune_at_init(mlp(), "snip", 0.1, data=x)
    with pytest.raises(TypeError, match="density must be a real number"):
        prune_at_init(mlp(), "snip", "0.1", data=data)
    with pytest.raises(ValueError, match="distribution"):
        prune_at_init(mlp(), "snip", 0.1, data=data, distribution="nope")


def test_returns_the_report_and_converts_in_place():
    model = mlp()
    report = prune_at_init(model, "snip", 0.1, data=(torch.randn(16, 64), torch.arange(16) % 10))
    assert isinstance(report, PruneReport) and report.nnz == round(0.1 * report.total)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    with pytest.warns(DeprecationWarning, match="returns the report alone"):
        same, rep = report  # the old (model, report) unpacking, for one release
    assert same is model and rep is report
