"""Permuted block-diagonal multiply: y = G x with G = Π_t B(θ_t) P_t (seed 000, eq. 1).

Layout and conventions (shared by the reference and every fast path):

* ``x`` has shape ``(..., n_in)`` with ``n_in <= width``; it is zero-padded to ``width``
  (implicitly: the fused kernel never materialises the padding). Rows are samples.
* ``weight`` has shape ``(depth, width // k, k, k)``; ``weight[t, b]`` is block ``b`` of the
  factor applied ``t``-th. Factors are stored in *application order*: ``weight[0]`` and
  ``perms[0]`` are the paper's ``B(θ_N)`` and ``P_N`` (applied first, as the product is
  written), ``weight[depth - 1]`` is ``B(θ_1)``.
* ``perms`` has shape ``(depth, width)``, int64, each row a permutation of ``range(width)``;
  it is a gather, ``(P_t h)[j] = h[perms[t, j]]``.
* One factor maps ``h -> z`` with ``z[b*k + r] = Σ_c weight[t, b, r, c] · h[perms[t, b*k + c]]``.
* The result keeps the first ``out_features`` entries (all ``width`` by default).

Layers, top to bottom: ``permuted_block_diagonal_reference`` (plain PyTorch, any device,
autograd of any order), the numba kernels in ``_permuted_numba.py`` (any block size, one
factor or a fused pair per pass, backward by recompute) and ``_permuted_cycles.py`` (2×2
blocks and even depth: both factors of a pair per pass, in place, backward through the
blocks' inverses while they are well conditioned), the autograd Function
``PermutedBlockDiagonalFn`` (forward and first-order backward through the kernels) and the
functional ``permuted_block_diagonal`` that validates and dispatches. The tanh network of
eq. 3-5 follows the same pattern at the end of the file (``permuted_tanh_network``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from bornsparse._checks import check_float_tensor, check_positive_int

BACKENDS = ("auto", "reference", "numba")
NUMBA_DTYPES = (torch.float32, torch.float64)

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
# The cycle backward rebuilds every factor's input from its output through the blocks'
# inverses; it is used only while the product over factors of the worst block condition
# number stays at most this (rounding relative to the activations is magnified at most so
# much), else backward recomputes the forward like the other kernels.
INVERSE_MAX_AMPLIFICATION = 8.0
_SCHEDULE_CACHE_SIZE = 8
_SCHEDULES: OrderedDict[tuple, tuple[torch.Tensor, np.ndarray, np.ndarray]] = OrderedDict()
_SCHEDULES_LOCK = threading.Lock()


def permuted_block_diagonal_reference(
    x: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor, *, out_features: int | None = None
) -> torch.Tensor:
    """Plain-PyTorch, device-agnostic G x for ``x`` of shape (..., n_in), n_in <= width.

    Autograd differentiates it directly (any order); it keeps depth activations alive for
    backward.
    """
    depth, nblocks, k, _ = weight.shape
    width = nblocks * k
    h = x
    if h.shape[-1] < width:
        h = torch.nn.functional.pad(h, (0, width - h.shape[-1]))
    for t in range(depth):
        g = h.index_select(-1, perms[t]).unflatten(-1, (nblocks, k))  # (..., nb, k)
        h = torch.einsum("...bc,brc->...br", g, weight[t]).flatten(-2)  # (..., width)
    return h if out_features is None else h[..., :out_features]


def permuted_block_diagonal_dense_reference(
    weight: torch.Tensor, perms: torch.Tensor
) -> torch.Tensor:
    """The (width, width) matrix G, built by applying the factors to the identity.

    Meant for tests and ``to_dense()``: O(width² · depth) work.
    """
    width = perms.shape[1]
    eye = torch.eye(width, dtype=weight.dtype, device=weight.device)
    # rows of the result are G e_j, i.e. the columns of G
    return permuted_block_diagonal_reference(eye, weight, perms).T


def _header(nchunks: int, *values: int) -> np.ndarray:
    """The int64 header of a parallel body (ops/_parallel.py): two chunk counters, the chunk
    count, then ``values`` (dtype code, sizes, data pointers) in the body's order."""
    return np.array((0, 0, nchunks, *values), dtype=np.int64)


def _dtype_code(t: torch.Tensor) -> int:
    return 1 if t.dtype == torch.float64 else 0


