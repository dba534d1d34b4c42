"""The per-thread scratch the permuted pair kernels reuse across calls."""

import threading

import pytest
import torch

from bornsparse.ops.permuted import permuted_block_diagonal
from bornsparse.ops.runtime import workspace as ws


def test_a_thread_gets_its_kept_buffer_back_and_it_grows():
    a = ws.workspace(1000, torch.float32)
    b = ws.workspace(10, torch.float32)
    assert b.data_ptr() == a.data_ptr() and b.numel() == 10
    c = ws.workspace(5000, torch.float32)  # too small: replaced by a larger one, kept
    assert c.numel() == 5000 and ws.workspace(4000, torch.float32).data_ptr() == c.data_ptr()
    assert ws.workspace(10, torch.float64).data_ptr() != c.data_ptr()  # one per dtype


def test_threads_never_share_a_buffer_and_large_requests_are_not_kept():
    here = ws.workspace(100, torch.float32).data_ptr()
    there = []
    t = threading.Thread(target=lambda: there.append(ws.workspace(100, torch.float32).data_ptr()))
    t.start()
    t.join()
    assert there[0] != here
    big = (ws.KEEP_MAX_BYTES // 4) + 1
    first, second = ws.workspace(big, torch.float32), ws.workspace(big, torch.float32)
    assert first.data_ptr() != second.data_ptr()  # two live tensors: neither is kept


# k = 2 paired (odd depth: the lone last factor), 4 and 8 (4×4 sub-blocks, recomputed), 16
# (inputs kept), 3 (generic loops); n_in and n_out below the width, so padded rows matter
@pytest.mark.parametrize("k,width,depth,n_in,n_out", [
    (2, 64, 5, 50, 37), (4, 64, 3, 61, 20), (8, 64, 2, 33, 64), (16, 64, 2, 64, 40),
    (3, 63, 3, 40, 50),
])
def test_kernels_assume_nothing_of_a_reused_workspace(k, width, depth, n_in, n_out):
    g = torch.Generator().manual_seed(k * 100 + depth)
    weight = torch.randn(depth, width // k, k, k, dtype=torch.float64, generator=g) / k**0.5
    perms = torch.stack([torch.randperm(width, generator=g) for _ in range(depth)])
    x = torch.randn(37, n_in, dtype=torch.float64, generator=g)
    grad = torch.randn(37, n_out, dtype=torch.float64, generator=g)
    results = []
    for backend in ("reference", "numba"):
        # NaN in every kept buffer this thread holds: a kernel reading scratch it did not
        # write would show it
        ws.workspace(1 << 16, torch.float64).fill_(float("nan"))
        w = weight.clone().requires_grad_()
        xx = x.clone().requires_grad_()
        y = permuted_block_diagonal(xx, w, perms, out_features=n_out, backend=backend)
        y.backward(grad)
        results.append((y.detach(), xx.grad, w.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
