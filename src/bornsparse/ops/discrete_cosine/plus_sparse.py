"""The whole DCTpS linear layer as one op: out = α·T(x) + x Sᵀ + bias (Price & Tanner,
"Dense for the Price of Sparse").

T(x) is the first ``out_features`` orthonormal DCT-II coefficients of x zero-padded to
q = max(in, out_features) (transform.py); S (out_features, in) is sparse, given
by its values and a :class:`~bornsparse.ops.sparse.plan.SparsePlan`. On CPU
float32/float64 ``torch.ops.bornsparse.dct_sparse_affine`` runs block by block over
samples: the activations' transposes that the sparse kernels need ride along the DCT's own
passes (numba_kernels.py). The reference is :func:`sparse_matmul_reference` plus
:func:`dct_project_affine_reference`, gradients of any order.
"""

from __future__ import annotations

import torch

from bornsparse.ops.backends import NUMBA_DTYPES, resolve_backend
from bornsparse.ops.discrete_cosine import transform as _dct
from bornsparse.ops.discrete_cosine.transform import (
    dct_project_affine,
    dct_project_affine_reference,
    use_numba_twiddle,
)
from bornsparse.ops.runtime.autograd import no_double_backward
from bornsparse.ops.sparse.matmul import (
    PARALLEL_MIN_WORK,
    csr_matmul_t,
    sampled_dot_t,
    sparse_matmul,
    sparse_matmul_reference,
)
from bornsparse.ops.sparse.plan import SparsePlan, check_plan_tensors

# Samples per block of the fused op: each pass of the layer is memory-bound on CPU, so the
# layer runs block by block with every intermediate (about six blocks' worth) kept in L2
# instead of streaming whole-batch arrays through memory; smaller blocks pay Python's
# per-call overhead more often. Measured, see docs/results.md.
_BLOCK_BYTES = 1 << 21


