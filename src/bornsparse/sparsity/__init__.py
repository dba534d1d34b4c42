"""Deciding supports: distributions, pruning at init, IMP, dynamic sparse training."""

from bornsparse._lazy import lazy_module

_TABLE = {
    "allocate_nnz": "distributions",
    "DISTRIBUTIONS": "distributions",
    "DEFAULT_DISTRIBUTION": "distributions",
    "support_layout": "distributions",
    "RigL": "dynamic",
    "SET": "dynamic",
    "prune_at_init": "pruning_at_init",
    "PruneReport": "pruning_at_init",
    "IMP": "imp",
}
__all__ = sorted(_TABLE)
__getattr__, __dir__ = lazy_module(__name__, _TABLE)
