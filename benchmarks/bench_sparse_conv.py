"""SparseConv2d and DCTPlusSparseConv2d against dense nn.Conv2d: forward + backward, ratios
from one run.

    .venv/bin/python benchmarks/bench_sparse_conv.py --threads 2
    .venv/bin/python benchmarks/bench_sparse_conv.py --threads 1 --clock cpu --quick

Times the layer alone: forward, then ``y.backward(g)`` with ``g`` made beforehand (a loss on
a 128×64×32×32 output would cost a fifth of a dense conv by itself), gradients set to None
before each call so no accumulation pass is timed. For each layer shape (a ResNet-sized
64 → 64 3×3 conv; a MobileNetV2-like depthwise 3×3 and 1×1 pair's layers) and density
(1e-2, 1e-3, 1e-4) the candidates run interleaved (benchmarks/common.py) after a warm-up
that keeps numba's compilation out, and each JSON line gives the time and the ratio to the
dense conv of the same shape, with the floor beside it: a "layer" that only allocates and
writes its output and its input gradient. ``--clock cpu`` times process CPU time, steadier
on a shared machine (meaningful with one thread only).
"""

from __future__ import annotations

import argparse
import time
import types

import torch

import common
from bornsparse.nn import DCTPlusSparseConv2d, SparseConv2d
from common import machine_tag, print_json_line, set_threads, time_interleaved

# name -> (in, out, kernel, padding, groups, H·W side)
SHAPES = {
    "resnet 64→64 3×3": (64, 64, 3, 1, 1, 32),
    "mobilenet depthwise 3×3": (96, 96, 3, 1, 96, 28),
    "mobilenet 1×1 96→24": (96, 24, 1, 0, 1, 28),
}


def _fb(layer, x, g):
    def run():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(g)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--densities", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--quick", action="store_true", help="the 64→64 layer at 1e-3 only")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = p.parse_args()
    if args.clock == "cpu":
        # time_interleaved reads time.perf_counter through its module's global `time`
        common.time = types.SimpleNamespace(perf_counter=time.process_time)
    set_threads(args.threads)
    print_json_line({"machine": machine_tag(), "clock": args.clock})
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k.startswith("resnet")}
    densities = [1e-3] if args.quick else args.densities
    for name, (cin, cout, k, pad, groups, side) in shapes.items():
        torch.manual_seed(0)
        x = torch.randn(args.batch, cin, side, side, requires_grad=True)
        dense = torch.nn.Conv2d(cin, cout, k, padding=pad, groups=groups)
        g = torch.randn(args.batch, cout, side, side)
        y_shape = g.shape

        def floor(shape=y_shape, xs=x.shape):
            torch.empty(shape).fill_(1.0)
            torch.empty(xs).fill_(1.0)

        for density in densities:
            total = cout * cin // groups * k * k
            if density * total < 0.5:
                continue
            cands = {"dense nn.Conv2d": _fb(dense, x, g), "floor (write y and grad x)": floor}
            for cls in (SparseConv2d, DCTPlusSparseConv2d):
                layer = cls(cin, cout, k, padding=pad, groups=groups, density=density,
                            seed=0, init="normal")
                cands[cls.__name__] = _fb(layer, x, g)
            times = time_interleaved(cands, repeats=args.repeats)
            base = times["dense nn.Conv2d"]
            for cand, t in times.items():
                print_json_line({"layer": name, "density": density, "batch": args.batch,
                                 "candidate": cand, "seconds": round(t, 5),
                                 "ratio_to_dense": round(t / base, 3),
                                 "threads": args.threads})


if __name__ == "__main__":
    main()
