"""RigL and SET: schedule, support invariants, optimizer-state surgery, checkpoints, digits."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bornsparse.sparsity import SET, RigL, allocate_nnz
from bornsparse.sparsity.dynamic import _sample_outside, dense_gradient
from bornsparse.sparsity.swap import dense_targets, indices_to_flat, sparse_targets
from tiny_models import convnet as _convnet
from tiny_models import mlp


def convnet(seed=0):
    return _convnet(seed, second_stride=2)


def make(cls, net=mlp, *, density=0.1, total_steps=60, delta=5, seed=0, lr=0.01, **kw):
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = cls(model, opt, density=density, total_steps=total_steps, delta=delta, seed=seed,
                **kw)
    return model, opt, sched


def run(model, opt, sched, x, y, steps, *, start=0, batch=64, record=None):
    for t in range(start, start + steps):
        i = (t * batch) % (len(y) - batch)
        opt.zero_grad()
        F.cross_entropy(model(x[i:i + batch]), y[i:i + batch]).backward()
        before = snapshot(model, opt) if record is not None else None
        if sched.step():
            opt.step()
        elif record is not None:
            record.append((sched.drop_fraction(sched.t), before, snapshot(model, opt)))


def snapshot(model, opt):
    out = {}
    for name, layer in sparse_targets(model):
        st = opt.state.get(layer.values, {})
        out[name] = dict(
            indices=layer.indices.clone(), values=layer.values.detach().clone(),
            exp_avg=st["exp_avg"].clone() if "exp_avg" in st else None,
            exp_avg_sq=st["exp_avg_sq"].clone() if "exp_avg_sq" in st else None,
            cols=layer.dense_shape[1], rows=layer.dense_shape[0],
        )
    return out


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# ----------------------------------------------------------------------------- schedule


def test_schedule_and_step_return_values(digits):
    x, y, *_ = digits
    model, opt, rigl = make(RigL, total_steps=40, delta=7)
    assert rigl.t_end == 30
    assert rigl.drop_fraction(0) == pytest.approx(0.3)
    assert rigl.drop_fraction(15) == pytest.approx(0.15)
    assert rigl.drop_fraction(30) == 0.0 and rigl.drop_fraction(39) == 0.0
    returned = []
    for t in range(1, 41):
        opt.zero_grad()
        F.cross_entropy(model(x[:32]), y[:32]).backward()
        returned.append(rigl.step())
        assert rigl.t == t
    assert [t for t, r in enumerate(returned, 1) if not r] == [7, 14, 21, 28]
    assert rigl.updates == 4
    with pytest.raises(RuntimeError, match="after the last step: total_steps=40"):
        rigl.step()


def test_conversion_follows_distribution_and_rebinds_optimizer():
    dense = mlp()
    shapes = [tuple(m.weight.shape) for _, m in dense_targets(dense)]
    model, opt, rigl = make(RigL, density=0.05, distribution="erk")
    counts = [l.nnz for _, l in sparse_targets(model)]
    assert counts == list(allocate_nnz(shapes, 0.05, "erk"))
    model, opt, rigl = make(SET, density=0.1, distribution="epf")
    for _, layer in sparse_targets(model):
        per_row = torch.bincount(layer.indices[0], minlength=layer.dense_shape[0])
        assert int(per_row.max() - per_row.min()) <= 1
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in in_opt} == {id(p) for p in model.parameters()}
    assert len(in_opt) == len(list(model.parameters()))


def tied_mlp(seed=0):
    """One nn.Linear reachable under two names ("3" and "5"): weight sharing."""
    torch.manual_seed(seed)
    shared = nn.Linear(32, 32)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), shared, nn.ReLU(), shared,
                         nn.ReLU(), nn.Linear(32, 10))


@pytest.mark.parametrize("include", [None, "5", lambda name, mod: name == "5"])
def test_shared_layer_is_replaced_everywhere(include, digits):
    x, y, *_ = digits
    model = tied_mlp()
    dense_shared = model[3]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rigl = RigL(model, opt, density=0.2, total_steps=12, delta=3, seed=0, include=include)
    shared = model[3]
    assert shared is model[5] and type(shared).__name__ == "SparseLinear"
    assert not any(m is dense_shared for m in model.modules())
    # chosen once, under its first name passing the filter; the bias Parameter moved over
    names = [n for n, l in rigl.layers if l is shared]
    assert names == (["5"] if include is not None else ["3"])
    assert shared.bias is dense_shared.bias
    if include is not None:
        assert type(model[1]) is nn.Linear and type(model[7]) is nn.Linear
    held = [p for g in opt.param_groups for p in g["params"]]
    assert sum(p is shared.values for p in held) == 1
    assert not any(p is dense_shared.weight for p in held)
    nnz, before = shared.nnz, shared.indices.clone()
    run(model, opt, rigl, x, y, 2)
    assert rigl._armed  # step 3 updates
    # the captured dense gradient sums both uses, as autograd does for the values
    opt.zero_grad()
    F.cross_entropy(model(x[:16]), y[:16]).backward()
    pairs = rigl._captures[names[0]].pairs
    assert len(pairs) == 2
    g = dense_gradient(shared, pairs)
    torch.testing.assert_close(g[shared.indices[0], shared.indices[1]], shared.values.grad)
    assert rigl.step() is False
    run(model, opt, rigl, x, y, 9, start=3)
    assert rigl.updates == 2 and model[3] is model[5] is shared  # t_end = 9: steps 3 and 6
    assert shared.nnz == nnz and not torch.equal(shared.indices, before)


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("cls", [RigL, SET])
@pytest.mark.parametrize("net,kind", [(mlp, "sparse"), (convnet, "sparse"), (mlp, "dctps"),
                                      (convnet, "dctps")])
def test_update_invariants(cls, net, kind, digits):
    x, y, *_ = digits
    model, opt, sched = make(cls, net, kind=kind, total_steps=40, delta=4)
    counts = [l.nnz for _, l in sparse_targets(model)]
    record = []
    run(model, opt, sched, x, y, 40, record=record)
    assert len(record) == 7  # updates at 4, 8, ..., 28 (t_end = 30)
    changed = 0
    for fraction, before, after in record:
        for name, b in before.items():
            a = after[name]
            cols, n = a["cols"], a["values"].numel()
            assert n == b["values"].numel()
            flat_a = indices_to_flat(a["indices"], cols)
            flat_b = indices_to_flat(b["indices"], cols)
            assert torch.equal(flat_a, torch.unique(flat_a))  # sorted, unique
            assert int(a["indices"][0].max()) < a["rows"] and int(a["indices"][1].max()) < cols
            new = ~torch.isin(flat_a, flat_b)
            kept = ~new
            changed += int(new.sum())
            assert (a["values"][new] == 0).all()
            assert (a["exp_avg"][new] == 0).all() and (a["exp_avg_sq"][new] == 0).all()
            src = torch.searchsorted(flat_b, flat_a[kept])
            assert torch.equal(a["values"][kept], b["values"][src])
            assert torch.equal(a["exp_avg"][kept], b["exp_avg"][src])
            assert torch.equal(a["exp_avg_sq"][kept], b["exp_avg_sq"][src])
            # what left was among the k smallest magnitudes (some of those may regrow)
            k = int(fraction * n)
            left = ~torch.isin(flat_b, flat_a)
            assert int(left.sum()) == int(new.sum()) <= k
            if left.any():
                kth = torch.sort(b["values"].abs()).values[k - 1]
                assert b["values"][left].abs().max() <= kth
    assert changed > 0
    assert [l.nnz for _, l in sparse_targets(model)] == counts
    assert all(type(l).__name__.startswith("DCTPlus" if kind == "dctps" else "Sparse")
               for _, l in sparse_targets(model))


def dense_twin(model):
    """A copy of a plain-sparse model with nn.Linear/nn.Conv2d holding to_dense() weights."""
    twin = copy.deepcopy(model)
    for name, layer in sparse_targets(twin):
        w = layer.to_dense().detach()
        if hasattr(layer, "kernel_size"):
            kh, kw = layer.kernel_size
            d = nn.Conv2d(layer.in_channels, layer.out_channels, (kh, kw), stride=layer.stride,
                          padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
            w = w.reshape(d.weight.shape)
        else:
            d = nn.Linear(layer.in_features, layer.out_features)
        with torch.no_grad():
            d.weight.copy_(w)
            d.bias.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, d)
    return twin


@pytest.mark.parametrize("net", [mlp, convnet])
@pytest.mark.parametrize("kind", ["sparse", "dctps"])
def test_dense_gradient_matches_autograd(net, kind, digits):
    x, y, *_ = digits
    model, opt, rigl = make(RigL, net, kind=kind, density=0.2, total_steps=10, delta=1)
    assert rigl._armed
    F.cross_entropy(model(x[:16]), y[:16]).backward()
    grads = {n: dense_gradient(l, rigl._captures[n].pairs) for n, l in sparse_targets(model)}
    for name, layer in sparse_targets(model):
        # at the support the dense gradient is the gradient the layer gives its values
        g = grads[name]
        torch.testing.assert_close(g[layer.indices[0], layer.indices[1]], layer.values.grad)
    if kind == "sparse":
        # everywhere, it is the weight gradient of the same network made dense
        twin = dense_twin(model)
        F.cross_entropy(twin(x[:16]), y[:16]).backward()
        for name, _ in sparse_targets(model):
            w = twin.get_submodule(name).weight
            torch.testing.assert_close(grads[name], w.grad.reshape(w.shape[0], -1))


def test_rigl_grows_the_largest_gradients(digits):
    x, y, *_ = digits
    model, opt, rigl = make(RigL, density=0.05, total_steps=10, delta=1, alpha=0.5)
    F.cross_entropy(model(x[:64]), y[:64]).backward()
    grads = {n: dense_gradient(l, rigl._captures[n].pairs).abs() for n, l in
             sparse_targets(model)}
    before = snapshot(model, opt)
    assert rigl.step() is False
    for name, layer in sparse_targets(model):
        b, cols = before[name], layer.dense_shape[1]
        old = indices_to_flat(b["indices"], cols)
        new = indices_to_flat(layer.indices, cols)
        grown = new[~torch.isin(new, old)]
        g = grads[name].flatten()
        outside = torch.ones_like(g, dtype=torch.bool)
        outside[new] = False
        outside[old] = False
        if grown.numel() and outside.any():
            assert g[grown].min() >= g[outside].max()


@pytest.mark.parametrize("cls", [RigL, SET])
def test_deterministic_for_a_seed(cls, digits):
    x, y, *_ = digits
    finals = []
    for _ in range(2):
        model, opt, sched = make(cls, total_steps=30, delta=5, seed=7)
        run(model, opt, sched, x, y, 30)
        finals.append([l.indices.clone() for _, l in sparse_targets(model)])
    assert all(torch.equal(a, b) for a, b in zip(*finals, strict=True))
    model, opt, sched = make(cls, total_steps=30, delta=5, seed=8)
    run(model, opt, sched, x, y, 30)
    other = [l.indices for _, l in sparse_targets(model)]
    assert not all(torch.equal(a, b) for a, b in zip(finals[0], other, strict=True))


@pytest.mark.parametrize("cls", [RigL, SET])
def test_resume_from_checkpoint_is_identical(cls, digits):
    x, y, *_ = digits
    model, opt, sched = make(cls, total_steps=40, delta=5, seed=3)
    run(model, opt, sched, x, y, 12)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                          "sched": sched.state_dict()})
    run(model, opt, sched, x, y, 20, start=12)
    # a fresh run built with another seed, then restored from the checkpoint
    model2, opt2, sched2 = make(cls, total_steps=40, delta=5, seed=99)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert sched2.t == 12
    run(model2, opt2, sched2, x, y, 20, start=12)
    for (_, a), (_, b) in zip(sparse_targets(model), sparse_targets(model2), strict=True):
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.values, b.values)
    torch.testing.assert_close(model(x[:16]), model2(x[:16]))


def test_works_on_an_already_sparse_model(digits):
    x, y, *_ = digits
    model = mlp()
    RigL(model, None, density=0.1, total_steps=1, seed=0)  # only to make the model sparse
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rigl = RigL(model, opt, total_steps=20, delta=2)
    record = []
    run(model, opt, rigl, x, y, 20, record=record)
    assert rigl.updates == 7 and len(record) == 7


@pytest.mark.parametrize("total,taken_n,k", [(50, 5, 10), (50, 40, 10), (7, 3, 4), (1000, 1, 1)])
def test_set_sampling_is_distinct_outside_and_uniform(total, taken_n, k):
    # both branches: rejection while the layer is at most half full, explicit list beyond
    g = torch.Generator().manual_seed(0)
    taken = torch.sort(torch.randperm(total, generator=g)[:taken_n]).values
    hits = torch.zeros(total)
    for _ in range(300):
        got = _sample_outside(total, taken, k, g)
        assert got.numel() == k == torch.unique(got).numel()
        assert not torch.isin(got, taken).any() and int(got.min()) >= 0 and int(got.max()) < total
        hits[got] += 1
    free = torch.ones(total, dtype=torch.bool)
    free[taken] = False
    # every free position drawn about 300·k/free times (loose: 5 standard deviations)
    expect = 300 * k / int(free.sum())
    assert (hits[free] - expect).abs().max() <= 5 * expect**0.5 + 1


def test_gradient_accumulation_sums_the_captured_passes(digits):
    x, y, *_ = digits
    model, opt, rigl = make(RigL, density=0.2, total_steps=10, delta=1)
    F.cross_entropy(model(x[:16]), y[:16]).backward()
    F.cross_entropy(model(x[16:40]), y[16:40]).backward()
    for name, layer in sparse_targets(model):
        pairs = rigl._captures[name].pairs
        assert len(pairs) == 2
        g = dense_gradient(layer, pairs)
        torch.testing.assert_close(g, dense_gradient(layer, pairs[:1])
                                   + dense_gradient(layer, pairs[1:]))
        torch.testing.assert_close(g[layer.indices[0], layer.indices[1]], layer.values.grad)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("cls,kind", [(RigL, "sparse"), (SET, "sparse"), (RigL, "dctps")])
def test_trains_digits_above_chance(cls, kind, digits):
    x, y, xt, yt = digits
    steps = 250
    model, opt, sched = make(cls, kind=kind, density=0.1, total_steps=steps, delta=20)
    run(model, opt, sched, x, y, steps)
    acc = accuracy(model, xt, yt)
    assert acc > 0.6, f"{cls.__name__}/{kind}: test accuracy {acc:.3f}"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("density", [0.0, 1.01, -2])
def test_rejects_density_outside_unit_interval(density):
    with pytest.raises(ValueError, match="density must lie in"):
        make(RigL, density=density)


def test_rejects_bad_arguments(digits):
    x, y, *_ = digits
    with pytest.raises(ValueError, match="distribution"):
        make(RigL, distribution="nope")
    with pytest.raises(ValueError, match="no prunable layers"):
        RigL(nn.Sequential(nn.ReLU()), None, total_steps=10)
    with pytest.raises(ValueError, match="no prunable layers"):
        RigL(mlp(), None, total_steps=10)  # dense and no density given
    with pytest.raises(ValueError, match="t_end must not exceed total_steps"):
        make(RigL, total_steps=10, t_end=11)
    with pytest.raises(ValueError, match="alpha must lie in"):
        make(SET, alpha=1.5)
    with pytest.raises(ValueError, match="kind must be one of"):
        make(SET, kind="dense")
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        RigL(mlp(), "adam", density=0.1, total_steps=10)
    with pytest.raises(ValueError, match="optimizer does not hold the values"):
        model = mlp()
        stale = torch.optim.SGD(model.parameters(), lr=0.1)
        RigL(model, None, density=0.1, total_steps=10).optimizer = stale


def test_step_without_optimizer_or_gradient_raises(digits):
    x, y, *_ = digits
    model = mlp()
    rigl = RigL(model, None, density=0.1, total_steps=10, delta=1)
    with pytest.raises(RuntimeError, match="needs an optimizer"):
        rigl.step()
    rigl.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        model(x[:8])
    with pytest.raises(RuntimeError, match="found no gradient"):
        rigl.step()


def meta_convnet_bn():
    with torch.device("meta"):
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(64, 10),
        )


@pytest.mark.parametrize("cls", [RigL, SET])
@pytest.mark.parametrize("kind", ["sparse", "dctps"])
def test_meta_model_is_converted_born_sparse_and_trains(cls, kind, digits):
    x, y, _, _ = digits
    with pytest.raises(ValueError, match="optimizer must be None for a model on the meta"):
        cls(meta_convnet_bn(), torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1),
            density=0.2, total_steps=20, kind=kind)
    model = meta_convnet_bn()
    sched = cls(model, None, density=0.2, total_steps=20, delta=4, seed=3, kind=kind)
    assert not [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    assert torch.equal(model[1].weight, torch.ones(8))  # BatchNorm's own reset_parameters
    # the supports and values come from the seed alone: as for the same net built dense
    dense = meta_convnet_bn().to_empty(device="cpu")
    for m in dense.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    cls(dense, None, density=0.2, total_steps=20, delta=4, seed=3, kind=kind)
    for (_, a), (_, b) in zip(sparse_targets(model), sparse_targets(dense), strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    nnz = [layer.nnz for _, layer in sparse_targets(model)]
    assert sum(nnz) == sum(allocate_nnz([(8, 9), (16, 72), (10, 64)], 0.2, "erk"))
    # the optimizer is built from the converted model and bound afterwards
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched.optimizer = opt
    run(model, opt, sched, x, y, 12)
    assert sched.updates > 0
    assert [layer.nnz for _, layer in sparse_targets(model)] == nnz
    assert bool(torch.isfinite(model(x[:4])).all())


def test_device_needs_density():
    with pytest.raises(ValueError, match="device is only used with density"):
        RigL(make(RigL)[0], None, total_steps=10, device="cpu")


def test_state_dict_names_class_and_topology(tmp_path):
    model, opt, rigl = make(RigL, total_steps=20, delta=5, seed=1)
    state = rigl.state_dict()
    torch.save(state, tmp_path / "rigl.pt")
    loaded = torch.load(tmp_path / "rigl.pt", weights_only=True)
    assert loaded["class"] == "RigL" and loaded["kind"] == "sparse"
    assert loaded["layers"] == [[n, l.nnz] for n, l in sparse_targets(model)]
    set_ = SET(model, opt, total_steps=20, delta=5)
    with pytest.raises(ValueError, match="is a RigL state, not a SET one"):
        set_.load_state_dict(loaded)
    other, opt2, rigl2 = make(RigL, total_steps=20, delta=5, density=0.2, seed=1)
    with pytest.raises(ValueError, match=r"layers \(name, nnz\) .* do not match"):
        rigl2.load_state_dict(loaded)
    with pytest.raises(ValueError, match=r"missing the keys \['rng'\]"):
        rigl.load_state_dict({k: v for k, v in loaded.items() if k != "rng"})
    old_format = {k: loaded[k] for k in ("t", "updates", "total_steps", "t_end", "delta",
                                         "alpha", "seed", "rng")}
    rigl.load_state_dict(old_format)  # written before class/kind/layers existed


@pytest.mark.parametrize("cls", [RigL, SET])
def test_density_on_an_already_sparse_model_says_to_leave_it_out(cls):
    from bornsparse import sparsify

    model = mlp()
    sparsify(model, kind="sparse", density=0.1, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"density=0.1 converts .* leave density out"):
        cls(model, opt, density=0.1, total_steps=10)
    sched = cls(model, opt, total_steps=10)  # adopted as they are
    assert [n for n, _ in sched.layers] == [n for n, _ in sparse_targets(model)]
