"""bornsparse.save / load: round trips for every layer class, O(nnz) files, bad files, resume."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

import bornsparse
from bornsparse.models.checkpoint import METADATA_KEY, VERSION_KEY, CheckpointError
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
from bornsparse.sparsity import SET, RigL
from bornsparse.sparsity.swap import sparse_targets
from tiny_models import mlp

# ----------------------------------------------------------------------------- helpers

# name -> (sparse layer from a seed and an nnz, the dense layer it stands for, input shape)
CASES = {
    "linear": (lambda s, n: SparseLinear(12, 7, nnz=n, seed=s), lambda: nn.Linear(12, 7), (3, 12)),
    "linear_nobias": (lambda s, n: SparseLinear(12, 7, nnz=n, bias=False, seed=s),
                      lambda: nn.Linear(12, 7, bias=False), (3, 12)),
    "dct_linear": (lambda s, n: DCTPlusSparseLinear(12, 7, nnz=n, init="normal", seed=s),
                   lambda: nn.Linear(12, 7), (3, 12)),
    "dct_linear_fixed_alpha": (
        lambda s, n: DCTPlusSparseLinear(7, 12, nnz=n, train_alpha=False, alpha=0.5, seed=s),
        lambda: nn.Linear(7, 12), (3, 7)),
    "conv": (lambda s, n: SparseConv2d(3, 6, (3, 2), stride=2, padding=1, groups=3, nnz=n,
                                       seed=s),
             lambda: nn.Conv2d(3, 6, (3, 2), stride=2, padding=1, groups=3), (2, 3, 7, 6)),
    "dct_conv": (lambda s, n: DCTPlusSparseConv2d(4, 4, 3, padding=1, padding_mode="reflect",
                                                  dilation=1, nnz=n, init="normal", seed=s,
                                                  train_alpha=False),
                 lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), (2, 4, 5, 5)),
    "dct_conv_same": (lambda s, n: DCTPlusSparseConv2d(2, 3, 3, padding="same", bias=False,
                                                       nnz=n, seed=s),
                      lambda: nn.Conv2d(2, 3, 3, padding="same", bias=False), (2, 2, 4, 4)),
    "permuted": (lambda s, n: PermutedBlockDiagonal(6, 5, width=9, depth=3, block_size=3,
                                                    bias=True, seed=s),
                 lambda: nn.Linear(6, 5), (3, 6)),
    "permuted_tanh": (lambda s, n: PermutedTanhNetwork(6, 5, depth=4, seed=s),
                      lambda: nn.Linear(6, 5), (3, 6)),
    "permuted_offset": (lambda s, n: PermutedOffsetSparseLinear(7, 12, nnz=n, init="normal",
                                                                offset_depth=3, seed=s),
                        lambda: nn.Linear(7, 12), (3, 7)),
    "permuted_offset_fixed_alpha": (
        lambda s, n: PermutedOffsetSparseLinear(12, 7, nnz=n, bias=False, train_alpha=False,
                                                offset_width=14, seed=s),
        lambda: nn.Linear(12, 7, bias=False), (3, 12)),
    "lowrank": (lambda s, n: LowRankLinear(12, 7, 3, seed=s), lambda: nn.Linear(12, 7), (3, 12)),
    "monarch": (lambda s, n: MonarchLinear(12, 8, 4, bias=False, seed=s),
                lambda: nn.Linear(12, 8, bias=False), (3, 12)),
}


def perturbed(module: nn.Module, seed: int) -> nn.Module:
    """Every floating tensor moved off its init (α ≠ 1, biases ≠ 0), so round trips bite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # the state_dict only: a non-persistent cache (the DCT conv's offset kernel) is no
        # state, and perturbing it would make the original compute another function
        for t in module.state_dict().values():
            if t.dtype.is_floating_point:
                t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.3)
    return module


