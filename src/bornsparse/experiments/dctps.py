"""The comparison of the DCTpS slides: Δ accuracy against dense at densities 1e-2, 1e-3, 1e-4.

``bornsparse reproduce dctps`` trains every method of :mod:`dctps_methods` at every density
and seed on an offline data set, appends one JSON line per run to ``DIR/results.jsonl``
(rerunning skips finished runs), and writes the slides' table as markdown (Δ accuracy, mean ±
std over seeds, and the cost columns as measured numbers), accuracy-against-density plots
and Jacobian-spectrum plots. ``add_arguments`` and ``main`` are the CLI entry points; heavy
imports happen inside functions.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

DATASET_CHOICES = ("mnist1d", "digits", "cifar10", "cifar100")
DENSITIES = (1e-2, 1e-3, 1e-4)

# Per data set: default models, their keyword arguments, and the training recipe.
# MNIST-1D / digits: Adam, lr 1e-2 (the MNIST-1D paper's) cosine-annealed to 0, batch 128, no
# weight decay. The layers are wider than the MNIST-1D paper's (40-100-100-10 MLP, 15k weights;
# 25-channel CNN, 5k) so that 1e-4 of the weights is still a few weights per layer: 29 in
# the 288k-weight MLP, 11 in the 105k-weight CNN. The slides' models have 0.5M-23M weights.
# CIFAR: SGD with Nesterov momentum 0.9, lr 0.1 cosine to 0, weight decay 5e-4, batch 128,
# pad-4 crop + flip, as in the DCTpS code base's CIFAR runs.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist1d": {"models": ("mlp", "cnn1d"), "optimizer": "adam", "lr": 1e-2,
                "weight_decay": 0.0, "batch_size": 128, "epochs": 20, "augment": False},
    "digits": {"models": ("mlp", "lenet5"), "optimizer": "adam", "lr": 1e-2,
               "weight_decay": 0.0, "batch_size": 128, "epochs": 30, "augment": False},
    "cifar10": {"models": ("lenet5", "mobilenetv2"), "optimizer": "sgd", "lr": 0.1,
                "weight_decay": 5e-4, "batch_size": 128, "epochs": 160, "augment": True},
    "cifar100": {"models": ("resnet50",), "optimizer": "sgd", "lr": 0.1,
                 "weight_decay": 5e-4, "batch_size": 128, "epochs": 160, "augment": True},
}
MODEL_KWARGS: dict[tuple[str, str], dict[str, Any]] = {
    ("mnist1d", "mlp"): {"hidden_sizes": [512, 512]},  # 287,744 weights
    ("mnist1d", "cnn1d"): {"channels": 128},  # 105,344 weights
    ("digits", "mlp"): {"hidden_sizes": [512, 512]},  # 300,032 weights
}
QUICK = {"dataset": "mnist1d", "models": ("mlp", "cnn1d"), "seeds": 1, "epochs": 6,
         "imp_rounds": 2, "jacobian_inputs": 8, "pai_rounds": 20}
IMP_ROUNDS = 3
PAI_ROUNDS = 100
JACOBIAN_INPUTS = 16


# ---------------------------------------------------------------------------------------
# Configurations and runs


DEFAULT_DCT_ORDER = "khkwc"


def make_config(
    *, dataset: str, model: str, model_kwargs: dict[str, Any], method: str,
    density: float | None, seed: int, train: dict[str, Any],
) -> dict[str, Any]:
    """The JSON-serialisable configuration of one run; its hash is the resume key.

    ``dct_order`` is the patch flattening of the DCT conv layers' offset
    (``DCTPlusSparseConv2d``'s default): it changes the function, so runs made under another
    order (records written before it was a field used "ckhkw") never resume as these.
    """
    return {"experiment": "dctps", "dataset": dataset, "model": model,
            "model_kwargs": model_kwargs, "method": method, "density": density,
            "seed": seed, "train": train, "dct_order": DEFAULT_DCT_ORDER}


def dctps_run(cfg: dict[str, Any], data_dir: str | None = None) -> dict[str, Any]:
    """Run one configuration; returns its results record (``error`` set if it failed)."""
    import torch

    from bornsparse.data import load_dataset
    from bornsparse.experiments.dctps_methods import (
        MemoryTracker,
        RunContext,
        TrainConfig,
        run_method,
        stored_size,
    )
    from bornsparse.experiments.results_io import library_versions, run_key
    from bornsparse.sparsity.dynamic import process_group_size

    splits = load_dataset(cfg["dataset"], data_dir=data_dir)
    memory = MemoryTracker()  # after the data: its tensors are not the method's memory
    rec: dict[str, Any] = {"key": run_key(cfg), "config": cfg}
    world = process_group_size()
    if world > 1:
        ctx = _data_parallel_context(splits, cfg, memory)
        rec["data_parallel_ranks"] = world
    else:
        ctx = RunContext(splits=splits, model_name=cfg["model"],
                         model_kwargs=dict(cfg["model_kwargs"]),
                         train_cfg=TrainConfig(**cfg["train"]), seed=cfg["seed"],
                         memory=memory)
    t0 = time.perf_counter()
    try:
        model, acc = run_method(cfg["method"], ctx, cfg["density"])
    except (ValueError, RuntimeError) as err:  # e.g. a budget below one weight per layer
        rec.update(error=f"{type(err).__name__}: {err}", accuracy=None)
    else:
        dense_total = _dense_weight_count(cfg, splits)
        rec.update(accuracy=acc, stored=stored_size(model), dense_weights=dense_total,
                   finite=ctx.info.get("finite", True), nnz=ctx.info.get("nnz"),
                   init_s=ctx.info.get("init_s"), train_wall_s=ctx.info.get("wall_s"),
                   measure_s=ctx.info.get("measure_s"),
                   extra={k: v for k, v in ctx.info.items()
                          if k not in ("t_start", "init_s", "wall_s", "finite", "nnz",
                                       "measure_s", "jacobian_s")})
    rec.update(memory_bytes=dict(ctx.memory.peaks), jacobian_sv=ctx.jacobian_sv,
               wall_s=time.perf_counter() - t0, torch_threads=torch.get_num_threads(),
               versions=library_versions(),
               finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return rec


def _dense_weight_count(cfg: dict[str, Any], splits: Any) -> int:
    """N: weights of the prunable (nn.Linear / nn.Conv2d) layers of the dense model."""
    import torch

    from bornsparse.models import build_model

    m = build_model(cfg["model"], num_classes=splits.num_classes,
                    input_shape=splits.input_shape, device="meta", **cfg["model_kwargs"])
    return sum(mod.weight.numel() for mod in m.modules()
               if type(mod) in (torch.nn.Linear, torch.nn.Conv2d))


def _cost_order(cfg: dict[str, Any]) -> float:
    """Rough relative run time, to start the long runs first."""
    m = cfg["method"]
    rounds = cfg["train"]["imp_rounds"] + 1 if m == "imp" else 1
    return -(rounds * (3 if m in ("dense", "force", "synflow", "snip") else 1))


def _describe(rec: dict[str, Any]) -> str:
    c = rec["config"]
    acc = "error" if rec.get("error") else f"{100 * rec['accuracy']:.1f}%"
    return f"{c['model']} {c['method']} P={c['density']} s={c['seed']} {acc}"


def run_sweep(
    configs: Iterable[dict[str, Any]], results_path: str | os.PathLike, *,
    data_dir: str | None = None, progress: bool = True, **executor: Any,
):
    """Run every configuration not already in ``results_path``, appending one record each.

    ``executor``: the :func:`bornsparse.experiments.sweep.run_sweep` options (executor,
    workers, threads, address, cpus_per_run, max_retries); records are written by this
    process only. Returns the :class:`~bornsparse.experiments.sweep.SweepOutcome`.
    """
    from bornsparse.experiments import sweep

    configs = list(configs)
    # seed by seed, model by model, longest runs first inside: a sweep stopped early leaves
    # whole tables for the first seeds rather than every method but the cheap ones
    model_rank: dict[str, int] = {}
    for c in configs:
        model_rank.setdefault(repr((c["model"], c["model_kwargs"])), len(model_rank))

    def order(c: dict[str, Any]) -> tuple:
        return (c["seed"], model_rank[repr((c["model"], c["model_kwargs"]))], _cost_order(c))

    return sweep.run_sweep(configs, results_path, functools.partial(dctps_run,
                                                                    data_dir=data_dir),
                           order=order, describe=_describe, progress=progress,
                           desc="dctps runs", **executor)


# ---------------------------------------------------------------------------------------
# Command line


def _positive_int_list(name: str, values: Sequence[int]) -> list[int]:
    for v in values:
        if v < 1:
            raise ValueError(f"{name}: every entry must be a positive integer, got {v}")
    return list(values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bornsparse reproduce dctps``."""
    from bornsparse.experiments.sweep import add_executor_arguments

    from_quick = (f"MNIST-1D, models {', '.join(QUICK['models'])}, {QUICK['epochs']} epochs, "
                  f"IMP {QUICK['imp_rounds']} rounds, SynFlow/FORCE {QUICK['pai_rounds']} "
                  "rounds, one seed")
    parser.add_argument("--quick", action="store_true",
                        help=f"the small version that bornsparse demo runs: {from_quick} "
                        "(explicit flags still override)")
    parser.add_argument("--dataset", default=None,
                        help=f"one of {', '.join(DATASET_CHOICES)} (default mnist1d)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="folder of the CIFAR python batches (only CIFAR reads it)")
    parser.add_argument("--model", nargs="+", default=None, metavar="MODEL",
                        help="models from bornsparse.models.MODELS (default per data set: "
                        + "; ".join(f"{d}: {', '.join(v['models'])}"
                                    for d, v in DATASET_DEFAULTS.items()) + ")")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="methods to compare (default: dense, random_uniform, random_epl, "
                        "snip, force, synflow, imp, rigl, dctps, dctps_rigl, dctps_fixed_alpha; "
                        "grasp is available too); dense is always added")
    parser.add_argument("--densities", nargs="+", type=float, default=None, metavar="P",
                        help="global densities in (0, 1) (default 1e-2 1e-3 1e-4)")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="seeds 0..N-1 (default 3; quick 1)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs per run (default per data set: "
                        + ", ".join(f"{d} {v['epochs']}" for d, v in DATASET_DEFAULTS.items())
                        + f"; quick {QUICK['epochs']})")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default: Adam 1e-2 for mnist1d/digits, "
                        "SGD 0.1 for CIFAR), cosine-annealed to 0")
    parser.add_argument("--imp-rounds", type=int, default=None,
                        help=f"IMP prune-and-rewind rounds (default {IMP_ROUNDS}; quick "
                        f"{QUICK['imp_rounds']}); each round is a full training run")
    parser.add_argument("--mlp-hidden", nargs="+", type=int, default=None, metavar="H",
                        help="MLP hidden sizes (default 512 512)")
    parser.add_argument("--cnn1d-channels", type=int, default=None,
                        help="cnn1d channels (default 128)")
    parser.add_argument("--pai-rounds", type=int, default=None,
                        help=f"SynFlow and FORCE iterations (default {PAI_ROUNDS}; quick "
                        f"{QUICK['pai_rounds']})")
    parser.add_argument("--jacobian-inputs", type=int, default=None,
                        help=f"test inputs whose Jacobian spectra are recorded (default "
                        f"{JACOBIAN_INPUTS}; quick {QUICK['jacobian_inputs']})")
    parser.add_argument("--no-jacobian", action="store_true",
                        help="skip the Jacobian spectra at initialisation")
    add_executor_arguments(parser, default_workers=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default="runs/dctps", metavar="DIR",
                        help="results.jsonl, table.md and figures go here; rerunning with the "
                        "same DIR skips finished runs")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_configs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Validate every flag before anything trains; ValueError on bad input."""
    from bornsparse.experiments.dctps_methods import DEFAULT_METHODS, METHODS
    from bornsparse.models import MODELS

    quick = bool(args.quick)
    dataset = args.dataset if args.dataset is not None else "mnist1d"
    if dataset not in DATASET_CHOICES:
        raise ValueError(f"--dataset must be one of {', '.join(DATASET_CHOICES)}, got "
                         f"{dataset!r}")
    if quick and dataset != QUICK["dataset"]:
        raise ValueError(f"--quick runs on {QUICK['dataset']}; drop --quick to use {dataset}")
    d = DATASET_DEFAULTS[dataset]
    models = list(args.model) if args.model else list(QUICK["models"] if quick else d["models"])
    for m in models:
        if m not in MODELS:
            raise ValueError(f"--model: unknown model {m!r}; expected one of {', '.join(MODELS)}")
    methods = list(args.methods) if args.methods else list(DEFAULT_METHODS)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; expected one of "
                             f"{', '.join(METHODS)}")
    if "dense" not in methods:
        methods.insert(0, "dense")  # Δ accuracy needs it
    missing = {m: unavailable(METHODS[m].needs) for m in methods}
    missing = {m: mods for m, mods in missing.items() if mods}
    if missing and args.methods:
        m, mods = next(iter(missing.items()))
        raise ValueError(f"--methods: {m!r} needs {', '.join(mods)}, which this installation "
                         "does not have")
    methods = [m for m in methods if m not in missing]
    densities = list(args.densities) if args.densities else list(DENSITIES)
    for p in densities:
        if not 0.0 < p < 1.0:
            raise ValueError(f"--densities: every density must lie in (0, 1), got {p!r}")
    if len(set(densities)) != len(densities):
        raise ValueError(f"--densities: repeated values in {densities}")
    n_seeds = args.seeds if args.seeds is not None else (QUICK["seeds"] if quick else 3)
    if n_seeds < 1:
        raise ValueError(f"--seeds must be a positive integer, got {n_seeds}")
    epochs = args.epochs if args.epochs is not None else (QUICK["epochs"] if quick
                                                          else d["epochs"])
    batch_size = args.batch_size if args.batch_size is not None else d["batch_size"]
    lr = args.lr if args.lr is not None else d["lr"]
    imp_rounds = args.imp_rounds if args.imp_rounds is not None else (
        QUICK["imp_rounds"] if quick else IMP_ROUNDS)
    jac = 0 if args.no_jacobian else (
        args.jacobian_inputs if args.jacobian_inputs is not None
        else (QUICK["jacobian_inputs"] if quick else JACOBIAN_INPUTS))
    for name, v in (("--epochs", epochs), ("--batch-size", batch_size),
                    ("--imp-rounds", imp_rounds)):
        if v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}")
    if jac < 0:
        raise ValueError(f"--jacobian-inputs must be >= 0, got {jac}")
    if not lr > 0:
        raise ValueError(f"--lr must be positive, got {lr}")
    pai_rounds = args.pai_rounds if args.pai_rounds is not None else (
        QUICK["pai_rounds"] if quick else PAI_ROUNDS)
    if pai_rounds < 1:
        raise ValueError(f"--pai-rounds must be a positive integer, got {pai_rounds}")
    mlp_hidden = args.mlp_hidden
    if mlp_hidden is not None:
        _positive_int_list("--mlp-hidden", mlp_hidden)
    channels = args.cnn1d_channels
    if channels is not None and channels < 1:
        raise ValueError(f"--cnn1d-channels must be a positive integer, got {channels}")

    train = {"epochs": epochs, "batch_size": batch_size, "lr": lr,
             "optimizer": d["optimizer"], "weight_decay": d["weight_decay"],
             "augment": d["augment"], "imp_rounds": imp_rounds, "jacobian_inputs": jac,
             "pai_rounds": pai_rounds}
    configs = []
    for model in models:
        kw = dict(MODEL_KWARGS.get((dataset, model), {}))
        if model == "mlp" and mlp_hidden is not None:
            kw["hidden_sizes"] = list(mlp_hidden)
        if model == "cnn1d" and channels is not None:
            kw["channels"] = channels
        for seed in range(n_seeds):
            for method in methods:
                for p in ([None] if method == "dense" else densities):
                    configs.append(make_config(dataset=dataset, model=model, model_kwargs=kw,
                                               method=method, density=p, seed=seed,
                                               train=train))
    info = {"dataset": dataset, "models": models, "methods": methods, "densities": densities,
            "seeds": n_seeds, "train": train, "left_out": missing}
    return configs, info


def unavailable(modules: Sequence[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported here."""
    import importlib.util

    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            out.append(name)
    return out


