"""The comparison of the DCTpS slides: Δ accuracy against dense at densities 1e-2, 1e-3, 1e-4.

``bornsparse reproduce dctps`` trains every method of :mod:`dctps_methods` at every density
and seed on an offline data set, appends one JSON line per run to ``DIR/results.jsonl``
(rerunning skips finished runs), and writes the slides' table as markdown (Δ accuracy, mean ±
std over seeds, and the cost columns as measured numbers), accuracy-against-density plots
and Jacobian-spectrum plots. A run that raises (a method that cannot run at a setting) is
reported failed, not written, retried by the next sweep, and shown in the table as n/a† with
its reason. ``add_arguments`` and ``main`` are the CLI entry points, the shared skeleton of
:mod:`bornsparse.experiments.command`; heavy imports happen inside functions.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

from bornsparse.experiments import command, dctps_report

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
    """Run one configuration; returns its results record.

    A method that cannot run at a setting raises (e.g. ``allocate_nnz`` refusing a budget
    below one weight in some layer): the sweep reports the run failed and does not write it,
    so a rerun retries it, and the table shows n/a† with the reason. Under torch.distributed
    every rank trains the run together (:func:`distributed.data_parallel_context`).
    """
    import torch

    from bornsparse.data import load_dataset
    from bornsparse.experiments.dctps_methods import RunContext, TrainConfig, run_method
    from bornsparse.experiments.distributed import data_parallel_context, rank_and_world
    from bornsparse.experiments.measure import MemoryTracker, stored_size
    from bornsparse.experiments.results_io import library_versions, run_key

    splits = load_dataset(cfg["dataset"], data_dir=data_dir)
    memory = MemoryTracker()  # after the data: its tensors are not the method's memory
    rec: dict[str, Any] = {"key": run_key(cfg), "config": cfg}
    _, world = rank_and_world()
    if world > 1:
        ctx = data_parallel_context(splits, cfg, memory)
        rec["data_parallel_ranks"] = world
    else:
        ctx = RunContext(splits=splits, model_name=cfg["model"],
                         model_kwargs=dict(cfg["model_kwargs"]),
                         train_cfg=TrainConfig(**cfg["train"]), seed=cfg["seed"],
                         memory=memory)
    t0 = time.perf_counter()
    model, acc = run_method(cfg["method"], ctx, cfg["density"])
    rec.update(accuracy=acc, stored=stored_size(model),
               dense_weights=_dense_weight_count(cfg, splits),
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
    return (f"{c['model']} {c['method']} P={c['density']} s={c['seed']} "
            f"{100 * rec['accuracy']:.1f}%")


def run_sweep(
    configs: Iterable[dict[str, Any]], results_path: str | os.PathLike, *,
    data_dir: str | None = None, progress: bool = True, **executor: Any,
):
    """Run every configuration not already in ``results_path``, appending one record each.

    ``executor``: the :func:`bornsparse.experiments.sweep.run_sweep` options (executor,
    workers, threads, address, cpus_per_run, max_retries); records are written by this
    process only. Returns the :class:`~bornsparse.experiments.sweep.SweepOutcome`, whose
    ``failed`` runs the table shows as n/a†.
    """
    from bornsparse.experiments import sweep

    configs = list(configs)
    # data set by data set, seed by seed, model by model, longest runs first inside: a
    # sweep stopped early leaves whole tables for the first seeds rather than every method
    # but the cheap ones
    rank: dict[str, int] = {}
    for c in configs:
        rank.setdefault(c["dataset"], len(rank))
        rank.setdefault(repr((c["model"], c["model_kwargs"])), len(rank))

    def order(c: dict[str, Any]) -> tuple:
        return (rank[c["dataset"]], c["seed"], rank[repr((c["model"], c["model_kwargs"]))],
                _cost_order(c))

    return sweep.run_sweep(configs, results_path, functools.partial(dctps_run,
                                                                    data_dir=data_dir),
                           order=order, describe=_describe, progress=progress,
                           desc="dctps runs", **executor)


# ---------------------------------------------------------------------------------------
# Command line: the shared skeleton (experiments/command.py) with this experiment's parts


def _own_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bornsparse reproduce dctps`` beyond the shared ones."""
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="folder of the CIFAR python batches (only CIFAR reads it)")
    parser.add_argument("--densities", nargs="+", type=float, default=None, metavar="P",
                        help="global densities in (0, 1) (default 1e-2 1e-3 1e-4)")
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


