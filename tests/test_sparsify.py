import math

import pytest
import torch
from torch import nn

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
    sparsify(net, method="sparse", density=0.5, seed=1)
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
    with pytest.raises(ValueError, match="method must be one of"):
        sparsify(Net(), method="rigl", density=0.1)
    with pytest.raises(ValueError, match="distribution must be one of"):
        sparsify(Net(), density=0.1, distribution="er")
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\], got 0"):
        sparsify(Net(), density=0.0)
    with pytest.raises(ValueError, match="found no nn.Linear or nn.Conv2d"):
        sparsify(nn.Sequential(nn.ReLU()), density=0.1)
    with pytest.raises(ValueError, match="found no nn.Linear or nn.Conv2d"):
        sparsify(Net(), density=0.1, include="nothing.*")
    with pytest.raises(ValueError, match="below one per layer"):
        sparsify(Net(), density=1e-5)
    with pytest.raises(TypeError, match="include must be a glob string"):
        sparsify(Net(), density=0.1, include=[1])
    with pytest.raises(TypeError, match="seed must be an int"):
        sparsify(Net(), density=0.1, seed=1.5)
    with pytest.raises(ValueError, match="device must be a real device"):
        sparsify(nn.Sequential(nn.Linear(4, 4, device="meta")), density=0.5, device="meta")
