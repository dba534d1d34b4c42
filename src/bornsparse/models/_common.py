"""Helpers shared by the model files: shape validation and weight initialisation."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

from bornsparse._checks import check_float_tensor, check_positive_int


def check_input_shape(
    input_shape: object, *, ndim: int | None = None, model: str
) -> tuple[int, ...]:
    """Return ``input_shape`` (a per-sample shape, no batch axis) as a tuple of positive ints."""
    if not isinstance(input_shape, Sequence) or isinstance(input_shape, str):
        raise TypeError(
            f"input_shape must be a tuple of positive ints (one sample, no batch axis), "
            f"got {input_shape!r}"
        )
    shape = tuple(input_shape)
    if len(shape) == 0 or any(
        isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape
    ):
        raise ValueError(
            f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}"
        )
    if ndim is not None and len(shape) != ndim:
        what = {1: "(length,)", 3: "(channels, height, width)"}.get(ndim, f"{ndim} entries")
        raise ValueError(f"{model} needs input_shape {what}, got {input_shape!r}")
    return tuple(int(s) for s in shape)


def check_model_shapes(
    input_shape: object, num_classes: object, *, ndim: int | None = None, model: str
) -> tuple[tuple[int, ...], int]:
    """``(input_shape, num_classes)`` checked: :func:`check_input_shape` and a positive
    class count."""
    return (check_input_shape(input_shape, ndim=ndim, model=model),
            check_positive_int("num_classes", num_classes))


def check_image_shapes(
    model: str, input_shape: object, num_classes: object
) -> tuple[tuple[int, ...], int]:
    """:func:`check_model_shapes` for an image model: ``input_shape`` (channels, height,
    width)."""
    return check_model_shapes(input_shape, num_classes, ndim=3, model=model)


def check_batch(model: str, x: object, input_shape: tuple[int, ...]) -> torch.Tensor:
    """Raise unless ``x`` is a float tensor of shape (N, *input_shape)."""
    x = check_float_tensor("input", x)
    if x.dim() != len(input_shape) + 1 or tuple(x.shape[1:]) != input_shape:
        raise ValueError(
            f"{model} expects input of shape (N, {', '.join(map(str, input_shape))}), "
            f"got {tuple(x.shape)}"
        )
    return x


def check_resnet_depth(depth: object) -> int:
    """Return ``depth`` if it is 6n+2 with n >= 1, the depths of He et al.'s CIFAR ResNets."""
    d = check_positive_int("depth", depth)
    if (d - 2) % 6 or d < 8:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {d}")
    return d


def factory(device: torch.device | str | None, dtype: torch.dtype | None) -> dict:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a real floating torch.dtype or None, got {dtype!r}")
    return {"device": device, "dtype": dtype}


@torch.no_grad()
def he_init_(module: nn.Module) -> None:
    """He-normal (fan_out, ReLU) for every Conv2d, BatchNorm to (1, 0): the usual ResNet init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
