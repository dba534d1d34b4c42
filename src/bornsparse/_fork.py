"""Whether this process is a fork of one that may have started OpenMP threads.

libgomp's thread team does not survive ``fork``: a parallel region in the child can hang.
The flag is set by an at-fork hook registered when ``bornsparse`` is imported (this module
is stdlib-only, so that costs nothing), and the fused kernels then run on the calling thread
alone (``ops/runtime/region.py``).
"""

from __future__ import annotations

import os

_forked = False


def _mark_child() -> None:
    global _forked
    _forked = True


def in_forked_child() -> bool:
    """True in a process forked after ``bornsparse`` was imported."""
    return _forked


os.register_at_fork(after_in_child=_mark_child)