def wrap(layer: nn.Module) -> nn.Sequential:
    # a LayerNorm-free tail keeps every case's output a plain function of the layer
    return nn.Sequential(layer, nn.Tanh())


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def rewrite(src, dst, *, tensors=None, metadata=None):
    """Copy checkpoint ``src`` to ``dst`` after edits: callables on the tensor dict / metadata."""
    with safe_open(str(src), framework="pt") as f:
        ts = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    if tensors is not None:
        out = tensors(ts)
        ts = ts if out is None else out
    if metadata is not None:
        out = metadata(meta)
        meta = meta if out is None else out
    dst.write_bytes(st_save(ts, metadata=meta))
    return dst


def edit_doc(fn):
    def edit(meta):
        doc = json.loads(meta[METADATA_KEY])
        fn(doc)
        meta[METADATA_KEY] = json.dumps(doc)
    return edit


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("target", ["dense", "meta", "other_support", "own_meta"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_every_layer_class(case, target, tmp_path):
    make_sparse, make_dense, shape = CASES[case]
    model = wrap(perturbed(make_sparse(1, 9), 0))
    path = tmp_path / "m.safetensors"
    bornsparse.save(model, path)
    if target == "dense":
        fresh = wrap(make_dense())
    elif target == "meta":
        with torch.device("meta"):
            fresh = wrap(make_dense())
    elif target == "own_meta":  # the user's own model of bornsparse layers, built on meta
        with torch.device("meta"):
            fresh = wrap(make_sparse(2, 5))
    else:  # a model already sparse, on another support with another nnz
        fresh = wrap(make_sparse(2, 5))
    out = bornsparse.load(fresh, path)
    assert out is fresh
    assert type(fresh[0]) is type(model[0])
    assert states_equal(model, fresh)
    assert not [k for k, t in fresh.state_dict().items() if t.device.type == "meta"]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(model(x), fresh(x))
    # the loaded layer is trainable as usual
    fresh(x).sum().backward()
    assert all(p.grad is not None for p in fresh.parameters() if p.requires_grad)


@pytest.mark.parametrize("order", ["khkwc", "ckhkw"])
def test_conv_dct_order_round_trips_and_old_files_load_as_unfold_order(order, tmp_path):
    def make(o):
        return wrap(perturbed(DCTPlusSparseConv2d(3, 4, 3, padding=1, nnz=5, seed=0,
                                                  dct_order=o), 0))

    model = make(order)
    path = tmp_path / "m.safetensors"
    bornsparse.save(model, path)
    other = "ckhkw" if order == "khkwc" else "khkwc"
    fresh = bornsparse.load(wrap(make(other)[0]), path)
    assert fresh[0].dct_order == order
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(x), fresh(x))
    # a file written before the field existed was computed in the F.unfold order
    old = rewrite(path, tmp_path / "old.safetensors",
                  metadata=edit_doc(lambda d: d["layers"][0]["args"].pop("dct_order")))
    assert bornsparse.load(wrap(nn.Conv2d(3, 4, 3, padding=1)), old)[0].dct_order == "ckhkw"
    bad = rewrite(path, tmp_path / "bad.safetensors",
                  metadata=edit_doc(lambda d: d["layers"][0]["args"].update(dct_order="hwc")))
    with pytest.raises(CheckpointError, match="args.dct_order of a DCTPlusSparseConv2d"):
        bornsparse.load(wrap(nn.Conv2d(3, 4, 3, padding=1)), bad)


def test_sparsified_model_loads_into_fresh_meta_and_other_density(tmp_path):
    model = mlp(seed=0)
    bornsparse.sparsify(model, kind="dctps", density=0.1, seed=0)
    perturbed(model, 1)
    path = tmp_path / "mlp.safetensors"
    bornsparse.save(model, path)
    x = torch.randn(5, 1, 8, 8)
    other = mlp(seed=5)
    bornsparse.sparsify(other, kind="sparse", density=0.3, seed=9)
    with torch.device("meta"):
        meta = mlp(seed=0)
    for fresh in (mlp(seed=3), meta, other):
        bornsparse.load(fresh, path)
        assert states_equal(model, fresh)
        assert torch.equal(model(x), fresh(x))
        assert [type(m) for m in fresh.modules()] == [type(m) for m in model.modules()]


def test_batchnorm_and_dense_rest_materialise_from_meta(tmp_path):
    def net():
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Flatten(), nn.Linear(4 * 16, 3))

    model = net()
    bornsparse.sparsify(model, kind="sparse", density=0.4, include="0", seed=0)
    model.train()
    model(torch.randn(8, 1, 4, 4))  # running statistics and num_batches_tracked move
    path = tmp_path / "bn.safetensors"
    bornsparse.save(model, path)
    with torch.device("meta"):
        fresh = net()
    bornsparse.load(fresh, path)
    assert states_equal(model, fresh)
    assert fresh[4].weight.device.type == "cpu" and isinstance(fresh[4].weight, nn.Parameter)
    model.eval()
    fresh.eval()
    x = torch.randn(2, 1, 4, 4)
    assert torch.equal(model(x), fresh(x))