def _blocks(b: int, width: int, itemsize: int) -> list[tuple[int, int]]:
    step = max(16, (_BLOCK_BYTES // (width * itemsize)) // 16 * 16)
    return [(i, min(b, i + step)) for i in range(0, b, step)]


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


def _check_fused_operands(x, alpha, values, bias, shape) -> None:
    if x.dim() != 2 or x.shape[1] != shape[1]:
        raise ValueError(f"x must have shape (batch, {shape[1]}), got {tuple(x.shape)}")
    dtypes = {t.dtype for t in (x, alpha, values, *(() if bias is None else (bias,)))}
    if x.device.type != "cpu" or x.dtype not in NUMBA_DTYPES or len(dtypes) > 1:
        raise ValueError(f"the fused kernel needs CPU float32/float64 tensors of one dtype, "
                         f"got {sorted(map(str, dtypes))} on {x.device}")
    if alpha.numel() != 1:
        raise ValueError(f"alpha must hold one number, got shape {tuple(alpha.shape)}")
    if bias is not None and tuple(bias.shape) != (shape[0],):
        raise ValueError(f"bias must have shape ({shape[0]},), got {tuple(bias.shape)}")


@torch.library.custom_op("bornsparse::dct_sparse_affine", mutates_args=())
def _fused_op(
    x: torch.Tensor, alpha: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
    rows: torch.Tensor, cols: torch.Tensor, rowptr: torch.Tensor, colptr: torch.Tensor,
    csc_perm: torch.Tensor, csc_rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(α·T(x) + x Sᵀ + bias, x_ts) for x (batch, in); x_ts (batch · in,) holds each block's
    xᵀ, (in, block) contiguous one after another, which the values' gradient reads."""
    from bornsparse.ops.discrete_cosine import numba_kernels as k

    shape = (rowptr.numel() - 1, colptr.numel() - 1)
    _check_fused_operands(x, alpha, values, bias, shape)
    check_plan_tensors(shape, rows, cols, rowptr, colptr, csc_perm, csc_rows)
    x = x.contiguous()
    b, n = x.shape
    m = shape[0]
    q = max(n, m)
    t = _dct.dct_tables(q, x.dtype, x.device)
    reorder, w = t["reorder"].numpy(), t["w_real"].numpy()
    vals = values.contiguous()
    bb = (bias.contiguous() if bias is not None else x.new_empty(0)).numpy()
    out = torch.empty(b, m, dtype=x.dtype)
    x_ts = torch.empty(b * n, dtype=x.dtype)
    for b0, b1 in _blocks(b, q, x.element_size()):
        v = torch.empty(b1 - b0, q, dtype=x.dtype)
        x_t = x_ts[b0 * n:b1 * n].view(n, b1 - b0)
        k._reorder_transpose_kernel(x[b0:b1].numpy(), reorder, v.numpy(), x_t.numpy())
        spec = torch.fft.rfft(v, dim=-1)
        y_t = csr_matmul_t(rowptr, cols, vals, x_t, m)
        k._affine_take_t_kernel(
            torch.view_as_real(spec).numpy(), w, q, float(alpha), y_t.numpy(), bb,
            out[b0:b1].numpy(),
        )
    return out, x_ts


@_fused_op.register_fake
def _(x, alpha, values, bias, rows, cols, rowptr, colptr, csc_perm, csc_rows):
    torch._check(x.dim() == 2, lambda: f"x must have shape (batch, in), got {x.shape}")
    return x.new_empty(x.shape[0], rowptr.shape[0] - 1), x.new_empty(x.shape[0] * x.shape[1])


@torch.library.custom_op("bornsparse::dct_sparse_affine_backward", mutates_args=())
def _fused_backward_op(
    g: torch.Tensor, x: torch.Tensor, x_ts: torch.Tensor, alpha: torch.Tensor,
    values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, rowptr: torch.Tensor,
    colptr: torch.Tensor, csc_perm: torch.Tensor, csc_rows: torch.Tensor, need_x: bool,
    need_alpha: bool, need_values: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_alpha, grad_values, grad_bias) of ``dct_sparse_affine``; a gradient not
    asked for is an empty tensor."""
    from bornsparse.ops.discrete_cosine import numba_kernels as k
    from bornsparse.ops.sparse import numba_matmul as ks

    shape = (rowptr.numel() - 1, colptr.numel() - 1)
    _check_fused_operands(x, alpha, values, None, shape)
    check_plan_tensors(shape, rows, cols, rowptr, colptr, csc_perm, csc_rows)
    b, n = x.shape
    m = shape[0]
    if tuple(g.shape) != (b, m) or x_ts.shape != (b * n,):
        raise ValueError(f"g must have shape {(b, m)} and x_ts {(b * n,)}, got "
                         f"{tuple(g.shape)} and {tuple(x_ts.shape)}")
    g = g.contiguous()
    x = x.contiguous()
    vals = values.contiguous()
    nnz = vals.numel()
    q = max(n, m)
    t = _dct.dct_tables(q, x.dtype, x.device)
    cdtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
    gx = torch.empty(b, n, dtype=x.dtype) if need_x else x.new_empty(b, 0)
    dots = torch.zeros(b, dtype=x.dtype)
    grad_v = torch.zeros(nnz, dtype=x.dtype) if need_values else x.new_empty(0)
    vals_csc = vals[csc_perm] if need_x else None
    grad_v_csc = torch.zeros(nnz, dtype=x.dtype) if need_x and need_values else None
    for b0, b1 in _blocks(b, q, x.element_size()):
        x_t = x_ts[b0 * n:b1 * n].view(n, b1 - b0)
        gb = g[b0:b1]
        g_t = torch.empty(m if (need_x or need_values) else 0, b1 - b0, dtype=x.dtype)
        if need_x or need_alpha:
            spec = torch.empty(b1 - b0, q // 2 + 1, dtype=cdtype)
            k._padded_untake_t_kernel(
                gb.numpy(), q, torch.view_as_real(t["w_inv"]).numpy(),
                torch.view_as_real(spec).numpy(), g_t.numpy(),
            )
            v = torch.fft.irfft(spec, n=q, dim=-1)
            if need_x and need_values:
                # one sweep for grad_x's sparse part and grad_v (in column order)
                gs_t = torch.empty(n, b1 - b0, dtype=x.dtype)
                fn = ks._spmm_t_sampled_dot_kernel if (
                    nnz * (b1 - b0) >= PARALLEL_MIN_WORK
                ) else ks._spmm_t_sampled_dot_serial_kernel
                fn(colptr.numpy(), csc_rows.numpy(), vals_csc.numpy(),
                   g_t.numpy(), x_t.numpy(), gs_t.numpy(), grad_v_csc.numpy())
                gxb = gx[b0:b1]
            elif need_x:
                gs_t = csr_matmul_t(colptr, csc_rows, vals_csc, g_t, n)
                gxb = gx[b0:b1]
            else:
                gs_t, gxb = x.new_empty(0, b1 - b0), x.new_empty(b1 - b0, n)
            k._gather_scale_dot_t_kernel(
                v.numpy(), t["unorder"].numpy(), x[b0:b1].numpy(), float(alpha),
                gs_t.numpy(), gxb.numpy(), dots[b0:b1].numpy(),
            )
        elif need_values:
            g_t = gb.t().contiguous()
        if need_values and not need_x:
            sampled_dot_t(rows, cols, g_t, x_t, out=grad_v)  # accumulates across blocks
    if need_x and need_values:
        grad_v[csc_perm] = grad_v_csc
    grad_alpha = dots.sum().reshape(alpha.shape) if need_alpha else x.new_empty(0)
    grad_bias = g.sum(0) if need_bias else x.new_empty(0)
    return gx if need_x else x.new_empty(0), grad_alpha, grad_v, grad_bias


@_fused_backward_op.register_fake
def _(g, x, x_ts, alpha, values, rows, cols, rowptr, colptr, csc_perm, csc_rows, need_x,
      need_alpha, need_values, need_bias):
    def maybe(flag, like, shape):
        return like.new_empty(shape) if flag else like.new_empty(0)

    return (maybe(need_x, x, x.shape), maybe(need_alpha, alpha, alpha.shape),
            maybe(need_values, values, values.shape), maybe(need_bias, g, (g.shape[1],)))


def _fused_setup(ctx, inputs, output):
    x, alpha, values, bias, *plan = inputs
    ctx.save_for_backward(x, output[1], alpha, values, *plan)
    ctx.mark_non_differentiable(output[1])
    # no zero-filled gradient for that saved-for-backward output (it is batch-sized): the
    # backward gets None for it, and for the main output when nothing used it
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, grad_out, _grad_x_ts):
    x, x_ts, alpha, values, *plan = ctx.saved_tensors
    if grad_out is None:  # the layer's output itself was not used
        return (None,) * (4 + len(plan))
    need = ctx.needs_input_grad[:4]
    grads = torch.ops.bornsparse.dct_sparse_affine_backward(
        grad_out, x, x_ts, alpha, values, *plan, *need
    )
    return (*(gr if n else None for gr, n in zip(grads, need, strict=True)),
            *([None] * len(plan)))


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)
_fused_backward_op.register_autograd(
    no_double_backward("dct_sparse_affine"), setup_context=lambda ctx, inputs, output: None
)


def dct_sparse_affine(
    x: torch.Tensor,
    out_features: int,
    alpha: torch.Tensor,
    values: torch.Tensor,
    plan: SparsePlan,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """α·T(x) + x Sᵀ + bias for x (..., in): the whole DCTpS layer.

    ``plan`` (from :func:`~bornsparse.ops.sparse.plan.build_plan`) describes S's support,
    shape (out_features, in); ``values`` (nnz,) its entries; ``alpha`` a 0-d tensor; ``bias``
    (out_features,) or None. ``backend`` (ops/backends.py): "auto" and "numba" take the
    fused op for CPU float32/float64 inputs large enough for the numba DCT kernels (else
    the sparse op plus the DCT op); "triton" (and "auto" on CUDA) takes
    ``torch.ops.bornsparse.dct_sparse_affine_triton`` (triton_plus_sparse.py: the sparse
    product and the layer's other passes in Triton, the FFT through torch.fft) when α,
    values and bias share x's dtype and device; "reference" is plain torch all the way down;
    "torch_sparse" runs S through torch.sparse and the DCT in plain torch.
    """
    if plan.shape != (out_features, x.shape[-1]) or values.shape != (plan.nnz,):
        raise ValueError(
            f"plan and values must describe a ({out_features}, {x.shape[-1]}) weight, got "
            f"plan shape {plan.shape}, nnz {plan.nnz}, values {tuple(values.shape)}"
        )
    kind = resolve_backend(backend, x, "sparse", has_triton=True)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    same = (
        alpha.dtype == x.dtype and alpha.device == x.device
        and values.dtype == x.dtype and values.device == x.device
        and (bias is None or (bias.dtype == x.dtype and bias.device == x.device))
    )
    if kind == "numba" and use_numba_twiddle(x2) and same:
        out, _ = torch.ops.bornsparse.dct_sparse_affine(x2, alpha, values, bias, *plan.tensors())
    elif kind == "triton" and same:
        import bornsparse.ops.discrete_cosine.triton_plus_sparse  # noqa: F401  (registers the op)

        out, _ = torch.ops.bornsparse.dct_sparse_affine_triton(
            x2, alpha.reshape(()), values, bias, *plan.tensors()
        )
    else:
        indices = torch.stack((plan.rows, plan.cols))
        y = sparse_matmul(x2, values, indices, plan.shape, plan=plan, backend=kind)
        dct_backend = "numba" if kind == "numba" else "reference"
        out = dct_project_affine(x2, out_features, alpha, y, bias, backend=dct_backend)
    return out.reshape(*lead, out_features)
