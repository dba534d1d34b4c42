"""Run numba kernels in parallel, on torch's own OpenMP thread team where there is one.

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

Every CPU kernel of the package runs this way (the permuted operator, the DCT passes and the
sparse products), so numba's own parallel runtime is never started. The helpers at the end of
the file (``header_layout``, ``pack_header``, ``region_body``, ``chunk_plan``, ``view``,
``NoAliasCompiler``) are what the kernel modules build their bodies and headers from.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import glob
import hashlib
import os
import threading
import types as pytypes
from concurrent.futures import ThreadPoolExecutor, wait

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.compiler import Compiler
from numba.extending import intrinsic

from bornsparse._fork import in_forked_child

_LIB: ctypes.CDLL | None = None
_LIB_SEARCHED = False
_POOL: ThreadPoolExecutor | None = None
_POOL_WORKERS = 0
_POOL_LOCK = threading.Lock()
_BODY_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_BODIES: dict[int, ctypes._CFuncPtr] = {}  # cfunc address -> its ctypes callable


@intrinsic
def as_voidptr(typingctx, address):
    """An int64 address as a void pointer (for numba.carray)."""
    sig = types.voidptr(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return sig, codegen


def _prefetch_codegen(write: int):
    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
        builder.call(fn, [builder.inttoptr(args[0], i8p), ir.Constant(i32, write),
                          ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return codegen


@intrinsic
def prefetch(typingctx, address):
    """Hint the cache line at ``address`` (int64) into L1 for reading (llvm.prefetch,
    locality 3: prefetcht0)."""
    return types.void(types.int64), _prefetch_codegen(0)


@intrinsic
def prefetch_write(typingctx, address):
    """Hint the cache line at ``address`` (int64) into L1 for writing (prefetchw): a line
    about to be read and then written arrives owned, without a second request."""
    return types.void(types.int64), _prefetch_codegen(1)


@intrinsic
def _atomic_increment(typingctx, header, slot):
    """Atomically add 1 to int64 slot ``slot`` of ``header`` (a void pointer); return the old
    value."""
    sig = types.int64(types.voidptr, types.int64)

    def codegen(context, builder, signature, args):
        base = builder.bitcast(args[0], ir.IntType(64).as_pointer())
        ptr = builder.gep(base, [args[1]])
        return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "seq_cst")

    return sig, codegen


@numba.njit(cache=True, nogil=True, inline="always")
def claim_chunk(header_ptr, nchunks):
    """The next unclaimed chunk index, or -1 when all ``nchunks`` are taken."""
    c = _atomic_increment(header_ptr, 0)
    return c if c < nchunks else -1


@numba.njit(cache=True, nogil=True, inline="always")
def finish_chunk(header_ptr):
    """Count one chunk as done (launch() checks the count)."""
    _atomic_increment(header_ptr, 1)


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


# ---- shared by the kernel modules -------------------------------------------------------

# Below this much work (multiply-adds, or elements of a memory-bound pass) a kernel runs as
# one chunk on the calling thread: waking the team, and on a busy machine waiting for it,
# costs more than the work.
PARALLEL_MIN_WORK = 1 << 16
# Chunks per thread above that: a thread that starts late (woken, or preempted) leaves its
# chunks to the others instead of holding everyone up at the end of the region.
CHUNKS_PER_THREAD = 4


class NoAliasCompiler(Compiler):
    """numba's default pipeline, with every array argument marked ``noalias`` for LLVM.

    numba's own parallel-loop bodies get this flag; without it LLVM guards each vectorised
    row loop with runtime overlap checks between every output row and every input row. Only
    for functions whose array arguments never overlap in memory.
    """

    def define_pipelines(self):
        self.state.flags.noalias = True
        return super().define_pipelines()


@numba.njit(cache=True, nogil=True, inline="always")
def view(address, shape, like):
    """The memory at ``address`` as a C-contiguous array of ``shape`` and like's dtype."""
    return numba.carray(as_voidptr(address), shape, like.dtype)


@numba.njit(cache=True, nogil=True, inline="always")
def header_address(header):
    """The address of an int64 header array, as claim_chunk and finish_chunk want it."""
    return as_voidptr(np.int64(header.ctypes.data))


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


# ---- named header slots and the dtype-dispatching region body --------------------------
#
# A body reads its arguments from the int64 header by slot and the Python side writes them;
# both go through one table per kernel, an IntEnum made by header_layout, so a slot has one
# name on both sides (numba reads IntEnum members as compile-time constants).

_F32 = np.empty(0, np.float32)
_F64 = np.empty(0, np.float64)
_I32 = np.empty(0, np.int32)
_I64 = np.empty(0, np.int64)


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
