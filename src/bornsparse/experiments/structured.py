"""Structured layers in trained MLPs: every hidden block method at equal trainable parameters.

``bornsparse reproduce structured`` trains, on MNIST-1D and sklearn digits, an MLP
in → n → n → n → classes whose n × n hidden layers are each method of
:mod:`structured_methods` (dense, low rank, Monarch, G(θ) and h_θ of the permuted
block-diagonal paper, random sparse, DCTpS of the DCTpS slides, and a sparse layer on a
fixed random G₀ offset at two depths) at budgets of 1/128, 1/32 and 1/8 of the dense
weights per hidden layer. It appends one JSON line per run to ``DIR/results.jsonl``
(rerunning skips finished runs) and writes ``table.md`` and figures of accuracy against
trainable parameters and against the f+b time per batch (:mod:`structured_report`).

Width n = 512: a power of two, so Monarch's blocks, G(θ)'s 2×2 blocks and the ranks all hit
the budgets exactly (1/128 of 512² is rank 2, depth 2, 256 Monarch blocks); at n = 256 the
smallest budget would leave rank 1, depth 1 and 1×1 Monarch blocks. ``add_arguments`` and
``main`` are the CLI entry points, the shared skeleton of :mod:`bornsparse.experiments.command`;
heavy imports happen inside functions.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Iterable
from typing import Any

from bornsparse.experiments import command, structured_report

DATASETS = ("mnist1d", "digits")
WIDTH = 512
BLOCKS = 2
BUDGETS = (1 / 128, 1 / 32, 1 / 8)
# Adam at the MNIST-1D paper's lr 1e-2, cosine-annealed to 0, batch 128 (as `reproduce dctps`);
# fewer epochs than there (20, 30) so that the 150 runs of the full sweep take ~10 minutes on
# 2 cores: 384 and 240 steps
EPOCHS = {"mnist1d": 12, "digits": 20}
LR = 1e-2
BATCH_SIZE = 128
# the orthogonality penalty's weight over training, as the permuted block-diagonal paper's
# §5 schedule (3 for 7000 of 12000 steps, then 0.3), by fraction of the steps
PENALTY_SCHEDULE = ((7 / 12, 3.0), (1.0, 0.3))
# f+b times are the median over the steps after these (numba JIT, allocator warm-up)
TIMING_WARMUP = 10
# quick: G(θ) at two block sizes only, so that the demo's step stays under a minute
QUICK = {"datasets": ("mnist1d",), "seeds": 1, "epochs": 6, "block_sizes": (2, 8)}
# MNIST-1D samples generated (train 80%, test 20%): the full run's 40,000 make dense the
# ceiling (at the package's 5,000 it overfits and ranks last); --quick keeps 5,000
SAMPLES = 40_000
QUICK_SAMPLES = 5_000


# ---------------------------------------------------------------------------------------
# Configurations


def make_config(*, dataset: str, method: str, budget: float | None, seed: int, width: int,
                blocks: int, train: dict[str, Any], samples: int | None = None,
                block_size: int | None = None) -> dict[str, Any]:
    """The JSON-serialisable configuration of one run; its hash is the resume key.
    ``samples``: MNIST-1D samples generated (None for digits); ``block_size``: G(θ)'s k
    (None for the other methods)."""
    return {"experiment": "structured", "dataset": dataset, "method": method,
            "budget": budget, "seed": seed, "width": width, "blocks": blocks, "train": train,
            "samples": samples, "block_size": block_size}


def default_train(dataset: str, *, quick: bool = False) -> dict[str, Any]:
    """The training recipe of ``dataset`` (``quick``: fewer epochs)."""
    return {"epochs": QUICK["epochs"] if quick else EPOCHS[dataset], "batch_size": BATCH_SIZE,
            "lr": LR, "penalty_schedule": [list(p) for p in PENALTY_SCHEDULE],
            "timing_warmup": TIMING_WARMUP}


def build_configs(args: argparse.Namespace) -> command.Plan:
    """Validate every flag before anything trains; ValueError naming the flag on bad input.
    Returns the :class:`~bornsparse.experiments.command.Plan` (configs, info)."""
    from bornsparse.experiments.structured_methods import BLOCK_SIZES, METHODS, fits_budget

    quick = bool(args.quick)
    datasets = command.choices("--datasets", command.pick(
        args.datasets, quick=quick, quick_value=QUICK["datasets"], full_value=DATASETS),
        DATASETS, what="data set")
    methods = command.choices("--methods", args.methods or list(METHODS), METHODS,
                              what="method")
    if "dense" not in methods:
        methods.insert(0, "dense")  # the reference line of every figure
    budgets = command.fractions("--budgets", args.budgets or BUDGETS, what="budget")
    seeds = command.seed_list(args.seeds, quick=quick)
    width = command.pick(args.width, quick=quick, quick_value=WIDTH, full_value=WIDTH)
    blocks = command.positive_int("--blocks", args.blocks)
    if width < 4 or width % 2:
        raise ValueError(f"--width must be an even integer >= 4 (2×2 blocks), got {width}")
    samples = command.pick(args.samples, quick=quick, quick_value=QUICK_SAMPLES,
                           full_value=SAMPLES)
    if samples < 100:
        raise ValueError(f"--samples must be at least 100 (MNIST-1D draws samples // 10 per "
                         f"class, 80% for training), got {samples}")
    # the defaults that divide the width (a narrow test width keeps the small ones)
    block_sizes = command.distinct("--block-sizes", args.block_sizes or [
        k for k in (QUICK["block_sizes"] if quick else BLOCK_SIZES) if width % k == 0])
    for k in block_sizes:
        if k < 2 or width % k:
            raise ValueError(f"--block-sizes: every block size must be at least 2 and "
                             f"divide --width {width}, got {k}")
    train = {d: _train_recipe(args, d, quick) for d in datasets}

    configs, too_big = [], []
    for seed in seeds:
        for dataset in datasets:
            n = samples if dataset == "mnist1d" else None
            for method in methods:
                for b in (budgets if METHODS[method].budgeted else [None]):
                    for k in (block_sizes if method == "permuted" else [None]):
                        if not fits_budget(method, width, b, block_size=k or 2):
                            if seed == 0 and dataset == datasets[0]:
                                too_big.append((method, k, b))
                            continue
                        configs.append(make_config(
                            dataset=dataset, method=method, budget=b, seed=seed, width=width,
                            blocks=blocks, train=train[dataset], samples=n, block_size=k))
    info = {"datasets": datasets, "methods": methods, "budgets": budgets,
            "seeds": len(seeds), "width": width, "blocks": blocks, "samples": samples,
            "block_sizes": block_sizes, "too_big": too_big, "train": train,
            "notes": [_not_run(*t) for t in too_big],
            "description": f"{', '.join(datasets)}, width {width}, {blocks} hidden blocks, "
            f"budgets {', '.join(structured_report.budget_text(b) for b in budgets)}, "
            f"{len(seeds)} seed(s), MNIST-1D at {samples:,} samples"}
    return command.Plan(configs, info)


def _train_recipe(args: argparse.Namespace, dataset: str, quick: bool) -> dict[str, Any]:
    """The ``train`` field of ``dataset``'s configurations: its recipe, flags overriding."""
    train = default_train(dataset, quick=quick)  # quick: fewer epochs
    for flag, key, check in (("--epochs", "epochs", command.positive_int),
                             ("--batch-size", "batch_size", command.positive_int),
                             ("--lr", "lr", command.positive_float)):
        value = getattr(args, key)
        train[key] = check(flag, train[key] if value is None else value)
    return train


