"""The custom ops of the permuted operator's numba path, and how the kernels are planned.

``torch.ops.bornsparse.permuted_block_diagonal`` and ``..._backward`` launch the pair
kernels (numba_pairs.py: any block size, one factor or a fused pair per pass, backward by
recompute) or the cycle walk (numba_cycles.py: 2×2 blocks and even depth, both factors of
a pair per pass in place, backward through the blocks' inverses while they are well
conditioned); ``permuted_factor_columns`` and ``..._backward`` run one factor of the tanh
network on the transposed layout. Each has a fake kernel for torch.compile and a
registered first-order autograd formula. Everything keyed on storage (the permutation
check, the cycle schedule) lives inside the ops, never in the traced Python.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from bornsparse.ops.backends import NUMBA_DTYPES
from bornsparse.ops.permuted.operands import INVERSE_MAX_AMPLIFICATION
from bornsparse.ops.permuted.operands import check_operands as _check_operands
from bornsparse.ops.permuted.operands import check_permutations as _check_permutations
from bornsparse.ops.runtime.autograd import no_double_backward
from bornsparse.ops.runtime.hardware import cache_bytes, num_threads
from bornsparse.ops.runtime.memory import advise_huge_pages
from bornsparse.ops.runtime.validated import check_once, once_per_version
from bornsparse.ops.runtime.workspace import workspace

# Samples per batch tile of the fused kernels. Forward: three (width, tile) buffers per
# thread, 1.5 MiB at width 2048 in float32, fit a 2 MiB L2. Backward also streams the tile's
# saved activations (depth / 2 slabs for k = 2) and measured fastest at 64 as well
# (docs/design.md).
FORWARD_TILE = 64
BACKWARD_TILE = 64
# The cycle-walk kernels (2×2 blocks, even depth) keep one (width, tile) buffer (two in
# backward) and pay a fixed cost per step of the walk: f+b at batch 256 measured 0.50× dense
# with tiles of 128, 0.65-0.76× with 64 or 96 (2 threads), 0.58× with 256 (1 thread). Below
# CYCLE_MIN_TILE samples per tile (small batches) the fixed cost loses to the pair kernels
# (2 threads, f+b: batch 16, tile 8: 1.41× vs 1.04×; batch 64, tile 32: 0.92× vs 0.86×;
# batch 128, tile 64: 0.61× vs 0.71×), so those batches take the pair kernels.
CYCLE_TILE = 128
CYCLE_MIN_TILE = 64
# the smallest k whose forward keeps the factors' inputs (keeps_factor_inputs)
KEEP_INPUTS_MIN_BLOCK = 16
# ...unless the pair kernels' three (width, tile) buffers already overflow L2 (wide
# layers): then every factor streams from L3 or DRAM on either path, and the walk moves
# half the rows (each read once, written once, in place, no recompute in backward, no
# depth-sized scratch). Measured at width 2^16, depth 32, 2 threads, batch 16 / 64 (tiles
# 8 / 32): cycle / pair forward 0.94 / 0.65, f+b 0.84 / 0.71; at 2^12 (buffers in L2)
# the pair kernels stay ahead (walk 1.9-2.0× forward). L2 is read from sysfs at import.
L2_BYTES = cache_bytes(2, 1 << 20)
_SCHEDULE_CACHE_SIZE = 8
_SCHEDULES: OrderedDict[tuple, tuple[torch.Tensor, np.ndarray, np.ndarray]] = OrderedDict()
_SCHEDULES_LOCK = threading.Lock()


def _dtype_code(t: torch.Tensor) -> int:
    return 1 if t.dtype == torch.float64 else 0


def _plan(batch: int, cap: int) -> tuple[int, int]:
    """(tile, threads): the largest tile <= cap that still gives each of torch's threads work
    when the batch is small, and no more threads than tiles."""
    threads = num_threads()
    tile = max(1, min(cap, -(-batch // threads)))
    return tile, max(1, min(threads, -(-batch // tile)))


def cycle_plan(weight: torch.Tensor, batch: int) -> tuple[int, int] | None:
    """(tile, chunks) for the cycle-walk kernels, or None where they do not apply (block
    size other than 2, odd depth) or lose: tiles shorter than CYCLE_MIN_TILE while the
    pair kernels' buffers fit L2, or the walk's own two buffers overflowing L2 while the
    pair kernels' fit twice L2."""
    if weight.shape[2] != 2 or weight.shape[0] % 2 or batch == 0:
        return None
    tile, nchunks = _plan(batch, CYCLE_TILE)
    row_bytes = weight.shape[1] * 2 * weight.element_size()  # one sample of a (width,) row
    pair_buffers = 3 * row_bytes * tile
    if tile < CYCLE_MIN_TILE and pair_buffers <= L2_BYTES:
        return None
    # Measured at width 2048, batch 256 (f+b over fly's Monarch, docs/results.md): on a
    # 1 MiB L2 (AMD Zen 5) the pair kernels took 1.22-1.39× where the walk, whose 2 MiB of
    # buffers spill, took 1.74-1.94×; with a 2 MiB L2 (Intel) the walk's buffers fit and
    # it wins; with 512 KiB (AMD EPYC with AVX2) both spill and the walk was kept.
    walk_spills = 2 * row_bytes * tile > L2_BYTES
    pairs_fit_twice = 3 * row_bytes * _plan(batch, FORWARD_TILE)[0] <= 2 * L2_BYTES
    return None if walk_spills and pairs_fit_twice else (tile, nchunks)


