"""The one backend switch: which kernel runs each op, chosen in one place.

Every functional in ``bornsparse.ops`` and every layer in ``bornsparse.nn`` takes a
``backend`` string and resolves it here, so "reference" means the plain-PyTorch path all the
way down (any device, autograd of any order) and "auto" means the same rule everywhere:

* ``"auto"``: the Triton kernel for CUDA tensors when triton imports and the op has one,
  the fused numba kernel for CPU float32/float64 tensors, else the reference.
* ``"reference"``: plain PyTorch, no custom op, no numba.
* ``"numba"``: the numba CPU kernel, registered as a ``torch.ops.bornsparse`` custom op;
  raises for tensors it does not suit (other devices and dtypes).
* ``"torch_sparse"``: the sparse products through ``torch.sparse`` CSR kernels (sparse
  matmul and the DCT-plus-sparse layer only), for comparison.
* ``"triton"``: the Triton GPU kernels (``permuted/triton_kernels.py``: the permuted product
  and the tanh network; ``sparse/triton_matmul.py``: the sparse product;
  ``discrete_cosine/triton_plus_sparse.py``: the DCT-plus-sparse layer, its FFT through
  torch.fft), for CUDA tensors; on CPU tensors only under Triton's interpreter
  (``TRITON_INTERPRET=1``, how the tests run them). An op of those families without a
  Triton kernel (the penalty, the DCT itself) runs its reference, so a layer built with
  ``backend="triton"`` works on every op it calls.

What the kernels share besides this switch (the parallel launch, the validation cache,
hardware probes) lives in ``ops/runtime/``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "reference", "numba", "torch_sparse", "triton")
NUMBA_DTYPES = (torch.float32, torch.float64)
# index dtypes every kernel takes (supports, plans)
INDEX_DTYPES = (torch.int32, torch.int64)

# the backends each op family has, besides "auto"
OP_BACKENDS = {
    "permuted": ("reference", "numba", "triton"),
    "sparse": ("reference", "numba", "torch_sparse", "triton"),
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


@functools.cache
def triton_importable() -> bool:
    """Whether ``import triton`` succeeds (tried once: the import takes about a second)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def require_triton() -> None:
    """Raise an ImportError that says how to install triton, unless it imports."""
    if not triton_importable():
        raise ImportError(
            "backend='triton' needs the triton package: pip install 'bornsparse[gpu]' "
            "(or a triton matching your torch build)"
        )


def triton_interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``), as triton itself reads
    it (from the environment, on every call): kernels then run on CPU tensors."""
    require_triton()
    from triton import knobs

    return bool(knobs.runtime.interpret)


def suits_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels may take ``x``: a CUDA tensor, or a CPU tensor while
    Triton's interpreter is on."""
    return x.device.type == "cuda" or (x.device.type == "cpu" and triton_interpreting())


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


def resolve_backend(
    backend: object, x: torch.Tensor, family: str = "sparse", *, has_triton: bool = False
) -> str:
    """The concrete backend for input ``x``: "auto" resolved, a misfit "numba" or "triton"
    refused. ``has_triton``: whether the calling op has a Triton kernel; where it has none,
    "triton" (asked for, or chosen by "auto" on CUDA) resolves to "reference"."""
    check_backend(backend, family)
    if getattr(_FORCED, "reference", False):
        return "reference"
    if backend == "triton":
        require_triton()
        if not suits_triton(x):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                f"tensors), got {x.dtype} on {x.device}"
            )
        return "triton" if has_triton else "reference"
    fits = suits_numba(x) and "numba" in OP_BACKENDS[family]
    if backend == "auto":
        if x.device.type == "cuda" and "triton" in OP_BACKENDS[family] and triton_importable():
            return "triton" if has_triton else "reference"
        return "numba" if fits else "reference"
    if backend == "numba" and not fits:
        raise ValueError(
            f"backend='numba' needs CPU float32/float64 tensors, got {x.dtype} on {x.device}"
        )
    return backend  # type: ignore[return-value]
