"""Triton kernels of the permuted block-diagonal product and of the permuted tanh network
(the package docstring has the layout; reference.py the plain-PyTorch references beside
which these run).

Imported only by the "triton" backend (ops/backends.py), so ``import bornsparse`` never loads
triton. Activations are kept transposed, (rows, batch) contiguous, like the sparse kernels:
a factor gathers whole rows ``h[perm[r], :]``, so the loads of a program run along the batch
and coalesce on a GPU whatever the permutation (in the (batch, width) layout every gathered
entry would be a separate memory transaction). The op transposes x once on entry and the
result once on exit. Two kernels, both for any block size k (unrolled k² times, so meant for
small k):

* ``_factor_kernel`` applies one factor, in one of two modes. Gather:
  ``dst[b·k + i, n] = Σ_j M[b, i, j] · src[perm[b·k + j], n]`` (the forward, M = B), with an
  optional epilogue ``+ bias`` and ``tanh`` (the tanh network). Scatter:
  ``dst[perm[b·k + i], n] = Σ_j M[b, i, j] · src[b·k + j, n]`` (the input gradient with
  M = Bᵀ, and the rebuild of a factor's input from its output with M = B⁻¹), optionally
  multiplying ``src`` by tanh's derivative ``1 − a²`` on load and storing that product (the
  tanh network's backward). A program owns BLOCK_B blocks × BLOCK_N samples; a permutation
  never maps two entries to one, so the scatter needs no atomics.
* ``_block_grad_kernel`` writes ``partial[s, b, i, j] = Σ_n g[b·k + i, n] · h[perm[b·k + j], n]``
  (and, for the tanh network, ``bias_partial[s, b·k + i] = Σ_n g[b·k + i, n]``) over the
  samples of split s, all k² entries of a block in one pass over the batch; the splits are
  summed in torch afterwards, so the block and bias gradients need no atomics and are
  deterministic.

One launch per factor. Several factors per launch would need each program to see the
previous factor's whole output for its samples: a random permutation sends any row
anywhere, so across programs that is a grid-wide barrier (which Triton does not offer),
and within one program it is the full (width, samples) slab, 4096 rows × 32 samples × 4 B =
512 KiB at the smallest benchmarked width, over the 228 KiB of shared memory of an H100 or
H200 SM; spilled to global memory it costs the same traffic as one launch per factor, while
a launch costs a few microseconds against milliseconds of memory traffic per factor at
those sizes.

Loads and products run in float32 (float64 for float64 tensors), stores in the tensor's
dtype. The product's backward keeps memory flat in depth where the blocks are well
conditioned: from the final activation (kept in float32 for half-precision inputs) it
rebuilds every factor's input through the blocks' inverses (the guard of the CPU cycle walk,
``INVERSE_MAX_AMPLIFICATION``); otherwise it recomputes the activations from ``x`` and holds
all depth of them during the backward op. The tanh network keeps its depth − 1 activations
(tanh has no well-conditioned inverse near ±1), one per factor, about half what autograd
keeps for its reference.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from bornsparse.ops.permuted.operands import (
    INVERSE_MAX_AMPLIFICATION,
    check_operands,
    check_permutations,
)
from bornsparse.ops.runtime.autograd import no_double_backward
from bornsparse.ops.runtime.triton_support import (
    acc_dtype,
    check_triton_tensor,
    jit_kernels,
    work_dtype,
)
from bornsparse.ops.runtime.validated import check_once

BLOCK_B = 16  # blocks per program
BLOCK_N = 64  # samples per program: 64 × 4 B = one 256 B run per gathered row
MAX_SPLITS = 64  # batch splits of the block gradient: parallelism without atomics
TARGET_PROGRAMS = 1024  # enough programs to fill every SM of a large GPU a few times


def _factor_kernel(src_ptr, m_ptr, perm_ptr, bias_ptr, act_ptr, gz_ptr, dst_ptr, batch,
                   src_rows, dst_rows, nb, K: tl.constexpr, SCATTER: tl.constexpr,
                   BIAS: tl.constexpr, TANH: tl.constexpr, DTANH: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    b_ok = b < nb
    n_ok = (n < batch)[None, :]
    for i in tl.static_range(K):
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC)
        for j in tl.static_range(K):
            m = tl.load(m_ptr + (b * K + i) * K + j, mask=b_ok, other=0).to(ACC)
            if SCATTER:
                row = b * K + j
            else:
                row = tl.load(perm_ptr + b * K + j, mask=b_ok, other=0)
            # rows past src_rows are the implicit zero padding (x narrower than width, a
            # gradient narrower than width when out_features < width); int64 offsets:
            # width · batch may pass 2³¹ on a GPU
            ok = (b_ok & (row < src_rows))[:, None] & n_ok
            at = row[:, None].to(tl.int64) * batch + n[None, :]
            v = tl.load(src_ptr + at, mask=ok, other=0).to(ACC)
            if DTANH:
                a = tl.load(act_ptr + at, mask=ok, other=0).to(ACC)
                v = v * (1 - a * a)
                if i == K - 1:  # the last pass over these rows: the block gradient reads it
                    tl.store(gz_ptr + at, v.to(gz_ptr.dtype.element_ty), mask=ok)
            acc += m[:, None] * v
        if BIAS:
            acc += tl.load(bias_ptr + b * K + i, mask=b_ok, other=0).to(ACC)[:, None]
        if TANH:
            # no tanh in Triton's core language (libdevice has one, the interpreter does not
            # run it): Cephes' rational form below 0.625, 1 − 2/(e^{2|x|} + 1) above; both
            # within a few ulps in float32 and float64
            z = acc * acc
            small = acc + acc * z * (
                ((-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z
                 - 1.61468768441708447952e3)
                / (((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z
                   + 4.84406305325125486048e3))
            # tanh(20) rounds to 1 in float64 too; capping keeps e^{2|x|} finite
            large = 1 - 2 / (tl.exp(2 * tl.minimum(tl.abs(acc), 20.0)) + 1)
            acc = tl.where(tl.abs(acc) < 0.625, small, tl.where(acc < 0, -large, large))
        if SCATTER:
            out = tl.load(perm_ptr + b * K + i, mask=b_ok, other=0)
        else:
            out = b * K + i
        ok = (b_ok & (out < dst_rows))[:, None] & n_ok
        tl.store(dst_ptr + out[:, None].to(tl.int64) * batch + n[None, :],
                 acc.to(dst_ptr.dtype.element_ty), mask=ok)


def _block_grad_kernel(g_ptr, h_ptr, perm_ptr, partial_ptr, bias_partial_ptr, batch, g_rows,
                       h_rows, nb, K: tl.constexpr, KK: tl.constexpr, BIAS: tl.constexpr,
                       ACC: tl.constexpr, SPLIT: tl.constexpr, BLOCK_B: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    # all k² entries of a program's blocks at once, as a (BLOCK_B, KK, BLOCK_N) tile with
    # entry e = i·k + j (KK = k² rounded up to a power of two): one pass over the batch reads
    # every row of g and h once (the k copies of a row within one load come from L1), where
    # a loop over (i, j) outside the batch loop would stream each row k times from memory
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    s = tl.program_id(1)
    e = tl.arange(0, KK)
    i = e // K
    j = e % K
    ok = (b < nb)[:, None] & (e < K * K)[None, :]  # (BLOCK_B, KK)
    grow = b[:, None] * K + i[None, :]
    hrow = tl.load(perm_ptr + b[:, None] * K + j[None, :], mask=ok, other=0)
    g_ok = (ok & (grow < g_rows))[:, :, None]
    h_ok = (ok & (hrow < h_rows))[:, :, None]
    g_at = (grow.to(tl.int64) * batch)[:, :, None]
    h_at = (hrow.to(tl.int64) * batch)[:, :, None]
    acc = tl.zeros((BLOCK_B, KK, BLOCK_N), dtype=ACC)
    bias_acc = tl.zeros((BLOCK_B, KK), dtype=ACC)
    for n0 in range(s * BLOCK_N, batch, SPLIT * BLOCK_N):
        n = (n0 + tl.arange(0, BLOCK_N))[None, None, :]
        n_ok = n < batch
        g = tl.load(g_ptr + g_at + n, mask=g_ok & n_ok, other=0).to(ACC)
        h = tl.load(h_ptr + h_at + n, mask=h_ok & n_ok, other=0).to(ACC)
        acc += g * h
        if BIAS:
            bias_acc += tl.sum(g, axis=2)
    dst = partial_ptr + (s * nb + b[:, None]) * (K * K) + e[None, :]
    tl.store(dst, tl.sum(acc, axis=2).to(partial_ptr.dtype.element_ty), mask=ok)
    if BIAS:  # row b·k + i's sum, from its j = 0 entry
        tl.store(bias_partial_ptr + s * nb * K + grow,
                 bias_acc.to(bias_partial_ptr.dtype.element_ty), mask=ok & (j == 0)[None, :])


def kernels() -> SimpleNamespace:
    """The kernels, wrapped for the current TRITON_INTERPRET setting."""
    return jit_kernels(factor=_factor_kernel, block_grad=_block_grad_kernel)


def transposed(t: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous copy of ``t.T`` (2-D): never a view, so an op never returns an
    alias of its input or of another output (a (1, n) tensor's transpose is contiguous)."""
    return t.t().clone(memory_format=torch.contiguous_format)


