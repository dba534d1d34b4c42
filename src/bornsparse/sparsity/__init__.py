"""Deciding supports: distributions, pruning at init, IMP, dynamic sparse training."""

from bornsparse._lazy import lazy_module

__getattr__, __dir__, __all__ = lazy_module(__name__, {
    "distributions": ("allocate_nnz", "DISTRIBUTIONS", "DEFAULT_DISTRIBUTION", "support_layout"),
    "dynamic": ("RigL", "SET"),
    "pruning_at_init": ("prune_at_init", "PruneReport"),
    "imp": ("IMP",),
})
