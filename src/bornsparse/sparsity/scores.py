"""Saliency scores of pruning at initialisation, and top-k selection of supports.

Every score function takes the model, its prunable ``targets`` (``(name, module)`` pairs of
dense ``nn.Linear``/``nn.Conv2d``) and returns one tensor per target, shaped like its weight,
where *larger means keep*. The model's parameters are never modified: effective weights are
passed through ``torch.func.functional_call`` and gradients taken with ``torch.autograd.grad``,
so no ``.grad`` is left behind. Buffers that a forward pass may update (BatchNorm running
statistics) are restored afterwards.

References: SNIP (Lee et al. 2019), GraSP (Wang et al. 2020), SynFlow (Tanaka et al. 2020),
FORCE (de Jorge et al. 2021).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bornsparse.ops.backends import reference_kernels

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- helpers


def as_batches(data: object, name: str = "data") -> list[Batch] | Iterable[Batch]:
    """``(x, y)`` -> ``[(x, y)]``; any other iterable of ``(x, y)`` pairs is returned as is."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
        isinstance(t, torch.Tensor) for t in data
    ):
        return [tuple(data)]
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"{name} must be an (inputs, targets) pair of tensors or an iterable of such pairs "
            f"(e.g. a DataLoader), got {type(data).__name__}"
        )
    return data


def cycle_batches(data: Iterable[Batch], name: str = "data") -> Iterator[Batch]:
    """Iterate ``data`` again and again (a DataLoader reshuffles each pass); never caches."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"{name} yielded no batches")


@contextlib.contextmanager
def preserved_state(model: nn.Module, *, eval_mode: bool = False):
    """Restore the model's buffers and train/eval flags on exit (scoring has no side effects)."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    if eval_mode:
        model.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
        for n, m in model.named_modules():
            if n in modes:
                m.train(modes[n])


def _grads(
    model: nn.Module,
    targets: Sequence[tuple[str, nn.Module]],
    weights: Sequence[torch.Tensor],
    batch: Batch,
    loss_fn: LossFn,
    *,
    temperature: float = 1.0,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    """∂loss/∂w for the effective target weights ``weights`` (leaves with requires_grad)."""
    x, y = batch
    overrides = {f"{name}.weight": w for (name, _), w in zip(targets, weights, strict=True)}
    out = functional_call(model, overrides, (x,))
    if temperature != 1.0:
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"GraSP divides the model's output by its temperature, so the model must "
                f"return a tensor, got {type(out).__name__}; wrap the model to return logits"
            )
        out = out / temperature
    loss = loss_fn(out, y)
    if not loss.requires_grad:
        raise ValueError("loss_fn returned a value that does not depend on the weights")
    return list(torch.autograd.grad(loss, weights, create_graph=create_graph))


def _leaves(targets, masks=None, dtype=None) -> list[torch.Tensor]:
    out = []
    for i, (_, mod) in enumerate(targets):
        w = mod.weight.detach()
        if dtype is not None:
            w = w.to(dtype)
        if masks is not None:
            w = w * masks[i].to(w.dtype)
        out.append(w.clone().requires_grad_(True))
    return out


# ----------------------------------------------------------------------------- scores


def snip_scores(model, targets, data, loss_fn: LossFn = F.cross_entropy) -> list[torch.Tensor]:
    """SNIP connection sensitivity |∂L/∂w ⊙ w|, gradients summed over the batches of ``data``."""
    with preserved_state(model):
        w = _leaves(targets)
        acc = [torch.zeros_like(t) for t in w]
        n = 0
        for batch in as_batches(data):
            for a, g in zip(acc, _grads(model, targets, w, batch, loss_fn), strict=True):
                a += g
            n += 1
        if n == 0:
            raise ValueError("data yielded no batches")
    return [(a * t.detach()).abs() for a, t in zip(acc, w, strict=True)]


def grasp_scores(
    model, targets, data, loss_fn: LossFn = F.cross_entropy, *, temperature: float = 200.0
) -> list[torch.Tensor]:
    """GraSP keep scores ``w ⊙ (H g)``.

    GraSP's score is S = -w ⊙ Hg and it removes the *largest* S (weights whose removal least
    reduces gradient flow); keeping the largest ``w ⊙ Hg`` is the same rule. ``g`` and the
    Hessian-gradient product use the softmax temperature of the paper (200).
    """
    batches = list(as_batches(data))
    if not batches:
        raise ValueError("data yielded no batches")
    with preserved_state(model):
        w = _leaves(targets)
        g = [torch.zeros_like(t) for t in w]
        for batch in batches:
            for a, gi in zip(
                g, _grads(model, targets, w, batch, loss_fn, temperature=temperature), strict=True
            ):
                a += gi
        hg = [torch.zeros_like(t) for t in w]
        for batch in batches:
            # the Hessian-gradient product differentiates twice: through every bornsparse
            # layer (a DCTpS offset, say) that needs the plain-PyTorch kernels
            with reference_kernels():
                gw = _grads(model, targets, w, batch, loss_fn, temperature=temperature,
                            create_graph=True)
                z = sum((a * b).sum() for a, b in zip(gw, g, strict=True))
                hgs = torch.autograd.grad(z, w)
            for a, h in zip(hg, hgs, strict=True):
                a += h
    return [t.detach() * h for t, h in zip(w, hg, strict=True)]


