"""Direct sparse 2-D convolution: y = conv2d(x, W) + b for a kernel W stored as values plus
indices, computed from the stored entries alone.

Conventions:

* The kernel W (out_channels, in_channels/groups, kh, kw) is addressed as the (rows, cols)
  = (out_channels, L) matrix of its flattened rows, L = in_channels/groups·kh·kw, column
  l = (c_local·kh + i)·kw + j (the F.unfold order). ``indices`` (2, nnz) int32/int64 is sorted
  row-major and unique (as ``plan.check_indices`` demands); ``values`` (nnz,).
* ``x`` is (N, C, H, W) or unbatched (C, H, W); zero padding (other modes pad first,
  ``F.pad``), stride, dilation and groups as ``F.conv2d``.

Backends (ops/backends.py, family "conv"): ``"reference"`` scatters the values into a dense
kernel and calls ``F.conv2d`` (any device, gradients of any order); ``"numba"`` runs the
custom op ``bornsparse::sparse_conv2d`` (CPU float32/float64, kernels in
``numba_conv``): each stored weight adds one shifted input plane to one output
plane, O(nnz·N·Ho·Wo) plus one write of the output, with no dense kernel, no im2col and no
dense weight gradient. ``"auto"`` picks numba for CPU float32/float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from bornsparse._checks import check_float_tensor
from bornsparse.ops.backends import resolve_backend
from bornsparse.ops.runtime.autograd import no_double_backward
from bornsparse.ops.runtime.validated import check_once
from bornsparse.ops.sparse.plan import check_indices, check_kernel_values


@dataclass(frozen=True)
class ConvPlan:
    """Support-derived structure of a sparse conv kernel: its rows (output channels) in
    compressed form for the forward, and its entries grouped by input channel for the
    backward."""

    weight_shape: tuple[int, int, int, int]  # (out, in/groups, kh, kw)
    groups: int
    rows: torch.Tensor  # (nnz,) int64, output channel of each entry
    cols: torch.Tensor  # (nnz,) int64, patch column of each entry
    rowptr: torch.Tensor  # (out + 1,) int64
    chan_perm: torch.Tensor  # (nnz,) entries ordered by input channel (stable)
    chan_ptr: torch.Tensor  # (in + 1,) int64, chan_perm[chan_ptr[c]:chan_ptr[c+1]] read c

    @property
    def nnz(self) -> int:
        return self.rows.numel()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(rows, cols, rowptr, chan_perm, chan_ptr): what the custom ops receive."""
        return (self.rows, self.cols, self.rowptr, self.chan_perm, self.chan_ptr)


def _check_weight_shape(weight_shape: object, groups: object) -> tuple[tuple[int, ...], int]:
    if (not isinstance(weight_shape, tuple | list) or len(weight_shape) != 4 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in weight_shape)):
        raise ValueError(f"weight_shape must be 4 positive ints (out, in/groups, kh, kw), got "
                         f"{weight_shape!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or (
            weight_shape[0] % groups):
        raise ValueError(f"groups must be a positive int dividing out_channels = "
                         f"{weight_shape[0]}, got {groups!r}")
    return tuple(int(s) for s in weight_shape), int(groups)


