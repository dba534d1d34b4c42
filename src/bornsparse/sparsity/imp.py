"""Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

Train dense → prune the smallest-magnitude fraction of the surviving weights → rewind the
survivors (and the optimizer) to iteration ``rewind_iteration`` → repeat, for ``rounds``
rounds; :meth:`IMP.to_sparse` then swaps the masked dense layers for bornsparse sparse layers
holding the rewound weights, ready for the final training run::

    imp = IMP(model, optimizer, rounds=5, density=0.05, rewind_iteration=100)
    for r in range(imp.rounds):
        for x, y in batches:                 # one round of training
            optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
            imp.step()                       # keeps pruned weights at zero, snapshots rewind
        imp.prune()                          # prune + rewind weights and optimizer
    imp.to_sparse()                          # sparse layers, optimizer rebound; train on

IMP trains dense (the DCTpS slides' cost table: O(mn) per step falling to O(pmn)); the rewind point
is one copy of the model and optimizer state.

Under torch.distributed (e.g. the model wrapped in DistributedDataParallel) every rank calls
:meth:`IMP.prune` alike; the magnitudes are averaged over the ranks before the selection, so
every rank keeps the same mask. :meth:`IMP.to_sparse` replaces layers: wrap the returned model
in a new DistributedDataParallel.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bornsparse._checks import check_fraction, check_positive_int
from bornsparse.sparsity import scores as S
from bornsparse.sparsity.dynamic import mean_over_ranks_
from bornsparse.sparsity.swap import (
    DCTOffset,
    Selector,
    check_kind,
    dense_targets,
    rebind_optimizer,
    support_of_weight,
    swap_in_sparse_layers,
)

SCOPES = ("global", "layer")


class IMP:
    """Iterative magnitude pruning with rewinding on the dense nn.Linear/nn.Conv2d of a model.

    Args:
        model: dense model (its layers are masked in place until :meth:`to_sparse`).
        optimizer: optional; its state is snapshotted at the rewind point and restored with
            the weights on every :meth:`prune`.
        rounds: number of prune-and-rewind rounds.
        prune_rate: fraction of the surviving weights removed per round, in (0, 1).
        density: alternative to ``prune_rate``: the final kept fraction; the rate is then
            ``1 - density^(1/rounds)`` and the last round lands exactly on density·N.
        rewind_iteration: the training iteration (count of :meth:`step` calls in round 0) whose
            weights every round rewinds to; 0 rewinds to initialisation.
        scope: ``"global"`` ranks magnitudes across layers (with a floor of
            ``min_per_layer``), ``"layer"`` prunes each layer by the same rate.
        kind: sparse layers made by :meth:`to_sparse`; ``"dctps"`` trains the dense weights as
            the S of DCT-plus-sparse layers (y = α·T(x) + S x + b, α fixed during IMP).
        min_per_layer: floor on the weights kept per layer in global scope (default 1).
        include, exclude: a :data:`~bornsparse.sparsity.swap.Selector` (glob pattern(s) on
            qualified layer names, or a callable ``(name, module) -> bool``) choosing the
            layers pruned; a layer shared under several names is chosen when any passes.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        rounds: int,
        prune_rate: float | None = None,
        density: float | None = None,
        rewind_iteration: int = 0,
        scope: str = "global",
        kind: str = "sparse",
        min_per_layer: int = 1,
        include: Selector = None,
        exclude: Selector = None,
    ) -> None:
        self.rounds = check_positive_int("rounds", rounds)
        if (prune_rate is None) == (density is None):
            raise ValueError("give exactly one of prune_rate and density")
        if prune_rate is not None:
            prune_rate = check_fraction("prune_rate", prune_rate)
            if prune_rate >= 1.0:
                raise ValueError(f"prune_rate must lie in (0, 1), got {prune_rate!r}")
        else:
            density = check_fraction("density", density)
            prune_rate = 1.0 - density ** (1.0 / self.rounds)
        self.prune_rate = prune_rate
        self.target_density = density
        if isinstance(rewind_iteration, bool) or not isinstance(rewind_iteration, int) or (
            rewind_iteration < 0
        ):
            raise ValueError(f"rewind_iteration must be an integer >= 0, got {rewind_iteration!r}")
        self.rewind_iteration = rewind_iteration
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.scope = scope
        self.kind = check_kind(kind)
        self.min_per_layer = check_positive_int("min_per_layer", min_per_layer)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
            )
        self.model = model
        self.optimizer = optimizer
        self.targets = dense_targets(model, include=include, exclude=exclude)
        self.masks = [torch.ones_like(m.weight, dtype=torch.bool) for _, m in self.targets]
        self.round = 0
        self.iteration = 0
        self._rewind: dict | None = None
        self._converted = False
        self._offsets = DCTOffset(self.targets) if self.kind == "dctps" else None
        if rewind_iteration == 0:
            self._snapshot()

    # ------------------------------------------------------------------ training hooks

    @property
    def density(self) -> float:
        kept = sum(int(m.sum()) for m in self.masks)
        return kept / sum(m.numel() for m in self.masks)

    def counts(self) -> dict[str, int]:
        """Kept weights per layer."""
        return {n: int(m.sum()) for (n, _), m in zip(self.targets, self.masks, strict=True)}

    def _snapshot(self) -> None:
        self._rewind = {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": None if self.optimizer is None
            else copy.deepcopy(self.optimizer.state_dict()),
        }

    @torch.no_grad()
    def apply_masks(self) -> None:
        for (_, mod), m in zip(self.targets, self.masks, strict=True):
            mod.weight.mul_(m)

    def step(self) -> None:
        """Call after every ``optimizer.step()``: re-zeroes pruned weights, takes the rewind
        snapshot at ``rewind_iteration`` of round 0."""
        if self._converted:
            raise RuntimeError("IMP.step() after to_sparse(): the model is already sparse")
        self.apply_masks()
        self.iteration += 1
        if self._rewind is None and self.iteration == self.rewind_iteration:
            self._snapshot()

    # ------------------------------------------------------------------ pruning

    def _keep_counts(self, r: int) -> int:
        total = sum(m.numel() for m in self.masks)
        if r == self.rounds and self.target_density is not None:
            return max(1, round(self.target_density * total))
        return max(1, round(total * (1.0 - self.prune_rate) ** r))

    @torch.no_grad()
    def prune(self) -> float:
        """Prune by magnitude, rewind weights (and optimizer) to the snapshot; returns density."""
        if self._converted:
            raise RuntimeError("IMP.prune() after to_sparse()")
        if self.round >= self.rounds:
            raise RuntimeError(f"IMP.prune() called after all {self.rounds} rounds")
        if self._rewind is None:
            raise RuntimeError(
                f"no rewind point yet: rewind_iteration={self.rewind_iteration} but only "
                f"{self.iteration} steps were taken in round 0"
            )
        # averaged over ranks (a no-op alone): replicas that drifted by rounding still agree
        scores = [
            mean_over_ranks_(mod.weight.detach().abs().double()).masked_fill(~m, -torch.inf)
            for (_, mod), m in zip(self.targets, self.masks, strict=True)
        ]
        if self.scope == "global":
            selected, _ = S.select_global(scores, self._keep_counts(self.round + 1),
                                          min_per_layer=self.min_per_layer)
        else:
            keep = [max(1, round(int(m.sum()) * (1.0 - self.prune_rate))) for m in self.masks]
            if self.round + 1 == self.rounds and self.target_density is not None:
                keep = [max(1, round(self.target_density * m.numel())) for m in self.masks]
            selected = S.select_per_layer(scores, keep)
        new_masks = []
        for sel, m in zip(selected, self.masks, strict=True):
            nm = torch.zeros(m.numel(), dtype=torch.bool, device=m.device)
            nm[sel.to(m.device)] = True
            new_masks.append(nm.view_as(m))
        self.masks = new_masks
        self.model.load_state_dict(self._rewind["model"])
        if self.optimizer is not None:
            # the optimizer adopts the tensors it is given and updates them in place later:
            # hand it a copy so the rewind point survives every round
            self.optimizer.load_state_dict(copy.deepcopy(self._rewind["optimizer"]))
        self.apply_masks()
        self.round += 1
        return self.density

    def to_sparse(self) -> nn.Module:
        """Swap every pruned layer for a sparse layer holding its current (masked) weights.

        The optimizer (if given) is pointed at the new values, its per-element state gathered
        at the support, so the final training continues from the rewind point.
        """
        if self._converted:
            raise RuntimeError("IMP.to_sparse() called twice")
        if self._offsets is not None:
            self._offsets.remove()
        supports, flats, old = {}, {}, {}
        for (name, mod), m in zip(self.targets, self.masks, strict=True):
            # positions in the weight's own layout, ordered like the new layer's entries
            supports[name], flats[name] = support_of_weight(mod, m.flatten().nonzero().flatten())
            old[name] = mod.weight
        new = swap_in_sparse_layers(self.model, supports, kind=self.kind)
        if self.optimizer is not None:
            rebind_optimizer(
                self.optimizer, {old[n]: (new[n].values, flats[n]) for n in supports}
            )
        self._converted = True
        self._rewind = None
        return self.model

    # ------------------------------------------------------------------ checkpoints

    _STATE_KEYS = ("round", "iteration", "masks", "rewind", "prune_rate", "rounds")

    def state_dict(self) -> dict:
        """Round, iteration, masks and the rewind point (model and optimizer state dicts).

        Also the settings that fix the schedule (checked on load), the pruned layers' names
        and whether :meth:`to_sparse` ran. Tensors, dicts and plain values only, so
        ``torch.save`` / ``torch.load(..., weights_only=True)`` round-trip it.
        """
        return {
            "round": self.round,
            "iteration": self.iteration,
            "masks": [m.clone() for m in self.masks],
            "rewind": self._rewind,  # by reference, like Module.state_dict's tensors
            "prune_rate": self.prune_rate,
            "rounds": self.rounds,
            "target_density": self.target_density,
            "rewind_iteration": self.rewind_iteration,
            "scope": self.scope,
            "kind": self.kind,
            "layers": [name for name, _ in self.targets],
            "converted": self._converted,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` taken on the same model and settings (ValueError).

        After ``to_sparse()`` (``converted``) the model's sparse layers come from the model
        checkpoint (``bornsparse.load``); this only marks the IMP as done.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = [k for k in self._STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"state is missing the keys {missing} of an IMP state_dict")
        if state["rounds"] != self.rounds or state["prune_rate"] != self.prune_rate:
            raise ValueError(
                f"checkpoint is for rounds={state['rounds']}, prune_rate={state['prune_rate']}; "
                f"this IMP has rounds={self.rounds}, prune_rate={self.prune_rate}"
            )
        # checked when present: states written before these keys existed load too
        for key in ("target_density", "rewind_iteration", "scope", "kind"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint has {key}={state[key]!r} but this IMP has "
                    f"{getattr(self, key)!r}"
                )
        names = [name for name, _ in self.targets]
        if "layers" in state and list(state["layers"]) != names:
            raise ValueError(
                f"checkpoint prunes the layers {list(state['layers'])}, this IMP {names}"
            )
        masks = state["masks"]
        if [m.shape for m in masks] != [m.shape for m in self.masks]:
            raise ValueError("checkpoint masks do not match this model's prunable layers")
        self.masks = [m.clone().bool().to(old.device) for m, old in zip(masks, self.masks,
                                                                           strict=True)]
        self.round = int(state["round"])
        self.iteration = int(state["iteration"])
        # prune() copies out of it (load_state_dict, deepcopy), so a reference is safe
        self._rewind = state["rewind"]
        if state.get("converted", False):
            if self._offsets is not None:
                self._offsets.remove()
            self._converted = True
