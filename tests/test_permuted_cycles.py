"""The cycle-walk kernels (ops/permuted/numba_cycles.py: 2×2 blocks, even depth): schedule, the
conditioning guard, and agreement with the reference on both backward paths (through the
blocks' inverses, and the recompute fallback)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bornsparse.ops.permuted import (
    CYCLE_MIN_TILE,
    CYCLE_TILE,
    inverse_backward_is_safe,
    permuted_block_diagonal,
    permuted_block_diagonal_dense_reference,
    permuted_block_diagonal_reference,
)
from bornsparse.ops.permuted import custom_ops as permuted_ops
from bornsparse.ops.permuted import numba_cycles as cycles


@pytest.fixture(autouse=True)
def cycles_at_every_batch(monkeypatch):
    """Production sends tiles shorter than CYCLE_MIN_TILE to the pair kernels (slower
    there, not wrong); here the cycle kernels must also face batch 1 and odd tiles."""
    monkeypatch.setattr(permuted_ops, "CYCLE_MIN_TILE", 1)


def near_orthogonal(depth, nblocks, seed, noise, dtype=torch.float64):
    """Haar-orthogonal 2×2 blocks times (1 + noise) entrywise: well conditioned for small noise."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(depth * nblocks, 2, 2, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    w = q * (1 + noise * torch.randn(q.shape, generator=g, dtype=torch.float64))
    perms = torch.stack([torch.randperm(2 * nblocks, generator=g) for _ in range(depth)])
    return w.reshape(depth, nblocks, 2, 2).to(dtype), perms


def run(x, weight, perms, gy, n_out, backend="numba", retain=False):
    xr = x.clone().requires_grad_()
    wr = weight.clone().requires_grad_()
    y = permuted_block_diagonal(xr, wr, perms, out_features=n_out, backend=backend)
    y.backward(gy, retain_graph=retain)
    return y, xr, wr


