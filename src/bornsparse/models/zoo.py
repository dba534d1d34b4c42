"""Registry of the models: ``build_model(name, num_classes=..., input_shape=...)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import partial

from torch import nn

from bornsparse._checks import check_positive_int
from bornsparse.models._common import check_input_shape
from bornsparse.models.cnn1d import CNN1D
from bornsparse.models.fixup import FixupResNet
from bornsparse.models.lenet import LeNet5
from bornsparse.models.mlp import MLP
from bornsparse.models.mobilenetv2 import MobileNetV2
from bornsparse.models.resnet_cifar import BottleneckResNet, CifarResNet

# name -> constructor taking (input_shape, num_classes, **kwargs)
_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "cnn1d": CNN1D,
    "resnet20": partial(CifarResNet, 20),
    "resnet110": partial(CifarResNet, 110),
    "fixup_resnet20": partial(FixupResNet, 20),
    "fixup_resnet110": partial(FixupResNet, 110),
    "mobilenetv2": MobileNetV2,
    "resnet50": BottleneckResNet,
}

#: names accepted by :func:`build_model`
MODELS: tuple[str, ...] = tuple(_REGISTRY)


def _keywords(name: str) -> tuple[str, ...]:
    ctor = _REGISTRY[name]
    target = ctor.func if isinstance(ctor, partial) else ctor
    params = inspect.signature(target).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def build_model(
    name: str, *, num_classes: int, input_shape: Sequence[int], **kwargs: object
) -> nn.Module:
    """Build model ``name`` (one of :data:`MODELS`) for inputs (N, *input_shape).

    The model returns logits (N, num_classes). ``kwargs`` go to the model's constructor:
    every model takes ``device`` and ``dtype``; "mlp" takes ``hidden_sizes``, "lenet5"
    ``pool``, "cnn1d" ``channels``, "mobilenetv2" ``conv_shortcut``, "resnet50" ``blocks``.
    ``input_shape`` is one sample's shape: (length,) for "cnn1d" (or (1, length)),
    (channels, height, width) for the convolutional image models, anything for "mlp".
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"name must be one of {MODELS}, got {name!r}")
    num_classes = check_positive_int("num_classes", num_classes)
    input_shape = check_input_shape(input_shape, model=name)
    accepted = _keywords(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"build_model({name!r}) got unexpected keyword argument(s) {unknown}; "
            f"it accepts {sorted(accepted)}"
        )
    return _REGISTRY[name](input_shape, num_classes, **kwargs)
