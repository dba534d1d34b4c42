"""Orthonormal DCT-II and its inverse through torch.fft, O(q log q), differentiable.

Both use Makhoul's (1980) reordering: the DCT-II of ``x`` of length N is the real FFT of
``v = (x[0], x[2], ..., x[3], x[1])`` (even entries, then odd entries reversed) followed by
a twiddle ``exp(-iπk/2N)``. One real FFT of length N, no padding to 2N and no dense matrix.
The reorderings are single gathers with cached index tables (a flip of the FFT's strided
imaginary part measured 7x slower than the FFT itself); on CPU a numba kernel fuses the
twiddle with the output gather (ops/_dct_numba.py), the torch version being its reference.
``scipy.fft.dct(x, norm="ortho")`` is the reference in the tests. The transform is
orthogonal, so the backward of dct is idct and vice versa: gradients are O(q log q) too.
"""

from __future__ import annotations

import functools
import math

import torch

from bornsparse._checks import check_float_tensor, check_positive_int
from bornsparse.ops.sparse_product import (
    _PARALLEL_MIN_WORK,
    SparsePlan,
    _numba_spmm_t,
    sparse_matmul,
    sparse_matmul_reference,
)

# torch.fft has no half-precision CPU kernels; compute those in float32 and cast back
_COMPUTE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _check_dim(x: torch.Tensor, dim: object) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {dim!r}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must lie in [{-x.dim()}, {x.dim() - 1}] for x of shape "
                         f"{tuple(x.shape)}, got {dim}")
    return dim % x.dim()


