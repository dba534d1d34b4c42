"""The hidden blocks compared by ``bornsparse reproduce structured``, sized to a budget.

Every method builds one n × n hidden block (``nn.Module`` mapping (B, n) to (B, n)) whose
trainable parameters come as close as its structure allows to a budget: a fraction f of the
n² dense weights, plus the n-entry bias every block has. :func:`build_block` returns the
block and what it got (rank, nblocks, depth, nnz, offset depth); :class:`BlockMLP` puts
blocks between a dense input layer and a dense classifier.

How each method meets the budget B = round(f·n²) + n (n = 512 by default):

* ``lowrank``: 2·n·r + n with rank r;
* ``monarch``: 2·n²/k + n with k blocks per factor, k a divisor of n;
* ``permuted``: G(θ) of the permuted block-diagonal paper (eq. 1), width n, k×k blocks
  (``block_size`` k, default 2), with a bias: k·n·N + n with depth N; a block size whose
  one factor already exceeds the budget by more than :data:`FIT_TOLERANCE` does not
  take part at that budget (:func:`fits_budget`);
* ``permuted_tanh``: h_θ of the same paper (eq. 3-5), width n: 3·n·N (2·n block entries and
  n biases per factor; its last bias is the block's bias);
* ``sparse``: a random support of nnz = f·n² weights, plus the bias;
* ``dctps``, ``permuted_offset_small``, ``permuted_offset``: nnz + 1 (α) + n, the offset a
  fixed DCT (the DCTpS slides) or a fixed random G₀ of depth 2 or 2·⌈log2 n⌉.

With n a power of two and f = 2⁻ʲ every count except h_θ's is met exactly; each is the
closest its structure allows (:func:`closest_size`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bornsparse._checks import check_positive_int

#: relative budget error every method stays within at the default width and budgets
#: (h_θ at the smallest budget: 3·n·2 against 2·n·2 + n, +20%; every other method is exact)
BUDGET_TOLERANCE = 0.25
#: the offset depth of ``permuted_offset_small``: each output mixes 2² = 4 inputs
SMALL_OFFSET_DEPTH = 2
#: G(θ)'s block sizes compared by default: 2 (the paper's), 4, 8, and 32 (Monarch's block
#: size at n = 1024, so k = 32 is Monarch's structure with random permutations)
BLOCK_SIZES = (2, 4, 8, 32)
#: a size choice more than this far over its budget is not run at that budget (one factor
#: of G(θ) at k = 32 is 1/16 of a 512-wide layer's weights: 8× the 1/128 budget)
FIT_TOLERANCE = 0.5


@dataclass(frozen=True)
class BlockMethod:
    """A compared hidden block: its table label and whether it takes a budget."""

    label: str
    budgeted: bool = True


METHODS: dict[str, BlockMethod] = {
    "dense": BlockMethod("dense", budgeted=False),
    "lowrank": BlockMethod("low rank"),
    "monarch": BlockMethod("Monarch"),
    "permuted": BlockMethod("G(θ) permuted block-diag"),
    "permuted_tanh": BlockMethod("h_θ permuted tanh net"),
    "sparse": BlockMethod("sparse (random support)"),
    "dctps": BlockMethod("DCTpS"),
    "permuted_offset_small": BlockMethod(f"G₀ offset + sparse, d={SMALL_OFFSET_DEPTH}"),
    "permuted_offset": BlockMethod("G₀ offset + sparse, d=2·log2 n"),
}


def budget_params(width: int, budget: float) -> int:
    """Trainable parameters a block of ``width`` gets at ``budget``: round(f·n²) + n."""
    width = check_positive_int("width", width)
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0 < budget < 1:
        raise ValueError(f"budget must be a fraction of the dense weights in (0, 1), got "
                         f"{budget!r}")
    return round(budget * width * width) + width


def closest_size(sizes: Sequence[int], count: Callable[[int], int], target: int) -> int:
    """The size whose parameter count ``count(size)`` is nearest ``target`` in ratio (ties:
    the smaller size)."""
    if not sizes:
        raise ValueError("sizes must not be empty")
    return min(sizes, key=lambda s: (abs(math.log(count(s) / target)), s))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def offset_depth(method: str, width: int) -> int:
    """The fixed G₀'s depth of a permuted-offset method: 2, or 2·⌈log2 n⌉ (the layer's
    default, every output depends on every input)."""
    from bornsparse.nn.permuted import default_depth

    return SMALL_OFFSET_DEPTH if method == "permuted_offset_small" else default_depth(width, 2)


def block_size_choice(method: str, width: int, budget: float | None, *,
                      block_size: int = 2) -> dict[str, int]:
    """What ``method`` takes to meet the budget at ``width``: {"rank"}, {"nblocks"},
    {"depth"} ({"depth", "block_size"} for G(θ)), {"nnz"} or {"nnz", "offset_depth"} ({}
    for dense). ``block_size``: G(θ)'s k (other methods take only the default)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    n = check_positive_int("width", width)
    if method == "dense":
        return {}
    if budget is None:
        raise ValueError(f"method {method!r} needs a budget, got None")
    target = budget_params(n, budget)
    weights = target - n

    def count(size: dict[str, int]) -> int:  # the parameters a candidate size gives
        return block_params(method, n, size)

    if method == "lowrank":
        return {"rank": closest_size(range(1, n + 1), lambda r: count({"rank": r}), target)}
    if method == "monarch":
        return {"nblocks": closest_size(_divisors(n), lambda k: count({"nblocks": k}), target)}
    if block_size != 2 and method != "permuted":
        raise ValueError(f"block_size is G(θ)'s (method 'permuted'), got block_size="
                         f"{block_size} for method {method!r}")
    if method == "permuted":
        k = check_positive_int("block_size", block_size)
        if k < 2 or n % k:
            raise ValueError(f"block_size must be at least 2 and divide width = {n}, got {k}")
        # depth above n/k has more parameters than a dense layer: not a budget of interest
        depth = closest_size(range(1, n // k + 1),
                             lambda d: count({"depth": d, "block_size": k}), target)
        return {"depth": depth, "block_size": k} if k != 2 else {"depth": depth}
    if method == "permuted_tanh":
        if n % 2:
            raise ValueError(f"width must be even for 2×2 blocks, got {n}")
        return {"depth": closest_size(range(1, n // 2 + 1), lambda d: count({"depth": d}),
                                      target)}
    if method == "sparse":
        return {"nnz": max(1, weights)}
    nnz = max(1, weights - 1)  # α is trainable too
    if method == "dctps":
        return {"nnz": nnz}
    return {"nnz": nnz, "offset_depth": offset_depth(method, n)}


def block_params(method: str, width: int, size: dict[str, int]) -> int:
    """Trainable parameters of one block of ``method`` with the ``size`` it chose (what
    :func:`build_block` builds, without building it)."""
    n = width
    if method == "dense":
        return n * n + n
    if method == "lowrank":
        return 2 * n * size["rank"] + n
    if method == "monarch":
        return 2 * n * n // size["nblocks"] + n
    if method == "permuted":
        return size.get("block_size", 2) * n * size["depth"] + n
    if method == "permuted_tanh":
        return 3 * n * size["depth"]
    return size["nnz"] + n + (method != "sparse")  # α is trainable


def fits_budget(method: str, width: int, budget: float | None, *,
                block_size: int = 2) -> bool:
    """Whether ``method``'s closest size is within :data:`FIT_TOLERANCE` of the budget
    (False: its smallest structure is too big, e.g. G(θ) at k = 32 for 1/128)."""
    if budget is None:
        return True
    size = block_size_choice(method, width, budget, block_size=block_size)
    got = block_params(method, width, size)
    return abs(got / budget_params(width, budget) - 1) <= FIT_TOLERANCE


def build_block(method: str, width: int, budget: float | None, *, seed: int,
                block_size: int = 2) -> tuple[nn.Module, dict[str, int]]:
    """One hidden block (B, width) -> (B, width) of ``method`` sized to ``budget``.

    Returns (block, size choice of :func:`block_size_choice`); ``seed`` fixes its start
    (and its support, permutations or offset); ``block_size``: G(θ)'s k.
    """
    from bornsparse import nn as bnn

    size = block_size_choice(method, width, budget, block_size=block_size)
    n = width
    if method == "dense":
        torch.manual_seed(seed)
        block: nn.Module = nn.Linear(n, n)
    elif method == "lowrank":
        block = bnn.LowRankLinear(n, n, size["rank"], seed=seed)
    elif method == "monarch":
        block = bnn.MonarchLinear(n, n, size["nblocks"], seed=seed)
    elif method == "permuted":
        # width n, not the layer's default 2n: a square hidden layer needs no padding, and at
        # 2n one factor alone would cost 0.8% of the dense weights at n = 512
        block = bnn.PermutedBlockDiagonal(n, n, width=n, depth=size["depth"], bias=True,
                                          block_size=block_size, seed=seed)
    elif method == "permuted_tanh":
        block = bnn.PermutedTanhNetwork(n, n, width=n, depth=size["depth"], seed=seed)
    elif method == "sparse":
        block = bnn.SparseLinear(n, n, nnz=size["nnz"], seed=seed)
    elif method == "dctps":
        block = bnn.DCTPlusSparseLinear(n, n, nnz=size["nnz"], seed=seed)
    else:
        block = bnn.PermutedOffsetSparseLinear(n, n, nnz=size["nnz"],
                                               offset_depth=size["offset_depth"], seed=seed)
    return block, size


def trainable_params(module: nn.Module) -> int:
    """Entries of the parameters of ``module`` that require a gradient."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class BlockMLP(nn.Module):
    """Flatten → Linear(in, n) → ReLU → (block → ReLU) per block → Linear(n, classes).

    Input (B, *input_shape), output (B, num_classes) logits. The input layer and the
    classifier are dense nn.Linear for every method (they are not square, and a budget there
    would be another experiment); only the n × n ``blocks`` differ.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int,
                 blocks: Sequence[nn.Module], *, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.flatten = nn.Flatten()
        self.inp = nn.Linear(math.prod(input_shape), width)
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(self.flatten(x)))
        for block in self.blocks:
            h = torch.relu(block(h))
        return self.out(h)

    def penalty(self) -> torch.Tensor | None:
        """Sum of the blocks' orthogonality penalties (the permuted block-diagonal paper,
        eq. 2), or None when no block has one."""
        terms = [b.orthogonality_penalty() for b in self.blocks
                 if hasattr(b, "orthogonality_penalty")]
        return torch.stack(terms).sum() if terms else None


def build_mlp(method: str, *, input_shape: Sequence[int], num_classes: int, width: int,
              blocks: int, budget: float | None, seed: int,
              block_size: int = 2) -> tuple[BlockMLP, dict[str, Any]]:
    """A :class:`BlockMLP` with ``blocks`` hidden blocks of ``method`` (block i seeded
    ``seed·1000 + i``, so blocks differ and a seed is reproducible); returns it and the size
    choice. ``block_size``: G(θ)'s k."""
    check_positive_int("blocks", blocks)
    made = [build_block(method, width, budget, seed=seed * 1000 + i, block_size=block_size)
            for i in range(blocks)]
    model = BlockMLP(input_shape, num_classes, width, [b for b, _ in made], seed=seed)
    return model, made[0][1]
