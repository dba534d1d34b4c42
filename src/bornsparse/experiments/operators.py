"""Operator learning with the permuted block-diagonal operator (the permuted block-diagonal
paper, §5, Figures 1-4).

A run trains G(θ) (or the tanh network h_θ) of width n and depth N to multiply by a
ground truth A ∈ R^{n/2×n/2}: inputs x ~ N(0, I) are drawn online every step, zero-padded
to n, and the first n/2 outputs are compared with A x under the MSE (2/n)‖G x − A x‖²
averaged over the batch. The schedule is the paper's: Adam, lr 0.01 with orthogonality
penalty weight 3 for 7000 steps, weight 0.3 for 3000, then lr 0.001 for 2000; the reported
number is the mean MSE over the last 1000 steps.

With ``--baselines`` every target is also learned by a low-rank layer U Vᵀ and a Monarch
layer (Dao et al., ICML 2022) with as many parameters as G(θ) at each depth (as close as
their rank and block count allow: :func:`baseline_size`), on the same inputs, loss and
schedule (no penalty: they have none).

Python API: ``train_operator(A, depth=...)`` for any matrix (or any model given as
``model=``, as ``bornsparse demo`` trains its baselines), ``operator_run`` / ``run_sweep``
for configured runs; the table and figures are in ``operators_report``. CLI: ``bornsparse
reproduce operators`` (``add_arguments`` and ``main`` below). Heavy imports (torch,
matplotlib) happen inside functions so that ``bornsparse --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bornsparse.experiments import command, operators_report

# ---------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Phase:
    """A stretch of training at a fixed Adam learning rate and penalty weight."""

    steps: int
    lr: float
    penalty: float


PAPER_SCHEDULE: tuple[Phase, ...] = (Phase(7000, 1e-2, 3.0), Phase(3000, 1e-2, 0.3),
                                     Phase(2000, 1e-3, 0.3))
PAPER_FINAL_WINDOW = 1000
PAPER_WIDTH = 2048
# The paper gives no batch size. 64 keeps the gradient noise small next to the MSE floors
# the paper reports while a full-scale step stays cheap; see docs/design.md.
DEFAULT_BATCH_SIZE = 64
TASK_CHOICES = ("lowrank", "band", "sparse", "permutation", "dense")
NETWORKS = ("linear", "tanh")
# structured layers learned beside G(θ) with --baselines, at its parameter count
BASELINES = ("lowrank", "monarch")
# Full scale: 4096 parameters per factor at n = 2048, so depths 1..256 span 4k .. n²/4 = 1M.
FULL_DEPTHS = (1, 2, 4, 6, 8, 10, 12, 16, 24, 32, 64, 128, 256)
FULL_KS = (1, 2, 3, 4, 5)
# Quick mode: n = 256 (receptive field complete at depth log2(128) = 7, n²/4 reached at
# depth 32) and a tenth of the paper's steps.
QUICK_WIDTH = 256
QUICK_STEPS_SCALE = 0.1
QUICK_DEPTHS = (2, 4, 7, 10, 14, 20, 32)
QUICK_KS = (1, 3, 5)


def scaled_schedule(steps_scale: float) -> tuple[tuple[Phase, ...], int]:
    """The paper's phases and final window with every length multiplied by ``steps_scale``."""
    if isinstance(steps_scale, bool) or not isinstance(steps_scale, (int, float)):
        raise TypeError(f"steps_scale must be a positive number, got {steps_scale!r}")
    if not (math.isfinite(steps_scale) and steps_scale > 0):
        raise ValueError(f"steps_scale must be a positive finite number, got {steps_scale!r}")
    phases = tuple(Phase(max(1, round(p.steps * steps_scale)), p.lr, p.penalty)
                   for p in PAPER_SCHEDULE)
    total = sum(p.steps for p in phases)
    window = min(total, max(1, round(PAPER_FINAL_WINDOW * steps_scale)))
    return phases, window


# ---------------------------------------------------------------------------------------
# One training run


