"""The Triton kernels against the plain-PyTorch reference and dense nn.Linear, on a GPU.

A prepared script for a CUDA machine (GPU time is short: one command measures everything):
forward+backward (gradients of input and parameters, as in training) of

* PermutedBlockDiagonal(1024, 1024, width=2048, depth=20) with backend "triton" and
  "reference", and dense nn.Linear(1024, 1024);
* SparseLinear(4096, 4096, density 1e-2) and DCTPlusSparseLinear(4096, 4096, density 1e-2)
  with backend "triton" and "reference", and dense nn.Linear(4096, 4096);

float32, batch 1024 (``--batch``), interleaved rounds after a warm-up (Triton compiles on
the first call), torch.cuda.synchronize() around every timing, peak memory of each f+b.
Prints the device, a table of medians and one JSON line of ratios (ours / dense: below 1 is
faster). Without a CUDA device it says so and exits with status 0.

    python benchmarks/bench_gpu.py [--batch 1024] [--repeats 15]

DCTPlusSparseLinear's "triton" row runs its sparse part through the Triton kernel and its
DCT through torch.fft (no fused Triton kernel for the layer yet).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch


def f_and_b(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One training step's products: forward, backward to input and parameters."""
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).square().mean().backward()
    return step


def measure(cases: dict[str, Callable[[], None]], repeats: int, warmup: int
            ) -> dict[str, tuple[float, float]]:
    """Median seconds and peak MiB of each case, rounds interleaved across cases."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in cases}
    peaks: dict[str, float] = {}
    for _ in range(repeats):
        for name, fn in cases.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
    return {name: (statistics.median(ts), peaks[name]) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on a GPU machine. Nothing measured.")
        return 0
    from bornsparse.nn import DCTPlusSparseLinear, PermutedBlockDiagonal, SparseLinear

    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"batch {args.batch}, float32")
    torch.manual_seed(0)
    results = {}

    x = torch.randn(args.batch, 1024, device=dev, requires_grad=True)
    cases = {"dense 1024": f_and_b(torch.nn.Linear(1024, 1024, device=dev), x)}
    for backend in ("triton", "reference"):
        layer = PermutedBlockDiagonal(1024, 1024, width=2048, depth=20, seed=0,
                                      backend=backend, device=dev)
        cases[f"permuted {backend}"] = f_and_b(layer, x)
    results.update(measure(cases, args.repeats, args.warmup))

    x = torch.randn(args.batch, 4096, device=dev, requires_grad=True)
    cases = {"dense 4096": f_and_b(torch.nn.Linear(4096, 4096, device=dev), x)}
    for backend in ("triton", "reference"):
        for name, cls in (("sparse", SparseLinear), ("dctps", DCTPlusSparseLinear)):
            layer = cls(4096, 4096, density=1e-2, seed=0, backend=backend, device=dev)
            cases[f"{name} {backend}"] = f_and_b(layer, x)
    results.update(measure(cases, args.repeats, args.warmup))

    print(f"{'case':<20} {'f+b ms':>10} {'peak MiB':>10}")
    for name, (t, peak) in results.items():
        print(f"{name:<20} {t * 1e3:>10.3f} {peak:>10.1f}")
    ratios = {}
    for family, dense in (("permuted", "dense 1024"), ("sparse", "dense 4096"),
                          ("dctps", "dense 4096")):
        for backend in ("triton", "reference"):
            ratios[f"{family}_{backend}/dense"] = results[f"{family} {backend}"][0] / (
                results[dense][0])
        ratios[f"{family}_triton/reference"] = (
            results[f"{family} triton"][0] / results[f"{family} reference"][0])
    print(json.dumps({"device": torch.cuda.get_device_name(dev), "batch": args.batch,
                      "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