def _not_run(method: str, k: int | None, budget: float) -> str:
    return (f"not run: {method}{'' if k is None else f' k={k}'} at budget "
            f"{structured_report.budget_text(budget)} (its smallest size is more than 50% "
            "over the budget)")


# ---------------------------------------------------------------------------------------
# One run


def penalty_weight(schedule: list[list[float]], step: int, total: int) -> float:
    """The penalty weight at ``step`` of ``total``: the first phase whose end fraction lies
    beyond step/total."""
    frac = step / max(1, total)
    for end, weight in schedule:
        if frac < end:
            return float(weight)
    return float(schedule[-1][1])


def dataset_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """load_dataset's options for a run: MNIST-1D's sample count."""
    return {"num_samples": cfg["samples"]} if cfg.get("samples") else {}


def structured_run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration and return its results record.

    Record: the config's ``method``, ``dataset``, ``budget``, ``seed``, ``block_size``
    (G(θ)'s k, else None); ``train_samples`` (training-set size); ``accuracy`` (test,
    in [0, 1]); ``hidden_params`` (trainable parameters of one hidden block, the budgeted
    count), ``budget_params`` (its target), ``budget_error`` (relative), ``size`` (what the
    method took: rank, nblocks, depth, nnz, offset_depth), ``trainable_params`` (whole
    model); ``stored_bytes`` and ``hidden_stored_bytes`` (state_dict bytes of the model and
    of one block); ``fb_ms`` (median forward + loss + backward time per batch over the warm
    steps, ``fb_ms_mean``, ``timed_steps``) and ``step_ms`` (with the optimizer step);
    ``memory_bytes`` (live tensor bytes at init, in training and at the end, and
    ``activations``, what autograd saves in one step) and ``peak_memory_bytes`` (training
    + activations); ``train_wall_s``, ``wall_s``, ``finite``, ``final_penalty``.
    """
    import torch

    from bornsparse.data import load_dataset
    from bornsparse.experiments.measure import MemoryTracker, stored_size
    from bornsparse.experiments.results_io import library_versions, run_key
    from bornsparse.experiments.structured_methods import (
        budget_params,
        build_mlp,
        trainable_params,
    )

    t_start = time.perf_counter()
    splits = load_dataset(cfg["dataset"], **dataset_options(cfg))
    memory = MemoryTracker()  # after the data: its tensors are not the method's memory
    width, budget = cfg["width"], cfg["budget"]
    model, size = build_mlp(cfg["method"], input_shape=splits.input_shape,
                            num_classes=splits.num_classes, width=width,
                            blocks=cfg["blocks"], budget=budget, seed=cfg["seed"],
                            block_size=cfg.get("block_size") or 2)
    memory.sample("init")
    block = model.blocks[0]
    hidden = trainable_params(block)
    target = budget_params(width, budget) if budget is not None else hidden
    run = _train(model, splits, cfg["train"], cfg["seed"], memory)
    accuracy, final_penalty = _evaluate(model, splits)
    if not run["finite"]:
        accuracy = None  # diverged: the penalty is still recorded, whatever it became
    for p in model.parameters():
        p.grad = None
    memory.sample("final")
    peaks = dict(memory.peaks)
    peaks["activations"] = run["activations"]
    fb, steps = run["fb"], run["step_times"]
    return {
        "key": run_key(cfg), "config": cfg, "method": cfg["method"], "dataset": cfg["dataset"],
        "budget": budget, "seed": cfg["seed"], "block_size": cfg.get("block_size"),
        "train_samples": int(splits.train_x.shape[0]), "accuracy": accuracy,
        "finite": run["finite"], "hidden_params": hidden, "budget_params": target,
        "budget_error": hidden / target - 1.0, "size": size,
        "trainable_params": trainable_params(model),
        "stored_bytes": stored_size(model)["bytes"],
        "hidden_stored_bytes": stored_size(block)["bytes"],
        "fb_ms": 1e3 * statistics.median(fb) if fb else None,
        "fb_ms_mean": 1e3 * statistics.fmean(fb) if fb else None,
        "step_ms": 1e3 * statistics.median(steps) if steps else None,
        "timed_steps": len(fb), "steps": run["steps"],
        "memory_bytes": peaks, "peak_memory_bytes": peaks["training"] + run["activations"],
        "final_penalty": final_penalty,
        "train_wall_s": run["wall_s"], "wall_s": time.perf_counter() - t_start,
        "torch_threads": torch.get_num_threads(), "versions": library_versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _train(model: Any, splits: Any, tr: dict[str, Any], seed: int, memory: Any) -> dict:
    """Adam with a cosine learning rate for ``tr["epochs"]`` epochs, the penalty (G(θ),
    h_θ) on its schedule; stops at a non-finite loss.

    Returns ``fb`` and ``step_times`` (seconds per warm step: forward + loss + backward, and
    with the optimizer step), ``activations`` (bytes autograd saved in the first step),
    ``steps`` (the steps taken, the non-finite one excluded), ``finite`` and ``wall_s``
    (memory sampling excluded). Samples ``memory`` "training" after the first step.
    """
    import math

    import torch
    import torch.nn.functional as F

    from bornsparse.experiments.measure import saved_activation_bytes

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=tr["lr"])
    x_all, y_all = splits.train_x, splits.train_y
    n, bs = x_all.shape[0], tr["batch_size"]
    total = math.ceil(n / bs) * tr["epochs"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    warmup = min(tr["timing_warmup"], total // 2)
    gen = torch.Generator().manual_seed(seed + 0xDA7A)  # batches, apart from the init
    out: dict[str, Any] = {"fb": [], "step_times": [], "activations": 0, "finite": True}
    has_penalty = any(hasattr(b, "orthogonality_penalty") for b in model.blocks)

    def loss_of(logits, y, step):
        loss = F.cross_entropy(logits, y)
        if has_penalty:
            loss = loss + penalty_weight(tr["penalty_schedule"], step, total) * model.penalty()
        return loss

    model.train()
    t_train, sampling = time.perf_counter(), memory.seconds
    step = 0
    for _ in range(tr["epochs"]):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            x, y = x_all[idx], y_all[idx]
            t0 = time.perf_counter()
            if step == 0:  # a cold step, not timed: measure what autograd keeps instead
                loss, out["activations"] = saved_activation_bytes(
                    model, x, y, functools.partial(loss_of, step=0))
            else:
                loss = loss_of(model(x), y, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            sched.step()
            t2 = time.perf_counter()
            if step >= warmup:
                out["fb"].append(t1 - t0)
                out["step_times"].append(t2 - t0)
            if step == 0:  # parameters, gradients and optimizer state: every step alike
                memory.sample("training")
            if not torch.isfinite(loss.detach()):
                out["finite"] = False
                break
            step += 1
        if not out["finite"]:
            break
    out["steps"] = step
    out["wall_s"] = time.perf_counter() - t_train - (memory.seconds - sampling)
    return out


def _evaluate(model: Any, splits: Any) -> tuple[float, float | None]:
    """(test accuracy in [0, 1], the final orthogonality penalty or None)."""
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, splits.test_x.shape[0], 1000):
            logits = model(splits.test_x[s:s + 1000])
            correct += int((logits.argmax(1) == splits.test_y[s:s + 1000]).sum())
        penalty = model.penalty()
    return correct / splits.test_x.shape[0], None if penalty is None else float(penalty)


# ---------------------------------------------------------------------------------------
# Sweep


def _cost_order(cfg: dict[str, Any]) -> tuple:
    """Seed by seed (a sweep stopped early leaves whole tables), longest runs first inside."""
    m, b = cfg["method"], cfg["budget"] or 1.0
    slow = {"permuted_tanh": 4.0, "dense": 2.0, "permuted": 1.5}.get(m, 1.0)
    return (cfg["seed"], -slow * (1 + 8 * b) * cfg["train"]["epochs"])


def _describe(rec: dict[str, Any]) -> str:
    acc = "diverged" if rec["accuracy"] is None else f"{100 * rec['accuracy']:.1f}%"
    b = "" if rec["budget"] is None else f" {rec['budget']:.4g}"
    k = "" if not rec.get("block_size") else f" k={rec['block_size']}"
    return f"{rec['dataset']} {rec['method']}{k}{b} s={rec['seed']} {acc}"


def run_sweep(configs: Iterable[dict[str, Any]], results_path: str | os.PathLike, *,
              progress: bool = True, **executor: Any):
    """Run every configuration not already in ``results_path``, appending one record each.

    ``executor``: the :func:`bornsparse.experiments.sweep.run_sweep` options (executor,
    workers, threads, address, cpus_per_run, max_retries). Returns its
    :class:`~bornsparse.experiments.sweep.SweepOutcome`.
    """
    from bornsparse.experiments import sweep

    return sweep.run_sweep(configs, results_path, structured_run, order=_cost_order,
                           describe=_describe, progress=progress, desc="structured runs",
                           **executor)


# ---------------------------------------------------------------------------------------
# Command line: the shared skeleton (experiments/command.py) with this experiment's parts


def _own_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bornsparse reproduce structured`` beyond the shared ones."""
    parser.add_argument("--budgets", nargs="+", type=float, default=None, metavar="F",
                        help="trainable parameters per hidden layer as a fraction of its "
                        "dense weights, plus its bias (default 1/128 1/32 1/8)")
    parser.add_argument("--samples", type=int, default=None, metavar="N",
                        help=f"MNIST-1D samples generated, 80%% for training (default "
                        f"{SAMPLES:,}; quick {QUICK_SAMPLES:,}: the package's size, where "
                        "dense overfits)")
    parser.add_argument("--block-sizes", nargs="+", type=int, default=None, metavar="K",
                        help="G(θ)'s block sizes, each dividing --width (default "
                        "those of 2 4 8 32 that divide it; quick 2 8); a block size whose "
                        "one factor is more than 50%% over a budget is not run there")
    parser.add_argument("--width", type=int, default=None,
                        help=f"hidden width n, even (default {WIDTH})")
    parser.add_argument("--blocks", type=int, default=BLOCKS,
                        help=f"n × n hidden layers between the dense input layer and the "
                        f"classifier (default {BLOCKS})")


