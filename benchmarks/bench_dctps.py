"""DCTPlusSparseLinear against dense nn.Linear: forward + backward, ratios from one run.

    .venv/bin/python benchmarks/bench_dctps.py --threads 2
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_dctps.py --threads 2

On a machine shared with other processes, run multi-threaded timings with
OMP_WAIT_POLICY=PASSIVE: torch's (and MKL's) OpenMP threads otherwise spin after each
parallel region and take the cores numba's threads are waiting for (measured 5x slower,
docs/results.md). The setting is recorded in the output.

Times every candidate round-robin (benchmarks/common.py) after a warm-up that keeps
numba's compilation out, and prints one JSON line per candidate with its time and its
ratio to the dense layer, plus one line timing the construction of a 65536×65536 layer at
density 1e-4 (support drawn in O(nnz)).
"""

from __future__ import annotations

import argparse
import os
import time
import types

import torch

import common
from bornsparse.nn.dct_plus_sparse import DCTPlusSparseLinear
from bornsparse.nn.sparse_linear import SparseLinear
from common import machine_tag, print_json_line, set_threads, time_interleaved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--density", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="cpu: process CPU time, steadier than wall time on a shared machine; only "
        "meaningful with --threads 1 (CPU time sums over threads)",
    )
    args = p.parse_args()
    if args.clock == "cpu":
        # time_interleaved reads time.perf_counter through its module's global `time`
        common.time = types.SimpleNamespace(perf_counter=time.process_time)
    set_threads(args.threads)
    torch.manual_seed(0)
    n, b = args.features, args.batch

    x = torch.randn(b, n, requires_grad=True)
    dense = torch.nn.Linear(n, n)
    dctps = DCTPlusSparseLinear(n, n, density=args.density, seed=0)
    # "auto" is the fused single op (ops/discrete_cosine/plus_sparse.py); torch.sparse and the
    # plain-PyTorch reference are kept for comparison
    candidates = {"dense nn.Linear": dense, "DCTPlusSparseLinear (auto: fused)": dctps}
    for backend in ("torch_sparse", "reference"):
        m = DCTPlusSparseLinear(n, n, density=args.density, seed=0)
        m.backend = backend
        candidates[f"DCTPlusSparseLinear ({backend})"] = m
    candidates["SparseLinear (numba)"] = SparseLinear(n, n, density=args.density, seed=0)

    def step(module):
        def run():
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x).sum().backward()
        return run

    times = time_interleaved({k: step(m) for k, m in candidates.items()}, repeats=args.repeats)
    ref = times["dense nn.Linear"]
    tag = {**machine_tag(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
           "clock": args.clock}
    for name, t in times.items():
        print_json_line({
            "bench": "dctps_linear_fwd_bwd", "candidate": name, "features": n, "batch": b,
            "density": args.density, "nnz": dctps.nnz, "seconds": round(t, 6),
            "ratio_to_dense": round(t / ref, 4), **tag,
        })

    t0 = time.perf_counter()
    big = DCTPlusSparseLinear(65536, 65536, density=1e-4, seed=0)
    print_json_line({
        "bench": "dctps_construct_65536x65536", "density": 1e-4, "nnz": big.nnz,
        "seconds": round(time.perf_counter() - t0, 4), **tag,
    })


if __name__ == "__main__":
    main()
