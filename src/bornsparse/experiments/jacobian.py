"""Input-output Jacobians of a classifier at initialisation (the DCTpS slides' closing question).

``input_output_jacobian(model, x)`` gives J_i = ∂ logits(x_i) / ∂ x_i for every sample of a
batch, one backward pass per output class (C passes, not B·C): in eval mode the samples of a
batch do not interact, so the gradient of Σ_i logits_c(x_i) with respect to x_i is row c of
J_i. ``jacobian_singular_values`` returns the singular values of each J_i.
"""

from __future__ import annotations

import torch
from torch import nn

from bornsparse._checks import check_float_tensor


def input_output_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians of ``model``'s output with respect to its input.

    ``x`` (B, *input_shape); the model maps it to (B, C). Returns (B, C, D) with
    D = prod(input_shape). The model is evaluated in eval mode (so batch statistics do not
    couple the samples) and put back in its previous mode; its gradients are left untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_float_tensor("x", x)
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"x must have shape (B, ...) with B >= 1, got {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            xr = x.detach().clone().requires_grad_(True)
            out = model(xr)
            if out.dim() != 2 or out.shape[0] != x.shape[0]:
                raise ValueError(
                    f"model must map (B, ...) to (B, C) logits, got output {tuple(out.shape)}"
                )
            rows = []
            for c in range(out.shape[1]):
                (g,) = torch.autograd.grad(out[:, c].sum(), xr, retain_graph=c + 1 < out.shape[1],
                                           allow_unused=True)
                rows.append(torch.zeros_like(xr) if g is None else g)
    finally:
        model.train(was_training)
    b = x.shape[0]
    return torch.stack([r.reshape(b, -1) for r in rows], dim=1).detach()  # (B, C, D)


def jacobian_singular_values(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of each sample's input-output Jacobian: (B, min(C, D)),
    computed in float64."""
    j = input_output_jacobian(model, x)
    return torch.linalg.svdvals(j.double())
