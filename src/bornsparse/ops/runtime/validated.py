"""Run an O(size) validation of index tensors once per tensor version, inside the ops.

The numba kernels do no bounds checks, so every op checks the index tensors it is given
(permutations, compressed sparse supports) before launching a kernel; a layer passes the
same buffers every step, so the check is redone only when one of them changed. The cache
lives behind the custom ops, never in traced Python: torch.compile sees none of it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")

# single dict operations are atomic under the GIL; no lock, since a weakref callback may
# run during garbage collection at any allocation, where a held lock would deadlock
_SEEN: dict[tuple, tuple] = {}


def _owner(t: torch.Tensor) -> torch.Tensor:
    """The tensor object that owns ``t``'s memory: its base for a view. Layers hand the ops
    fresh views of their buffers each call (a support's rows and columns are rows of
    ``indices``), so identity is checked on the base, which lives as long as the buffer."""
    return t if t._base is None else t._base


def _stamp(t: torch.Tensor) -> tuple:
    # a view's version is its base's; the offset and strides tell which part of it
    return (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype)


def once_per_version(tag: str, tensors: Sequence[torch.Tensor], compute: Callable[[], T]) -> T:
    """``compute()``'s result, computed again only when one of ``tensors`` (or its base)
    changed: another object, another version, another view. Entries hold weak references
    to the owners, so a freed tensor whose id is reused never matches, and they disappear
    with the tensors."""
    owners = tuple(map(_owner, tensors))
    key = (tag, *map(id, owners))
    stamps = tuple(map(_stamp, tensors))
    hit = _SEEN.get(key)
    if hit is not None and hit[1] == stamps and all(
        r() is t for r, t in zip(hit[0], owners, strict=True)
    ):
        return hit[2]
    value = compute()

    def forget(_ref: weakref.ref, key: tuple = key) -> None:
        _SEEN.pop(key, None)

    refs = tuple(weakref.ref(t, forget) for t in owners)
    _SEEN[key] = (refs, stamps, value)
    return value


def check_once(tag: str, tensors: Sequence[torch.Tensor], check: Callable[[], None]) -> None:
    """Call ``check()`` (which raises on bad input) unless it passed for these very tensors
    (or views of the same base tensor objects) at their current versions: an O(size) check
    of index tensors is redone only after they changed."""
    once_per_version(tag, tensors, check)
