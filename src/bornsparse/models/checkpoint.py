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
from pathlib import Path

import torch
from torch import nn

# bornsparse.nn imports its layers lazily: this pulls in neither the layers nor numba
from bornsparse.nn.description import (
    DTYPES,
    Described,
    Stored,
    dtype_name,
    layer_name,
    registered_layers,
)
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

_INDEX_LIMIT = 2**31  # int32 holds every index below this


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded into the given model; the message says why."""


# ----------------------------------------------------------------------------- layers
# What a layer is, what it stores and how it is rebuilt is the layer's own description
# (bornsparse.nn.description); this module only reads it.


def _stored(cls: str, args: dict) -> dict[str, Stored]:
    """The tensors a ``cls`` layer with ``args`` stores; CheckpointError for arguments no
    layer can have."""
    try:
        return registered_layers()[cls].stored(args)
    except ValueError as err:
        raise CheckpointError(str(err)) from err


# ----------------------------------------------------------------------------- save


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (state_dict plus a description of its bornsparse layers) to ``path``.

    The file is a safetensors file: tensors are the model's ``state_dict`` with each
    bornsparse layer's ``indices``/``perms`` stored as int32 where they fit; metadata
    describes every bornsparse layer (name, class, constructor arguments) so that
    :func:`load` needs no seed, density or distribution. Written to a temporary file in the
    same folder and renamed over ``path`` (atomic: a reader sees the old file or the new one).

    Tensors reachable under several names (a shared layer, tied weights) are stored once.
    A layer is described by its own :meth:`~bornsparse.nn.description.Described.describe`
    (a user's subclass of a bornsparse layer too, under ``module.QualName``: its module
    must be imported before :func:`load`). Raises TypeError for a model that is not an
    nn.Module, holds meta-device tensors, or is itself a bornsparse layer (wrap it:
    ``nn.Sequential(layer)``, as :func:`load` must be able to replace it in a parent).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from safetensors.torch import save as st_save

    layers: dict[int, tuple[list[str], nn.Module]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, Described):
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
        cls = layer_name(type(layer))
        args = layer.describe()
        expected = type(layer).stored(args)
        own = set(layer.state_dict(keep_vars=True))
        if own != set(expected):
            raise TypeError(
                f"{cls} at {names[0]!r} has state_dict entries {sorted(own)}, but checkpoint "
                f"format {FORMAT_VERSION} stores {sorted(expected)} for it"
            )
        described.append({"names": names, "class": cls, "args": args})
        index_keys.update(f"{n}.{k}" for n in names for k, st in expected.items()
                          if st.role != "float")

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
        _check_args(where, entry["class"], entry["args"])
    for a in seen:
        for b in seen:
            if b.startswith(a + "."):
                raise CheckpointError(
                    f"metadata field 'layers': layer {b!r} lies inside layer {a!r}"
                )


def _check_args(where: str, cls: object, args: object) -> None:
    """A layer entry's class is known and its arguments are the fields that class
    describes, each valid and holding the format's conventions; files written before a
    field existed get the field's ``before`` value."""
    layers = registered_layers()
    if cls not in layers:
        raise CheckpointError(
            f"metadata field {where}.class: unknown layer class {cls!r}; known: "
            f"{sorted(layers)} (a user's layer class must be imported before load)"
        )
    fields = layers[cls].fields()
    if isinstance(args, dict):
        for key, field in fields.items():
            if key not in args and field.before is not None:
                args[key] = field.before
    if not isinstance(args, dict) or set(args) != set(fields):
        got = sorted(args) if isinstance(args, dict) else args
        raise CheckpointError(
            f"metadata field {where}.args of a {cls} must have keys {sorted(fields)}, got "
            f"{got!r}"
        )
    for key, field in fields.items():
        if not field.check(args[key]):
            raise CheckpointError(
                f"metadata field {where}.args.{key} of a {cls} is invalid: {args[key]!r}"
            )
        if field.constant is not None and args[key] != field.constant:
            raise CheckpointError(
                f"metadata field {where}.args.{key} is {args[key]!r}; this bornsparse "
                f"computes {field.constant!r}"
            )


