"""One n × n hidden layer of every `reproduce structured` method, f+b against dense, at
several batch sizes: which layer is cheapest at which budget and batch.

Each block is built exactly as the experiment builds it (``structured_methods.build_block``:
same budgets, sizes and block sizes, G(θ) at every block size that fits), timed forward +
backward (gradients of input and parameters) on the same input, interleaved with a dense
``nn.Linear(n, n)`` after a warm-up. Prints a markdown table of f+b / dense and one JSON
line.

    python benchmarks/bench_structured_layers.py [--threads 2] [--batches 16 128 1024]
        [--width 512] [--block-sizes 2 4 8 32] [--repeats 7]
"""

from __future__ import annotations

import argparse

import torch

from bornsparse.experiments.structured import BUDGETS
from bornsparse.experiments.structured_methods import (
    BLOCK_SIZES,
    METHODS,
    build_block,
    fits_budget,
)
from bornsparse.experiments.structured_report import budget_text
from common import forward_backward, machine_tag, print_json_line, set_threads, time_interleaved


def _layers(width: int, block_sizes: list[int]) -> dict[str, torch.nn.Module]:
    """name -> block, over every method, budget and fitting G(θ) block size."""
    torch.manual_seed(0)
    layers = {"dense": torch.nn.Linear(width, width)}
    for budget in BUDGETS:
        for method in METHODS:
            if method == "dense":
                continue
            for k in (block_sizes if method == "permuted" else [2]):
                if not fits_budget(method, width, budget, block_size=k):
                    continue
                name = f"G(θ) k={k}" if method == "permuted" else METHODS[method].label
                block, _ = build_block(method, width, budget, seed=0, block_size=k)
                layers[f"{budget_text(budget)} | {name}"] = block
    return layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 128, 1024])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=list(BLOCK_SIZES))
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    set_threads(args.threads)
    layers = _layers(args.width, args.block_sizes)
    ratios: dict[str, dict[int, float]] = {name: {} for name in layers}
    for batch in args.batches:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(batch, args.width, generator=gen).requires_grad_()
        grad = torch.randn(batch, args.width, generator=gen)
        times = time_interleaved({name: forward_backward(layer, x, grad)
                                  for name, layer in layers.items()}, repeats=args.repeats)
        for name, t in times.items():
            ratios[name][batch] = t / times["dense"]
    print("| budget | layer | " + " | ".join(f"f+b / dense, batch {b}" for b in args.batches)
          + " |")
    print("|---|---|" + "---:|" * len(args.batches))
    for name, r in ratios.items():
        if name == "dense":
            continue
        budget, label = name.split(" | ")
        print(f"| {budget} | {label} | " + " | ".join(f"{r[b]:.2f}" for b in args.batches)
              + " |")
    print_json_line({"machine": machine_tag(), "width": args.width, "ratios": ratios})


if __name__ == "__main__":
    main()
