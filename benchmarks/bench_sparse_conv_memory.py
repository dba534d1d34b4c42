"""Peak memory of one forward + backward of SparseConv2d and DCTPlusSparseConv2d against a
dense nn.Conv2d of the same shape, each measured in a fresh process.

    .venv/bin/python benchmarks/bench_sparse_conv_memory.py [--threads 2] [--density 1e-3]

The layer is the ResNet-sized 64 → 64 3×3 conv on 32×32 images at batch 128. Reported per
layer: peak RSS growth over one f+b (after one warm-up step at full size) and the bytes
autograd saves between forward and backward (parameters and the input excluded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from common import machine_tag, peak_growth, print_json_line, saved_bytes, set_threads

MIB = 2**20
KINDS = ("dense", "SparseConv2d", "DCTPlusSparseConv2d")


def measure_one(kind: str, density: float, batch: int) -> dict[str, object]:
    from bornsparse.nn import DCTPlusSparseConv2d, SparseConv2d

    torch.manual_seed(0)
    if kind == "dense":
        layer = torch.nn.Conv2d(64, 64, 3, padding=1)
    else:
        cls = SparseConv2d if kind == "SparseConv2d" else DCTPlusSparseConv2d
        layer = cls(64, 64, 3, padding=1, density=density, init="normal", seed=0)
    x = torch.randn(batch, 64, 32, 32, requires_grad=True)
    g = torch.randn(batch, 64, 32, 32)
    for _ in range(2):  # the first step pays one-off costs (numba's JIT, thread stacks)
        x.grad = None
        layer.zero_grad(set_to_none=True)
        peak = peak_growth(layer, x, g)
    x.grad = None
    layer.zero_grad(set_to_none=True)
    return {"layer": kind, "density": density, "batch": batch,
            "peak_growth_mib": None if peak is None else round(peak / MIB, 1),
            "saved_mib": round(saved_bytes(layer, x) / MIB, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    set_threads(args.threads)
    if args.one:
        print(json.dumps(measure_one(args.one, args.density, args.batch)))
        return
    print_json_line({"machine": machine_tag()})
    for kind in KINDS:
        out = subprocess.run(
            [sys.executable, __file__, "--one", kind, "--threads", str(args.threads),
             "--density", str(args.density), "--batch", str(args.batch)],
            check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
        print_json_line(json.loads(out))


if __name__ == "__main__":
    main()
