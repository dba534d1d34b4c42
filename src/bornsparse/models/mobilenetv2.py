"""MobileNetV2 (Sandler et al. 2018) adapted to 32×32 inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from bornsparse.models._common import (
    check_batch,
    check_image_shapes,
    factory,
    he_init_,
)

# (expansion t, out channels c, blocks n, first stride s), Sandler et al. Table 2, with the
# CIFAR change: the second stage's stride 2 → 1 (and the stem's stride 2 → 1 below)
CIFAR_CONFIG = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expand 1×1 (×t) → depthwise 3×3 (stride) → project 1×1, BatchNorm after each,
    ReLU after the first two; residual when stride is 1.

    With stride 1 and a change of width, ``conv_shortcut=True`` adds a 1×1 conv + BN shortcut
    (the common CIFAR port's block); ``False`` drops the residual there, as in the paper.
    """

    def __init__(
        self, in_channels: int, out_channels: int, expansion: int, stride: int,
        conv_shortcut: bool, **fk,
    ) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, hidden, 1, bias=False, **fk)
        self.bn1 = nn.BatchNorm2d(hidden, **fk)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False, **fk)
        self.bn2 = nn.BatchNorm2d(hidden, **fk)
        self.conv3 = nn.Conv2d(hidden, out_channels, 1, bias=False, **fk)
        self.bn3 = nn.BatchNorm2d(out_channels, **fk)
        self.shortcut: nn.Module | None = None
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif stride == 1 and conv_shortcut:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False, **fk),
                nn.BatchNorm2d(out_channels, **fk),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out if self.shortcut is None else out + self.shortcut(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for CIFAR: conv3×3(32), stride 1 → inverted residual stages of
    ``CIFAR_CONFIG`` → conv1×1(1280) → global average pool → Linear(1280, num_classes).

    Input (N, C, H, W); output (N, num_classes). With the default ``conv_shortcut=True`` this is
    the widely used CIFAR port (kuangliu/pytorch-cifar, also the DCTpS code base):
    2,296,922 parameters for 10 classes. ``conv_shortcut=False`` drops those shortcuts, as
    the paper does: 2,237,770 (the paper also omits the expansion conv where t = 1, which
    this port keeps).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        conv_shortcut: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_shape, num_classes = check_image_shapes("mobilenetv2", input_shape, num_classes)
        if not isinstance(conv_shortcut, bool):
            raise TypeError(f"conv_shortcut must be a bool, got {conv_shortcut!r}")
        fk = factory(device, dtype)
        self.conv1 = nn.Conv2d(self.input_shape[0], 32, 3, 1, 1, bias=False, **fk)
        self.bn1 = nn.BatchNorm2d(32, **fk)
        blocks: list[nn.Module] = []
        c_in = 32
        for t, c, n, s in CIFAR_CONFIG:
            for i in range(n):
                blocks.append(InvertedResidual(c_in, c, t, s if i == 0 else 1, conv_shortcut, **fk))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(c_in, 1280, 1, bias=False, **fk)
        self.bn2 = nn.BatchNorm2d(1280, **fk)
        self.fc = nn.Linear(1280, num_classes, **fk)
        he_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch("mobilenetv2", x, self.input_shape)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)  # (N, 320, H/8, W/8)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