def _prepare(plan: command.Plan, args: argparse.Namespace) -> None:
    """Generate and cache MNIST-1D at its sample count before the workers start."""
    from bornsparse.data import load_dataset

    for d in plan.info["datasets"]:
        load_dataset(d, **dataset_options(
            {"samples": plan.info["samples"] if d == "mnist1d" else None}))


def _experiment() -> command.Experiment:
    from bornsparse.experiments.structured_methods import METHODS

    return command.Experiment(
        name="structured",
        flags=command.SharedFlags(
            quick=f"{', '.join(QUICK['datasets'])} only, one seed, {QUICK['epochs']} epochs, "
            f"{QUICK_SAMPLES:,} samples, G(θ) at block sizes "
            f"{' '.join(map(str, QUICK['block_sizes']))}",
            seeds="3; quick 1", out="runs/structured",
            datasets=f"among {', '.join(DATASETS)} (default both)",
            methods=f"hidden-block methods among {', '.join(METHODS)} (default all)",
            epochs=", ".join(f"{d} {e}" for d, e in EPOCHS.items())
            + f"; quick {QUICK['epochs']}",
            batch_size=str(BATCH_SIZE), lr=f"{LR}, Adam"),
        own_arguments=_own_arguments, plan=build_configs, sweep=run_sweep,
        report=structured_report.markdown_report,
        figures=(structured_report.plot_figures, structured_report.plot_pareto),
        prepare=_prepare)


#: ``add_arguments(parser)``: the flags of ``bornsparse reproduce structured``; ``main(args)``:
#: validate, run the sweep (resuming), write table and figures; the exit code
add_arguments, main = command.entry_points(_experiment)
