"""The one backend switch: which kernel runs each op, chosen in one place.

Every functional in ``bornsparse.ops`` and every layer in ``bornsparse.nn`` takes a
``backend`` string and resolves it here, so "reference" means the plain-PyTorch path all the
way down (any device, autograd of any order) and "auto" means the same rule everywhere:

* ``"auto"``: the fused numba kernel for CPU float32/float64 tensors, else the reference.
* ``"reference"``: plain PyTorch, no custom op, no numba.
* ``"numba"``: the numba CPU kernel, registered as a ``torch.ops.bornsparse`` custom op;
  raises for tensors it does not suit (other devices and dtypes).
* ``"torch_sparse"``: the sparse products through ``torch.sparse`` CSR kernels (sparse
  matmul and the DCT-plus-sparse layer only), for comparison.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "reference", "numba", "torch_sparse")
NUMBA_DTYPES = (torch.float32, torch.float64)

# the backends each op family has, besides "auto"
OP_BACKENDS = {
    "permuted": ("reference", "numba"),
    "sparse": ("reference", "numba", "torch_sparse"),
    "dct": ("reference", "numba"),
    "conv": ("reference", "numba"),
}


def check_backend(value: object, family: str = "sparse", name: str = "backend") -> str:
    """Return ``value`` if it is a backend ``family``'s ops have (or "auto"), else raise."""
    allowed = ("auto", *OP_BACKENDS[family])
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value  # type: ignore[return-value]


def suits_numba(x: torch.Tensor) -> bool:
    """Whether the numba kernels take ``x``: a CPU float32/float64 tensor."""
    return x.device.type == "cpu" and x.dtype in NUMBA_DTYPES


_FORCED = threading.local()


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Inside this block every op of this thread resolves to "reference", whatever backend
    a layer or call asked for: plain PyTorch, so gradients of any order (GraSP's
    Hessian-gradient product) work through every bornsparse layer. A graph compiled
    inside the block keeps the reference path.
    """
    before = getattr(_FORCED, "reference", False)
    _FORCED.reference = True
    try:
        yield
    finally:
        _FORCED.reference = before


def resolve_backend(backend: object, x: torch.Tensor, family: str = "sparse") -> str:
    """The concrete backend for input ``x``: "auto" resolved, a misfit "numba" refused."""
    check_backend(backend, family)
    if getattr(_FORCED, "reference", False):
        return "reference"
    fits = suits_numba(x) and "numba" in OP_BACKENDS[family]
    if backend == "auto":
        return "numba" if fits else "reference"
    if backend == "numba" and not fits:
        raise ValueError(
            f"backend='numba' needs CPU float32/float64 tensors, got {x.dtype} on {x.device}"
        )
    return backend  # type: ignore[return-value]


@torch.compiler.assume_constant_result
def num_threads() -> int:
    """torch's intra-op thread count, as a constant that torch.compile can trace.

    The kernels' tiles depend on it; a compiled graph keeps the value it was traced with
    (dynamo cannot trace ``torch.get_num_threads`` itself).
    """
    return max(1, torch.get_num_threads())
