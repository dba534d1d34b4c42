"""Timing helpers shared by the benchmarks.

Times are noisy on a shared 2-core machine, so every benchmark reports *ratios* of two
measurements taken side by side in one run, interleaved, after a warm-up that keeps numba's
JIT compilation out of the timings.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from bornsparse.experiments.measure import saved_activation_bytes


def set_threads(n: int) -> None:
    """Exactly ``n`` compute threads whatever the environment exports (the sweeps' own
    rule, :func:`~bornsparse.experiments.sweep.use_threads`): every bornsparse kernel runs
    on torch's OpenMP team (ops/runtime/region.py), so numba's own thread count is never set
    (setting it would start a second OpenMP runtime)."""
    from bornsparse.experiments.sweep import use_threads

    use_threads(n)
    if torch.get_num_threads() != n:
        raise RuntimeError(f"asked for {n} threads, torch runs {torch.get_num_threads()}")


# Variables that keep numba, torch or MKL to a narrower instruction set than the CPU has
# (e.g. AVX2 code on an AVX-512 machine): recorded, since they change what was measured.
ISA_VARIABLES = ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "ATEN_CPU_CAPABILITY",
                 "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")


def cpu_description() -> dict[str, object]:
    """The processor as /proc/cpuinfo and sysfs describe it: a VM's model name alone
    ("AMD EPYC") does not tell one generation from another, its family and model do."""
    from bornsparse.ops.runtime.hardware import cache_bytes

    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    info.setdefault("model name", platform.processor() or platform.machine())
    flags = set(info.get("flags", "").split())
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse"
    return {
        "cpu": info["model name"],
        "cpu_family": info.get("cpu family", ""),
        "cpu_model": info.get("model", ""),
        "vector_isa": isa,
        "cache_kib": {f"L{lvl}": cache_bytes(lvl, 0) >> 10 for lvl in (1, 2, 3)},
    }


def cpu_label() -> str:
    """One line naming the processor for a table header, e.g. "AMD EPYC (family 25 model
    17, avx512; L2 1024 KiB)"."""
    d = cpu_description()
    return (f"{d['cpu']} (family {d['cpu_family']} model {d['cpu_model']}, {d['vector_isa']}; "
            f"L2 {d['cache_kib']['L2']} KiB)")


def machine_tag() -> dict[str, object]:
    """What a reader needs to compare two measurements: versions, threads, processor."""
    import numba
    import numpy

    return {
        **cpu_description(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "thread_variables": {k: v for k, v in os.environ.items() if k.endswith("_THREADS")},
        "isa_variables": {k: os.environ[k] for k in ISA_VARIABLES if k in os.environ},
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, repeats: int = 15, min_time: float = 0.05,
    warmup: int = 2,
) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin.

    Each round times every function once (looping it until ``min_time`` has passed), so a
    burst of load from elsewhere hits all candidates alike and their ratio stays fair.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    inner = {}
    for name, fn in fns.items():
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_time:
            fn()
            n += 1
        inner[name] = max(1, n)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def forward_backward(layer: torch.nn.Module, x: torch.Tensor,
                     grad: torch.Tensor) -> Callable[[], None]:
    """A timed case: ``layer(x).backward(grad)`` with gradients set to None first, so no
    accumulation pass is timed."""
    def run() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    return run


def print_json_line(record: dict[str, object]) -> None:
    print(json.dumps(record, sort_keys=True))


# ---- memory: peak RSS over one step (Linux /proc) and what autograd saves -----------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def saved_bytes(layer: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd saves for backward, parameters excluded."""
    _, nbytes = saved_activation_bytes(layer, x, None, lambda out, _y: out)
    return nbytes


def peak_growth(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int | None:
    """Growth of peak RSS over one forward+backward, in bytes (None if unavailable)."""
    gc.collect()
    if not _reset_peak():
        return None
    base = _status_kib("VmRSS")
    layer(x).backward(grad)
    peak = _status_kib("VmHWM")
    if base is None or peak is None:
        return None
    return (peak - base) * 1024


def peak_rss_growth(fn: Callable[[], object]) -> int | None:
    """Growth of peak RSS while ``fn`` runs, in bytes (None if unavailable)."""
    gc.collect()
    if not _reset_peak():
        return None
    base = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if base is None or peak is None:
        return None
    return (peak - base) * 1024


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (a large number where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50
