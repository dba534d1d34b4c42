"""Pruning at initialisation: SNIP, GraSP, SynFlow and FORCE into bornsparse sparse layers.

``prune_at_init(model, "synflow", 1e-3, input_shape=(1, 28, 28))`` scores the dense
``nn.Linear``/``nn.Conv2d`` layers of a freshly initialised model, keeps the best
``density·N`` weights (globally, or per layer with a support distribution) and swaps each
layer for a ``SparseLinear``/``SparseConv2d`` (``kind="sparse"``) or for the S of a
``DCTPlusSparseLinear``/``DCTPlusSparseConv2d`` (``kind="dctps"``). Kept weights keep their
initial values. The dense weights exist only because the input model is dense (the DCTpS slides'
cost table grants O(N) at initialisation for these methods); scores are one tensor per layer.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bornsparse._checks import check_fraction, check_positive_int
from bornsparse.sparsity import scores as S
from bornsparse.sparsity.distributions import (
    DEFAULT_DISTRIBUTION,
    allocate_nnz,
    support_layout,
)
from bornsparse.sparsity.swap import (
    DCTOffset,
    Selector,
    check_kind,
    dense_layout,
    dense_shape,
    dense_targets,
    support_of_weight,
    swap_in_sparse_layers,
    weight_positions,
    weight_shape,
)

METHODS = ("snip", "grasp", "synflow", "force")
DEFAULT_ROUNDS = {"synflow": 100, "force": 100}


@dataclass(frozen=True)
class LayerReport:
    name: str
    dense_shape: tuple[int, int]
    nnz: int

    @property
    def density(self) -> float:
        return self.nnz / (self.dense_shape[0] * self.dense_shape[1])


@dataclass
class PruneReport:
    """What a pruning method chose: per-layer counts and whether the layer floor intervened.

    ``floor_moved`` counts entries moved by ``min_per_layer`` in the final round (0: the method
    alone kept every layer alive); ``floor_moved_total`` sums it over all rounds.
    """

    method: str
    kind: str
    target_density: float
    rounds: int
    layers: list[LayerReport] = field(default_factory=list)
    floor_moved: int = 0
    floor_moved_total: int = 0
    _model: weakref.ref | None = field(default=None, repr=False, compare=False)

    @property
    def nnz(self) -> int:
        return sum(l.nnz for l in self.layers)

    @property
    def total(self) -> int:
        return sum(l.dense_shape[0] * l.dense_shape[1] for l in self.layers)

    @property
    def density(self) -> float:
        return self.nnz / self.total

    def __iter__(self):
        # prune_at_init returned (model, report) until it followed sparsify's convention of
        # returning the report alone; unpacking the report keeps that code working for one
        # release
        warnings.warn(
            "prune_at_init now returns the report alone (the model is converted in place, as "
            "with sparsify); unpacking `model, report = prune_at_init(...)` is deprecated",
            DeprecationWarning, stacklevel=2,
        )
        model = self._model() if self._model is not None else None
        return iter((model, self))

    def table(self) -> str:
        """Markdown table of the per-layer counts."""
        rows = ["| layer | dense shape | nnz | density |", "|---|---|---:|---:|"]
        for l in self.layers:
            rows.append(f"| {l.name} | {l.dense_shape[0]}×{l.dense_shape[1]} | {l.nnz} "
                        f"| {l.density:.2e} |")
        rows.append(f"| total | {self.total} | {self.nnz} | {self.density:.2e} |")
        return "\n".join(rows)


def _weight_shapes(targets) -> list[tuple[int, ...]]:
    return [weight_shape(mod) for _, mod in targets]


def _select_per_layer(scores, counts, per_row: bool, targets) -> list[torch.Tensor]:
    """S.select_per_layer with rows meaning output rows for every layer (a Conv1D's weight,
    and so its scores, are stored transposed); positions in each weight's own layout."""
    if not per_row:
        return S.select_per_layer(scores, counts)
    mods = [mod for _, mod in targets]
    rows = [dense_layout(mod, sc) for mod, sc in zip(mods, scores, strict=True)]
    return [weight_positions(mod, sel) for mod, sel in zip(
        mods, S.select_per_layer(rows, counts, per_row=True), strict=True)]


def _masks_from(selected: list[torch.Tensor], targets) -> list[torch.Tensor]:
    masks = []
    for sel, (_, mod) in zip(selected, targets, strict=True):
        m = torch.zeros(mod.weight.numel(), dtype=torch.bool, device=mod.weight.device)
        m[sel.to(m.device)] = True
        masks.append(m.view_as(mod.weight))
    return masks


