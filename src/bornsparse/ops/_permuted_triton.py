"""Triton kernels of the permuted block-diagonal product (ops/permuted.py has the layout).

Imported only by the "triton" backend (ops/backends.py), so ``import bornsparse`` never loads
triton. Two kernels, both for any block size k (unrolled k² times, so meant for small k):

* ``_factor_kernel`` applies one factor to a (batch, width) row-major activation, in one of
  two modes. Gather: ``dst[n, b·k + i] = Σ_j M[b, i, j] · src[n, perm[b·k + j]]`` (the
  forward, M = B). Scatter: ``dst[n, perm[b·k + i]] = Σ_j M[b, i, j] · src[n, b·k + j]``
  (the input gradient with M = Bᵀ, and the rebuild of a factor's input from its output with
  M = B⁻¹). A program owns a tile of BLOCK_N samples × BLOCK_B blocks; a permutation never
  maps two entries to one, so the scatter needs no atomics. One launch per factor: a factor's
  gather may read any column of the previous factor's output, so a tile cannot stay on chip
  from one factor to the next (that would need the cycle structure the CPU kernels walk).
* ``_block_grad_kernel`` writes ``partial[s, b, i, j] = Σ_n g[n, b·k + i] · h[n, perm[b·k + j]]``
  over the samples of split s (samples s·BLOCK_N, (s + SPLIT)·BLOCK_N, ...); the splits are
  summed in torch afterwards, so the block gradient needs no atomics and is deterministic.

Loads and products run in float32 (float64 for float64 tensors), stores in the tensor's
dtype. Backward keeps memory flat in depth where the blocks are well conditioned: from the
final activation it rebuilds every factor's input through the blocks' inverses (the guard of
the CPU cycle walk, ``INVERSE_MAX_AMPLIFICATION``); otherwise it recomputes the activations
from ``x`` and holds all depth of them during the backward op.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from bornsparse.ops._permuted_operands import (
    INVERSE_MAX_AMPLIFICATION,
    check_operands,
    check_permutations,
)
from bornsparse.ops._validated import check_once
from bornsparse.ops.backends import suits_triton

BLOCK_N = 32  # samples per program
BLOCK_B = 32  # blocks per program
MAX_SPLITS = 64  # batch splits of the block gradient: parallelism without atomics
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _factor_kernel(src_ptr, m_ptr, perm_ptr, dst_ptr, batch, src_cols, dst_cols, nb,
                   K: tl.constexpr, SCATTER: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    n_ok = n < batch
    b_ok = b < nb
    # int64 row offsets: batch · width may pass 2³¹ on a GPU
    src_row = n[:, None].to(tl.int64) * src_cols
    dst_row = n[:, None].to(tl.int64) * dst_cols
    for i in tl.static_range(K):
        acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=ACC)
        for j in tl.static_range(K):
            m = tl.load(m_ptr + (b * K + i) * K + j, mask=b_ok, other=0).to(ACC)
            if SCATTER:
                col = b * K + j
            else:
                col = tl.load(perm_ptr + b * K + j, mask=b_ok, other=0)
            # columns past src_cols are the implicit zero padding (x narrower than width,
            # a gradient narrower than width when out_features < width)
            ok = n_ok[:, None] & (b_ok & (col < src_cols))[None, :]
            v = tl.load(src_ptr + src_row + col[None, :], mask=ok, other=0).to(ACC)
            acc += m[None, :] * v
        if SCATTER:
            out = tl.load(perm_ptr + b * K + i, mask=b_ok, other=0)
        else:
            out = b * K + i
        ok = n_ok[:, None] & (b_ok & (out < dst_cols))[None, :]
        tl.store(dst_ptr + dst_row + out[None, :], acc.to(dst_ptr.dtype.element_ty), mask=ok)


def _block_grad_kernel(g_ptr, h_ptr, perm_ptr, partial_ptr, batch, g_cols, h_cols, nb,
                       K: tl.constexpr, ACC: tl.constexpr, SPLIT: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    s = tl.program_id(1)
    b_ok = b < nb
    for i in tl.static_range(K):
        gcol = b * K + i
        g_ok = b_ok & (gcol < g_cols)
        for j in tl.static_range(K):
            hcol = tl.load(perm_ptr + b * K + j, mask=b_ok, other=0)
            h_ok = b_ok & (hcol < h_cols)
            acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=ACC)
            for n0 in range(s * BLOCK_N, batch, SPLIT * BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                row = n[:, None].to(tl.int64)
                n_ok = (n < batch)[:, None]
                g = tl.load(g_ptr + row * g_cols + gcol[None, :], mask=n_ok & g_ok[None, :],
                            other=0).to(ACC)
                h = tl.load(h_ptr + row * h_cols + hcol[None, :], mask=n_ok & h_ok[None, :],
                            other=0).to(ACC)
                acc += g * h
            dst = partial_ptr + ((s * nb + b) * K + i) * K + j
            tl.store(dst, tl.sum(acc, axis=0).to(partial_ptr.dtype.element_ty), mask=b_ok)


@functools.cache
def _jitted(interpret: bool) -> SimpleNamespace:
    # triton.jit picks the interpreter or the compiler when it wraps a function, from
    # TRITON_INTERPRET at that moment; wrapping here, per setting, lets tests switch the
    # interpreter on after this module was imported
    return SimpleNamespace(factor=triton.jit(_factor_kernel),
                           block_grad=triton.jit(_block_grad_kernel))


def kernels() -> SimpleNamespace:
    """The kernels, wrapped for the current TRITON_INTERPRET setting."""
    return _jitted(bool(triton.knobs.runtime.interpret))


def acc_dtype(t: torch.Tensor):
    """The accumulation dtype for ``t``: float64 for float64, float32 otherwise."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def check_triton_tensor(name: str, t: torch.Tensor) -> None:
    """Raise unless ``t`` suits the Triton kernels (device, dtype)."""
    if not suits_triton(t) or t.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"{name} must be a float16/bfloat16/float32/float64 CUDA tensor (or CPU with "
            f"TRITON_INTERPRET=1), got {t.dtype} on {t.device}"
        )


