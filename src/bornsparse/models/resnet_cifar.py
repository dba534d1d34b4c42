"""CIFAR ResNets: He et al. (2016) §4.2 ResNet-(6n+2) and a bottleneck ResNet-50.

ResNet-20/110 use option A shortcuts (identity; when the shape changes, subsample by 2 and
append zero channels), as He et al. did on CIFAR: they add no parameters, giving 269,722 and
1,730,714 parameters for 10 classes. ResNet-50 is the ImageNet bottleneck design with the
usual CIFAR stem (3×3 conv, stride 1, no max-pool) and 1×1-conv projection shortcuts,
23,520,842 parameters for 10 classes (the layout of the DCTpS code base).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from bornsparse._checks import check_positive_int
from bornsparse.models._common import (
    check_batch,
    check_image_shapes,
    check_resnet_depth,
    factory,
    he_init_,
)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: (N, C_in, H, W) → (N, C_out, ⌈H/s⌉, ⌈W/s⌉), parameter-free.

    Keeps every s-th pixel and appends C_out − C_in zero channels.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"out_channels ({out_channels}) < in_channels ({in_channels})")
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads the last dims first: (W, W, H, H, C, C)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra}, stride={self.stride}"


class BasicBlock(nn.Module):
    """relu(bn(conv3×3(relu(bn(conv3×3(x))))) + shortcut(x)), option-A shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int, **fk) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False, **fk)
        self.bn1 = nn.BatchNorm2d(channels, **fk)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False, **fk)
        self.bn2 = nn.BatchNorm2d(channels, **fk)
        if stride != 1 or in_channels != channels:
            self.shortcut: nn.Module = ZeroPadShortcut(in_channels, channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet6n2(nn.Module):
    """What He et al.'s CIFAR ResNet-(6n+2) variants share: the checked ``depth`` and shapes,
    and three stages of n blocks with 16, 32, 64 channels (stride 2 entering stages 2 and 3).

    Subclasses name the model (``model_name``) and make their layers in :meth:`build`.
    """

    model_name: str  # what errors call the model, before its depth ("resnet")

    def __init__(
        self,
        depth: int,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.depth = depth = check_resnet_depth(depth)
        self.input_shape, num_classes = check_image_shapes(
            f"{self.model_name}{depth}", input_shape, num_classes)
        self.build((depth - 2) // 6, num_classes, factory(device, dtype))

    def build(self, n: int, num_classes: int, fk: dict) -> None:
        """Make and initialise the layers: ``n`` blocks a stage, ``fk`` the device and dtype."""
        raise NotImplementedError

    @staticmethod
    def stages(block: Callable[..., nn.Module], n: int, **fk) -> nn.Sequential:
        """The 3n blocks ``block(in_channels, channels, stride, **fk)``, built in order."""
        blocks = []
        c_in = 16
        for stage, c in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(block(c_in, c, stride, **fk))
                c_in = c
        return nn.Sequential(*blocks)

    def check_input(self, x: torch.Tensor) -> None:
        check_batch(f"{self.model_name}{self.depth}", x, self.input_shape)


class CifarResNet(ResNet6n2):
    """He et al.'s CIFAR ResNet of depth 6n+2 with BatchNorm.

    conv3×3(16) → 3 stages of n basic blocks with 16, 32, 64 channels (stride 2 entering stages
    2 and 3) → global average pool → Linear(64, num_classes). Input (N, C, H, W), any H, W;
    output (N, num_classes).
    """

    model_name = "resnet"

    def build(self, n: int, num_classes: int, fk: dict) -> None:
        self.conv1 = nn.Conv2d(self.input_shape[0], 16, 3, 1, 1, bias=False, **fk)
        self.bn1 = nn.BatchNorm2d(16, **fk)
        self.blocks = self.stages(BasicBlock, n, **fk)
        self.fc = nn.Linear(64, num_classes, **fk)
        he_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)  # (N, 64, H/4, W/4)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Bottleneck(nn.Module):
    """relu(bn(conv1×1(4c)) ∘ relu∘bn∘conv3×3(c, stride) ∘ relu∘bn∘conv1×1(c) (x) + shortcut(x)).

    The shortcut is a 1×1 conv (with the stride) + BatchNorm when the shape changes.
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, **fk) -> None:
        super().__init__()
        out = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False, **fk)
        self.bn1 = nn.BatchNorm2d(channels, **fk)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False, **fk)
        self.bn2 = nn.BatchNorm2d(channels, **fk)
        self.conv3 = nn.Conv2d(channels, out, 1, bias=False, **fk)
        self.bn3 = nn.BatchNorm2d(out, **fk)
        if stride != 1 or in_channels != out:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out, 1, stride, bias=False, **fk),
                nn.BatchNorm2d(out, **fk),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class BottleneckResNet(nn.Module):
    """ResNet-50-style network for small images.

    conv3×3(64), stride 1, no max-pool → stages of ``blocks`` bottlenecks with 64, 128, 256,
    512 inner channels (×4 out; stride 2 entering stages 2-4) → global average pool →
    Linear(2048, num_classes). ``blocks=(3, 4, 6, 3)`` is ResNet-50.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        blocks: Sequence[int] = (3, 4, 6, 3),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_shape, num_classes = check_image_shapes("resnet50", input_shape, num_classes)
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or len(blocks) != 4:
            raise ValueError(f"blocks must be 4 positive ints (blocks per stage), got {blocks!r}")
        counts = [check_positive_int("blocks entry", b) for b in blocks]
        fk = factory(device, dtype)
        self.conv1 = nn.Conv2d(self.input_shape[0], 64, 3, 1, 1, bias=False, **fk)
        self.bn1 = nn.BatchNorm2d(64, **fk)
        layers: list[nn.Module] = []
        c_in = 64
        for stage, (c, count) in enumerate(zip((64, 128, 256, 512), counts, strict=True)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(Bottleneck(c_in, c, stride, **fk))
                c_in = c * Bottleneck.expansion
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes, **fk)
        he_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch("resnet50", x, self.input_shape)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)  # (N, 2048, H/8, W/8)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
