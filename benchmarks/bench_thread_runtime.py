"""Does running the DCT-plus-sparse kernels slow the permuted layer down afterwards?

PermutedBlockDiagonal(1024, 1024, width=2048, depth=20) against dense nn.Linear(1024, 1024),
forward+backward at batch 256, float32: the ratio (ours / dense) is measured first in this
fresh process, then again after DCTPlusSparseLinear(4096, 4096, density=1e-3) ran f+b at
batch 128 in the same process. Every bornsparse kernel runs on torch's own OpenMP team
(ops/runtime/region.py), so the two ratios should agree; when numba's own parallel runtime (a
second libgomp) had started, the ratio moved from 0.68-0.73x to 0.70-0.97x (docs/design.md).
``--numba-runtime`` then starts that runtime on purpose (a numba ``prange`` loop) and
measures a third time, for contrast. Prints a table and one JSON line.

    python benchmarks/bench_thread_runtime.py [--threads 2] [--repeats 9] [--numba-runtime]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bornsparse.nn import DCTPlusSparseLinear, PermutedBlockDiagonal  # noqa: E402
from common import (  # noqa: E402
    cpu_label,
    forward_backward,
    machine_tag,
    print_json_line,
    set_threads,
    time_interleaved,
)


def _numba_runtime_started() -> bool:
    import numba.np.ufunc.parallel as npp

    return bool(npp._is_initialized)


def _start_numba_runtime() -> None:
    """Run a tiny numba prange loop: starts numba's own OpenMP (or TBB) thread pool."""
    import numba
    import numpy as np

    @numba.njit(parallel=True)
    def fill(a):
        for i in numba.prange(a.shape[0]):
            a[i] = i

    fill(np.empty(1 << 12))


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds per phase (default 9)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dctps-steps", type=int, default=20,
                    help="f+b steps of the DCT-plus-sparse layer between the phases")
    ap.add_argument("--numba-runtime", action="store_true",
                    help="then start numba's parallel runtime and measure a third time")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(0)
    n = 1024
    dense = torch.nn.Linear(n, n)
    ours = PermutedBlockDiagonal(n, n, width=2048, depth=20, seed=0)
    x = torch.randn(args.batch, n, requires_grad=True)
    grad = torch.randn(args.batch, n)
    fns = {"dense": forward_backward(dense, x, grad), "ours": forward_backward(ours, x, grad)}
    for fn in fns.values():  # JIT compilation (or cache loads) out of the timings
        fn()

    phases = []

    def measure(name: str) -> None:
        t = time_interleaved(fns, repeats=args.repeats)
        phases.append({
            "phase": name, "dense_ms": t["dense"] * 1e3, "ours_ms": t["ours"] * 1e3,
            "ratio": t["ours"] / t["dense"], "numba_runtime": _numba_runtime_started(),
        })

    measure("fresh")

    dctps = DCTPlusSparseLinear(4096, 4096, density=1e-3, init="normal", seed=0)
    xd = torch.randn(128, 4096, requires_grad=True)
    gd = torch.randn(128, 4096)
    step = forward_backward(dctps, xd, gd)
    step()  # compile / load the kernels
    t0 = time.perf_counter()
    for _ in range(args.dctps_steps):
        step()
    dctps_ms = (time.perf_counter() - t0) / max(1, args.dctps_steps) * 1e3
    measure("after_dctps")

    if args.numba_runtime:
        _start_numba_runtime()
        measure("after_numba_runtime")

    tag = machine_tag()
    print(
        f"PermutedBlockDiagonal({n}, {n}, width=2048, depth=20) vs nn.Linear({n}, {n}), f+b, "
        f"batch {args.batch}, float32, {args.threads} threads, wall time; ratio = ours / dense"
    )
    print(f"CPU: {cpu_label()}; DCTPlusSparseLinear(4096, 4096, density=1e-3) f+b at batch "
          f"128 between the phases: {dctps_ms:.2f} ms/step")
    print(f"{'phase':>20} {'dense f+b':>10} {'ours f+b':>10} {'ratio':>7} {'numba runtime':>14}")
    for p in phases:
        print(f"{p['phase']:>20} {p['dense_ms']:>10.3f} {p['ours_ms']:>10.3f} "
              f"{p['ratio']:>7.2f} {'started' if p['numba_runtime'] else 'never':>14}")
    record = {
        "bench": "thread_runtime",
        "config": {"batch": args.batch, "threads": args.threads, "repeats": args.repeats,
                   "dctps_steps": args.dctps_steps, "dtype": "float32",
                   "clock": "wall_median"},
        "ratio_fwdbwd": {p["phase"]: round(p["ratio"], 4) for p in phases},
        "ms": {p["phase"]: {"dense": round(p["dense_ms"], 4), "ours": round(p["ours_ms"], 4)}
               for p in phases},
        "numba_runtime_started": {p["phase"]: p["numba_runtime"] for p in phases},
        "dctps_ms_per_step": round(dctps_ms, 4),
        "machine": tag,
    }
    print_json_line(record)
    return record


if __name__ == "__main__":
    main()
