"""Triton kernels against the plain-PyTorch references under Triton's interpreter.

Not collected by pytest directly (the file name does not start with ``test_``):
``tests/test_triton.py`` runs it in a fresh process with ``TRITON_INTERPRET=1``, because
triton wraps its library functions (``tl.sum``, ...) for the interpreter only if the flag is
set when triton is first imported, and another test module may import triton earlier.

Half precision: the kernels load and accumulate in float32 and store in the tensor's dtype.
Their error against the float64 reference (run on the same, already rounded, inputs) must be
at most ``HALF_FACTOR`` times plain PyTorch's own error in that dtype (the reference run in
float16 on the CPU), measured as a relative Frobenius norm, with that dtype's machine
epsilon as the floor of torch's error (a lucky small error must not fail us).
"""

import pytest
import torch

triton = pytest.importorskip(
    "triton", reason="triton is not installed (pip install 'bornsparse[gpu]')"
)

from bornsparse.nn import (  # noqa: E402
    DCTPlusSparseLinear,
    PermutedBlockDiagonal,
    PermutedOffsetSparseLinear,
    PermutedTanhNetwork,
    SparseLinear,
)
from bornsparse.ops import backends  # noqa: E402
from bornsparse.ops.dct_sparse import dct_sparse_affine_reference  # noqa: E402
from bornsparse.ops.permuted import (  # noqa: E402
    INVERSE_MAX_AMPLIFICATION,
    permuted_block_diagonal,
    permuted_block_diagonal_reference,
    permuted_tanh_network,
    permuted_tanh_network_reference,
)
from bornsparse.ops.permuted.triton_kernels import inverse_amplification  # noqa: E402
from bornsparse.ops.sparse_product import (  # noqa: E402
    build_plan,
    sparse_matmul,
    sparse_matmul_reference,
)

if not (bool(triton.knobs.runtime.interpret)
        and not isinstance(triton.language.sum, triton.runtime.JITFunction)):
    raise RuntimeError("run this file with TRITON_INTERPRET=1 set before triton is imported")

# float16 only: the interpreter casts float32 to bfloat16 by truncation (measured: half the
# entries one ulp off round-to-nearest, twice its mean error), which a GPU does not do, so
# bfloat16 is checked on a GPU (benchmarks/bench_gpu.py's accuracy stage)
HALF_DTYPES = [torch.float16]
HALF_FACTOR = 2.0


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10,
                                                                           atol=1e-12)


def _rel_err(got: torch.Tensor, want64: torch.Tensor) -> float:
    got, want64 = got.detach().double(), want64.detach()
    return float((got - want64).norm() / want64.norm().clamp_min(1e-300))


def _assert_half_close(got, torch_half, want64, dtype, what):
    """Our error ≤ HALF_FACTOR × max(torch's own error in ``dtype``, eps(dtype))."""
    ours, theirs = _rel_err(got, want64), _rel_err(torch_half, want64)
    bound = HALF_FACTOR * max(theirs, torch.finfo(dtype).eps)
    assert ours <= bound, f"{what}: error {ours:.3g} > {HALF_FACTOR} × torch's {theirs:.3g}"