@pytest.mark.parametrize("width", [2, 4, 10, 64, 202])
def test_schedule_visits_every_block_once_and_moves_every_row_once(width):
    rng = np.random.default_rng(width)
    perms = np.stack([rng.permutation(width) for _ in range(6)]).astype(np.int64)
    sched, final_loc = cycles.build_schedule(perms)
    assert sched.shape == (3, width // 2, cycles.STEP_FIELDS)
    assert sorted(final_loc) == list(range(width))
    for steps in sched:
        assert sorted(steps[:, cycles.B1]) == list(range(width // 2))
        assert sorted(steps[:, [cycles.RD0, cycles.RD1]].ravel()) == list(range(width))
        assert steps[:, cycles.START].sum() == steps[:, cycles.CLOSE].sum() >= 1


@st.composite
def cycle_cases(draw):
    nblocks = draw(st.integers(1, 12))
    width = 2 * nblocks
    depth = draw(st.sampled_from([2, 4, 6, 8]))
    n_in = draw(st.integers(1, width))
    n_out = draw(st.integers(1, width))
    batch = draw(st.sampled_from([1, 2, 7, 16, CYCLE_TILE + 1, 2 * CYCLE_TILE + 44]))
    lead = draw(st.sampled_from([(), (3,)]))
    seed = draw(st.integers(0, 2**31 - 1))
    return nblocks, depth, n_in, n_out, lead + (batch,), seed


@settings(max_examples=100, deadline=None)
@given(cycle_cases())
def test_inverse_backward_matches_dense_and_reference(case):
    nblocks, depth, n_in, n_out, batch_shape, seed = case
    weight, perms = near_orthogonal(depth, nblocks, seed, noise=0.02)
    assert inverse_backward_is_safe(weight)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*batch_shape, n_in, generator=g, dtype=torch.float64)
    gy = torch.randn(*batch_shape, n_out, generator=g, dtype=torch.float64)
    y, xr, wr = run(x, weight, perms, gy, n_out)
    assert y.grad_fn is not None
    y_ref, xf, wf = run(x, weight, perms, gy, n_out, backend="reference")
    dense = permuted_block_diagonal_dense_reference(weight, perms)[:n_out, :n_in]
    torch.testing.assert_close(y.detach(), x @ dense.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xr.grad, gy @ dense, rtol=1e-10, atol=1e-11)
    scale = 1e-11 * (1 + wf.grad.abs().max().item())
    torch.testing.assert_close(wr.grad, wf.grad, rtol=1e-9, atol=scale)


def _saved(fn):
    """The tensors autograd saves while ``fn()`` runs (public saved_tensors_hooks), in the
    op's order: x, weight, perms, and the kept final activation (empty on the pair kernels,
    which keep none)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _walks_cycles(x, weight, perms, **kw) -> bool:
    """Whether the forward took the cycle walk: only it keeps a final activation."""
    _, saved = _saved(lambda: permuted_block_diagonal(x, weight, perms, backend="numba", **kw))
    return saved[3].numel() > 0


def test_small_tiles_take_the_pair_kernels(monkeypatch):
    monkeypatch.setattr(permuted_ops, "CYCLE_MIN_TILE", CYCLE_MIN_TILE)
    weight, perms = near_orthogonal(2, 40, seed=0, noise=0.0, dtype=torch.float32)
    threads = torch.get_num_threads()
    small = torch.randn(threads * (CYCLE_MIN_TILE - 1), 80, requires_grad=True)
    big = torch.randn(threads * CYCLE_MIN_TILE, 80, requires_grad=True)
    w = weight.requires_grad_()
    assert not _walks_cycles(small, w, perms)
    assert _walks_cycles(big, w, perms)
    odd = near_orthogonal(3, 40, seed=0, noise=0.0, dtype=torch.float32)[0].requires_grad_()
    odd_perms = torch.stack([torch.randperm(80) for _ in range(3)])
    assert not _walks_cycles(big, odd, odd_perms)


def test_small_tiles_of_wide_layers_take_the_cycle_walk(monkeypatch):
    # wide: the pair kernels' three (width, tile) buffers no longer fit L2 (here 1 KiB)
    monkeypatch.setattr(permuted_ops, "CYCLE_MIN_TILE", CYCLE_MIN_TILE)
    weight, perms = near_orthogonal(2, 40, seed=0, noise=0.0, dtype=torch.float32)
    x = torch.randn(2, 80, requires_grad=True)
    w = weight.requires_grad_()
    assert not _walks_cycles(x, w, perms)
    monkeypatch.setattr(permuted_ops, "L2_BYTES", 3 * 80 * 4 - 1)
    assert _walks_cycles(x, w, perms)


def _takes_inverse_path(x, weight, perms, n_out):
    """Whether backward rebuilt the activations through the inverses (counted by a spy)."""
    import bornsparse.ops.permuted.custom_ops as P

    calls = []
    real = P._cycle_backward

    def spy(*args):
        calls.append(1)
        return real(*args)

    P._cycle_backward = spy
    try:
        y = permuted_block_diagonal(x.requires_grad_(), weight.requires_grad_(), perms,
                                    out_features=n_out, backend="numba")
        y.sum().backward()
    finally:
        P._cycle_backward = real
    return bool(calls)


def test_guard_picks_the_recompute_path_for_ill_conditioned_blocks_and_both_are_right():
    weight, perms = near_orthogonal(4, 9, seed=3, noise=0.02)
    x = torch.randn(40, 15, dtype=torch.float64)
    gy = torch.randn(40, 13, dtype=torch.float64)
    assert _takes_inverse_path(x.clone(), weight.clone(), perms, 13)
    bad = weight.clone()
    bad[2, 4] = torch.tensor([[1.0, 0.0], [0.0, 1e-3]], dtype=torch.float64)  # cond 1000
    assert not inverse_backward_is_safe(bad)
    assert not _takes_inverse_path(x.clone(), bad.clone(), perms, 13)
    for w in (weight, bad):
        y, xr, wr = run(x, w, perms, gy, 13)
        y_ref, xf, wf = run(x, w, perms, gy, 13, backend="reference")
        torch.testing.assert_close(xr.grad, xf.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(wr.grad, wf.grad, rtol=1e-10, atol=1e-11)


def test_worst_amplification_is_the_product_of_worst_condition_numbers():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 7, 2, 2, generator=g, dtype=torch.float64)
    expected = np.prod(np.linalg.cond(weight.numpy()).max(axis=1))
    assert cycles.worst_amplification(weight.numpy()) == pytest.approx(expected, rel=1e-9)
    assert cycles.worst_amplification(weight.float().numpy()) == pytest.approx(expected,
                                                                               rel=1e-4)
    for block in ([[1.0, 2.0], [2.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]],
                  [[float("nan"), 0.0], [0.0, 1.0]], [[float("inf"), 0.0], [0.0, 1.0]]):
        bad = weight.clone()
        bad[1, 3] = torch.tensor(block)
        assert cycles.worst_amplification(bad.numpy()) == np.inf, block
        assert not inverse_backward_is_safe(bad)


def test_retained_graph_second_backward_agrees():
    weight, perms = near_orthogonal(6, 20, seed=1, noise=0.01)
    x = torch.randn(130, 33, dtype=torch.float64, requires_grad=True)
    w = weight.clone().requires_grad_()
    y, saved = _saved(
        lambda: permuted_block_diagonal(x, w, perms, out_features=31, backend="numba"))
    gy = torch.randn_like(y)
    kept = saved[3]
    assert kept.numel() > 0  # the cycle walk
    final = kept.clone()
    first = torch.autograd.grad(y, (x, w), gy, retain_graph=True)
    # the backward op rebuilds activations in a copy: the kept activation is unchanged
    assert torch.equal(kept, final)
    second = torch.autograd.grad(y, (x, w), gy)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_kept_activation_is_batch_by_width_whatever_the_depth():
    sizes = {}
    for depth in (2, 8, 20):
        weight, perms = near_orthogonal(depth, 32, seed=depth, noise=0.0, dtype=torch.float32)
        x = torch.randn(300, 64, requires_grad=True)
        w = weight.requires_grad_()
        _, saved = _saved(
            lambda x=x, w=w, perms=perms: permuted_block_diagonal(x, w, perms, backend="numba"))
        x_saved, _, _, final = saved
        sizes[depth] = final.numel()
        # the final activation: whole tiles of the batch, every row of the width
        tiles, width, tile = final.shape
        assert width == 64 and tiles == -(-300 // tile) and final.numel() >= 300 * 64
        assert x_saved.numel() == x.numel()
        assert len(saved) == 4  # nothing per factor
    assert len(set(sizes.values())) == 1
    with torch.no_grad():  # no backward to come: nothing kept, same output
        weight, perms = near_orthogonal(4, 32, seed=0, noise=0.0, dtype=torch.float32)
        x = torch.randn(5, 64)
        torch.testing.assert_close(
            permuted_block_diagonal(x, weight, perms, backend="numba"),
            permuted_block_diagonal_reference(x, weight, perms), rtol=1e-5, atol=1e-5)


def test_schedule_cache_checks_the_permutations_by_value():
    weight, perms = near_orthogonal(2, 6, seed=2, noise=0.0)
    x = torch.randn(4, 12, dtype=torch.float64)
    before = permuted_block_diagonal(x, weight, perms, backend="numba")
    torch.testing.assert_close(before, permuted_block_diagonal_reference(x, weight, perms))
    # a write that bypasses the version counter: same address, version and shape
    perms.numpy()[1] = np.roll(perms.numpy()[1], 1)
    after = permuted_block_diagonal(x, weight, perms, backend="numba")
    torch.testing.assert_close(after, permuted_block_diagonal_reference(x, weight, perms))
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradcheck_through_the_cycle_path(dtype):
    weight, perms = near_orthogonal(4, 5, seed=4, noise=0.05)
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    w = weight.clone().requires_grad_()
    if dtype == torch.float64:
        # gradcheck runs backward twice through one graph: the first rebuilds activations
        # through the inverses, the second recomputes them, equal up to rounding
        assert torch.autograd.gradcheck(
            lambda x, w: permuted_block_diagonal(x, w, perms, out_features=7,
                                                 backend="numba"), (x, w), nondet_tol=1e-12)
    else:  # float32: the inverse path's error stays within that of the float32 reference
        gy = torch.randn(3, 7, dtype=torch.float64)
        exact = run(x.detach(), weight, perms, gy, 7, backend="reference")
        ours = run(x.detach().float(), weight.float(), perms, gy.float(), 7)
        ref32 = run(x.detach().float(), weight.float(), perms, gy.float(), 7,
                    backend="reference")
        for i in (1, 2):
            err = (ours[i].grad.double() - exact[i].grad).abs().max().item()
            ref_err = (ref32[i].grad.double() - exact[i].grad).abs().max().item()
            assert err <= 8 * ref_err + 1e-6


def test_conditioning_is_tested_once_per_weight_version(monkeypatch):
    # forward and backward ask the same question of the same weight: one answer per step
    import bornsparse.ops.permuted.custom_ops as P
    from bornsparse.nn import PermutedBlockDiagonal

    calls = []
    real = P.inverse_backward_is_safe
    monkeypatch.setattr(P, "inverse_backward_is_safe", lambda w: calls.append(1) or real(w))
    layer = PermutedBlockDiagonal(64, 64, seed=0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(256, 64)
    for _ in range(3):  # the optimizer's in-place step makes a new version each time
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
    assert len(calls) == 3


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_weight_gradient_summed_over_chunks_matches_the_reference(threads):
    # chunk 0 sums into the returned gradient, later chunks into partials added to it: with
    # several chunks (one tile each) every tile's share must arrive exactly once
    weight, perms = near_orthogonal(4, 9, seed=3, noise=0.02)
    x = torch.randn(5 * 13 + 2, 18, dtype=torch.float64)
    gy = torch.randn(x.shape[0], 15, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, xr, wr = run(x, weight, perms, gy, 15)
        kept = _saved(lambda: permuted_block_diagonal(
            x, weight.clone().requires_grad_(), perms, out_features=15, backend="numba"))[1][3]
    finally:
        torch.set_num_threads(before)
    assert kept.shape[0] >= threads  # as many tiles (and chunks) as threads
    _, xf, wf = run(x, weight, perms, gy, 15, backend="reference")
    torch.testing.assert_close(xr.grad, xf.grad, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(wr.grad, wf.grad, rtol=1e-9, atol=1e-10)
