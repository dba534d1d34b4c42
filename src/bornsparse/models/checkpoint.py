"""save(model, path) / load(model, path): sparse models as safetensors files, O(nnz) on disk.

A checkpoint is one safetensors file. Its tensors are the model's ``state_dict`` (persistent
parameters and buffers only), with every bornsparse layer's supports (``indices``, ``perms``)
stored as int32 when they fit; its metadata holds a JSON document (key :data:`METADATA_KEY`)
and the format version (key :data:`VERSION_KEY`). The document describes every bornsparse
layer — dotted module name(s), class, and every constructor argument that changes the
function it computes — so :func:`load` rebuilds the layers through their public
constructors without knowing the density, distribution or seeds that made them. No dense
weight of a sparse layer is ever formed or stored.

:func:`load` validates the whole file and builds every new layer before touching the model,
so a bad file leaves the model exactly as it was (:class:`CheckpointError`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bornsparse.sparsity.swap import (
    default_device,
    is_dense_linear,
    is_dense_target,
    linear_features,
    set_submodule,
)

FORMAT_VERSION = 1
METADATA_KEY = "bornsparse"
VERSION_KEY = "bornsparse.format_version"

# Conventions a format-1 file was written under. A later library that changes one of them
# (another DCT, another patch order, ...) must bump the string so old files fail loudly
# instead of loading into a different function.
DCT_OFFSET = "dct-ii-ortho: first out coefficients of the input zero-padded to max(in, out)"
CONV_DCT_OFFSET = "dct-ii-ortho: channel o adds column o of dct_matrix(patch, out_channels)"
PATCH_LAYOUT = "(in_channels/groups, kh, kw) row-major, as F.unfold"
PERM_ORDER = "application order: factor 0 first"
MONARCH_LAYOUT = "y = P_s^T L P_q R x: right (k, q, p) on x as (k, p), u[l*q + r] = z[r*k + l]"

_INDEX_LIMIT = 2**31  # int32 holds every index below this
_DTYPES = {str(d).removeprefix("torch."): d
           for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded into the given model; the message says why."""


# ----------------------------------------------------------------------------- layer specs


def _nn_classes() -> dict[str, type]:
    # imported late: bornsparse.models must not pull in nn (and numba) before it is used
    from bornsparse.nn.dct_plus_sparse import DCTPlusSparseLinear
    from bornsparse.nn.permuted import PermutedBlockDiagonal, PermutedTanhNetwork
    from bornsparse.nn.permuted_offset import PermutedOffsetSparseLinear
    from bornsparse.nn.sparse_conv import DCTPlusSparseConv2d, SparseConv2d
    from bornsparse.nn.sparse_linear import SparseLinear
    from bornsparse.nn.structured import LowRankLinear, MonarchLinear

    return {c.__name__: c for c in (SparseLinear, DCTPlusSparseLinear, SparseConv2d,
                                    DCTPlusSparseConv2d, PermutedBlockDiagonal,
                                    PermutedTanhNetwork, PermutedOffsetSparseLinear,
                                    LowRankLinear, MonarchLinear)}


@dataclass(frozen=True)
class _Spec:
    family: str  # "linear", "conv", "permuted" or "structured": how it is described
    sparse: bool  # values + indices (a dense "weight" tensor is never right for it)
    dct: bool
    fields: dict[str, Callable[[object], bool]]  # constructor argument -> type check


def _is_int(v: object, low: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_pair(low: int) -> Callable[[object], bool]:
    return lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x, low) for x in v)


def _is_bool(v: object) -> bool:
    return isinstance(v, bool)


def _is_str(v: object) -> bool:
    return isinstance(v, str)


def _is_dtype(v: object) -> bool:
    return v in _DTYPES


def _is_padding(v: object) -> bool:
    return v in ("same", "valid") or _is_pair(0)(v)


_LINEAR = {"in_features": _is_int, "out_features": _is_int, "nnz": _is_int, "bias": _is_bool,
           "support": _is_str, "dtype": _is_dtype}
