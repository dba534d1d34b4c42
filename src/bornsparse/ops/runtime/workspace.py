"""Scratch memory kept per thread across calls, for kernels that would otherwise allocate
their buffers afresh on every call.

Why: glibc gives a freed chunk of a few MiB back to the kernel (an mmap'ed chunk, or a
trimmed heap top), so a kernel whose scratch is allocated per call pays page faults on
touching it again, every call. Measured on the permuted pair kernels at k = 8 (width 2048,
depth 4, batch 256, 2 threads, a loop over one layer, AMD EPYC Zen 4): in two processes of
three 1,100–1,600 faults and 1.9–4.5 ms of system time a f+b, which took 5.7–7.7 ms (2.8 ms
in the third, which did not fault); from kept buffers 0–20 faults and 3.4–3.6 ms in all
three. Whether a process faults depends on its heap's history, so a benchmark that
interleaves many layers may not show it. A buffer kept here is touched once.

A buffer belongs to the calling Python thread (a kernel launched from it hands slices to
its OpenMP workers), so concurrent calls from different threads never share one; within a
thread an op holds it for the span of one call and ops do not nest. Requests above
``KEEP_MAX_BYTES`` get a fresh tensor instead, so a process never keeps more than that per
thread and dtype: for larger scratch the faults are small beside the work.
"""

from __future__ import annotations

import threading

import torch

#: the largest buffer kept per thread and dtype
KEEP_MAX_BYTES = 64 << 20
_LOCAL = threading.local()


def workspace(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat CPU tensor of ``numel`` elements of ``dtype``, contents undefined: this
    thread's kept buffer (grown when too small) up to KEEP_MAX_BYTES, a fresh one above."""
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if nbytes > KEEP_MAX_BYTES:
        return torch.empty(numel, dtype=dtype)
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = {}
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]
