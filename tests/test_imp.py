"""Iterative magnitude pruning with rewinding: masks, rewind, conversion, digits, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bornsparse.sparsity import IMP
from bornsparse.sparsity.swap import dense_targets, sparse_targets
from tiny_models import convnet, mlp


def train(model, opt, imp, x, y, steps, batch=64):
    for t in range(steps):
        i = (t * batch) % (len(y) - batch)
        opt.zero_grad()
        F.cross_entropy(model(x[i:i + batch]), y[i:i + batch]).backward()
        opt.step()
        if imp is not None:
            imp.step()


def test_rounds_masks_and_rewind(digits):
    x, y, *_ = digits
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    imp = IMP(model, opt, rounds=3, density=0.05, rewind_iteration=5)
    total = sum(m.weight.numel() for _, m in dense_targets(model))
    train(model, opt, imp, x, y, 5)
    at_rewind = copy.deepcopy(model.state_dict())
    opt_at_rewind = copy.deepcopy(opt.state_dict())
    previous = [m.clone() for m in imp.masks]
    for r in range(1, 4):
        train(model, opt, imp, x, y, 20)
        weights = [m.weight.detach().clone() for _, m in dense_targets(model)]
        d = imp.prune()
        assert imp.round == r
        if r < 3:
            assert sum(imp.counts().values()) == round(total * (1 - imp.prune_rate) ** r)
        else:
            assert sum(imp.counts().values()) == round(0.05 * total)
        assert d == pytest.approx(sum(imp.counts().values()) / total)
        for new, old in zip(imp.masks, previous, strict=True):
            assert not (new & ~old).any()  # masks only shrink
        # pruned this round: no larger in magnitude than what survived (global scope)
        dropped = torch.cat([w[o & ~n] for n, o, w in zip(imp.masks, previous, weights,
                                                            strict=True)])
        kept = torch.cat([w[n] for n, w in zip(imp.masks, weights, strict=True)])
        assert dropped.abs().max() <= kept.abs().min()
        # rewound: survivors equal their values at iteration 5, the pruned are zero
        for (name, mod), m in zip(dense_targets(model), imp.masks, strict=True):
            torch.testing.assert_close(mod.weight, at_rewind[f"{name}.weight"] * m)
            torch.testing.assert_close(mod.bias, at_rewind[f"{name}.bias"])
        assert opt.state_dict()["state"][0]["step"] == opt_at_rewind["state"][0]["step"]
        previous = [m.clone() for m in imp.masks]
    with pytest.raises(RuntimeError, match="after all 3 rounds"):
        imp.prune()


@pytest.mark.parametrize("net", [mlp, convnet])
@pytest.mark.parametrize("kind", ["sparse", "dctps"])
def test_to_sparse_keeps_the_function(net, kind, digits):
    x, y, *_ = digits
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    imp = IMP(model, opt, rounds=2, prune_rate=0.5, kind=kind, scope="layer")
    train(model, opt, imp, x, y, 10)
    imp.prune()
    train(model, opt, imp, x, y, 10)
    imp.prune()
    counts = imp.counts()
    for (name, mod), m in zip(dense_targets(model), imp.masks, strict=True):
        assert counts[name] == round(round(mod.weight.numel() * 0.5) * 0.5) == int(m.sum())
    with torch.no_grad():
        before = model(x[:32])
    imp.to_sparse()
    layers = sparse_targets(model)
    assert [n for n, _ in layers] == list(counts)
    assert [l.nnz for _, l in layers] == list(counts.values())
    for _, layer in layers:
        rows, cols = layer.dense_shape
        flat = layer.indices[0] * cols + layer.indices[1]
        assert torch.equal(flat, torch.unique(flat))  # unique, row-major sorted
        assert int(layer.indices[0].max()) < rows and int(layer.indices[1].max()) < cols
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x[:32]), before, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="after to_sparse"):
        imp.step()


def test_to_sparse_rebinds_the_optimizer(digits):
    x, y, *_ = digits
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    imp = IMP(model, opt, rounds=1, prune_rate=0.8)
    train(model, opt, imp, x, y, 5)
    imp.prune()
    train(model, opt, imp, x, y, 3)
    dense_state = {n: {k: v.clone() for k, v in opt.state[m.weight].items()}
                   for n, m in dense_targets(model)}
    imp.to_sparse()
    held = [p for g in opt.param_groups for p in g["params"]]
    assert [id(p) for p in held] == [id(p) for p in model.parameters()]
    for name, layer in sparse_targets(model):
        st, old = opt.state[layer.values], dense_state[name]
        assert torch.equal(st["step"], old["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(st[key], old[key][layer.indices[0], layer.indices[1]])
    train(model, opt, None, x, y, 3)  # and training goes on with the same optimizer


def test_checkpoint_resumes_identically(digits):
    x, y, *_ = digits
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    imp = IMP(model, opt, rounds=3, prune_rate=0.4, rewind_iteration=3)
    train(model, opt, imp, x, y, 8)
    imp.prune()
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                          "imp": imp.state_dict()})
    train(model, opt, imp, x, y, 8)
    imp.prune()

    model2 = mlp(seed=1)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    imp2 = IMP(model2, opt2, rounds=3, prune_rate=0.4, rewind_iteration=3)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    imp2.load_state_dict(ckpt["imp"])
    train(model2, opt2, imp2, x, y, 8)
    imp2.prune()
    assert all(torch.equal(a, b) for a, b in zip(imp.masks, imp2.masks, strict=True))
    torch.testing.assert_close(model(x[:8]), model2(x[:8]))


def test_trains_digits_above_chance(digits):
    x, y, xt, yt = digits
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    imp = IMP(model, opt, rounds=2, density=0.1, rewind_iteration=10)
    for _ in range(2):
        train(model, opt, imp, x, y, 60)
        imp.prune()
    imp.to_sparse()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, opt, None, x, y, 150)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.6, f"IMP test accuracy {acc:.3f}"


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of prune_rate and density"):
        IMP(mlp(), rounds=2)
    with pytest.raises(ValueError, match="exactly one of prune_rate and density"):
        IMP(mlp(), rounds=2, prune_rate=0.2, density=0.1)
    with pytest.raises(ValueError, match="density must lie in"):
        IMP(mlp(), rounds=2, density=0.0)
    with pytest.raises(ValueError, match="density must lie in"):
        IMP(mlp(), rounds=2, density=2.0)
    with pytest.raises(ValueError, match="prune_rate must lie in"):
        IMP(mlp(), rounds=2, prune_rate=1.0)
    with pytest.raises(ValueError, match="rounds must be a positive integer"):
        IMP(mlp(), rounds=0, prune_rate=0.2)
    with pytest.raises(ValueError, match="rewind_iteration must be an integer >= 0"):
        IMP(mlp(), rounds=2, prune_rate=0.2, rewind_iteration=-1)
    with pytest.raises(ValueError, match="scope must be one of"):
        IMP(mlp(), rounds=2, prune_rate=0.2, scope="net")
    with pytest.raises(ValueError, match="no prunable layers"):
        IMP(nn.Sequential(nn.Tanh()), rounds=2, prune_rate=0.2)
    with pytest.raises(TypeError, match="optimizer must be"):
        IMP(mlp(), "sgd", rounds=2, prune_rate=0.2)
    imp = IMP(mlp(), rounds=2, prune_rate=0.2, rewind_iteration=5)
    with pytest.raises(RuntimeError, match="no rewind point yet"):
        imp.prune()


def test_state_dict_round_trips_through_a_file(digits, tmp_path):
    # round, iteration, masks and rewind point survive torch.save / weights_only load, and
    # the restored IMP prunes to exactly the same masks
    x, y, *_ = digits
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    imp = IMP(model, opt, rounds=3, density=0.1, rewind_iteration=2)
    train(model, opt, imp, x, y, 4)
    imp.prune()
    train(model, opt, imp, x, y, 3)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "imp": imp.state_dict()}, tmp_path / "imp.pt")
    ckpt = torch.load(tmp_path / "imp.pt", weights_only=True)
    assert ckpt["imp"]["round"] == 1 and ckpt["imp"]["iteration"] == 7
    assert ckpt["imp"]["layers"] == [n for n, _ in dense_targets(model)]
    imp.prune()

    model2 = mlp(seed=4)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    imp2 = IMP(model2, opt2, rounds=3, density=0.1, rewind_iteration=2)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    imp2.load_state_dict(ckpt["imp"])
    assert (imp2.round, imp2.iteration) == (1, 7)
    for key, t in ckpt["imp"]["rewind"]["model"].items():
        assert torch.equal(imp2._rewind["model"][key], t)
    imp2.prune()
    assert all(torch.equal(a, b) for a, b in zip(imp.masks, imp2.masks, strict=True))
    assert all(torch.equal(a, b) for a, b in
               zip(model.state_dict().values(), model2.state_dict().values(), strict=True))


def test_state_dict_refuses_other_settings():
    model = mlp()
    state = IMP(model, rounds=2, density=0.1).state_dict()
    with pytest.raises(ValueError, match="scope='global' but this IMP has 'layer'"):
        IMP(mlp(), rounds=2, density=0.1, scope="layer").load_state_dict(state)
    with pytest.raises(ValueError, match="checkpoint prunes the layers"):
        IMP(mlp(), rounds=2, density=0.1, include="1").load_state_dict(state)
    with pytest.raises(ValueError, match=r"missing the keys \['masks'\]"):
        IMP(mlp(), rounds=2, density=0.1).load_state_dict(
            {k: v for k, v in state.items() if k != "masks"})