def synflow_round(
    model, targets, masks: Sequence[torch.Tensor], input_shape: Sequence[int]
) -> list[torch.Tensor]:
    """One SynFlow round: |∂R/∂w ⊙ w| with R = 1ᵀ(∏|W_l|)1 on the masked, linearised net.

    Every parameter and buffer is replaced by its absolute value in float64 (the product of
    many small weights underflows float32), the model runs in eval mode on a batch of one
    all-ones input of shape ``input_shape`` (without the batch dimension).
    """
    with preserved_state(model, eval_mode=True):
        overrides = {}
        for n, p in model.named_parameters():
            overrides[n] = p.detach().abs().double()
        for n, b in model.named_buffers():
            if b.is_floating_point():
                overrides[n] = b.detach().abs().double()
        w = _leaves(targets, masks, dtype=torch.float64)
        for (name, _), t in zip(targets, w, strict=True):
            t.data.abs_()
            overrides[f"{name}.weight"] = t
        ones = torch.ones((1, *input_shape), dtype=torch.float64,
                          device=targets[0][1].weight.device)
        r = functional_call(model, overrides, (ones,)).sum()
        grads = torch.autograd.grad(r, w)
    return [(g * t.detach()).abs() for g, t in zip(grads, w, strict=True)]


def force_round(
    model, targets, masks: Sequence[torch.Tensor], batch: Batch, loss_fn: LossFn = F.cross_entropy
) -> list[torch.Tensor]:
    """One FORCE round: |∂L(w̄)/∂w̄ ⊙ w| with w̄ = w ⊙ mask, the current pruned net.

    The gradient is taken at the pruned weights but multiplied by the *original* ones, so
    weights pruned in an earlier round can come back (what separates FORCE from Iter-SNIP).
    """
    with preserved_state(model):
        wbar = _leaves(targets, masks)
        grads = _grads(model, targets, wbar, batch, loss_fn)
    return [(g * mod.weight.detach()).abs() for g, (_, mod) in zip(grads, targets, strict=True)]


# ----------------------------------------------------------------------------- selection


def exponential_schedule(total: int, keep: int, rounds: int) -> list[int]:
    """Kept counts of rounds 1..R: ``total·(keep/total)^(r/R)``, ending exactly at ``keep``.

    FORCE's schedule (kₜ = exp(α log k + (1-α) log N), α = t/T) and SynFlow's compression
    schedule are this same geometric interpolation.
    """
    out = [max(keep, round(total * (keep / total) ** (r / rounds))) for r in range(1, rounds)]
    return [*out, keep]


def _order(scores: torch.Tensor) -> torch.Tensor:
    """Positions by decreasing score, ties broken by position (stable), NaN last."""
    s = torch.nan_to_num(scores.double(), nan=-math.inf)
    return torch.argsort(s, descending=True, stable=True)


def select_per_layer(
    scores: Sequence[torch.Tensor], counts: Sequence[int], *, per_row: bool = False
) -> list[torch.Tensor]:
    """The ``counts[l]`` highest-scoring flat positions of each layer (sorted ascending).

    ``per_row=True`` (equal per filter) keeps ``counts[l] // rows`` in every row of the
    layer's (rows, cols) view and one more in each of the first ``counts[l] % rows`` rows.
    """
    out = []
    for s, c in zip(scores, counts, strict=True):
        if not per_row:
            out.append(torch.sort(_order(s.flatten())[:c]).values)
            continue
        m = s.detach().reshape(s.shape[0], -1)
        rows, cols = m.shape
        per = torch.full((rows,), c // rows, dtype=torch.int64)
        per[: c % rows] += 1
        kept = [_order(m[r])[: int(per[r])] + r * cols for r in range(rows)]
        out.append(torch.sort(torch.cat(kept)).values)
    return out


def select_global(
    scores: Sequence[torch.Tensor], keep: int, *, min_per_layer: int = 1
) -> tuple[list[torch.Tensor], int]:
    """Global top-``keep`` over all layers, then at least ``min_per_layer`` in every layer.

    The floor moves the globally weakest kept entries of layers above it to the best
    unkept entries of layers below it, so the total stays ``keep``. Returns the sorted flat
    positions per layer and how many entries the floor moved (0 when the method alone kept
    every layer alive).
    """
    sizes = [s.numel() for s in scores]
    floors = [min(min_per_layer, n) for n in sizes]
    if keep < sum(floors):
        raise ValueError(
            f"keeping {keep} weights cannot give each of the {len(sizes)} layers at least "
            f"{min_per_layer}; raise the density"
        )
    flat = torch.cat([s.detach().flatten().double() for s in scores])
    order = _order(flat)[:keep]
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    layer_of = torch.bucketize(order, offsets[1:], right=True)
    counts = torch.bincount(layer_of, minlength=len(sizes)).tolist()
    need = [max(0, f - c) for f, c in zip(floors, counts, strict=True)]
    moved = sum(need)
    keep_mask = torch.ones(keep, dtype=torch.bool)
    if moved:
        left = moved
        # walk the kept entries from the weakest up, dropping from layers above their floor
        for j in range(keep - 1, -1, -1):
            l_j = int(layer_of[j])
            if counts[l_j] > floors[l_j]:
                keep_mask[j] = False
                counts[l_j] -= 1
                left -= 1
                if left == 0:
                    break
    kept = order[keep_mask]
    out = []
    for l, n in enumerate(sizes):
        sel = kept[(kept >= offsets[l]) & (kept < offsets[l + 1])] - offsets[l]
        if need[l]:
            taken = torch.zeros(n, dtype=torch.bool)
            taken[sel] = True
            cand = _order(scores[l].flatten())
            cand = cand[~taken[cand]][: need[l]]
            sel = torch.cat([sel, cand])
        out.append(torch.sort(sel).values)
    return out, moved
