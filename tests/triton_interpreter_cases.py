"""Triton kernels against the plain-PyTorch references under Triton's interpreter.

Not collected by pytest directly (the file name does not start with ``test_``):
``tests/test_triton.py`` runs it in a fresh process with ``TRITON_INTERPRET=1``, because
triton wraps its library functions (``tl.sum``, ...) for the interpreter only if the flag is
set when triton is first imported, and another test module may import triton earlier.
"""

import pytest
import torch

triton = pytest.importorskip(
    "triton", reason="triton is not installed (pip install 'bornsparse[gpu]')"
)

from bornsparse.nn import PermutedBlockDiagonal, PermutedTanhNetwork, SparseLinear  # noqa: E402
from bornsparse.ops._permuted_triton import inverse_amplification  # noqa: E402
from bornsparse.ops.permuted import (  # noqa: E402
    INVERSE_MAX_AMPLIFICATION,
    permuted_block_diagonal,
    permuted_block_diagonal_reference,
)
from bornsparse.ops.sparse_product import (  # noqa: E402
    build_plan,
    sparse_matmul,
    sparse_matmul_reference,
)

if not (bool(triton.knobs.runtime.interpret)
        and not isinstance(triton.language.sum, triton.runtime.JITFunction)):
    raise RuntimeError("run this file with TRITON_INTERPRET=1 set before triton is imported")


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
    (37, 10, 9, 4, 5, 2, True),  # several sample tiles and batch splits
    (6, 9, 11, 2, 3, 4, True),  # k = 4
    (7, 5, 8, 3, 4, 2, False),  # the recompute path
]


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
    grads = torch.autograd.grad(y, (x, w), g)
    ref_grads = torch.autograd.grad(ref, (x, w), g)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, ref, **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_permuted_layer_leading_dims_and_no_grad():
    layer = PermutedBlockDiagonal(6, 5, width=8, depth=3, bias=True, seed=1, backend="triton")
    x = torch.randn(2, 3, 6)
    with torch.no_grad():  # no final activation kept: the op returns an empty one
        y = layer(x)
    layer.backend = "reference"
    torch.testing.assert_close(y, layer(x).detach())
    layer.backend = "triton"
    layer(x).sum().backward()
    grad = layer.weight.grad.clone()
    layer.weight.grad = None
    layer.backend = "reference"
    layer(x).sum().backward()
    torch.testing.assert_close(grad, layer.weight.grad)


def test_permuted_ops_opcheck():
    x, w, perms = _operands(3, 5, 2, 3, 2, torch.float64, True)
    x.requires_grad_()
    w.requires_grad_()
    for keep_final in (True, False):
        torch.library.opcheck(torch.ops.bornsparse.permuted_block_diagonal_triton.default,
                              (x, w, perms, 6, keep_final))
    g = torch.randn(3, 6, dtype=torch.float64)
    final = permuted_block_diagonal_reference(x, w, perms).detach()
    torch.library.opcheck(torch.ops.bornsparse.permuted_block_diagonal_triton_backward.default,
                          (g, x.detach(), w.detach(), perms, final))


def test_permuted_double_backward_raises():
    x, w, perms = _operands(2, 4, 2, 2, 2, torch.float32, True)
    x.requires_grad_()
    y = permuted_block_diagonal(x, w, perms, backend="triton")
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
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, ref, **tol)
    for got, want in zip(torch.autograd.grad(y, (x, values), g),
                         torch.autograd.grad(ref, (x, values), g), strict=True):
        torch.testing.assert_close(got, want, **tol)


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


def test_layer_ops_without_triton_kernel_run_the_reference():
    # the tanh network and the penalty have no Triton kernel: backend="triton" runs them
    # in plain torch instead of failing
    net = PermutedTanhNetwork(6, 6, width=6, depth=2, seed=0, backend="triton")
    x = torch.randn(3, 6)
    y = net(x)
    net.backend = "reference"
    torch.testing.assert_close(y, net(x))
    penalty = net.orthogonality_penalty()
    net.backend = "triton"
    torch.testing.assert_close(net.orthogonality_penalty(), penalty)
