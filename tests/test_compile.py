"""bornsparse's ops as PyTorch citizens: torch.compile (fullgraph, no graph break),
torch.export, torch.library.opcheck on every custom op, and the one backend switch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bornsparse.nn import (
    DCTPlusSparseConv2d,
    DCTPlusSparseLinear,
    LowRankLinear,
    MonarchLinear,
    PermutedBlockDiagonal,
    PermutedOffsetSparseLinear,
    PermutedTanhNetwork,
    SparseConv2d,
    SparseLinear,
)
from bornsparse.ops.backends import reference_kernels

# (name, layer factory, input shape): small ones, and the sizes that take the fused paths
# (a 512×512 DCTpS layer at batch 128, the permuted layer at batch 256)
LAYERS = {
    "permuted": (lambda **k: PermutedBlockDiagonal(40, 24, bias=True, seed=0, **k), (7, 40)),
    "permuted_fused": (lambda **k: PermutedBlockDiagonal(256, 256, seed=1, **k), (256, 256)),
    "tanh": (lambda **k: PermutedTanhNetwork(20, 13, seed=2, **k), (5, 20)),
    "sparse": (lambda **k: SparseLinear(33, 17, density=0.2, seed=3, **k), (1, 33)),
    "dctps": (lambda **k: DCTPlusSparseLinear(30, 20, density=0.1, init="normal", seed=4, **k),
              (3, 30)),
    "dctps_fused": (lambda **k: DCTPlusSparseLinear(512, 512, density=1e-2, init="normal",
                                                    seed=5, **k), (128, 512)),
    "conv": (lambda **k: SparseConv2d(3, 8, 3, padding=1, density=0.3, seed=6, **k),
             (2, 3, 9, 7)),
    "dctps_conv": (lambda **k: DCTPlusSparseConv2d(4, 6, 3, stride=2, density=0.3,
                                                   init="normal", seed=7, **k), (2, 4, 11, 9)),
    "permuted_offset": (lambda **k: PermutedOffsetSparseLinear(
        30, 20, density=0.1, init="normal", alpha=0.8, seed=8, **k), (3, 30)),
    # G₀ at 256 wide, even depth, batch 256: the offset takes the fused cycle walk
    "permuted_offset_fused": (lambda **k: PermutedOffsetSparseLinear(
        256, 256, density=1e-2, init="normal", seed=9, **k), (256, 256)),
    "lowrank": (lambda **k: LowRankLinear(30, 20, 4, seed=10, **k), (3, 30)),
    "monarch": (lambda **k: MonarchLinear(32, 32, 4, seed=11, **k), (3, 32)),
}


def _model(make, **kwargs):
    # a layer inside a small model, with torch ops around it
    return nn.Sequential(make(**kwargs), nn.Tanh())


def _fb(model, x):
    """Output and gradients (input first, then parameters) of a fixed loss."""
    x = x.detach().clone().requires_grad_()
    y = model(x)
    (y.square().sum() + y.sum()).backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


def _close(a, b, scale):
    # float32 rounding: the compiled graph runs the same kernels, so it is usually bitwise
    tol = 1e-5 * max(1.0, float(scale))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=tol)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_compile_fullgraph_matches_eager_without_graph_breaks(name):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    model = _model(make)
    x = torch.randn(*shape)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    y, grads = _fb(model, x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # the second call runs the cached graph
        yc, gc = _fb(compiled, x)
        _close(yc, y, y.abs().max())
        for a, b in zip(gc, grads, strict=True):
            _close(a, b, b.abs().max())


@pytest.mark.parametrize("name", ["permuted_fused", "dctps_fused", "sparse", "tanh"])
def test_inductor_matches_eager(name):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    model = _model(make)
    x = torch.randn(*shape)
    y, grads = _fb(model, x)
    yc, gc = _fb(torch.compile(model, fullgraph=True), x)
    _close(yc, y, y.abs().max())
    for a, b in zip(gc, grads, strict=True):
        _close(a, b, b.abs().max())


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_export_forward(name):
    make, shape = LAYERS[name]
    model = _model(make).eval()
    x = torch.randn(*shape)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    if name.startswith(("permuted", "tanh", "sparse", "dctps_fused", "conv")):
        assert any("bornsparse" in t for t in targets), targets
    torch.testing.assert_close(program.module()(x), model(x))


def test_compiled_permuted_layer_keeps_its_final_activation_path():
    # the fused size takes the cycle walk; compiled, the kept activation flows to backward
    make, shape = LAYERS["permuted_fused"]
    layer = make()
    x = torch.randn(*shape, requires_grad=True)
    gm = []

    def capture(graph_module, example_inputs):
        gm.append(graph_module)
        return graph_module

    from torch._dynamo.backends.common import aot_autograd

    torch.compile(layer, fullgraph=True, backend=aot_autograd(fw_compiler=capture))(x)
    ops = {str(n.target) for n in gm[0].graph.nodes if n.op == "call_function"}
    assert "bornsparse.permuted_block_diagonal.default" in ops


# ---- opcheck: schema, fake kernel, autograd registration, aot dispatch ----------------

def _perm_operands(depth, nb, k, batch, n_in, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    width = nb * k
    w = (torch.randn(depth, nb, k, k, generator=g, dtype=torch.float64) / k**0.5).to(dtype)
    p = torch.stack([torch.randperm(width, generator=g) for _ in range(depth)])
    x = torch.randn(batch, n_in, generator=g, dtype=torch.float64).to(dtype)
    return x, w, p


def _plan_operands(rows, cols, nnz, dtype, seed):
    from bornsparse.ops.sparse_product import build_plan

    g = torch.Generator().manual_seed(seed)
    lin = torch.randperm(rows * cols, generator=g)[:nnz].sort().values
    idx = torch.stack((lin // cols, lin % cols))
    values = torch.randn(nnz, generator=g, dtype=torch.float64).to(dtype)
    return values, build_plan(idx, (rows, cols)).tensors()


DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth,nb,k,batch,n_in,out,tile", [
    (2, 4, 2, 1, 5, 7, 0), (3, 5, 3, 6, 15, 15, 0), (4, 6, 2, 70, 9, 12, 64),
    # 4×4 sub-blocks: recomputed in backward (k = 8), kept from forward (k = 16)
    (2, 3, 8, 9, 24, 20, 0), (3, 2, 16, 5, 20, 30, 0),
])
def test_opcheck_permuted_block_diagonal(dtype, depth, nb, k, batch, n_in, out, tile):
    x, w, p = _perm_operands(depth, nb, k, batch, n_in, dtype, seed=depth)
    torch.library.opcheck(torch.ops.bornsparse.permuted_block_diagonal.default,
                          (x.requires_grad_(), w.requires_grad_(), p, out, tile, True))
    gy = torch.randn(batch, out, dtype=dtype)
    final = torch.ops.bornsparse.permuted_block_diagonal(x, w, p, out, tile, True)[1]
    torch.library.opcheck(torch.ops.bornsparse.permuted_block_diagonal_backward.default,
                          (gy, x.detach(), w.detach(), p, final, tile))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nb,k,batch", [(3, 2, 1), (5, 3, 17), (2, 8, 19)])
def test_opcheck_permuted_factor_columns(dtype, nb, k, batch):
    _, w, p = _perm_operands(1, nb, k, 1, 1, dtype, seed=nb)
    h = torch.randn(nb * k, batch, dtype=dtype)
    torch.library.opcheck(torch.ops.bornsparse.permuted_factor_columns.default,
                          (h.requires_grad_(), w[0].requires_grad_(), p[0]))
    torch.library.opcheck(torch.ops.bornsparse.permuted_factor_columns_backward.default,
                          (torch.randn_like(h), h.detach(), w[0].detach(), p[0]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols,nnz,batch", [(1, 1, 1, 1), (7, 5, 9, 3), (20, 33, 100, 8)])
def test_opcheck_sparse_matmul(dtype, rows, cols, nnz, batch):
    values, plan = _plan_operands(rows, cols, nnz, dtype, seed=rows)
    x = torch.randn(batch, cols, dtype=dtype)
    torch.library.opcheck(torch.ops.bornsparse.sparse_matmul.default,
                          (x.requires_grad_(), values.requires_grad_(), *plan))
    x_t = x.detach().t().contiguous()
    for need_x, need_v in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.bornsparse.sparse_matmul_backward.default,
            (torch.randn(batch, rows, dtype=dtype), x_t, values.detach(), *plan, need_x, need_v),
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 16)])
def test_opcheck_dct(dtype, shape):
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    for inverse in (False, True):
        torch.library.opcheck(torch.ops.bornsparse.dct.default, (x, inverse))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,n,m,nnz,bias", [(1, 5, 3, 4, True), (9, 6, 11, 20, False),
                                                 (40, 17, 17, 30, True)])
def test_opcheck_dct_sparse_affine(monkeypatch, dtype, batch, n, m, nnz, bias):
    import bornsparse.ops.discrete_cosine.plus_sparse as A

    monkeypatch.setattr(A, "_BLOCK_BYTES", 0)  # several blocks
    values, plan = _plan_operands(m, n, nnz, dtype, seed=n)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(batch, n, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    alpha = torch.tensor(0.7, dtype=dtype, requires_grad=True)
    b = torch.randn(m, dtype=dtype, requires_grad=True) if bias else None
    torch.library.opcheck(torch.ops.bornsparse.dct_sparse_affine.default,
                          (x, alpha, values.requires_grad_(), b, *plan))
    x_ts = torch.ops.bornsparse.dct_sparse_affine(x, alpha, values, b, *plan)[1]
    gy = torch.randn(batch, m, dtype=dtype)
    for need in ((True, True, True, True), (False, True, False, False),
                 (False, False, True, False), (True, False, False, True)):
        torch.library.opcheck(
            torch.ops.bornsparse.dct_sparse_affine_backward.default,
            (gy, x.detach(), x_ts.detach(), alpha.detach(), values.detach(), *plan, *need),
        )


def test_ops_called_directly_reject_bad_supports():
    values, plan = _plan_operands(5, 4, 6, torch.float64, seed=0)
    rows, cols, rowptr, colptr, csc_perm, csc_rows = (t.clone() for t in plan)
    cols[0] = 4  # out of range: the kernel would read past the input
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cols must lie in \[0, 4\)"):
        torch.ops.bornsparse.sparse_matmul(x, values, rows, cols, rowptr, colptr, csc_perm,
                                           csc_rows)
    with pytest.raises(ValueError, match="rowptr must rise from 0 to nnz"):
        torch.ops.bornsparse.sparse_matmul(x, values, plan[0], plan[1], rowptr[:-1], colptr,
                                           csc_perm, csc_rows)


# ---- double backward and the one backend switch ---------------------------------------

def test_double_backward_through_kernels_says_what_to_do():
    layer = DCTPlusSparseLinear(512, 512, density=1e-2, init="normal", seed=0)
    x = torch.randn(128, 512, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        g.sum().backward()


def test_dct_op_differentiates_twice():
    x = torch.randn(4, 40000 // 4, dtype=torch.float64, requires_grad=True)  # numba twiddle
    from bornsparse.ops.discrete_cosine import dct

    assert torch.autograd.gradgradcheck(lambda t: dct(t[:, :6]), (x[:, :6].detach()
                                                                   .requires_grad_(),))
    (g,) = torch.autograd.grad(dct(x).pow(2).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    # d/dx Σ_k (Dx)_k² = 2 DᵀD x = 2x, so the second derivative of Σ g is 2 everywhere
    torch.testing.assert_close(h, torch.full_like(x, 2.0))


@pytest.mark.parametrize("name", ["dctps_fused", "permuted_fused", "sparse", "tanh", "conv",
                                  "dctps_conv"])
def test_reference_backend_is_plain_pytorch_all_the_way_down(name):
    make, shape = LAYERS[name]
    layer = make(backend="reference")
    x = torch.randn(*shape, requires_grad=True)
    program = torch.export.export(layer, (x.detach(),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("bornsparse" in t for t in targets), targets
    # and it differentiates twice at the fused sizes
    (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    g.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_export_of_a_fresh_layer_leaves_later_eager_calls_real(backend):
    # cold DCT tables built while export traces are fake tensors; kept in a cache they made
    # every later eager output fake
    from bornsparse.ops.discrete_cosine import transform as discrete_cosine

    discrete_cosine._TABLES.clear()
    make, shape = LAYERS["dctps_fused"]
    layer = make(backend=backend)
    x = torch.randn(*shape, requires_grad=True)
    torch.export.export(layer, (x.detach(),))
    y = layer(x)
    y.square().sum().backward()
    assert type(y) is torch.Tensor and type(x.grad) is torch.Tensor
    assert torch.isfinite(x.grad).all()


def test_reference_kernels_block_overrides_every_layer():
    make, shape = LAYERS["dctps_fused"]
    layer = make()
    x = torch.randn(*shape, requires_grad=True)
    with reference_kernels():
        (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        g.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("value", ["gpu", "fast", None])
def test_backend_argument_is_checked_at_the_constructor(value):
    with pytest.raises(ValueError, match="backend must be one of"):
        SparseLinear(4, 3, nnz=2, backend=value)
    with pytest.raises(ValueError, match="backend must be one of"):
        PermutedBlockDiagonal(4, 4, backend=value)
    with pytest.raises(ValueError, match="backend must be one of"):
        SparseConv2d(2, 2, 3, nnz=2, backend=value)


def test_convolutions_have_no_triton_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        SparseConv2d(2, 2, 3, nnz=2, backend="triton")


def test_grasp_on_dctps_layers_at_fused_size():
    # GraSP's Hessian-gradient product through DCTpS offsets of a size that takes the
    # fused path (α·T(x) on 128 × 512 inputs): pruning at init runs it on the reference path
    from bornsparse.sparsity import prune_at_init

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))
    x, y = torch.randn(128, 512), torch.randint(10, (128,))
    prune_at_init(model, method="grasp", kind="dctps", density=1e-2, data=[(x, y)])
    layers = [m for m in model.modules() if isinstance(m, DCTPlusSparseLinear)]
    assert len(layers) == 2
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (3, 5, 2, 2), (2, 3, 3, 3)])
def test_opcheck_orthogonality_penalty(dtype, shape):
    w = torch.randn(*shape, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.bornsparse.orthogonality_penalty.default, (w,))
    torch.library.opcheck(torch.ops.bornsparse.orthogonality_penalty_backward.default,
                          (w.detach(), torch.tensor(0.3, dtype=dtype)))


def test_compiled_training_step_with_penalty():
    layer = PermutedBlockDiagonal(64, 64, seed=0)

    def loss(x):
        return layer(x).square().mean() + 3.0 * layer.orthogonality_penalty()

    x = torch.randn(32, 64)
    loss(x).backward()
    eager = layer.weight.grad.clone()
    layer.zero_grad()
    torch.compile(loss, fullgraph=True, backend="aot_eager")(x).backward()
    torch.testing.assert_close(layer.weight.grad, eager)
