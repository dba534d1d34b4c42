"""Offline data: synthetic operator targets, MNIST-1D, digits, CIFAR from a local folder."""

from bornsparse._lazy import lazy_module

_TABLE = {
    "make_target": "operators",
    "TARGETS": "operators",
    "load_dataset": "datasets",
    "DATASETS": "datasets",
}
__all__ = sorted(_TABLE)
__getattr__, __dir__ = lazy_module(__name__, _TABLE)