def _methods(args: argparse.Namespace) -> tuple[list[str], dict[str, list[str]]]:
    """(methods to run, dense first if not given; {left-out method: missing modules})."""
    from bornsparse.experiments.dctps_methods import DEFAULT_METHODS, METHODS

    methods = command.choices("--methods", args.methods or DEFAULT_METHODS, METHODS,
                              what="method")
    if "dense" not in methods:
        methods.insert(0, "dense")  # Δ accuracy needs it
    missing = {m: unavailable(METHODS[m].needs) for m in methods}
    missing = {m: mods for m, mods in missing.items() if mods}
    if missing and args.methods:
        m, mods = next(iter(missing.items()))
        raise ValueError(f"--methods: {m!r} needs {', '.join(mods)}, which this installation "
                         "does not have")
    return [m for m in methods if m not in missing], missing


def _train_recipe(args: argparse.Namespace, dataset: str, quick: bool) -> dict[str, Any]:
    """The ``train`` field of ``dataset``'s configurations: its recipe, flags overriding."""
    d = DATASET_DEFAULTS[dataset]

    def flag(name: str, quick_value: Any, full_value: Any) -> int:
        """--name's value, else the quick or full default; a positive integer."""
        value = getattr(args, name.replace("-", "_"))
        return command.positive_int(f"--{name}", command.pick(
            value, quick=quick, quick_value=quick_value, full_value=full_value))

    jac = 0 if args.no_jacobian else command.pick(
        args.jacobian_inputs, quick=quick, quick_value=QUICK["jacobian_inputs"],
        full_value=JACOBIAN_INPUTS)
    if jac < 0:
        raise ValueError(f"--jacobian-inputs must be >= 0, got {jac}")
    return {"epochs": flag("epochs", QUICK["epochs"], d["epochs"]),
            "batch_size": flag("batch-size", d["batch_size"], d["batch_size"]),
            "lr": command.positive_float("--lr", d["lr"] if args.lr is None else args.lr),
            "optimizer": d["optimizer"], "weight_decay": d["weight_decay"],
            "augment": d["augment"],
            "imp_rounds": flag("imp-rounds", QUICK["imp_rounds"], IMP_ROUNDS),
            "jacobian_inputs": jac,
            "pai_rounds": flag("pai-rounds", QUICK["pai_rounds"], PAI_ROUNDS)}


def _model_kwargs(args: argparse.Namespace, dataset: str, model: str) -> dict[str, Any]:
    kw = dict(MODEL_KWARGS.get((dataset, model), {}))
    if model == "mlp" and args.mlp_hidden is not None:
        kw["hidden_sizes"] = list(args.mlp_hidden)
    if model == "cnn1d" and args.cnn1d_channels is not None:
        kw["channels"] = args.cnn1d_channels
    return kw


def build_configs(args: argparse.Namespace) -> command.Plan:
    """Validate every flag before anything trains; ValueError naming the flag on bad input.
    Returns the :class:`~bornsparse.experiments.command.Plan` (configs, info)."""
    from bornsparse.models import MODELS

    quick = bool(args.quick)
    datasets = command.choices("--datasets", command.pick(
        args.datasets, quick=quick, quick_value=[QUICK["dataset"]], full_value=["mnist1d"]),
        DATASET_CHOICES, what="data set")
    if quick and datasets != [QUICK["dataset"]]:
        other = next(d for d in datasets if d != QUICK["dataset"])
        raise ValueError(f"--quick runs on {QUICK['dataset']}; drop --quick to use {other}")
    if args.models:
        command.choices("--models", args.models, MODELS, what="model")
    models = {d: list(args.models or (QUICK["models"] if quick
                                      else DATASET_DEFAULTS[d]["models"]))
              for d in datasets}
    methods, missing = _methods(args)
    densities = command.fractions("--densities", args.densities or DENSITIES, what="density")
    seeds = command.seed_list(args.seeds, quick=quick)
    train = {d: _train_recipe(args, d, quick) for d in datasets}
    if args.mlp_hidden is not None:
        command.positive_ints("--mlp-hidden", args.mlp_hidden, what="hidden size")
    if args.cnn1d_channels is not None:
        command.positive_int("--cnn1d-channels", args.cnn1d_channels)

    configs = [make_config(dataset=dataset, model=model,
                           model_kwargs=_model_kwargs(args, dataset, model), method=method,
                           density=p, seed=seed, train=train[dataset])
               for dataset in datasets for model in models[dataset] for seed in seeds
               for method in methods for p in ([None] if method == "dense" else densities)]
    info = {"datasets": datasets, "models": models, "methods": methods,
            "densities": densities, "seeds": len(seeds), "train": train, "left_out": missing,
            "data_dir": args.data_dir, "sweep_options": {"data_dir": args.data_dir},
            "notes": [f"bornsparse reproduce dctps: leaving out {m}: needs {', '.join(mods)}"
                      for m, mods in missing.items()]}
    info["description"] = _description(info)
    return command.Plan(configs, info)


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


