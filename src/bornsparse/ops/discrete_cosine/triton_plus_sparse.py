"""The DCT-plus-sparse layer out = α·T(x) + x Sᵀ + bias as one op on the GPU: the sparse
product through the Triton kernels of ``sparse/triton_matmul.py``, the DCT's FFT through torch.fft
(cuFFT), and every other pass of the layer fused into four small Triton kernels around them
(plus_sparse.py has the layer's definition and the plain-PyTorch reference;
transform.py the DCT through one real FFT, whose tables these kernels read).

Forward, for x (batch, n), S (m, n), q = max(n, m):

* ``_reorder_transpose_kernel`` reads x once and writes both the FFT's input
  ``v[s, j] = x[s, reorder[j]]`` (zero past n: the padding to q) and ``x_t = xᵀ`` (n, batch),
  which the sparse kernels read (and the values' gradient later);
* ``spec = rfft(v)``, then ``y_t = S x_t`` (the Triton CSR kernel);
* ``_affine_take_kernel`` writes ``out[s, r] = α·X[s, r] + y_t[r, s] + bias[r]`` where
  ``X[s, r]`` is the twiddled spectrum entry the DCT takes for coefficient r (its real part
  for r ≤ q/2, the imaginary part of entry q − r above), reading α from memory (no host sync).

Backward, for g (batch, m): ``_untake_transpose_kernel`` builds the inverse's spectrum from g
(the adjoint of the take, times the inverse twiddle) and writes ``g_t = gᵀ``; ``irfft``
gives the DCT-III; the Triton CSC kernel gives ``Sᵀ g`` (n, batch); ``_grad_gather_kernel``
writes ``grad_x[s, c] = α·v[s, unorder[c]] + (Sᵀ g)[c, s]`` and the per-program partial sums
of ``Σ v[s, unorder[c]]·x_t[c, s]`` (α's gradient, summed in torch: no atomics). The values'
gradient is the sampled-dot kernel on g_t and x_t; the bias's is ``g.sum(0)``.

The DCT runs in float32 for half-precision inputs (float64 for float64), like the reference
(cuFFT's half-precision transforms take power-of-two lengths only); stores are in x's dtype.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from bornsparse.ops.discrete_cosine import transform as _dct
from bornsparse.ops.runtime.autograd import no_double_backward
from bornsparse.ops.runtime.triton_support import acc_dtype, jit_kernels, work_dtype
from bornsparse.ops.sparse.fake_kernels import sparse_matmul_fake
from bornsparse.ops.sparse.triton_matmul import (
    _check_op_operands,
    compressed_matmul_t,
    sampled_dot_t,
)

BLOCK_S = 32  # samples per program
BLOCK_F = 64  # features (or spectrum entries) per program


def _reorder_transpose_kernel(x_ptr, reorder_ptr, v_ptr, xt_ptr, batch, n, q,
                              BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr):
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    j = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    s_ok = (s < batch)[:, None]
    j_ok = j < q
    col = tl.load(reorder_ptr + j, mask=j_ok, other=0)
    have = s_ok & (j_ok & (col < n))[None, :]
    srow = s[:, None].to(tl.int64)
    val = tl.load(x_ptr + srow * n + col[None, :], mask=have, other=0)
    tl.store(v_ptr + srow * q + j[None, :], val.to(v_ptr.dtype.element_ty),
             mask=s_ok & j_ok[None, :])
    # reorder is a permutation of range(q): each column c < n is written exactly once
    tl.store(xt_ptr + col[None, :].to(tl.int64) * batch + s[:, None], val, mask=have)


def _affine_take_kernel(spec_ptr, w_ptr, yt_ptr, bias_ptr, alpha_ptr, out_ptr, batch, m, q,
                        half, BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_F: tl.constexpr):
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    r = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    r_ok = r < m
    ok = (s < batch)[:, None] & r_ok[None, :]
    low = r < half
    k = tl.where(low, r, q - r)  # the spectrum entry coefficient r comes from
    srow = s[:, None].to(tl.int64)
    at = srow * (2 * half) + 2 * k[None, :]  # spec viewed as (batch, half, 2) reals
    sr = tl.load(spec_ptr + at, mask=ok, other=0).to(ACC)
    si = tl.load(spec_ptr + at + 1, mask=ok, other=0).to(ACC)
    wr = tl.load(w_ptr + 2 * k, mask=r_ok, other=0).to(ACC)[None, :]
    wi = tl.load(w_ptr + 2 * k + 1, mask=r_ok, other=0).to(ACC)[None, :]
    # z = conj(spec · w): Re z = sr·wr − si·wi, Im z = −(sr·wi + si·wr)
    val = tl.where(low[None, :], sr * wr - si * wi, -(sr * wi + si * wr))
    alpha = tl.load(alpha_ptr).to(ACC)
    y = tl.load(yt_ptr + r[None, :].to(tl.int64) * batch + s[:, None], mask=ok,
                other=0).to(ACC)
    res = alpha * val + y
    if BIAS:
        res += tl.load(bias_ptr + r, mask=r_ok, other=0).to(ACC)[None, :]
    tl.store(out_ptr + srow * m + r[None, :], res.to(out_ptr.dtype.element_ty), mask=ok)


def _untake_transpose_kernel(g_ptr, winv_ptr, z_ptr, gt_ptr, batch, m, q, half,
                             WRITE_GT: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr):
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    j = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    s_ok = (s < batch)[:, None]
    j_ok = j < half
    srow = s[:, None].to(tl.int64)
    # z_j = (c_j − i·c_{q−j}) / w_j with c the coefficients (g, zero past m); j = 0 has no
    # imaginary part (transform.py's "put" and "sign" tables)
    re_ok = s_ok & (j_ok & (j < m))[None, :]
    jj = q - j
    im_ok = s_ok & (j_ok & (j > 0) & (jj < m))[None, :]
    re = tl.load(g_ptr + srow * m + j[None, :], mask=re_ok, other=0)
    im = tl.load(g_ptr + srow * m + jj[None, :], mask=im_ok, other=0)
    wr = tl.load(winv_ptr + 2 * j, mask=j_ok, other=0).to(ACC)[None, :]
    wi = tl.load(winv_ptr + 2 * j + 1, mask=j_ok, other=0).to(ACC)[None, :]
    a, b = re.to(ACC), -im.to(ACC)
    at = srow * (2 * half) + 2 * j[None, :]
    ok = s_ok & j_ok[None, :]
    tl.store(z_ptr + at, (a * wr - b * wi).to(z_ptr.dtype.element_ty), mask=ok)
    tl.store(z_ptr + at + 1, (a * wi + b * wr).to(z_ptr.dtype.element_ty), mask=ok)
    if WRITE_GT:
        # rows j < half and q − j (j ≥ 1) cover every r < m; q/2 (even q) is written twice,
        # with the same value
        tl.store(gt_ptr + j[None, :].to(tl.int64) * batch + s[:, None], re, mask=re_ok)
        tl.store(gt_ptr + jj[None, :].to(tl.int64) * batch + s[:, None], im, mask=im_ok)


def _grad_gather_kernel(v_ptr, unorder_ptr, gst_ptr, xt_ptr, alpha_ptr, gx_ptr, partial_ptr,
                        batch, n, q, NEED_X: tl.constexpr, NEED_ALPHA: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr):
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    c_ok = c < n
    ok = (s < batch)[:, None] & c_ok[None, :]
    srow = s[:, None].to(tl.int64)
    src = tl.load(unorder_ptr + c, mask=c_ok, other=0)
    u = tl.load(v_ptr + srow * q + src[None, :], mask=ok, other=0).to(ACC)  # (Tᵀ g)[s, c]
    t_at = c[None, :].to(tl.int64) * batch + s[:, None]
    if NEED_X:
        alpha = tl.load(alpha_ptr).to(ACC)
        gs = tl.load(gst_ptr + t_at, mask=ok, other=0).to(ACC)
        tl.store(gx_ptr + srow * n + c[None, :], (alpha * u + gs).to(gx_ptr.dtype.element_ty),
                 mask=ok)
    if NEED_ALPHA:
        xv = tl.load(xt_ptr + t_at, mask=ok, other=0).to(ACC)
        pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(partial_ptr + pid, tl.sum(tl.sum(u * xv, axis=1), axis=0))


def kernels() -> SimpleNamespace:
    """The kernels, wrapped for the current TRITON_INTERPRET setting."""
    return jit_kernels(reorder_transpose=_reorder_transpose_kernel,
                       affine_take=_affine_take_kernel,
                       untake_transpose=_untake_transpose_kernel,
                       grad_gather=_grad_gather_kernel)


def _grid(batch: int, features: int) -> tuple[int, int]:
    return (triton.cdiv(batch, BLOCK_S), triton.cdiv(features, BLOCK_F))


def _check_layer_operands(x, alpha, values, bias, plan) -> tuple[int, int]:
    shape = _check_op_operands(x, values, plan)
    if alpha.numel() != 1 or alpha.dtype != x.dtype or alpha.device != x.device:
        raise ValueError(f"alpha must hold one number with x's dtype and device ({x.dtype}, "
                         f"{x.device}), got {alpha.dtype} {tuple(alpha.shape)} on "
                         f"{alpha.device}")
    if bias is not None and (tuple(bias.shape) != (shape[0],) or bias.dtype != x.dtype
                             or bias.device != x.device):
        raise ValueError(f"bias must have shape ({shape[0]},) with x's dtype and device, got "
                         f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")
    return shape


@torch.library.custom_op("bornsparse::dct_sparse_affine_triton", mutates_args=())
def _dct_sparse_triton_op(
    x: torch.Tensor, alpha: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
    rows: torch.Tensor, cols: torch.Tensor, rowptr: torch.Tensor, colptr: torch.Tensor,
    csc_perm: torch.Tensor, csc_rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(α·T(x) + x Sᵀ + bias (batch, m), x_t (n, batch)) for x (batch, n); x_t is what the
    values' gradient reads."""
    plan = (rows, cols, rowptr, colptr, csc_perm, csc_rows)
    m, n = _check_layer_operands(x, alpha, values, bias, plan)
    x = x.contiguous()
    batch = x.shape[0]
    q = max(n, m)
    wdtype = work_dtype(x.dtype)
    t = _dct.dct_tables(q, wdtype, x.device)
    out = x.new_empty(batch, m)
    x_t = x.new_empty(n, batch)
    if batch == 0:  # cuFFT and MKL reject an empty batch
        return out, x_t
    k = kernels()
    v = x.new_empty(batch, q, dtype=wdtype)
    k.reorder_transpose[_grid(batch, q)](x, t["reorder"], v, x_t, batch, n, q,
                                         BLOCK_S=BLOCK_S, BLOCK_F=BLOCK_F)
    spec = torch.view_as_real(torch.fft.rfft(v, dim=-1))  # (batch, q // 2 + 1, 2)
    del v
    y_t = compressed_matmul_t(rowptr, cols, values.contiguous(), x_t, m)
    k.affine_take[_grid(batch, m)](
        spec, t["w_real"], y_t, x if bias is None else bias, alpha, out, batch, m, q,
        q // 2 + 1, BIAS=bias is not None, ACC=acc_dtype(x), BLOCK_S=BLOCK_S, BLOCK_F=BLOCK_F,
    )
    return out, x_t