def entry_channels(rows: torch.Tensor, cols: torch.Tensor,
                   weight_shape: tuple[int, int, int, int], groups: int) -> torch.Tensor:
    """The input channel each entry reads: group(o)·in/groups + c_local(l); (nnz,) int64."""
    out, cg, kh, kw = weight_shape
    return (rows // (out // groups)) * cg + cols // (kh * kw)


def build_conv_plan(indices: torch.Tensor, weight_shape: tuple[int, int, int, int],
                    groups: int = 1) -> ConvPlan:
    """Validate ``indices`` (2, nnz) for the (out, L) kernel matrix of ``weight_shape``
    (out, in/groups, kh, kw) and derive its :class:`ConvPlan`; O(nnz log nnz)."""
    weight_shape, groups = _check_weight_shape(weight_shape, groups)
    out, cg, kh, kw = weight_shape
    check_indices(indices, (out, cg * kh * kw))
    # the kernels read int64 indices, whatever dtype the support is stored in
    rows = indices[0].to(torch.int64).contiguous()
    cols = indices[1].to(torch.int64).contiguous()
    rowptr = torch.zeros(out + 1, dtype=torch.int64, device=rows.device)
    rowptr[1:] = torch.cumsum(torch.bincount(rows, minlength=out), 0)
    chan = entry_channels(rows, cols, weight_shape, groups)
    chan_perm = torch.sort(chan, stable=True).indices  # rows ascending within a channel
    chan_ptr = torch.zeros(cg * groups + 1, dtype=torch.int64, device=rows.device)
    chan_ptr[1:] = torch.cumsum(torch.bincount(chan, minlength=cg * groups), 0)
    return ConvPlan(weight_shape, groups, rows, cols, rowptr, chan_perm, chan_ptr)


def dense_kernel(values: torch.Tensor, indices: torch.Tensor,
                 weight_shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The values scattered into the dense kernel ``weight_shape``; differentiable."""
    out, cg, kh, kw = weight_shape
    lin = indices[0].long() * (cg * kh * kw) + indices[1].long()
    flat = values.new_zeros(out * cg * kh * kw)
    return flat.scatter(0, lin, values).view(weight_shape)


def sparse_conv2d_reference(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
    weight_shape: tuple[int, int, int, int], bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1), padding: tuple[int, int] | str = (0, 0),
    dilation: tuple[int, int] = (1, 1), groups: int = 1,
) -> torch.Tensor:
    """Plain PyTorch: the values scattered into a transient dense kernel, then F.conv2d.

    Any device and dtype, gradients of any order; the dense kernel and its gradient live
    only inside the call (parameters and their gradients stay O(nnz)).
    """
    w = dense_kernel(values, indices, weight_shape)
    return F.conv2d(x, w, bias, stride, padding, dilation, groups)


def resolve_padding(padding: tuple[int, int] | str, kernel_size: tuple[int, int],
                    dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding, as F.conv2d applies ``padding``: "same"
    pads d·(k-1) in total, the odd one extra at the bottom/right."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        out = []
        for k, d in zip(kernel_size, dilation, strict=True):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)  # type: ignore[return-value]
    ph, pw = padding
    return (ph, ph, pw, pw)


def output_size(h: int, w: int, kernel_size, stride, pad4, dilation) -> tuple[int, int]:
    """(Ho, Wo) of a conv of an (H, W) plane with padding (top, bottom, left, right)."""
    ho = (h + pad4[0] + pad4[1] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    wo = (w + pad4[2] + pad4[3] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return ho, wo


def check_conv_plan(weight_shape: tuple[int, int, int, int], in_channels: int,
                    rows: torch.Tensor, cols: torch.Tensor, rowptr: torch.Tensor,
                    chan_perm: torch.Tensor, chan_ptr: torch.Tensor) -> None:
    """What the kernels trust about a plan's tensors, for ops that receive them (once per
    version of those tensors, runtime/validated.py): 1-D CPU int64, consistent lengths,
    pointers rising from 0 to nnz, indices in range."""
    out, cg, kh, kw = weight_shape
    named = dict(rows=rows, cols=cols, rowptr=rowptr, chan_perm=chan_perm, chan_ptr=chan_ptr)
    nnz = rows.numel()
    lengths = dict(rows=nnz, cols=nnz, rowptr=out + 1, chan_perm=nnz, chan_ptr=in_channels + 1)
    for name, t in named.items():
        if t.dtype != torch.int64 or t.dim() != 1 or t.device.type != "cpu":
            raise ValueError(f"{name} must be a 1-D CPU int64 tensor, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
        if t.numel() != lengths[name]:
            raise ValueError(f"{name} must have {lengths[name]} entries for weight shape "
                             f"{weight_shape} on {in_channels} input channels with nnz = "
                             f"{nnz}, got {t.numel()}")

    def check() -> None:
        for name, ptr in (("rowptr", rowptr), ("chan_ptr", chan_ptr)):
            if int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((ptr.diff() < 0).any()):
                raise ValueError(f"{name} must rise from 0 to nnz = {nnz}")
        for name, t, bound in (("rows", rows, out), ("cols", cols, cg * kh * kw),
                               ("chan_perm", chan_perm, nnz)):
            if nnz and (int(t.min()) < 0 or int(t.max()) >= bound):
                raise ValueError(f"{name} must lie in [0, {bound}), got "
                                 f"[{int(t.min())}, {int(t.max())}]")

    check_once("conv plan", tuple(named.values()), check)


def _check_operands(x: torch.Tensor, values: torch.Tensor, groups: int, cg: int) -> None:
    if x.dim() != 4 or x.shape[1] != cg * groups:
        raise ValueError(f"x must have shape (N, {cg * groups}, H, W), got {tuple(x.shape)}")
    check_kernel_values(x, values)


def _geometry(kernel_size, stride, padding, dilation):
    """The kernel module's geometry arguments: padding reduced to (top, left)."""
    return (tuple(kernel_size), tuple(stride), (padding[0], padding[2]), tuple(dilation))


def _weight_shape(rowptr: torch.Tensor, x: torch.Tensor, kernel_size, groups
                  ) -> tuple[int, int, int, int]:
    return (rowptr.numel() - 1, x.shape[1] // groups, kernel_size[0], kernel_size[1])


@torch.library.custom_op("bornsparse::sparse_conv2d", mutates_args=())
def _sparse_conv2d_op(
    x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor,
    cols: torch.Tensor, rowptr: torch.Tensor, chan_perm: torch.Tensor,
    chan_ptr: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
    dilation: list[int], groups: int,
) -> torch.Tensor:
    """conv2d(x, W, bias) for x (N, C, H, W) and W given by its plan tensors (ConvPlan);
    ``padding`` is (top, bottom, left, right) zeros. Returns (N, out, Ho, Wo)."""
    ws = _weight_shape(rowptr, x, kernel_size, groups)
    _check_operands(x, values, groups, ws[1])
    check_conv_plan(ws, x.shape[1], rows, cols, rowptr, chan_perm, chan_ptr)
    if bias is not None and (bias.shape != (ws[0],) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be ({ws[0]},) of dtype {x.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    ho, wo = output_size(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"x of spatial size {tuple(x.shape[2:])} is too small for kernel "
                         f"{tuple(kernel_size)} with dilation {tuple(dilation)} and padding "
                         f"{tuple(padding)}: output would be {ho}×{wo}")
    from bornsparse.ops.sparse import numba_conv as k

    out = torch.empty(x.shape[0], ws[0], ho, wo, dtype=x.dtype)
    k.forward(x.contiguous().numpy(), values.detach().contiguous().numpy(), cols.numpy(),
              rowptr.numpy(), None if bias is None else bias.detach().contiguous().numpy(),
              out.numpy(), *_geometry(kernel_size, stride, padding, dilation), groups)
    return out


@_sparse_conv2d_op.register_fake
def _(x, values, bias, rows, cols, rowptr, chan_perm, chan_ptr, kernel_size, stride, padding,
      dilation, groups):
    torch._check(x.dim() == 4, lambda: f"x must have shape (N, C, H, W), got {x.shape}")
    ho, wo = output_size(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    return x.new_empty(x.shape[0], rowptr.shape[0] - 1, ho, wo)


@torch.library.custom_op("bornsparse::sparse_conv2d_backward", mutates_args=())
def _sparse_conv2d_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
    cols: torch.Tensor, rowptr: torch.Tensor, chan_perm: torch.Tensor,
    chan_ptr: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
    dilation: list[int], groups: int, need_x: bool, need_values: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_values, grad_bias) of ``sparse_conv2d``; one not asked for is empty."""
    ws = _weight_shape(rowptr, x, kernel_size, groups)
    _check_operands(x, values, groups, ws[1])
    check_conv_plan(ws, x.shape[1], rows, cols, rowptr, chan_perm, chan_ptr)
    ho, wo = output_size(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    want = (x.shape[0], ws[0], ho, wo)
    if tuple(grad_y.shape) != want:
        raise ValueError(f"grad_y must have shape {want}, got {tuple(grad_y.shape)}")
    gy = grad_y.contiguous()
    # distinct empty tensors: an op's outputs must not alias one another
    grad_x, grad_v, grad_b = (values.new_empty(0) for _ in range(3))
    if need_x or need_values:
        from bornsparse.ops.sparse import numba_conv as k

        block = k.batch_block(x.shape[0], x.shape[1])
        part = torch.zeros(-(-x.shape[0] // block), values.numel(), dtype=x.dtype)
        gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
        k.backward(x.contiguous().numpy(), gy.numpy(), values.detach().contiguous().numpy(),
                   rows.numpy(), cols.numpy(), chan_perm.numpy(), chan_ptr.numpy(),
                   None if gx is None else gx.numpy(), part.numpy(), need_values,
                   *_geometry(kernel_size, stride, padding, dilation), block)
        if need_x:
            grad_x = gx
        if need_values:
            # part[b, k] belongs to entry chan_perm[k]; summed over blocks in block order
            grad_v = torch.empty_like(values).index_copy_(0, chan_perm, part.sum(0))
    if need_bias:
        grad_b = gy.sum(dim=(0, 2, 3))
    return grad_x, grad_v, grad_b


@_sparse_conv2d_backward_op.register_fake
def _(grad_y, x, values, rows, cols, rowptr, chan_perm, chan_ptr, kernel_size, stride,
      padding, dilation, groups, need_x, need_values, need_bias):
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if need_x
            else values.new_empty(0),
            torch.empty_like(values) if need_values else values.new_empty(0),
            grad_y.new_empty(grad_y.shape[1]) if need_bias else values.new_empty(0))


def _setup(ctx, inputs, output):
    x, values, bias, *plan = inputs[:8]
    ctx.geometry = inputs[8:]
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, values, *plan)


def _backward(ctx, grad_y):
    x, values, *plan = ctx.saved_tensors
    need_x, need_v, need_b = ctx.needs_input_grad[:3]
    grad_x, grad_v, grad_b = torch.ops.bornsparse.sparse_conv2d_backward(
        grad_y, x, values, *plan, *ctx.geometry, need_x, need_v, need_b and ctx.has_bias)
    return ((grad_x if need_x else None), (grad_v if need_v else None),
            (grad_b if need_b and ctx.has_bias else None), *([None] * 10))


_sparse_conv2d_op.register_autograd(_backward, setup_context=_setup)
_sparse_conv2d_backward_op.register_autograd(
    no_double_backward("sparse_conv2d"),
    setup_context=lambda ctx, inputs, output: None,
)


def _pair(name: str, v: object) -> tuple[int, int]:
    t = v if isinstance(v, tuple | list) else (v, v)
    if len(t) != 2 or any(isinstance(a, bool) or not isinstance(a, int) for a in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return int(t[0]), int(t[1])


def sparse_conv2d(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weight_shape: tuple[int, int, int, int],
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    plan: ConvPlan | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.conv2d(x, W, bias, stride, padding, dilation, groups)`` for the sparse kernel W
    of ``weight_shape`` (out, in/groups, kh, kw) given by ``values`` (nnz,) and ``indices``
    (2, nnz) into its (out, in/groups·kh·kw) matrix; x (N, C, H, W) or (C, H, W).

    ``padding``: zeros, an int, a pair, "valid" or "same" (as F.conv2d). ``plan`` (from
    :func:`build_conv_plan` on the same indices) saves re-deriving the support structure;
    without it one is built (and the support validated) here. Differentiable in x, values
    and bias; the numba backend once (its backward raises on double backward).
    """
    weight_shape, groups = _check_weight_shape(weight_shape, groups)
    check_float_tensor("x", x)
    check_float_tensor("values", values)
    out, cg, kh, kw = weight_shape
    if x.dim() not in (3, 4) or x.shape[-3] != cg * groups:
        raise ValueError(f"x must have shape (N, {cg * groups}, H, W) or ({cg * groups}, H, "
                         f"W), got {tuple(x.shape)}")
    if values.dtype != x.dtype or values.device != x.device or values.dim() != 1:
        raise TypeError(f"values must be 1-D with x's dtype and device ({x.dtype}, "
                        f"{x.device}), got {tuple(values.shape)} ({values.dtype}, "
                        f"{values.device})")
    stride, dilation = _pair("stride", stride), _pair("dilation", dilation)
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid', 'same', an int or a pair, got "
                             f"{padding!r}")
        if padding == "same" and stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
    else:
        padding = _pair("padding", padding)
    backend = resolve_backend(backend, x, "conv")
    if backend == "reference":
        return sparse_conv2d_reference(x, values, indices, weight_shape, bias, stride,
                                       padding, dilation, groups)
    if plan is None:
        plan = build_conv_plan(indices, weight_shape, groups)
    elif plan.weight_shape != weight_shape or plan.groups != groups or (
            plan.nnz != values.numel()):
        raise ValueError(f"plan describes weight shape {plan.weight_shape}, groups "
                         f"{plan.groups}, nnz {plan.nnz}; got {weight_shape}, {groups}, "
                         f"{values.numel()}")
    unbatched = x.dim() == 3
    xb = x.unsqueeze(0) if unbatched else x
    pad4 = resolve_padding(padding, (kh, kw), dilation)
    y = torch.ops.bornsparse.sparse_conv2d(xb.contiguous(), values, bias, *plan.tensors(),
                                           [kh, kw], list(stride), list(pad4), list(dilation),
                                           groups)
    return y.squeeze(0) if unbatched else y
