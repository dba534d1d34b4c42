import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bornsparse.models.sparsify_model import SparsifyReport, sparsify
from bornsparse.nn import DCTPlusSparseConv2d, DCTPlusSparseLinear, SparseConv2d, SparseLinear
from bornsparse.sparsity import allocate_nnz


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, groups=2, bias=False), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 3 * 3, 32), nn.ReLU())
        self.out = nn.Linear(32, 5)

    def forward(self, x):
        return self.out(self.head(self.features(x)))


def param_bytes(m):
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


def test_swaps_every_layer_and_reports():
    torch.manual_seed(0)
    net = Net()
    shapes = [tuple(m.weight.shape) for m in net.modules() if type(m) in (nn.Linear, nn.Conv2d)]
    dense_bytes = param_bytes(net)
    x = torch.randn(2, 3, 8, 8)
    report = sparsify(net, density=0.1, distribution="erk", seed=0)
    assert isinstance(report, SparsifyReport)
    assert [type(m) for m in (net.features[0], net.features[2], net.head[1], net.out)] == [
        DCTPlusSparseConv2d, DCTPlusSparseConv2d, DCTPlusSparseLinear, DCTPlusSparseLinear,
    ]
    assert [r.name for r in report.layers] == ["features.0", "features.2", "head.1", "out"]
    assert [r.nnz for r in report.layers] == allocate_nnz(shapes, 0.1, "erk")
    assert report.total_nnz == round(0.1 * report.total_dense_weights)
    assert report.total_dense_weights == sum(math.prod(s) for s in shapes)
    assert report.dense_model_bytes == dense_bytes
    assert report.sparse_model_bytes == param_bytes(net)
    assert report.stored_bytes == sum(param_bytes(m) for m in net.modules()
                                      if isinstance(m, DCTPlusSparseLinear | SparseConv2d))
    assert net.features[2].bias is None and net.features[2].groups == 2
    assert net(x).shape == (2, 5)
    text = str(report)
    assert "features.2" in text and "DCTPlusSparseConv2d" in text and "total" in text
    assert "dense model" in text


def test_method_sparse_and_bias_parameter_moved():
    net = nn.Sequential(nn.Linear(20, 10), nn.Conv2d(1, 2, 1))
    biases = [net[0].bias, net[1].bias]
    values = [b.detach().clone() for b in biases]
    sparsify(net, kind="sparse", density=0.5, seed=1)
    assert type(net[0]) is SparseLinear and type(net[1]) is SparseConv2d
    # the Parameter objects themselves: an optimizer built on the dense model still holds them
    assert net[0].bias is biases[0] and net[1].bias is biases[1]
    torch.testing.assert_close(net[0].bias.detach(), values[0])


def test_seed_reproducible_and_dtype_device_kept():
    a = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 4)).double()
    b = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 4)).double()
    b.load_state_dict(a.state_dict())
    sparsify(a, density=0.2, seed=3)
    sparsify(b, density=0.2, seed=3)
    for (ka, ta), (kb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(ta, tb)
    assert a[0].values.dtype == torch.float64


def test_include_exclude_and_callable():
    net = Net()
    r = sparsify(net, density=0.3, include=["features.*"], seed=0)
    assert [x.name for x in r.layers] == ["features.0", "features.2"]
    assert type(net.out) is nn.Linear
    net = Net()
    r = sparsify(net, density=0.3, exclude="out", seed=0)
    assert [x.name for x in r.layers] == ["features.0", "features.2", "head.1"]
    net = Net()
    r = sparsify(net, density=0.3, include=lambda n, m: isinstance(m, nn.Linear), seed=0)
    assert [x.name for x in r.layers] == ["head.1", "out"]
    net = Net()
    r = sparsify(net, density=0.3, include="features.*",
                 exclude=lambda n, m: m.bias is None, seed=0)
    assert [x.name for x in r.layers] == ["features.0"]
    assert type(net.features[2]) is nn.Conv2d


def test_epf_lays_out_equal_per_filter():
    net = nn.Sequential(nn.Conv2d(4, 6, 3), nn.Linear(10, 7))
    sparsify(net, density=0.25, distribution="epf", seed=0)
    for layer in net:
        counts = torch.bincount(layer.indices[0], minlength=layer.dense_shape[0])
        assert counts.max() - counts.min() <= 1
        assert layer.support == "per_row"


def test_shared_layer_replaced_everywhere_once():
    shared = nn.Linear(6, 6)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    r = sparsify(net, density=0.5, seed=0)
    assert len(r.layers) == 1 and net[0] is net[2]
    assert isinstance(net[0], DCTPlusSparseLinear)


def test_shared_layer_chosen_by_any_alias_and_reported_under_it():
    shared = nn.Linear(6, 6)
    net = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared), nn.Linear(6, 2))
    r = sparsify(net, density=0.5, exclude=["0", "3"], seed=0)
    assert [x.name for x in r.layers] == ["2.0"]
    assert net[0] is net[2][0] and isinstance(net[0], DCTPlusSparseLinear)
    assert type(net[3]) is nn.Linear


