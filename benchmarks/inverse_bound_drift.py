"""How fast training pushes G(θ) past the cycle walk's conditioning bound.

    .venv/bin/python benchmarks/inverse_bound_drift.py [--log2-width 16] [--steps 40]

Backward rebuilds activations through the blocks' inverses (memory flat in depth) only
while the product over factors of the worst block condition number stays at most
``INVERSE_MAX_AMPLIFICATION``; past it, backward recomputes with depth-sized scratch. This
trains a PermutedBlockDiagonal (in = out = width/2, depth 2·log2 width) with Adam to map x
to its reversed coordinates, for each penalty weight, and prints the bound every few steps
as one JSON line per weight. Not a timing: any load is fine.
"""

from __future__ import annotations

import argparse

import torch

from bornsparse.nn import PermutedBlockDiagonal
from bornsparse.ops.permuted.numba_cycles import worst_amplification
from bornsparse.ops.permuted.operands import INVERSE_MAX_AMPLIFICATION
from common import machine_tag, print_json_line, set_threads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log2-width", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--penalties", type=float, nargs="+", default=[1e-3, 1.0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    set_threads(args.threads)
    width = 2 ** args.log2_width
    n = width // 2
    print_json_line({"machine": machine_tag(), "bound": INVERSE_MAX_AMPLIFICATION})
    for penalty in args.penalties:
        torch.manual_seed(0)
        g = PermutedBlockDiagonal(n, n, width=width, depth=2 * args.log2_width, seed=0)
        opt = torch.optim.Adam(g.parameters(), lr=args.lr, fused=True)
        trace = []
        for step in range(args.steps + 1):
            if step % 5 == 0:
                trace.append([step, round(float(worst_amplification(g.weight.detach().numpy())),
                                          3)])
            x = torch.randn(args.batch, n)
            loss = (g(x) - x.flip(1)).pow(2).mean() + penalty * g.orthogonality_penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        print_json_line({"width": width, "depth": 2 * args.log2_width, "lr": args.lr,
                         "penalty_weight": penalty, "amplification_by_step": trace})


if __name__ == "__main__":
    main()
