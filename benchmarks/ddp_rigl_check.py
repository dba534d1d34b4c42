"""RigL under DistributedDataParallel: do the ranks stay one model? (issue 12's check).

    torchrun --nproc_per_node 2 benchmarks/ddp_rigl_check.py [--steps 100] [--delta 10]

Each rank builds a small MLP from its own seed (the ranks are seeded differently on
purpose), converts it with RigL at density 0.2, wraps it in DistributedDataParallel (gloo)
and trains on its share of every global batch. At the end rank 0 gathers every rank's
supports and parameters and prints one JSON line: whether they are bitwise identical, the
largest parameter difference, the update count and the wall time; exit code 1 if the ranks
differ.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from bornsparse.sparsity import RigL


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--delta", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="examples per rank and step")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(rank)  # differently seeded ranks: DDP and RigL must reconcile them
        model = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                              nn.Linear(256, 10))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        rigl = RigL(model, opt, density=0.2, total_steps=args.steps, delta=args.delta,
                    seed=rank)
        ddp = DistributedDataParallel(model)
        t0 = time.perf_counter()
        for step in range(args.steps):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(world * args.batch, 40, generator=g)
            y = x[:, :10].argmax(1)
            share = slice(rank * args.batch, (rank + 1) * args.batch)
            loss = F.cross_entropy(ddp(x[share]), y[share])
            opt.zero_grad()
            loss.backward()
            if rigl.step():
                opt.step()
        wall = time.perf_counter() - t0
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(state, gathered, dst=0)
        if rank > 0:
            return 0
        same = all(torch.equal(s[k], state[k]) for s in gathered for k in state)
        worst = max(float((s[k].double() - state[k].double()).abs().max())
                    for s in gathered for k in state)
        print(json.dumps({"ranks": world, "steps": args.steps, "delta": args.delta,
                          "updates": rigl.updates, "identical": same,
                          "max_abs_diff": worst,
                          "index_sums": [int(sum(s[k].sum() for k in s if k.endswith("indices")))
                                         for s in gathered],
                          "wall_s": round(wall, 2)}))
        return 0 if same else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
