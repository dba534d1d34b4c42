"""Run numba kernels in parallel, on torch's own OpenMP thread team where there is one.

Why: torch's CPU ops run on a GNU OpenMP team whose idle threads spin for a while (up to
milliseconds) after every parallel op. Kernels run from a separate thread pool (Python's, or
numba's own OpenMP runtime, which is a second copy of libgomp) then share the cores with
those spinning threads and ran slower with 2 threads than with 1 here (docs/design.md).
Launching our work as a parallel region of the *same* runtime, through its ``GOMP_parallel``
entry point, hands it to the threads that are already awake and leaves nobody spinning.

The region's body is a numba ``cfunc`` taking one pointer to an int64 header. Work is split
into a fixed number of chunks, claimed by the team's threads with an atomic counter (the
header's first slot): results depend on the chunking only, never on which thread ran a
chunk or on how many threads the runtime actually granted. Where no such runtime is found
(torch built on another OpenMP, another platform, ``BORNSPARSE_OPENMP_BRIDGE=0``) the same
body runs on a Python thread pool; in a forked child (libgomp is not fork-safe) on the
calling thread alone.
"""

from __future__ import annotations

import ctypes
import glob
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_LIB: ctypes.CDLL | None = None
_LIB_SEARCHED = False
_FORKED = False
_POOL: ThreadPoolExecutor | None = None
_POOL_WORKERS = 0
_BODY_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_BODIES: dict[int, ctypes._CFuncPtr] = {}  # cfunc address -> its ctypes callable


def _after_fork_in_child() -> None:
    # a forked child inherits libgomp's team bookkeeping but not its threads: a parallel
    # region there can hang, so children run every chunk on the calling thread
    global _FORKED
    _FORKED = True


os.register_at_fork(after_in_child=_after_fork_in_child)


@intrinsic
def _as_voidptr(typingctx, address):
    """An int64 address as a void pointer (for numba.carray)."""
    sig = types.voidptr(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return sig, codegen


@intrinsic
def _claim_next(typingctx, header):
    """Atomically increment the int64 at ``header`` (a void pointer); return its old value."""
    sig = types.int64(types.voidptr)

    def codegen(context, builder, signature, args):
        ptr = builder.bitcast(args[0], ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "seq_cst")

    return sig, codegen


@numba.njit(cache=True, nogil=True, inline="always")
def claim_chunk(header_ptr, nchunks):
    """The next unclaimed chunk index, or -1 when all ``nchunks`` are taken."""
    c = _claim_next(header_ptr)
    return c if c < nchunks else -1


def _torch_openmp() -> ctypes.CDLL | None:
    """torch's GNU-compatible OpenMP runtime, if it ships one, else None."""
    global _LIB, _LIB_SEARCHED
    if _LIB_SEARCHED:
        return _LIB
    _LIB_SEARCHED = True
    if os.environ.get("BORNSPARSE_OPENMP_BRIDGE", "1") == "0":
        return None
    import torch

    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in sorted(glob.glob(os.path.join(libdir, "libgomp*.so*"))):
        try:
            lib = ctypes.CDLL(path)
            fn = lib.GOMP_parallel
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        fn.restype = None
        _LIB = lib
        break
    return _LIB


def backend() -> str:
    """How launch() runs bodies here: "openmp" (torch's team), "threads" or "serial"."""
    if _FORKED:
        return "serial"
    return "openmp" if _torch_openmp() is not None else "threads"


def launch(body_address: int, header: np.ndarray, nthreads: int) -> None:
    """Run the cfunc at ``body_address`` on ``header`` (int64, slot 0 the chunk counter) with
    up to ``nthreads`` threads, the caller's included; returns when every chunk is done.

    ctypes releases the GIL around each foreign call, so pool threads run concurrently.
    """
    global _POOL, _POOL_WORKERS
    header[0] = 0
    address = header.ctypes.data
    how = backend() if nthreads > 1 else "serial"
    if how == "openmp":
        _torch_openmp().GOMP_parallel(body_address, address, nthreads, 0)
        return
    body = _BODIES.get(body_address)
    if body is None:
        body = _BODIES[body_address] = _BODY_TYPE(body_address)
    if how == "serial":
        body(address)
        return
    if _POOL is None or _POOL_WORKERS < nthreads - 1:
        _POOL = ThreadPoolExecutor(max_workers=nthreads - 1, thread_name_prefix="bornsparse")
        _POOL_WORKERS = nthreads - 1
    futures = [_POOL.submit(body, address) for _ in range(nthreads - 1)]
    body(address)
    for f in futures:
        f.result()
