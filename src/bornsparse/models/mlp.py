"""Multi-layer perceptron on flattened inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bornsparse._checks import check_positive_int
from bornsparse.models._common import check_batch, check_model_shapes, factory


class MLP(nn.Module):
    """Flatten, then Linear → ReLU for each hidden size, then a Linear classifier.

    Input (N, *input_shape); output (N, num_classes) logits. The default hidden sizes (100, 100)
    give the MNIST-1D paper's MLP: 40 → 100 → 100 → 10, 15,210 parameters.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        hidden_sizes: Sequence[int] = (100, 100),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_shape, num_classes = check_model_shapes(
            input_shape, num_classes, model="mlp")
        if isinstance(hidden_sizes, (str, bytes)) or not isinstance(hidden_sizes, Sequence):
            raise TypeError(
                f"hidden_sizes must be a sequence of positive ints, got {hidden_sizes!r}"
            )
        hidden = [check_positive_int("hidden_sizes entry", h) for h in hidden_sizes]
        fk = factory(device, dtype)
        widths = [math.prod(self.input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b, **fk), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes, **fk))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch("mlp", x, self.input_shape)
        return self.net(x)
