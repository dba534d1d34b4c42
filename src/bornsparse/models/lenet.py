"""LeNet-5 (LeCun et al. 1998) with ReLU, for any small image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from bornsparse.models._common import check_batch, check_image_shapes, factory

#: the input side LeNet-5 was designed for
LENET_SIDE = 32


class LeNet5(nn.Module):
    """conv5×5(6) → pool → conv5×5(16) → pool → FC 120 → FC 84 → FC num_classes, ReLU between.

    Input (N, C, H, W); output (N, num_classes). Pooling is 2×2 ("avg", LeCun's subsampling
    and the DCTpS code base's choice, or "max").

    NOTE: a side shorter than 32 is zero-padded (centred) to 32 before the first convolution,
    as LeCun et al. padded MNIST's 28×28 digits to 32×32. The same rule makes 8×8 digits work:
    they sit in the middle of a 32×32 frame, so every input gives the classic 16·5·5 = 400
    features and the same 61,706 parameters (1 channel, 10 classes; 62,006 with 3 channels).
    Sides above 32 are kept and the first FC layer grows to match.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        pool: str = "avg",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_shape, num_classes = check_image_shapes("lenet5", input_shape, num_classes)
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        c, h, w = self.input_shape
        ph, pw = max(0, LENET_SIDE - h), max(0, LENET_SIDE - w)
        # F.pad order: (left, right, top, bottom)
        self.padding = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        h, w = h + ph, w + pw
        fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        fk = factory(device, dtype)
        self.conv1 = nn.Conv2d(c, 6, 5, **fk)
        self.conv2 = nn.Conv2d(6, 16, 5, **fk)
        self.fc1 = nn.Linear(16 * fh * fw, 120, **fk)
        self.fc2 = nn.Linear(120, 84, **fk)
        self.fc3 = nn.Linear(84, num_classes, **fk)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) if self.pool == "avg" else F.max_pool2d(x, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch("lenet5", x, self.input_shape)
        if any(self.padding):
            x = F.pad(x, self.padding)
        x = self._pool(F.relu(self.conv1(x)))  # (N, 6, 14, 14) for 32×32
        x = self._pool(F.relu(self.conv2(x)))  # (N, 16, 5, 5)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, pool={self.pool!r}, padding={self.padding}"
