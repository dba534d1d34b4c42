"""sparsity.swap: the one walk/filter/build/swap used by sparsify, pruning at init, IMP, RigL."""

import copy

import pytest
import torch
from torch import nn

from bornsparse.nn import DCTPlusSparseConv2d, DCTPlusSparseLinear, SparseConv2d, SparseLinear
from bornsparse.sparsity.swap import (
    as_matcher,
    default_device,
    dense_targets,
    has_meta,
    make_sparse_layer,
    materialize_meta,
    sparse_targets,
    swap_in_sparse_layers,
    weight_matrix,
)


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 6),
        nn.Linear(6, 2),
    )


def names(targets):
    return [n for n, _ in targets]


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (None, None, ["0.0", "2", "3"]),
        ("0.*", None, ["0.0"]),
        (["2", "3"], None, ["2", "3"]),
        (("0.*", "3"), "3", ["0.0"]),
        (lambda n, m: isinstance(m, nn.Linear), None, ["2", "3"]),
        (lambda n, m: isinstance(m, nn.Linear), "3", ["2"]),
        ("*", lambda n, m: m.weight.dim() == 4, ["2", "3"]),
        (iter(["2"]), None, ["2"]),  # any iterable of globs, consumed once
    ],
)
def test_dense_targets_globs_callables_and_their_union(include, exclude, expected):
    assert names(dense_targets(net(), include=include, exclude=exclude)) == expected


def test_callable_selector_gets_name_and_module():
    seen = []
    dense_targets(net(), include=lambda n, m: seen.append((n, type(m))) or True)
    assert seen == [("0.0", nn.Conv2d), ("2", nn.Linear), ("3", nn.Linear)]


@pytest.mark.parametrize("bad", [[1], 5, ["a", None]])
@pytest.mark.parametrize("arg", ["include", "exclude"])
def test_bad_selector_is_type_error_naming_argument(arg, bad):
    with pytest.raises(TypeError, match=f"{arg} must be a glob string, a list of them or a"):
        dense_targets(net(), **{arg: bad})
    with pytest.raises(TypeError, match=f"{arg} must be a glob string"):
        sparse_targets(net(), **{arg: bad})


def test_as_matcher():
    assert as_matcher("include", None) is None
    m = as_matcher("include", ["a.*", "b"])
    assert m("a.x", nn.ReLU()) and m("b", nn.ReLU()) and not m("c", nn.ReLU())


def test_nothing_to_prune_and_root_is_never_a_target():
    with pytest.raises(ValueError, match="no prunable layers: found no nn.Linear, "
                                         "transformers Conv1D or nn.Conv2d"):
        dense_targets(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="no prunable layers"):
        dense_targets(net(), include="nothing")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        dense_targets("net")
    with pytest.raises(ValueError, match="no materialised weight"):
        dense_targets(nn.Sequential(nn.Linear(4, 4, device="meta")))
    with pytest.raises(ValueError, match="must name submodules"):
        swap_in_sparse_layers(net(), {"": 3})


def test_shared_module_listed_once_under_first_passing_name_and_swapped_everywhere():
    shared = nn.Linear(5, 5)
    inner = nn.Sequential(shared)
    model = nn.Sequential(shared, nn.Tanh(), shared, inner)
    assert names(dense_targets(model)) == ["0"]
    # a later alias that passes the filters still selects the module
    assert names(dense_targets(model, exclude="0")) == ["2"]
    assert names(dense_targets(model, include="3.*")) == ["3.0"]
    x = torch.randn(4, 5)
    new = swap_in_sparse_layers(model, {"3.0": 7}, seeds={"3.0": 1})
    layer = new["3.0"]
    assert isinstance(layer, SparseLinear) and layer.nnz == 7
    assert model[0] is layer and model[2] is layer and inner[0] is layer
    assert names(sparse_targets(model)) == ["0"]
    assert model(x).shape == (4, 5)


