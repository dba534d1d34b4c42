"""torch.compile with dynamic shapes and without gradients: one graph serves every batch."""

from __future__ import annotations

import pytest
import torch

from bornsparse.nn import DCTPlusSparseLinear, PermutedBlockDiagonal, SparseLinear

LAYERS = {
    "permuted": (lambda: PermutedBlockDiagonal(256, 256, seed=0), 256),
    "dctps": (lambda: DCTPlusSparseLinear(512, 512, density=1e-2, init="normal", seed=0), 512),
    "sparse": (lambda: SparseLinear(64, 32, density=0.1, seed=0), 64),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_dynamic_batch_sizes_match_eager(name):
    make, n = LAYERS[name]
    layer = make()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    # batches on both sides of the fused paths' thresholds (cycle tiles, the DCT's numba size)
    for batch in (1, 130, 257):
        x = torch.randn(batch, n, requires_grad=True)
        y = compiled(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        xe = x.detach().clone().requires_grad_()
        ye = layer(xe)
        (gxe,) = torch.autograd.grad(ye.square().sum(), xe)
        torch.testing.assert_close(y, ye)
        torch.testing.assert_close(gx, gxe)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_compiled_inference_without_grad(name):
    make, n = LAYERS[name]
    layer = make().eval()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(200, n)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), layer(x))
