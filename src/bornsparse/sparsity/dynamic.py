"""Dynamic sparse training: RigL (Evci et al. 2020) and SET (Mocanu et al. 2018).

Two lines in a training loop, as in rigl-torch::

    rigl = RigL(model, optimizer, density=0.1, total_steps=len(loader) * epochs)
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        if rigl.step():          # False on topology-update steps
            optimizer.step()

Every ``delta`` steps before ``t_end`` each sparse layer drops the ``k`` smallest-magnitude
values and grows ``k`` new positions — the largest dense-gradient magnitudes (RigL) or
uniformly random ones (SET) — with ``k = ⌊f(t)·nnz⌋`` and the cosine-decayed drop fraction
``f(t) = α/2·(1 + cos(π t / t_end))``. The count per layer never changes, indices stay unique
and row-major sorted, grown weights start at zero with zeroed optimizer state.

NOTE: as in RigL's reference code and rigl-torch, ``step()`` returns False on update steps so
the caller skips that optimizer step, and a position dropped and regrown in the same update
keeps its value and optimizer state (it never left, in effect).

The dense gradient RigL needs is never a parameter: on the forward/backward pass preceding an
update step only, hooks keep each layer's input and output gradient, and at ``step()`` the
dense gradient ``G = gᵀx`` (or ``conv2d_weight``) is formed for one layer at a time, used and
freed — O(rows·cols) transiently, every ``delta`` steps (the DCTpS slides' O(pmn + mn/ΔT)).

Data-parallel training (``torch.distributed`` initialised, e.g. the model wrapped in
DistributedDataParallel): every rank must construct RigL/SET and call ``step()`` alike. The
seed is rank 0's (broadcast at construction), so supports and SET's draws agree even when
the ranks were seeded differently; the magnitudes and the dense gradient that decide an
update are averaged over the ranks first, so every rank takes the same decision and does the
same optimizer-state surgery.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import nn

from bornsparse._checks import check_fraction, check_positive_int
from bornsparse._random import check_seed
from bornsparse.sparsity.distributions import (
    DEFAULT_DISTRIBUTION,
    allocate_nnz,
    support_layout,
)
from bornsparse.sparsity.swap import (
    Selector,
    check_kind,
    default_device,
    dense_shape,
    dense_targets,
    has_meta,
    indices_to_flat,
    is_dense_target,
    materialize_meta,
    rebind_optimizer,
    sparse_targets,
    swap_in_sparse_layers,
    weight_shape,
)

_SCALAR_STATE = ("step",)


def process_group_size() -> int:
    """World size of torch.distributed's default process group; 1 when none is initialised."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_ranks_(t: torch.Tensor) -> torch.Tensor:
    """Average the contiguous ``t`` in place over the ranks of the default process group
    (unchanged without one) and return it. The reduction hands every rank the same bits, so
    a decision computed from the result is the same everywhere."""
    world = process_group_size()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # ReduceOp.AVG is NCCL-only
        t.div_(world)
    return t


def rank0_seed(seed: int) -> int:
    """Rank 0's ``seed`` on every rank (``seed`` itself without a process group)."""
    if process_group_size() == 1:
        return seed
    import torch.distributed as dist

    # NCCL moves CUDA tensors only; gloo (CPU) takes CPU ones
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    t = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def _first_occurrences(c: torch.Tensor) -> torch.Tensor:
    """Distinct entries of ``c`` in order of first appearance."""
    uniq, inv = torch.unique(c, return_inverse=True)
    first = torch.full((uniq.numel(),), c.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inv, torch.arange(c.numel()), reduce="amin")
    return uniq[torch.argsort(first)]