def _target_matmul(a):
    """x ↦ x Aᵀ for a batch x (B, m), exact to float32 rounding but cheaper where A allows.

    Sparse A (< 5% nonzeros) goes through CSR; A of numerical rank r ≤ m/4 through its
    SVD factors (2·m·r instead of m² multiply-adds per sample); anything else is dense.
    At m = 1024 and batch 64 a dense product costs about as much as a depth-12 operator step.
    """
    import torch

    m = a.shape[0]
    density = float((a != 0).sum()) / a.numel()
    if density < 0.05:
        with warnings.catch_warnings():  # "CSR support is in beta": matmul by CSR is solid
            warnings.simplefilter("ignore", UserWarning)
            a_csr = a.to_sparse_csr()
        return lambda x: (a_csr @ x.T.contiguous()).T  # x Aᵀ = (A xᵀ)ᵀ
    u, sv, vh = torch.linalg.svd(a.double(), full_matrices=False)
    # A is float32: singular values below ~1e-6 of the largest are its rounding noise
    r = int((sv > sv[0] * 1e-6).sum()) if m > 0 and sv[0] > 0 else 0
    if 0 < r <= m // 4:
        left = (vh[:r].T * sv[:r]).to(a.dtype).contiguous()  # (m, r)
        right = u[:, :r].T.to(a.dtype).contiguous()  # (r, m)
        return lambda x: (x @ left) @ right
    at = a.T.contiguous()
    return lambda x: x @ at


def _check_schedule(network: str, model: Any, depth: int | None, width: int | None,
                    schedule: Sequence[Phase], final_window: int) -> int:
    """The checks of :func:`train_operator`'s model and schedule arguments; returns the
    schedule's total step count."""
    import torch

    from bornsparse._checks import check_positive_int

    if network not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if depth is not None or width is not None or network != "linear":
            raise ValueError("depth, width and network describe the G(θ) that train_operator "
                             "builds: leave them out when model is given")
    if not schedule or not all(isinstance(p, Phase) for p in schedule):
        raise TypeError("schedule must be a non-empty sequence of Phase")
    total = sum(check_positive_int("Phase.steps", p.steps) for p in schedule)
    final_window = check_positive_int("final_window", final_window)
    if final_window > total:
        raise ValueError(f"final_window must be at most the {total} steps, got {final_window}")
    return total


def train_operator(
    target: Any,
    *,
    depth: int | None = None,
    width: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    schedule: Sequence[Phase] = PAPER_SCHEDULE,
    final_window: int = PAPER_FINAL_WINDOW,
    network: str = "linear",
    seed: int = 0,
    curve_points: int = 120,
    model: Any = None,
) -> dict[str, Any]:
    """Train G(θ) (``network="linear"``) or h_θ (``"tanh"``) to multiply by ``target``.

    ``target``: a tensor or numpy array of shape (m, m); the operator has width ``width``
    and ``depth`` factors of 2×2 blocks, by default the layer's (width 2m as in the paper,
    depth 2·⌈log2(width)⌉: ``bornsparse.nn.permuted.default_width``/``default_depth``).
    ``model``: any ``torch.nn.Module`` mapping (B, m) to (B, m) to train instead, on the
    same inputs, loss and schedule (the penalty applies when it has an
    ``orthogonality_penalty()``); ``depth``, ``width`` and ``network`` must then be left
    out. ``seed`` seeds G's initialisation and the input stream. Returns a dict with
    ``final_mse`` (mean MSE over the last ``final_window`` steps; None if training diverged),
    ``curve`` ([step, mean MSE of the window ending there], thinned to ``curve_points``),
    ``params`` (trainable parameter count), ``steps``, ``wall_s``, ``steps_per_s`` and
    ``final_penalty`` (None for a model without a penalty).
    """
    import torch

    from bornsparse._checks import check_optional_positive_int, check_positive_int
    from bornsparse.data.operators import validate_target
    from bornsparse.nn import PermutedBlockDiagonal, PermutedTanhNetwork

    a = validate_target(target)
    m = a.shape[0]
    depth = check_optional_positive_int("depth", depth)
    width = check_optional_positive_int("width", width)
    batch_size = check_positive_int("batch_size", batch_size)
    curve_points = check_positive_int("curve_points", curve_points)
    total = _check_schedule(network, model, depth, width, schedule, final_window)

    if model is None:
        cls = PermutedBlockDiagonal if network == "linear" else PermutedTanhNetwork
        model = cls(m, m, width=width, depth=depth, seed=seed)  # None: the layer's defaults
    penalty = getattr(model, "orthogonality_penalty", None)
    params = sum(p.numel() for p in model.parameters())
    apply_target = _target_matmul(a)
    data = torch.Generator().manual_seed(seed + 0x5EED)  # inputs: a stream apart from the init
    opt = torch.optim.Adam(model.parameters(), lr=schedule[0].lr)

    mse_hist = torch.empty(total, dtype=torch.float64)
    step = 0
    diverged = False
    t0 = time.perf_counter()
    for phase in schedule:
        for group in opt.param_groups:
            group["lr"] = phase.lr
        for _ in range(phase.steps):
            x = torch.randn(batch_size, m, generator=data)
            with torch.no_grad():
                y = apply_target(x)
            mse = (model(x) - y).pow(2).mean()  # = (2/n)‖Gx − Ax‖², averaged over the batch
            loss = mse if penalty is None else mse + phase.penalty * penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            mse_hist[step] = mse.detach()
            step += 1
        if not torch.isfinite(mse_hist[:step]).all():
            diverged = True
            break
    wall = time.perf_counter() - t0

    hist = mse_hist[:step]
    final = None if diverged else float(hist[-final_window:].mean())
    # thinned curve: mean MSE of consecutive windows, tagged with each window's last step
    edges = torch.linspace(0, step, min(curve_points, step) + 1).round().long().tolist()
    curve = [[int(hi), float(hist[lo:hi].mean())]
             for lo, hi in zip(edges[:-1], edges[1:], strict=True) if hi > lo]
    return {
        "final_mse": final,
        "diverged": diverged,
        "curve": curve,
        "params": int(params),
        "steps": int(step),
        "wall_s": wall,
        "steps_per_s": step / wall if wall > 0 else None,
        "final_penalty": None if penalty is None else float(penalty().detach()),
    }


