"""Is every row of ``perms`` a permutation? A numba kernel of its own, so the check (run by
every layer call on the CPU, reference backend included) does not import the fused kernels'
module, whose parallel-region bodies compile when it is imported."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _perms_are_permutations_kernel(perms: np.ndarray) -> bool:
    depth, width = perms.shape
    seen = np.empty(width, dtype=np.bool_)
    for t in range(depth):
        seen[:] = False
        for j in range(width):
            i = perms[t, j]
            if i < 0 or i >= width or seen[i]:
                return False
            seen[i] = True
    return True