def _prefixed(key: str, prefixes: set[str]) -> str | None:
    """The prefix among ``prefixes`` that ``key`` lies under ('a' for 'a.values'), if any."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        p = ".".join(parts[:i])
        if p in prefixes:
            return p
    return None


def _check_tensor(key: str, t: torch.Tensor, st: Stored, dtype: torch.dtype | None) -> None:
    """Shape and dtype of a layer's stored tensor, then its content through the ops' own
    validators (a support, permutations)."""
    if tuple(t.shape) != st.shape:
        raise CheckpointError(
            f"tensor {key!r} must have shape {st.shape}, got {tuple(t.shape)}")
    if st.role == "float":
        if dtype is None and not t.dtype.is_floating_point:
            raise CheckpointError(f"tensor {key!r} must be floating, got {t.dtype}")
        if dtype is not None and t.dtype != dtype:
            raise CheckpointError(
                f"tensor {key!r} must have the layer's dtype {dtype_name(dtype)}, got "
                f"{dtype_name(t.dtype)}"
            )
        return
    if t.dtype not in (torch.int32, torch.int64):
        raise CheckpointError(f"tensor {key!r} must be int32 or int64, got {t.dtype}")
    try:
        if st.role == "support":
            from bornsparse.ops.sparse_product import check_indices

            check_indices(t, st.matrix)
        else:
            from bornsparse.ops.permuted.operands import check_permutations

            check_permutations(t.to(torch.int64))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"tensor {key!r}: {err}") from err


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
    klass = registered_layers()[cls]
    geo = _geometry(mod)
    kind = "linear" if "in_features" in geo else "conv" if "in_channels" in geo else None
    if kind is None:
        return  # a placeholder (nn.Identity, ...): nothing to disagree with
    if kind != klass.stands_for:
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
    if klass.has_support() and (isinstance(mod, nn.Linear | nn.Conv2d)
                                or is_dense_target(mod) or hasattr(mod, "nnz")):
        has_bias = getattr(mod, "bias", None) is not None
        if has_bias != args["bias"]:
            raise CheckpointError(
                f"layer {name!r}: the file's {cls} has bias={args['bias']}, the model's "
                f"{type(mod).__name__} has bias={has_bias}"
            )


def _build(cls: str, args: dict, t: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A new layer through its public constructor, holding the file's tensors."""
    try:
        return registered_layers()[cls].rebuild(args, t, device)
    except (TypeError, ValueError) as err:  # arguments its constructor refuses
        raise CheckpointError(f"cannot rebuild the file's {cls}: {err}") from err


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

    plan, claimed, layer_of = _new_layers(model, doc, tensors, device)
    rest_model, rest_file = _check_rest(model, doc, tensors, claimed, layer_of)
    _put_in(model, plan, rest_model, rest_file, device)
    return model


def _new_layers(model: nn.Module, doc: dict, tensors: dict[str, torch.Tensor],
                device: torch.device):
    """Every described layer: where it goes, that it fits, its tensors, the new layer.
    Returns the plan (names, new layer), the tensor keys the layers claim, and every
    layer name's class."""
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
        expected = _stored(cls, args)
        for n in names:
            for k in expected:
                key = f"{n}.{k}"
                if key not in tensors:
                    raise CheckpointError(
                        f"tensor {key!r} of layer {n!r} ({cls}) is missing from the file"
                    )
                claimed.add(key)
        # a layer without a dtype field (a user's) takes its tensors' floating dtypes
        dtype = DTYPES.get(args.get("dtype"))
        own: dict[str, torch.Tensor] = {}
        for k, st in expected.items():
            key = f"{names[0]}.{k}"
            _check_tensor(key, tensors[key], st, dtype)
            own[k] = tensors[key]
        new = _build(cls, args, own, device)
        new.train(olds[0].training)
        plan.append((names, new))
    return plan, claimed, layer_of


def _check_rest(model: nn.Module, doc: dict, tensors: dict[str, torch.Tensor],
                claimed: set[str], layer_of: dict[str, str]):
    """The rest of the file is exactly the model's other state_dict entries, with their
    shapes; returns (the model's entries, the file's), key -> tensor."""
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
            stored = sorted(_stored(
                cls, next(e["args"] for e in doc["layers"] if owner in e["names"])))
            if registered_layers()[cls].has_support() and key == f"{owner}.weight":
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
                f"tensor {key!r} has dtype {dtype_name(t.dtype)} in the file, the model's "
                f"is {dtype_name(target.dtype)}"
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
    return rest_model, rest_file


def _put_in(model: nn.Module, plan, rest_model: dict, rest_file: dict,
            device: torch.device) -> None:
    """Only now touch the model: nothing here can fail on a validated file."""
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
