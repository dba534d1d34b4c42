"""sparsify(model): swap the nn.Linear / nn.Conv2d layers of any torch model for sparse ones.

The budget density·(Σ dense weights of the chosen layers) is split across them by
bornsparse.sparsity.allocate_nnz; each layer is rebuilt on a fresh random support (the
DCTpS recipe: no dense training first), or for the structured kinds as a permuted operator
of about its share of weights, and keeps the original layer's bias Parameter, device and
dtype. Finding, filtering, building and swapping the layers is
bornsparse.sparsity.swap's (shared with pruning at init, IMP and RigL/SET); this module adds
the budget, the seeds and the report. The swap happens in place; the returned
:class:`SparsifyReport` lists what was stored before and after.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bornsparse._checks import check_positive_int
from bornsparse._random import check_seed
from bornsparse.sparsity.distributions import (
    DEFAULT_DISTRIBUTION,
    allocate_nnz,
    support_layout,
)
from bornsparse.sparsity.swap import (
    LAYER_KINDS,
    STRUCTURED_KINDS,
    Selector,
    default_device,
    dense_targets,
    has_meta,
    is_dense_linear,
    materialize_meta,
    permuted_over_budget,
    swap_in_sparse_layers,
    swap_in_structured_layers,
    tied_targets,
    weight_shape,
)

# "sparse", "dctps" (a support per layer, shared with sparsity/), "permuted",
# "permuted_offset" (nn.Linear only)
KINDS = LAYER_KINDS + STRUCTURED_KINDS
# the keyword arguments of PermutedBlockDiagonal.from_dense that fit= may set (depth and
# seed are sparsify's)
FIT_OPTIONS = ("steps", "lr", "batch_size", "penalty", "progress")


@dataclass(frozen=True)
class LayerReport:
    name: str
    replaced: str  # class name of the original layer
    now: str  # class name of the sparse layer
    shape: tuple[int, ...]  # dense weight shape
    nnz: int  # trainable weights of the new layer, bias and α not counted
    stored_bytes: int  # the new layer's state_dict
    dense_bytes: int  # the original layer's state_dict
    detail: str = ""  # structured kinds: what the layer got ("depth 12", fit error, ...)

    @property
    def numel(self) -> int:
        """Weights of the dense layer this one replaced."""
        return math.prod(self.shape)

    @property
    def density(self) -> float:
        return self.nnz / self.numel


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _layer_total(attr: str) -> property:
    """A read-only property: the sum of the LayerReport attribute ``attr`` over ``layers``."""
    return property(lambda self: sum(getattr(r, attr) for r in self.layers))


@dataclass
class SparsifyReport:
    """Per-layer rows plus whole-model sizes before (dense) and after the swap."""

    kind: str
    distribution: str
    density: float
    layers: list[LayerReport] = field(default_factory=list)
    dense_model_bytes: int = 0
    sparse_model_bytes: int = 0
    # selected layers the kind has no layer for (convolutions for the structured kinds)
    left_dense: list[str] = field(default_factory=list)
    # kind="permuted": selected layers left as they are because their smallest G(θ) is far
    # over their budget: name -> the reason
    over_budget: dict[str, str] = field(default_factory=dict)
    # selected layers left as they are because their weight is shared with other modules:
    # name -> the modules sharing it (GPT-2's lm_head and its token embedding)
    tied: dict[str, list[str]] = field(default_factory=dict)

    total_nnz = _layer_total("nnz")
    total_dense_weights = _layer_total("numel")
    stored_bytes = _layer_total("stored_bytes")
    dense_bytes = _layer_total("dense_bytes")

    def __str__(self) -> str:
        head = ("layer", "was", "now", "shape", "nnz", "density", "stored", "dense")
        rows = [
            (r.name, r.replaced, r.now, "×".join(map(str, r.shape)), str(r.nnz),
             f"{r.density:.3g}", _human(r.stored_bytes), _human(r.dense_bytes))
            for r in self.layers
        ]
        rows.append(("total", "", "", "", str(self.total_nnz),
                     f"{self.total_nnz / max(1, self.total_dense_weights):.3g}",
                     _human(self.stored_bytes), _human(self.dense_bytes)))
        if any(r.detail for r in self.layers):
            head = (*head, "layer got")
            details = [r.detail for r in self.layers] + [""]
            rows = [(*row, d) for row, d in zip(rows, details, strict=True)]
        widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
        lines = [f"sparsify(kind={self.kind!r}, density={self.density:g}, "
                 f"distribution={self.distribution!r})"]
        for j, row in enumerate([head, *rows]):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
            if j == 0 or j == len(rows) - 1:
                lines.append("  ".join("-" * w for w in widths))
        if self.left_dense:
            lines.append(f"left dense (kind {self.kind!r} has no layer for them): "
                         + ", ".join(self.left_dense))
        for name, why in self.over_budget.items():
            lines.append(f"left dense ({name}): {why}")
        if self.tied:
            lines.append("left dense (weight tied to another module, swapping would untie "
                         "it): " + ", ".join(f"{n} (shared with {', '.join(o)})"
                                             for n, o in self.tied.items()))
        lines.append(f"model state: {_human(self.sparse_model_bytes)} "
                     f"(dense model: {_human(self.dense_model_bytes)})")
        return "\n".join(lines)


def _state_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in module.state_dict(keep_vars=True).values():
        key = (t.device, t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t),
               t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def sparsify(
    model: nn.Module,
    *,
    kind: str = "dctps",
    density: float,
    distribution: str = DEFAULT_DISTRIBUTION["sparsify"],
    include: Selector = None,
    exclude: Selector = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    offset_depth: int | None = None,
    fit: bool | Mapping[str, Any] = False,
    method: str | None = None,
) -> SparsifyReport:
    """Replace ``model``'s nn.Linear, Conv1D and nn.Conv2d layers in place; return a report.

    ``kind``: the layer kind, "dctps" (DCTPlusSparse layers) or "sparse"
    (SparseLinear/SparseConv2d); ``method`` is its deprecated old name (in
    bornsparse.sparsity, ``method`` means how a support is chosen).
    ``density``: global fraction of the chosen layers' dense weights kept trainable, split
    by ``distribution`` (see bornsparse.sparsity.DISTRIBUTIONS; "epf" also lays out the
    entries per output row). ``include``/``exclude``: glob patterns on qualified module
    names (e.g. "features.*"), or a callable (name, module) -> bool. ``seed`` fixes every
    layer's support and values.

    Structured kinds (nn.Linear only; selected convolutions are left as they are and
    listed in ``report.left_dense``, and the budget is shared among the linear layers):
    "permuted" makes each a :class:`~bornsparse.nn.PermutedBlockDiagonal` (2×2 blocks,
    width 2·max(in, out)) whose depth · width · 2 weights come closest to its share of the
    budget (depth >= 1); a layer whose one factor alone holds more than 1.5× its share
    (a small classifier) is left as it is and listed in ``report.over_budget`` with the
    reason, so no layer is silently far over budget; ``fit=True`` (or a dict of
    ``from_dense``'s keyword arguments among :data:`FIT_OPTIONS`) fits each to the dense
    weight it replaces (:meth:`PermutedBlockDiagonal.from_dense`, a real weight needed)
    instead of drawing it, on the same permutations. "permuted_offset" makes each a
    :class:`~bornsparse.nn.PermutedOffsetSparseLinear` with its share as the nnz of S and
    an offset of ``offset_depth`` factors (default 2·⌈log2 n⌉, n = max(in, out) rounded up
    to even). The report's ``detail`` says what each layer got (depth, fit error).

    Born sparse: ``model`` may be built on the meta device (``with torch.device("meta"):``),
    so no dense weight is ever allocated; the sparse layers are built on ``device`` from the
    shapes alone (their values come from their own init either way), a meta bias is drawn
    like nn.Linear's default (U(±1/√fan_in)), and every other module still on meta
    (BatchNorm, layers left dense) gets ``to_empty(device)`` + ``reset_parameters()``
    (ValueError naming a meta module without one); with ``seed`` these draws are fixed too.
    ``device`` (default: the model's non-meta device, else the CPU) is where the swapped-in
    layers and the materialised modules live. For an already dense model, results for a seed
    are the same as without meta support.

    Hugging Face models: transformers' ``Conv1D`` (GPT-2's attention and MLP projections,
    a linear layer storing its weight transposed) is swapped wherever nn.Linear is. A layer
    whose weight is shared with another module (an output layer tied to the token
    embedding) is never swapped, which would untie it: it is listed in ``report.tied``.

    NOTE: only exact nn.Linear / Conv1D / nn.Conv2d instances are swapped, not subclasses
    (e.g. nn.MultiheadAttention's out_projection reads its .weight directly). A layer
    reachable under several names (one module shared) is replaced everywhere by one sparse
    layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method is not None:
        warnings.warn("sparsify(method=...) is deprecated: the layer kind is kind=...",
                      DeprecationWarning, stacklevel=2)
        kind = method
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    support = support_layout(distribution)
    check_seed(seed)
    fit_options = _check_fit(fit, kind)
    if offset_depth is not None:
        if kind != "permuted_offset":
            raise ValueError(f"offset_depth is an option of kind='permuted_offset', got "
                             f"kind={kind!r} with offset_depth={offset_depth!r}")
        offset_depth = check_positive_int("offset_depth", offset_depth)

    meta = has_meta(model)
    # a dense model keeps each layer's own device unless one is asked for
    keep_devices = device is None and not meta
    device = torch.device(default_device(model) if device is None else device)
    if device.type == "meta":
        raise ValueError(f"device must be a real device, not the meta device, got {device}")
    tied = dict(tied_targets(model, include=include, exclude=exclude))
    layers = dense_targets(model, include=include, exclude=exclude, allow_meta=meta)
    left_dense = []
    if kind in STRUCTURED_KINDS:
        left_dense = [name for name, m in layers if not is_dense_linear(m)]
        layers = [(name, m) for name, m in layers if is_dense_linear(m)]
        if not layers:
            raise ValueError(
                f"kind={kind!r} replaces nn.Linear (and Conv1D) layers only, and the "
                f"selected layers are all convolutions: {left_dense}"
            )
    dense_model_bytes = _state_bytes(model)
    counts = allocate_nnz([weight_shape(m) for _, m in layers], density, distribution)
    over_budget = {}
    if kind == "permuted":  # never far over a layer's budget: leave such a layer dense
        over_budget = {name: why for (name, m), c in zip(layers, counts, strict=True)
                       if (why := permuted_over_budget(m, c)) is not None}
        kept = [(lc, c) for lc, c in zip(layers, counts, strict=True)
                if lc[0] not in over_budget]
        if not kept:
            reasons = "; ".join(f"{n}: {w}" for n, w in over_budget.items())
            raise ValueError(
                f"kind='permuted' at density={density}: every selected layer's smallest "
                f"G(θ) is more than 1.5× its budget ({reasons}); raise the density or use "
                "kind='sparse' or 'dctps'"
            )
        layers, counts = [lc for lc, _ in kept], [c for _, c in kept]
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    seeds = torch.randint(2**62, (len(layers),), generator=gen).tolist()
    names = [name for name, _ in layers]
    if kind in STRUCTURED_KINDS:
        new = swap_in_structured_layers(
            model, dict(zip(names, counts, strict=True)), kind=kind,
            seeds=dict(zip(names, seeds, strict=True)),
            device=None if keep_devices else device, offset_depth=offset_depth,
            fit=fit_options,
        )
    else:
        new = swap_in_sparse_layers(
            model, dict(zip(names, counts, strict=True)), kind=kind, support=support,
            seeds=dict(zip(names, seeds, strict=True)),
            device=None if keep_devices else device,
        )
    if meta:
        # drawn after the layer seeds, so the dense path's stream is untouched
        rest_seed = int(torch.randint(2**62, (), generator=gen))
        materialize_meta(model, device, seed=rest_seed if seed is not None else None)
    report = SparsifyReport(
        kind=kind, distribution=distribution, density=float(density),
        dense_model_bytes=dense_model_bytes, left_dense=left_dense, tied=tied,
        over_budget=over_budget,
    )
    for (name, old), budget in zip(layers, counts, strict=True):
        report.layers.append(LayerReport(
            name=name, replaced=type(old).__name__, now=type(new[name]).__name__,
            shape=weight_shape(old), nnz=_trainable_weights(new[name]),
            stored_bytes=_state_bytes(new[name]), dense_bytes=_state_bytes(old),
            detail=_detail(new[name], budget) if kind in STRUCTURED_KINDS else "",
        ))
    report.sparse_model_bytes = _state_bytes(model)
    return report


def _check_fit(fit: object, kind: str) -> dict[str, Any] | None:
    """``fit`` as from_dense's keyword arguments, or None for no fit."""
    if fit is False:
        return None
    if kind != "permuted":
        raise ValueError(f"fit is an option of kind='permuted', got kind={kind!r} with "
                         f"fit={fit!r}")
    if fit is True:
        return {}
    if not isinstance(fit, Mapping) or not set(fit) <= set(FIT_OPTIONS):
        raise ValueError(
            f"fit must be a bool or a dict with keys among {FIT_OPTIONS}, got {fit!r}"
        )
    return dict(fit)


def _trainable_weights(layer: nn.Module) -> int:
    """The weights a layer trains, not counting bias and α: the sparse layers' nnz, the
    permuted operator's blocks."""
    return layer.nnz if hasattr(layer, "nnz") else layer.weight.numel()


def _detail(layer: nn.Module, budget: int) -> str:
    if hasattr(layer, "offset_depth"):
        return f"S nnz {layer.nnz}, offset depth {layer.offset_depth} × width {layer.offset_width}"
    text = f"depth {layer.depth} × width {layer.width} (budget {budget})"
    if hasattr(layer, "fit_error"):
        text += f", fit error {layer.fit_error:.3g}"
    return text
