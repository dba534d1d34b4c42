"""Does a numba parallel kernel fight torch's OpenMP threads? One step = a torch parallel op
(nn.Linear(1024, 1024) on a batch of 256) followed by a numba ``prange`` kernel, 2 threads.

    NUMBA_THREADING_LAYER=omp       python benchmarks/bench_openmp_contention.py
    NUMBA_THREADING_LAYER=workqueue python benchmarks/bench_openmp_contention.py

With the "omp" layer numba runs on libgomp too, but on a second copy of it (numba's omppool
links ``libgomp.so.1.0.0`` by file name, so the dynamic loader does not reuse the one torch
ships in ``torch/lib``): two teams of threads that each spin after their own regions. With
"workqueue" (or a Python thread pool) numba's threads compete with torch's spinning ones
after every torch op. Prints milliseconds per step and for the kernel alone. The permuted
kernels avoid both by running on torch's own team (``bornsparse/ops/runtime/region.py``).
"""

import time

import numba
import numpy as np
import torch
from numba import njit, prange


@njit(parallel=True)
def _row_sums_kernel(a, out):
    for i in prange(a.shape[0]):
        s = 0.0
        for j in range(a.shape[1]):
            s += a[i, j] * 1.0001
        out[i] = s


def main() -> None:
    torch.set_num_threads(2)
    numba.set_num_threads(2)
    rng = np.random.default_rng(0)
    a = rng.random((2048, 4096), dtype=np.float32)
    out = np.empty(2048, np.float32)
    x, lin = torch.randn(256, 1024), torch.nn.Linear(1024, 1024)

    def step() -> None:
        lin(x)
        _row_sums_kernel(a, out)

    _row_sums_kernel(a, out)  # compile outside the timing
    for fn, name in ((step, "torch op + numba kernel"), (lambda: _row_sums_kernel(a, out),
                                                        "numba kernel alone")):
        for _ in range(5):
            fn()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        ms = (time.perf_counter() - t0) / 50 * 1e3
        print(f"{numba.threading_layer():>9}  {name}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
