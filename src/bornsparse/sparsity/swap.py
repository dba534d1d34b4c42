"""Find prunable layers, turn index sets into bornsparse.nn sparse layers, swap them in place.

This is the one place in ``sparsity/`` that knows how a dense ``nn.Linear``/``nn.Conv2d`` maps
onto the sparse layers of ``bornsparse.nn``. A support is always described on the layer's
*dense shape* ``(rows, cols)``: ``rows`` = out features / out channels, ``cols`` = in features,
or the flattened ``(in_channels // groups, kh, kw)`` of a convolution, which is how the sparse
layers index their ``values``.

NOTE: ``bornsparse.models.sparsify`` performs a similar swap with random supports; models/ may
not be imported from here (data flows ops → nn → sparsity → models), so the walking and
swapping live here and sparsify can be folded onto :func:`swap_in_sparse_layers`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

LAYER_KINDS = ("sparse", "dctps")


def _sparse_classes() -> dict[str, tuple[type, type]]:
    """kind -> (linear class, conv class); imported late so this module loads without nn."""
    from bornsparse.nn.dct_plus_sparse import DCTPlusSparseLinear
    from bornsparse.nn.sparse_conv import DCTPlusSparseConv2d, SparseConv2d
    from bornsparse.nn.sparse_linear import SparseLinear

    return {
        "sparse": (SparseLinear, SparseConv2d),
        "dctps": (DCTPlusSparseLinear, DCTPlusSparseConv2d),
    }


def sparse_layer_types() -> tuple[type, ...]:
    """Every sparse layer class whose support sparsity/ can change."""
    return tuple(c for pair in _sparse_classes().values() for c in pair)


def check_kind(kind: object) -> str:
    if kind not in LAYER_KINDS:
        raise ValueError(f"kind must be one of {LAYER_KINDS}, got {kind!r}")
    return str(kind)


def _matches(name: str, patterns: Sequence[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def dense_targets(
    model: nn.Module,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
) -> list[tuple[str, nn.Module]]:
    """Dense ``nn.Linear``/``nn.Conv2d`` submodules by qualified name, in ``named_modules`` order.

    ``include``/``exclude`` are glob patterns on the qualified name (``"features.*"``); with
    ``include`` given only matching layers are kept. Raises ValueError when nothing is left.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = []
    for name, mod in model.named_modules():
        # exact types: subclasses of nn.Linear may carry their own weight semantics
        if type(mod) not in (nn.Linear, nn.Conv2d):
            continue
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude):
            continue
        found.append((name, mod))
    if not found:
        raise ValueError(
            f"model has no prunable layers (nn.Linear or nn.Conv2d) with include={include!r}, "
            f"exclude={exclude!r}"
        )
    return found


def sparse_targets(
    model: nn.Module,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
) -> list[tuple[str, nn.Module]]:
    """bornsparse sparse layers (plain and DCT-plus-sparse) by qualified name; may be empty."""
    types = sparse_layer_types()
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, types):
            continue
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude):
            continue
        out.append((name, mod))
    return out


def dense_shape(module: nn.Module) -> tuple[int, int]:
    """(rows, cols) of the matrix a support indexes, for dense and sparse layers alike."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Conv2d):
        w = module.weight
        return w.shape[0], w.shape[1] * w.shape[2] * w.shape[3]
    if hasattr(module, "dense_shape"):
        return tuple(module.dense_shape)
    raise TypeError(f"no dense shape for {type(module).__name__}")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The dense weight of an nn.Linear/nn.Conv2d viewed as (rows, cols) (a view, no copy)."""
    return module.weight.reshape(dense_shape(module))