@functools.lru_cache(maxsize=64)
def _tables(n: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Gather indices, signs and twiddles for length n (O(n) each, cached per call site).

    Forward: v = x[reorder]; z = conj(rfft(v))·conj(w) with w_k = 2 f_k exp(-iπk/2N), so
    Re z_k = X[k] and Im z_k = -Im(rfft(v)_k w_k) = X[N-k] (Hermitian symmetry); X is then
    one gather from the interleaved (re, im) buffer of z.
    Inverse: z_j = c_j - i c_{N-j} (c_N = 0) gathered with signs, v = irfft(z / w), and
    x = v[unorder].
    """
    half = n // 2 + 1
    reorder = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2).flip(0)])
    unorder = torch.empty(n, dtype=torch.long)
    unorder[reorder] = torch.arange(n)
    k = torch.arange(half, dtype=torch.float64)
    scale = torch.full_like(k, math.sqrt(2.0 / n))
    scale[0] = math.sqrt(1.0 / n)
    w = torch.polar(scale, -math.pi * k / (2 * n))
    # out[k] = re(z_k) for k <= N/2, im(z_{N-k}) for k > N/2, in the (half, 2) buffer
    kk = torch.arange(n)
    take = torch.where(kk < half, 2 * kk, 2 * (n - kk) + 1)
    # inverse: (re, im) of z_j = (c_j, -c_{N-j}); j = 0 has no imaginary part (sign 0)
    j = torch.arange(half)
    put = torch.stack([j, torch.where(j > 0, n - j, 0)], dim=-1).reshape(-1)
    sign = torch.stack([torch.ones(half), torch.where(j > 0, -1.0, 0.0)], dim=-1).reshape(-1)
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return {
        "reorder": reorder.to(device),
        "unorder": unorder.to(device),
        "take": take.to(device),
        "put": put.to(device),
        "sign": sign.to(device=device, dtype=dtype),
        "w_conj": w.conj().to(device=device, dtype=cdtype),
        "w_real": torch.view_as_real(w).to(device=device, dtype=dtype).contiguous(),
        "w_inv": (1.0 / w).to(device=device, dtype=cdtype),
    }


# below this many entries the plain-torch twiddle wins (no thread-pool wake-up)
_NUMBA_MIN_SIZE = 1 << 15


def _use_numba(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        and x.numel() >= _NUMBA_MIN_SIZE
    )


def _dct_last(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last dim; float32/float64, any device, no autograd."""
    n = x.shape[-1]
    if x.numel() == 0:  # MKL's FFT rejects an empty batch
        return torch.empty_like(x)
    t = _tables(n, x.dtype, x.device)
    v = x.index_select(-1, t["reorder"])
    spec = torch.fft.rfft(v, dim=-1)  # (..., n//2 + 1)
    if _use_numba(x):
        from bornsparse.ops._dct_numba import _twiddle_take_kernel

        out = torch.empty_like(x)
        _twiddle_take_kernel(
            torch.view_as_real(spec).reshape(-1, n // 2 + 1, 2).numpy(),
            t["w_real"].numpy(), out.view(-1, n).numpy(),
        )
        return out
    return _dct_twiddle_reference(spec, t)


def _dct_twiddle_reference(spec: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    z = torch.conj(spec) * t["w_conj"]
    return torch.view_as_real(z).flatten(-2).index_select(-1, t["take"])


def _idct_last(c: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-III (inverse of _dct_last) along the last dim."""
    n = c.shape[-1]
    if c.numel() == 0:
        return torch.empty_like(c)
    t = _tables(n, c.dtype, c.device)
    if _use_numba(c):
        from bornsparse.ops._dct_numba import _untake_twiddle_kernel

        cdtype = torch.complex128 if c.dtype == torch.float64 else torch.complex64
        z = torch.empty(*c.shape[:-1], n // 2 + 1, dtype=cdtype)
        _untake_twiddle_kernel(
            c.reshape(-1, n).numpy(), torch.view_as_real(t["w_inv"]).numpy(),
            torch.view_as_real(z).reshape(-1, n // 2 + 1, 2).numpy(),
        )
    else:
        z = _idct_twiddle_reference(c, t)
    return torch.fft.irfft(z, n=n, dim=-1).index_select(-1, t["unorder"])


def _idct_twiddle_reference(c: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    zr = c.index_select(-1, t["put"]) * t["sign"]  # (..., 2·(n//2 + 1)) interleaved re, im
    return torch.view_as_complex(zr.unflatten(-1, (-1, 2))) * t["w_inv"]


class _DCTFn(torch.autograd.Function):
    """The orthonormal DCT is orthogonal, so its backward is the inverse transform."""

    @staticmethod
    def forward(ctx, x, inverse):
        ctx.inverse = inverse
        return _idct_last(x) if inverse else _dct_last(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        return (_dct_last(g) if ctx.inverse else _idct_last(g)), None


def _apply(x: torch.Tensor, dim: object, inverse: bool) -> torch.Tensor:
    check_float_tensor("x", x)
    d = _check_dim(x, dim)
    orig = x.dtype
    y = x.movedim(d, -1).to(_COMPUTE.get(orig, orig)).contiguous()
    return _DCTFn.apply(y, inverse).to(orig).movedim(-1, d)


def dct(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal DCT-II of ``x`` along ``dim`` (scipy.fft.dct(x, norm="ortho")).

    ``X[k] = f_k · 2 Σ_n x[n] cos(πk(2n+1)/2N)`` with ``f_0 = √(1/4N)``, ``f_k = √(1/2N)``.
    Any length N >= 1, any real floating dtype, same shape and dtype as ``x``.
    Differentiable; the backward pass is :func:`idct` (the transform is orthogonal).
    """
    return _apply(x, dim, inverse=False)


def idct(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`dct` (the orthonormal DCT-III, scipy.fft.idct(x, norm="ortho"))."""
    return _apply(x, dim, inverse=True)


def dct_matrix(
    rows: int,
    cols: int,
    *,
    length: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``scipy.fft.dct(eye(q), norm="ortho")[:rows, :cols]`` in closed form, q = ``length``.

    ``length`` defaults to max(rows, cols). Entry (n, k) is ``f_k · 2 cos(πk(2n+1)/2q)``;
    ``x @ dct_matrix(...)`` is the first ``cols`` DCT-II coefficients of ``x`` zero-padded to q.
    Costs O(rows·cols), no FFT; meant for ``to_dense()``, conv kernels and tests.
    """
    rows = check_positive_int("rows", rows)
    cols = check_positive_int("cols", cols)
    q = max(rows, cols) if length is None else check_positive_int("length", length)
    if q < max(rows, cols):
        raise ValueError(f"length must be at least max(rows, cols) = {max(rows, cols)}, got {q}")
    dtype = dtype or torch.get_default_dtype()
    work = torch.float64 if dtype == torch.float64 else torch.float32
    n = torch.arange(rows, dtype=torch.int64, device=device)
    k = torch.arange(cols, dtype=torch.int64, device=device)
    # reducing k(2n+1) modulo the period 4q in integers keeps the angle below 2π, so even
    # a float32 cosine is accurate to a few ulps (conv layers rebuild this every forward)
    phase = torch.outer(2 * n + 1, k) % (4 * q)
    m = torch.cos(phase.to(work) * (math.pi / (2 * q)))
    scale = torch.full((cols,), math.sqrt(2.0 / q), dtype=work, device=device)
    scale[0] = math.sqrt(1.0 / q)
    return (m * scale).to(dtype)


def dct_project_affine_reference(
    x: torch.Tensor,
    out_features: int,
    alpha: torch.Tensor,
    y: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y + α·T(x) + bias in plain torch; T(x) = dct(x zero-padded to q)[..., :out_features]."""
    n = x.shape[-1]
    q = max(n, out_features)
    xp = torch.nn.functional.pad(x, (0, q - n)) if q > n else x
    out = dct(xp)[..., :out_features] * alpha
    if y is not None:
        out = out + y
    return out if bias is None else out + bias


class _DCTAffineFn(torch.autograd.Function):
    """CPU float32/64 fused y + α·T(x) + bias; backward via u = Tᵀ(grad) (see kernels)."""

    @staticmethod
    def forward(ctx, x, alpha, y, bias, m):
        from bornsparse.ops import _dct_numba as k

        b, n = x.shape
        q = max(n, m)
        xp = torch.nn.functional.pad(x.detach(), (0, q - n)) if q > n else x.detach()
        t = _tables(q, x.dtype, x.device)
        spec = torch.fft.rfft(xp.index_select(-1, t["reorder"]), dim=-1)
        out = torch.empty(b, m, dtype=x.dtype)
        yy = y.detach().contiguous() if y is not None else x.new_zeros(b, m)
        bb = bias.detach().contiguous() if bias is not None else x.new_empty(0)
        k._affine_take_kernel(
            torch.view_as_real(spec).numpy(), t["w_real"].numpy(), q, float(alpha),
            yy.numpy(), bb.numpy(), out.numpy(),
        )
        ctx.save_for_backward(x)
        ctx.alpha, ctx.m, ctx.alpha_shape = float(alpha), m, alpha.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        from bornsparse.ops import _dct_numba as k

        (x,) = ctx.saved_tensors
        g = g.contiguous()
        b, n = x.shape
        q = max(n, ctx.m)
        grad_x = grad_alpha = grad_y = grad_bias = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            t = _tables(q, x.dtype, x.device)
            cdtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
            spec = torch.empty(b, q // 2 + 1, dtype=cdtype)
            k._padded_untake_kernel(
                g.numpy(), q, torch.view_as_real(t["w_inv"]).numpy(),
                torch.view_as_real(spec).numpy(),
            )
            v = torch.fft.irfft(spec, n=q, dim=-1)
            gx = torch.empty(b, n, dtype=x.dtype)
            dots = torch.zeros(b, dtype=x.dtype)
            k._gather_scale_dot_kernel(
                v.numpy(), t["unorder"].numpy(), x.detach().contiguous().numpy(), ctx.alpha,
                gx.numpy(), dots.numpy(),
            )
            grad_x = gx if ctx.needs_input_grad[0] else None
            grad_alpha = dots.sum().reshape(ctx.alpha_shape) if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[2]:
            grad_y = g
        if ctx.needs_input_grad[3]:
            grad_bias = g.sum(0)
        return grad_x, grad_alpha, grad_y, grad_bias, None


def dct_project_affine(
    x: torch.Tensor,
    out_features: int,
    alpha: torch.Tensor,
    y: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y + α·T(x) + bias for x (batch, in), the DCTpS layer's dense offset plus the rest.

    T(x) is the first ``out_features`` orthonormal DCT-II coefficients of x zero-padded to
    q = max(in, out_features). ``alpha`` is a 0-d tensor, ``y`` (batch, out_features) or
    None, ``bias`` (out_features,) or None. On CPU float32/float64 one numba pass fuses the
    twiddle, truncation, α, bias and the sum; elsewhere it is
    :func:`dct_project_affine_reference`.
    """
    fused = (
        x.dim() == 2 and _use_numba(x) and alpha.dtype == x.dtype
        and (y is None or (y.dtype == x.dtype and y.device == x.device))
        and (bias is None or (bias.dtype == x.dtype and bias.device == x.device))
    )
    if not fused:
        return dct_project_affine_reference(x, out_features, alpha, y, bias)
    return _DCTAffineFn.apply(x.contiguous(), alpha, y, bias, out_features)


def dct_sparse_affine_reference(
    x: torch.Tensor,
    out_features: int,
    alpha: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """α·T(x) + x Sᵀ + bias in plain torch, S (out_features, in) given by values/indices."""
    y = sparse_matmul_reference(x, values, indices, (out_features, x.shape[-1]))
    return dct_project_affine_reference(x, out_features, alpha, y, bias)


def dct_sparse_affine(
    x: torch.Tensor,
    out_features: int,
    alpha: torch.Tensor,
    values: torch.Tensor,
    plan: SparsePlan,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """α·T(x) + x Sᵀ + bias for x (batch, in): the whole DCTpS layer in one autograd node.

    ``plan`` (from :func:`~bornsparse.ops.sparse_product.build_plan`) describes S's support,
    shape (out_features, in); ``values`` (nnz,) its entries; ``alpha`` a 0-d tensor; ``bias``
    (out_features,) or None. On CPU float32/float64 the activations' transposes that the
    sparse kernels need ride along the DCT's own passes (see ops/_dct_numba.py); elsewhere,
    or for small inputs, it is :func:`sparse_matmul` plus :func:`dct_project_affine`.
    """
    if plan.shape != (out_features, x.shape[-1]) or values.shape != (plan.nnz,):
        raise ValueError(
            f"plan and values must describe a ({out_features}, {x.shape[-1]}) weight, got "
            f"plan shape {plan.shape}, nnz {plan.nnz}, values {tuple(values.shape)}"
        )
    fused = (
        x.dim() == 2 and _use_numba(x) and alpha.dtype == x.dtype
        and values.dtype == x.dtype and values.device == x.device
        and (bias is None or (bias.dtype == x.dtype and bias.device == x.device))
    )
    if not fused:
        indices = torch.stack((plan.rows, plan.cols))
        y = sparse_matmul(x, values, indices, plan.shape, plan=plan)
        return dct_project_affine(x, out_features, alpha, y, bias)
    return _DCTSparseAffineFn.apply(x.contiguous(), alpha, values, bias, plan, out_features)


# Samples per block of _DCTSparseAffineFn: each pass of the layer is memory-bound on CPU, so
# the layer runs block by block with every intermediate (about six blocks' worth) kept in
# L2 instead of streaming whole-batch arrays through memory; smaller blocks pay Python's
# per-call overhead more often. Measured, see docs/results.md.
_BLOCK_BYTES = 1 << 21


def _blocks(b: int, width: int, itemsize: int) -> list[tuple[int, int]]:
    step = max(16, (_BLOCK_BYTES // (width * itemsize)) // 16 * 16)
    return [(i, min(b, i + step)) for i in range(0, b, step)]


class _DCTSparseAffineFn(torch.autograd.Function):
    """CPU fused α·T(x) + x Sᵀ + bias, block by block over samples (see _BLOCK_BYTES)."""

    @staticmethod
    def forward(ctx, x, alpha, values, bias, plan, m):
        from bornsparse.ops import _dct_numba as k

        b, n = x.shape
        q = max(n, m)
        t = _tables(q, x.dtype, x.device)
        reorder, w = t["reorder"].numpy(), t["w_real"].numpy()
        xd = x.detach()
        vals = values.detach().contiguous()
        bb = (bias.detach().contiguous() if bias is not None else x.new_empty(0)).numpy()
        out = torch.empty(b, m, dtype=x.dtype)
        x_ts = []
        for b0, b1 in _blocks(b, q, x.element_size()):
            v = torch.empty(b1 - b0, q, dtype=x.dtype)
            x_t = torch.empty(n, b1 - b0, dtype=x.dtype)
            k._reorder_transpose_kernel(xd[b0:b1].numpy(), reorder, v.numpy(), x_t.numpy())
            spec = torch.fft.rfft(v, dim=-1)
            y_t = _numba_spmm_t(plan.rowptr, plan.cols, vals, x_t, m)
            k._affine_take_t_kernel(
                torch.view_as_real(spec).numpy(), w, q, float(alpha), y_t.numpy(), bb,
                out[b0:b1].numpy(),
            )
            x_ts.append(x_t)
        ctx.save_for_backward(xd, vals, *x_ts)
        ctx.plan, ctx.alpha, ctx.m, ctx.alpha_shape = plan, float(alpha), m, alpha.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        from bornsparse.ops import _dct_numba as k
        from bornsparse.ops import _sparse_numba as ks

        x, vals, *x_ts = ctx.saved_tensors
        plan = ctx.plan
        need_x, need_a, need_v, need_b = ctx.needs_input_grad[:4]
        g = g.contiguous()
        b, n = x.shape
        m = ctx.m
        q = max(n, m)
        t = _tables(q, x.dtype, x.device)
        cdtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
        gx = torch.empty(b, n, dtype=x.dtype) if need_x else x.new_empty(b, 0)
        dots = torch.zeros(b, dtype=x.dtype)
        grad_v = torch.zeros(plan.nnz, dtype=x.dtype) if need_v else None
        vals_csc = vals[plan.csc_perm] if need_x else None
        grad_v_csc = torch.zeros(plan.nnz, dtype=x.dtype) if need_x and need_v else None
        for (b0, b1), x_t in zip(_blocks(b, q, x.element_size()), x_ts, strict=True):
            gb = g[b0:b1]
            g_t = torch.empty(m if (need_x or need_v) else 0, b1 - b0, dtype=x.dtype)
            if need_x or need_a:
                spec = torch.empty(b1 - b0, q // 2 + 1, dtype=cdtype)
                k._padded_untake_t_kernel(
                    gb.numpy(), q, torch.view_as_real(t["w_inv"]).numpy(),
                    torch.view_as_real(spec).numpy(), g_t.numpy(),
                )
                v = torch.fft.irfft(spec, n=q, dim=-1)
                if need_x and need_v:
                    # one sweep for grad_x's sparse part and grad_v (in column order)
                    gs_t = torch.empty(n, b1 - b0, dtype=x.dtype)
                    fn = ks._spmm_t_sampled_dot_kernel if (
                        plan.nnz * (b1 - b0) >= _PARALLEL_MIN_WORK
                    ) else ks._spmm_t_sampled_dot_serial_kernel
                    fn(plan.colptr.numpy(), plan.csc_rows.numpy(), vals_csc.numpy(),
                       g_t.numpy(), x_t.numpy(), gs_t.numpy(), grad_v_csc.numpy())
                    gxb = gx[b0:b1]
                elif need_x:
                    gs_t = _numba_spmm_t(plan.colptr, plan.csc_rows, vals_csc, g_t, n)
                    gxb = gx[b0:b1]
                else:
                    gs_t, gxb = x.new_empty(0, b1 - b0), x.new_empty(b1 - b0, n)
                k._gather_scale_dot_t_kernel(
                    v.numpy(), t["unorder"].numpy(), x[b0:b1].numpy(), ctx.alpha,
                    gs_t.numpy(), gxb.numpy(), dots[b0:b1].numpy(),
                )
            elif need_v:
                g_t = gb.t().contiguous()
            if need_v and not need_x:
                # accumulates into grad_v across blocks
                fn = ks._sampled_dot_kernel if plan.nnz * (b1 - b0) >= _PARALLEL_MIN_WORK else (
                    ks._sampled_dot_serial_kernel
                )
                fn(plan.rows.numpy(), plan.cols.numpy(), g_t.numpy(), x_t.numpy(),
                   grad_v.numpy())
        if need_x and need_v:
            grad_v[plan.csc_perm] = grad_v_csc
        grad_x = gx if need_x else None
        grad_alpha = dots.sum().reshape(ctx.alpha_shape) if need_a else None
        grad_bias = g.sum(0) if need_b else None
        return grad_x, grad_alpha, grad_v, grad_bias, None, None
