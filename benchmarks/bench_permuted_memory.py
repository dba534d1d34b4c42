"""Training memory of PermutedBlockDiagonal against depth: reference autograd vs fused kernel.

Two measurements per (backend, depth), at batch 256, 1024 -> 1024 features, width 2048,
float32:

* saved: bytes of the tensors autograd keeps between forward and backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (distinct storages, parameters and
  permutations excluded). This is the activation memory a deep network multiplies by its
  number of layers.
* peak: growth of the process's peak resident memory (VmHWM, reset through
  /proc/self/clear_refs) over one forward+backward, which also counts the kernel's scratch
  buffers, the output and the gradients. Each case runs in a fresh process, warmed up on a
  batch of 2 (numba compiles) and measured on its second big step (the first also pays
  one-off costs), with glibc told to return big blocks to the system
  (MALLOC_MMAP_THRESHOLD_), so memory cached from an earlier step cannot hide the growth.
  Linux only; printed as n/a elsewhere.

    python benchmarks/bench_permuted_memory.py [--depths 5 10 20 40] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bornsparse.nn import PermutedBlockDiagonal  # noqa: E402
from common import machine_tag, peak_growth, print_json_line, saved_bytes, set_threads  # noqa: E402

MIB = 2**20


def measure_one(depth: int, backend: str, batch: int, n: int, width: int) -> dict[str, object]:
    torch.manual_seed(0)
    layer = PermutedBlockDiagonal(n, n, width=width, depth=depth, seed=0)
    layer.backend = backend
    small = torch.randn(2, n, requires_grad=True)
    layer(small).sum().backward()  # warm-up: compiles numba without touching big memory
    layer.zero_grad(set_to_none=True)
    x = torch.randn(batch, n, requires_grad=True)
    grad = torch.randn(batch, n)
    # the first big step also pays one-off costs (thread stacks, lazily loaded code); the
    # second shows what a training step needs
    for _ in range(2):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        peak = peak_growth(layer, x, grad)
    x.grad = None
    layer.zero_grad(set_to_none=True)
    saved = saved_bytes(layer, x)
    return {
        "depth": depth, "backend": "fused" if backend == "auto" else backend,
        "saved_mib": saved / MIB, "peak_growth_mib": None if peak is None else peak / MIB,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[5, 10, 20, 40])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("DEPTH", "BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    n = args.features
    if args.one:
        row = measure_one(int(args.one[0]), args.one[1], args.batch, n, args.width)
        print(json.dumps(row))
        return row

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    rows = []
    for depth in args.depths:
        for backend in ("reference", "auto"):
            cmd = [sys.executable, __file__, "--one", str(depth), backend,
                   "--batch", str(args.batch), "--features", str(n), "--width", str(args.width),
                   "--threads", str(args.threads)]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))

    print(f"PermutedBlockDiagonal({n}, {n}, width={args.width}), batch {args.batch}, float32, "
          f"{args.threads} threads; MiB; the input x is {args.batch * n * 4 / MIB:.2f} MiB")
    print(f"{'depth':>6} {'backend':>10} {'saved for bwd':>14} {'peak growth f+b':>16}")
    for r in rows:
        peak = "n/a" if r["peak_growth_mib"] is None else f"{r['peak_growth_mib']:.1f}"
        print(f"{r['depth']:>6} {r['backend']:>10} {r['saved_mib']:>14.2f} {peak:>16}")
    record = {
        "bench": "permuted_memory",
        "config": {"features": n, "width": args.width, "batch": args.batch, "dtype": "float32",
                   "threads": args.threads},
        "rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                 for r in rows],
        "machine": machine_tag(),
    }
    print_json_line(record)
    return record


if __name__ == "__main__":
    main()