def apply_factor(src: torch.Tensor, m: torch.Tensor, perm: torch.Tensor, dst_cols: int,
                 scatter: bool) -> torch.Tensor:
    """One factor (module docstring) of src (batch, src_cols <= width), m (nb, k, k) and
    perm (width,); returns (batch, dst_cols), columns past src_cols read as zeros."""
    nb, k, _ = m.shape
    batch = src.shape[0]
    # a permutation hits every column once, so the scatter writes all of dst too
    dst = src.new_empty(batch, dst_cols)
    if batch:
        grid = (triton.cdiv(batch, BLOCK_N), triton.cdiv(nb, BLOCK_B))
        kernels().factor[grid](src, m, perm, dst, batch, src.shape[1], dst_cols, nb,
                               K=k, SCATTER=scatter, ACC=acc_dtype(src), BLOCK_N=BLOCK_N,
                               BLOCK_B=BLOCK_B)
    return dst


def block_grad(g: torch.Tensor, h: torch.Tensor, perm: torch.Tensor, nb: int, k: int
               ) -> torch.Tensor:
    """(nb, k, k) gradient of one factor's blocks: g (batch, ≤ width) the gradient of its
    output, h (batch, ≤ width) its input (missing columns are zeros)."""
    batch = g.shape[0]
    splits = max(1, min(MAX_SPLITS, triton.cdiv(batch, BLOCK_N)))
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    partial = torch.empty(splits, nb, k, k, dtype=dtype, device=g.device)
    if not batch:
        return partial.zero_().sum(0).to(g.dtype)
    grid = (triton.cdiv(nb, BLOCK_B), splits)
    kernels().block_grad[grid](g, h, perm, partial, batch, g.shape[1], h.shape[1], nb, K=k,
                               ACC=acc_dtype(g), SPLIT=splits, BLOCK_N=BLOCK_N,
                               BLOCK_B=BLOCK_B)
    return partial.sum(0).to(g.dtype)


def inverse_amplification(weight: torch.Tensor) -> float:
    """Product over factors of the largest block condition number of ``weight``
    (depth, nb, k, k), inf for a singular or non-finite block: the CPU cycle walk's bound
    (``_permuted_cycles.worst_amplification``) for any k, on the weight's device."""
    w = weight.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        return float("inf")
    s = torch.linalg.svdvals(w)  # (depth, nb, k), descending
    cond = (s[..., 0] / s[..., -1]).amax(dim=1)  # a zero singular value gives inf
    return float(cond.prod())


def _check_op_operands(x, weight, perms, out_features):

    check_operands(x, weight, perms, out_features, "triton")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (batch, n_in), got {tuple(x.shape)}")
    check_triton_tensor("x", x)
    check_once("permutations", (perms,), lambda: check_permutations(perms))


