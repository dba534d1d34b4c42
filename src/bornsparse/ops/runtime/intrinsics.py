"""The LLVM intrinsics and pointer helpers the region bodies are written with.

Bodies get their arrays as int64 addresses in a header (``region.pack_header``); these turn
an address back into an array (``view``, ``as_voidptr``), hint cache lines (``prefetch``,
``prefetch_write``) and count chunks atomically (``atomic_increment``, used by
``bodies.claim_chunk`` and ``bodies.finish_chunk``).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


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
def atomic_increment(typingctx, header, slot):
    """Atomically add 1 to int64 slot ``slot`` of ``header`` (a void pointer); return the old
    value."""
    sig = types.int64(types.voidptr, types.int64)

    def codegen(context, builder, signature, args):
        base = builder.bitcast(args[0], ir.IntType(64).as_pointer())
        ptr = builder.gep(base, [args[1]])
        return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "seq_cst")

    return sig, codegen


@numba.njit(cache=True, nogil=True, inline="always")
def view(address, shape, like):
    """The memory at ``address`` as a C-contiguous array of ``shape`` and like's dtype."""
    return numba.carray(as_voidptr(address), shape, like.dtype)


@numba.njit(cache=True, nogil=True, inline="always")
def header_address(header):
    """The address of an int64 header array, as claim_chunk and finish_chunk want it."""
    return as_voidptr(np.int64(header.ctypes.data))