def _plan(batch: int, cap: int) -> tuple[int, int]:
    """(tile, threads): the largest tile <= cap that still gives each of torch's threads work
    when the batch is small, and no more threads than tiles."""
    threads = max(1, torch.get_num_threads())
    tile = max(1, min(cap, -(-batch // threads)))
    return tile, max(1, min(threads, -(-batch // tile)))


def _cycle_plan(weight: torch.Tensor, batch: int) -> tuple[int, int] | None:
    """(tile, chunks) for the cycle-walk kernels, or None where they do not apply (block
    size other than 2, odd depth) or lose (tiles shorter than CYCLE_MIN_TILE)."""
    if weight.shape[2] != 2 or weight.shape[0] % 2 or batch == 0:
        return None
    tile, nchunks = _plan(batch, CYCLE_TILE)
    return (tile, nchunks) if tile >= CYCLE_MIN_TILE else None


def _cycle_schedule(perms: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The cycle-walk schedule of ``perms`` (contiguous CPU int64), cached: building it costs
    ~0.5 ms at depth 20, width 2048, a cache hit ~10 µs. A hit is checked by value, not
    only by address and version, so freed-and-reused memory can never alias a stale entry.
    """
    from bornsparse.ops._permuted_cycles import build_schedule

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
    from bornsparse.ops._permuted_cycles import worst_amplification

    return worst_amplification(weight.detach().contiguous().numpy()) <= (
        INVERSE_MAX_AMPLIFICATION
    )


class PermutedBlockDiagonalFn(torch.autograd.Function):
    """G x through the fused numba kernels.

    ``x``: (batch, n_in) CPU float32/float64; returns (batch, out_features). With 2×2 blocks
    and an even depth, forward walks the cycles of factor pairs (``_permuted_cycles.py``)
    and, when a gradient will be needed and the blocks are well conditioned
    (``inverse_backward_is_safe``), keeps the final activation (batch × width numbers,
    whatever the depth) so that backward rebuilds the others through the blocks' inverses.
    Otherwise only ``x`` (and the parameters) is kept and backward recomputes the
    activations tile by tile. Either way memory kept between forward and backward does not
    grow with depth. First-order only: double backward raises (use the reference).
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor, out_features: int,
        operands_checked: bool = False, backward_expected: bool | None = None,
    ) -> torch.Tensor:
        from bornsparse.ops._parallel import launch
        from bornsparse.ops._permuted_numba import _forward_body

        if not operands_checked:
            # the kernels get raw pointers: called directly, validate everything they trust
            _check_kernel_operands(x, weight, perms, out_features)
        x = x.detach().contiguous()
        weight_c = weight.detach().contiguous()
        perms_c = perms.contiguous()
        out = torch.empty(x.shape[0], out_features, dtype=x.dtype)
        ctx.cycle_tile = 0  # 0: backward recomputes; else the tile of the saved activation
        final = torch.empty(0, dtype=x.dtype)
        cycle_plan = _cycle_plan(weight_c, x.shape[0])
        if cycle_plan is not None:
            from bornsparse.ops._permuted_cycles import _forward_body as cycle_forward_body

            sched, final_loc = _cycle_schedule(perms_c)
            tile, nchunks = cycle_plan
            depth, nb = weight_c.shape[:2]
            if backward_expected is None:  # called directly: grad mode is off in here
                backward_expected = any(ctx.needs_input_grad[:2])
            if backward_expected and inverse_backward_is_safe(weight_c):
                ntiles = -(-x.shape[0] // tile)
                final = torch.empty(ntiles, nb * 2, tile, dtype=x.dtype)
                ctx.cycle_tile = tile
                ctx.cycle_schedule = (sched, final_loc)
            header = _header(
                nchunks, _dtype_code(x), x.shape[0], x.shape[1], depth, nb, out_features,
                tile, x.data_ptr(), weight_c.data_ptr(), sched.ctypes.data,
                final_loc.ctypes.data, out.data_ptr(), final.data_ptr() if final.numel() else 0,
            )
            launch(cycle_forward_body.address, header, nchunks)
        elif x.shape[0]:
            tile, nchunks = _plan(x.shape[0], FORWARD_TILE)
            depth, nb, k, _ = weight_c.shape
            header = _header(
                nchunks, _dtype_code(x), x.shape[0], x.shape[1], depth, nb, k, nb * k,
                out_features, tile, x.data_ptr(), weight_c.data_ptr(), perms_c.data_ptr(),
                out.data_ptr(),
            )
            launch(_forward_body.address, header, nchunks)
        # the parameter itself, not a contiguous copy, so nothing weight-sized is kept twice;
        # x also on the cycle path: its backward consumes `final`, so a second backward
        # through a retained graph recomputes from x
        ctx.save_for_backward(x, weight, perms, final)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        from bornsparse.ops._parallel import launch
        from bornsparse.ops._permuted_numba import _backward_body

        x, weight, perms, final = ctx.saved_tensors
        weight = weight.detach().contiguous()
        perms = perms.contiguous()
        grad_out = grad_out.contiguous()
        batch, n_in = x.shape
        if ctx.cycle_tile:
            tile, ctx.cycle_tile = ctx.cycle_tile, 0  # `final` is consumed by this backward
            return _cycle_backward(ctx, final, weight, grad_out, batch, n_in, tile)
        tile, nchunks = _plan(max(batch, 1), BACKWARD_TILE)
        grad_x = torch.empty_like(x)
        partial = torch.empty(nchunks, *weight.shape, dtype=weight.dtype)  # kernels zero it
        if batch:
            depth, nb, k, _ = weight.shape
            header = _header(
                nchunks, _dtype_code(x), batch, x.shape[1], depth, nb, k, nb * k,
                grad_out.shape[1], tile, x.data_ptr(), weight.data_ptr(), perms.data_ptr(),
                grad_out.data_ptr(), grad_x.data_ptr(), partial.data_ptr(),
            )
            launch(_backward_body.address, header, nchunks)
        else:
            partial.zero_()
        grad_w = partial.sum(0) if ctx.needs_input_grad[1] else None
        return (grad_x if ctx.needs_input_grad[0] else None), grad_w, None, None, None, None


def _cycle_backward(ctx, final: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor,
                    batch: int, n_in: int, tile: int):
    """Backward through the blocks' inverses from the saved final activation (consumed)."""
    from bornsparse.ops._parallel import launch
    from bornsparse.ops._permuted_cycles import _backward_body

    sched, final_loc = ctx.cycle_schedule
    nchunks = min(max(1, torch.get_num_threads()), final.shape[0])
    grad_x = torch.empty(batch, n_in, dtype=weight.dtype)
    partial = torch.empty(nchunks, *weight.shape, dtype=weight.dtype)  # kernels zero it
    depth, nb = weight.shape[:2]
    header = _header(
        nchunks, _dtype_code(weight), batch, n_in, depth, nb, grad_out.shape[1], tile,
        final.data_ptr(), weight.data_ptr(), sched.ctypes.data, final_loc.ctypes.data,
        grad_out.data_ptr(), grad_x.data_ptr(), partial.data_ptr(),
    )
    launch(_backward_body.address, header, nchunks)
    grad_w = partial.sum(0) if ctx.needs_input_grad[1] else None
    return (grad_x if ctx.needs_input_grad[0] else None), grad_w, None, None, None, None


def _check_operands(
    x: object, weight: object, perms: object, out_features: object, backend: object
) -> tuple[int, int]:
    """Validate the functional's arguments; return (width, out_features)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_float_tensor("x", x)
    check_float_tensor("weight", weight)
    if not isinstance(perms, torch.Tensor):
        raise TypeError(f"perms must be a torch.Tensor, got {type(perms).__name__}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] < 1:
        raise ValueError(
            f"weight must have shape (depth, width // k, k, k), got {tuple(weight.shape)}"
        )
    depth, nblocks, k, _ = weight.shape
    width = nblocks * k
    if perms.dtype != torch.int64:
        raise TypeError(f"perms must have dtype torch.int64, got {perms.dtype}")
    if tuple(perms.shape) != (depth, width):
        raise ValueError(
            f"perms must have shape (depth, width) = {(depth, width)} to match weight, "
            f"got {tuple(perms.shape)}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must share a dtype, got {x.dtype} and {weight.dtype}")
    if x.device != weight.device or perms.device != weight.device:
        raise ValueError(
            f"x, weight and perms must be on one device, got {x.device}, {weight.device} "
            f"and {perms.device}"
        )
    if x.dim() == 0 or not 1 <= x.shape[-1] <= width:
        raise ValueError(f"x must have shape (..., n_in) with 1 <= n_in <= {width}, "
                         f"got {tuple(x.shape)}")
    if out_features is None:
        out_features = width
    out_features = check_positive_int("out_features", out_features)
    if out_features > width:
        raise ValueError(f"out_features must be at most width = {width}, got {out_features}")
    return width, out_features


def _check_kernel_operands(x: object, weight: object, perms: object, out_features: object
                           ) -> None:
    """Everything the fused kernel trusts, for callers of PermutedBlockDiagonalFn itself."""
    _check_operands(x, weight, perms, out_features, "numba")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (batch, n_in), got {tuple(x.shape)}")
    if x.device.type != "cpu" or x.dtype not in NUMBA_DTYPES:
        raise ValueError(
            f"the fused kernel needs CPU float32/float64 tensors, got {x.dtype} on {x.device}"
        )
    _check_permutations(perms)


def _check_permutations(perms: torch.Tensor) -> None:
    # The numba kernels do no bounds checks, so a bad index would read outside memory.
    if perms.device.type == "cpu":
        from bornsparse.ops._permutation_check import _perms_are_permutations_kernel

        ok = _perms_are_permutations_kernel(perms.contiguous().numpy())
    else:
        arange = torch.arange(perms.shape[1], device=perms.device)
        ok = bool((perms.sort(dim=1).values == arange).all())
    if not ok:
        raise ValueError("perms must hold a permutation of range(width) in every row")


def permuted_block_diagonal(
    x: torch.Tensor,
    weight: torch.Tensor,
    perms: torch.Tensor,
    *,
    out_features: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """G [x, 0] for ``x`` of shape (..., n_in); returns (..., out_features).

    See the module docstring for the layout. ``backend="auto"`` picks the fused numba kernel
    for CPU float32/float64 tensors and the reference otherwise (other devices and dtypes);
    ``"reference"`` forces plain PyTorch (any device, gradients of any order); ``"numba"``
    forces the kernel and raises if the tensors do not suit it. The numba path supports
    first-order gradients (``x`` and ``weight``); double backward through it raises, so use
    ``backend="reference"`` for higher-order derivatives.
    """
    return _permuted_block_diagonal(
        x, weight, perms, out_features=out_features, backend=backend, check_perms=True
    )


def _permuted_block_diagonal(
    x: torch.Tensor,
    weight: torch.Tensor,
    perms: torch.Tensor,
    *,
    out_features: int | None,
    backend: str,
    check_perms: bool,
) -> torch.Tensor:
    """The functional, with the O(depth · width) permutation check optional for callers
    (the layers) that know their ``perms`` were checked and not modified since."""
    _, out_features = _check_operands(x, weight, perms, out_features, backend)
    if check_perms:
        _check_permutations(perms)
    suits_numba = x.device.type == "cpu" and x.dtype in NUMBA_DTYPES
    if backend == "numba" and not suits_numba:
        raise ValueError(
            f"backend='numba' needs CPU float32/float64 tensors, got {x.dtype} on {x.device}"
        )
    if backend == "reference" or not suits_numba:
        return permuted_block_diagonal_reference(x, weight, perms, out_features=out_features)
    # the Function's forward runs with grad mode off, so whether a backward can follow is
    # decided here (it sets whether forward keeps the final activation for backward)
    backward_expected = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if x.dim() == 2:
        return PermutedBlockDiagonalFn.apply(x, weight, perms, out_features, True,
                                             backward_expected)
    lead = x.shape[:-1]
    y = PermutedBlockDiagonalFn.apply(x.reshape(-1, x.shape[-1]), weight, perms, out_features,
                                      True, backward_expected)
    return y.reshape(*lead, out_features)


# ---------------------------------------------------------------------------------------
# The tanh network of seed 000 (eq. 3-5): h_{t+1} = tanh(b_t + B_t P_t h_t), no tanh after the
# last factor.


def permuted_tanh_network_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    perms: torch.Tensor,
    biases: torch.Tensor,
    *,
    out_features: int | None = None,
) -> torch.Tensor:
    """Plain-PyTorch tanh network for ``x`` (..., n_in); ``biases`` (depth, width)."""
    depth, nblocks, k, _ = weight.shape
    width = nblocks * k
    h = x
    if h.shape[-1] < width:
        h = torch.nn.functional.pad(h, (0, width - h.shape[-1]))
    for t in range(depth):
        g = h.index_select(-1, perms[t]).unflatten(-1, (nblocks, k))  # (..., nb, k)
        h = torch.einsum("...bc,brc->...br", g, weight[t]).flatten(-2) + biases[t]
        if t < depth - 1:
            h = torch.tanh(h)
    return h if out_features is None else h[..., :out_features]


def _column_chunks(batch: int) -> tuple[int, int]:
    """(step, chunks): batch columns split among torch's threads, in multiples of 16 (one
    cache line); chunk c covers columns [c * step, min((c + 1) * step, batch))."""
    threads = max(1, min(torch.get_num_threads(), -(-batch // 16)))
    step = -(-batch // threads)
    step = -(-step // 16) * 16
    return step, max(1, -(-batch // step))


class _FactorColumnsFn(torch.autograd.Function):
    """One factor on the transposed layout: h (width, batch) -> z (width, batch)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight_t: torch.Tensor, perm_t: torch.Tensor):
        from bornsparse.ops._parallel import launch
        from bornsparse.ops._permuted_numba import _factor_columns_body

        h = h.detach().contiguous()
        w = weight_t.detach().contiguous()
        p = perm_t.contiguous()
        z = torch.empty_like(h)
        if h.shape[1]:
            step, nchunks = _column_chunks(h.shape[1])
            nb, k, _ = w.shape
            header = _header(nchunks, _dtype_code(h), h.shape[0], h.shape[1], nb, k, step,
                             h.data_ptr(), w.data_ptr(), p.data_ptr(), z.data_ptr())
            launch(_factor_columns_body.address, header, nchunks)
        ctx.save_for_backward(h, weight_t, perm_t)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z: torch.Tensor):
        from bornsparse.ops._parallel import launch
        from bornsparse.ops._permuted_numba import _factor_columns_backward_body

        h, weight_t, perm_t = ctx.saved_tensors
        w = weight_t.detach().contiguous()
        p = perm_t.contiguous()
        grad_z = grad_z.contiguous()
        grad_h = torch.empty_like(h)
        step, nchunks = _column_chunks(max(h.shape[1], 1))
        partial = torch.zeros(nchunks, *w.shape, dtype=w.dtype)
        if h.shape[1]:
            nb, k, _ = w.shape
            header = _header(nchunks, _dtype_code(h), h.shape[0], h.shape[1], nb, k, step,
                             h.data_ptr(), w.data_ptr(), p.data_ptr(), grad_z.data_ptr(),
                             grad_h.data_ptr(), partial.data_ptr())
            launch(_factor_columns_backward_body.address, header, nchunks)
        return grad_h, partial.sum(0), None


def permuted_tanh_network(
    x: torch.Tensor,
    weight: torch.Tensor,
    perms: torch.Tensor,
    biases: torch.Tensor,
    *,
    out_features: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The tanh network h_θ(x) (seed 000, eq. 3-5) for ``x`` (..., n_in); returns
    (..., out_features). ``weight``/``perms`` as for ``permuted_block_diagonal``, ``biases``
    (depth, width). The numba path keeps activations as (width, batch), so the per-factor
    kernel gathers contiguous rows and only the ends are transposed; bias and tanh run in
    torch. Double backward: use ``backend="reference"``.
    """
    return _permuted_tanh_network(
        x, weight, perms, biases, out_features=out_features, backend=backend, check_perms=True
    )


def _permuted_tanh_network(
    x: torch.Tensor,
    weight: torch.Tensor,
    perms: torch.Tensor,
    biases: torch.Tensor,
    *,
    out_features: int | None,
    backend: str,
    check_perms: bool,
) -> torch.Tensor:
    width, out_features = _check_operands(x, weight, perms, out_features, backend)
    check_float_tensor("biases", biases)
    if tuple(biases.shape) != (weight.shape[0], width):
        raise ValueError(
            f"biases must have shape (depth, width) = {(weight.shape[0], width)}, "
            f"got {tuple(biases.shape)}"
        )
    if biases.dtype != x.dtype or biases.device != x.device:
        raise TypeError(
            f"biases must match x's dtype and device, got {biases.dtype} on {biases.device}"
        )
    if check_perms:
        _check_permutations(perms)
    suits_numba = x.device.type == "cpu" and x.dtype in NUMBA_DTYPES
    if backend == "numba" and not suits_numba:
        raise ValueError(
            f"backend='numba' needs CPU float32/float64 tensors, got {x.dtype} on {x.device}"
        )
    if backend == "reference" or not suits_numba:
        return permuted_tanh_network_reference(
            x, weight, perms, biases, out_features=out_features
        )
    lead = x.shape[:-1]
    h = x.reshape(-1, x.shape[-1])
    if h.shape[1] < width:
        h = torch.nn.functional.pad(h, (0, width - h.shape[1]))
    h = h.T.contiguous()  # (width, batch)
    depth = weight.shape[0]
    for t in range(depth):
        h = _FactorColumnsFn.apply(h, weight[t], perms[t]) + biases[t].unsqueeze(1)
        if t < depth - 1:
            h = torch.tanh(h)
    return h[:out_features].T.reshape(*lead, out_features)
