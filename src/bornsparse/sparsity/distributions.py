"""How a global budget of trainable weights is split across layers (the DCTpS slides' "EPL" etc.).

``allocate_nnz(shapes, density, distribution)`` returns exact integer counts, one per
layer, summing to ``B = round(density · Σ numel)``:

* ``"uniform"``: every layer at the same density, count_i ≈ density·numel_i (largest
  remainder rounding so the total is exact).
* ``"epl"`` (equal per layer, the DCTpS paper's default): B // L per layer, the remainder
  to the last layer. A layer too small for its share is filled (density 1) and the excess
  is shared equally among the others, again with the remainder to the last.
* ``"erk"`` (Erdős–Rényi-kernel, RigL): density_i ∝ Σ dims / Π dims; layers that would pass
  density 1 are filled and their excess redistributed, as in RigL's reference code.
* ``"epf"`` (equal per filter, N:M-like): EPL counts laid out with the same number of
  entries in every output row / filter. The layout is a property of the *support*, so
  :func:`support_layout` says which ``support=`` argument the layers take ("per_row").

A budget below one weight per layer, or a layer that would get zero, is an error.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from bornsparse._checks import check_fraction

DISTRIBUTIONS = ("uniform", "epl", "erk", "epf")
# Every entry point's default, stated once (their signatures read it; docs/design.md
# "Defaults" gives the table): sparsify uses the DCTpS slides' equal-per-layer split, the
# dynamic methods (RigL, SET) the RigL paper's ERK, and pruning at init (None) the pruning
# papers' own rule, selecting globally by score.
DEFAULT_DISTRIBUTION: dict[str, str | None] = {
    "sparsify": "epl", "dynamic": "erk", "prune_at_init": None,
}
_LAYOUT = {"uniform": "random", "epl": "random", "erk": "random", "epf": "per_row"}


def support_layout(distribution: str) -> str:
    """The layers' ``support`` argument for ``distribution``: "random" or "per_row"."""
    _check_distribution(distribution)
    return _LAYOUT[distribution]


def _check_distribution(distribution: object) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return distribution


def _check_shapes(shapes: object) -> list[tuple[int, ...]]:
    if isinstance(shapes, str | bytes) or not isinstance(shapes, Sequence) or not shapes:
        raise ValueError(f"shapes must be a non-empty sequence of weight shapes, got {shapes!r}")
    out = []
    for i, s in enumerate(shapes):
        s = tuple(s) if isinstance(s, Sequence) else s
        if (
            not isinstance(s, tuple)
            or len(s) < 2
            or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in s)
        ):
            raise ValueError(
                f"shapes[{i}] must be a weight shape of >= 2 positive ints, got {shapes[i]!r}"
            )
        out.append(tuple(int(d) for d in s))
    return out


def _largest_remainder(targets: list[float], caps: list[int], total: int) -> list[int]:
    """Integers within 1 of ``targets``, each <= its cap, summing exactly to ``total``."""
    counts = [min(c, math.floor(t)) for t, c in zip(targets, caps, strict=True)]
    order = sorted(range(len(targets)), key=lambda i: targets[i] - math.floor(targets[i]),
                   reverse=True)
    short = total - sum(counts)
    while short > 0:
        moved = False
        for i in order:
            if short == 0:
                break
            if counts[i] < caps[i]:
                counts[i] += 1
                short -= 1
                moved = True
        if not moved:  # cannot happen when total <= Σ caps; guards an infinite loop
            raise ValueError(f"cannot place {total} weights in layers of sizes {caps}")
    return counts


def _equal_per_layer(sizes: list[int], budget: int) -> list[int]:
    counts = [0] * len(sizes)
    open_layers = list(range(len(sizes)))
    left = budget
    # water-filling: layers smaller than the equal share are filled and leave the pool
    while open_layers:
        share = left // len(open_layers)
        full = [i for i in open_layers if sizes[i] <= share]
        if not full:
            break
        for i in full:
            counts[i] = sizes[i]
            left -= sizes[i]
        open_layers = [i for i in open_layers if i not in set(full)]
    if open_layers:
        share = left // len(open_layers)
        for i in open_layers:
            counts[i] = share
        left -= share * len(open_layers)
        for i in reversed(open_layers):  # the remainder to the last layer(s) with room
            add = min(left, sizes[i] - counts[i])
            counts[i] += add
            left -= add
    return counts


def _erdos_renyi_kernel(shapes: list[tuple[int, ...]], sizes: list[int], budget: int):
    score = [sum(s) / math.prod(s) for s in shapes]
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        left = budget - sum(sizes[i] for i in dense)
        eps = left / sum(score[i] * sizes[i] for i in free)
        over = [i for i in free if eps * score[i] > 1.0]
        if not over:
            break
        # fill the layer that overflows most first, as RigL does, then re-solve for eps
        dense.add(max(over, key=lambda i: score[i]))
    targets = [float(sizes[i]) if i in dense else eps * score[i] * sizes[i]
               for i in range(len(shapes))]
    return _largest_remainder(targets, sizes, budget)


def allocate_nnz(
    shapes: Sequence[Sequence[int]], density: float, distribution: str = "epl"
) -> list[int]:
    """Exact per-layer nonzero counts for the dense weight ``shapes`` at global ``density``.

    ``shapes``: each layer's dense weight shape, e.g. (out, in) or (out, in/g, kh, kw).
    Returns one int per layer, each in [1, numel], summing to round(density·Σ numel).
    """
    shapes = _check_shapes(shapes)
    d = check_fraction("density", density)
    _check_distribution(distribution)
    sizes = [math.prod(s) for s in shapes]
    n_total = sum(sizes)
    budget = math.floor(d * n_total + 0.5)
    if budget < len(shapes):
        raise ValueError(
            f"density={density!r} gives a budget of {budget} weights for {len(shapes)} layers "
            f"({n_total} dense weights): below one per layer; use density >= "
            f"{len(shapes) / n_total:.3g}"
        )
    if distribution == "uniform":
        counts = _largest_remainder([d * n for n in sizes], sizes, budget)
    elif distribution in ("epl", "epf"):
        counts = _equal_per_layer(sizes, budget)
    else:
        counts = _erdos_renyi_kernel(shapes, sizes, budget)
    for i, c in enumerate(counts):
        if c < 1:
            raise ValueError(
                f"distribution={distribution!r} at density={density!r} gives layer {i} "
                f"(shape {shapes[i]}) zero weights; raise density or choose 'epl'"
            )
    return counts
