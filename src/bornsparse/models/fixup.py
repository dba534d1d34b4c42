"""FixUp CIFAR ResNets (Zhang, Dauphin & Ma 2019): He et al.'s ResNet-(6n+2) without
normalisation, trained stably through initialisation alone.

Follows the authors' CIFAR code: scalar biases before each convolution and activation, a
scalar multiplier after each residual branch, option-A shortcuts (subsample, append zeros).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from bornsparse.models.resnet_cifar import ResNet6n2, ZeroPadShortcut


def _scalar(value: float, **fk) -> nn.Parameter:
    return nn.Parameter(torch.full((1,), value, **fk))


class FixupBasicBlock(nn.Module):
    """relu(branch(x) + shortcut(x + bias1a)) with
    branch(x) = scale · conv2(relu(conv1(x + bias1a) + bias1b) + bias2a) + bias2b."""

    def __init__(self, in_channels: int, channels: int, stride: int, **fk) -> None:
        super().__init__()
        self.bias1a = _scalar(0.0, **fk)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False, **fk)
        self.bias1b = _scalar(0.0, **fk)
        self.bias2a = _scalar(0.0, **fk)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False, **fk)
        self.scale = _scalar(1.0, **fk)
        self.bias2b = _scalar(0.0, **fk)
        if stride != 1 or in_channels != channels:
            self.shortcut: nn.Module = ZeroPadShortcut(in_channels, channels, stride)
        else:
            self.shortcut = nn.Identity()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Scalar biases to 0 and the multiplier to 1. The convs' FixUp init depends on the
        network's branch count, so FixupResNet.reset_parameters applies it."""
        for p in (self.bias1a, self.bias1b, self.bias2a, self.bias2b):
            p.zero_()
        self.scale.fill_(1.0)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch alone; exactly zero at initialisation (conv2 starts at zero)."""
        out = self.conv1(x + self.bias1a)
        out = F.relu(out + self.bias1b)
        out = self.conv2(out + self.bias2a)
        return out * self.scale + self.bias2b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the authors' code feeds x + bias1a to the shortcut only when it downsamples
        identity = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(x + self.bias1a)
        return F.relu(self.branch(x) + identity)


class FixupResNet(ResNet6n2):
    """FixUp ResNet of depth 6n+2: no BatchNorm; input (N, C, H, W), output (N, num_classes).

    Initialisation (Zhang et al. 2019, §3 "Fixup"): with L = 3n residual branches of m = 2
    layers, each branch's first conv is He-normal scaled by L^(-1/(2m-2)) = L^(-1/2), its last
    conv is zero, the classifier's weight and bias are zero, scalar biases start at 0 and
    multipliers at 1. The stem conv keeps PyTorch's default init, as in the authors' code.

    NOTE: at initialisation every residual branch outputs exactly zero, so the network is its
    shortcut path, and with the zero classifier every logit is 0.
    """

    model_name = "fixup_resnet"

    def build(self, n: int, num_classes: int, fk: dict) -> None:
        self.conv1 = nn.Conv2d(self.input_shape[0], 16, 3, 1, 1, bias=False, **fk)
        self.bias1 = _scalar(0.0, **fk)
        self.blocks = self.stages(FixupBasicBlock, n, **fk)
        self.bias2 = _scalar(0.0, **fk)
        self.fc = nn.Linear(64, num_classes, **fk)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Apply the FixUp initialisation to the blocks and the classifier.

        NOTE: convs and the classifier already swapped for sparse layers (``sparsify`` of a
        model built on the meta device materialises the rest through this method) keep
        their own initialisation; only dense ``nn.Conv2d``/``nn.Linear`` get FixUp's.
        """
        num_branches = len(self.blocks)
        for block in self.blocks:
            block.reset_parameters()
            if type(block.conv1) is nn.Conv2d:
                w = block.conv1.weight
                fan_out = w.shape[0] * w.shape[2] * w.shape[3]
                nn.init.normal_(w, 0.0, math.sqrt(2.0 / fan_out) * num_branches ** -0.5)
            if type(block.conv2) is nn.Conv2d:
                nn.init.zeros_(block.conv2.weight)
        self.bias1.zero_()
        self.bias2.zero_()
        if type(self.fc) is nn.Linear:
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = F.relu(self.conv1(x) + self.bias1)
        x = self.blocks(x)  # (N, 64, H/4, W/4)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x + self.bias2)