def _sample_outside(total: int, taken: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` distinct positions of [0, total) not in the sorted ``taken``, uniformly at random.

    Rejection sampling costs O(k) expected while ``taken`` fills at most half the space; past
    that the complement is listed explicitly (O(total), only for dense-ish layers).
    """
    if taken.numel() > total // 2:
        free = torch.ones(total, dtype=torch.bool)
        free[taken] = False
        pool = free.nonzero().flatten()
        return pool[torch.randperm(pool.numel(), generator=gen)[:k]]
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        c = torch.randint(total, (2 * k + 16,), generator=gen)
        pos = torch.searchsorted(taken, c).clamp(max=max(taken.numel() - 1, 0))
        c = c[taken[pos] != c] if taken.numel() else c
        chosen = _first_occurrences(torch.cat([chosen, c]))
    return chosen[:k]


class _Capture:
    """Keeps (input, output-gradient) pairs of one layer while armed."""

    def __init__(self, owner: _DynamicSparse, layer: nn.Module) -> None:
        self.owner = owner
        self.pairs: list[list[torch.Tensor | None]] = []
        self.handle = layer.register_forward_hook(self._forward)

    def _forward(self, module, args, output):
        if not (self.owner._armed and module.training and torch.is_grad_enabled()):
            return
        if not output.requires_grad:
            return
        pair: list[torch.Tensor | None] = [args[0].detach(), None]
        self.pairs.append(pair)

        def keep_grad(g):
            pair[1] = g.detach()

        output.register_hook(keep_grad)


def _check_density_has_dense_layers(model, density, include, exclude) -> None:
    """``density`` converts dense layers: on a model that already holds bornsparse layers and
    no dense ones, say that density must be left out instead of "no nn.Linear" alone."""
    dense = [m for _, m in model.named_modules() if is_dense_target(m)]
    sparse = sparse_targets(model, include=include, exclude=exclude)
    if not dense and sparse:
        raise ValueError(
            f"density={density} converts nn.Linear/nn.Conv2d layers, but model has none: it "
            f"already holds bornsparse sparse layers ({', '.join(n for n, _ in sparse[:3])}"
            f"{', ...' if len(sparse) > 3 else ''}); leave density out and the schedule "
            "adopts those layers and their supports as they are"
        )


class _DynamicSparse(ABC):
    """Shared schedule, support bookkeeping, optimizer-state surgery and checkpointing."""

    grows_by_gradient = False

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        total_steps: int,
        density: float | None = None,
        distribution: str = DEFAULT_DISTRIBUTION["dynamic"],
        delta: int = 100,
        alpha: float = 0.3,
        t_end: int | None = None,
        kind: str = "sparse",
        include: Selector = None,
        exclude: Selector = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.total_steps = check_positive_int("total_steps", total_steps)
        self.delta = check_positive_int("delta", delta)
        self.alpha = check_fraction("alpha", alpha, low_open=False)
        if t_end is None:
            t_end = max(1, int(0.75 * self.total_steps))
        self.t_end = check_positive_int("t_end", t_end)
        if self.t_end > self.total_steps:
            raise ValueError(
                f"t_end must not exceed total_steps={self.total_steps}, got {self.t_end}"
            )
        self.kind = check_kind(kind)
        seed = check_seed(seed)
        self.seed = int(torch.randint(2**62, ()).item()) if seed is None else seed
        # a collective: under torch.distributed every rank constructs its RigL/SET here
        self.seed = rank0_seed(self.seed)
        self._gen = torch.Generator().manual_seed(self.seed)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got "
                f"{type(optimizer).__name__}"
            )
        self.model = model
        if density is not None:
            density = check_fraction("density", density)
            _check_density_has_dense_layers(model, density, include, exclude)
            meta = has_meta(model)
            if meta and optimizer is not None:
                raise ValueError(
                    "optimizer must be None for a model on the meta device (its parameters do "
                    "not exist yet): build the optimizer from model.parameters() after this "
                    "conversion and set it as .optimizer"
                )
            dev = None if device is None and not meta else torch.device(
                default_device(model) if device is None else device)
            if dev is not None and dev.type == "meta":
                raise ValueError(f"device must be a real device, not the meta device, got {dev}")
            self._sparsify(model, optimizer, density, distribution, include, exclude, dev)
            if meta:
                # drawn after every support and layer seed: the dense path's stream is unchanged
                materialize_meta(model, dev,
                                 seed=int(torch.randint(2**62, (), generator=self._gen)))
        elif device is not None:
            raise ValueError("device is only used with density (it places converted layers)")
        self.layers = sparse_targets(model, include=include, exclude=exclude)
        if not self.layers:
            raise ValueError(
                "model has no prunable layers: no bornsparse sparse layers, and no density "
                "was given to turn its nn.Linear/nn.Conv2d layers into sparse ones"
            )
        self._optimizer = None
        self.optimizer = optimizer
        self._t = 0
        self.updates = 0
        self._armed = False
        self._captures = (
            {name: _Capture(self, layer) for name, layer in self.layers}
            if self.grows_by_gradient else {}
        )
        self._arm()

    # ------------------------------------------------------------------ set-up

    def _sparsify(self, model, optimizer, density, distribution, include, exclude,
                  device) -> None:
        """Dense layers -> sparse layers on random supports of the distribution's counts.

        Supports and per-layer init seeds are drawn here from ``self._gen``, layer by layer
        in pre-order (support, then seed); :func:`swap_in_sparse_layers` builds the layers
        and puts a shared layer's one replacement at every name it is reachable under.
        """
        from bornsparse.nn._support import sample_support

        targets = dense_targets(model, include=include, exclude=exclude,
                                allow_meta=device is not None)
        counts = allocate_nnz([weight_shape(m) for _, m in targets], density, distribution)
        per_row = support_layout(distribution) == "per_row"
        supports, seeds = {}, {}
        for (name, mod), k in zip(targets, counts, strict=True):
            rows, cols = dense_shape(mod)
            idx = sample_support(rows, cols, k, self._gen, per_row=per_row)
            supports[name] = idx.to(mod.weight.device if device is None else device)
            seeds[name] = int(torch.randint(2**62, (), generator=self._gen))
        new = swap_in_sparse_layers(model, supports, kind=self.kind, layer_init=True,
                                    seeds=seeds, device=device)
        if optimizer is not None:
            rebind_optimizer(optimizer, {m.weight: (new[n].values, None) for n, m in targets})

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimizer

    @optimizer.setter
    def optimizer(self, opt: torch.optim.Optimizer | None) -> None:
        if opt is not None:
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(
                    f"optimizer must be a torch.optim.Optimizer or None, got {type(opt).__name__}"
                )
            held = {id(p) for g in opt.param_groups for p in g["params"]}
            missing = [n for n, l in self.layers if id(l.values) not in held]
            if missing:
                raise ValueError(
                    f"optimizer does not hold the values of sparse layers {missing}; build it "
                    "from model.parameters() after the model is sparse"
                )
        self._optimizer = opt

    # ------------------------------------------------------------------ schedule

    def drop_fraction(self, t: int) -> float:
        """Cosine-decayed drop fraction α/2·(1 + cos(π t / t_end)) at step t (0 from t_end)."""
        if t >= self.t_end:
            return 0.0
        return self.alpha / 2 * (1 + math.cos(math.pi * t / self.t_end))

    def is_update_step(self, t: int) -> bool:
        return t % self.delta == 0 and t < self.t_end

    @property
    def t(self) -> int:
        """Number of ``step()`` calls so far."""
        return self._t

    def _arm(self) -> None:
        self._armed = bool(self._captures) and self.is_update_step(self._t + 1)

    def step(self) -> bool:
        """Advance one training step; True when the caller should run ``optimizer.step()``.

        Call it once per step after ``loss.backward()``. On update steps (every ``delta``
        steps while t < t_end) the supports change and it returns False. Between ``t_end``
        and ``total_steps`` the topology is fixed; calling it more than ``total_steps`` times
        raises RuntimeError.
        """
        if self._optimizer is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs an optimizer; pass it to the constructor "
                "or set .optimizer"
            )
        if self._t >= self.total_steps:
            raise RuntimeError(
                f"{type(self).__name__}.step() called after the last step: total_steps="
                f"{self.total_steps} (topology updates stopped at t_end={self.t_end})"
            )
        self._t += 1
        update = self.is_update_step(self._t)
        if update:
            self._update(self.drop_fraction(self._t))
            self.updates += 1
        self._arm()
        return not update

    __call__ = step

    # ------------------------------------------------------------------ the update

    @abstractmethod
    def _grow(self, name, layer, kept_flat: torch.Tensor, k: int) -> torch.Tensor:
        """k distinct flat positions outside the sorted ``kept_flat``."""

    @torch.no_grad()
    def _update(self, fraction: float) -> None:
        for name, layer in self.layers:
            rows, cols = layer.dense_shape
            n = layer.nnz
            k = int(fraction * n)  # rows·cols - (n - k) >= k positions are free to grow
            if k == 0 or n == rows * cols:
                self._release(name)
                continue
            old_flat = indices_to_flat(layer.indices, cols)
            # averaged over ranks: replicas whose values drifted by rounding still agree
            magnitude = mean_over_ranks_(layer.values.detach().abs())
            # drop the k smallest magnitudes, ties to the lower position (stable)
            order = torch.argsort(magnitude, stable=True)
            kept_flat = torch.sort(old_flat[order[k:]]).values
            grown = self._grow(name, layer, kept_flat, k).to(kept_flat.device)
            new_flat = torch.sort(torch.cat([kept_flat, grown])).values
            self._apply(layer, old_flat, new_flat, cols)

    def _apply(self, layer, old_flat, new_flat, cols) -> None:
        n = old_flat.numel()
        pos = torch.searchsorted(old_flat, new_flat).clamp(max=n - 1)
        found = old_flat[pos] == new_flat
        dev = layer.values.device

        def carry(t: torch.Tensor) -> torch.Tensor:
            return torch.where(found, t[pos], torch.zeros((), dtype=t.dtype, device=dev))

        p = layer.values
        if self._optimizer is not None and p in self._optimizer.state:
            st = self._optimizer.state[p]
            for key, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and key not in _SCALAR_STATE:
                    st[key] = carry(v)
        if p.grad is not None:
            p.grad = carry(p.grad)
        new_idx = torch.stack([new_flat // cols, new_flat % cols]).to(layer.indices.device)
        layer.update_support_(new_idx, carry(p.detach()))
        if not torch.equal(layer.indices, new_idx):
            raise RuntimeError(
                f"{type(layer).__name__}.update_support_ reordered the support; optimizer state "
                "would no longer line up with the values"
            )

    def _release(self, name: str) -> None:
        if name in self._captures:
            self._captures[name].pairs.clear()

    # ------------------------------------------------------------------ checkpoints

    _STATE_KEYS = ("t", "updates", "total_steps", "t_end", "delta", "alpha", "seed", "rng")

    def state_dict(self) -> dict:
        """Schedule position, random state and a fingerprint of the topology it updates.

        Holds t and the update count (the schedule position: the drop fraction and the next
        update step follow from them), the schedule's settings (checked on load), the seed
        and the generator's state (SET grows from it), the class and layer kind, and each
        updated layer's name and nnz. Not the supports or values: those are the model's
        (``bornsparse.save`` or ``model.state_dict()``). Plain ints, floats, strings, lists
        and one uint8 tensor, so ``torch.load(..., weights_only=True)`` reads it.

        NOTE: take it after ``step()``. Gradient captures pending between the backward pass
        and the ``step()`` of an update step are not part of it.
        """
        return {
            "t": self._t,
            "updates": self.updates,
            "total_steps": self.total_steps,
            "t_end": self.t_end,
            "delta": self.delta,
            "alpha": self.alpha,
            "seed": self.seed,
            "rng": self._gen.get_state(),
            "class": type(self).__name__,
            "kind": self.kind,
            "layers": [[name, layer.nnz] for name, layer in self.layers],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; ValueError if it was made for another set-up.

        The model must already hold the checkpoint's supports (load the model first). The
        class, layer names and nnz are checked when the state has them (states written
        before they were added load too).
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = [k for k in self._STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"state is missing the keys {missing} of a "
                             f"{type(self).__name__} state_dict")
        for key in ("total_steps", "t_end", "delta", "alpha"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint has {key}={state[key]!r} but this {type(self).__name__} has "
                    f"{getattr(self, key)!r}"
                )
        if "class" in state and state["class"] != type(self).__name__:
            raise ValueError(
                f"checkpoint is a {state['class']} state, not a {type(self).__name__} one"
            )
        if "layers" in state:
            ours = [[name, layer.nnz] for name, layer in self.layers]
            theirs = [[str(n), int(k)] for n, k in state["layers"]]
            if theirs != ours:
                raise ValueError(
                    f"checkpoint's layers (name, nnz) {theirs} do not match this "
                    f"{type(self).__name__}'s {ours}: load the model's checkpoint first"
                )
        self._t = int(state["t"])
        self.updates = int(state["updates"])
        self.seed = int(state["seed"])
        self._gen.set_state(state["rng"])
        for c in self._captures.values():
            c.pairs.clear()
        self._arm()

    def remove_hooks(self) -> None:
        """Detach the gradient-capture hooks (after training; the model stays as it is)."""
        for c in self._captures.values():
            c.handle.remove()
            c.pairs.clear()
        self._captures = {}
        self._armed = False

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={len(self.layers)}, t={self._t}/"
                f"{self.total_steps}, delta={self.delta}, alpha={self.alpha}, "
                f"t_end={self.t_end})")


def dense_gradient(layer: nn.Module, pairs) -> torch.Tensor:
    """∂L/∂S as a dense (rows, cols) matrix from captured (input, output-gradient) pairs.

    For y = S x (+ α·T(x) + b) the gradient w.r.t. every entry of S is gᵀx whether or not the
    entry is in the support; convolutions use ``torch.nn.grad.conv2d_weight``.
    """
    rows, cols = layer.dense_shape
    total = None
    for x, g in pairs:
        if g is None:
            continue
        if hasattr(layer, "kernel_size"):
            kh, kw = layer.kernel_size
            gw = torch.nn.grad.conv2d_weight(
                x, (rows, cols // (kh * kw), kh, kw), g, stride=layer.stride,
                padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
            ).reshape(rows, cols)
        else:
            gw = g.reshape(-1, rows).transpose(0, 1) @ x.reshape(-1, cols)
        total = gw if total is None else total + gw
    return total


class RigL(_DynamicSparse):
    """RigL: drop the smallest |w|, grow where the dense gradient is largest.

    Args:
        model: a model with bornsparse sparse layers (SparseLinear, SparseConv2d, or the S of
            DCTPlusSparse layers: DCTpS + RigL), or a dense model together with ``density``.
        optimizer: the optimizer holding the layers' ``values`` (may be None and set later as
            ``.optimizer``; ``step()`` needs it). When ``density`` converts a dense model the
            optimizer's references to the dense weights are replaced by the new values.
        total_steps: the number of training steps; ``step()`` may be called that often.
        density: if given, every dense nn.Linear/nn.Conv2d (filtered by include/exclude)
            becomes a ``kind`` sparse layer on a random support with ``distribution``'s
            per-layer counts, values initialised by the sparse layer itself (Kaiming with
            the sparse fan-in; zeros for the S of DCTpS, as in the paper).
        distribution: per-layer allocation (default "erk"), only used with ``density``.
        delta: steps between topology updates (ΔT, default 100).
        alpha: initial drop fraction (default 0.3), decayed by a cosine to 0 at ``t_end``.
        t_end: last step that may update the topology (default 75% of total_steps).
        kind: ``"sparse"`` (SparseLinear/SparseConv2d) or ``"dctps"`` (the S of
            DCT-plus-sparse layers), the layers ``density`` converts to.
        include, exclude: a :data:`~bornsparse.sparsity.swap.Selector` (glob pattern(s) on
            qualified layer names, or a callable ``(name, module) -> bool``) choosing the
            layers converted and updated; a layer shared under several names is chosen when
            any of them passes, and replaced at all of them.
        seed: random seed of the initial supports (and of SET's growth); under
            torch.distributed rank 0's seed is used on every rank.
        device: with ``density``, where the converted layers live (default: each dense
            layer's device). Born sparse: the model may be built on the meta device (no dense
            weight ever allocated); the sparse layers are then built on ``device`` (default:
            the model's non-meta device, else the CPU), meta biases drawn like nn.Linear's
            default, and the remaining meta modules (BatchNorm, ...) get ``to_empty`` +
            ``reset_parameters()``, all from ``seed``. The meta model's parameters do not
            exist before, so ``optimizer`` must then be None: build it from
            ``model.parameters()`` afterwards and set ``.optimizer``.
    """

    grows_by_gradient = True

    def _grow(self, name, layer, kept_flat, k):
        pairs = self._captures[name].pairs
        grad = dense_gradient(layer, pairs)
        pairs.clear()
        if grad is None:
            raise RuntimeError(
                f"RigL update at step {self._t} found no gradient for layer {name!r}: run the "
                "forward and backward pass in training mode before step()"
            )
        # each rank saw its own batch: the mean is the gradient of the global batch's loss
        score = mean_over_ranks_(grad.contiguous()).abs().flatten()
        score[kept_flat] = -math.inf
        return torch.argsort(score, descending=True, stable=True)[:k]


class SET(_DynamicSparse):
    """SET: drop the smallest |w|, grow uniformly at random among absent positions.

    Same arguments as :class:`RigL`; no gradient is captured.
    """

    def _grow(self, name, layer, kept_flat, k):
        rows, cols = layer.dense_shape
        # drawn on the CPU generator so a seed gives the same supports on every device
        return _sample_outside(rows * cols, kept_flat.cpu(), k, self._gen)
