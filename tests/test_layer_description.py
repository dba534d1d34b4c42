"""Layers describe themselves (bornsparse.nn.description): checkpoints and swapping read only
that, so a user's subclass or a new layer needs no edit of models/ or sparsity/."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from torch import nn

import bornsparse
from bornsparse.models.checkpoint import CheckpointError
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
from bornsparse.nn.description import (
    Described,
    Field,
    Stored,
    is_int,
    layer_for,
    layer_name,
    registered_layers,
)
from bornsparse.sparsity.swap import sparse_targets

SRC = pathlib.Path(bornsparse.__file__).parent

LAYERS = {
    "SparseLinear": lambda: SparseLinear(7, 5, nnz=9, seed=1),
    "DCTPlusSparseLinear": lambda: DCTPlusSparseLinear(6, 9, nnz=4, train_alpha=False, seed=2),
    "SparseConv2d": lambda: SparseConv2d(4, 6, 3, stride=2, padding=1, groups=2, nnz=11,
                                         seed=3),
    "DCTPlusSparseConv2d": lambda: DCTPlusSparseConv2d(3, 5, (3, 1), padding="same", nnz=6,
                                                       dct_order="ckhkw", seed=4),
    "PermutedBlockDiagonal": lambda: PermutedBlockDiagonal(5, 3, depth=3, bias=True, seed=5),
    "PermutedTanhNetwork": lambda: PermutedTanhNetwork(4, 4, depth=2, block_size=4, seed=6),
    "PermutedOffsetSparseLinear": lambda: PermutedOffsetSparseLinear(5, 7, nnz=6,
                                                                     offset_depth=2, seed=7),
    "LowRankLinear": lambda: LowRankLinear(6, 4, 2, seed=8),
    "MonarchLinear": lambda: MonarchLinear(6, 4, 2, bias=False, seed=9),
}


def _input(layer: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if getattr(layer, "stands_for", "linear") == "conv":
        return torch.randn(2, layer.in_channels, 7, 6, generator=g)
    return torch.randn(3, layer.in_features, generator=g)


def test_every_layer_is_registered_under_its_class_name():
    own = {n for n, c in registered_layers().items() if c.__module__.startswith("bornsparse.")}
    assert own == set(LAYERS)
    assert layer_for("sparse", "conv") is SparseConv2d
    assert layer_for("dctps", "linear") is DCTPlusSparseLinear
    assert layer_for("permuted", "linear") is PermutedBlockDiagonal
    with pytest.raises(ValueError, match="no bornsparse layer of kind 'lowrank'"):
        layer_for("lowrank", "linear")


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_description_rebuilds_the_same_function(name):
    layer = LAYERS[name]()
    cls = type(layer)
    args = layer.describe()
    assert set(args) == set(cls.fields())
    assert all(field.check(args[k]) for k, field in cls.fields().items())
    stored = cls.stored(args)
    state = layer.state_dict()
    assert set(stored) == set(state)
    assert all(tuple(state[k].shape) == st.shape for k, st in stored.items())
    assert cls.has_support() == ("indices" in stored)
    rebuilt = cls.rebuild(args, state, torch.device("cpu"))
    assert type(rebuilt) is cls and rebuilt.describe() == args
    x = _input(layer)
    torch.testing.assert_close(rebuilt(x), layer(x), rtol=0, atol=0)


class ScaledSparseLinear(SparseLinear):
    """A user's subclass: another forward, the same tensors and constructor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class DiagonalLinear(Described, nn.Module):
    """A user's own layer, y = d ⊙ x: it checkpoints through its description alone."""

    def __init__(self, features: int, *, seed: int | None = None, device=None, dtype=None):
        super().__init__()
        self.in_features = self.out_features = features
        g = torch.Generator().manual_seed(0 if seed is None else seed)
        self.diagonal = nn.Parameter(torch.randn(features, generator=g).to(device, dtype))

    @classmethod
    def fields(cls) -> dict[str, Field]:
        return {"in_features": Field(is_int), "out_features": Field(is_int)}

    def describe(self) -> dict[str, object]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def stored(cls, args) -> dict[str, Stored]:
        if args["in_features"] != args["out_features"]:
            raise ValueError("a DiagonalLinear is square")
        return {"diagonal": Stored((args["in_features"],))}

    @classmethod
    def constructor_arguments(cls, args, tensors, device):
        return (args["in_features"],), {"device": device}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.diagonal


def test_a_users_subclass_and_a_users_layer_checkpoint_without_edits(tmp_path):
    assert layer_name(ScaledSparseLinear) == f"{__name__}.ScaledSparseLinear"
    model = nn.Sequential(ScaledSparseLinear(6, 4, nnz=7, seed=0), nn.ReLU(),
                          nn.Linear(4, 4), DiagonalLinear(4, seed=3))
    path = tmp_path / "m.safetensors"
    bornsparse.save(model, path)
    fresh = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 4))
    bornsparse.load(fresh, path)
    assert type(fresh[0]) is ScaledSparseLinear and type(fresh[3]) is DiagonalLinear
    x = torch.randn(5, 6)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    # the sparsity methods find the subclass as the sparse layer it is
    assert [n for n, _ in sparse_targets(fresh)] == ["0"]


def test_an_unknown_class_says_to_import_it(tmp_path):
    model = nn.Sequential(DiagonalLinear(3))
    path = tmp_path / "m.safetensors"
    bornsparse.save(model, path)
    registry = registered_layers()
    from bornsparse.nn import description

    del description._REGISTRY[layer_name(DiagonalLinear)]
    try:
        with pytest.raises(CheckpointError, match="must be imported before load"):
            bornsparse.load(nn.Sequential(nn.Linear(3, 3)), path)
    finally:
        description._REGISTRY.update(registry)


def test_arguments_a_layer_refuses_are_a_checkpoint_error(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m.safetensors"
    bornsparse.save(nn.Sequential(DiagonalLinear(3)), path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    doc = json.loads(meta["bornsparse"])
    doc["layers"][0]["args"]["out_features"] = 4
    save_file(load_file(path), path, metadata={**meta, "bornsparse": json.dumps(doc)})
    model = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(CheckpointError, match="a DiagonalLinear is square"):
        bornsparse.load(model, path)
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("source", ["models/checkpoint.py", "models/sparsify_model.py",
                                    *sorted(str(p.relative_to(SRC))
                                            for p in (SRC / "sparsity").glob("*.py"))])
def test_no_layer_class_is_named_as_a_string(source):
    text = (SRC / source).read_text()
    quoted = set(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", text))
    assert not quoted & set(LAYERS), f"{source} names {sorted(quoted & set(LAYERS))}"
