"""SparseConv2d and DCTPlusSparseConv2d: conv kernels stored as values plus indices.

The kernel (out_channels, in_channels/groups, kh, kw) is addressed as a (rows, cols) matrix
with rows = out channels and cols = the flattened (in_channels/groups, kh, kw) patch, the
order F.unfold uses. SparseConv2d.forward runs ``ops.sparse_conv.sparse_conv2d``: with the
numba backend (CPU float32/float64, "auto") each stored weight adds one shifted input plane
to one output plane, so no dense kernel, im2col or dense weight gradient exists at any
time; the reference backend scatters the values into a transient dense kernel and calls
F.conv2d. DCTPlusSparseConv2d is a dense conv by nature (its offset) and folds S into the
cached offset kernel for one F.conv2d. Parameters, gradients and optimizer state are
O(nnz) either way.

For the DCT layer, output channel o adds α·D[:, o] with D = dct_matrix(L, out_channels),
L = in_channels/groups·kh·kw and q = max(L, out_channels): each flattened patch is mapped
to the first out_channels DCT-II coefficients of the patch zero-padded to q. The patch is
flattened in ``dct_order``: "khkwc" (c fastest, as the public DCTpS code reshapes its
basis to (kh, kw, c_in/groups, out)) or "ckhkw" (the F.unfold order). The two coincide for
depthwise and 1×1 kernels. The offset kernel is a fixed dense conv kernel, kept as a
non-persistent buffer (rebuilt when the layer moves or changes dtype, never saved).
NOTE: with groups > 1 the same rule holds per output channel (channel o of group g sees
its own group's patch and uses DCT column o), so groups and depthwise convs get distinct
offsets per channel instead of copies of the first columns.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn
from torch.nn import functional as F

from bornsparse._checks import check_choice, check_float_tensor, check_positive_int
from bornsparse._random import make_generator
from bornsparse.nn._layer_parts import register_bias
from bornsparse.nn.dct_plus_sparse import register_alpha
from bornsparse.nn.description import Field, constant, is_int, is_pair, one_of
from bornsparse.nn.sparse_weight import (
    SPARSE_FIELDS,
    ScaledOffset,
    SparseWeightBase,
    copy_given_values,
)
from bornsparse.ops.discrete_cosine import dct_matrix
from bornsparse.ops.sparse_conv import ConvPlan, build_conv_plan, sparse_conv2d

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
DCT_ORDERS = ("khkwc", "ckhkw")
# how a patch is flattened, and the DCT offset, as checkpoint files name them (a later
# library that changes either must change the string, so old files fail loudly)
PATCH_LAYOUT = "(in_channels/groups, kh, kw) row-major, as F.unfold"
CONV_DCT_OFFSET = "dct-ii-ortho: channel o adds column o of dct_matrix(patch, out_channels)"
# files written before dct_order was described were computed in the F.unfold order
_DCT_ORDER_BEFORE_FIELD = "ckhkw"


def _is_padding(v: object) -> bool:
    return v in ("same", "valid") or is_pair(0)(v)


CONV_FIELDS = {"in_channels": Field(is_int), "out_channels": Field(is_int),
               "kernel_size": Field(is_pair(1)), "stride": Field(is_pair(1)),
               "padding": Field(_is_padding), "dilation": Field(is_pair(1)),
               "groups": Field(is_int), "padding_mode": Field(one_of(PADDING_MODES)),
               "patch_layout": constant(PATCH_LAYOUT)}
# the conv op's own plan (ConvPlan's int64 tensors), beside the base class's plan buffers
_CONV_PLAN_BUFFERS = ("_conv_rows", "_conv_cols", "_conv_rowptr", "_chan_perm", "_chan_ptr")


def _pair(name: str, value: object, *, minimum: int) -> tuple[int, int]:
    vals = value if isinstance(value, tuple | list) else (value, value)
    if len(vals) != 2 or any(
        isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum for v in vals
    ):
        raise ValueError(
            f"{name} must be an int >= {minimum} or a pair of them, got {value!r}"
        )
    return int(vals[0]), int(vals[1])


class _SparseConvBase(SparseWeightBase, abstract=True):
    _backend_family = "conv"
    stands_for = "conv"

    @classmethod
    def fields(cls) -> dict[str, Field]:
        return {**CONV_FIELDS, **SPARSE_FIELDS}

    def describe(self) -> dict[str, object]:
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    kernel_size=list(self.kernel_size), stride=list(self.stride),
                    padding=padding, dilation=list(self.dilation), groups=self.groups,
                    padding_mode=self.padding_mode, patch_layout=PATCH_LAYOUT,
                    **self._sparse_description())

    @classmethod
    def stored(cls, args):
        kh, kw = args["kernel_size"]
        patch = args["in_channels"] // args["groups"] * kh * kw
        return cls._sparse_stored(args, args["out_channels"], patch)

    @classmethod
    def constructor_arguments(cls, args, tensors, device):
        padding = args["padding"]
        return (args["in_channels"], args["out_channels"], tuple(args["kernel_size"])), dict(
            stride=tuple(args["stride"]),
            padding=padding if isinstance(padding, str) else tuple(padding),
            dilation=tuple(args["dilation"]), groups=args["groups"],
            padding_mode=args["padding_mode"], **cls._sparse_kwargs(args, tensors, device))
    def _init_conv(
        self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
        padding_mode,
    ) -> None:
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.groups = check_positive_int("groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups must divide in_channels and out_channels, got groups={groups} with "
                f"in_channels={in_channels}, out_channels={out_channels}"
            )
        self.kernel_size = _pair("kernel_size", kernel_size, minimum=1)
        self.stride = _pair("stride", stride, minimum=1)
        self.dilation = _pair("dilation", dilation, minimum=1)
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(
                    f"padding must be 'valid', 'same', an int >= 0 or a pair, got {padding!r}"
                )
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={stride!r}")
            self.padding = padding
        else:
            self.padding = _pair("padding", padding, minimum=0)
        self.padding_mode = check_choice("padding_mode", padding_mode, PADDING_MODES)
        if padding_mode != "zeros" and isinstance(self.padding, str):
            raise ValueError(
                f"padding_mode={padding_mode!r} needs numeric padding, got {padding!r}"
            )

    @property
    def patch_size(self) -> int:
        """L = in_channels/groups·kh·kw, the length of one flattened patch (a kernel row)."""
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def _check_input(self, x: torch.Tensor) -> None:
        check_float_tensor("input", x)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"input must have shape (N, {self.in_channels}, H, W) or "
                f"({self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        self._check_dtype(x)

    @torch.no_grad()
    def refresh_plan(self) -> None:
        """The base class's plan, plus the conv op's (:class:`ConvPlan`: int64 rows,
        columns and row pointers, the entries grouped by input channel), as five more
        non-persistent buffers, O(nnz + channels)."""
        super().refresh_plan()
        plan = None
        if self.indices.device.type != "meta":
            plan = build_conv_plan(self.indices, self.kernel_shape, self.groups)
        tensors = (None,) * 5 if plan is None else plan.tensors()
        for name, t in zip(_CONV_PLAN_BUFFERS, tensors, strict=True):
            self.register_buffer(name, t, persistent=False)

    def conv_plan(self) -> ConvPlan:
        """The support's structure as the conv op takes it (:class:`ConvPlan`)."""
        self.plan()  # eagerly, rebuilds every plan buffer if indices changed; raises on meta
        return ConvPlan(self.kernel_shape, self.groups, self._conv_rows, self._conv_cols,
                        self._conv_rowptr, self._chan_perm, self._chan_ptr)

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | str]:
        """x padded by the non-zero padding modes (then padding 0), and the padding left."""
        if self.padding_mode == "zeros":
            return x, self.padding
        ph, pw = self.padding
        return F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode), (0, 0)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", {self._sparse_repr()}, bias={self.bias is not None}"


