"""Run an O(size) validation of index tensors once per tensor version, inside the ops.

The numba kernels do no bounds checks, so every op checks the index tensors it is given
(permutations, compressed sparse supports) before launching a kernel; a layer passes the
same buffers every step, so the check is redone only when one of them changed. The cache
lives behind the custom ops, never in traced Python: torch.compile sees none of it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch

# single dict operations are atomic under the GIL; no lock, since a weakref callback may
# run during garbage collection at any allocation, where a held lock would deadlock
_SEEN: dict[tuple, tuple] = {}


def _stamp(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, tuple(t.shape), t.dtype)


def check_once(tag: str, tensors: Sequence[torch.Tensor], check: Callable[[], None]) -> None:
    """Call ``check()`` (which raises on bad input) unless it passed for these very tensor
    objects at their current versions. Entries hold weak references, so a freed tensor
    whose id is reused never matches, and they disappear with the tensors."""
    key = (tag, *map(id, tensors))
    stamps = tuple(map(_stamp, tensors))
    hit = _SEEN.get(key)
    if hit is not None and hit[1] == stamps and all(
        r() is t for r, t in zip(hit[0], tensors, strict=True)
    ):
        return
    check()

    def forget(_ref: weakref.ref, key: tuple = key) -> None:
        _SEEN.pop(key, None)

    refs = tuple(weakref.ref(t, forget) for t in tensors)
    _SEEN[key] = (refs, stamps)
