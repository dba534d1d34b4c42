"""ops/runtime/memory.py: huge-page advice covers exactly the 2 MiB-aligned interior of a tensor,
and a huge-page copy is an ordinary contiguous copy."""

from __future__ import annotations

import torch

from bornsparse.ops.runtime import memory


class _RecordingLibc:
    def __init__(self):
        self.calls = []

    def madvise(self, address, length, advice):
        self.calls.append((address, length, advice))
        return 0


def test_advice_covers_the_aligned_interior_only(monkeypatch):
    libc = _RecordingLibc()
    monkeypatch.setattr(memory, "_LIBC", libc)
    big = torch.empty(5 * memory.HUGE_PAGE // 4 + 123, dtype=torch.float32)[7:]  # odd start
    memory.advise_huge_pages(big)
    (address, length, advice), = libc.calls
    start, end = big.data_ptr(), big.data_ptr() + big.numel() * 4
    assert advice == 14 and address % memory.HUGE_PAGE == 0 and length % memory.HUGE_PAGE == 0
    assert start <= address and address + length <= end
    assert address - start < memory.HUGE_PAGE and end - (address + length) < memory.HUGE_PAGE
    memory.advise_huge_pages(torch.empty(1000))  # below 4 MiB: no call
    memory.advise_huge_pages(torch.empty(10**7, device="meta"))  # not CPU memory: no call
    assert len(libc.calls) == 1


def test_huge_page_copy_is_a_contiguous_copy():
    x = torch.randn(3, 700_000, dtype=torch.float64).t()  # 16 MiB, not contiguous
    y = memory.huge_page_copy(x)
    assert y.is_contiguous() and torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    assert memory.huge_page_copy(torch.ones(2, device="meta")).device.type == "meta"
