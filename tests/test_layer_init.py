"""Every bornsparse layer builds on the meta device, and ``to_empty`` + ``reset_parameters``
gives bitwise the layer its constructor builds with the same seed (supports, permutations,
values), as large-model code (FSDP2, ``to_empty``) expects."""

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

GIVEN = torch.tensor([[0, 3, 5, 5, 6], [2, 0, 9, 1, 4]])

# name -> (layer from a seed, input shape)
LAYERS = {
    "sparse": (lambda s: SparseLinear(11, 7, density=0.2, seed=s), (3, 11)),
    "sparse_per_row_f64": (lambda s: SparseLinear(11, 7, nnz=20, support="per_row",
                                                  init="normal", dtype=torch.float64, seed=s),
                           (3, 11)),
    "sparse_given": (lambda s: SparseLinear(11, 7, indices=GIVEN, seed=s), (3, 11)),
    "dct_linear": (lambda s: DCTPlusSparseLinear(11, 7, nnz=9, init="normal", alpha=0.3,
                                                 seed=s), (3, 11)),
    "conv": (lambda s: SparseConv2d(4, 6, 3, padding=1, groups=2, density=0.3, seed=s),
             (2, 4, 5, 5)),
    "dct_conv": (lambda s: DCTPlusSparseConv2d(4, 6, 3, bias=False, nnz=10, init="kaiming",
                                               train_alpha=False, seed=s), (2, 4, 5, 5)),
    "permuted": (lambda s: PermutedBlockDiagonal(6, 5, width=9, depth=3, block_size=3,
                                                 bias=True, seed=s), (3, 6)),
    "permuted_tanh": (lambda s: PermutedTanhNetwork(6, 5, depth=4, seed=s), (3, 6)),
    "permuted_offset": (lambda s: PermutedOffsetSparseLinear(7, 12, nnz=9, init="normal",
                                                             offset_depth=3, seed=s), (3, 7)),
    "lowrank": (lambda s: LowRankLinear(12, 7, 3, seed=s), (3, 12)),
    "monarch": (lambda s: MonarchLinear(12, 8, 4, seed=s), (3, 12)),
}


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_meta_then_to_empty_and_reset_is_the_direct_layer(name):
    make, shape = LAYERS[name]
    with torch.device("meta"):
        lazy = make(4)
    assert all(t.device.type == "meta" for t in lazy.state_dict().values())
    lazy.to_empty(device="cpu")
    lazy.reset_parameters()
    direct = make(4)
    assert _same(lazy, direct)
    assert not _same(direct, make(5))  # the seed matters: the check above can fail
    dtype = torch.float64 if name.endswith("f64") else torch.float32
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert torch.equal(lazy(x), direct(x))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_reset_parameters_restores_the_start(name):
    make, _ = LAYERS[name]
    layer, start = make(7), make(7)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    assert not _same(layer, start)
    layer.reset_parameters()
    assert _same(layer, start)


@pytest.mark.parametrize("name", ["sparse", "permuted", "lowrank"])
def test_a_layer_without_seed_redraws_its_own_start(name):
    make, _ = LAYERS[name]
    a, b = make(None), make(None)
    assert not _same(a, b)  # fresh entropy each
    start = {k: t.clone() for k, t in a.state_dict().items()}
    a.reset_parameters()
    assert all(torch.equal(start[k], t) for k, t in a.state_dict().items())


def test_whole_model_on_meta_materialises_like_the_direct_one():
    def build():
        return nn.Sequential(SparseLinear(10, 16, density=0.3, seed=1), nn.ReLU(),
                             PermutedBlockDiagonal(16, 16, seed=2), nn.LayerNorm(16),
                             DCTPlusSparseLinear(16, 3, nnz=5, init="normal", seed=3))

    torch.manual_seed(0)
    direct = build()
    with torch.device("meta"):
        lazy = build()
    lazy.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in lazy.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    assert _same(lazy, direct)


def test_given_indices_on_meta_are_put_in_by_reset():
    with torch.device("meta"):
        lazy = SparseLinear(11, 7, indices=GIVEN, seed=0)
    lazy.to_empty(device="cpu")
    lazy.reset_parameters()
    assert torch.equal(lazy.indices.long(), SparseLinear(11, 7, indices=GIVEN).indices.long())
    with pytest.raises(ValueError, match="meta device"), torch.device("meta"):
        SparseLinear.from_indices(11, 7, GIVEN, torch.ones(5))


def test_bad_seed_is_refused_by_name():
    with pytest.raises(TypeError, match="seed must be an int"):
        SparseLinear(4, 4, nnz=3, seed=1.5)
    with pytest.raises(TypeError, match="seed must be an int"):
        PermutedBlockDiagonal(4, 4, seed="0")
