"""What the Triton kernels of every op family share: their wrapping by triton.jit, the dtypes
they accumulate and keep partial results in, and the check of a tensor they are handed.

Imported only by the Triton kernel modules (the "triton" backend), so it may import triton.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from bornsparse.ops.backends import suits_triton

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(t: torch.Tensor):
    """The accumulation dtype for ``t``: float64 for float64, float32 otherwise."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 otherwise: what partial sums and rebuilds are kept in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_triton_tensor(name: str, t: torch.Tensor) -> None:
    """Raise unless ``t`` suits the Triton kernels (device, dtype)."""
    if not suits_triton(t) or t.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"{name} must be a float16/bfloat16/float32/float64 CUDA tensor (or CPU with "
            f"TRITON_INTERPRET=1), got {t.dtype} on {t.device}"
        )


def jit_kernels(**kernels: Callable) -> SimpleNamespace:
    """``kernels`` (name=function) wrapped by triton.jit for the current TRITON_INTERPRET
    setting, once per setting."""
    return _jitted(bool(triton.knobs.runtime.interpret), tuple(kernels.items()))


@functools.cache
def _jitted(interpret: bool, kernels: tuple[tuple[str, Callable], ...]) -> SimpleNamespace:
    # triton.jit picks the interpreter or the compiler when it wraps a function, from
    # TRITON_INTERPRET at that moment; wrapping here, per setting, lets tests switch the
    # interpreter on after the kernel modules were imported
    return SimpleNamespace(**{name: triton.jit(fn) for name, fn in kernels})
