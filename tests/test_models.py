"""Model zoo: architectures, exact parameter counts, FixUp initialisation, validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bornsparse.models import MODELS, build_model
from bornsparse.models.cnn1d import CNN1D
from bornsparse.models.fixup import FixupBasicBlock, FixupResNet
from bornsparse.models.lenet import LeNet5
from bornsparse.models.mobilenetv2 import CIFAR_CONFIG, MobileNetV2
from bornsparse.models.resnet_cifar import CifarResNet, ZeroPadShortcut

CIFAR = (3, 32, 32)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---- parameter counts derived from the architectures' definitions, layer by layer --------

def conv(cin: int, cout: int, k: int, bias: bool = False, groups: int = 1) -> int:
    return cout * (cin // groups) * k * k + (cout if bias else 0)


def bn(c: int) -> int:
    return 2 * c


def linear(a: int, b: int) -> int:
    return a * b + b


def count_cifar_resnet(depth: int, classes: int, *, batchnorm: bool) -> int:
    """He et al. 6n+2 ResNet, option A; FixUp swaps each BN for nothing and adds scalars."""
    n = (depth - 2) // 6
    norm = bn if batchnorm else (lambda c: 0)
    total = conv(3, 16, 3) + norm(16)
    c_in = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += conv(c_in, c, 3) + norm(c) + conv(c, c, 3) + norm(c)
            if not batchnorm:
                total += 5  # bias1a, bias1b, bias2a, bias2b, scale
            c_in = c
    if not batchnorm:
        total += 2  # bias1, bias2
    return total + linear(64, classes)


def count_mobilenetv2(classes: int, *, conv_shortcut: bool) -> int:
    total = conv(3, 32, 3) + bn(32)
    c_in = 32
    for t, c, n, s in CIFAR_CONFIG:
        for i in range(n):
            stride = s if i == 0 else 1
            h = c_in * t
            total += conv(c_in, h, 1) + bn(h) + conv(h, h, 3, groups=h) + bn(h)
            total += conv(h, c, 1) + bn(c)
            if stride == 1 and c_in != c and conv_shortcut:
                total += conv(c_in, c, 1) + bn(c)
            c_in = c
    return total + conv(320, 1280, 1) + bn(1280) + linear(1280, classes)


def count_resnet50(classes: int) -> int:
    total = conv(3, 64, 3) + bn(64)
    c_in = 64
    for c, n in zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True):
        for i in range(n):
            out = 4 * c
            total += conv(c_in, c, 1) + bn(c) + conv(c, c, 3) + bn(c) + conv(c, out, 1) + bn(out)
            if i == 0:  # stride 2 or 64 -> 256 channels: projection shortcut
                total += conv(c_in, out, 1) + bn(out)
            c_in = out
    return total + linear(2048, classes)


def count_lenet5(channels: int, classes: int) -> int:
    return (conv(channels, 6, 5, True) + conv(6, 16, 5, True) + linear(400, 120)
            + linear(120, 84) + linear(84, classes))


def test_derived_counts_match_published_figures():
    # the figures quoted for these networks (He et al. / the common CIFAR ports, LeCun's
    # LeNet-5, the MNIST-1D paper's ConvBase and MLP) pin the derivations above
    assert count_cifar_resnet(20, 10, batchnorm=True) == 269_722
    assert count_cifar_resnet(110, 10, batchnorm=True) == 1_727_962
    assert count_mobilenetv2(10, conv_shortcut=True) == 2_296_922
    assert count_resnet50(10) == 23_520_842
    assert count_lenet5(1, 10) == 61_706


CASES = [
    # name, input_shape, classes, expected parameter count
    ("mlp", (40,), 10, linear(40, 100) + linear(100, 100) + linear(100, 10)),
    ("lenet5", CIFAR, 10, count_lenet5(3, 10)),
    ("lenet5", (1, 28, 28), 10, count_lenet5(1, 10)),
    ("lenet5", (1, 8, 8), 10, count_lenet5(1, 10)),
    ("cnn1d", (40,), 10, 25 * 5 + 25 + 2 * (25 * 25 * 3 + 25) + linear(125, 10)),
    ("resnet20", CIFAR, 10, count_cifar_resnet(20, 10, batchnorm=True)),
    ("resnet20", CIFAR, 100, count_cifar_resnet(20, 100, batchnorm=True)),
    ("resnet110", CIFAR, 10, count_cifar_resnet(110, 10, batchnorm=True)),
    ("fixup_resnet20", CIFAR, 10, count_cifar_resnet(20, 10, batchnorm=False)),
    ("fixup_resnet110", CIFAR, 10, count_cifar_resnet(110, 10, batchnorm=False)),
    ("mobilenetv2", CIFAR, 10, count_mobilenetv2(10, conv_shortcut=True)),
    ("mobilenetv2", CIFAR, 100, count_mobilenetv2(100, conv_shortcut=True)),
    ("resnet50", CIFAR, 10, count_resnet50(10)),
    ("resnet50", CIFAR, 100, count_resnet50(100)),
]


def test_registry_names():
    assert set(MODELS) == {c[0] for c in CASES}


@pytest.mark.parametrize("name,shape,classes,expected", CASES)
def test_build_forward_backward_and_count(name, shape, classes, expected):
    torch.manual_seed(0)
    model = build_model(name, num_classes=classes, input_shape=shape)
    assert n_params(model) == expected
    x = torch.randn(2, *shape)
    y = model(x)
    assert y.shape == (2, classes)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_mlp_hidden_sizes_and_flattening():
    m = build_model("mlp", num_classes=3, input_shape=(2, 3), hidden_sizes=(7,))
    assert n_params(m) == linear(6, 7) + linear(7, 3)
    m0 = build_model("mlp", num_classes=3, input_shape=(5,), hidden_sizes=())
    assert n_params(m0) == linear(5, 3)
    x = torch.randn(4, 2, 3)
    assert torch.equal(m(x), m(x.reshape(4, 6).reshape(4, 2, 3)))


def test_cnn1d_equals_conv1d_convbase():
    """The (1, k) Conv2d layers compute ConvBase's Conv1d layers exactly."""
    torch.manual_seed(1)
    model = CNN1D((40,), 10).double()
    convs = []
    for c2d, (k, s, p) in zip(model.convs, ((5, 2, 1), (3, 2, 1), (3, 2, 1)), strict=True):
        c1d = nn.Conv1d(c2d.in_channels, c2d.out_channels, k, stride=s, padding=p).double()
        with torch.no_grad():
            c1d.weight.copy_(c2d.weight[:, :, 0, :])
            c1d.bias.copy_(c2d.bias)
        convs.append(c1d)
    x = torch.randn(3, 40, dtype=torch.float64)
    h = x[:, None, :]
    for c in convs:
        h = F.relu(c(h))
    assert h.shape == (3, 25, 5)
    ref = model.linear(h.flatten(1))
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-12)
    # a (1, L) input shape is the same model
    m2 = CNN1D((1, 40), 10).double()
    m2.load_state_dict(model.state_dict())
    torch.testing.assert_close(m2(x[:, None, :]), model(x))
    assert all(isinstance(m, nn.Conv2d) for m in model.convs)


