"""Model zoo, sparsify(model, ...) for any torch model, and save/load of sparse models."""

from bornsparse._lazy import lazy_module

_TABLE = {
    "sparsify": "sparsify_model",
    "SparsifyReport": "sparsify_model",
    "build_model": "zoo",
    "MODELS": "zoo",
    "save": "checkpoint",
    "load": "checkpoint",
    "CheckpointError": "checkpoint",
}
__all__ = sorted(_TABLE)
__getattr__, __dir__ = lazy_module(__name__, _TABLE)
