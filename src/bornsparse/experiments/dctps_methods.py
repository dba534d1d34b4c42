"""The methods of the DCTpS slides' comparison, one small function each, and what they share.

Every method is ``fn(ctx, density) -> nn.Module``: it builds the model through ``ctx``, makes
it sparse its own way, calls ``ctx.initialised(model)`` once the network it will train exists
(Jacobian spectra and the "at init" memory sample are taken there), trains it with
``ctx.train`` and returns the trained model. :data:`METHODS` maps names to :class:`Method`.

Memory is measured as *live tensor bytes* (:class:`~bornsparse.experiments.measure.MemoryTracker`:
every torch storage the process holds, minus those alive before the run, the data set), so
it does not see activations saved for backward, which are the same for every method at a
given batch size (hidden representations are dense for all of them). Samples are taken at
fixed moments: ``init`` when the model is built (a
materialised dense one for the dense baseline, pruning at init and IMP; on the meta device,
so nothing dense is ever allocated, for the born-sparse methods: random, DCTpS, RigL/SET,
which ``sparsify``/``RigL(density=...)`` build from shapes alone), inside
the first two scoring passes of SNIP/GraSP/FORCE, and when the network to be trained is
ready; ``training`` after the first optimizer step of each training run (parameters,
gradients and optimizer state alive; every later step looks alike), after each IMP prune,
and for RigL at its first topology update while the capture hooks hold their tensors;
``final`` after training with gradients and optimizer dropped. Each column is the maximum
over its samples.
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bornsparse.experiments.measure import MemoryTracker

# ---------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe of one run (every method of a table shares it)."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str  # "adam" or "sgd"
    weight_decay: float = 0.0
    momentum: float = 0.9
    augment: bool = False  # random crop + flip (CIFAR)
    imp_rounds: int = 3
    pai_batches: int = 4  # batches of training data SNIP/GraSP/FORCE score with
    pai_rounds: int = 100  # iterations of SynFlow and FORCE
    jacobian_inputs: int = 8  # test inputs whose Jacobian spectra are recorded (0: none)


# ---------------------------------------------------------------------------------------
# The run context: data, model factory, training loop


@dataclass
class RunContext:
    """Everything a method needs: data, how to build the dense model, the recipe."""

    splits: Any  # bornsparse.data.datasets.Splits
    model_name: str
    model_kwargs: dict[str, Any]
    train_cfg: TrainConfig
    seed: int
    memory: MemoryTracker = field(default_factory=MemoryTracker)
    info: dict[str, Any] = field(default_factory=dict)
    jacobian_sv: list[list[float]] | None = None

    def __post_init__(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed + 0xDA7A)  # batches, apart from init

    # ---- building

    def build_dense(self) -> nn.Module:
        """The dense model, initialised from the run's seed."""
        from bornsparse.models import build_model

        torch.manual_seed(self.seed)
        model = build_model(self.model_name, num_classes=self.splits.num_classes,
                            input_shape=self.splits.input_shape, **self.model_kwargs)
        self.memory.sample("init")
        return model

    def build_meta(self) -> tuple[nn.Module, torch.device]:
        """The model on the meta device (shapes only) and the device to materialise it on.

        For the born-sparse methods: ``sparsify``/``RigL(density=...)`` build the sparse
        layers there from the shapes, so no dense weight is ever allocated. The global RNG is
        seeded as in :meth:`build_dense`; those calls take ``seed=self.seed``, so a run is
        reproducible per seed.
        """
        from bornsparse.models import build_model

        kwargs = dict(self.model_kwargs)
        device = torch.device(kwargs.pop("device", None) or "cpu")
        torch.manual_seed(self.seed)
        with torch.device("meta"):
            model = build_model(self.model_name, num_classes=self.splits.num_classes,
                                input_shape=self.splits.input_shape, device="meta", **kwargs)
        self.memory.sample("init")
        return model, device

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam or SGD (momentum, weight decay) on the trainable parameters of ``model``."""
        cfg = self.train_cfg
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)

    def pai_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A few training batches for data-dependent pruning at init (seeded)."""
        n = self.splits.train_x.shape[0]
        g = torch.Generator().manual_seed(self.seed + 0x5C0E)
        perm = torch.randperm(n, generator=g)
        bs = min(self.train_cfg.batch_size, n)
        out = []
        for i in range(self.train_cfg.pai_batches):
            idx = perm[(i * bs) % n:(i * bs) % n + bs]
            out.append((self.splits.train_x[idx], self.splits.train_y[idx]))
        return out

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.splits.train_x.shape[0] / self.train_cfg.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.train_cfg.epochs

    # ---- the moment the network to train exists

    def initialised(self, model: nn.Module) -> None:
        """Record the init-time memory sample and the Jacobian spectra of ``model``."""
        t0 = time.perf_counter()
        self.info["init_s"] = t0 - self.info.get("t_start", t0)
        self.memory.sample("init")
        k = min(self.train_cfg.jacobian_inputs, self.splits.test_x.shape[0])
        if k > 0:
            from bornsparse.experiments.jacobian import jacobian_singular_values

            t1 = time.perf_counter()
            sv = jacobian_singular_values(model, self.splits.test_x[:k])
            self.jacobian_sv = [[float(v) for v in row] for row in sv]
            # a measurement, not the method's cost: excluded from its run time
            self.info["jacobian_s"] = self.info.get("jacobian_s", 0.0) + (
                time.perf_counter() - t1)

    # ---- training

    def train(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        gate: Callable[[], bool] | None = None,
        after_step: Callable[[], None] | None = None,
        before_gate: Callable[[], None] | None = None,
    ) -> bool:
        """``epochs`` epochs of minibatch cross-entropy training with a cosine learning rate.

        ``gate()`` (RigL/SET) runs after backward and decides whether the optimizer steps;
        ``after_step()`` (IMP) runs after every step; ``before_gate()`` right before the gate.
        Returns False if the loss became non-finite (training stops there).
        """
        from bornsparse.data.datasets import random_crop_flip

        cfg = self.train_cfg
        x_all, y_all = self.splits.train_x, self.splits.train_y
        n = x_all.shape[0]
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, self.total_steps)
                                                     / self.total_steps)))
        model.train()
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n, generator=self._gen)
            for i, start in enumerate(range(0, n, cfg.batch_size)):
                idx = perm[start:start + cfg.batch_size]
                x, y = x_all[idx], y_all[idx]
                if cfg.augment:
                    x = random_crop_flip(x, generator=self._gen)
                loss = F.cross_entropy(model(x), y)
                if not torch.isfinite(loss):
                    return False
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if before_gate is not None:
                    before_gate()
                if gate is None or gate():
                    optimizer.step()
                with warnings.catch_warnings():
                    # RigL skips the optimizer on update steps; the schedule still advances
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
                    sched.step()
                if after_step is not None:
                    after_step()
                if epoch == 0 and i == 0:  # the steady state: every later step looks alike
                    self.memory.sample("training")
        return True

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        """Test accuracy in [0, 1]."""
        model.eval()
        correct = 0
        x, y = self.splits.test_x, self.splits.test_y
        for s in range(0, x.shape[0], 1000):
            correct += int((model(x[s:s + 1000]).argmax(1) == y[s:s + 1000]).sum())
        return correct / x.shape[0]