def _prepare(plan: command.Plan, args: argparse.Namespace) -> None:
    """Load every data set once: MNIST-1D is generated and cached before the workers start
    (under torchrun by rank 0 first), missing CIFAR files fail here. Keeps the sizes for
    the header."""
    from bornsparse.data import load_dataset
    from bornsparse.experiments.distributed import rank_zero_first

    sizes = {}
    for d in plan.info["datasets"]:
        splits = rank_zero_first(functools.partial(load_dataset, d,
                                                   data_dir=plan.info["data_dir"]))
        sizes[d] = (int(splits.train_x.shape[0]), int(splits.test_x.shape[0]))
    plan.info["sizes"] = sizes
    plan.info["description"] = _description(plan.info)


def _description(info: dict[str, Any]) -> str:
    """The header's text: data sets (their sizes once loaded), models, recipes."""
    parts = []
    for d in info["datasets"]:
        tr, size = info["train"][d], info.get("sizes", {}).get(d)
        parts.append(f"{d} (" + ("" if size is None else f"{size[0]} train / {size[1]} test; ")
                     + f"models {', '.join(info['models'][d])}; {tr['optimizer']} lr "
                     f"{tr['lr']} batch {tr['batch_size']} for {tr['epochs']} epochs)")
    return (", ".join(parts) + f", densities {info['densities']}, {info['seeds']} seed(s)")


#: the shared flags where they apply here, by the end of their help
FLAGS = command.SharedFlags(
    quick=f"MNIST-1D, models {', '.join(QUICK['models'])}, {QUICK['epochs']} epochs, "
    f"IMP {QUICK['imp_rounds']} rounds, SynFlow/FORCE {QUICK['pai_rounds']} rounds, "
    "one seed",
    seeds="3; quick 1", out="runs/dctps",
    datasets=f"one or several of {', '.join(DATASET_CHOICES)} (default mnist1d)",
    models="from bornsparse.models.MODELS, for every data set (default per data "
    "set: " + "; ".join(f"{d}: {', '.join(v['models'])}"
                        for d, v in DATASET_DEFAULTS.items()) + ")",
    methods="dense, random_uniform, random_epl, snip, force, synflow, imp, rigl, "
    "dctps, dctps_rigl, dctps_fixed_alpha (the default), or grasp",
    epochs="per data set: " + ", ".join(f"{d} {v['epochs']}"
                                         for d, v in DATASET_DEFAULTS.items())
    + f"; quick {QUICK['epochs']}",
    batch_size="128",
    lr="Adam 1e-2 for mnist1d/digits, SGD 0.1 for CIFAR",
    aliases={"datasets": ("--dataset",), "models": ("--model",)})


def _experiment() -> command.Experiment:
    return command.Experiment(
        name="dctps", flags=FLAGS,
        own_arguments=_own_arguments, plan=build_configs, sweep=run_sweep,
        report=dctps_report.markdown_report,
        figures=(dctps_report.plot_accuracy, dctps_report.plot_spectra), prepare=_prepare,
        data_parallel_batches=lambda info: [t["batch_size"] for t in info["train"].values()])


#: ``add_arguments(parser)``: the flags of ``bornsparse reproduce dctps``; ``main(args)``:
#: validate, run the sweep (resuming), write table and figures; the exit code
add_arguments, main = command.entry_points(_experiment)
