"""Fake (meta) kernels shared by the sparse matmul ops of every backend (numba, Triton) and
the Triton DCT-plus-sparse op: shapes only, for torch.compile and torch.export."""

from __future__ import annotations

import torch


def sparse_matmul_fake(x, values, rows, cols, rowptr, colptr, csc_perm, csc_rows):
    """The fake kernel of every sparse matmul op (numba, Triton): y (batch, rows) and the
    saved x_t (cols, batch)."""
    torch._check(x.dim() == 2, lambda: f"x must have shape (batch, cols), got {x.shape}")
    return x.new_empty(x.shape[0], rowptr.shape[0] - 1), x.new_empty(x.shape[1], x.shape[0])


def sparse_matmul_backward_fake(grad_y, x_t, values, rows, cols, rowptr, colptr, csc_perm,
                                csc_rows, need_x, need_values):
    """The fake kernel of every sparse matmul backward op: (grad_x, grad_values), empty
    where not asked for."""
    grad_x = x_t.new_empty(x_t.shape[1], x_t.shape[0]) if need_x else x_t.new_empty(0)
    return grad_x, (torch.empty_like(values) if need_values else values.new_empty(0))
