import numpy as np
import pytest
import scipy.fft
import torch
from torch.nn import functional as F

from bornsparse.nn import DCTPlusSparseConv2d, SparseConv2d
from bornsparse.ops.discrete_cosine import dct
from bornsparse.ops.sparse_product import check_indices

CONVS = [SparseConv2d, DCTPlusSparseConv2d]
CONFIGS = [
    # in, out, k, stride, padding, dilation, groups
    (3, 5, 3, 1, 1, 1, 1),
    (4, 6, (3, 2), 2, (1, 0), 1, 2),
    (6, 6, 3, 1, "same", 2, 6),  # depthwise
    (2, 7, 1, 1, 0, 1, 1),
    (4, 4, 2, (2, 1), "valid", (1, 2), 4),
]


def f64(cls, *args, **kw):
    return cls(*args, dtype=torch.float64, seed=0, **kw)


@pytest.mark.parametrize("cls", CONVS)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_nn_conv2d_with_dense_kernel(cls, cfg):
    cin, cout, k, s, p, d, g = cfg
    layer = f64(cls, cin, cout, k, s, p, d, g, density=0.3, init="normal")
    with torch.no_grad():
        layer.bias.normal_()
    ref = torch.nn.Conv2d(cin, cout, k, s, p, d, g, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(layer.to_dense())
        ref.bias.copy_(layer.bias)
    x = torch.randn(2, cin, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref(x))
    assert layer(x[0]).shape == ref(x[0]).shape  # unbatched input too


@pytest.mark.parametrize("cfg", CONFIGS)
def test_sparse_kernel_is_the_scattered_values(cfg):
    cin, cout, k, s, p, d, g = cfg
    layer = f64(SparseConv2d, cin, cout, k, s, p, d, g, density=0.4)
    rows, cols = layer.dense_shape
    assert (rows, cols) == (cout, layer.patch_size)
    w = torch.zeros(rows, cols, dtype=torch.float64)
    w[layer.indices[0], layer.indices[1]] = layer.values.detach()
    torch.testing.assert_close(layer.to_dense().detach(), w.view(layer.kernel_shape))
    check_indices(layer.indices, (rows, cols), nnz=layer.nnz)


@pytest.mark.parametrize("cin,cout,k", [(3, 5, 3), (8, 4, 2), (1, 20, 3)])
def test_dct_offset_is_reference_matrix_on_patches(cin, cout, k):
    layer = f64(DCTPlusSparseConv2d, cin, cout, k, alpha=1.3, bias=False, nnz=1)
    L = cin * k * k
    q = max(L, cout)
    want = scipy.fft.dct(np.eye(q), norm="ortho")[:L, :cout]
    got = layer.dct_dense().reshape(cout, L).T
    np.testing.assert_allclose(got.numpy(), want, atol=1e-14)
    # and conv output = first cout DCT coefficients of each zero-padded flattened patch
    with torch.no_grad():
        layer.values.zero_()
    x = torch.randn(2, cin, 6, 7, dtype=torch.float64)
    patches = F.unfold(x, k).transpose(1, 2)  # (N, P, L)
    coef = dct(F.pad(patches, (0, q - L)))[..., :cout] * 1.3  # (N, P, cout)
    y = layer(x)
    torch.testing.assert_close(y.flatten(2).transpose(1, 2), coef)


@pytest.mark.parametrize("cls", CONVS)
def test_gradcheck(cls):
    layer = f64(cls, 2, 3, 2, 1, 1, 1, 1, density=0.5, init="normal")
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    inputs = (x, *(p.detach().clone().requires_grad_() for p in layer.parameters()))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("cls", CONVS)
def test_storage_gradients_and_adam_state_are_o_nnz(cls):
    layer = cls(64, 64, 3, padding=1, density=0.01, seed=0)
    sd = layer.state_dict()
    assert set(sd) <= {"values", "indices", "bias", "alpha"}
    assert layer.nnz == round(0.01 * 64 * 64 * 9)
    opt = torch.optim.Adam(layer.parameters())
    layer(torch.randn(2, 64, 5, 5)).square().mean().backward()
    opt.step()
    assert layer.values.grad.shape == (layer.nnz,)
    for state in opt.state.values():
        for t in state.values():
            assert t.numel() <= max(layer.nnz, 64)


def test_padding_modes_match_nn_conv2d():
    for mode in ("reflect", "replicate", "circular"):
        layer = f64(SparseConv2d, 2, 3, 3, 1, 1, padding_mode=mode, density=0.5)
        ref = torch.nn.Conv2d(2, 3, 3, 1, 1, padding_mode=mode, dtype=torch.float64)
        with torch.no_grad():
            ref.weight.copy_(layer.to_dense())
            ref.bias.copy_(layer.bias)
        x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
        torch.testing.assert_close(layer(x), ref(x))


def test_per_filter_support_and_from_indices():
    layer = SparseConv2d(4, 5, 3, nnz=17, support="per_row", seed=0)
    assert torch.bincount(layer.indices[0], minlength=5).tolist() == [4, 4, 3, 3, 3]
    idx = torch.tensor([[4, 0], [35, 2]])
    made = DCTPlusSparseConv2d.from_indices(4, 5, 3, idx, torch.tensor([1.0, 2.0]), bias=False)
    assert made.indices.tolist() == [[0, 4], [2, 35]]
    assert made.values.tolist() == [2.0, 1.0]
    assert made.sparse_dense()[4, 35] == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="groups must divide in_channels and out_channels"):
        SparseConv2d(4, 6, 3, groups=4, nnz=1)
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1"):
        SparseConv2d(4, 6, 0, nnz=1)
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        SparseConv2d(4, 6, 3, stride=(1, 0), nnz=1)
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        SparseConv2d(4, 6, 3, padding=-1, nnz=1)
    with pytest.raises(ValueError, match="padding must be 'valid', 'same'"):
        SparseConv2d(4, 6, 3, padding="full", nnz=1)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        SparseConv2d(4, 6, 3, stride=2, padding="same", nnz=1)
    with pytest.raises(ValueError, match="dilation must be an int >= 1"):
        DCTPlusSparseConv2d(4, 6, 3, dilation=0, nnz=1)
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        SparseConv2d(4, 6, 3, padding_mode="mirror", nnz=1)
    with pytest.raises(ValueError, match="needs numeric padding"):
        SparseConv2d(4, 6, 3, padding="same", padding_mode="reflect", nnz=1)
    with pytest.raises(ValueError, match=r"nnz must lie in \[1, 216\]"):
        SparseConv2d(4, 6, 3, nnz=217)
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\]"):
        DCTPlusSparseConv2d(4, 6, 3, density=-0.1)
    layer = DCTPlusSparseConv2d(4, 6, 3, nnz=5)
    with pytest.raises(ValueError, match=r"input must have shape \(N, 4, H, W\)"):
        layer(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"input must have shape \(N, 4, H, W\)"):
        layer(torch.randn(4, 5))
    with pytest.raises(TypeError, match="input must have the layer's dtype"):
        layer(torch.randn(1, 4, 5, 5, dtype=torch.float64))