def test_shared_layer_and_tied_tensors_stay_shared(tmp_path):
    layer = perturbed(SparseLinear(6, 6, nnz=8, seed=0), 0)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    path = tmp_path / "shared.safetensors"
    bornsparse.save(model, path)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["0.bias", "0.indices", "0.values"]  # stored once
    with torch.device("meta"):
        lin = nn.Linear(6, 6)
    fresh = nn.Sequential(lin, nn.ReLU(), lin)
    bornsparse.load(fresh, path)
    assert fresh[0] is fresh[2] and isinstance(fresh[0], SparseLinear)
    x = torch.randn(2, 6)
    assert torch.equal(model(x), fresh(x))

    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), SparseLinear(4, 2, nnz=3, seed=0))
    tied[1].weight = tied[0].weight
    bornsparse.save(tied, path)
    with torch.device("meta"):
        fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    fresh[1].weight = fresh[0].weight
    bornsparse.load(fresh, path)
    assert fresh[1].weight is fresh[0].weight
    assert torch.equal(fresh[0].weight, tied[0].weight)


def test_load_copies_into_real_rest_and_keeps_mode(tmp_path):
    model = nn.Sequential(SparseLinear(5, 4, nnz=6, seed=0), nn.LayerNorm(4))
    perturbed(model, 0)
    path = tmp_path / "m.safetensors"
    bornsparse.save(model, path)
    fresh = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4)).eval()
    ln_weight = fresh[1].weight
    bornsparse.load(fresh, path)
    assert fresh[1].weight is ln_weight  # copied in place: an optimizer holding it still does
    assert not fresh[0].training


# ----------------------------------------------------------------------------- the file


def test_file_is_o_nnz_with_int32_indices(tmp_path):
    model = nn.Sequential(SparseLinear(256, 256, nnz=600, seed=0),
                          DCTPlusSparseConv2d(16, 16, 3, nnz=200, seed=1),
                          PermutedBlockDiagonal(64, 64, depth=4, seed=2))
    path = tmp_path / "big.safetensors"
    bornsparse.save(model, path)
    stored = 0
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            stored += t.numel() * t.element_size()
            if k.endswith(("indices", "perms")):
                assert t.dtype == torch.int32, k
    header = int.from_bytes(path.read_bytes()[:8], "little")
    size = os.path.getsize(path)
    assert size <= 1.1 * stored + 8 + header
    assert header < 4096
    # values 4 bytes + two int32 indices: 12 bytes per stored weight, never a dense weight
    assert size < 256 * 256 * 4 / 10
    fresh = nn.Sequential(nn.Linear(256, 256), nn.Conv2d(16, 16, 3), nn.Linear(64, 64))
    bornsparse.load(fresh, path)
    # in memory the layers keep the dtype of their own buffers
    assert fresh[0].indices.dtype == model[0].indices.dtype
    assert fresh[2].perms.dtype == model[2].perms.dtype
    assert states_equal(model, fresh)


def test_save_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    model = nn.Sequential(SparseLinear(4, 3, nnz=2, seed=0))
    bornsparse.save(model, path)
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temp file left behind
    bornsparse.load(nn.Sequential(nn.Linear(4, 3)), path)


