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
``main`` are the CLI entry points; heavy imports happen inside functions.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Iterable
from typing import Any

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


def build_configs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Validate every flag before anything trains; ValueError naming the flag on bad input."""
    from bornsparse.experiments.structured_methods import BLOCK_SIZES, METHODS, fits_budget

    quick = bool(args.quick)
    datasets = list(args.datasets) if args.datasets else list(
        QUICK["datasets"] if quick else DATASETS)
    for d in datasets:
        if d not in DATASETS:
            raise ValueError(f"--datasets: unknown data set {d!r}; expected one of "
                             f"{', '.join(DATASETS)}")
    methods = list(args.methods) if args.methods else list(METHODS)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; expected one of "
                             f"{', '.join(METHODS)}")
    if "dense" not in methods:
        methods.insert(0, "dense")  # the reference line of every figure
    budgets = list(args.budgets) if args.budgets else list(BUDGETS)
    for b in budgets:
        if not 0.0 < b < 1.0:
            raise ValueError(f"--budgets: every budget must lie in (0, 1), got {b!r}")
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"--budgets: repeated values in {budgets}")
    seeds = args.seeds if args.seeds is not None else (QUICK["seeds"] if quick else 3)
    width = args.width if args.width is not None else WIDTH
    for name, v in (("--seeds", seeds), ("--blocks", args.blocks),
                    ("--batch-size", args.batch_size)):
        if v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be a positive integer, got {args.epochs}")
    if width < 4 or width % 2:
        raise ValueError(f"--width must be an even integer >= 4 (2×2 blocks), got {width}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    samples = args.samples if args.samples is not None else (
        QUICK_SAMPLES if quick else SAMPLES)
    if samples < 100:
        raise ValueError(f"--samples must be at least 100 (MNIST-1D draws samples // 10 per "
                         f"class, 80% for training), got {samples}")
    # the defaults that divide the width (a narrow test width keeps the small ones)
    block_sizes = list(args.block_sizes) if args.block_sizes else [
        k for k in (QUICK["block_sizes"] if quick else BLOCK_SIZES) if width % k == 0]
    for k in block_sizes:
        if k < 2 or width % k:
            raise ValueError(f"--block-sizes: every block size must be at least 2 and "
                             f"divide --width {width}, got {k}")
    if len(set(block_sizes)) != len(block_sizes):
        raise ValueError(f"--block-sizes: repeated values in {block_sizes}")

    configs, too_big = [], []
    for seed in range(seeds):
        for dataset in datasets:
            train = default_train(dataset, quick=quick)
            train.update(batch_size=args.batch_size, lr=args.lr)
            if args.epochs is not None:
                train["epochs"] = args.epochs
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
                            blocks=args.blocks, train=train, samples=n, block_size=k))
    info = {"datasets": datasets, "methods": methods, "budgets": budgets, "seeds": seeds,
            "width": width, "blocks": args.blocks, "samples": samples,
            "block_sizes": block_sizes, "too_big": too_big,
            "train": {c["dataset"]: c["train"] for c in configs}}
    return configs, info


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


def _saved_activation_bytes(model, x, y, loss_of) -> tuple[Any, int]:
    """(loss, bytes autograd saved for backward that are not parameters, buffers or inputs):
    the part of a step's memory that live-tensor scans cannot see."""
    import torch

    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model(x), y)
    return loss, sum(saved.values())


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
    import math

    import torch
    import torch.nn.functional as F

    from bornsparse.data import load_dataset
    from bornsparse.experiments.dctps_methods import MemoryTracker, stored_size
    from bornsparse.experiments.results_io import library_versions, run_key
    from bornsparse.experiments.structured_methods import (
        budget_params,
        build_mlp,
        trainable_params,
    )

    t_start = time.perf_counter()
    splits = load_dataset(cfg["dataset"], **dataset_options(cfg))
    memory = MemoryTracker()  # after the data: its tensors are not the method's memory
    tr = cfg["train"]
    width, budget = cfg["width"], cfg["budget"]
    model, size = build_mlp(cfg["method"], input_shape=splits.input_shape,
                            num_classes=splits.num_classes, width=width,
                            blocks=cfg["blocks"], budget=budget, seed=cfg["seed"],
                            block_size=cfg.get("block_size") or 2)
    memory.sample("init")
    block = model.blocks[0]
    hidden = trainable_params(block)
    target = budget_params(width, budget) if budget is not None else hidden
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=tr["lr"])
    x_all, y_all = splits.train_x, splits.train_y
    n = x_all.shape[0]
    bs = tr["batch_size"]
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * tr["epochs"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    warmup = min(tr["timing_warmup"], total // 2)
    gen = torch.Generator().manual_seed(cfg["seed"] + 0xDA7A)  # batches, apart from the init
    fb, steps = [], []
    activations = 0
    finite = True
    has_penalty = any(hasattr(b, "orthogonality_penalty") for b in model.blocks)

    def loss_of(logits, y, step):
        loss = F.cross_entropy(logits, y)
        if has_penalty:
            loss = loss + penalty_weight(tr["penalty_schedule"], step, total) * model.penalty()
        return loss

    model.train()
    t_train = time.perf_counter()
    sampling = memory.seconds
    step = 0
    for _ in range(tr["epochs"]):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            x, y = x_all[idx], y_all[idx]
            t0 = time.perf_counter()
            if step == 0:  # a cold step, not timed: measure what autograd keeps instead
                loss, activations = _saved_activation_bytes(
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
                fb.append(t1 - t0)
                steps.append(t2 - t0)
            if step == 0:  # parameters, gradients and optimizer state: every step alike
                memory.sample("training")
            if not torch.isfinite(loss.detach()):
                finite = False
                break
            step += 1
        if not finite:
            break
    train_wall = time.perf_counter() - t_train - (memory.seconds - sampling)

    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, splits.test_x.shape[0], 1000):
            logits = model(splits.test_x[s:s + 1000])
            correct += int((logits.argmax(1) == splits.test_y[s:s + 1000]).sum())
        final_penalty = model.penalty()
    accuracy = correct / splits.test_x.shape[0] if finite else None
    for p in model.parameters():
        p.grad = None
    del opt
    memory.sample("final")
    peaks = dict(memory.peaks)
    peaks["activations"] = activations
    return {
        "key": run_key(cfg), "config": cfg, "method": cfg["method"], "dataset": cfg["dataset"],
        "budget": budget, "seed": cfg["seed"], "block_size": cfg.get("block_size"),
        "train_samples": int(n), "accuracy": accuracy, "finite": finite,
        "hidden_params": hidden, "budget_params": target,
        "budget_error": hidden / target - 1.0, "size": size,
        "trainable_params": trainable_params(model),
        "stored_bytes": stored_size(model)["bytes"],
        "hidden_stored_bytes": stored_size(block)["bytes"],
        "fb_ms": 1e3 * statistics.median(fb) if fb else None,
        "fb_ms_mean": 1e3 * statistics.fmean(fb) if fb else None,
        "step_ms": 1e3 * statistics.median(steps) if steps else None,
        "timed_steps": len(fb), "steps": step,
        "memory_bytes": peaks, "peak_memory_bytes": peaks["training"] + activations,
        "final_penalty": None if final_penalty is None else float(final_penalty),
        "train_wall_s": train_wall, "wall_s": time.perf_counter() - t_start,
        "torch_threads": torch.get_num_threads(), "versions": library_versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


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
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bornsparse reproduce structured``."""
    from bornsparse.experiments.structured_methods import METHODS
    from bornsparse.experiments.sweep import add_executor_arguments

    parser.add_argument("--quick", action="store_true",
                        help=f"the small version that bornsparse demo runs: "
                        f"{', '.join(QUICK['datasets'])} only, one seed, {QUICK['epochs']} "
                        f"epochs, {QUICK_SAMPLES:,} samples, G(θ) at block sizes "
                        f"{' '.join(map(str, QUICK['block_sizes']))} (explicit flags still "
                        "override)")
    parser.add_argument("--datasets", nargs="+", default=None, metavar="DATASET",
                        help=f"among {', '.join(DATASETS)} (default both)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help=f"hidden-block methods among {', '.join(METHODS)} (default all); "
                        "dense is always added")
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
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="seeds 0..N-1 (default 3; quick 1)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default " + ", ".join(
                            f"{d} {e}" for d, e in EPOCHS.items())
                        + f"; quick {QUICK['epochs']})")
    parser.add_argument("--width", type=int, default=None,
                        help=f"hidden width n, even (default {WIDTH})")
    parser.add_argument("--blocks", type=int, default=BLOCKS,
                        help=f"n × n hidden layers between the dense input layer and the "
                        f"classifier (default {BLOCKS})")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help=f"default {BATCH_SIZE}")
    parser.add_argument("--lr", type=float, default=LR,
                        help=f"Adam's peak learning rate, cosine-annealed to 0 (default {LR})")
    add_executor_arguments(parser, default_workers=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default="runs/structured", metavar="DIR",
                        help="results.jsonl, table.md and figures go here; rerunning with the "
                        "same DIR skips finished runs")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Validate, load the data once (fail early), run the sweep, write table and figures."""
    from bornsparse.experiments.results_io import ensure_writable_dir
    from bornsparse.experiments.sweep import (
        check_executor_arguments,
        describe_executor,
        executor_options,
    )

    prog = "bornsparse reproduce structured"
    try:
        configs, info = build_configs(args)
        check_executor_arguments(args)
        out = ensure_writable_dir(args.out, name="--out directory")
        from bornsparse.data import load_dataset

        for d in info["datasets"]:  # generates and caches MNIST-1D before workers start
            load_dataset(d, **dataset_options(
                {"samples": info["samples"] if d == "mnist1d" else None}))
    except (ValueError, TypeError, ImportError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2

    from bornsparse.experiments.structured_report import budget_text

    t0 = time.perf_counter()
    options = executor_options(args)
    how = describe_executor(args)
    print(f"{len(configs)} runs on {', '.join(info['datasets'])}: width {info['width']}, "
          f"{info['blocks']} hidden blocks, budgets "
          f"{', '.join(budget_text(b) for b in info['budgets'])}, {info['seeds']} seed(s), "
          f"MNIST-1D at {info['samples']:,} samples, {how}; results in "
          f"{out / 'results.jsonl'}", file=sys.stderr)
    for method, k, b in info["too_big"]:
        print(f"not run: {method}{'' if k is None else f' k={k}'} at budget {budget_text(b)} "
              "(its smallest size is more than 50% over the budget)", file=sys.stderr)
    outcome = run_sweep(configs, out / "results.jsonl", progress=not args.no_progress,
                        **options)
    wall = time.perf_counter() - t0
    print(outcome.summary(), file=sys.stderr)

    from bornsparse.experiments.structured_report import (
        markdown_report,
        plot_figures,
        plot_pareto,
    )

    text = markdown_report(outcome.records, info)
    (out / "table.md").write_text(text)
    if not args.no_plots:
        for path in [*plot_figures(outcome.records, out), *plot_pareto(outcome.records, out)]:
            print(f"wrote {path}", file=sys.stderr)
    print(text)
    print(f"sweep wall time {wall:.1f} s", file=sys.stderr)
    return 0 if outcome.complete else 1