# ---------------------------------------------------------------------------------------
# The methods


def _static(ctx: RunContext, model: nn.Module) -> nn.Module:
    """Initialised hook, then plain training of a network whose support never changes."""
    ctx.initialised(model)
    opt = ctx.make_optimizer(model)
    ctx.info["finite"] = ctx.train(model, opt)
    return model


def dense(ctx: RunContext, density: float | None) -> nn.Module:
    """The dense baseline (``density`` is ignored)."""
    return _static(ctx, ctx.build_dense())


def _random(distribution: str, kind: str, *, train_alpha: bool = True):
    def method(ctx: RunContext, density: float) -> nn.Module:
        from bornsparse.models.sparsify_model import sparsify

        model, device = ctx.build_meta()
        report = sparsify(model, kind=kind, density=density, distribution=distribution,
                          seed=ctx.seed, device=device)
        ctx.info["nnz"] = _report_nnz(report, model)
        _record_dct_order(ctx, model)
        if not train_alpha:
            _freeze_alpha(model)
        return _static(ctx, model)

    return method


def _record_dct_order(ctx: RunContext, model: nn.Module) -> None:
    """Put the patch order of the model's DCT-plus-sparse convolutions in the run record:
    it changes the function (``DCTPlusSparseConv2d(dct_order=...)``)."""
    orders = sorted({m.dct_order for m in model.modules() if hasattr(m, "dct_order")})
    if orders:
        ctx.info["dct_order"] = orders[0] if len(orders) == 1 else orders