def _operands(batch, n_in, depth, nb, k, dtype, conditioned, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = nb * k
    if conditioned:  # orthogonal blocks: the backward rebuilds through the inverses
        w = torch.linalg.qr(torch.randn(depth, nb, k, k, generator=gen)).Q
    else:  # one nearly singular block per factor: the backward recomputes
        w = torch.randn(depth, nb, k, k, generator=gen)
        w[:, 0] = torch.ones(k, k) + 1e-3 * torch.eye(k)
    perms = torch.stack([torch.randperm(width, generator=gen) for _ in range(depth)])
    x = torch.randn(batch, n_in, generator=gen)
    return x.to(dtype), w.to(dtype), perms


PERMUTED_CASES = [
    # batch, n_in, out_features, depth, nb, k, conditioned
    (5, 7, 6, 3, 4, 2, True),  # odd widths, odd depth, padding and truncation
    (1, 8, 8, 1, 4, 2, True),  # batch 1, depth 1
    (150, 10, 9, 4, 20, 2, True),  # several sample and block tiles, batch splits
    (6, 9, 11, 2, 3, 4, True),  # k = 4
    (4, 6, 7, 2, 3, 3, True),  # k = 3: k² = 9 entries in a tile of 16
    (7, 5, 8, 3, 4, 2, False),  # the recompute path
]


def _grads(y, inputs, g):
    return torch.autograd.grad(y, inputs, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", PERMUTED_CASES)
def test_permuted_matches_reference(case, dtype):
    batch, n_in, out, depth, nb, k, conditioned = case
    x, w, perms = _operands(batch, n_in, depth, nb, k, dtype, conditioned)
    amp = inverse_amplification(w)
    assert (amp <= INVERSE_MAX_AMPLIFICATION) == conditioned  # the path the case means
    x.requires_grad_()
    w.requires_grad_()
    y = permuted_block_diagonal(x, w, perms, out_features=out, backend="triton")
    ref = permuted_block_diagonal_reference(x, w, perms, out_features=out)
    g = torch.randn_like(ref)
    torch.testing.assert_close(y, ref, **_tol(dtype))
    for got, want in zip(_grads(y, (x, w), g), _grads(ref, (x, w), g), strict=True):
        torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_inverse_amplification_matches_svd(k):
    w = torch.randn(3, 5, k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    w[1, 2] = 0  # a singular block
    assert inverse_amplification(w) == float("inf")
    w[1, 2] = torch.eye(k)
    sv = torch.linalg.svdvals(w)
    want = float((sv[..., 0] / sv[..., -1]).amax(1).prod())
    assert inverse_amplification(w) == pytest.approx(want, rel=1e-9)


def _tanh_operands(case, dtype, seed=0):
    batch, n_in, out, depth, nb, k, conditioned = case
    x, w, perms = _operands(batch, n_in, depth, nb, k, dtype, conditioned, seed)
    biases = 0.5 * torch.randn(depth, nb * k, generator=torch.Generator().manual_seed(seed + 1))
    return x, w, perms, biases.to(dtype), out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", PERMUTED_CASES)
def test_tanh_network_matches_reference(case, dtype):
    x, w, perms, biases, out = _tanh_operands(case, dtype)
    inputs = tuple(t.requires_grad_() for t in (x, w, biases))
    y = permuted_tanh_network(x, w, perms, biases, out_features=out, backend="triton")
    ref = permuted_tanh_network_reference(x, w, perms, biases, out_features=out)
    g = torch.randn_like(ref)
    torch.testing.assert_close(y, ref, **_tol(dtype))
    for got, want in zip(_grads(y, inputs, g), _grads(ref, inputs, g), strict=True):
        torch.testing.assert_close(got, want, **_tol(dtype))


def test_tanh_saturates_and_stays_accurate_near_zero():
    # large pre-activations (tanh = ±1, e^{2|x|} would overflow) and tiny ones (where
    # 1 − 2/(e^{2x} + 1) would cancel): the kernel's tanh against torch.tanh
    x = torch.tensor([[60.0, -60.0, 1e-5, -3e-4, 0.6, -0.7]], dtype=torch.float64)
    w = torch.eye(2, dtype=torch.float64).expand(2, 3, 2, 2).contiguous()
    perms = torch.arange(6).expand(2, 6).contiguous()
    biases = torch.zeros(2, 6, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        y = permuted_tanh_network(x.to(dtype), w.to(dtype), perms, biases.to(dtype),
                                  backend="triton")
        torch.testing.assert_close(y, torch.tanh(x).to(dtype), rtol=4 * torch.finfo(dtype).eps,
                                   atol=0)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", [PERMUTED_CASES[2], PERMUTED_CASES[3], PERMUTED_CASES[-1]])
def test_permuted_half_precision(case, dtype):
    batch, n_in, out, depth, nb, k, conditioned = case
    x, w, perms = _operands(batch, n_in, depth, nb, k, dtype, conditioned)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    x.requires_grad_()
    w.requires_grad_()
    ours = permuted_block_diagonal(x, w, perms, out_features=out, backend="triton")
    theirs = permuted_block_diagonal_reference(x, w, perms, out_features=out)
    want = permuted_block_diagonal_reference(x64, w64, perms, out_features=out)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    assert ours.dtype == dtype
    _assert_half_close(ours, theirs, want.detach(), dtype, "output")
    for name, a, b, c in zip(("grad x", "grad weight"), _grads(ours, (x, w), g),
                             _grads(theirs, (x, w), g), _grads(want, (x64, w64), g.double()),
                             strict=True):
        assert a.dtype == dtype
        _assert_half_close(a, b, c, dtype, name)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_tanh_network_half_precision(dtype):
    x, w, perms, biases, out = _tanh_operands(PERMUTED_CASES[2], dtype)
    inputs = tuple(t.requires_grad_() for t in (x, w, biases))
    inputs64 = tuple(t.detach().double().requires_grad_() for t in inputs)
    ours = permuted_tanh_network(x, w, perms, biases, out_features=out, backend="triton")
    theirs = permuted_tanh_network_reference(x, w, perms, biases, out_features=out)
    want = permuted_tanh_network_reference(*inputs64[:2], perms, inputs64[2],
                                           out_features=out)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    _assert_half_close(ours, theirs, want.detach(), dtype, "output")
    for name, a, b, c in zip(("grad x", "grad weight", "grad biases"),
                             _grads(ours, inputs, g), _grads(theirs, inputs, g),
                             _grads(want, inputs64, g.double()), strict=True):
        _assert_half_close(a, b, c, dtype, name)


def test_permuted_layer_leading_dims_and_no_grad():
    layer = PermutedBlockDiagonal(6, 5, width=8, depth=3, bias=True, seed=1, backend="triton")
    x = torch.randn(2, 3, 6)
    with torch.no_grad():  # no final activation kept: the op returns an empty one
        y = layer(x)
    layer.backend = "reference"
    torch.testing.assert_close(y, layer(x).detach())
    layer.backend = "triton"
    layer(x).sum().backward()
    grads = [p.grad.clone() for p in (layer.weight, layer.bias)]
    layer.zero_grad()
    layer.backend = "reference"
    layer(x).sum().backward()
    for got, p in zip(grads, (layer.weight, layer.bias), strict=True):
        torch.testing.assert_close(got, p.grad)


def test_tanh_layer_leading_dims_and_no_grad():
    net = PermutedTanhNetwork(6, 5, width=8, depth=3, seed=1, backend="triton")
    with torch.no_grad():
        net.biases.normal_()
    x = torch.randn(2, 3, 6)
    with torch.no_grad():  # no activations kept
        y = net(x)
    net.backend = "reference"
    torch.testing.assert_close(y, net(x).detach())
    net.backend = "triton"
    net(x).square().sum().backward()
    grads = [p.grad.clone() for p in (net.weight, net.biases)]
    net.zero_grad()
    net.backend = "reference"
    net(x).square().sum().backward()
    for got, p in zip(grads, (net.weight, net.biases), strict=True):
        torch.testing.assert_close(got, p.grad)


def test_permuted_ops_opcheck():
    x, w, perms = _operands(3, 5, 2, 3, 2, torch.float64, True)
    x.requires_grad_()
    w.requires_grad_()
    for keep_final in (True, False):
        torch.library.opcheck(torch.ops.bornsparse.permuted_block_diagonal_triton.default,
                              (x, w, perms, 6, keep_final))
    g = torch.randn(3, 6, dtype=torch.float64)
    final = permuted_block_diagonal_reference(x, w, perms).detach().t().contiguous()
    for kept in (final, final.new_empty(0)):
        torch.library.opcheck(
            torch.ops.bornsparse.permuted_block_diagonal_triton_backward.default,
            (g, x.detach(), w.detach(), perms, kept))
    # half inputs: the kept final is float32, in the fake kernel as in the real one
    for keep_final in (True, False):
        torch.library.opcheck(torch.ops.bornsparse.permuted_block_diagonal_triton.default,
                              (x.detach().half(), w.detach().half(), perms, 6, keep_final),
                              test_utils=("test_schema", "test_faketensor"))


def test_tanh_ops_opcheck():
    x, w, perms, biases, _ = _tanh_operands((3, 5, 6, 2, 3, 2, True), torch.float64)
    args = [t.requires_grad_() for t in (x, w)]
    biases.requires_grad_()
    for keep in (True, False):
        torch.library.opcheck(torch.ops.bornsparse.permuted_tanh_network_triton.default,
                              (*args, perms, biases, 5, keep))
    _, acts = torch.ops.bornsparse.permuted_tanh_network_triton(x, w, perms, biases, 5, True)
    g = torch.randn(3, 5, dtype=torch.float64)
    for kept in (acts.detach(), acts.new_empty(0)):
        torch.library.opcheck(
            torch.ops.bornsparse.permuted_tanh_network_triton_backward.default,
            (g, x.detach(), w.detach(), perms, biases.detach(), kept))


@pytest.mark.parametrize("op", [permuted_block_diagonal, permuted_tanh_network])
def test_permuted_double_backward_raises(op):
    x, w, perms = _operands(2, 4, 2, 2, 2, torch.float32, True)
    x.requires_grad_()
    extra = (torch.zeros(2, 4),) if op is permuted_tanh_network else ()
    y = op(x, w, perms, *extra, backend="triton")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through the Triton kernel"):
        gx.sum().backward()


def _support(rows, cols, nnz, seed):
    gen = torch.Generator().manual_seed(seed)
    lin = torch.randperm(rows * cols, generator=gen)[:nnz].sort().values
    return torch.stack((lin // cols, lin % cols))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case", [(7, 9, 40, 5), (1, 3, 2, 1), (33, 20, 23, 70)])
def test_sparse_matmul_matches_reference(case, index_dtype, dtype):
    rows, cols, nnz, batch = case  # (1, 3, 2, 1): a single row, batch 1
    idx = _support(rows, cols, nnz, seed=rows).to(index_dtype)
    plan = build_plan(idx, (rows, cols))
    values = torch.randn(nnz, dtype=dtype, requires_grad=True)
    x = torch.randn(batch, cols, dtype=dtype, requires_grad=True)
    y = sparse_matmul(x, values, idx, (rows, cols), plan=plan, backend="triton")
    ref = sparse_matmul_reference(x, values, idx.long(), (rows, cols))
    g = torch.randn_like(ref)
    torch.testing.assert_close(y, ref, **_tol(dtype))
    for got, want in zip(_grads(y, (x, values), g), _grads(ref, (x, values), g), strict=True):
        torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_sparse_matmul_half_precision(dtype):
    rows, cols, nnz, batch = 33, 20, 200, 70
    idx = _support(rows, cols, nnz, seed=1)
    plan = build_plan(idx, (rows, cols))
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(nnz, generator=gen).to(dtype).requires_grad_()
    x = torch.randn(batch, cols, generator=gen).to(dtype).requires_grad_()
    x64, v64 = x.detach().double().requires_grad_(), values.detach().double().requires_grad_()
    ours = sparse_matmul(x, values, idx, (rows, cols), plan=plan, backend="triton")
    theirs = sparse_matmul_reference(x, values, idx, (rows, cols))
    want = sparse_matmul_reference(x64, v64, idx, (rows, cols))
    g = torch.randn(want.shape, generator=gen).to(dtype)
    _assert_half_close(ours, theirs, want.detach(), dtype, "output")
    for name, a, b, c in zip(("grad x", "grad values"), _grads(ours, (x, values), g),
                             _grads(theirs, (x, values), g),
                             _grads(want, (x64, v64), g.double()), strict=True):
        _assert_half_close(a, b, c, dtype, name)


def test_sparse_layer_leading_dims():
    layer = SparseLinear(9, 7, nnz=20, seed=0, backend="triton")
    x = torch.randn(2, 3, 9)
    y = layer(x)
    y.square().sum().backward()
    grad = layer.values.grad.clone()
    layer.values.grad = None
    layer.backend = "reference"
    ref = layer(x)
    ref.square().sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(grad, layer.values.grad)


def test_sparse_ops_opcheck():
    idx = _support(5, 6, 12, seed=3)
    plan = build_plan(idx, (5, 6)).tensors()
    values = torch.randn(12, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.bornsparse.sparse_matmul_triton.default, (x, values, *plan))
    g = torch.randn(4, 5, dtype=torch.float64)
    x_t = x.detach().t().contiguous()
    for need_x, need_v in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.bornsparse.sparse_matmul_triton_backward.default,
                              (g, x_t, values.detach(), *plan, need_x, need_v))


DCT_CASES = [(9, 7, 20, 5), (6, 11, 15, 1), (16, 16, 40, 70)]  # in, out, nnz, batch


def _dct_layer_grads(layer, x, g):
    y = layer(x)
    params = [p for p in (layer.values, layer.alpha, layer.bias)
              if p is not None and p.requires_grad]
    return y, torch.autograd.grad(y, [x, *params], g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", DCT_CASES)
@pytest.mark.parametrize("bias,train_alpha", [(True, True), (False, False)])
def test_dct_plus_sparse_matches_reference(case, dtype, bias, train_alpha):
    n_in, n_out, nnz, batch = case
    layer = DCTPlusSparseLinear(n_in, n_out, nnz=nnz, init="normal", alpha=0.7, seed=0,
                                bias=bias, train_alpha=train_alpha, backend="triton",
                                dtype=dtype)
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
    x = torch.randn(batch, n_in, dtype=dtype, requires_grad=True)
    y, grads = _dct_layer_grads(layer, x, g := torch.randn(batch, n_out, dtype=dtype))
    layer.backend = "reference"
    ref, ref_grads = _dct_layer_grads(layer, x, g)
    torch.testing.assert_close(y, ref, **_tol(dtype))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_dct_plus_sparse_half_precision(dtype):
    n_in, n_out, nnz, batch = 16, 16, 40, 70
    layer = DCTPlusSparseLinear(n_in, n_out, nnz=nnz, init="normal", alpha=0.7, seed=0,
                                backend="triton", dtype=dtype)
    x = torch.randn(batch, n_in, generator=torch.Generator().manual_seed(3)).to(dtype)
    ours = layer(x)
    plan_args = (n_out, layer.alpha, layer.values, layer.indices.long(), layer.bias)
    theirs = dct_sparse_affine_reference(x, *plan_args)
    want = dct_sparse_affine_reference(x.double(), n_out, *(
        t.double() for t in plan_args[1:3]), layer.indices.long(), layer.bias.double())
    _assert_half_close(ours, theirs, want.detach(), dtype, "output")


def test_dct_plus_sparse_ops_opcheck():
    import bornsparse.ops.discrete_cosine.triton_plus_sparse  # noqa: F401  (registers the ops)

    n_in, n_out, nnz, batch = 6, 9, 14, 4
    idx = _support(n_out, n_in, nnz, seed=4)
    plan = build_plan(idx, (n_out, n_in)).tensors()
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x, alpha = torch.randn(batch, n_in, **f64), torch.tensor(0.3, **f64)
    values, bias = torch.randn(nnz, **f64), torch.randn(n_out, **f64)
    for b in (bias, None):
        torch.library.opcheck(torch.ops.bornsparse.dct_sparse_affine_triton.default,
                              (x, alpha, values, b, *plan))
    g = torch.randn(batch, n_out, dtype=torch.float64)
    x_t = x.detach().t().contiguous()
    for need in ((True, True, True, True), (False, True, False, False),
                 (False, False, True, False)):
        torch.library.opcheck(torch.ops.bornsparse.dct_sparse_affine_triton_backward.default,
                              (g, x_t, alpha.detach(), values.detach(), *plan, *need))


def test_empty_batch():
    layers = [PermutedBlockDiagonal(6, 5, width=8, depth=2, seed=0, backend="triton"),
              PermutedTanhNetwork(6, 5, width=8, depth=2, seed=0, backend="triton"),
              SparseLinear(6, 5, nnz=9, seed=0, backend="triton"),
              DCTPlusSparseLinear(6, 5, nnz=9, init="normal", seed=0, backend="triton")]
    for layer in layers:
        x = torch.randn(0, 6, requires_grad=True)
        y = layer(x)
        assert y.shape == (0, 5)
        y.sum().backward()
        assert all(p.grad is not None and not p.grad.any() for p in layer.parameters()
                   if p.requires_grad)


class _CudaLike:
    """What resolve_backend reads of a tensor (its device and dtype), claiming CUDA."""

    def __init__(self, t: torch.Tensor) -> None:
        self.device = torch.device("cuda")
        self.dtype = t.dtype


def test_auto_picks_triton_on_cuda_for_every_op_with_a_kernel(monkeypatch):
    # every op resolves its backend through resolve_backend, imported by name: make it see
    # CUDA tensors, so "auto" takes each op's Triton path, which then runs on the CPU
    # tensors under the interpreter; the decisions are recorded per family
    real = backends.resolve_backend
    decisions = []

    def as_if_cuda(backend, x, family="sparse", *, has_triton=False):
        kind = real(backend, _CudaLike(x), family, has_triton=has_triton)
        decisions.append((family, has_triton, kind))
        return kind

    import bornsparse.ops.discrete_cosine.plus_sparse as dsa
    import bornsparse.ops.penalty.functional as penalty
    import bornsparse.ops.permuted.functional as permuted
    import bornsparse.ops.sparse.matmul as sparse_product

    layers = [
        PermutedBlockDiagonal(6, 5, width=8, depth=2, seed=0),
        PermutedTanhNetwork(6, 5, width=8, depth=2, seed=0),
        SparseLinear(6, 5, nnz=9, seed=0),
        DCTPlusSparseLinear(6, 5, nnz=9, init="normal", seed=0),
        PermutedOffsetSparseLinear(6, 5, nnz=9, seed=0),
    ]
    x = torch.randn(4, 6)
    for layer in layers:
        monkeypatch.undo()
        ref = layer(x)
        for module in (dsa, penalty, permuted, sparse_product):
            monkeypatch.setattr(module, "resolve_backend", as_if_cuda)
        decisions.clear()
        y = layer(x)
        kinds = {(fam, kind) for fam, has, kind in decisions}
        # each op with a Triton kernel took it; the rest ran their reference
        assert all(kind == ("triton" if has else "reference") for _, has, kind in decisions)
        assert any(kind == "triton" for _, kind in kinds), (type(layer).__name__, kinds)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_layer_ops_without_triton_kernel_run_the_reference():
    # the penalty has no Triton kernel: backend="triton" runs it in plain torch instead of
    # failing
    net = PermutedTanhNetwork(6, 6, width=6, depth=2, seed=0, backend="triton")
    penalty = net.orthogonality_penalty()
    net.backend = "reference"
    torch.testing.assert_close(net.orthogonality_penalty(), penalty)