class SparseConv2d(_SparseConvBase):
    """nn.Conv2d whose kernel holds exactly ``nnz`` entries (values plus indices).

    Conv arguments as nn.Conv2d; sparsity arguments as :class:`SparseLinear`, with a row
    being one output filter (``support="per_row"`` = equal count per filter, EPF).
    ``init``: "kaiming" (N(0, 2/f)), "normal" (N(0, 1/f)), f = nnz/out_channels, or "zeros".
    """

    kind = "sparse"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        nnz: int | None = None,
        density: float | None = None,
        support: str = "random",
        init: str = "kaiming",
        seed: int | None = None,
        indices: torch.Tensor | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_conv(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            padding_mode,
        )
        check_choice("init", init, self._inits)
        self._init_support(
            self.out_channels, self.patch_size, nnz=nnz, density=density, support=support,
            init=init, indices=indices, seed=seed, backend=backend, device=device,
            dtype=dtype,
        )
        register_bias(self, bias, self.out_channels, device, self.values.dtype)
        if self._materialised():
            self._reset_sparse(make_generator(self.seed))

    _inits = ("kaiming", "normal", "zeros")

    @classmethod
    def from_indices(
        cls, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
        indices: torch.Tensor, values: torch.Tensor | None = None, **kwargs,
    ):
        """A layer on the given support (2, nnz) of the (out, L) kernel matrix."""
        layer = cls(in_channels, out_channels, kernel_size, indices=indices, **kwargs)
        copy_given_values(layer, indices, values)
        return layer

    def to_dense(self) -> torch.Tensor:
        """The kernel (out_channels, in_channels/groups, kh, kw); differentiable."""
        return self.sparse_dense().view(self.kernel_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x, padding = self._padded(x)
        return sparse_conv2d(x, self.values, self.indices, self.kernel_shape, self.bias,
                             self.stride, padding, self.dilation, self.groups,
                             plan=self.conv_plan(), backend=self._backend)


class DCTPlusSparseConv2d(ScaledOffset, SparseConv2d):
    """Conv with kernel α·D + S: a fixed DCT offset on each patch plus a sparse S (the DCTpS
    slides).

    Other arguments (the conv geometry, nnz or density, support, seed, indices, backend,
    device, dtype) as :class:`SparseConv2d`, plus ``alpha``/``train_alpha`` as
    :class:`DCTPlusSparseLinear`; ``init`` defaults to "zeros". ``dct_order``: how a patch
    is flattened before its DCT, "khkwc" (the public DCTpS code's, default) or "ckhkw"
    (the F.unfold order); see the module docstring.

    forward = conv2d(x, α·D + S) + bias with one F.conv2d: D, the dense offset kernel, is
    cached in a non-persistent buffer (built in the constructor and whenever the layer is
    moved or cast, never saved) and S scattered into it. The offset is a dense conv, so
    the layer costs a dense conv whatever S is; running S through the direct sparse kernel
    beside α·conv2d(x, D) measured slower (1.04× dense at 64 → 64 3×3, 1.54× depthwise,
    against 1.00× and 1.005× folded; docs/design.md "Convolutions: the direct sparse
    kernel").
    """

    _inits = ("zeros", "normal", "kaiming")
    kind = "dctps"
    offset_convention = CONV_DCT_OFFSET

    @classmethod
    def fields(cls) -> dict[str, Field]:
        return {**super().fields(),
                "dct_order": Field(one_of(DCT_ORDERS), before=_DCT_ORDER_BEFORE_FIELD)}

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "dct_order": self.dct_order}

    @classmethod
    def constructor_arguments(cls, args, tensors, device):
        pos, kw = super().constructor_arguments(args, tensors, device)
        return pos, {**kw, "dct_order": args["dct_order"]}

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *args,
        alpha: float = 1.0,
        train_alpha: bool = True,
        dct_order: str = "khkwc",
        init: str = "zeros",
        **kwargs,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, *args, init=init, **kwargs)
        self.dct_order = check_choice("dct_order", dct_order, DCT_ORDERS)
        register_alpha(self, alpha, train_alpha)
        self.register_buffer("_dct_kernel", self.dct_dense(), persistent=False)

    def _apply(self, fn, recurse=True):
        # the cached offset is recomputed, not converted: after to_empty() (meta
        # materialisation) a converted buffer would hold garbage
        out = super()._apply(fn, recurse)
        if "_dct_kernel" in self._buffers:
            self._dct_kernel = self.dct_dense()
        return out

    def dct_dense(self) -> torch.Tensor:
        """The fixed offset kernel (out, in/groups, kh, kw), without α: channel o is column
        o of dct_matrix(L, out) laid out over the patch in ``dct_order``."""
        d = dct_matrix(
            self.patch_size, self.out_channels, dtype=self.values.dtype,
            device=self.values.device,
        ).T  # (out, L)
        if self.dct_order == "ckhkw":
            return d.reshape(self.kernel_shape)
        out, cg, kh, kw = self.kernel_shape
        return d.reshape(out, kh, kw, cg).permute(0, 3, 1, 2).contiguous()

    def to_dense(self) -> torch.Tensor:
        """The effective kernel α·D + S; differentiable in α and the values."""
        return self.alpha * self.dct_dense() + self.sparse_dense().view(self.kernel_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x, padding = self._padded(x)
        kernel = self.alpha * self._dct_kernel + self.sparse_dense().view(self.kernel_shape)
        return F.conv2d(x, kernel, self.bias, self.stride, padding, self.dilation,
                        self.groups)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", train_alpha={isinstance(self.alpha, nn.Parameter)}"
                f", dct_order={self.dct_order!r}")
