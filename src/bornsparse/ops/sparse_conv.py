"""Re-exports, under this module's import path, the direct sparse 2-D convolution, whose
code lives in ``ops/sparse/conv.py`` (its numba kernels in ``ops/sparse/numba_conv.py``)."""

from bornsparse.ops.sparse.conv import (
    ConvPlan,
    build_conv_plan,
    check_conv_plan,
    dense_kernel,
    entry_channels,
    output_size,
    resolve_padding,
    sparse_conv2d,
    sparse_conv2d_reference,
)

__all__ = [
    "ConvPlan",
    "build_conv_plan",
    "check_conv_plan",
    "dense_kernel",
    "entry_channels",
    "output_size",
    "resolve_padding",
    "sparse_conv2d",
    "sparse_conv2d_reference",
]
