"""Model zoo, sparsify(model, ...) for any torch model, and save/load of sparse models."""

from bornsparse._lazy import lazy_module

__getattr__, __dir__, __all__ = lazy_module(__name__, {
    "sparsify_model": ("sparsify", "SparsifyReport"),
    "zoo": ("build_model", "MODELS"),
    "checkpoint": ("save", "load", "CheckpointError"),
})
