"""Region bodies and their chunk loop: how a kernel module turns a numba function into the
``cfunc`` that ``region.launch`` runs on torch's OpenMP team.

A kernel writes its work as ``chunks(a, like)`` (or ``chunks(a, like, ilike)``): a loop
that claims chunk indices with ``claim_chunk`` until none is left and counts each finished
one with ``finish_chunk``, reading its sizes and arrays from the header ``a``.
``region_body`` wraps it in the body that dispatches on the header's dtype code;
``chunk_plan`` picks how many chunks and threads a launch gets.
"""

from __future__ import annotations

import enum
import hashlib
import threading
import types as pytypes

import numba
import numpy as np
from numba import types
from numba.core.compiler import Compiler

from bornsparse.ops.runtime.intrinsics import atomic_increment

# Below this much work (multiply-adds, or elements of a memory-bound pass) a kernel runs as
# one chunk on the calling thread: waking the team, and on a busy machine waiting for it,
# costs more than the work.
PARALLEL_MIN_WORK = 1 << 16
# Chunks per thread above that: a thread that starts late (woken, or preempted) leaves its
# chunks to the others instead of holding everyone up at the end of the region.
CHUNKS_PER_THREAD = 4


@numba.njit(cache=True, nogil=True, inline="always")
def claim_chunk(header_ptr, nchunks):
    """The next unclaimed chunk index, or -1 when all ``nchunks`` are taken."""
    c = atomic_increment(header_ptr, 0)
    return c if c < nchunks else -1


@numba.njit(cache=True, nogil=True, inline="always")
def finish_chunk(header_ptr):
    """Count one chunk as done (region.launch checks the count)."""
    atomic_increment(header_ptr, 1)


class NoAliasCompiler(Compiler):
    """numba's default pipeline, with every array argument marked ``noalias`` for LLVM.

    numba's own parallel-loop bodies get this flag; without it LLVM guards each vectorised
    row loop with runtime overlap checks between every output row and every input row. Only
    for functions whose array arguments never overlap in memory.
    """

    def define_pipelines(self):
        self.state.flags.noalias = True
        return super().define_pipelines()


def chunk_plan(units: int, work: int, min_work: int = PARALLEL_MIN_WORK) -> tuple[int, int]:
    """(chunks, threads) for ``work`` split into at most ``units`` pieces: one chunk on the
    calling thread below ``min_work`` or with one torch thread, else CHUNKS_PER_THREAD chunks
    per torch thread. Only the chunk count may change a kernel's result, never the threads.
    """
    if units <= 1 or work < min_work:
        return 1, 1
    import torch

    threads = max(1, torch.get_num_threads())
    if threads == 1:
        return 1, 1
    nchunks = min(units, threads * CHUNKS_PER_THREAD)
    return nchunks, min(threads, nchunks)


class _LazyBody:
    """A region body compiled (or loaded from numba's on-disk cache) when first launched, so
    importing a kernel module compiles nothing and unused kernels never compile."""

    def __init__(self, pyfunc) -> None:
        self._pyfunc = pyfunc
        self._cfunc = None
        self._lock = threading.Lock()
        self.__doc__ = pyfunc.__doc__

    @property
    def address(self) -> int:
        if self._cfunc is None:
            with self._lock:
                if self._cfunc is None:
                    self._cfunc = numba.cfunc(types.void(types.voidptr), cache=True)(
                        self._pyfunc)
        return self._cfunc.address


# ---- the dtype-dispatching region body ---------------------------------------------------
#
# empty arrays whose dtypes tell a chunk loop which specialisation to run

_F32 = np.empty(0, np.float32)
_F64 = np.empty(0, np.float64)
_I32 = np.empty(0, np.int32)
_I64 = np.empty(0, np.int64)


def _float_dispatch(header):
    a = numba.carray(header, (LENGTH,), np.int64)  # noqa: F821 (set by region_body)
    if a[3]:
        CHUNKS(a, _F64)  # noqa: F821
    else:
        CHUNKS(a, _F32)  # noqa: F821


def _float_index_dispatch(header):
    a = numba.carray(header, (LENGTH,), np.int64)  # noqa: F821
    code = a[3]
    if code == 0:
        CHUNKS(a, _F32, _I64)  # noqa: F821
    elif code == 1:
        CHUNKS(a, _F64, _I64)  # noqa: F821
    elif code == 2:
        CHUNKS(a, _F32, _I32)  # noqa: F821
    else:
        CHUNKS(a, _F64, _I32)  # noqa: F821


def region_body(chunks, layout: type[enum.IntEnum], *, index_dtypes: bool = False) -> _LazyBody:
    """The region body that runs ``chunks(a, like)`` on the carray ``a`` of a ``layout``
    header, ``like`` an empty float32 or float64 array as slot ``code`` says (0 or 1); with
    ``index_dtypes`` ``chunks(a, like, ilike)``, code bit 0 float64 and bit 1 int32 indices.

    One template for every kernel's body. Why a rebuilt function and not a closure: numba
    keys a closure's on-disk cache by its pickled cells, which differ per process, so a
    closure recompiled on every start (1.4 s a body). The body is the template's code under
    its own name in the chunk loop's file, so numba caches it next to that module and
    invalidates it when that file changes; the name carries a hash of the template's code,
    so a changed template is a new cache entry too.
    """
    template = _float_index_dispatch if index_dtypes else _float_dispatch
    py = chunks.py_func
    digest = hashlib.sha1(template.__code__.co_code + repr(template.__code__.co_consts)
                          .encode()).hexdigest()[:8]
    name = f"{py.__name__}_body_{digest}"
    code = template.__code__.replace(co_name=name, co_qualname=name,
                                     co_filename=py.__code__.co_filename)
    scope = dict(template.__globals__, CHUNKS=chunks, LENGTH=len(layout))
    fn = pytypes.FunctionType(code, scope, name)
    fn.__qualname__ = name
    fn.__module__ = py.__module__
    body = _LazyBody(fn)
    body.layout = layout
    return body
