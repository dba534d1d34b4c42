"""Offline data: synthetic operator targets, MNIST-1D, digits, CIFAR from a local folder."""

from bornsparse._lazy import lazy_module

__getattr__, __dir__, __all__ = lazy_module(__name__, {
    "operators": ("make_target", "TARGETS"),
    "datasets": ("load_dataset", "DATASETS"),
})
