"""A parallel region: the int64 header its body reads, and its launch on torch's own OpenMP
thread team where there is one.

Why: torch's CPU ops run on a GNU OpenMP team whose idle threads spin for a while (up to
milliseconds) after every parallel op. Kernels run from a separate thread pool (Python's, or
numba's own OpenMP runtime, which is a second copy of libgomp) then share the cores with
those spinning threads and ran slower with 2 threads than with 1 here (docs/design.md).
Launching our work as a parallel region of the *same* runtime, through its ``GOMP_parallel``
entry point, hands it to the threads that are already awake and leaves nobody spinning.

The region's body is a numba ``cfunc`` taking one pointer to an int64 header. Work is split
into a fixed number of chunks, claimed by the team's threads with an atomic counter (header
slot 0) and counted when finished (slot 1; slot 2 holds the chunk count): results depend on
the chunking only, never on which thread ran a chunk or on how many threads the runtime
actually granted, and a body that stopped early (an exception inside a cfunc is printed, not
raised) is caught by the count. Where no such runtime is found (torch built on another
OpenMP, another platform, ``BORNSPARSE_OPENMP_BRIDGE=0``) the same body runs on a Python
thread pool; in a forked child (libgomp is not fork-safe) on the calling thread alone.

Every CPU kernel of the package runs this way (the permuted operator, the DCT passes, the
sparse products and convolution, the penalty), so numba's own parallel runtime is never
started. The header and the launch are one module because they are one protocol: slots 0–2
are launch's counters, and ``header_layout`` / ``pack_header`` name and fill the rest. The
bodies themselves come from ``bodies.region_body``; the intrinsics they are written with
from ``intrinsics``.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numba
import numpy as np

from bornsparse._fork import in_forked_child

_LIB: ctypes.CDLL | None = None
_LIB_SEARCHED = False
_POOL: ThreadPoolExecutor | None = None
_POOL_WORKERS = 0
_POOL_LOCK = threading.Lock()
_BODY_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_BODIES: dict[int, ctypes._CFuncPtr] = {}  # cfunc address -> its ctypes callable


def _torch_openmp() -> ctypes.CDLL | None:
    """torch's GNU-compatible OpenMP runtime, if it ships one, else None."""
    global _LIB, _LIB_SEARCHED
    if _LIB_SEARCHED:
        return _LIB
    _LIB_SEARCHED = True
    if os.environ.get("BORNSPARSE_OPENMP_BRIDGE", "1") == "0":
        return None
    import torch

    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
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
    if in_forked_child():
        return "serial"
    return "openmp" if _torch_openmp() is not None else "threads"


def launch(body_address: int, header: np.ndarray, nthreads: int) -> None:
    """Run the cfunc at ``body_address`` on ``header`` (int64; slots 0-2 as in the module
    docstring) with up to ``nthreads`` threads, the caller's included; returns when every
    chunk is done, and raises RuntimeError if the body stopped before finishing them all.

    ctypes releases the GIL around each foreign call, so pool threads run concurrently.
    The caller keeps the header and every array it points to alive until this returns.
    """
    header[0] = header[1] = 0
    address = header.ctypes.data
    how = backend() if nthreads > 1 else "serial"
    if how == "openmp":
        _torch_openmp().GOMP_parallel(body_address, address, nthreads, 0)
    else:
        body = _BODIES.get(body_address)
        if body is None:
            body = _BODIES[body_address] = _BODY_TYPE(body_address)
        if how == "serial":
            body(address)
        else:
            _run_on_pool(body, address, nthreads)
    if header[1] != header[2]:
        raise RuntimeError(
            f"a fused kernel finished {header[1]} of its {header[2]} chunks; the error it hit "
            "was printed above (numba prints exceptions raised inside a cfunc)"
        )


