"""Random supports drawn in O(nnz) time and memory, never touching a dense mask.

At low density, positions are drawn *with* replacement (torch.randint over linear indices)
and deduplicated with torch.unique; the distinct set of such draws, given its size, is a
uniformly random subset by symmetry, and trimming it at random to exactly the wanted
count keeps it uniform. Duplicates are rare (about nnz·density/2 of them), so one or two
top-up rounds finish. At high density (more than a quarter of the positions) a randperm of
all positions is cheaper than rejection and still only a constant times nnz. The work runs in
numpy, whose single-threaded sort measured several times faster than torch.unique here.
"""

from __future__ import annotations

import numpy as np
import torch

# above this fraction of occupied positions, rejection would loop too often
_DENSE_SWITCH = 0.25


def _unique_sorted(a: np.ndarray) -> np.ndarray:
    # numpy's single-threaded sort is several times faster than torch.unique on CPU here
    a = np.sort(a)
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if a.size else a


def _keep_random(
    lin: np.ndarray, group: np.ndarray, counts: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Keep counts[g] entries of each group g, chosen uniformly; ``lin`` sorted, unique,
    ``group`` non-decreasing along it (so each group is one contiguous run)."""
    have = np.bincount(group, minlength=counts.size)
    if np.array_equal(have, counts):
        return lin
    # random order inside each run: sort by group + a uniform fraction
    order = np.argsort(group + rng.random(lin.size), kind="stable")
    start = np.concatenate(([0], np.cumsum(have)[:-1]))
    rank = np.arange(lin.size) - start[group]
    keep = order[rank < counts[group]]
    return np.sort(lin[keep])


def _sample_linear(total: int, nnz: int, rng: np.random.Generator) -> np.ndarray:
    """nnz distinct sorted linear positions in [0, total), uniformly at random."""
    if nnz > _DENSE_SWITCH * total:
        return np.sort(rng.permutation(total)[:nnz])
    lin = np.empty(0, dtype=np.int64)
    while lin.size < nnz:
        missing = nnz - lin.size
        extra = rng.integers(0, total, size=missing + missing // 16 + 8, dtype=np.int64)
        lin = _unique_sorted(np.concatenate([lin, extra]))
    return _keep_random(lin, np.zeros(lin.size, dtype=np.int64), np.array([nnz]), rng)


def _sample_per_row(
    rows: int, cols: int, counts: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Sorted linear positions with exactly counts[r] distinct columns in each row r."""
    if counts.max() > _DENSE_SWITCH * cols:
        # every row at once: random keys, the smallest counts[r] of each row win. This is
        # O(rows·cols), which here is at most 4·(max count per row)·rows.
        rank = np.argsort(np.argsort(rng.random((rows, cols)), axis=1), axis=1)
        r, c = np.nonzero(rank < counts[:, None])
        return r.astype(np.int64) * cols + c
    lin = np.empty(0, dtype=np.int64)
    have = np.zeros(rows, dtype=np.int64)
    while (have < counts).any():
        missing = np.maximum(counts - have, 0)
        draws = missing + missing // 8 + (missing > 0) * 2
        r = np.repeat(np.arange(rows, dtype=np.int64), draws)
        c = rng.integers(0, cols, size=r.size, dtype=np.int64)
        lin = _unique_sorted(np.concatenate([lin, r * cols + c]))
        have = np.bincount(lin // cols, minlength=rows)
    return _keep_random(lin, lin // cols, counts, rng)


def per_row_counts(rows: int, nnz: int) -> np.ndarray:
    """nnz // rows in every row, the remainder one each to the first rows (EPF layout)."""
    counts = np.full(rows, nnz // rows, dtype=np.int64)
    counts[: nnz % rows] += 1
    return counts


def sample_support(
    rows: int,
    cols: int,
    nnz: int,
    generator: torch.Generator | None = None,
    per_row: bool = False,
) -> torch.Tensor:
    """A uniformly random support of exactly ``nnz`` positions in a (rows, cols) matrix.

    Returns int64 (2, nnz): row indices then column indices, sorted row-major, unique.
    ``per_row=True`` gives every row ``nnz // rows`` entries and one more to each of the
    first ``nnz % rows`` rows, positions uniform inside each row. O(nnz) time and memory
    when the density is low; drawn on the CPU with ``generator``.
    """
    for name, v in (("rows", rows), ("cols", cols), ("nnz", nnz)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if nnz > rows * cols:
        raise ValueError(
            f"nnz must be at most rows·cols = {rows * cols} for a ({rows}, {cols}) matrix, "
            f"got {nnz}"
        )
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    # the draw itself runs in numpy (faster sorts), seeded from the torch generator so
    # torch.manual_seed / a layer's seed fix the support
    rng = np.random.default_rng(
        int(torch.randint(2**62, (1,), generator=generator, device="cpu")))
    if per_row:
        # nnz <= rows·cols, so ceil(nnz / rows) <= cols always fits
        counts = per_row_counts(rows, nnz)
        lin = _sample_per_row(rows, cols, counts, rng)
    else:
        lin = _sample_linear(rows * cols, nnz, rng)
    return torch.from_numpy(np.stack([lin // cols, lin % cols]))