def test_multihead_attention_projection_left_alone():
    net = nn.Sequential(nn.Linear(8, 8))
    net.attn = nn.MultiheadAttention(8, 2)
    r = sparsify(net, density=0.5, seed=0)
    assert [x.name for x in r.layers] == ["0"]
    q = torch.randn(3, 1, 8)
    assert net.attn(q, q, q)[0].shape == (3, 1, 8)


def test_sparsified_model_trains():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 1))
    sparsify(net, density=0.1, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    x = torch.randn(128, 10)
    y = torch.sin(x[:, :1]) + x[:, 1:2]
    first = None
    for _ in range(80):
        opt.zero_grad()
        loss = (net(x) - y).square().mean()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.5 * first


def test_bad_input():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sparsify("net", density=0.1)
    with pytest.raises(ValueError, match="kind must be one of"):
        sparsify(Net(), kind="rigl", density=0.1)
    with pytest.warns(DeprecationWarning, match="kind="):
        report = sparsify(Net(), method="sparse", density=0.1, seed=0)
    assert report.kind == "sparse"
    with pytest.raises(ValueError, match="distribution must be one of"):
        sparsify(Net(), density=0.1, distribution="er")
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\], got 0"):
        sparsify(Net(), density=0.0)
    with pytest.raises(ValueError, match="found no nn.Linear, transformers Conv1D or nn.Conv2d"):
        sparsify(nn.Sequential(nn.ReLU()), density=0.1)
    with pytest.raises(ValueError, match="found no nn.Linear, transformers Conv1D or nn.Conv2d"):
        sparsify(Net(), density=0.1, include="nothing.*")
    with pytest.raises(ValueError, match="below one per layer"):
        sparsify(Net(), density=1e-5)
    with pytest.raises(TypeError, match="include must be a glob string"):
        sparsify(Net(), density=0.1, include=[1])
    with pytest.raises(TypeError, match="seed must be an int"):
        sparsify(Net(), density=0.1, seed=1.5)
    with pytest.raises(ValueError, match="device must be a real device"):
        sparsify(nn.Sequential(nn.Linear(4, 4, device="meta")), density=0.5, device="meta")


# ---------------------------------------------------------------------------------------
# Born sparse: models built on the meta device, never materialised dense


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op produces on a real (non-meta) device."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.largest = max(self.largest, t.numel())
        return out


def meta_mlp():
    with torch.device("meta"):
        return nn.Sequential(nn.Flatten(), nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))


def meta_convnet():
    with torch.device("meta"):
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * 8 * 8, 40), nn.ReLU(), nn.Linear(40, 10),
        )


def _dense_numels(model):
    return [m.weight.numel() for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)]


