"""Small pieces every layer of bornsparse.nn builds from: the sizes, the bias, the input
check."""

from __future__ import annotations

import torch
from torch import nn

from bornsparse._checks import check_float_tensor, check_last_dim, check_positive_int


def check_features(in_features: object, out_features: object) -> tuple[int, int]:
    """``(in_features, out_features)``, each checked to be a positive int."""
    return (check_positive_int("in_features", in_features),
            check_positive_int("out_features", out_features))


def register_bias(module: nn.Module, bias: object, size: int, device, dtype) -> None:
    """A ``bias`` Parameter of ``size`` entries (uninitialised), or a registered None."""
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got {bias!r}")
    if bias:
        module.bias = nn.Parameter(torch.empty(size, device=device, dtype=dtype))
    else:
        module.register_parameter("bias", None)


def check_features_input(x: torch.Tensor, in_features: int, dtype: torch.dtype) -> None:
    """A floating input (..., in_features) of the layer's ``dtype``, or raise."""
    check_float_tensor("input", x)
    check_last_dim("input", x, in_features)
    if x.dtype != dtype:
        raise TypeError(f"input must have the layer's dtype {dtype}, got {x.dtype}")