def test_save_refuses_what_it_cannot_describe(tmp_path):
    with pytest.raises(TypeError, match="save a container"):
        bornsparse.save(SparseLinear(4, 3, nnz=2), tmp_path / "a")

    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="meta-device"):
        bornsparse.save(meta, tmp_path / "a")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bornsparse.save("model", tmp_path / "a")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- bad files


def reference_model():
    return perturbed(nn.Sequential(SparseLinear(12, 7, nnz=10, seed=0), nn.LayerNorm(7),
                                   PermutedBlockDiagonal(7, 7, depth=2, seed=1)), 0)


def dense_model():
    return nn.Sequential(nn.Linear(12, 7), nn.LayerNorm(7), nn.Linear(7, 7))


def sparse_model():
    # already sparse, other support and nnz: a failed load must leave these alone too
    return perturbed(nn.Sequential(SparseLinear(12, 7, nnz=4, seed=5), nn.LayerNorm(7),
                                   PermutedBlockDiagonal(7, 7, depth=2, seed=6)), 1)


def set_arg(layer, key, value):
    def fn(doc):
        doc["layers"][layer]["args"][key] = value
    return fn


def swap_idx(ts):
    ts["0.indices"] = ts["0.indices"].flip(1).contiguous()


def dup_idx(ts):
    idx = ts["0.indices"].clone()
    idx[:, 1] = idx[:, 0]
    ts["0.indices"] = idx


def bad_perms(ts):
    p = ts["2.perms"].clone()
    p[1, 0] = p[1, 1]
    ts["2.perms"] = p


def out_of_range(ts):
    idx = ts["0.indices"].clone()
    idx[0, -1] = 7
    ts["0.indices"] = idx


def drop(ts, key):
    del ts[key]


BAD_EDITS = {
    "unknown_version": (dict(metadata=lambda m: {**m, VERSION_KEY: "99"}),
                        "format version '99'"),
    "no_metadata": (dict(metadata=lambda m: {}), "no bornsparse metadata"),
    "garbled_json": (dict(metadata=lambda m: {**m, METADATA_KEY: "{layers: ["}),
                     "not valid JSON"),
    "doc_not_object": (dict(metadata=lambda m: {**m, METADATA_KEY: "[1, 2]"}),
                       "must be an object"),
    "unknown_class": (dict(metadata=edit_doc(lambda d: d["layers"][0].update(
        {"class": "FancyLinear"}))), "unknown layer class 'FancyLinear'"),
    "missing_field": (dict(metadata=edit_doc(lambda d: d["layers"][0]["args"].pop("nnz"))),
                      r"layers\[0\].args of a SparseLinear must have keys"),
    "bad_field": (dict(metadata=edit_doc(set_arg(0, "nnz", "ten"))),
                  r"layers\[0\].args.nnz of a SparseLinear is invalid: 'ten'"),
    "other_convention": (dict(metadata=edit_doc(set_arg(1, "perm_order", "reversed"))),
                         r"layers\[1\].args.perm_order is 'reversed'"),
    "no_such_module": (dict(metadata=edit_doc(lambda d: d["layers"][0].update(
        {"names": ["9"]}))), "layer '9' .* is not a submodule"),
    "wrong_in_features": (dict(metadata=edit_doc(set_arg(0, "in_features", 13))),
                          "in_features=13, the model's .* has in_features=12"),
    "nnz_disagrees_with_values": (dict(metadata=edit_doc(set_arg(0, "nnz", 11))),
                                  r"tensor '0.values' must have shape \(11,\)"),
    "out_of_range": (dict(tensors=out_of_range),
                     r"'0.indices': indices\[0\] \(rows\) must lie in \[0, 7\)"),
    "unsorted": (dict(tensors=swap_idx), "must be sorted row-major"),
    "duplicate": (dict(tensors=dup_idx), "must be sorted row-major without duplicates"),
    "not_a_permutation": (dict(tensors=bad_perms),
                          r"'2.perms': perms must hold a permutation of range\(width\)"),
    "dense_weight": (dict(tensors=lambda ts: ts.update({"0.weight": torch.zeros(7, 12)})),
                     "'0.weight' is a dense weight"),
    "unexpected_in_layer": (dict(tensors=lambda ts: ts.update({"2.extra": torch.zeros(1)})),
                            r"unexpected tensor '2.extra': layer '2'"),
    "unexpected": (dict(tensors=lambda ts: ts.update({"head.weight": torch.zeros(1)})),
                   "unexpected tensor 'head.weight'"),
    "missing_layer_tensor": (dict(tensors=lambda ts: drop(ts, "0.bias")),
                             "tensor '0.bias' of layer '0' .* is missing"),
    "missing_rest": (dict(tensors=lambda ts: drop(ts, "1.weight")),
                     r"missing from the file: \['1.weight'\]"),
    "rest_shape": (dict(tensors=lambda ts: ts.update({"1.weight": torch.ones(8)})),
                   r"'1.weight' has shape \(8,\) in the file"),
    "values_dtype": (dict(tensors=lambda ts: ts.update({"0.values": ts["0.values"].double()})),
                     "'0.values' must have the layer's dtype float32, got float64"),
    "float_indices": (dict(tensors=lambda ts: ts.update({"0.indices": ts["0.indices"].float()})),
                      "'0.indices' must be int32 or int64"),
}