@pytest.mark.parametrize("method", ["sparse", "dctps"])
@pytest.mark.parametrize("build, x_shape", [(meta_mlp, (3, 300)), (meta_convnet, (3, 3, 8, 8))])
def test_meta_model_is_built_sparse_without_dense_weights(method, build, x_shape):
    model = build()
    numels = _dense_numels(model)
    shapes = [m.weight.shape for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)]
    with _LargestAllocation() as seen:
        report = sparsify(model, kind=method, density=0.1, seed=0)
    # nothing as large as the largest dense weight was ever allocated: only O(nnz) tensors
    assert seen.largest < max(numels)
    assert seen.largest <= 2 * report.total_nnz  # the (2, nnz) indices of one layer
    assert not [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    counts = allocate_nnz([tuple(s) for s in shapes], 0.1, "epl")
    assert [r.nnz for r in report.layers] == counts
    assert report.total_nnz == round(0.1 * sum(numels))
    sparse = [m for m in model.modules() if hasattr(m, "values")]
    assert [m.values.numel() for m in sparse] == counts
    assert [tuple(m.indices.shape) for m in sparse] == [(2, k) for k in counts]
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # materialised by its own reset_parameters
            assert torch.equal(m.weight, torch.ones(16)) and int(m.num_batches_tracked) == 0
            assert torch.equal(m.running_var, torch.ones(16))
    y = model(torch.randn(x_shape))
    assert y.shape == (3, 10) and bool(torch.isfinite(y).all())
    y.sum().backward()
    for r, m in zip(report.layers, [m for m in model.modules() if hasattr(m, "values")],
                    strict=True):
        if m.bias is not None:  # nn.Linear's default bias init, with the dense fan-in
            bound = 1 / math.sqrt(math.prod(r.shape[1:]))
            b = m.bias.detach().abs()
            assert float(b.max()) <= bound and float(b.min()) > 0


@pytest.mark.parametrize("method", ["sparse", "dctps"])
def test_meta_model_is_reproducible_and_matches_the_dense_paths_supports(method):
    def run(model):
        sparsify(model, kind=method, density=0.2, distribution="erk", seed=11)
        return model.state_dict()

    a, b = run(meta_convnet()), run(meta_convnet())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    dense = meta_convnet().to_empty(device="cpu")
    for m in dense.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    d = run(dense)
    # the layers' supports and values come from the seed alone, dense weight or not
    for k in a:
        if k.endswith(("values", "indices", "alpha")):
            assert torch.equal(a[k], d[k]), k


def test_meta_device_argument_and_errors():
    model = meta_mlp()
    sparsify(model, kind="sparse", density=0.1, seed=0, device="cpu")
    assert all(t.device.type == "cpu" for t in model.state_dict().values())

    class Scaled(nn.Module):  # own meta parameter, no reset_parameters: cannot be recreated
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.lin(x) * self.scale

    with torch.device("meta"):
        bad = nn.Sequential(Scaled())
    with pytest.raises(ValueError, match=r"module '0' \(Scaled\) has meta-device"):
        sparsify(bad, density=0.5, seed=0)
    with pytest.raises(ValueError, match="device must be a real device"):
        sparsify(meta_mlp(), density=0.5, device="meta")


def test_meta_layers_left_dense_are_materialised_from_the_seed():
    def run():
        model = meta_mlp()
        sparsify(model, density=0.1, seed=4, exclude="3")
        return model

    a, b = run(), run()
    assert type(a[3]) is nn.Linear and a[3].weight.device.type == "cpu"
    assert torch.equal(a[3].weight, b[3].weight)
    assert float(a[3].weight.detach().abs().max()) <= 1 / math.sqrt(200)


def test_huge_meta_linear_is_stored_as_its_nonzeros():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(65536, 65536))  # 16 GiB dense in float32
    report = sparsify(model, kind="sparse", density=1e-4, seed=0)
    layer = model[0]
    assert isinstance(layer, SparseLinear) and layer.nnz == round(1e-4 * 65536**2)
    bias_bytes = 65536 * 4
    # 4 B per value + two int32 indices per entry
    assert report.stored_bytes - bias_bytes == layer.nnz * 12
    assert report.dense_bytes == (65536**2 + 65536) * 4
    y = model(torch.ones(1, 65536))
    assert bool(torch.isfinite(y).all())


@pytest.mark.parametrize("method", ["dctps", "sparse"])
def test_fixup_resnet_born_sparse_from_meta(method):
    from bornsparse.models import build_model

    with torch.device("meta"):
        model = build_model("fixup_resnet20", num_classes=10, input_shape=(3, 32, 32))
    sparsify(model, kind=method, density=0.01, seed=0, device="cpu")
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    for block in model.blocks:  # FixUp's scalars, reset by the blocks themselves
        assert block.scale.item() == 1.0 and block.bias1a.item() == 0.0
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