@_dct_sparse_triton_op.register_fake
def _(x, alpha, values, bias, *plan):
    return sparse_matmul_fake(x, values, *plan)  # the same outputs: y and the saved x_t


@torch.library.custom_op("bornsparse::dct_sparse_affine_triton_backward", mutates_args=())
def _dct_sparse_triton_backward_op(
    g: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, values: torch.Tensor,
    rows: torch.Tensor, cols: torch.Tensor, rowptr: torch.Tensor, colptr: torch.Tensor,
    csc_perm: torch.Tensor, csc_rows: torch.Tensor, need_x: bool, need_alpha: bool,
    need_values: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_alpha, grad_values, grad_bias) of ``dct_sparse_affine_triton``; a
    gradient not asked for is an empty tensor."""
    plan = (rows, cols, rowptr, colptr, csc_perm, csc_rows)
    m, n = _check_layer_operands(x_t.t(), alpha, values, None, plan)
    batch = x_t.shape[1]
    if tuple(g.shape) != (batch, m):
        raise ValueError(f"g must have shape {(batch, m)}, got {tuple(g.shape)}")
    g, x_t = g.contiguous(), x_t.contiguous()
    q = max(n, m)
    half = q // 2 + 1
    wdtype = work_dtype(g.dtype)
    empty = g.new_empty(0)
    # outputs never share storage (custom ops may not return aliases): fresh empties each
    grad_x = g.new_empty(batch, n) if need_x else g.new_empty(0)
    grad_alpha = alpha.new_zeros(alpha.shape) if need_alpha else g.new_empty(0)
    grad_v = values.new_zeros(values.shape) if need_values else g.new_empty(0)
    grad_b = g.sum(0) if need_bias else g.new_empty(0)
    if batch == 0:
        return grad_x, grad_alpha, grad_v, grad_b
    k = kernels()
    acc = acc_dtype(g)
    g_t = g.new_empty(m, batch) if need_x or need_values else empty
    if need_x or need_alpha:
        t = _dct.dct_tables(q, wdtype, g.device)
        z = g.new_empty(batch, half, 2, dtype=wdtype)
        k.untake_transpose[_grid(batch, half)](
            g, torch.view_as_real(t["w_inv"]), z, g_t if g_t.numel() else g, batch, m, q,
            half, WRITE_GT=g_t.numel() > 0, ACC=acc, BLOCK_S=BLOCK_S, BLOCK_F=BLOCK_F,
        )
        v = torch.fft.irfft(torch.view_as_complex(z), n=q, dim=-1)  # (batch, q)
        del z
        gs_t = empty
        if need_x:
            vals_csc = values.detach()[csc_perm].contiguous()
            gs_t = compressed_matmul_t(colptr, csc_rows, vals_csc, g_t, n)
        grid = _grid(batch, n)
        partial = torch.empty(grid[0] * grid[1] if need_alpha else 0, dtype=wdtype,
                              device=g.device)
        k.grad_gather[grid](
            v, t["unorder"], gs_t if need_x else v, x_t, alpha, grad_x if need_x else v,
            partial if need_alpha else v, batch, n, q, NEED_X=need_x, NEED_ALPHA=need_alpha,
            ACC=acc, BLOCK_S=BLOCK_S, BLOCK_F=BLOCK_F,
        )
        if need_alpha:
            grad_alpha = partial.sum().to(alpha.dtype).reshape(alpha.shape)
    elif need_values:
        g_t = g.t().contiguous()
    if need_values:
        grad_v = sampled_dot_t(rows, cols, g_t, x_t)
    return grad_x, grad_alpha, grad_v, grad_b


@_dct_sparse_triton_backward_op.register_fake
def _(g, x_t, alpha, values, rows, cols, rowptr, colptr, csc_perm, csc_rows, need_x,
      need_alpha, need_values, need_bias):
    def maybe(flag, like, shape):
        return like.new_empty(shape) if flag else like.new_empty(0)

    return (maybe(need_x, g, (x_t.shape[1], x_t.shape[0])), maybe(need_alpha, alpha, alpha.shape),
            maybe(need_values, values, values.shape), maybe(need_bias, g, (g.shape[1],)))


def _setup(ctx, inputs, output):
    x, alpha, values, bias, *plan = inputs
    ctx.save_for_backward(output[1], alpha, values, *plan)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the saved x_t


def _backward(ctx, grad_out, _grad_x_t):
    x_t, alpha, values, *plan = ctx.saved_tensors
    if grad_out is None:  # the layer's output itself was not used
        return (None,) * (4 + len(plan))
    need = ctx.needs_input_grad[:4]
    grads = torch.ops.bornsparse.dct_sparse_affine_triton_backward(
        grad_out, x_t, alpha, values, *plan, *need
    )
    return (*(gr if nd else None for gr, nd in zip(grads, need, strict=True)),
            *([None] * len(plan)))


_dct_sparse_triton_op.register_autograd(_backward, setup_context=_setup)
_dct_sparse_triton_backward_op.register_autograd(
    no_double_backward("dct_sparse_affine", "Triton"),
    setup_context=lambda ctx, inputs, output: None,
)