@pytest.mark.parametrize("target", [dense_model, sparse_model])
@pytest.mark.parametrize("bad", sorted(BAD_EDITS))
def test_bad_file_raises_and_leaves_model_unchanged(bad, target, tmp_path):
    good = tmp_path / "good.safetensors"
    bornsparse.save(reference_model(), good)
    edits, message = BAD_EDITS[bad]
    path = rewrite(good, tmp_path / "bad.safetensors", **edits)
    model = target()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    params = [id(p) for p in model.parameters()]
    with pytest.raises(CheckpointError, match=message):
        bornsparse.load(model, path)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert [id(p) for p in model.parameters()] == params
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _bad_offset_perms(ts):
    p = ts["0.offset_perms"].clone()
    p[2, 0] = p[2, 1]
    ts["0.offset_perms"] = p


@pytest.mark.parametrize("edits, message", [
    (dict(tensors=_bad_offset_perms), r"'0.offset_perms': perms must hold a permutation"),
    (dict(metadata=edit_doc(set_arg(0, "offset_depth", 4))),
     r"tensor '0.offset_weight' must have shape \(4, 6, 2, 2\)"),
    (dict(metadata=edit_doc(set_arg(1, "nblocks", 3))),
     "a MonarchLinear's nblocks must divide in_features and out_features, got nblocks=3"),
    (dict(metadata=edit_doc(set_arg(1, "monarch_layout", "transposed"))),
     r"layers\[1\].args.monarch_layout is 'transposed'"),
    (dict(metadata=edit_doc(set_arg(2, "rank", 2))), r"'2.u' must have shape \(4, 2\)"),
], ids=["offset_perms", "offset_depth", "monarch_nblocks", "monarch_layout", "lowrank_rank"])
def test_bad_structured_layer_files_raise(edits, message, tmp_path):
    model = nn.Sequential(PermutedOffsetSparseLinear(12, 8, nnz=5, offset_depth=3, seed=0),
                          MonarchLinear(8, 8, 2, seed=1), LowRankLinear(8, 4, 3, seed=2))
    good = tmp_path / "good.safetensors"
    bornsparse.save(model, good)
    path = rewrite(good, tmp_path / "bad.safetensors", **edits)
    fresh = nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    with pytest.raises(CheckpointError, match=message):
        bornsparse.load(fresh, path)
    assert all(type(m) is nn.Linear for m in fresh)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", "truncated"])
