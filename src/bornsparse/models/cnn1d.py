"""The 1D CNN of the MNIST-1D paper (Greydanus 2020, "ConvBase")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from bornsparse._checks import check_positive_int
from bornsparse.models._common import check_batch, check_input_shape, factory

# (kernel, stride, padding) of the three convolutions of ConvBase
_LAYERS = ((5, 2, 1), (3, 2, 1), (3, 2, 1))


def _out_len(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class CNN1D(nn.Module):
    """Three convolutions (kernels 5, 3, 3; stride 2; padding 1; ``channels`` each; ReLU) and a
    linear classifier on the flattened features.

    Input (N, L) or (N, 1, L) per ``input_shape``; output (N, num_classes). For L = 40 the
    features are 25·5 = 125 and the model has 5,210 parameters, as ConvBase in the mnist1d
    repository.

    NOTE: the convolutions are ``nn.Conv2d`` with kernel (1, k) applied to the signal viewed as
    (N, 1, 1, L), the same function as ``nn.Conv1d`` with kernel k, so that layer-swapping tools
    (``bornsparse.models.sparsify_model`` handles nn.Linear and nn.Conv2d) see every layer.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        channels: int = 25,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        shape = check_input_shape(input_shape, model="cnn1d")
        if len(shape) > 2 or (len(shape) == 2 and shape[0] != 1):
            raise ValueError(
                f"cnn1d needs input_shape (length,) or (1, length), got {input_shape!r}"
            )
        self.input_shape = shape
        num_classes = check_positive_int("num_classes", num_classes)
        self.channels = check_positive_int("channels", channels)
        length = shape[-1]
        out = length
        for k, s, p in _LAYERS:
            out = _out_len(out, k, s, p)
            if out < 1:
                raise ValueError(f"cnn1d needs a signal of length at least 3, got {length}")
        fk = factory(device, dtype)
        self.convs = nn.ModuleList()
        c_in = 1
        for k, s, p in _LAYERS:
            self.convs.append(
                nn.Conv2d(c_in, channels, (1, k), stride=(1, s), padding=(0, p), **fk)
            )
            c_in = channels
        self.linear = nn.Linear(channels * out, num_classes, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch("cnn1d", x, self.input_shape)
        h = x.reshape(x.shape[0], 1, 1, self.input_shape[-1])  # (N, 1, 1, L)
        for conv in self.convs:
            h = F.relu(conv(h))  # (N, C, 1, L')
        return self.linear(torch.flatten(h, 1))