def _report_nnz(report: Any, model: nn.Module) -> int:
    for attr in ("nnz", "total_nnz"):
        nnz = getattr(report, attr, None)
        if isinstance(nnz, int):
            return nnz
    from bornsparse.sparsity.swap import sparse_targets

    return sum(layer.nnz for _, layer in sparse_targets(model))


def _freeze_alpha(model: nn.Module) -> None:
    """α of every DCT-plus-sparse layer stays at its initial 1 (the slides' "fixed α")."""
    n = 0
    for mod in model.modules():
        a = getattr(mod, "alpha", None)
        if isinstance(a, torch.Tensor) and hasattr(mod, "values"):
            a.requires_grad_(False)
            n += 1
    if n == 0:
        raise RuntimeError("no DCT-plus-sparse layer found to fix α in")


def _pai(name: str):
    def method(ctx: RunContext, density: float) -> nn.Module:
        from bornsparse.sparsity.pruning_at_init import prune_at_init

        model = ctx.build_dense()
        calls = []

        def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            # inside the scoring loop: dense weights, masks and last round's scores alive
            if len(calls) < 2:
                ctx.memory.sample("init")
            calls.append(1)
            return F.cross_entropy(logits, y)

        report = prune_at_init(
            model, name, density, data=ctx.pai_batches(), kind="sparse", loss_fn=loss_fn,
            rounds=ctx.train_cfg.pai_rounds, input_shape=ctx.splits.input_shape,
        )
        ctx.info["nnz"] = report.nnz
        ctx.info["floor_moved"] = report.floor_moved
        return _static(ctx, model)

    method.__doc__ = f"{name} pruning at initialisation (global selection), then training."
    return method


def imp(ctx: RunContext, density: float) -> nn.Module:
    """Iterative magnitude pruning: ``imp_rounds`` rounds of full dense (masked) training,
    each pruning to density^(r/R) and rewinding to initialisation; then the final training
    of the sparse network from the rewound weights."""
    from bornsparse.sparsity import IMP

    model = ctx.build_dense()
    opt = ctx.make_optimizer(model)
    pruner = IMP(model, opt, rounds=ctx.train_cfg.imp_rounds, density=density,
                 rewind_iteration=0)
    ctx.memory.sample("init")
    for _ in range(pruner.rounds):
        if not ctx.train(model, opt, after_step=pruner.step):
            ctx.info["finite"] = False
            return model
        pruner.prune()
        ctx.memory.sample("training")
    model = pruner.to_sparse()
    del opt, pruner
    ctx.info["nnz"] = _report_nnz(None, model)
    # rewinding to iteration 0 restores an empty optimizer state: a fresh optimizer is exact
    return _static(ctx, model)


