"""Ground-truth matrices A of the operator-learning experiments (the permuted
block-diagonal paper, §5).

Every built-in target is a square ``(m, m)`` float tensor with ``m = n / 2`` (the operator's
width is ``n``). Each is scaled so that a row has squared norm about 1; with x ~ N(0, I)
the zero map therefore scores an MSE of about 1 and the curves of all tasks share one
scale. Where the paper's wording on a variance is ambiguous, the reading taken is stated
on the generator below and in docs/design.md.

Degrees of freedom (``target_dof``) label the curves of Figures 1-4.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from bornsparse._checks import check_positive_int
from bornsparse._random import check_seed

#: Built-in targets, in the order of the paper's figures; "dense" is the black baseline.
TARGETS = ("lowrank", "band", "sparse", "permutation", "dense")
#: Targets that take a difficulty parameter k (the paper's k = 1..5).
K_TARGETS = ("lowrank", "band", "sparse")


def _generator(name: str, m: int, k: int | None, seed: int) -> torch.Generator:
    # one stream per (task, size, k, seed): targets of different tasks or k never share draws
    g = torch.Generator()
    g.manual_seed(zlib.crc32(f"{name}:{m}:{k}:{seed}".encode()))
    return g


def _check_name_k(name: object, m: int, k: object) -> int | None:
    if not isinstance(name, str) or name not in TARGETS:
        raise ValueError(f"name must be one of {TARGETS}, got {name!r}")
    if name not in K_TARGETS:
        if k is not None:
            raise ValueError(f"target {name!r} takes no k (pass k=None), got k={k!r}")
        return None
    if k is None:
        raise ValueError(f"target {name!r} needs a difficulty k in 1..{m}, got k=None")
    k = check_positive_int("k", k)
    if k > m:
        raise ValueError(f"k must lie in 1..n_half = 1..{m} for target {name!r}, got k={k}")
    return k


def make_target(
    name: str, n_half: int, k: int | None = None, seed: int = 0, *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ground truth A of task ``name``, shape ``(n_half, n_half)``; deterministic in ``seed``.

    * ``"lowrank"``: A = U Vᵀ / √(n_half·k), U, V ∈ R^{n_half×k} iid N(0, 1) (the paper's
      √(nk/2) with n = 2·n_half).
    * ``"band"``: a 1-d convolution without weight sharing, receptive field k, wrapping around
      at the edges (so every row has exactly k weights and the dof is k·n_half, the paper's
      1024..5120); row i holds weights at columns (i − ⌊k/2⌋ + j) mod n_half, j < k, iid
      N(0, 1/k) (standard deviation 1/√k, as §5.2 states).
    * ``"sparse"``: k·n_half nonzeros at distinct uniformly random positions, iid N(0, 1/k).
      §5.3 says "variance 1/√k"; we read it as standard deviation 1/√k, as in §5.2, which
      makes rows have squared norm ≈ 1 like every other task.
    * ``"permutation"``: (A x)_i = x_{π(i)} for a uniformly random permutation π.
    * ``"dense"``: iid N(0, 1/n_half). The caption of Figure 1 says "variance 1/√(n/2)"; we read
      it as standard deviation 1/√(n/2), again giving rows of squared norm ≈ 1.
    """
    m = check_positive_int("n_half", n_half)
    k = _check_name_k(name, m, k)
    check_seed(seed, allow_none=False)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a real floating torch dtype, got {dtype!r}")
    g = _generator(name, m, k, seed)
    f64 = torch.float64
    if name == "lowrank":
        u = torch.randn(m, k, generator=g, dtype=f64)
        v = torch.randn(m, k, generator=g, dtype=f64)
        a = u @ v.T / math.sqrt(m * k)
    elif name == "band":
        w = torch.randn(m, k, generator=g, dtype=f64) / math.sqrt(k)
        rows = torch.arange(m).unsqueeze(1).expand(m, k)
        cols = (rows + torch.arange(k) - k // 2) % m
        a = torch.zeros(m, m, dtype=f64)
        a[rows, cols] = w
    elif name == "sparse":
        pos = torch.randperm(m * m, generator=g)[: k * m]
        a = torch.zeros(m * m, dtype=f64)
        a[pos] = torch.randn(k * m, generator=g, dtype=f64) / math.sqrt(k)
        a = a.reshape(m, m)
    elif name == "permutation":
        perm = torch.randperm(m, generator=g)
        a = torch.zeros(m, m, dtype=f64)
        a[torch.arange(m), perm] = 1.0
    else:  # dense
        a = torch.randn(m, m, generator=g, dtype=f64) / math.sqrt(m)
    return a.to(dtype)


def target_dof(name: str, n_half: int, k: int | None = None) -> int:
    """Degrees of freedom of the family of task ``name`` (the curves' labels).

    lowrank: k·(2·n_half − k), the dimension of the rank-k matrices (the paper's labels,
    2047..10235, are k·(2·n_half − 1), which agrees only at k = 1); band and sparse: k·n_half;
    permutation: 0 (a discrete set); dense: n_half².
    """
    m = check_positive_int("n_half", n_half)
    k = _check_name_k(name, m, k)
    if name == "lowrank":
        return k * (2 * m - k)
    if name in ("band", "sparse"):
        return k * m
    if name == "permutation":
        return 0
    return m * m


def validate_target(a: object, n_half: int | None = None, *, name: str = "target") -> torch.Tensor:
    """Check a user matrix and return it as a float32 tensor of shape (m, m).

    ``a`` may be a torch tensor or a numpy array; it must be 2-d, square (and of side
    ``n_half`` when given), real and finite.
    """
    if isinstance(a, np.ndarray):
        if a.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold real numbers, got numpy dtype {a.dtype}")
        a = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(a).__name__}")
    if a.is_complex() or a.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if a.dim() != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty square 2-d matrix (n/2, n/2), got shape {tuple(a.shape)}"
        )
    if n_half is not None and a.shape[0] != n_half:
        raise ValueError(
            f"{name} must have shape ({n_half}, {n_half}) for width n = {2 * n_half}, "
            f"got {tuple(a.shape)} (use width {2 * a.shape[0]} for this matrix)"
        )
    a = a.detach().to(torch.float64)
    if not torch.isfinite(a).all():
        bad = int((~torch.isfinite(a)).sum())
        raise ValueError(f"{name} must be finite, found {bad} NaN/inf entries")
    return a.to(torch.float32).contiguous()


def load_target(path: str | os.PathLike, n_half: int | None = None) -> torch.Tensor:
    """Load a user matrix from a ``.npy`` file and validate it (see ``validate_target``)."""
    p = Path(path)
    if p.suffix != ".npy":
        raise ValueError(f"target file must be a .npy file, got {str(path)!r}")
    if not p.is_file():
        raise ValueError(f"target file {str(path)!r} does not exist or is not a file")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"target file {str(path)!r} is not a readable .npy array: {err}") from err
    return validate_target(arr, n_half, name=f"target file {str(path)!r}")
