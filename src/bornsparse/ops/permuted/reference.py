"""The plain-PyTorch references of the permuted operator and its tanh network (layout in
the package docstring): any device, autograd of any order. The fast paths are tested
against them."""

from __future__ import annotations

import torch


def permuted_block_diagonal_reference(
    x: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor, *, out_features: int | None = None
) -> torch.Tensor:
    """Plain-PyTorch, device-agnostic G x for ``x`` of shape (..., n_in), n_in <= width.

    Autograd differentiates it directly (any order); it keeps depth activations alive for
    backward.
    """
    h = _padded(x, weight)
    for t in range(weight.shape[0]):
        h = _factor(h, weight[t], perms[t])
    return h if out_features is None else h[..., :out_features]


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


def permuted_tanh_network_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    perms: torch.Tensor,
    biases: torch.Tensor,
    *,
    out_features: int | None = None,
) -> torch.Tensor:
    """Plain-PyTorch tanh network for ``x`` (..., n_in); ``biases`` (depth, width)."""
    depth = weight.shape[0]
    h = _padded(x, weight)
    for t in range(depth):
        h = _factor(h, weight[t], perms[t]) + biases[t]
        if t < depth - 1:
            h = torch.tanh(h)
    return h if out_features is None else h[..., :out_features]


def _padded(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` (..., n_in) zero-padded to the width of ``weight`` (depth, nb, k, k)."""
    width = weight.shape[1] * weight.shape[2]
    return x if x.shape[-1] >= width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _factor(h: torch.Tensor, blocks: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """One factor B P on ``h`` (..., width): gather by ``perm``, then the (nb, k, k) blocks."""
    nblocks, k, _ = blocks.shape
    g = h.index_select(-1, perm).unflatten(-1, (nblocks, k))  # (..., nb, k)
    return torch.einsum("...bc,brc->...br", g, blocks).flatten(-2)  # (..., width)