@pytest.mark.parametrize("kind", ["sparse", "dctps"])
@pytest.mark.parametrize(
    "dense",
    [
        nn.Linear(7, 5),
        nn.Linear(7, 5, bias=False),
        nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, groups=2, padding_mode="reflect"),
        nn.Conv2d(3, 5, 1, bias=False, dilation=2),
    ],
    ids=["linear", "linear-nobias", "conv-groups", "conv-nobias"],
)
def test_make_sparse_layer_keeps_geometry_bias_and_dense_values(kind, dense):
    torch.manual_seed(1)
    dense = dense.double().eval()
    rows, cols = weight_matrix(dense).shape
    flat = torch.randperm(rows * cols)[: max(1, rows * cols // 3)].sort().values
    idx = torch.stack([flat // cols, flat % cols])
    new = make_sparse_layer(dense, idx, kind=kind)
    linear = isinstance(dense, nn.Linear)
    expected = {
        ("sparse", True): SparseLinear, ("sparse", False): SparseConv2d,
        ("dctps", True): DCTPlusSparseLinear, ("dctps", False): DCTPlusSparseConv2d,
    }[(kind, linear)]
    assert type(new) is expected
    assert new.bias is dense.bias  # the Parameter object itself, not a copy
    assert not new.training and new.values.dtype == torch.float64
    if kind == "dctps":
        assert isinstance(new.alpha, nn.Parameter) and new.alpha.item() == 1.0
    # S holds the dense weights at the support and nothing else
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[flat] = True
    w = weight_matrix(dense).detach()
    kept = torch.where(mask.view(rows, cols), w, 0)
    torch.testing.assert_close(new.sparse_dense().detach(), kept)
    # same geometry: the dense layer given the sparse layer's effective weight computes the same
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        ref.weight.copy_(new.to_dense().view(dense.weight.shape))
    x = torch.randn(3, 7) if linear else torch.randn(2, dense.in_channels, 9, 8)
    x = x.double()
    torch.testing.assert_close(new(x), ref(x))


@pytest.mark.parametrize("kind", ["sparse", "dctps"])
def test_make_sparse_layer_draws_its_own_support(kind):
    dense = nn.Conv2d(4, 6, 3)
    a = make_sparse_layer(dense, kind=kind, nnz=20, support="per_row", seed=5)
    b = make_sparse_layer(dense, kind=kind, nnz=20, support="per_row", seed=5)
    c = make_sparse_layer(dense, kind=kind, nnz=20, seed=6)
    assert a.nnz == 20 and a.support == "per_row" and a.bias is dense.bias
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    assert not torch.equal(a.indices, c.indices)
    counts = torch.bincount(a.indices[0], minlength=6)
    assert counts.max() - counts.min() <= 1
    if kind == "dctps":  # the paper's S = 0 at init
        assert torch.count_nonzero(a.values) == 0
    else:
        assert torch.count_nonzero(a.values) == 20


def test_make_sparse_layer_bad_input():
    dense = nn.Linear(4, 3)
    idx = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="needs indices, or nnz without values"):
        make_sparse_layer(dense)
    with pytest.raises(ValueError, match="needs indices, or nnz without values"):
        make_sparse_layer(dense, nnz=2, values=torch.ones(2))
    with pytest.raises(ValueError, match="either indices or nnz"):
        make_sparse_layer(dense, idx, nnz=2)
    with pytest.raises(TypeError, match="cannot make a sparse layer from ReLU"):
        make_sparse_layer(nn.ReLU(), idx)
    with pytest.raises(ValueError, match="kind must be one of"):
        make_sparse_layer(dense, idx, kind="dense")


def test_swap_indices_values_and_layer_init():
    model = net()
    w2 = model[2].weight.detach().clone()
    bias3 = model[3].bias
    idx = torch.tensor([[0, 5], [1, 30]])
    new = swap_in_sparse_layers(
        model,
        {"2": idx, "3": torch.tensor([[1], [4]]), "0.0": 9},
        kind="dctps",
        values={"3": torch.tensor([2.5])},
        seeds={"0.0": 3},
    )
    assert list(new) == ["2", "3", "0.0"]
    assert model[2] is new["2"] and model[0][0] is new["0.0"] and model[3].bias is bias3
    torch.testing.assert_close(new["2"].values.detach(), w2[idx[0], idx[1]])
    assert new["3"].values.item() == 2.5
    assert new["0.0"].nnz == 9 and isinstance(new["0.0"], DCTPlusSparseConv2d)
    # layer_init: the sparse layer initialises the values itself (sparse Kaiming), seeded
    runs = [
        swap_in_sparse_layers(net(), {"2": idx}, layer_init=True, seeds={"2": 4})["2"]
        for _ in range(2)
    ]
    assert torch.equal(runs[0].values, runs[1].values)
    assert not torch.equal(runs[0].values.detach(), w2[idx[0], idx[1]])


def test_meta_layers_are_built_from_their_shapes_on_a_device():
    with torch.device("meta"):
        lin, conv = nn.Linear(12, 5), nn.Conv2d(4, 6, 3, groups=2)
    with pytest.raises(ValueError, match="needs a real device"):
        make_sparse_layer(lin, nnz=7, seed=0)
    idx = torch.tensor([[0, 4], [3, 11]])
    with pytest.raises(ValueError, match="no dense weight to copy values from"):
        make_sparse_layer(lin, idx, device="cpu")
    a = make_sparse_layer(lin, nnz=7, seed=0, device="cpu")
    b = make_sparse_layer(lin, nnz=7, seed=0, device="cpu")
    assert isinstance(a, SparseLinear) and a.values.device.type == "cpu" and a.nnz == 7
    assert torch.equal(a.bias, b.bias) and float(a.bias.detach().abs().max()) <= 1 / 12**0.5
    c = make_sparse_layer(conv, idx, kind="dctps", layer_init=True, seed=1, device="cpu")
    assert isinstance(c, DCTPlusSparseConv2d) and torch.equal(c.indices, idx)
    assert float(c.bias.detach().abs().max()) <= 1 / (2 * 9) ** 0.5  # dense fan-in 2·3·3
    assert dense_targets(nn.Sequential(lin), allow_meta=True)[0][1] is lin


class _Gated(nn.Module):
    """Own parameter plus a child whose bias its reset_parameters overrides."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(4))
        self.proj = nn.Linear(4, 4)

    def reset_parameters(self):
        nn.init.normal_(self.gate)
        nn.init.zeros_(self.proj.bias)


def test_materialize_meta_resets_children_before_parents_from_the_seed():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), _Gated())
    assert has_meta(model) and default_device(model) == torch.device("cpu")
    names = materialize_meta(model, "cpu", seed=5)
    assert not has_meta(model) and set(names) == {"0", "1", "2", "2.proj"}
    # the parent's reset has the last word, as in an ordinary construction
    assert torch.equal(model[2].proj.bias, torch.zeros(4))
    assert torch.equal(model[1].running_var, torch.ones(4))
    with torch.device("meta"):
        again = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), _Gated())
    materialize_meta(again, "cpu", seed=5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values(), strict=True))
    state = torch.random.get_rng_state()
    with torch.device("meta"):
        third = nn.Sequential(nn.Linear(3, 4))
    materialize_meta(third, "cpu", seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is restored
    assert default_device(model) == torch.device("cpu")