def _dynamic(kind: str, cls_name: str = "RigL"):
    def method(ctx: RunContext, density: float) -> nn.Module:
        from bornsparse import sparsity

        model, device = ctx.build_meta()
        total = ctx.total_steps
        t_end = max(1, int(0.75 * total))
        # about 15 topology updates before t_end, as RigL's ΔT = 100 gives on its CIFAR runs
        # relative to their length would be far fewer; short runs need a shorter ΔT
        delta = max(1, t_end // 15)
        dyn = getattr(sparsity, cls_name)(
            model, None, total_steps=total, density=density, distribution="erk",
            delta=delta, t_end=t_end, kind=kind, seed=ctx.seed, device=device,
        )
        ctx.info["nnz"] = _report_nnz(None, model)
        _record_dct_order(ctx, model)
        ctx.info["rigl_delta"] = delta
        ctx.initialised(model)
        opt = ctx.make_optimizer(model)
        dyn.optimizer = opt

        sampled = []

        def before_gate() -> None:
            # the first update step, while the capture hooks hold the layers' inputs and
            # output gradients (RigL; SET captures nothing)
            if not sampled and dyn.is_update_step(dyn.t + 1):
                ctx.memory.sample("training")
                sampled.append(True)

        ctx.info["finite"] = ctx.train(model, opt, gate=dyn.step, before_gate=before_gate)
        ctx.info["rigl_updates"] = dyn.updates
        dyn.remove_hooks()
        return model

    return method


@dataclass(frozen=True)
class Method:
    """A compared method: ``fn(ctx, density)``, its table label, and what it needs."""

    fn: Callable[[RunContext, float | None], nn.Module]
    label: str
    sparse: bool = True
    needs: tuple[str, ...] = ()  # modules that must exist for the method to run


METHODS: dict[str, Method] = {
    "dense": Method(dense, "Dense", sparse=False),
    "random_uniform": Method(_random("uniform", "sparse"), "Random (Uniform)",
                             needs=("bornsparse.models.sparsify_model",
                                    "bornsparse.sparsity.distributions")),
    "random_epl": Method(_random("epl", "sparse"), "Random (EPL)",
                         needs=("bornsparse.models.sparsify_model",
                                "bornsparse.sparsity.distributions")),
    "snip": Method(_pai("snip"), "SNIP", needs=("bornsparse.sparsity.pruning_at_init",)),
    "grasp": Method(_pai("grasp"), "GraSP", needs=("bornsparse.sparsity.pruning_at_init",)),
    "force": Method(_pai("force"), "FORCE", needs=("bornsparse.sparsity.pruning_at_init",)),
    "synflow": Method(_pai("synflow"), "SynFlow", needs=("bornsparse.sparsity.pruning_at_init",)),
    "imp": Method(imp, "IMP", needs=("bornsparse.sparsity.imp",)),
    "rigl": Method(_dynamic("sparse"), "RigL (ERK)",
                   needs=("bornsparse.sparsity.dynamic", "bornsparse.sparsity.distributions")),
    "dctps": Method(_random("epl", "dctps"), "DCTpS",
                    needs=("bornsparse.models.sparsify_model", "bornsparse.sparsity.distributions",
                           "bornsparse.nn.dct_plus_sparse")),
    "dctps_rigl": Method(_dynamic("dctps"), "DCTpS + RigL",
                         needs=("bornsparse.sparsity.dynamic",
                                "bornsparse.sparsity.distributions",
                                "bornsparse.nn.dct_plus_sparse")),
    "dctps_fixed_alpha": Method(_random("epl", "dctps", train_alpha=False), "DCTpS (α = 1 fixed)",
                                needs=("bornsparse.models.sparsify_model",
                                       "bornsparse.sparsity.distributions",
                                       "bornsparse.nn.dct_plus_sparse")),
}

#: the methods compared by default, in table order (GraSP is available but not in the DCTpS
#: slides' table)
DEFAULT_METHODS: tuple[str, ...] = (
    "dense", "random_uniform", "random_epl", "snip", "force", "synflow", "imp", "rigl",
    "dctps", "dctps_rigl", "dctps_fixed_alpha",
)


def run_method(name: str, ctx: RunContext, density: float | None) -> tuple[nn.Module, float]:
    """Run method ``name`` in ``ctx``; returns (trained model, test accuracy)."""
    ctx.info["t_start"] = time.perf_counter()
    sampling = ctx.memory.seconds
    model = METHODS[name].fn(ctx, density)
    # the method's own time: its memory samples and Jacobian spectra excluded
    measured = ctx.memory.seconds - sampling + ctx.info.get("jacobian_s", 0.0)
    ctx.info["wall_s"] = time.perf_counter() - ctx.info["t_start"] - measured
    ctx.info["measure_s"] = measured
    acc = ctx.evaluate(model)
    for p in model.parameters():
        p.grad = None
    gc.collect()
    ctx.memory.sample("final")
    return model, acc