def torchrun_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"WORLD_SIZE must be a positive integer (torchrun sets it), got "
                         f"{value!r}")
    return int(value)


def check_data_parallel(batch_size: int, world: int) -> None:
    """ValueError unless the global batch splits evenly over ``world`` ranks."""
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the {world} ranks "
                         "of the torchrun launch (each rank trains on an equal share)")


def _data_parallel_context(splits: Any, cfg: dict[str, Any], memory: Any) -> Any:
    """This rank's RunContext in a torchrun launch: one run trained data-parallel.

    Rank r trains on the r-th of ``world`` interleaved equal shards of the training set
    (the last ``n mod world`` examples are left out) with batch ``batch_size / world``, in
    DistributedDataParallel, so a step sees ``batch_size`` examples in all and the step
    count is the single-process one. Pruning at initialisation scores the full data's
    batches, as one process would; RigL/SET/IMP keep the ranks' supports identical
    (sparsity/dynamic.py).
    """
    import dataclasses

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bornsparse.experiments.dctps_methods import RunContext, TrainConfig

    rank, world = dist.get_rank(), dist.get_world_size()
    full = TrainConfig(**cfg["train"])
    check_data_parallel(full.batch_size, world)
    per_rank = dataclasses.replace(full, batch_size=full.batch_size // world)
    n = splits.train_x.shape[0] // world * world
    shard = dataclasses.replace(splits, train_x=splits.train_x[rank:n:world],
                                train_y=splits.train_y[rank:n:world])

    class DataParallelRunContext(RunContext):
        def pai_batches(self):
            self.splits, self.train_cfg = splits, full
            try:
                return super().pai_batches()
            finally:
                self.splits, self.train_cfg = shard, per_rank

        def train(self, model, optimizer, **hooks):
            # a new wrapper per call: IMP's to_sparse() replaces layers between trainings
            return super().train(DistributedDataParallel(model), optimizer, **hooks)

    return DataParallelRunContext(splits=shard, model_name=cfg["model"],
                                  model_kwargs=dict(cfg["model_kwargs"]), train_cfg=per_rank,
                                  seed=cfg["seed"], memory=memory)


@contextlib.contextmanager
def _process_group(world: int):
    """torch.distributed's default group over torchrun's ranks (gloo: CPU runs), or nothing."""
    if world == 1:
        yield
        return
    import torch.distributed as dist

    dist.init_process_group("gloo")  # torchrun's env:// rendezvous
    try:
        yield
    finally:
        dist.destroy_process_group()


def main(args: argparse.Namespace) -> int:
    """Validate, load the data once (fail early), run the sweep, write table and figures.

    Launched by torchrun (WORLD_SIZE > 1), every rank trains each run together,
    data-parallel; rank 0 writes the records, table and figures.
    """
    from bornsparse.experiments.results_io import ensure_writable_dir
    from bornsparse.experiments.sweep import check_executor_arguments

    prog = "bornsparse reproduce dctps"
    try:
        configs, info = build_configs(args)
        check_executor_arguments(args)
        world = torchrun_world_size()
        if world > 1:
            if args.executor != "local":
                raise ValueError(f"launched by torchrun (WORLD_SIZE={world}) the ranks run "
                                 "each run together: use --executor local, got "
                                 f"--executor {args.executor}")
            check_data_parallel(info["train"]["batch_size"], world)
        out = ensure_writable_dir(args.out, name="--out directory")
    except (ValueError, TypeError, ImportError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    with _process_group(world):
        return _run_and_report(args, prog, configs, info, out, world)


def _run_and_report(args, prog, configs, info, out, world) -> int:
    """Load the data, run the sweep, write table and figures (rank 0); the exit code."""
    from bornsparse.experiments.sweep import describe_executor, executor_options

    rank = int(os.environ.get("RANK", "0")) if world > 1 else 0
    try:
        from bornsparse.data import load_dataset

        # generates and caches MNIST-1D before workers start; CIFAR: missing files fail here
        if rank == 0:
            splits = load_dataset(info["dataset"], data_dir=args.data_dir)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # the other ranks read rank 0's cache instead of racing to write it
            splits = load_dataset(info["dataset"], data_dir=args.data_dir)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2

    options = executor_options(args)
    if world > 1:
        options["workers"] = 1  # the ranks are the parallelism
    for m, mods in info["left_out"].items():
        if rank == 0:
            print(f"{prog}: leaving out {m}: needs {', '.join(mods)}", file=sys.stderr)
    t0 = time.perf_counter()
    tr = info["train"]
    how = f"{world} data-parallel ranks" if world > 1 else describe_executor(args)
    if rank == 0:
        print(f"{len(configs)} runs on {info['dataset']} ({splits.train_x.shape[0]} train / "
              f"{splits.test_x.shape[0]} test): models {', '.join(info['models'])}, "
              f"densities {info['densities']}, {info['seeds']} seed(s), {tr['optimizer']} lr "
              f"{tr['lr']} batch {tr['batch_size']} for {tr['epochs']} epochs, {how}; "
              f"results in {out / 'results.jsonl'}", file=sys.stderr)
    outcome = run_sweep(configs, out / "results.jsonl", data_dir=args.data_dir,
                        progress=not args.no_progress, **options)
    wall = time.perf_counter() - t0
    if rank > 0:
        return 0
    print(outcome.summary(), file=sys.stderr)

    from bornsparse.experiments.dctps_report import markdown_report, plot_accuracy, plot_spectra

    records = outcome.records
    text = markdown_report(records, info)
    (out / "table.md").write_text(text)
    if not args.no_plots:
        for path in plot_accuracy(records, out) + plot_spectra(records, out):
            print(f"wrote {path}", file=sys.stderr)
    print(text)
    print(f"sweep wall time {wall:.1f} s", file=sys.stderr)
    return 0 if outcome.complete else 1