# ---------------------------------------------------------------------------------------
# Configured runs and sweeps


def _file_sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_config(
    task: str, k: int | None, depth: int, *, width: int, batch_size: int, steps_scale: float,
    seed: int, network: str, target_file: str | None = None, baseline: str | None = None,
) -> dict[str, Any]:
    """The JSON-serialisable configuration of one run; its hash is the run's resume key.

    ``baseline`` ("lowrank" or "monarch"): that layer, sized to the parameter count of the
    G(θ) (or h_θ, ``network``) of this ``depth`` and ``width``, is trained instead; its size
    (``rank`` or ``nblocks``) is part of the configuration. G(θ)'s own configurations have
    no ``baseline`` field, so their keys are those of runs made before it existed.
    """
    cfg: dict[str, Any] = {
        "experiment": "operators", "task": task, "k": k, "depth": depth, "width": width,
        "block_size": 2, "batch_size": batch_size, "steps_scale": steps_scale, "seed": seed,
        "network": network,
    }
    if baseline is not None:
        cfg["baseline"] = baseline
        cfg.update(baseline_size(baseline, width // 2, operator_params(network, width, depth)))
    if task == "file":
        cfg["target_file"] = str(Path(target_file).resolve())
        cfg["target_sha256"] = _file_sha256(target_file)
    return cfg


def _config_target(cfg: dict[str, Any]):
    from bornsparse.data.operators import load_target, make_target

    m = cfg["width"] // 2
    if cfg["task"] == "file":
        return load_target(cfg["target_file"], m)
    return make_target(cfg["task"], m, cfg["k"], cfg["seed"])


def config_dof(cfg: dict[str, Any]) -> int | None:
    from bornsparse.data.operators import target_dof

    if cfg["task"] == "file":
        return None  # unknown for a user matrix
    return target_dof(cfg["task"], cfg["width"] // 2, cfg["k"])


def operator_params(network: str, width: int, depth: int) -> int:
    """Trainable parameters of G(θ) (2·width per factor, 2×2 blocks) or h_θ (3·width: the
    blocks and a bias per neuron) of ``depth`` factors."""
    return (2 if network == "linear" else 3) * width * depth


def baseline_size(baseline: str, m: int, params: int) -> dict[str, int]:
    """The size of an m × m ``baseline`` layer whose parameters come closest to ``params``
    (in ratio): {"rank": r} with 2·m·r parameters (r ≤ m) or {"nblocks": k} with 2·m²/k
    (k a divisor of m)."""
    from bornsparse.experiments.structured_methods import closest_size

    if baseline == "lowrank":
        return {"rank": closest_size(range(1, m + 1), lambda r: 2 * m * r, params)}
    if baseline == "monarch":
        divisors = [k for k in range(1, m + 1) if m % k == 0]
        return {"nblocks": closest_size(divisors, lambda k: 2 * m * m // k, params)}
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")


def build_baseline(cfg: dict[str, Any]):
    """The bias-free m × m low-rank or Monarch layer of a baseline configuration."""
    from bornsparse.nn import LowRankLinear, MonarchLinear

    m = cfg["width"] // 2
    if cfg["baseline"] == "lowrank":
        return LowRankLinear(m, m, cfg["rank"], bias=False, seed=cfg["seed"])
    return MonarchLinear(m, m, cfg["nblocks"], bias=False, seed=cfg["seed"])


def operator_run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration and return its complete results record."""
    import torch

    from bornsparse.experiments.results_io import library_versions, run_key

    phases, window = scaled_schedule(cfg["steps_scale"])
    if cfg.get("baseline"):
        out = train_operator(
            _config_target(cfg), model=build_baseline(cfg), batch_size=cfg["batch_size"],
            schedule=phases, final_window=window, seed=cfg["seed"],
        )
    else:
        out = train_operator(
            _config_target(cfg), depth=cfg["depth"], width=cfg["width"],
            batch_size=cfg["batch_size"], schedule=phases, final_window=window,
            network=cfg["network"], seed=cfg["seed"],
        )
    return {
        "key": run_key(cfg), "config": cfg, "seed": cfg["seed"], "dof": config_dof(cfg),
        **out, "torch_threads": torch.get_num_threads(), "versions": library_versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _describe(rec: dict[str, Any]) -> str:
    c = rec["config"]
    mse = "diverged" if rec["final_mse"] is None else f"{rec['final_mse']:.2e}"
    who = f"{c['baseline']} at N={c['depth']}" if c.get("baseline") else f"N={c['depth']}"
    return f"{c['task']} k={c['k']} {who} mse={mse}"


def run_sweep(
    configs: Iterable[dict[str, Any]], results_path: str | os.PathLike, *,
    progress: bool = True, **executor: Any,
):
    """Run every configuration not already in ``results_path`` and append its record there.

    ``executor``: the :func:`bornsparse.experiments.sweep.run_sweep` options (executor,
    workers, threads, address, cpus_per_run, max_retries). Records are written by this
    process only, one fsynced line per finished run. Returns the
    :class:`~bornsparse.experiments.sweep.SweepOutcome`.
    """
    from bornsparse.experiments import sweep

    # deepest first: the longest runs start early and the workers end evenly
    return sweep.run_sweep(configs, results_path, operator_run,
                           order=lambda c: -c["depth"], describe=_describe,
                           progress=progress, desc="operator runs", **executor)


# ---------------------------------------------------------------------------------------
# Command line: the shared skeleton (experiments/command.py) with this experiment's parts


def _own_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bornsparse reproduce operators`` beyond the shared ones."""
    parser.add_argument("--tasks", nargs="+", metavar="TASK",
                        help=f"targets among {', '.join(TASK_CHOICES)} or file:PATH.npy "
                        "(default: all built-ins, or none when --target-file is given; "
                        "'dense' is the black baseline of every figure)")
    parser.add_argument("--target-file", action="append", default=[], metavar="PATH.npy",
                        help="a user matrix of shape (width/2, width/2) to learn; repeatable")
    parser.add_argument("--ks", nargs="+", type=int, metavar="K",
                        help=f"difficulties k (default {list(FULL_KS)}; quick {list(QUICK_KS)})")
    parser.add_argument("--depths", nargs="+", type=int, metavar="N",
                        help=f"operator depths (default {list(FULL_DEPTHS)}; "
                        f"quick {list(QUICK_DEPTHS)})")
    parser.add_argument("--width", type=int,
                        help=f"operator width n; targets are n/2 × n/2 (default {PAPER_WIDTH}; "
                        f"quick {QUICK_WIDTH})")
    parser.add_argument("--steps-scale", type=float,
                        help="multiply every phase of the paper's 7000/3000/2000-step schedule "
                        f"and its 1000-step final window (default 1; quick {QUICK_STEPS_SCALE})")
    parser.add_argument("--baselines", action="store_true",
                        help="also learn every target with a low-rank layer U Vᵀ and a "
                        "Monarch layer of about G(θ)'s parameter count at each depth (extra "
                        "rows of the table, dashed and dotted lines of the figures)")
    parser.add_argument("--network", choices=NETWORKS, default="linear",
                        help="linear: G(θ) of §3.1 (the paper's experiments); tanh: h_θ of §3.2")


def _tasks(args: argparse.Namespace, m: int) -> list[tuple[str, str | None]]:
    """(task, target file or None) per --tasks / --target-file entry; a target file is read
    now (shape, finiteness, readability), not mid-sweep."""
    from bornsparse.data.operators import load_target

    tasks = list(args.tasks) if args.tasks is not None else (
        [] if args.target_file else list(TASK_CHOICES))
    tasks += [f"file:{p}" for p in args.target_file]
    if not tasks:
        raise ValueError("no task given")
    parsed: list[tuple[str, str | None]] = []
    for t in tasks:
        if t.startswith("file:"):
            path = t[len("file:"):]
            load_target(path, m)
            parsed.append(("file", path))
        elif t in TASK_CHOICES:
            parsed.append((t, None))
        else:
            raise ValueError(
                f"--tasks: unknown task {t!r}; expected one of {', '.join(TASK_CHOICES)} "
                "or file:PATH.npy")
    return parsed


def build_configs(args: argparse.Namespace) -> command.Plan:
    """Validate every flag and target before anything trains; ValueError naming the flag.
    Returns the :class:`~bornsparse.experiments.command.Plan` (configs, info)."""
    from bornsparse.data.operators import K_TARGETS
    quick = bool(args.quick)
    width = command.pick(args.width, quick=quick, quick_value=QUICK_WIDTH,
                         full_value=PAPER_WIDTH)
    if width < 4 or width % 2:
        raise ValueError(f"--width must be an even integer >= 4, got {width}")
    m = width // 2
    ks = command.pick(args.ks, quick=quick, quick_value=QUICK_KS, full_value=FULL_KS)
    depths = command.positive_ints("--depths", command.pick(
        args.depths, quick=quick, quick_value=QUICK_DEPTHS, full_value=FULL_DEPTHS),
        what="depth")
    scale = command.pick(args.steps_scale, quick=quick, quick_value=QUICK_STEPS_SCALE,
                         full_value=1.0)
    phases, window = scaled_schedule(scale)  # validates
    for k in ks:
        if not 1 <= k <= m:
            raise ValueError(f"--ks: k must lie in 1..width/2 = 1..{m}, got {k}")
    batch_size = command.positive_int("--batch-size", command.pick(
        args.batch_size, quick=quick, quick_value=DEFAULT_BATCH_SIZE,
        full_value=DEFAULT_BATCH_SIZE))
    seeds = command.seed_list(args.seeds, quick=quick, quick_count=1, full_count=1)

    configs = []
    seen = set()
    for task, path in _tasks(args, m):
        for k in (ks if task in K_TARGETS else [None]):
            for d in depths:
                for s in seeds:
                    for baseline in (None, *BASELINES) if args.baselines else (None,):
                        cfg = make_config(task, k, d, width=width, batch_size=batch_size,
                                          steps_scale=scale, seed=s, network=args.network,
                                          target_file=path, baseline=baseline)
                        sig = repr(sorted(cfg.items()))
                        if sig not in seen:
                            seen.add(sig)
                            configs.append(cfg)
    info = {"width": width, "ks": list(ks), "depths": list(depths), "steps_scale": scale,
            "window": window, "batch_size": batch_size, "network": args.network,
            "baselines": bool(args.baselines), "seeds": len(seeds),
            "description": f"width {width}, depths {list(depths)}, steps "
            f"{'/'.join(str(p.steps) for p in phases)} (final window {window}), batch "
            f"{batch_size}, network {args.network}"}
    return command.Plan(configs, info)


def _experiment() -> command.Experiment:
    return command.Experiment(
        name="operators",
        flags=command.SharedFlags(
            quick=f"width {QUICK_WIDTH}, {QUICK_STEPS_SCALE}× the paper's steps, depths "
            f"{list(QUICK_DEPTHS)}, k in {list(QUICK_KS)}",
            seeds="1: seed 0; a seed draws the target, the initialisation and the inputs; "
            "figures average over seeds",
            out="runs/operators",
            batch_size=f"{DEFAULT_BATCH_SIZE}; the paper gives none"),
        own_arguments=_own_arguments, plan=build_configs, sweep=run_sweep,
        report=operators_report.markdown_report,
        figures=(operators_report.plot_operator_figures,))


#: ``add_arguments(parser)``: the flags of ``bornsparse reproduce operators``; ``main(args)``:
#: validate, run the sweep (resuming), write table and figures; the exit code
add_arguments, main = command.entry_points(_experiment)
