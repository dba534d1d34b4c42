"""``bornsparse demo``: the quick tour that prints tables and writes figures.

1. A small operator-learning table (the permuted block-diagonal paper, §5, at reduced
   size): the permuted block-diagonal operator G(θ) against a dense layer and against a
   low-rank layer with as many parameters as G, each trained to imitate a random
   permutation and a low-rank matrix.
2. ``bornsparse reproduce operators --quick``: Figures 1-4 at n = 256.
3. ``bornsparse reproduce dctps --quick``: the DCTpS comparison on MNIST-1D, one seed.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out",
                        help="folder for tables and figures (default: out)")
    parser.add_argument("--n-half", type=int, default=128,
                        help="input = output size of the operator table (default: 128)")
    parser.add_argument("--steps", type=int, default=1500,
                        help="Adam steps per model in the operator table (default: 1500)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of targets and models (default: 0)")
    parser.add_argument("--only-table", action="store_true",
                        help="print the operator table only, skip the two quick reproductions")


def _baseline_models(n_half: int, width: int, depth: int, seed: int):
    import torch
    from torch import nn

    from bornsparse.nn import PermutedBlockDiagonal

    torch.manual_seed(seed)
    g = PermutedBlockDiagonal(n_half, n_half, width=width, depth=depth, seed=seed)
    g_params = sum(p.numel() for p in g.parameters())
    rank = max(1, round(g_params / (2 * n_half)))
    low_rank = nn.Sequential(
        nn.Linear(n_half, rank, bias=False), nn.Linear(rank, n_half, bias=False)
    )
    dense = nn.Linear(n_half, n_half, bias=False)
    return {"G(θ) permuted block-diag": g, f"low rank r={rank}": low_rank, "dense": dense}


def _train(model, target, steps: int, batch: int, seed: int) -> float:
    """§5's objective and schedule, shortened: mean MSE over the last tenth of the steps."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    n_half = target.shape[0]
    penalty = getattr(model, "orthogonality_penalty", None)
    phase1, phase2 = int(steps * 7 / 12), int(steps * 10 / 12)
    tail, losses = max(1, steps // 12), []
    for step in range(steps):
        if step == phase2:
            for group in opt.param_groups:
                group["lr"] = 0.001
        weight = 3.0 if step < phase1 else 0.3
        x = torch.randn(batch, n_half, generator=gen)
        mse = (2.0 / (2 * n_half)) * ((model(x) - x @ target.T) ** 2).sum(-1).mean()
        loss = mse + weight * penalty() if penalty is not None else mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= steps - tail:
            losses.append(mse.item())
    return sum(losses) / len(losses)


def operator_table(n_half: int, steps: int, seed: int) -> list[dict[str, object]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    width = 2 * n_half
    depth = 2 * max(1, (width - 1).bit_length())
    k = 2
    u, v = torch.randn(n_half, k, generator=gen), torch.randn(n_half, k, generator=gen)
    targets = {
        "permutation": torch.eye(n_half)[torch.randperm(n_half, generator=gen)],
        f"low rank k={k}": u @ v.T / (n_half * k) ** 0.5,
    }
    rows = []
    for tname, target in targets.items():
        for mname, model in _baseline_models(n_half, width, depth, seed).items():
            t0 = time.perf_counter()
            mse = _train(model, target, steps, batch=64, seed=seed + 1)
            rows.append({
                "target": tname, "model": mname,
                "params": sum(p.numel() for p in model.parameters()),
                "final_mse": mse, "seconds": time.perf_counter() - t0,
            })
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    lines = ["| target | model | parameters | final MSE |", "|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['model']} | {r['params']:,} | {r['final_mse']:.3e} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bornsparse._checks import check_positive_int

    try:
        check_positive_int("--n-half", args.n_half)
        check_positive_int("--steps", args.steps)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    except (ValueError, TypeError, OSError) as err:
        print(f"bornsparse demo: error: {err}", file=sys.stderr)
        return 2
    print(f"[1] operator learning at n/2 = {args.n_half}, {args.steps} steps "
          "(§5 schedule compressed proportionally)")
    rows = operator_table(args.n_half, args.steps, args.seed)
    table = format_table(rows)
    print(table)
    (out / "demo_operators.md").write_text(table + "\n")
    if args.only_table:
        return 0
    steps = [
        ("operators", ["--quick", "--out", str(out / "operators")]),
        ("dctps", ["--quick", "--out", str(out / "dctps")]),
    ]
    for i, (name, argv) in enumerate(steps, start=2):
        print(f"\n[{i}] bornsparse reproduce {name} {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        status = _run_experiment(name, argv)
        print(f"[{i}] done in {time.perf_counter() - t0:.0f} s", flush=True)
        if status:
            return status
    print(f"\nTables and figures are in {out}/")
    return 0


def _run_experiment(name: str, argv: list[str]) -> int:
    """Run an experiment module as its CLI subcommand would, without importing the CLI."""
    import importlib

    module = importlib.import_module(f"bornsparse.experiments.{name}")
    parser = argparse.ArgumentParser(prog=f"bornsparse reproduce {name}")
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(argv)) or 0)
