"""torch.compile on bornsparse layers: compile time, and compiled vs eager f+b in one run.

For the permuted layer (1024 -> 1024, width 2048, depth 20, batch 256: bench_permuted's
case) and DCTpS layers (4096² at 1e-3, batch 256: bench_dctps's case; 512² at 1e-2, batch
128, where torch.compile's fixed per-call cost shows), each in a small model (the layer and a
tanh), it reports the wall time of the first compiled forward+backward (tracing plus
inductor's code generation) and the interleaved median f+b times of eager and compiled
models as ratios to a dense nn.Linear of the same shape measured side by side, plus the
compiled/eager ratio. Run it alone on an idle machine:

    python benchmarks/bench_compile.py [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bornsparse.nn import DCTPlusSparseLinear, PermutedBlockDiagonal  # noqa: E402
from common import machine_tag, print_json_line, set_threads, time_interleaved  # noqa: E402

CASES = {
    "permuted 1024x1024 w2048 d20": (
        lambda: PermutedBlockDiagonal(1024, 1024, width=2048, depth=20, seed=0), 1024, 256),
    "dctps 512x512 1e-2": (
        lambda: DCTPlusSparseLinear(512, 512, density=1e-2, init="normal", seed=0), 512, 128),
    "dctps 4096x4096 1e-3": (
        lambda: DCTPlusSparseLinear(4096, 4096, density=1e-3, init="normal", seed=0), 4096,
        256),
}


def fb(model: nn.Module, x: torch.Tensor):
    def run() -> None:
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x).sum().backward()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    set_threads(args.threads)
    print_json_line({"machine": machine_tag()})
    for name, (make, n, batch) in CASES.items():
        torch.manual_seed(0)
        eager = nn.Sequential(make(), nn.Tanh())
        dense = nn.Sequential(nn.Linear(n, n), nn.Tanh())
        x = torch.randn(batch, n, requires_grad=True)
        fb(eager, x)()  # numba's JIT (cached on disk) before any timing
        compiled = torch.compile(eager, fullgraph=True)
        t0 = time.perf_counter()
        fb(compiled, x)()
        compile_s = time.perf_counter() - t0
        times = time_interleaved(
            {"dense": fb(dense, x), "eager": fb(eager, x), "compiled": fb(compiled, x)},
            repeats=args.repeats,
        )
        print_json_line({
            "case": name, "batch": batch, "threads": args.threads,
            "first_compiled_fb_s": round(compile_s, 2),
            "eager_vs_dense": round(times["eager"] / times["dense"], 3),
            "compiled_vs_dense": round(times["compiled"] / times["dense"], 3),
            "compiled_vs_eager": round(times["compiled"] / times["eager"], 3),
        })


if __name__ == "__main__":
    main()