_CONV = {"in_channels": _is_int, "out_channels": _is_int, "kernel_size": _is_pair(1),
         "stride": _is_pair(1), "padding": _is_padding, "dilation": _is_pair(1),
         "groups": _is_int, "padding_mode": _is_str, "bias": _is_bool, "nnz": _is_int,
         "support": _is_str, "dtype": _is_dtype, "patch_layout": _is_str}
_DCT = {"train_alpha": _is_bool, "offset": _is_str}
# how a conv patch is flattened before its DCT; files written before the field existed
# were computed in the F.unfold order
_DCT_ORDERS = ("khkwc", "ckhkw")
_DCT_ORDER_BEFORE_FIELD = "ckhkw"
_PERMUTED = {"in_features": _is_int, "out_features": _is_int, "width": _is_int,
             "depth": _is_int, "block_size": lambda v: _is_int(v, 2), "dtype": _is_dtype,
             "perm_order": _is_str}
_STRUCTURED = {"in_features": _is_int, "out_features": _is_int, "bias": _is_bool,
               "dtype": _is_dtype}

_SPECS = {
    "SparseLinear": _Spec("linear", True, False, _LINEAR),
    "DCTPlusSparseLinear": _Spec("linear", True, True, {**_LINEAR, **_DCT}),
    "SparseConv2d": _Spec("conv", True, False, _CONV),
    "DCTPlusSparseConv2d": _Spec("conv", True, True, {**_CONV, **_DCT,
                                                      "dct_order": _DCT_ORDERS.__contains__}),
    "PermutedBlockDiagonal": _Spec("permuted", False, False, {**_PERMUTED, "bias": _is_bool}),
    "PermutedTanhNetwork": _Spec("permuted", False, False, _PERMUTED),
    # S as a sparse linear layer's; the fixed offset G₀ as its blocks and permutations
    "PermutedOffsetSparseLinear": _Spec("linear", True, False, {
        **_LINEAR, "train_alpha": _is_bool, "offset_depth": _is_int,
        "offset_width": lambda v: _is_int(v, 2), "perm_order": _is_str}),
    # plain-torch baselines: constructor arguments, then their whole state_dict
    "LowRankLinear": _Spec("structured", False, False, {**_STRUCTURED, "rank": _is_int}),
    "MonarchLinear": _Spec("structured", False, False, {
        **_STRUCTURED, "nblocks": _is_int, "monarch_layout": _is_str}),
}
# the fixed conventions each format-1 field must hold
_CONSTANTS = {"patch_layout": PATCH_LAYOUT, "perm_order": PERM_ORDER,
              "monarch_layout": MONARCH_LAYOUT}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(layer: nn.Module) -> dict:
    """The constructor arguments of a bornsparse layer that fix the function it computes."""
    cls = type(layer).__name__
    spec = _SPECS[cls]
    if spec.family == "permuted":
        args = dict(in_features=layer.in_features, out_features=layer.out_features,
                    width=layer.width, depth=layer.depth, block_size=layer.block_size,
                    dtype=_dtype_name(layer.weight.dtype), perm_order=PERM_ORDER)
        if cls == "PermutedBlockDiagonal":
            args["bias"] = layer.bias is not None
        return args
    if spec.family == "structured":
        args = dict(in_features=layer.in_features, out_features=layer.out_features,
                    bias=layer.bias is not None,
                    dtype=_dtype_name(next(iter(layer.parameters())).dtype))
        if cls == "LowRankLinear":
            args["rank"] = layer.rank
        else:
            args.update(nblocks=layer.nblocks, monarch_layout=MONARCH_LAYOUT)
        return args
    common = dict(nnz=layer.nnz, bias=layer.bias is not None,
                  # support= does not change the function; kept so a rebuilt layer reads alike
                  support=getattr(layer, "support", "random"),
                  dtype=_dtype_name(layer.values.dtype))
    if spec.family == "linear":
        args = dict(in_features=layer.in_features, out_features=layer.out_features, **common)
    else:
        padding = layer.padding if isinstance(layer.padding, str) else list(layer.padding)
        args = dict(in_channels=layer.in_channels, out_channels=layer.out_channels,
                    kernel_size=list(layer.kernel_size), stride=list(layer.stride),
                    padding=padding, dilation=list(layer.dilation), groups=layer.groups,
                    padding_mode=layer.padding_mode, patch_layout=PATCH_LAYOUT, **common)
    if spec.dct:
        args["train_alpha"] = isinstance(layer.alpha, nn.Parameter)
        args["offset"] = DCT_OFFSET if spec.family == "linear" else CONV_DCT_OFFSET
        if spec.family == "conv":
            args["dct_order"] = layer.dct_order
    if cls == "PermutedOffsetSparseLinear":
        args.update(train_alpha=isinstance(layer.alpha, nn.Parameter),
                    offset_depth=layer.offset_depth, offset_width=layer.offset_width,
                    perm_order=PERM_ORDER)
    return args


