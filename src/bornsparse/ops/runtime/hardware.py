"""What the machine offers the kernels, read at run time: cache sizes and torch's thread
count, so that tiles and path choices follow the machine they run on rather than constants
tuned on one CPU."""

from __future__ import annotations

import glob
import os

import torch


@torch.compiler.assume_constant_result
def num_threads() -> int:
    """torch's intra-op thread count, as a constant that torch.compile can trace.

    The kernels' tiles depend on it; a compiled graph keeps the value it was traced with
    (dynamo cannot trace ``torch.get_num_threads`` itself).
    """
    return max(1, torch.get_num_threads())


def cache_bytes(level: int, default: int) -> int:
    """Size of CPU 0's level-``level`` data (or unified) cache from sysfs, read at run time
    so that tile and path choices follow the machine they run on; ``default`` where the
    system does not say."""
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(os.path.join(d, "level")) as f:
                found = int(f.read().strip())
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(d, "size")) as f:
                size = f.read().strip()
        except (OSError, ValueError):
            continue
        digits = size.rstrip("KMG")
        if found == level and kind in ("Data", "Unified") and digits.isdigit():
            return int(digits) << {"K": 10, "M": 20, "G": 30}.get(size[-1:], 0)
    return default