def _final_shape(batch: int, width: int, keep_final: bool) -> tuple[int, ...]:
    return (batch, width) if keep_final else (0,)


@torch.library.custom_op("bornsparse::permuted_block_diagonal_triton", mutates_args=())
def _permuted_triton_op(x: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor,
                        out_features: int, keep_final: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(G x (batch, out_features), final) for x (batch, n_in): ``final`` is the last
    factor's full (batch, width) output when ``keep_final`` (backward rebuilds the
    activations from it), else empty (0,)."""
    _check_op_operands(x, weight, perms, out_features)
    x, weight, perms = x.contiguous(), weight.contiguous(), perms.contiguous()
    depth, nb, k, _ = weight.shape
    width = nb * k
    h = x
    for t in range(depth):
        last = t == depth - 1
        h = apply_factor(h, weight[t], perms[t], width if keep_final or not last
                         else out_features, scatter=False)
    if keep_final:
        return h[:, :out_features].clone(), h
    return h, x.new_empty(0)


@_permuted_triton_op.register_fake
def _(x, weight, perms, out_features, keep_final):
    torch._check(x.dim() == 2, lambda: f"x must have shape (batch, n_in), got {x.shape}")
    width = weight.shape[1] * weight.shape[2]
    return (x.new_empty(x.shape[0], out_features),
            x.new_empty(_final_shape(x.shape[0], width, keep_final)))


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
    x, weight, perms = x.contiguous(), weight.contiguous(), perms.contiguous()
    g = grad_out.contiguous()
    depth, nb, k, _ = weight.shape
    width = nb * k
    n_in = x.shape[1]
    inverse = final.numel() > 0 and (
        inverse_amplification(weight) <= INVERSE_MAX_AMPLIFICATION
    )
    if inverse:
        # contiguous: linalg.inv may return column-major blocks, the kernel reads row-major
        inv = torch.linalg.inv(weight.to(torch.float64)).to(weight.dtype).contiguous()
        z = final
    else:
        inputs = [x]
        for t in range(depth - 1):
            inputs.append(apply_factor(inputs[-1], weight[t], perms[t], width, scatter=False))
    grads = []
    for t in reversed(range(depth)):
        if t == 0:
            h = x
        elif inverse:
            h = apply_factor(z, inv[t], perms[t], width, scatter=True)
            z = h
        else:
            h = inputs.pop()
        grads.append(block_grad(g, h, perms[t], nb, k))
        g = apply_factor(g, weight[t].transpose(1, 2).contiguous(), perms[t],
                         n_in if t == 0 else width, scatter=True)
    return g, torch.stack(grads[::-1])


@_permuted_triton_backward_op.register_fake
def _(grad_out, x, weight, perms, final):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    x, weight, perms, out_features, keep_final = inputs
    ctx.save_for_backward(x, weight, perms, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the (batch, width) final


def _backward(ctx, grad_out, _grad_final):
    if grad_out is None:  # the product itself was not used
        return (None,) * 5
    x, weight, perms, final = ctx.saved_tensors
    grad_x, grad_w = torch.ops.bornsparse.permuted_block_diagonal_triton_backward(
        grad_out, x, weight, perms, final
    )
    need_x, need_w = ctx.needs_input_grad[:2]
    return (grad_x if need_x else None), (grad_w if need_w else None), None, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError("double backward through the Triton kernel of permuted_block_diagonal "
                       "is not supported; use backend='reference' (gradients of any order)")


_permuted_triton_op.register_autograd(_backward, setup_context=_setup)
_permuted_triton_backward_op.register_autograd(
    _no_double_backward, setup_context=lambda ctx, inputs, output: None
)


def permuted_block_diagonal_triton(x: torch.Tensor, weight: torch.Tensor, perms: torch.Tensor,
                                   out_features: int) -> torch.Tensor:
    """G x for validated x (..., n_in) through the Triton op; returns (..., out_features)."""
    lead = x.shape[:-1]
    # the final activation is kept only where a backward can follow (grad mode is visible
    # here, not inside the op)
    keep_final = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    y, _ = torch.ops.bornsparse.permuted_block_diagonal_triton(
        x.reshape(-1, x.shape[-1]), weight, perms, out_features, keep_final
    )
    return y.reshape(*lead, out_features)
