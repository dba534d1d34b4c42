import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from bornsparse.nn import DCTPlusSparseConv2d, SparseConv2d
from bornsparse.ops.discrete_cosine import dct
from bornsparse.ops.sparse_conv import build_conv_plan, sparse_conv2d
from bornsparse.ops.sparse_product import check_indices

CONVS = [SparseConv2d, DCTPlusSparseConv2d]
DCT_ORDERS = ("khkwc", "ckhkw")
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


@pytest.mark.parametrize("order", ["khkwc", "ckhkw"])
@pytest.mark.parametrize("cin,cout,k", [(3, 5, 3), (8, 4, 2), (1, 20, 3)])
def test_dct_offset_is_reference_matrix_on_patches(cin, cout, k, order):
    layer = f64(DCTPlusSparseConv2d, cin, cout, k, alpha=1.3, bias=False, nnz=1,
                dct_order=order)
    L = cin * k * k
    q = max(L, cout)
    want = scipy.fft.dct(np.eye(q), norm="ortho")[:L, :cout]  # row = flattened patch index
    # the public DCTpS code: basis reshaped as (kh, kw, c_in, out), c fastest
    kernel = (want.reshape(k, k, cin, cout).transpose(3, 2, 0, 1) if order == "khkwc"
              else want.T.reshape(cout, cin, k, k))
    np.testing.assert_allclose(layer.dct_dense().numpy(), kernel, atol=1e-14)
    # and conv output = first cout DCT coefficients of each zero-padded flattened patch
    with torch.no_grad():
        layer.values.zero_()
    x = torch.randn(2, cin, 6, 7, dtype=torch.float64)
    patches = F.unfold(x, k).transpose(1, 2)  # (N, P, L), L over (c, kh, kw)
    if order == "khkwc":
        patches = patches.unflatten(-1, (cin, k * k)).transpose(-1, -2).flatten(-2)
    coef = dct(F.pad(patches, (0, q - L)))[..., :cout] * 1.3  # (N, P, cout)
    y = layer(x)
    torch.testing.assert_close(y.flatten(2).transpose(1, 2), coef)


def test_dct_orders_coincide_for_depthwise_and_pointwise_kernels():
    for args in ((4, 4, 3, 1, 1, 1, 4), (6, 5, 1)):
        a, b = (f64(DCTPlusSparseConv2d, *args, nnz=1, dct_order=o) for o in DCT_ORDERS)
        torch.testing.assert_close(a.dct_dense(), b.dct_dense(), rtol=0, atol=0)
    a, b = (f64(DCTPlusSparseConv2d, 3, 5, 3, nnz=1, dct_order=o) for o in DCT_ORDERS)
    assert not torch.allclose(a.dct_dense(), b.dct_dense())
    with pytest.raises(ValueError, match="dct_order must be one of"):
        DCTPlusSparseConv2d(3, 5, 3, nnz=1, dct_order="hwc")


def test_dct_offset_cache_follows_dtype_and_meta_materialisation():
    layer = DCTPlusSparseConv2d(3, 5, 3, nnz=4, seed=0)
    layer.double()
    assert layer._dct_kernel.dtype == torch.float64
    torch.testing.assert_close(layer._dct_kernel, layer.dct_dense(), rtol=0, atol=0)
    meta = DCTPlusSparseConv2d(3, 5, 3, nnz=4, seed=0, device="meta")
    meta.to_empty(device="cpu")
    want = DCTPlusSparseConv2d(3, 5, 3, nnz=4, seed=0).dct_dense()
    torch.testing.assert_close(meta._dct_kernel, want, rtol=0, atol=0)
    assert "_dct_kernel" not in layer.state_dict()


@pytest.mark.parametrize("backend", ["numba", "reference"])
@pytest.mark.parametrize("cls", CONVS)
def test_gradcheck(cls, backend):
    layer = f64(cls, 2, 3, 2, 1, 1, 1, 1, density=0.5, init="normal", backend=backend)
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


# ---- the direct sparse kernel against F.conv2d on the dense kernel ---------------------