def test_lenet_small_inputs_are_zero_padded_to_32():
    torch.manual_seed(2)
    small = LeNet5((1, 8, 8), 10)
    big = LeNet5((1, 32, 32), 10)
    big.load_state_dict(small.state_dict())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(small(x), big(F.pad(x, (12, 12, 12, 12))))
    odd = LeNet5((1, 27, 30), 10)  # uneven padding still yields 32 × 32
    assert odd.padding == (1, 1, 2, 3)
    assert odd(torch.randn(1, 1, 27, 30)).shape == (1, 10)
    wide = LeNet5((3, 40, 40), 10)  # larger inputs grow the first FC layer
    assert wide.fc1.in_features == 16 * 7 * 7
    assert LeNet5((1, 32, 32), 10, pool="max")(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def test_option_a_shortcut():
    x = torch.randn(2, 16, 8, 6)
    s = ZeroPadShortcut(16, 32, 2)(x)
    assert s.shape == (2, 32, 4, 3)
    torch.testing.assert_close(s[:, :16], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert (s[:, 16:] == 0).all()
    # ResNet-20 has no parameters in its shortcuts (option A)
    m = CifarResNet(20, CIFAR, 10)
    assert not any("shortcut" in n for n, _ in m.named_parameters())


def _spatial_sizes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    sizes = {}
    hooks = [
        mod.register_forward_hook(lambda _m, _i, out, n=name: sizes.__setitem__(n, out.shape))
        for name, mod in model.named_children()
    ]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sizes


@pytest.mark.parametrize("name,final", [("resnet20", 64), ("mobilenetv2", 320), ("resnet50", 2048)])
def test_cifar_variants_keep_resolution_in_the_stem(name, final):
    model = build_model(name, num_classes=10, input_shape=CIFAR)
    sizes = _spatial_sizes(model, torch.randn(1, *CIFAR))
    assert sizes["conv1"][-2:] == (32, 32)  # stride-1 stem, no max-pool
    expected = {"resnet20": 8, "mobilenetv2": 4, "resnet50": 4}[name]
    assert sizes["blocks"][1:] == (final, expected, expected)


def test_mobilenetv2_without_conv_shortcuts():
    m = MobileNetV2(CIFAR, 10, conv_shortcut=False)
    assert n_params(m) == count_mobilenetv2(10, conv_shortcut=False) == 2_237_770
    assert m(torch.randn(2, *CIFAR)).shape == (2, 10)


def test_batchnorm_models_have_batchnorm_and_fixup_has_none():
    for name in ("resnet20", "mobilenetv2"):
        m = build_model(name, num_classes=10, input_shape=CIFAR)
        assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    m = build_model("fixup_resnet20", num_classes=10, input_shape=CIFAR)
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


def _shortcut_only(model: FixupResNet, x: torch.Tensor) -> torch.Tensor:
    """The FixUp network with every residual branch removed."""
    h = F.relu(model.conv1(x) + model.bias1)
    for block in model.blocks:
        h = F.relu(h if isinstance(block.shortcut, nn.Identity) else block.shortcut(h))
    h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
    return model.fc(h + model.bias2)


def test_fixup_init_branches_are_zero_and_network_is_its_shortcut_path():
    torch.manual_seed(3)
    model = FixupResNet(20, CIFAR, 10)
    x = torch.randn(2, *CIFAR)
    assert (model(x) == 0).all()  # zero classifier
    h = F.relu(model.conv1(x) + model.bias1)
    for block in model.blocks:
        assert (block.branch(h) == 0).all()
        h = block(h)
    with torch.no_grad():  # a non-zero classifier makes the comparison informative
        nn.init.normal_(model.fc.weight)
        nn.init.normal_(model.fc.bias)
    out = model(x)
    assert out.abs().max() > 0
    torch.testing.assert_close(out, _shortcut_only(model, x), rtol=0, atol=0)


def test_fixup_weight_scales():
    torch.manual_seed(4)
    model = FixupResNet(110, CIFAR, 10)
    num_branches = 54
    for block in model.blocks:
        assert (block.conv2.weight == 0).all()
    w = model.blocks[-1].conv1.weight  # 64·64·9 = 36,864 draws
    target = math.sqrt(2 / (64 * 9)) * num_branches**-0.5
    assert abs(w.std().item() / target - 1) < 0.03
    assert abs(w.mean().item()) < 0.03 * target
    assert (model.fc.weight == 0).all() and (model.fc.bias == 0).all()


def test_fixup_trains_out_of_its_initial_point():
    torch.manual_seed(5)
    model = FixupResNet(20, CIFAR, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, *CIFAR), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    # the classifier moves first, then the zero-initialised last convolutions
    assert model.fc.weight.abs().max() > 0
    assert any(b.conv2.weight.abs().max() > 0 for b in model.blocks)
    assert isinstance(model.blocks[0], FixupBasicBlock)


def test_device_and_dtype():
    for name, shape in (("mlp", (40,)), ("cnn1d", (40,)), ("lenet5", (1, 8, 8)),
                        ("resnet20", CIFAR), ("fixup_resnet20", CIFAR)):
        m = build_model(name, num_classes=5, input_shape=shape, dtype=torch.float64, device="cpu")
        assert {p.dtype for p in m.parameters()} == {torch.float64}
        assert m(torch.randn(2, *shape, dtype=torch.float64)).dtype == torch.float64


# ---- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"name": "resnet18"}, ValueError, "name must be one of"),
        ({"name": 3}, ValueError, "name must be one of"),
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"num_classes": "10"}, TypeError, "num_classes"),
        ({"num_classes": True}, TypeError, "num_classes"),
        ({"input_shape": (32, 32)}, ValueError, r"resnet20 needs input_shape \(channels"),
        ({"input_shape": (3, 0, 32)}, ValueError, "positive ints"),
        ({"input_shape": "3x32x32"}, TypeError, "input_shape"),
        ({"input_shape": 32}, TypeError, "input_shape"),
        ({"width": 2}, TypeError, r"unexpected keyword argument\(s\) \['width'\]"),
        ({"dtype": torch.int64}, TypeError, "dtype"),
    ],
)
def test_build_model_errors(kwargs, exc, match):
    args = {"name": "resnet20", "num_classes": 10, "input_shape": CIFAR, **kwargs}
    name = args.pop("name")
    with pytest.raises(exc, match=match):
        build_model(name, **args)