def _cycle_schedule(perms: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The cycle-walk schedule of ``perms`` (contiguous CPU int64), cached: building it costs
    ~0.5 ms at depth 20, width 2048, a cache hit ~10 µs. A hit is checked by value, not
    only by address and version, so freed-and-reused memory can never alias a stale entry.
    """
    from bornsparse.ops.permuted.numba_cycles import build_schedule

    key = (perms.data_ptr(), perms._version, tuple(perms.shape))
    with _SCHEDULES_LOCK:
        hit = _SCHEDULES.get(key)
        if hit is not None and torch.equal(hit[0], perms):
            _SCHEDULES.move_to_end(key)
            return hit[1], hit[2]
    sched, final_loc = build_schedule(perms.numpy())
    with _SCHEDULES_LOCK:
        _SCHEDULES[key] = (perms.clone(), sched, final_loc)
        while len(_SCHEDULES) > _SCHEDULE_CACHE_SIZE:
            _SCHEDULES.popitem(last=False)
    return sched, final_loc


def inverse_backward_is_safe(weight: torch.Tensor) -> bool:
    """Whether backward may rebuild activations through the blocks' inverses (see
    ``INVERSE_MAX_AMPLIFICATION``); ``weight`` (depth, width // 2, 2, 2) on the CPU."""
    from bornsparse.ops.permuted.numba_cycles import worst_amplification

    return worst_amplification(weight.detach().contiguous().numpy()) <= (
        INVERSE_MAX_AMPLIFICATION
    )


# ---------------------------------------------------------------------------------------
# The product's custom ops: torch.compile and torch.export see one opaque node each, with a
# shape-only fake kernel.

def _check_kernel_operands(x: object, weight: object, perms: object, out_features: object
                           ) -> None:
    """Everything the fused kernel trusts, checked inside the op (it may be called directly)."""
    _check_operands(x, weight, perms, out_features, "numba")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (batch, n_in), got {tuple(x.shape)}")
    if x.device.type != "cpu" or x.dtype not in NUMBA_DTYPES:
        raise ValueError(
            f"the fused kernel needs CPU float32/float64 tensors, got {x.dtype} on {x.device}"
        )
    check_once("permutations", (perms,), lambda: _check_permutations(perms))


def _inverse_is_safe(weight: torch.Tensor) -> bool:
    # asked in forward and again in backward on the same, unchanged weight (autograd's
    # version check guarantees it): computed once per weight version (~0.06 ms each time)
    return once_per_version("inverse safe", (weight,), lambda: inverse_backward_is_safe(weight))


def _inverse_permutations(perms: torch.Tensor) -> torch.Tensor:
    """inv[t, perms[t, j]] = j for (depth, width) int64 ``perms``, computed once per version
    of ``perms`` (every chunk of every backward call rebuilt it before)."""
    def compute() -> torch.Tensor:
        positions = torch.arange(perms.shape[1]).expand_as(perms)
        return torch.empty_like(perms).scatter_(1, perms, positions)

    return once_per_version("inverse permutations", (perms,), compute)


def _final_shape(batch: int, width: int, depth: int, k: int, cycle_tile: int,
                 keep_final: bool) -> tuple[int, ...]:
    """Shape of what forward keeps for backward: the cycle walk's final activation
    (tiles, width, tile); for the pair kernels where ``keeps_factor_inputs(k)``, every
    factor's gathered input (depth, width, batch); else (0,), nothing."""
    if not (keep_final and batch):
        return (0,)
    if cycle_tile:
        return (-(-batch // cycle_tile), width, cycle_tile)
    return (depth, width, batch) if keeps_factor_inputs(k) else (0,)


def keeps_factor_inputs(k: int) -> bool:
    """Whether forward keeps every factor's input for a backward without recompute: for
    the 4×4 sub-block kernels from k = KEEP_INPUTS_MIN_BLOCK. Recomputing a factor costs
    k / 4 passes over its rows, keeping it one write and one read of depth · width · batch
    numbers outside the caches (as the batched-GEMM path keeps). Measured interleaved in
    one process, f+b kept / recomputed at 1024 → 1024 and 65,536 parameters, batch 64 /
    256, 2 threads (AMD EPYC Zen 5): k = 8 1.02 / 1.19, k = 16 0.89 / 0.93, k = 32 0.94 /
    0.89, k = 64 0.97 / 0.98; on a Zen 4 at batch 32–256, k = 8 1.04–1.28 and k = 4
    1.45–2.08; so k = 4 and 8 recompute."""
    return k % 4 == 0 and k >= KEEP_INPUTS_MIN_BLOCK


@torch.library.custom_op("bornsparse::permuted_block_diagonal", mutates_args=())
def _permuted_op(
    x: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor, out_features: int,
    cycle_tile: int, keep_final: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(G x, final) for x (batch, n_in): ``cycle_tile`` > 0 walks the cycles of factor pairs
    with that many samples per tile (2×2 blocks, even depth), 0 takes the pair kernels.
    ``keep_final`` asks forward to keep what backward needs (``_final_shape``): the cycle
    walk's final activation, written only while ``inverse_backward_is_safe(weight)``, or
    every factor's input (``keeps_factor_inputs(k)``)."""
    from bornsparse.ops.permuted.numba_pairs import _forward_body
    from bornsparse.ops.runtime.region import launch, pack_header

    _check_kernel_operands(x, weight, perms, out_features)
    x = x.contiguous()
    weight = weight.contiguous()
    perms = perms.contiguous()
    batch = x.shape[0]
    depth, nb, k, _ = weight.shape
    out = torch.empty(batch, out_features, dtype=x.dtype)
    final = torch.empty(_final_shape(batch, nb * k, depth, k, cycle_tile, keep_final),
                        dtype=x.dtype)
    if cycle_tile and batch:
        if k != 2 or depth % 2:
            raise ValueError(f"cycle_tile > 0 needs 2×2 blocks and an even depth, got "
                             f"k = {k}, depth = {depth}")
        from bornsparse.ops.permuted.numba_cycles import _forward_body as cycle_forward_body

        sched, final_loc = _cycle_schedule(perms)
        nchunks = max(1, min(torch.get_num_threads(), -(-batch // cycle_tile)))
        write_final = final.numel() and _inverse_is_safe(weight)
        # the walk runs in place in the kept final activation, else in a buffer per chunk;
        # either is touched at random rows all over: huge pages (advise_huge_pages)
        scratch = torch.empty(0 if write_final else (nchunks, nb * k, cycle_tile),
                              dtype=x.dtype)
        advise_huge_pages(final if write_final else scratch)
        header = pack_header(
            cycle_forward_body.layout, nchunks, _dtype_code(x), batch=batch,
            n_in=x.shape[1], depth=depth, nb=nb, n_out=out_features, tile=cycle_tile,
            x=x.data_ptr(), weight=weight.data_ptr(), sched=sched.ctypes.data,
            final_loc=final_loc.ctypes.data, out=out.data_ptr(),
            final=final.data_ptr() if write_final else 0, scratch=scratch.data_ptr(),
        )
        launch(cycle_forward_body.address, header, nchunks)
        if final.numel():
            # the output is defined everywhere (opcheck, compiled graphs compare it): the
            # last tile's columns past the batch, or all of it when it was not written
            if write_final:
                final[-1, :, batch - (final.shape[0] - 1) * cycle_tile:] = 0
            else:
                final.zero_()
    elif batch:
        from bornsparse.ops.permuted.numba_pairs import FORWARD_SLABS

        tile, nchunks = _plan(batch, FORWARD_TILE)
        work = workspace(nchunks * FORWARD_SLABS * nb * k * tile, x.dtype)
        header = pack_header(
            _forward_body.layout, nchunks, _dtype_code(x), batch=batch, n_in=x.shape[1],
            depth=depth, nb=nb, k=k, width=nb * k, n_out=out_features, tile=tile,
            x=x.data_ptr(), weight=weight.data_ptr(), perms=perms.data_ptr(),
            out=out.data_ptr(), saved=final.data_ptr() if final.numel() else 0,
            work=work.data_ptr(),
        )
        launch(_forward_body.address, header, nchunks)
    return out, final


@_permuted_op.register_fake
def _(x, weight, perms, out_features, cycle_tile, keep_final):
    torch._check(x.dim() == 2, lambda: f"x must have shape (batch, n_in), got {x.shape}")
    depth, nb, k, _ = weight.shape
    out = x.new_empty(x.shape[0], out_features)
    return out, x.new_empty(_final_shape(x.shape[0], nb * k, depth, k, cycle_tile,
                                         keep_final))


@torch.library.custom_op("bornsparse::permuted_block_diagonal_backward", mutates_args=())
def _permuted_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor,
    final: torch.Tensor, cycle_tile: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight) of ``permuted_block_diagonal``. With the cycle walk's kept
    ``final`` (non-empty) and blocks still well conditioned, activations are rebuilt
    through the blocks' inverses (the kernel copies each slab of ``final`` into a
    per-thread buffer first, so the op leaves its inputs unchanged and a retained graph can
    run backward twice); with ``final`` the factors' kept inputs (cycle_tile 0,
    ``keeps_factor_inputs(k)``) they are read from it; otherwise they are recomputed from
    ``x``."""
    from bornsparse.ops.permuted.numba_pairs import _backward_body, backward_slabs
    from bornsparse.ops.runtime.region import launch, pack_header

    _check_kernel_operands(x, weight, perms, grad_out.shape[1])
    x = x.contiguous()
    weight = weight.contiguous()
    perms = perms.contiguous()
    grad_out = grad_out.contiguous()
    batch, n_in = x.shape
    if final.numel() and cycle_tile and _inverse_is_safe(weight):
        return _cycle_backward(final, weight, perms, grad_out, batch, n_in, cycle_tile)
    depth, nb, k, _ = weight.shape
    # the factors' inputs kept by forward (4 | k), checked against what forward keeps
    saved = final.contiguous() if not cycle_tile and final.numel() else final.new_empty(0)
    if saved.numel() and (tuple(saved.shape) != (depth, nb * k, batch)
                          or not keeps_factor_inputs(k) or saved.dtype != x.dtype):
        raise ValueError(f"final must be empty or, with cycle_tile 0 and a k that keeps its "
                         f"inputs (4 | k, k >= {KEEP_INPUTS_MIN_BLOCK}; got k = {k}), of "
                         f"x's dtype and shape (depth, width, batch) = "
                         f"{(depth, nb * k, batch)}, got {tuple(final.shape)} {final.dtype}")
    tile, nchunks = _plan(max(batch, 1), BACKWARD_TILE)
    grad_x = torch.empty_like(x)
    partial = torch.empty(nchunks, *weight.shape, dtype=weight.dtype)  # kernels zero it
    if batch:
        slabs = backward_slabs(depth, k, bool(saved.numel()))
        work = workspace(nchunks * slabs * nb * k * tile, x.dtype)
        inv = _inverse_permutations(perms) if k == 2 else perms  # read only for k = 2
        header = pack_header(
            _backward_body.layout, nchunks, _dtype_code(x), batch=batch, n_in=x.shape[1],
            depth=depth, nb=nb, k=k, width=nb * k, n_out=grad_out.shape[1], tile=tile,
            slabs=slabs, x=x.data_ptr(), weight=weight.data_ptr(), perms=perms.data_ptr(),
            inv=inv.data_ptr(),
            grad_out=grad_out.data_ptr(), grad_x=grad_x.data_ptr(),
            partial=partial.data_ptr(), saved=saved.data_ptr() if saved.numel() else 0,
            work=work.data_ptr(),
        )
        launch(_backward_body.address, header, nchunks)
    else:
        partial.zero_()
    return grad_x, partial.sum(0)


@_permuted_backward_op.register_fake
def _(grad_out, x, weight, perms, final, cycle_tile):
    return torch.empty_like(x), torch.empty_like(weight)


def _cycle_backward(final: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor,
                    grad_out: torch.Tensor, batch: int, n_in: int, tile: int):
    """Backward through the blocks' inverses from the final activation (left unchanged)."""
    from bornsparse.ops.permuted.numba_cycles import _backward_body
    from bornsparse.ops.runtime.region import launch, pack_header

    sched, final_loc = _cycle_schedule(perms)
    nchunks = min(max(1, torch.get_num_threads()), final.shape[0])
    grad_x = torch.empty(batch, n_in, dtype=weight.dtype)
    # chunk 0 sums into grad_w, chunk c > 0 into partial[c - 1]; the kernels zero both
    grad_w = torch.empty_like(weight)
    partial = torch.empty(nchunks - 1, *weight.shape, dtype=weight.dtype)
    depth, nb = weight.shape[:2]
    # each chunk's (width, 2, tile) walk buffer: activation and gradient rows of a slot
    # side by side (numba_cycles.backward_tiles)
    rows = torch.empty(nchunks, 2 * nb, 2, tile, dtype=weight.dtype)
    for buffer in (rows, grad_w, partial):  # random rows and blocks: huge pages
        advise_huge_pages(buffer)
    header = pack_header(
        _backward_body.layout, nchunks, _dtype_code(weight), batch=batch, n_in=n_in,
        depth=depth, nb=nb, n_out=grad_out.shape[1], tile=tile, final=final.data_ptr(),
        weight=weight.data_ptr(), sched=sched.ctypes.data, final_loc=final_loc.ctypes.data,
        grad_out=grad_out.data_ptr(), grad_x=grad_x.data_ptr(), grad_weight=grad_w.data_ptr(),
        partial=partial.data_ptr(), rows=rows.data_ptr(),
    )
    launch(_backward_body.address, header, nchunks)
    for part in partial:
        grad_w.add_(part)
    return grad_x, grad_w


def _permuted_setup(ctx, inputs, output):
    x, weight, perms, out_features, cycle_tile, keep_final = inputs
    ctx.save_for_backward(x, weight, perms, output[1])
    ctx.cycle_tile = cycle_tile
    ctx.mark_non_differentiable(output[1])
    # no zero-filled gradient for that saved-for-backward output (it is batch-sized): the
    # backward gets None for it, and for the main output when nothing used it
    ctx.set_materialize_grads(False)


def _permuted_backward(ctx, grad_out, _grad_final):
    if grad_out is None:  # the product itself was not used
        return (None,) * 6
    x, weight, perms, final = ctx.saved_tensors
    grad_x, grad_w = torch.ops.bornsparse.permuted_block_diagonal_backward(
        grad_out, x, weight, perms, final, ctx.cycle_tile
    )
    need_x, need_w = ctx.needs_input_grad[:2]
    return (grad_x if need_x else None), (grad_w if need_w else None), None, None, None, None


_permuted_op.register_autograd(_permuted_backward, setup_context=_permuted_setup)
_permuted_backward_op.register_autograd(
    no_double_backward("permuted_block_diagonal"),
    setup_context=lambda ctx, inputs, output: None,
)

# ---------------------------------------------------------------------------------------
# The tanh network of the permuted block-diagonal paper (eq. 3-5),
# h_{t+1} = tanh(b_t + B_t P_t h_t): one factor per op, on the transposed layout.

def _column_chunks(batch: int) -> tuple[int, int]:
    """(step, chunks): batch columns split among torch's threads, in multiples of 16 (one
    cache line); chunk c covers columns [c * step, min((c + 1) * step, batch))."""
    threads = max(1, min(torch.get_num_threads(), -(-batch // 16)))
    step = -(-batch // threads)
    step = -(-step // 16) * 16
    return step, max(1, -(-batch // step))


def _check_factor_operands(h: torch.Tensor, weight_t: torch.Tensor, perm_t: torch.Tensor
                           ) -> None:
    """What the column kernels trust: shapes, dtypes, device, a permutation in range."""
    if weight_t.dim() != 3 or weight_t.shape[1] != weight_t.shape[2]:
        raise ValueError(f"weight_t must have shape (width // k, k, k), got "
                         f"{tuple(weight_t.shape)}")
    width = weight_t.shape[0] * weight_t.shape[1]
    if h.dim() != 2 or h.shape[0] != width:
        raise ValueError(f"h must have shape (width, batch) = ({width}, batch), got "
                         f"{tuple(h.shape)}")
    if h.dtype not in NUMBA_DTYPES or h.device.type != "cpu" or weight_t.dtype != h.dtype:
        raise ValueError(f"the column kernel needs CPU float32/float64 h and weight_t of one "
                         f"dtype, got {h.dtype} and {weight_t.dtype} on {h.device}")
    if perm_t.dtype != torch.int64 or tuple(perm_t.shape) != (width,):
        raise ValueError(f"perm_t must be int64 of shape ({width},), got {perm_t.dtype} "
                         f"{tuple(perm_t.shape)}")
    _check_permutations(perm_t.unsqueeze(0))


@torch.library.custom_op("bornsparse::permuted_factor_columns", mutates_args=())
def _factor_columns_op(h: torch.Tensor, weight_t: torch.Tensor, perm_t: torch.Tensor
                       ) -> torch.Tensor:
    """One factor on the transposed layout: h (width, batch) -> z = B P h (width, batch)."""
    from bornsparse.ops.permuted.numba_pairs import _factor_columns_body
    from bornsparse.ops.runtime.region import launch, pack_header

    _check_factor_operands(h, weight_t, perm_t)
    h = h.contiguous()
    w = weight_t.contiguous()
    p = perm_t.contiguous()
    z = torch.empty_like(h)
    if h.shape[1]:
        step, nchunks = _column_chunks(h.shape[1])
        nb, k, _ = w.shape
        header = pack_header(
            _factor_columns_body.layout, nchunks, _dtype_code(h), width=h.shape[0],
            batch=h.shape[1], nb=nb, k=k, step=step, h=h.data_ptr(), weight=w.data_ptr(),
            perm=p.data_ptr(), z=z.data_ptr())
        launch(_factor_columns_body.address, header, nchunks)
    return z


@_factor_columns_op.register_fake
def _(h, weight_t, perm_t):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


@torch.library.custom_op("bornsparse::permuted_factor_columns_backward", mutates_args=())
def _factor_columns_backward_op(
    grad_z: torch.Tensor, h: torch.Tensor, weight_t: torch.Tensor, perm_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_h, grad_weight_t) of ``permuted_factor_columns``."""
    from bornsparse.ops.permuted.numba_pairs import _factor_columns_backward_body
    from bornsparse.ops.runtime.region import launch, pack_header

    _check_factor_operands(h, weight_t, perm_t)
    if grad_z.shape != h.shape:
        raise ValueError(f"grad_z must have h's shape {tuple(h.shape)}, got "
                         f"{tuple(grad_z.shape)}")
    h = h.contiguous()
    w = weight_t.contiguous()
    p = perm_t.contiguous()
    grad_z = grad_z.contiguous()
    grad_h = torch.empty_like(h)
    step, nchunks = _column_chunks(max(h.shape[1], 1))
    partial = torch.zeros(nchunks, *w.shape, dtype=w.dtype)
    if h.shape[1]:
        nb, k, _ = w.shape
        header = pack_header(
            _factor_columns_backward_body.layout, nchunks, _dtype_code(h), width=h.shape[0],
            batch=h.shape[1], nb=nb, k=k, step=step, h=h.data_ptr(), weight=w.data_ptr(),
            perm=p.data_ptr(), grad_z=grad_z.data_ptr(), grad_h=grad_h.data_ptr(),
            partial=partial.data_ptr())
        launch(_factor_columns_backward_body.address, header, nchunks)
    return grad_h, partial.sum(0)


@_factor_columns_backward_op.register_fake
def _(grad_z, h, weight_t, perm_t):
    return (torch.empty_like(h, memory_format=torch.contiguous_format),
            torch.empty_like(weight_t, memory_format=torch.contiguous_format))


def _factor_columns_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _factor_columns_backward(ctx, grad_z):
    h, weight_t, perm_t = ctx.saved_tensors
    grad_h, grad_w = torch.ops.bornsparse.permuted_factor_columns_backward(
        grad_z, h, weight_t, perm_t
    )
    need_h, need_w = ctx.needs_input_grad[:2]
    return (grad_h if need_h else None), (grad_w if need_w else None), None


_factor_columns_op.register_autograd(_factor_columns_backward,
                                     setup_context=_factor_columns_setup)
_factor_columns_backward_op.register_autograd(
    no_double_backward("permuted_tanh_network"),
    setup_context=lambda ctx, inputs, output: None,
)