def _support(rows, cols, nnz, g):
    lin = torch.randperm(rows * cols, generator=g)[:nnz].sort().values
    return torch.stack((lin // cols, lin % cols))


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cg = draw(st.integers(1, 3))
    og = draw(st.integers(1, 3))
    depthwise = draw(st.booleans()) and groups > 1
    if depthwise:
        cg, og = 1, draw(st.integers(1, 2))
    one_d = draw(st.integers(0, 4)) == 0  # (N, C, 1, L) with (1, k) kernels, as cnn1d
    kh = 1 if one_d else draw(st.integers(1, 4))
    kw = draw(st.integers(1, 5))
    sh, sw = (1 if one_d else draw(st.integers(1, 2))), draw(st.integers(1, 3))
    dh, dw = (1 if one_d else draw(st.integers(1, 2))), draw(st.integers(1, 2))
    h = 1 if one_d else draw(st.integers(dh * (kh - 1) + 1, 11))
    w = draw(st.integers(dw * (kw - 1) + 1, 13))
    if draw(st.booleans()) and (sh, sw) == (1, 1):
        padding = draw(st.sampled_from(["same", "valid"]))
    else:
        padding = (0 if one_d else draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    total = og * groups * cg * kh * kw
    nnz = draw(st.integers(1, total))
    return dict(n=draw(st.sampled_from([1, 1, 2, 3])), c=cg * groups, o=og * groups,
                k=(kh, kw), stride=(sh, sw), dilation=(dh, dw), h=h, w=w, padding=padding,
                groups=groups, nnz=nnz, bias=draw(st.booleans()), seed=draw(st.integers(0, 99)))


def _operands(case, dtype):
    g = torch.Generator().manual_seed(case["seed"])
    ws = (case["o"], case["c"] // case["groups"], *case["k"])
    idx = _support(ws[0], ws[1] * ws[2] * ws[3], case["nnz"], g)
    values = torch.randn(case["nnz"], generator=g, dtype=dtype)
    x = torch.randn(case["n"], case["c"], case["h"], case["w"], generator=g, dtype=dtype)
    bias = torch.randn(case["o"], generator=g, dtype=dtype) if case["bias"] else None
    return ws, idx, values, x, bias


@settings(max_examples=120, deadline=None)
@given(case=conv_cases())
def test_kernel_matches_dense_conv2d_forward_and_backward(case):
    ws, idx, values, x, bias = _operands(case, torch.float32)
    geo = (case["stride"], case["padding"], case["dilation"], case["groups"])
    ins = [t.clone().requires_grad_() for t in (x, values)] + (
        [bias.clone().requires_grad_()] if bias is not None else [])
    y = sparse_conv2d(ins[0], ins[1], idx, ws, ins[2] if bias is not None else None, *geo,
                      backend="numba")
    # plain PyTorch in float64 is the truth; float32 F.conv2d's own error sets the scale
    ref64 = [t.double().requires_grad_() for t in (x, values)] + (
        [bias.double().requires_grad_()] if bias is not None else [])
    dense = torch.zeros(ws[0], ws[1] * ws[2] * ws[3], dtype=torch.float64)
    dense = dense.index_put((idx[0], idx[1]), ref64[1]).view(ws)
    yr = F.conv2d(ref64[0], dense, ref64[2] if bias is not None else None, *geo)
    assert y.shape == yr.shape
    y32 = F.conv2d(x, dense.detach().float(), bias, *geo)
    tol = 4 * max((y32.double() - yr).abs().max().item(), 1e-6)
    torch.testing.assert_close(y.double(), yr, rtol=0, atol=tol)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, ins, gy)
    grads_ref = torch.autograd.grad(yr, ref64, gy.double())
    for got, want in zip(grads, grads_ref, strict=True):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5 * scale)


def test_kernel_is_bitwise_independent_of_threads():
    g = torch.Generator().manual_seed(0)
    idx = _support(16, 8 * 9, 200, g)
    x = torch.randn(9, 8, 12, 11, generator=g, requires_grad=True)
    v = torch.randn(200, generator=g, requires_grad=True)
    gy = torch.randn(9, 16, 12, 11, generator=g)
    before = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = sparse_conv2d(x, v, idx, (16, 8, 3, 3), None, 1, 1, backend="numba")
            out.append((y, *torch.autograd.grad(y, (x, v), gy)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [
    # n, c, o, k, stride, padding (top, bottom, left, right), dilation, groups, h, w, nnz
    (1, 1, 1, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 1, 1, 1),
    (2, 4, 6, (3, 2), (2, 1), (1, 1, 0, 0), (1, 2), 2, 7, 6, 13),
    (3, 6, 6, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 6, 5, 8, 30),
    (2, 3, 5, (1, 5), (1, 2), (0, 0, 1, 2), (1, 1), 1, 1, 17, 9),
])
def test_opcheck_sparse_conv2d(dtype, shape):
    n, c, o, k, stride, pad, dil, groups, h, w, nnz = shape
    g = torch.Generator().manual_seed(nnz)
    ws = (o, c // groups, *k)
    plan = build_conv_plan(_support(o, ws[1] * k[0] * k[1], nnz, g), ws, groups)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(nnz, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(o, generator=g, dtype=torch.float64).to(dtype)
    geo = (list(k), list(stride), list(pad), list(dil), groups)
    for bias in (b, None):
        args = (x.clone().requires_grad_(), v.clone().requires_grad_(),
                None if bias is None else bias.clone().requires_grad_())
        torch.library.opcheck(torch.ops.bornsparse.sparse_conv2d.default,
                              (*args, *plan.tensors(), *geo))
    y = torch.ops.bornsparse.sparse_conv2d(x, v, b, *plan.tensors(), *geo)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    for need in ((True, True, True), (True, False, False), (False, True, False),
                 (False, False, True)):
        torch.library.opcheck(torch.ops.bornsparse.sparse_conv2d_backward.default,
                              (gy, x, v, *plan.tensors(), *geo, *need))


def test_op_rejects_bad_plans_and_double_backward():
    g = torch.Generator().manual_seed(0)
    ws = (4, 3, 3, 3)
    plan = build_conv_plan(_support(4, 27, 10, g), ws)
    geo = ([3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 1)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(10, dtype=torch.float64, requires_grad=True)
    rows, cols, rowptr, perm, ptr = (t.clone() for t in plan.tensors())
    cols[0] = 27  # past the patch: the kernel would read outside the input
    with pytest.raises(ValueError, match=r"cols must lie in \[0, 27\)"):
        torch.ops.bornsparse.sparse_conv2d(x, v, None, rows, cols, rowptr, perm, ptr, *geo)
    with pytest.raises(ValueError, match="chan_ptr must rise from 0 to nnz"):
        torch.ops.bornsparse.sparse_conv2d(x, v, None, *plan.tensors()[:4], ptr.flip(0),
                                           *geo)
    with pytest.raises(ValueError, match="too small for kernel"):
        torch.ops.bornsparse.sparse_conv2d(x[:, :, :1, :1], v, None, *plan.tensors(),
                                           [3, 3], [1, 1], [0, 0, 0, 0], [1, 1], 1)
    y = sparse_conv2d(x, v, plan.rows.new_empty(0), ws, None, 1, 1, plan=plan,
                      backend="numba")
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        gx.sum().backward()


def test_layers_run_the_kernel_without_a_dense_kernel(monkeypatch):
    import bornsparse.ops.sparse.conv as C

    def no_dense(*args, **kwargs):
        raise AssertionError("the numba path formed a dense kernel")

    monkeypatch.setattr(C, "dense_kernel", no_dense)
    layer = SparseConv2d(4, 6, 3, padding=1, density=0.2, seed=0)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    assert layer.values.grad.shape == (layer.nnz,) and x.grad.shape == x.shape
    layer.backend = "reference"
    with pytest.raises(AssertionError, match="formed a dense kernel"):
        layer(x)