def test_unreadable_file(content, tmp_path):
    good = tmp_path / "good.safetensors"
    bornsparse.save(reference_model(), good)
    path = tmp_path / "bad"
    path.write_bytes(good.read_bytes()[:-9] if content == "truncated" else content)
    model = dense_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        bornsparse.load(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) is not SparseLinear for m in model.modules())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bornsparse.load(model, tmp_path / "nope")


def test_wrong_architecture_shapes(tmp_path):
    path = tmp_path / "m.safetensors"
    bornsparse.save(reference_model(), path)
    for model, message in [
        (nn.Sequential(nn.Conv2d(12, 7, 1), nn.LayerNorm(7), nn.Linear(7, 7)),
         "holds a SparseLinear, but the model has a Conv2d"),
        (nn.Sequential(nn.Linear(12, 7, bias=False), nn.LayerNorm(7), nn.Linear(7, 7)),
         "bias=True, the model's Linear has bias=False"),
        (nn.Sequential(nn.Linear(12, 7), nn.LayerNorm(7), nn.Linear(7, 8)),
         "out_features=7, the model's Linear has out_features=8"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            bornsparse.load(model, path)
        assert all(type(m) in (nn.Sequential, nn.Linear, nn.Conv2d, nn.LayerNorm)
                   for m in model.modules())
    conv = nn.Sequential(SparseConv2d(2, 4, 3, nnz=5, seed=0))
    bornsparse.save(conv, path)
    with pytest.raises(CheckpointError, match=r"stride=\[1, 1\], the model's Conv2d has stride"):
        bornsparse.load(nn.Sequential(nn.Conv2d(2, 4, 3, stride=2)), path)


# ----------------------------------------------------------------------------- resume


def _data(steps=60, batch=16):
    g = torch.Generator().manual_seed(123)
    return torch.randn(steps, batch, 20, generator=g), torch.randint(4, (steps, batch), generator=g)


def _dense(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def _optimizer(cls, params):
    if cls is RigL:
        return torch.optim.Adam(params, lr=1e-2)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _train(model, opt, sched, xs, ys, start, stop):
    for t in range(start, stop):
        opt.zero_grad()
        F.cross_entropy(model(xs[t]), ys[t]).backward()
        if sched.step():
            opt.step()


@pytest.mark.parametrize("cls", [RigL, SET])
def test_resume_after_kill_is_bitwise_identical(cls, tmp_path):
    xs, ys = _data()
    kw = dict(total_steps=60, delta=10, t_end=55)  # updates at 10..50; 40 still moves

    def start():
        model = _dense()
        sched = cls(model, None, density=0.2, seed=5, **kw)
        opt = _optimizer(cls, model.parameters())
        sched.optimizer = opt
        return model, opt, sched

    model, opt, sched = start()
    _train(model, opt, sched, xs, ys, 0, 60)

    # the same run, checkpointed at step 30 and killed
    m1, o1, s1 = start()
    _train(m1, o1, s1, xs, ys, 0, 30)
    at_30 = [layer.indices.clone() for _, layer in sparse_targets(m1)]
    bornsparse.save(m1, tmp_path / "model.safetensors")
    torch.save({"opt": o1.state_dict(), "sched": s1.state_dict()}, tmp_path / "train.pt")
    del m1, o1, s1

    # rebuilt from scratch: dense architecture (another init), load, new optimizer and schedule
    with torch.device("meta"):
        m2 = _dense(seed=77)
    bornsparse.load(m2, tmp_path / "model.safetensors")
    ckpt = torch.load(tmp_path / "train.pt", weights_only=True)
    o2 = _optimizer(cls, m2.parameters())
    o2.load_state_dict(ckpt["opt"])
    s2 = cls(m2, o2, **kw)
    s2.load_state_dict(ckpt["sched"])
    assert s2.t == 30 and s2.updates == 3
    _train(m2, o2, s2, xs, ys, 30, 60)

    assert s2.updates == sched.updates == 5
    assert states_equal(model, m2)
    final = [layer.indices for _, layer in sparse_targets(m2)]
    assert not all(torch.equal(a, b) for a, b in zip(at_30, final, strict=True))