def prune_at_init(
    model: nn.Module,
    method: str,
    density: float,
    *,
    data: object = None,
    loss_fn: S.LossFn | None = None,
    kind: str = "sparse",
    distribution: str | None = DEFAULT_DISTRIBUTION["prune_at_init"],
    rounds: int | None = None,
    input_shape: Sequence[int] | None = None,
    min_per_layer: int = 1,
    include: Selector = None,
    exclude: Selector = None,
) -> PruneReport:
    """Prune a dense model at initialisation into bornsparse sparse layers, in place.

    Args:
        model: a freshly initialised model with dense ``nn.Linear``/``nn.Conv2d`` layers.
        method: ``"snip"``, ``"grasp"``, ``"synflow"`` (data-free, iterative) or ``"force"``
            (progressive, iterative, weights may come back).
        density: fraction of the prunable weights kept, in (0, 1].
        data: ``(x, y)`` or an iterable of such batches (a DataLoader). SNIP and GraSP use
            every batch once; FORCE uses one batch per round, cycling through ``data``;
            SynFlow only reads the input shape from it.
        loss_fn: ``loss_fn(logits, y)``, default cross-entropy.
        kind: ``"sparse"`` (SparseLinear/SparseConv2d) or ``"dctps"``: score and keep the S of
            DCT-plus-sparse layers; the scoring net is y = α·T(x) + S x + b with S the dense
            initial weight (SNIP, GraSP, FORCE). SynFlow scores S without the offset, whose
            signed entries break its positive linearised network.
        distribution: None selects globally by score (the methods' own rule); a name of
            ``bornsparse.sparsity.DISTRIBUTIONS`` fixes the per-layer counts and selects by
            score within each layer.
        rounds: iterations of SynFlow/FORCE (default 100), kept fraction decaying
            exponentially to ``density``. Ignored by SNIP and GraSP.
        input_shape: input shape without the batch dimension, for SynFlow without ``data``.
        min_per_layer: floor on the weights kept per layer in global selection (default 1,
            so no layer collapses); the report says how many entries the floor moved.
        include, exclude: a :data:`~bornsparse.sparsity.swap.Selector` (glob pattern(s) on
            qualified layer names, or a callable ``(name, module) -> bool``), as in
            ``sparsify``; a layer shared under several names is chosen when any passes.

    Returns:
        a :class:`PruneReport` with the per-layer counts; ``model`` itself now holds the
        sparse layers (as with ``sparsify``).
    """
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    method = method.lower()
    density = check_fraction("density", density)
    kind = check_kind(kind)
    min_per_layer = check_positive_int("min_per_layer", min_per_layer)
    if method in DEFAULT_ROUNDS:
        rounds = DEFAULT_ROUNDS[method] if rounds is None else check_positive_int("rounds", rounds)
    else:
        rounds = 1
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    targets = dense_targets(model, include=include, exclude=exclude)

    if method != "synflow" and data is None:
        raise ValueError(f"method {method!r} needs data=(x, y) or an iterable of batches")
    if method == "synflow":
        if input_shape is None:
            if data is None:
                raise ValueError("synflow needs input_shape or data to know the input shape")
            x0, _ = next(iter(S.as_batches(data)))
            input_shape = tuple(x0.shape[1:])
        if isinstance(input_shape, int):
            input_shape = (input_shape,)
        if not isinstance(input_shape, Sequence) or not input_shape:
            raise TypeError(f"input_shape must be a sequence of ints, got {input_shape!r}")
        input_shape = tuple(
            check_positive_int(f"input_shape[{i}]", d) for i, d in enumerate(input_shape)
        )
    elif data is not None:
        S.as_batches(data)  # validates early

    total_sizes = [mod.weight.numel() for _, mod in targets]
    per_row = False
    if distribution is None:
        counts = None
        keep = max(1, round(density * sum(total_sizes)))
    else:
        counts = allocate_nnz(_weight_shapes(targets), density, distribution)
        per_row = support_layout(distribution) == "per_row"
        keep = sum(counts)

    offsets = DCTOffset(targets) if (kind == "dctps" and method != "synflow") else None
    report = PruneReport(method=method, kind=kind, target_density=density, rounds=rounds)
    try:
        if method in ("snip", "grasp"):
            fn = S.snip_scores if method == "snip" else S.grasp_scores
            sc = fn(model, targets, data, loss_fn)
            if counts is None:
                selected, moved = S.select_global(sc, keep, min_per_layer=min_per_layer)
            else:
                selected, moved = _select_per_layer(sc, counts, per_row, targets), 0
            report.floor_moved = report.floor_moved_total = moved
        else:
            if counts is None:
                schedule = [[k] for k in S.exponential_schedule(sum(total_sizes), keep, rounds)]
            else:
                per = [S.exponential_schedule(n, c, rounds) for n, c in zip(total_sizes, counts,
                                                                         strict=True)]
                schedule = [list(ks) for ks in zip(*per, strict=True)]
            masks = [torch.ones_like(mod.weight, dtype=torch.bool) for _, mod in targets]
            batches = S.cycle_batches(S.as_batches(data)) if method == "force" else None
            for ks in schedule:
                if method == "synflow":
                    sc = S.synflow_round(model, targets, masks, input_shape)
                    # pruning is permanent in SynFlow: a pruned weight never comes back
                    sc = [s.masked_fill(~m, -torch.inf) for s, m in zip(sc, masks, strict=True)]
                else:
                    sc = S.force_round(model, targets, masks, next(batches), loss_fn)
                if counts is None:
                    selected, moved = S.select_global(sc, ks[0], min_per_layer=min_per_layer)
                else:
                    selected, moved = _select_per_layer(sc, ks, per_row, targets), 0
                report.floor_moved = moved
                report.floor_moved_total += moved
                masks = _masks_from(selected, targets)
    finally:
        if offsets is not None:
            offsets.remove()

    supports = {}
    for (name, mod), sel in zip(targets, selected, strict=True):
        rows, cols = dense_shape(mod)
        supports[name] = support_of_weight(mod, sel)[0].to(mod.weight.device)
        report.layers.append(LayerReport(name, (rows, cols), int(sel.numel())))
    swap_in_sparse_layers(model, supports, kind=kind)
    report._model = weakref.ref(model)
    return report
