"""Fit a permuted block-diagonal operator G(θ) to a given matrix (``from_dense``'s loop).

The objective is the operator-learning one of the permuted block-diagonal paper (§5): fresh
inputs x ~ N(0, I) every step, the MSE between G x and W x, Adam, and the orthogonality
penalty (eq. 2) with the paper's schedule, shrunk to ``steps``: 7/12 of the steps at ``lr``
with penalty weight 3, 3/12 at ``lr`` with weight 0.3, the last 2/12 at ``lr``/10 with
weight 0.3 (``penalty`` scales the three weights).
``bornsparse.experiments.operators.train_operator`` runs the same objective on square
targets with the curves and records of the experiments; this loop is the small one that
``nn`` may import (nn never imports experiments).

Scale: an orthogonal G has norm 1 on the inputs it sees, and the penalty pulls the blocks
towards orthogonal, so the loop fits W / σ, σ the largest singular value of W, and then
multiplies every block by σ^(1/depth), which scales G by exactly σ and leaves every factor
equally conditioned.

The penalty pulls every block towards orthogonal, which suits the paper's targets but biases
the fit of a matrix whose factors are far from orthogonal: a permuted operator with blocks
perturbed by N(0, 0.3²) and the same permutations is fitted to 12% relative error with the
schedule and to 5e-5 with ``penalty=0`` (16 -> 12, width 32, depth 4, 1000 steps).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bornsparse._checks import check_positive_int
from bornsparse._random import make_generator

# (fraction of the steps, learning-rate factor, penalty weight): the paper's 7000 / 3000 /
# 2000 steps at lr 0.01, 0.01, 0.001 with weights 3, 0.3, 0.3
SCHEDULE = ((7 / 12, 1.0, 3.0), (3 / 12, 1.0, 0.3), (2 / 12, 0.1, 0.3))
# how often the progress bar shows the running MSE (a .item() synchronises)
_SHOW_EVERY = 50


def phase_steps(steps: int) -> list[int]:
    """``steps`` split over :data:`SCHEDULE`'s phases, each at least 1 when steps >= 3."""
    first = [max(1, round(f * steps)) for f, _, _ in SCHEDULE[:-1]]
    return [*first, steps - sum(first)]


def relative_error(approx: torch.Tensor, target: torch.Tensor) -> float:
    """‖approx − target‖_F / ‖target‖_F in float64 (0 when both are zero)."""
    num = torch.linalg.norm((approx - target).double())
    den = torch.linalg.norm(target.double())
    if float(den) == 0.0:
        return 0.0 if float(num) == 0.0 else math.inf
    return float(num / den)


def fit_operator_(
    layer: nn.Module,
    weight: torch.Tensor,
    *,
    steps: int = 2000,
    lr: float = 1e-2,
    batch_size: int = 64,
    penalty: float = 1.0,
    seed: int | None = None,
    progress: bool = True,
) -> float:
    """Train ``layer``'s blocks in place so that ``layer(x) ≈ x @ weight.T``; return the error.

    ``layer``: a bias-free :class:`~bornsparse.nn.PermutedBlockDiagonal` with
    ``(out_features, in_features) == weight.shape``. ``weight``: (out_features,
    in_features), on the layer's device and dtype. ``penalty`` multiplies the schedule's
    penalty weights (0: plain MSE). ``seed`` fixes the input stream (the layer's own seed
    fixed its start). Returns ``‖layer.to_dense() − weight‖_F /
    ‖weight‖_F``. A tqdm bar shows the MSE unless ``progress=False``. Raises RuntimeError
    if the loss stops being finite (lower ``lr``).
    """
    steps = check_positive_int("steps", steps)
    if steps < len(SCHEDULE):
        raise ValueError(f"steps must be at least {len(SCHEDULE)} (one per phase), got {steps}")
    batch_size = check_positive_int("batch_size", batch_size)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not (
        math.isfinite(lr) and lr > 0
    ):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if isinstance(penalty, bool) or not isinstance(penalty, int | float) or not (
        math.isfinite(penalty) and penalty >= 0
    ):
        raise ValueError(f"penalty must be a finite number >= 0, got {penalty!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}")
    from tqdm.auto import tqdm  # imported here: only a fit needs it

    target = weight.detach()
    sigma = float(torch.linalg.matrix_norm(target.double(), ord=2)) if target.numel() else 0.0
    if sigma == 0.0:
        # a zero matrix: zero blocks are exact, and there is no scale to learn from
        with torch.no_grad():
            layer.weight.zero_()
        return 0.0
    target_t = (target / sigma).T.contiguous()  # (in, out): x @ target_t = W x / σ
    gen = make_generator(None if seed is None else (int(seed) ^ 0x5EED) % 2**63)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    bar = tqdm(total=steps, desc="PermutedBlockDiagonal.from_dense", disable=not progress,
               leave=False)
    step = 0
    with torch.enable_grad():
        for n, (_, lr_factor, weight_t) in zip(phase_steps(steps), SCHEDULE, strict=True):
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor
            for _ in range(n):
                x = torch.randn(batch_size, target.shape[1], generator=gen,
                                dtype=torch.float64).to(device=target.device, dtype=target.dtype)
                mse = (layer(x) - x @ target_t).pow(2).mean()
                loss = mse + penalty * weight_t * layer.orthogonality_penalty()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if step % _SHOW_EVERY == 0 or step == steps:
                    value = float(mse.detach())
                    if not math.isfinite(value):
                        bar.close()
                        raise RuntimeError(
                            f"fitting diverged at step {step} of {steps} (MSE {value}); "
                            f"lower lr (got {lr})"
                        )
                    bar.set_postfix(mse=f"{value:.3g}")
                bar.update()
    bar.close()
    with torch.no_grad():
        layer.weight.mul_(sigma ** (1.0 / layer.depth))
    return relative_error(layer.to_dense(), target)