def flat_to_indices(flat: torch.Tensor, cols: int) -> torch.Tensor:
    """Sorted flat positions ``row * cols + col`` -> int64 indices of shape (2, k), row-major."""
    flat = torch.sort(flat.to(torch.int64)).values
    return torch.stack([flat // cols, flat % cols])


def indices_to_flat(indices: torch.Tensor, cols: int) -> torch.Tensor:
    """(2, k) indices -> flat positions ``row * cols + col`` (int64, shape (k,))."""
    return indices[0].to(torch.int64) * cols + indices[1].to(torch.int64)


def make_sparse_layer(
    module: nn.Module,
    indices: torch.Tensor,
    *,
    kind: str = "sparse",
    values: torch.Tensor | None = None,
    bias: bool = True,
    layer_init: bool = False,
    seed: int | None = None,
) -> nn.Module:
    """A sparse layer with the shape, bias and dtype of the dense ``module`` on ``indices``.

    ``values`` (shape (k,)) default to the dense weight at ``indices`` — the pruning-at-init
    convention that the kept weights are the initial ones. The bias Parameter is reused, so an
    optimizer built on the dense model still holds it (``bias=False``: a layer without one).
    ``layer_init=True`` ignores the dense weight and lets the sparse layer initialise its
    values its own way (sparse fan-in Kaiming for S, zeros for the S of DCTpS) from ``seed``.
    """
    kind = check_kind(kind)
    lin_cls, conv_cls = _sparse_classes()[kind]
    w = module.weight
    if values is None and not layer_init:
        values = weight_matrix(module).detach()[indices[0], indices[1]]
    has_bias = bias and module.bias is not None
    common = dict(bias=has_bias, device=w.device, dtype=w.dtype, seed=seed)
    if isinstance(module, nn.Linear):
        new = lin_cls.from_indices(
            module.in_features, module.out_features, indices, _copy(values), **common
        )
    elif isinstance(module, nn.Conv2d):
        new = conv_cls.from_indices(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            indices,
            _copy(values),
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            padding_mode=module.padding_mode,
            **common,
        )
    else:
        raise TypeError(f"cannot make a sparse layer from {type(module).__name__}")
    if has_bias:
        # the same Parameter object, so an optimizer built on the dense model still holds it
        new.bias = module.bias
    new.train(module.training)
    return new


def _copy(values: torch.Tensor | None) -> torch.Tensor | None:
    return None if values is None else values.detach().clone()


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` (``"a.0.b"``) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap_in_sparse_layers(
    model: nn.Module,
    supports: dict[str, torch.Tensor],
    *,
    kind: str = "sparse",
    values: dict[str, torch.Tensor] | None = None,
) -> dict[str, nn.Module]:
    """Replace each dense layer named in ``supports`` (name -> (2, k) indices) by a sparse layer.

    Layers are swapped one at a time, so at most one dense weight is copied at any moment.
    Returns name -> new layer.
    """
    kind = check_kind(kind)
    new_layers = {}
    for name, idx in supports.items():
        old = model.get_submodule(name)
        v = None if values is None else values.get(name)
        new = make_sparse_layer(old, idx, kind=kind, values=v)
        set_submodule(model, name, new)
        new_layers[name] = new
    return new_layers


def rebind_optimizer(
    optimizer: torch.optim.Optimizer,
    swaps: dict[nn.Parameter, tuple[nn.Parameter, torch.Tensor | None]],
) -> None:
    """Point ``optimizer`` at new sparse ``values`` instead of the dense weights they replace.

    ``swaps``: dense weight -> (new values Parameter, flat positions of the support or None).
    With positions, per-element state shaped like the dense weight (Adam's moments, SGD's
    momentum) is gathered at the support, so training resumes where it was; scalar state
    (Adam's step) is kept. Without positions the state is dropped.
    """
    for group in optimizer.param_groups:
        group["params"] = [swaps[p][0] if p in swaps else p for p in group["params"]]
    for old, (new, flat) in swaps.items():
        st = optimizer.state.pop(old, None)
        if st is None or flat is None:
            continue
        optimizer.state[new] = {
            key: v.reshape(-1)[flat.to(v.device)].clone()
            if torch.is_tensor(v) and v.shape == old.shape else v
            for key, v in st.items()
        }


class DCTOffset:
    """Adds a DCT-plus-sparse layer's fixed offset ``α·T(x)`` to a dense layer's output.

    Used while scoring or IMP-training the S of DCTpS layers on a dense stand-in: the dense
    ``weight`` plays S and the hook adds the transform exactly as the target layer computes it
    (a layer of the target class with zero values and no bias), so y = α·T(x) + S x + b.
    α stays at its initial value during scoring. ``remove()`` detaches every hook.
    """

    def __init__(self, targets: Sequence[tuple[str, nn.Module]]) -> None:
        self._handles = []
        self.offsets: dict[str, nn.Module] = {}
        for name, mod in targets:
            idx = torch.zeros(2, 1, dtype=torch.int64)
            zero = torch.zeros(1, dtype=mod.weight.dtype, device=mod.weight.device)
            probe = make_sparse_layer(mod, idx, kind="dctps", values=zero, bias=False)
            for p in probe.parameters():
                p.requires_grad_(False)
            self.offsets[name] = probe
            self._handles.append(mod.register_forward_hook(self._hook(probe)))

    @staticmethod
    def _hook(probe: nn.Module):
        def hook(module, args, output):
            return output + probe(args[0])

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
