"""One permuted layer trained in a loop, as a user's step runs it: f+b time, page faults and
system time per step, per block size.

    .venv/bin/python benchmarks/bench_layer_loop.py [--threads 2] [--batch 256] [--steps 40]

A benchmark that interleaves many layers (bench_permuted.py) leaves the heap in another
state than a loop over one layer, and glibc's choice to hand freed scratch back to the
kernel (then fault it in again) depends on that state; this one shows what the loop sees.
Prints one JSON line per block size (wall median in ms, faults and system ms per step) with
the machine tag. Times drift between processes on a shared VM: compare several runs.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from bornsparse.nn.permuted import PermutedBlockDiagonal
from common import machine_tag, print_json_line, set_threads

# (block size, width, depth) at 65,536 parameters for 1024 → 1024, as bench_permuted.py
_SHAPES = {2: (2048, 16), 4: (2048, 8), 8: (2048, 4), 16: (1024, 4), 32: (1024, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--block-sizes", type=int, nargs="+", default=[8, 4, 2], metavar="K",
                   choices=sorted(_SHAPES))
    args = p.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    tag = machine_tag()
    for k in args.block_sizes:
        width, depth = _SHAPES[k]
        layer = PermutedBlockDiagonal(1024, 1024, width=width, depth=depth, block_size=k,
                                      bias=False)
        x = torch.randn(args.batch, 1024, requires_grad=True)
        grad = torch.randn(args.batch, 1024)

        def step(layer=layer, x=x, grad=grad):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(grad)

        for _ in range(5):  # numba's compilation and the first allocations stay out
            step()
        times = []
        before = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_SELF)
        print_json_line({
            "bench": "permuted_layer_loop", "block_size": k, "width": width, "depth": depth,
            "batch": args.batch, "steps": args.steps,
            "fb_ms": round(statistics.median(times) * 1e3, 3),
            "faults_per_step": round((after.ru_minflt - before.ru_minflt) / args.steps, 1),
            "system_ms_per_step": round((after.ru_stime - before.ru_stime) / args.steps * 1e3,
                                        3),
            **tag,
        })


if __name__ == "__main__":
    main()