def _run_on_pool(body, address: int, nthreads: int) -> None:
    global _POOL, _POOL_WORKERS
    with _POOL_LOCK:
        if _POOL is None or _POOL_WORKERS < nthreads - 1:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=nthreads - 1,
                                       thread_name_prefix="bornsparse")
            _POOL_WORKERS = nthreads - 1
        futures = [_POOL.submit(body, address) for _ in range(nthreads - 1)]
    try:
        body(address)
    finally:
        # the pool threads write into the caller's arrays: never return (or unwind, say on
        # KeyboardInterrupt) before they are done with them
        interrupted = None
        while True:
            try:
                wait(futures)
                break
            except KeyboardInterrupt as err:
                interrupted = err
        if interrupted is not None:
            raise interrupted
    for f in futures:
        f.result()


# ---- the header: named slots, packed from Python, read by the body ---------------------
#
# A body reads its arguments from the int64 header by slot and the Python side writes them;
# both go through one table per kernel, an IntEnum made by header_layout, so a slot has one
# name on both sides (numba reads IntEnum members as compile-time constants).


def header_layout(name: str, fields: str) -> type[enum.IntEnum]:
    """The named slots of a body's header: 0–2 launch's chunk counters and chunk count
    (``claimed``, ``finished``, ``nchunks``), 3 ``code`` (the dtype code the body dispatches
    on), then ``fields`` (space-separated names) in order. ``len(layout)`` is the header's
    length. Pointer fields must come last, in one run (pack_header writes them at once)."""
    names = ["claimed", "finished", "nchunks", "code", *fields.split()]
    if len(set(names)) != len(names):
        raise ValueError(f"header layout {name}: repeated field in {fields!r}")
    return enum.IntEnum(name, [(f, i) for i, f in enumerate(names)])


@functools.cache
def _field_names(layout: type[enum.IntEnum]) -> tuple[tuple[str, ...], frozenset[str]]:
    names = tuple(name for name, slot in layout.__members__.items() if slot > layout.code)
    return names, frozenset(names)


def pack_header(layout: type[enum.IntEnum], nchunks: int, code: int,
                **values: int | np.ndarray) -> np.ndarray:
    """A header for ``layout`` with every field set by name: ints as they are, arrays as
    their data pointers (the caller keeps them alive and C-contiguous until the launch
    returns). A missing or unknown name is a TypeError. On every launch's path: ~4.5 µs here
    (the field names come precomputed per layout)."""
    names, known = _field_names(layout)
    if values.keys() != known:
        missing = [n for n in names if n not in values]
        if missing:
            raise TypeError(f"{layout.__name__}: no value for header field {missing[0]!r}")
        raise TypeError(f"{layout.__name__}: unknown header fields {sorted(values.keys() - known)}")
    row = [0, 0, nchunks, code]
    arrays: list[np.ndarray] = []
    first = 0
    for name in names:
        v = values[name]
        if isinstance(v, np.ndarray):
            if not arrays:
                first = len(row)
            elif len(row) != first + len(arrays):
                raise TypeError(f"{layout.__name__}: pointer fields must be consecutive")
            arrays.append(v)
            v = 0
        row.append(v)
    header = np.array(row, dtype=np.int64)
    for i in range(0, len(arrays), 7):  # put_addresses writes 3 to 7 pointers per call
        part = arrays[i:i + 7]
        if len(part) >= 3:
            put_addresses(header, first + i, *part)
        else:
            for k, arr in enumerate(part):
                header[first + i + k] = arr.ctypes.data
    return header


@numba.njit(cache=True, nogil=True)
def put_addresses(header, start, a, b, c, d=None, e=None, f=None, g=None):
    """header[start:] = the data pointers of 3 to 7 C-contiguous arrays, in order.

    Here because ``ndarray.ctypes.data`` costs ~0.8 µs an array in Python, this ~0.7 µs for
    all of them.
    """
    header[start] = a.ctypes.data
    header[start + 1] = b.ctypes.data
    header[start + 2] = c.ctypes.data
    if d is not None:
        header[start + 3] = d.ctypes.data
    if e is not None:
        header[start + 4] = e.ctypes.data
    if f is not None:
        header[start + 5] = f.ctypes.data
    if g is not None:
        header[start + 6] = g.ctypes.data


def float_slot(x: float) -> int:
    """``x`` as float64 bits in an int64 header slot (a body reads it back through a float64
    view of the header)."""
    return int(np.array([x], dtype=np.float64).view(np.int64)[0])