@pytest.mark.parametrize(
    "name,shape,kwargs,match",
    [
        ("cnn1d", (2, 40), {}, r"cnn1d needs input_shape \(length,\)"),
        ("cnn1d", (2,), {}, "length at least 3"),
        ("cnn1d", (40,), {"channels": 0}, "channels"),
        ("lenet5", (40,), {}, "lenet5 needs input_shape"),
        ("lenet5", CIFAR, {"pool": "min"}, "pool must be"),
        ("mlp", (), {}, "non-empty"),
        ("mlp", (40,), {"hidden_sizes": 100}, "hidden_sizes"),
        ("mlp", (40,), {"hidden_sizes": (100, 0)}, "hidden_sizes entry"),
        ("mobilenetv2", CIFAR, {"conv_shortcut": 1}, "conv_shortcut"),
        ("resnet50", CIFAR, {"blocks": (3, 4, 6)}, "blocks must be 4"),
    ],
)
def test_model_specific_errors(name, shape, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_model(name, num_classes=10, input_shape=shape, **kwargs)


def test_bad_depth():
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21, CIFAR, 10)
    with pytest.raises(ValueError, match="6n\\+2"):
        FixupResNet(2, CIFAR, 10)


@pytest.mark.parametrize("name,shape", [("mlp", (40,)), ("cnn1d", (40,)), ("resnet20", CIFAR)])
def test_forward_rejects_wrong_input(name, shape):
    m = build_model(name, num_classes=10, input_shape=shape)
    with pytest.raises(ValueError, match=r"expects input of shape \(N, "):
        m(torch.randn(2, *shape[:-1], shape[-1] + 1))
    with pytest.raises(ValueError, match="expects input of shape"):
        m(torch.randn(*shape))  # no batch axis
    with pytest.raises(TypeError, match="floating"):
        m(torch.zeros(2, *shape, dtype=torch.int64))