def apply_factor(src: torch.Tensor, m: torch.Tensor, perm: torch.Tensor, dst_rows: int, *,
                 scatter: bool, bias: torch.Tensor | None = None, tanh: bool = False,
                 act: torch.Tensor | None = None, gz: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """One factor (module docstring) of src (src_rows <= width, batch) contiguous, m
    (nb, k, k) and perm (width,); returns (dst_rows, batch) in ``dtype`` (src's by default),
    rows past src_rows read as zeros. Gather mode may add ``bias`` (width,) and apply
    ``tanh``; scatter mode with ``act`` (width, batch) multiplies src by 1 − act² on load
    and writes that product into ``gz`` (width, batch). ``out``: a contiguous
    (dst_rows, batch) tensor to write into instead of a new one."""
    nb, k, _ = m.shape
    batch = src.shape[1]
    # a permutation hits every row once, so the scatter writes all of dst too
    dst = src.new_empty(dst_rows, batch, dtype=dtype or src.dtype) if out is None else out
    if batch:
        grid = (triton.cdiv(nb, BLOCK_B), triton.cdiv(batch, BLOCK_N))
        # unused pointers get src: Triton wants a tensor for every pointer argument
        kernels().factor[grid](
            src, m, perm, src if bias is None else bias, src if act is None else act,
            src if gz is None else gz, dst, batch, src.shape[0], dst_rows, nb, K=k,
            SCATTER=scatter, BIAS=bias is not None, TANH=tanh, DTANH=act is not None,
            ACC=acc_dtype(src), BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N,
        )
    return dst


def block_grad(g: torch.Tensor, h: torch.Tensor, perm: torch.Tensor, nb: int, k: int, *,
               bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (nb, k, k) gradient of one factor's blocks, in g's dtype: g (≤ width, batch) the
    gradient of its output, h (≤ width, batch) its input (missing rows are zeros). With
    ``bias`` also the (width,) row sums of g (the gradient of the factor's bias), else None.
    """
    batch = g.shape[1]
    tiles = triton.cdiv(nb, BLOCK_B)
    kk = triton.next_power_of_2(k * k)
    # the (BLOCK_B, kk, block_n) tile: 4096 accumulators (32 per thread of 4 warps)
    block_n = max(8, min(BLOCK_N, 4096 // (BLOCK_B * kk)))
    splits = max(1, min(MAX_SPLITS, triton.cdiv(batch, block_n),
                        triton.cdiv(TARGET_PROGRAMS, tiles)))
    dtype = work_dtype(g.dtype)
    partial = torch.empty(splits, nb, k, k, dtype=dtype, device=g.device)
    bias_partial = torch.empty(splits, nb * k if bias else 0, dtype=dtype, device=g.device)
    if batch:
        kernels().block_grad[(tiles, splits)](
            g, h, perm, partial, bias_partial if bias else partial, batch, g.shape[0],
            h.shape[0], nb, K=k, KK=kk, BIAS=bias, ACC=acc_dtype(g), SPLIT=splits,
            BLOCK_B=BLOCK_B, BLOCK_N=block_n,
        )
    else:
        partial.zero_()
        bias_partial.zero_()
    grad_b = bias_partial.sum(0).to(g.dtype) if bias else None
    return partial.sum(0).to(g.dtype), grad_b


def inverse_amplification(weight: torch.Tensor) -> float:
    """Product over factors of the largest block condition number of ``weight``
    (depth, nb, k, k), inf for a singular or non-finite block: the CPU cycle walk's bound
    (``numba_cycles.worst_amplification``) for any k, on the weight's device."""
    w = weight.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        return float("inf")
    if w.shape[-1] == 2:
        # closed form, elementwise: a batched SVD of ~10⁶ 2×2 blocks is slow on a GPU.
        # s₁² = (S + √(S² − 4D²))/2 with S = ‖B‖²_F, D = det B; s₁ s₂ = |D|, so
        # s₁/s₂ = s₁²/|D| (no cancellation, unlike s₂² from the minus sign)
        a, b, c, d = w[..., 0, 0], w[..., 0, 1], w[..., 1, 0], w[..., 1, 1]
        s = a * a + b * b + c * c + d * d
        det = (a * d - b * c).abs()
        s1sq = (s + (s * s - 4 * det * det).clamp_min(0).sqrt()) / 2
        cond = torch.where(det > 0, s1sq / det, torch.full_like(det, float("inf")))
    else:
        sv = torch.linalg.svdvals(w)  # (depth, nb, k), descending
        # a zero block would give 0/0 = nan, which compares false with the bound below
        cond = torch.where(sv[..., -1] > 0, sv[..., 0] / sv[..., -1],
                           torch.full_like(sv[..., 0], float("inf")))
    return float(cond.amax(dim=1).prod())


def _check_op_operands(x, weight, perms, out_features):
    check_operands(x, weight, perms, out_features, "triton")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (batch, n_in), got {tuple(x.shape)}")
    check_triton_tensor("x", x)
    check_once("permutations", (perms,), lambda: check_permutations(perms))


def _final_spec(batch: int, width: int, dtype: torch.dtype, keep_final: bool
                ) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of the kept final activation: (width, batch) in the working dtype,
    or (0,) when none is kept."""
    return ((width, batch) if keep_final else (0,)), work_dtype(dtype)


# ---------------------------------------------------------------------------------------
# The permuted block-diagonal product G x.

@torch.library.custom_op("bornsparse::permuted_block_diagonal_triton", mutates_args=())
def _permuted_triton_op(x: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor,
                        out_features: int, keep_final: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(G x (batch, out_features), final) for x (batch, n_in): ``final`` is the last
    factor's full output, transposed (width, batch), in float32 for half-precision x (so
    the backward's rebuild starts unrounded), when ``keep_final``, else empty (0,)."""
    _check_op_operands(x, weight, perms, out_features)
    weight, perms = weight.contiguous(), perms.contiguous()
    depth, nb, k, _ = weight.shape
    width = nb * k
    h = transposed(x)
    for t in range(depth):
        last = t == depth - 1
        h = apply_factor(h, weight[t], perms[t], width if keep_final or not last
                         else out_features, scatter=False,
                         dtype=work_dtype(x.dtype) if last and keep_final else None)
    y = transposed(h[:out_features]).to(x.dtype)
    if keep_final:
        return y, h
    shape, dtype = _final_spec(x.shape[0], width, x.dtype, keep_final)
    return y, x.new_empty(shape, dtype=dtype)  # the fake kernel's dtype too


@_permuted_triton_op.register_fake
def _(x, weight, perms, out_features, keep_final):
    torch._check(x.dim() == 2, lambda: f"x must have shape (batch, n_in), got {x.shape}")
    shape, dtype = _final_spec(x.shape[0], weight.shape[1] * weight.shape[2], x.dtype,
                               keep_final)
    return x.new_empty(x.shape[0], out_features), x.new_empty(shape, dtype=dtype)


@torch.library.custom_op("bornsparse::permuted_block_diagonal_triton_backward", mutates_args=())
def _permuted_triton_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                 perms: torch.Tensor, final: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight) of ``permuted_block_diagonal_triton``. With a kept ``final``
    (non-empty) and blocks well conditioned, each factor's input is rebuilt from its output
    through the blocks' inverses (two activations alive at a time); otherwise the forward is
    recomputed from ``x`` and its depth activations are held during this op."""
    _check_op_operands(x, weight, perms, grad_out.shape[1])
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"grad_out must have {x.shape[0]} rows like x, got "
                         f"{tuple(grad_out.shape)}")
    weight, perms = weight.contiguous(), perms.contiguous()
    depth, nb, k, _ = weight.shape
    width = nb * k
    n_in = x.shape[1]
    x_t = transposed(x)
    g = transposed(grad_out)  # (out_features, batch)
    inverse = final.numel() > 0 and (
        inverse_amplification(weight) <= INVERSE_MAX_AMPLIFICATION
    )
    wdtype = work_dtype(x.dtype)
    if inverse:
        # contiguous: linalg.inv may return column-major blocks, the kernel reads row-major;
        # kept in float32 for half weights (rounding the inverse would bias every rebuild)
        inv = torch.linalg.inv(weight.to(torch.float64)).to(wdtype).contiguous()
        z = final.contiguous()
    else:
        inputs = [x_t]
        for t in range(depth - 1):
            inputs.append(apply_factor(inputs[-1], weight[t], perms[t], width, scatter=False))
    grads = []
    for t in reversed(range(depth)):
        if t == 0:
            h = x_t
        elif inverse:
            # the rebuild chain stays in float32 for half inputs: no rounding per factor
            h = z = apply_factor(z, inv[t], perms[t], width, scatter=True, dtype=wdtype)
        else:
            h = inputs.pop()
        grads.append(block_grad(g, h, perms[t], nb, k)[0])
        g = apply_factor(g, weight[t].transpose(1, 2).contiguous(), perms[t],
                         n_in if t == 0 else width, scatter=True)
    return transposed(g), torch.stack(grads[::-1])


@_permuted_triton_backward_op.register_fake
def _(grad_out, x, weight, perms, final):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    x, weight, perms, out_features, keep_final = inputs
    ctx.save_for_backward(x, weight, perms, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the (width, batch) final


def _backward(ctx, grad_out, _grad_final):
    if grad_out is None:  # the product itself was not used
        return (None,) * 5
    x, weight, perms, final = ctx.saved_tensors
    grad_x, grad_w = torch.ops.bornsparse.permuted_block_diagonal_triton_backward(
        grad_out, x, weight, perms, final
    )
    need_x, need_w = ctx.needs_input_grad[:2]
    return (grad_x if need_x else None), (grad_w if need_w else None), None, None, None


_permuted_triton_op.register_autograd(_backward, setup_context=_setup)
_permuted_triton_backward_op.register_autograd(
    no_double_backward("permuted_block_diagonal", "Triton"),
    setup_context=lambda ctx, inputs, output: None,
)


def _keeps_for_backward(*tensors: torch.Tensor) -> bool:
    # whether a backward can follow: grad mode is visible here, not inside the op
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def permuted_block_diagonal_triton(x: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor,
                                   out_features: int) -> torch.Tensor:
    """G x for validated x (..., n_in) through the Triton op; returns (..., out_features)."""
    lead = x.shape[:-1]
    y, _ = torch.ops.bornsparse.permuted_block_diagonal_triton(
        x.reshape(-1, x.shape[-1]), weight, perms, out_features, _keeps_for_backward(x, weight)
    )
    return y.reshape(*lead, out_features)


# ---------------------------------------------------------------------------------------
# The permuted tanh network h_θ: h_{t+1} = tanh(b_t + B_t P_t h_t), no tanh after the last
# factor. Bias and tanh are the factor kernel's epilogue; in backward tanh's derivative is
# applied as the scatter loads the gradient, and the bias gradient comes out of the block
# gradient's pass.

def _check_tanh_operands(x, weight, perms, biases, out_features):
    _check_op_operands(x, weight, perms, out_features)
    width = weight.shape[1] * weight.shape[2]
    if tuple(biases.shape) != (weight.shape[0], width) or biases.dtype != x.dtype or (
        biases.device != x.device
    ):
        raise ValueError(f"biases must have shape (depth, width) = {(weight.shape[0], width)} "
                         f"with x's dtype and device ({x.dtype}, {x.device}), got "
                         f"{biases.dtype} {tuple(biases.shape)} on {biases.device}")


def _acts_shape(batch: int, depth: int, width: int, keep_acts: bool) -> tuple[int, ...]:
    return (depth - 1, width, batch) if keep_acts and depth > 1 else (0,)


def _tanh_forward(x_t, weight, perms, biases, out_features, acts, factors=None):
    """The output (out_features, batch) of the network's first ``factors`` factors (all by
    default) from x_t (n_in, batch); each factor but the last writes its activation
    straight into ``acts[t]`` when ``acts`` (depth − 1, width, batch) is not empty."""
    depth, nb, k, _ = weight.shape
    width = nb * k
    h = x_t
    for t in range(depth if factors is None else factors):
        last = t == depth - 1
        h = apply_factor(h, weight[t], perms[t], out_features if last else width,
                         scatter=False, bias=biases[t], tanh=not last,
                         out=acts[t] if acts.numel() and not last else None)
    return h


@torch.library.custom_op("bornsparse::permuted_tanh_network_triton", mutates_args=())
def _tanh_op(x: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor, biases: torch.Tensor,
             out_features: int, keep_acts: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_θ(x) (batch, out_features), acts) for x (batch, n_in): ``acts`` holds every
    factor's activation but the last's, (depth − 1, width, batch), when ``keep_acts`` (the
    backward reads them), else it is empty (0,)."""
    _check_tanh_operands(x, weight, perms, biases, out_features)
    weight, perms, biases = weight.contiguous(), perms.contiguous(), biases.contiguous()
    depth, nb, k, _ = weight.shape
    acts = x.new_empty(_acts_shape(x.shape[0], depth, nb * k, keep_acts))
    y_t = _tanh_forward(transposed(x), weight, perms, biases, out_features, acts)
    return transposed(y_t), acts


@_tanh_op.register_fake
def _(x, weight, perms, biases, out_features, keep_acts):
    torch._check(x.dim() == 2, lambda: f"x must have shape (batch, n_in), got {x.shape}")
    depth, nb, k, _ = weight.shape
    return (x.new_empty(x.shape[0], out_features),
            x.new_empty(_acts_shape(x.shape[0], depth, nb * k, keep_acts)))


@torch.library.custom_op("bornsparse::permuted_tanh_network_triton_backward", mutates_args=())
def _tanh_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      perms: torch.Tensor, biases: torch.Tensor, acts: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_biases) of ``permuted_tanh_network_triton``; ``acts`` as
    it returned them (recomputed here when empty)."""
    _check_tanh_operands(x, weight, perms, biases, grad_out.shape[1])
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"grad_out must have {x.shape[0]} rows like x, got "
                         f"{tuple(grad_out.shape)}")
    weight, perms, biases = weight.contiguous(), perms.contiguous(), biases.contiguous()
    depth, nb, k, _ = weight.shape
    width = nb * k
    x_t = transposed(x)
    if acts.numel() == 0 and depth > 1:
        acts = x.new_empty(depth - 1, width, x.shape[0])
        _tanh_forward(x_t, weight, perms, biases, width, acts, factors=depth - 1)
    g = transposed(grad_out)  # the gradient of the last factor's output, (out, batch)
    gz = g  # the gradient of factor t's pre-activation (no tanh after the last factor)
    grads_w, grads_b = [], []
    for t in reversed(range(depth)):
        h = x_t if t == 0 else acts[t - 1]
        if t < depth - 1:
            # g is the gradient of tanh's output acts[t]: the scatter multiplies it by
            # 1 − acts[t]² as it loads it and leaves that product in gz
            gz = torch.empty_like(g)
            g = apply_factor(g, weight[t].transpose(1, 2).contiguous(), perms[t],
                             x.shape[1] if t == 0 else width, scatter=True, act=acts[t],
                             gz=gz)
        else:
            g = apply_factor(gz, weight[t].transpose(1, 2).contiguous(), perms[t],
                             x.shape[1] if t == 0 else width, scatter=True)
        grad_w, grad_b = block_grad(gz, h, perms[t], nb, k, bias=True)
        grads_w.append(grad_w)
        grads_b.append(grad_b)
    return transposed(g), torch.stack(grads_w[::-1]), torch.stack(grads_b[::-1])


@_tanh_backward_op.register_fake
def _(grad_out, x, weight, perms, biases, acts):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (x, weight, biases))


def _tanh_setup(ctx, inputs, output):
    x, weight, perms, biases, out_features, keep_acts = inputs
    ctx.save_for_backward(x, weight, perms, biases, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the saved activations


def _tanh_backward(ctx, grad_out, _grad_acts):
    if grad_out is None:  # the network's output itself was not used
        return (None,) * 6
    x, weight, perms, biases, acts = ctx.saved_tensors
    grads = torch.ops.bornsparse.permuted_tanh_network_triton_backward(
        grad_out, x, weight, perms, biases, acts
    )
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
    gx, gw, gb = (gr if n else None for gr, n in zip(grads, need, strict=True))
    return gx, gw, None, gb, None, None


_tanh_op.register_autograd(_tanh_backward, setup_context=_tanh_setup)
_tanh_backward_op.register_autograd(
    no_double_backward("permuted_tanh_network", "Triton"),
    setup_context=lambda ctx, inputs, output: None,
)


def permuted_tanh_network_triton(x: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor,
                                 biases: torch.Tensor, out_features: int) -> torch.Tensor:
    """h_θ(x) for validated x (..., n_in) through the Triton op; returns (..., out_features)."""
    lead = x.shape[:-1]
    y, _ = torch.ops.bornsparse.permuted_tanh_network_triton(
        x.reshape(-1, x.shape[-1]), weight, perms, biases, out_features,
        _keeps_for_backward(x, weight, biases),
    )
    return y.reshape(*lead, out_features)