def _expected_tensors(cls: str, a: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor key (relative to the layer) -> (shape, role); role "index" or a float role."""
    spec = _SPECS[cls]
    if spec.family == "permuted":
        w, k, d = a["width"], a["block_size"], a["depth"]
        out = {"weight": ((d, w // k, k, k), "float"), "perms": ((d, w), "index")}
        if cls == "PermutedTanhNetwork":
            out["biases"] = ((d, w), "float")
        elif a["bias"]:
            out["bias"] = ((a["out_features"],), "float")
        return out
    if spec.family == "structured":
        n_in, n_out = a["in_features"], a["out_features"]
        if cls == "LowRankLinear":
            out = {"u": ((n_out, a["rank"]), "float"), "v": ((n_in, a["rank"]), "float")}
        else:
            k = a["nblocks"]
            if n_in % k or n_out % k:
                raise CheckpointError(
                    f"a MonarchLinear's nblocks must divide in_features and out_features, "
                    f"got nblocks={k} for {n_in} -> {n_out}"
                )
            q = min(n_in, n_out) // k
            out = {"right": ((k, q, n_in // k), "float"), "left": ((k, n_out // k, q), "float")}
        if a["bias"]:
            out["bias"] = ((n_out,), "float")
        return out
    out = {"values": ((a["nnz"],), "float"), "indices": ((2, a["nnz"]), "index")}
    if a["bias"]:
        rows = a["out_features"] if spec.family == "linear" else a["out_channels"]
        out["bias"] = ((rows,), "float")
    if spec.dct:
        out["alpha"] = ((), "float")
    if cls == "PermutedOffsetSparseLinear":
        d, w = a["offset_depth"], a["offset_width"]
        out.update(alpha=((), "float"), offset_weight=((d, w // 2, 2, 2), "float"),
                   offset_perms=((d, w), "index"))
    return out


def _dense_shape(cls: str, a: dict) -> tuple[int, int]:
    if _SPECS[cls].family == "linear":
        return a["out_features"], a["in_features"]
    kh, kw = a["kernel_size"]
    return a["out_channels"], a["in_channels"] // a["groups"] * kh * kw


# ----------------------------------------------------------------------------- save


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (state_dict plus a description of its bornsparse layers) to ``path``.

    The file is a safetensors file: tensors are the model's ``state_dict`` with each
    bornsparse layer's ``indices``/``perms`` stored as int32 where they fit; metadata
    describes every bornsparse layer (name, class, constructor arguments) so that
    :func:`load` needs no seed, density or distribution. Written to a temporary file in the
    same folder and renamed over ``path`` (atomic: a reader sees the old file or the new one).

    Tensors reachable under several names (a shared layer, tied weights) are stored once.
    Raises TypeError for a model that is not an nn.Module, holds meta-device tensors, is
    itself a bornsparse layer (wrap it: ``nn.Sequential(layer)``, as :func:`load` must be
    able to replace it in a parent), or holds a subclass of a bornsparse layer (its extra
    semantics could not be rebuilt).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from safetensors.torch import save as st_save

    classes = _nn_classes()
    layers: dict[int, tuple[list[str], nn.Module]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, tuple(classes.values())):
            if type(mod) not in classes.values():
                raise TypeError(
                    f"module {name!r} is a {type(mod).__name__}, a subclass of a bornsparse "
                    f"layer; save() can only describe the classes {sorted(classes)}"
                )
            if not name:
                raise TypeError(
                    f"model is itself a {type(mod).__name__}; save a container holding it "
                    "(nn.Sequential(layer)) so that load() can replace it in its parent"
                )
            layers.setdefault(id(mod), ([], mod))[0].append(name)
    state = model.state_dict(keep_vars=True)
    odd = [k for k, t in state.items() if not isinstance(t, torch.Tensor)]
    if odd:
        raise TypeError(f"model's state_dict holds non-tensor (extra) state, not supported: {odd}")
    meta = [k for k, t in state.items() if t.device.type == "meta"]
    if meta:
        raise TypeError(f"model holds meta-device tensors, which have no values: {meta[:5]}")

    described = []
    index_keys = set()
    for names, layer in layers.values():
        cls = type(layer).__name__
        args = _describe(layer)
        expected = _expected_tensors(cls, args)
        own = set(layer.state_dict(keep_vars=True))
        if own != set(expected):
            raise TypeError(
                f"{cls} at {names[0]!r} has state_dict entries {sorted(own)}, but checkpoint "
                f"format {FORMAT_VERSION} stores {sorted(expected)} for it"
            )
        described.append({"names": names, "class": cls, "args": args})
        index_keys.update(f"{n}.{k}" for n in names for k, (_, r) in expected.items()
                          if r == "index")

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_key: dict[int, str] = {}
    for key, t in state.items():
        if id(t) in first_key:  # the same tensor under another name: stored once
            aliases[key] = first_key[id(t)]
            continue
        first_key[id(t)] = key
        t = t.detach()
        if key in index_keys and t.numel() and int(t.min()) >= 0 and int(t.max()) < _INDEX_LIMIT:
            t = t.to(torch.int32)
        # clone: safetensors refuses tensors sharing storage, which views of one another do
        tensors[key] = t.to("cpu").contiguous().clone()
    doc = {"layers": described, "aliases": aliases}
    metadata = {METADATA_KEY: json.dumps(doc, sort_keys=True), VERSION_KEY: str(FORMAT_VERSION)}
    _write_atomic(Path(path), st_save(tensors, metadata=metadata))


def _write_atomic(path: Path, data: bytes) -> None:
    # temp file in the same folder + rename: a crash mid-write never leaves a torn checkpoint
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------- load


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The validated metadata document and the CPU tensors of a checkpoint file.

    Aliased keys are resolved (they map to the same tensor object as their target).
    Raises FileNotFoundError for a missing file and :class:`CheckpointError` for a file that
    is not a readable safetensors checkpoint of a known format version.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable safetensors file (truncated or "
            f"corrupt?): {err}"
        ) from err
    version = meta.get(VERSION_KEY)
    if version is None or METADATA_KEY not in meta:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no bornsparse metadata (keys {VERSION_KEY!r} and "
            f"{METADATA_KEY!r}); got metadata keys {sorted(meta)}: not written by "
            "bornsparse.save"
        )
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {version!r}; this bornsparse reads "
            f"version {FORMAT_VERSION!r}"
        )
    try:
        doc = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"metadata {METADATA_KEY!r} of {str(path)!r} is not valid JSON: {err}"
        ) from err
    _check_doc(doc)
    for key, target in doc["aliases"].items():
        if key in tensors:
            raise CheckpointError(f"aliases[{key!r}]: {key!r} is also stored as a tensor")
        if target not in tensors:
            raise CheckpointError(
                f"aliases[{key!r}] names tensor {target!r}, which the file does not hold"
            )
        tensors[key] = tensors[target]
    return doc, tensors


def _check_doc(doc: object) -> None:
    """Schema of the metadata document; errors name the field."""
    if not isinstance(doc, dict) or set(doc) != {"layers", "aliases"}:
        got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise CheckpointError(
            f"metadata {METADATA_KEY!r} must be an object with keys ['aliases', 'layers'], "
            f"got {got}"
        )
    aliases = doc["aliases"]
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise CheckpointError(f"metadata field 'aliases' must map names to names, got {aliases!r}")
    if not isinstance(doc["layers"], list):
        raise CheckpointError(f"metadata field 'layers' must be a list, got {doc['layers']!r}")
    seen: set[str] = set()
    for i, entry in enumerate(doc["layers"]):
        where = f"layers[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"names", "class", "args"}:
            raise CheckpointError(
                f"metadata field {where} must be an object with keys ['args', 'class', "
                f"'names'], got {entry!r}"
            )
        names = entry["names"]
        if not isinstance(names, list) or not names or not all(
            isinstance(n, str) and n for n in names
        ):
            raise CheckpointError(
                f"metadata field {where}.names must be a non-empty list of module names, got "
                f"{names!r}"
            )
        for n in names:
            if n in seen:
                raise CheckpointError(f"metadata field {where}.names: {n!r} is described twice")
            seen.add(n)
        cls = entry["class"]
        if cls not in _SPECS:
            raise CheckpointError(
                f"metadata field {where}.class: unknown layer class {cls!r}; known: "
                f"{sorted(_SPECS)}"
            )
        args, fields = entry["args"], _SPECS[cls].fields
        if cls == "DCTPlusSparseConv2d" and isinstance(args, dict) and "dct_order" not in args:
            args["dct_order"] = _DCT_ORDER_BEFORE_FIELD
        if not isinstance(args, dict) or set(args) != set(fields):
            got = sorted(args) if isinstance(args, dict) else args
            raise CheckpointError(
                f"metadata field {where}.args of a {cls} must have keys {sorted(fields)}, got "
                f"{got!r}"
            )
        for key, ok in fields.items():
            if not ok(args[key]):
                raise CheckpointError(
                    f"metadata field {where}.args.{key} of a {cls} is invalid: {args[key]!r}"
                )
        constants = {**_CONSTANTS, "offset": CONV_DCT_OFFSET if _SPECS[cls].family == "conv"
                     else DCT_OFFSET}
        for key, want in constants.items():
            if key in args and args[key] != want:
                raise CheckpointError(
                    f"metadata field {where}.args.{key} is {args[key]!r}; this bornsparse "
                    f"computes {want!r}"
                )
    for a in seen:
        for b in seen:
            if b.startswith(a + "."):
                raise CheckpointError(
                    f"metadata field 'layers': layer {b!r} lies inside layer {a!r}"
                )


def _prefixed(key: str, prefixes: set[str]) -> str | None:
    """The prefix among ``prefixes`` that ``key`` lies under ('a' for 'a.values'), if any."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        p = ".".join(parts[:i])
        if p in prefixes:
            return p
    return None


def _check_tensor(key: str, t: torch.Tensor, shape: tuple[int, ...], role: str,
                  dtype: torch.dtype) -> None:
    if tuple(t.shape) != shape:
        raise CheckpointError(f"tensor {key!r} must have shape {shape}, got {tuple(t.shape)}")
    if role == "index":
        if t.dtype not in (torch.int32, torch.int64):
            raise CheckpointError(f"tensor {key!r} must be int32 or int64, got {t.dtype}")
    elif t.dtype != dtype:
        raise CheckpointError(
            f"tensor {key!r} must have the layer's dtype {_dtype_name(dtype)}, got "
            f"{_dtype_name(t.dtype)}"
        )


def _check_support(key: str, idx: torch.Tensor, shape: tuple[int, int]) -> None:
    rows, cols = shape
    r, c = idx[0], idx[1]
    for axis, v, n in (("rows", r, rows), ("columns", c, cols)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= n):
            raise CheckpointError(
                f"tensor {key!r}: {axis} must lie in [0, {n}), got range "
                f"[{int(v.min())}, {int(v.max())}]"
            )
    flat = r * cols + c
    if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
        raise CheckpointError(
            f"tensor {key!r} must be sorted row-major without duplicates, as save() writes it"
        )


def _check_perms(key: str, perms: torch.Tensor) -> None:
    ref = torch.arange(perms.shape[1], dtype=perms.dtype).expand_as(perms)
    bad = ~(torch.sort(perms, dim=1).values == ref).all(dim=1)
    if bool(bad.any()):
        raise CheckpointError(
            f"tensor {key!r}: rows {bad.nonzero().flatten().tolist()[:5]} are not permutations "
            f"of 0..{perms.shape[1] - 1}"
        )


def _geometry(mod: nn.Module) -> dict[str, object]:
    """What a module's own attributes say about its shape, in the file's JSON form."""
    out = {}
    if is_dense_linear(mod):  # transformers' Conv1D names them nx, nf
        out["in_features"], out["out_features"] = linear_features(mod)
    for k in ("in_features", "out_features", "in_channels", "out_channels", "groups",
              "padding_mode"):
        if hasattr(mod, k):
            out[k] = getattr(mod, k)
    for k in ("kernel_size", "stride", "dilation", "padding"):
        v = getattr(mod, k, None)
        if isinstance(v, tuple | list):
            out[k] = [int(x) for x in v]
        elif v is not None:
            out[k] = v
    return out


def _check_fits(name: str, cls: str, args: dict, mod: nn.Module) -> None:
    """The module at ``name`` must have the shape the file's layer has."""
    family = _SPECS[cls].family
    geo = _geometry(mod)
    kind = "linear" if "in_features" in geo else "conv" if "in_channels" in geo else None
    if kind is None:
        return  # a placeholder (nn.Identity, ...): nothing to disagree with
    if kind != ("conv" if family == "conv" else "linear"):
        raise CheckpointError(
            f"layer {name!r}: the file holds a {cls}, but the model has a "
            f"{type(mod).__name__} there"
        )
    keys = ("in_features", "out_features") if kind == "linear" else (
        "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
        "groups", "padding_mode")
    for k in keys:
        if k in geo and geo[k] != args[k]:
            raise CheckpointError(
                f"layer {name!r}: the file's {cls} has {k}={args[k]!r}, the model's "
                f"{type(mod).__name__} has {k}={geo[k]!r}"
            )
    if _SPECS[cls].sparse and (isinstance(mod, nn.Linear | nn.Conv2d) or is_dense_target(mod)
                               or hasattr(mod, "nnz")):
        has_bias = getattr(mod, "bias", None) is not None
        if has_bias != args["bias"]:
            raise CheckpointError(
                f"layer {name!r}: the file's {cls} has bias={args['bias']}, the model's "
                f"{type(mod).__name__} has bias={has_bias}"
            )


def _build(cls: str, args: dict, t: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A new layer through its public constructor, holding the file's tensors."""
    klass = _nn_classes()[cls]
    dtype = _DTYPES[args["dtype"]]
    spec = _SPECS[cls]
    common = dict(device=device, dtype=dtype)
    if spec.family == "permuted":
        kw = dict(width=args["width"], depth=args["depth"], block_size=args["block_size"],
                  seed=0, **common)  # seed: the random perms and blocks are overwritten
        if cls == "PermutedBlockDiagonal":
            kw["bias"] = args["bias"]
        layer = klass(args["in_features"], args["out_features"], **kw)
    elif spec.family == "structured":
        size = args["rank"] if cls == "LowRankLinear" else args["nblocks"]
        # seed: the drawn factors are overwritten
        layer = klass(args["in_features"], args["out_features"], size, bias=args["bias"],
                      seed=0, **common)
    else:
        kw = dict(bias=args["bias"], support=args["support"], init="zeros", seed=0,
                  indices=t["indices"].to(torch.int64), **common)
        if spec.dct:
            kw["train_alpha"] = args["train_alpha"]
            if spec.family == "conv":
                kw["dct_order"] = args["dct_order"]
        if cls == "PermutedOffsetSparseLinear":
            kw.update(train_alpha=args["train_alpha"], offset_depth=args["offset_depth"],
                      offset_width=args["offset_width"])
        if spec.family == "linear":
            layer = klass(args["in_features"], args["out_features"], **kw)
        else:
            layer = klass(args["in_channels"], args["out_channels"], tuple(args["kernel_size"]),
                          stride=tuple(args["stride"]),
                          padding=args["padding"] if isinstance(args["padding"], str)
                          else tuple(args["padding"]),
                          dilation=tuple(args["dilation"]), groups=args["groups"],
                          padding_mode=args["padding_mode"], **kw)
        if not torch.equal(layer.indices.cpu().to(torch.int64), t["indices"].to(torch.int64)):
            raise CheckpointError(f"{cls} reordered the file's support; cannot load it")
    own = layer.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, tensor in t.items():
            if key != "indices":
                # copy_ converts to the dtype of the layer's own buffer (perms: int64 today)
                own[key].copy_(tensor)
    return layer


def load(
    model: nn.Module, path: str | os.PathLike, *, device: torch.device | str | None = None
) -> nn.Module:
    """Fill ``model`` from the checkpoint at ``path`` (written by :func:`save`); return it.

    Every bornsparse layer the file describes is built anew (public constructor with
    ``indices=``, then the file's values) and put at its dotted name(s), whatever sits there
    now: the dense layer of the architecture (``nn.Linear``/``nn.Conv2d``, possibly on the
    meta device, so no dense weight is ever allocated), or a bornsparse layer with another
    support or nnz. Its shape must agree with the module it replaces (in/out features, conv
    geometry, bias). The rest of the state_dict is loaded into the model's own tensors:
    copied in place into real ones (so an optimizer holding them still does), and, for
    tensors on the meta device, put in as new tensors on ``device``.

    ``device``: where new layers and formerly-meta tensors live (default: the device of the
    model's first non-meta tensor, else the CPU). New layers keep the train/eval mode of the
    module they replace.

    NOTE: replaced layers are new objects with new Parameters (``values`` may change size),
    so an optimizer built before ``load`` does not train them: build the optimizer from
    ``model.parameters()`` after loading (then ``optimizer.load_state_dict`` if resuming).

    Raises :class:`CheckpointError` (a ValueError) naming the tensor or field at fault for a
    truncated or foreign file, bad metadata, an unknown format version or layer class,
    invalid supports, shapes that disagree with the model, a dense weight stored for a
    sparse layer, or missing/unexpected tensors. Everything is validated and every new
    layer is built before the model is touched, so after an error the model is unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    device = torch.device(default_device(model) if device is None else device)
    if device.type == "meta":
        raise ValueError(f"device must be a real device, not the meta device, got {device}")
    doc, tensors = read_checkpoint(path)

    # 1. every described layer: where it goes, that it fits, its tensors, the new layer
    plan: list[tuple[list[str], nn.Module]] = []
    claimed: set[str] = set()
    layer_of: dict[str, str] = {}  # every layer name -> class
    for entry in doc["layers"]:
        names, cls, args = entry["names"], entry["class"], entry["args"]
        olds = []
        for n in names:
            try:
                olds.append(model.get_submodule(n))
            except AttributeError as err:
                raise CheckpointError(
                    f"layer {n!r} ({cls}) of the file is not a submodule of the model"
                ) from err
            _check_fits(n, cls, args, olds[-1])
            layer_of[n] = cls
        expected = _expected_tensors(cls, args)
        own: dict[str, torch.Tensor] = {}
        for n in names:
            for k in expected:
                key = f"{n}.{k}"
                if key not in tensors:
                    raise CheckpointError(
                        f"tensor {key!r} of layer {n!r} ({cls}) is missing from the file"
                    )
                claimed.add(key)
        dtype = _DTYPES[args["dtype"]]
        for k, (shape, role) in expected.items():
            key = f"{names[0]}.{k}"
            t = tensors[key]
            _check_tensor(key, t, shape, role, dtype)
            if k == "indices":
                _check_support(key, t.to(torch.int64), _dense_shape(cls, args))
            elif k in ("perms", "offset_perms"):
                _check_perms(key, t.to(torch.int64))
            own[k] = t
        new = _build(cls, args, own, device)
        new.train(olds[0].training)
        plan.append((names, new))

    # 2. the rest: exactly the model's other state_dict entries, with their shapes
    prefixes = set(layer_of)
    current = model.state_dict(keep_vars=True)
    rest_model = {k: t for k, t in current.items() if _prefixed(k, prefixes) is None}
    rest_file = {k: t for k, t in tensors.items() if k not in claimed}
    for key in rest_file:
        if key in rest_model:
            continue
        owner = _prefixed(key, prefixes)
        if owner is not None:
            cls = layer_of[owner]
            stored = sorted(_expected_tensors(
                cls, next(e["args"] for e in doc["layers"] if owner in e["names"])))
            if _SPECS[cls].sparse and key == f"{owner}.weight":
                raise CheckpointError(
                    f"tensor {key!r} is a dense weight, but layer {owner!r} is described as a "
                    f"{cls}, which stores only {stored}: a sparse layer's weight is never dense"
                )
            raise CheckpointError(
                f"unexpected tensor {key!r}: layer {owner!r} ({cls}) stores only {stored}"
            )
        raise CheckpointError(
            f"unexpected tensor {key!r}: the model has no state_dict entry of that name"
        )
    missing = sorted(set(rest_model) - set(rest_file))
    if missing:
        raise CheckpointError(f"tensors missing from the file: {missing[:10]}")
    for key, target in rest_model.items():
        t = rest_file[key]
        if tuple(t.shape) != tuple(target.shape):
            raise CheckpointError(
                f"tensor {key!r} has shape {tuple(t.shape)} in the file, the model's has "
                f"{tuple(target.shape)}"
            )
        if t.dtype.is_floating_point != target.dtype.is_floating_point or (
            t.dtype == torch.bool) != (target.dtype == torch.bool):
            raise CheckpointError(
                f"tensor {key!r} has dtype {_dtype_name(t.dtype)} in the file, the model's "
                f"is {_dtype_name(target.dtype)}"
            )
    replaced = {id(model.get_submodule(n)) for n in prefixes}
    for name, mod in model.named_modules():
        if id(mod) in replaced or _prefixed(name + ".x", prefixes) is not None:
            continue
        saved = {k for k in mod.state_dict(keep_vars=True) if "." not in k}
        for b, t in mod.named_buffers(recurse=False):
            if t.device.type == "meta" and b not in saved:
                raise ValueError(
                    f"buffer {name}.{b} is on the meta device and not part of the state_dict, "
                    "so no checkpoint can fill it; build that module on a real device"
                )

    # 3. only now touch the model: nothing below can fail on a validated file
    for names, new in plan:
        for n in names:
            set_submodule(model, n, new)
    with torch.no_grad():
        for key, t in rest_file.items():
            # into the model's own tensors (an optimizer holding them keeps training them);
            # not load_state_dict, whose per-module hooks write defaults into meta modules
            if rest_model[key].device.type != "meta":
                rest_model[key].copy_(t)
    made: dict[int, torch.Tensor] = {}  # tied tensors stay tied: one new tensor per file tensor
    for key, t in rest_file.items():
        old = rest_model[key]
        if old.device.type != "meta":
            continue
        mod_name, _, attr = key.rpartition(".")
        mod = model.get_submodule(mod_name)
        if id(t) not in made:
            data = t.to(device=device, dtype=old.dtype)
            made[id(t)] = (nn.Parameter(data, requires_grad=old.requires_grad)
                           if isinstance(old, nn.Parameter) else data)
        # setattr on a registered name replaces that parameter / buffer in place
        setattr(mod, attr, made[id(t)])
    return model
